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
