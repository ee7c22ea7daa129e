"""Whether this machine can start a sandboxed run, for the tests that run real actions."""

from __future__ import annotations

import functools
import os
import shutil


@functools.cache
def sandbox_missing() -> str | None:
    """Why the executor's sandbox cannot run here (root, bubblewrap, the cgroups), or None."""
    from reconciler.executor.sandbox import Sandbox

    if os.geteuid() != 0:
        return "the executor's sandbox needs root (namespaces, cgroups)"
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    ready, why = Sandbox(cgroup_root="/sys/fs/cgroup").available()
    return None if ready else f"the sandbox is not available here: {why}"


def reap_cgroups(parent: str, cgroup_root: str = "/sys/fs/cgroup") -> None:
    """Remove every run cgroup below `parent` (those a failed test left behind included), then
    `parent` itself in each hierarchy."""
    from pathlib import Path

    from reconciler.executor.sandbox import Sandbox

    root = Path(cgroup_root)
    sandbox = Sandbox(cgroup_root=cgroup_root)
    for name in {d.name for d in root.glob(f"*/{parent}/*") if d.is_dir()}:
        sandbox.reap(f"{parent}/{name}")
    for directory in root.glob(f"*/{parent}"):
        directory.rmdir()
