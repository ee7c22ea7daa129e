"""Whether this machine can start a sandboxed run, for the tests that run real actions, and
removing the cgroups such runs leave."""

from __future__ import annotations

import functools
import os
import shutil


def remove_cgroup_tree(parent: str, cgroup_root: str = "/sys/fs/cgroup") -> None:
    """Remove `parent` and every cgroup below it, deepest first, in every hierarchy (one that
    still holds a process stays)."""
    from pathlib import Path

    root = Path(cgroup_root)
    for top in [root / parent, *root.glob(f"*/{parent}")]:
        for directory, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass


def remove_cgroups_of(device_root) -> None:
    """Remove the cgroups spos made for the device at `device_root` (a parent of its own, as
    for any root but `/`, with the agents' and runs' below)."""
    from reconciler.cgroupfs import parent_for

    remove_cgroup_tree(parent_for(str(device_root)))


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
