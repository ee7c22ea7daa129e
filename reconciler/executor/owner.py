"""Which process owns an active run, and whether that process still lives.

An owner is (pid, the kernel's boot id, the process's start time in clock ticks): a pid reused
after a reboot or by another process does not look alive.
"""

from __future__ import annotations

import os


def identity() -> dict:
    """The calling process as an owner."""
    return {"pid": os.getpid(), "bootId": _boot_id(), "startTicks": _start_ticks(os.getpid())}


def alive(owner: dict) -> bool:
    if not owner or owner.get("bootId") != _boot_id():
        return False
    pid, ticks = owner.get("pid"), owner.get("startTicks")
    return isinstance(pid, int) and ticks is not None and _start_ticks(pid) == ticks


PID_MAX = 1 << 22
"""The largest pid Linux hands out (kernel.pid_max cannot go higher); a file saying more was
not written by a process."""


def process_alive(pid) -> bool:
    """Whether a process with this pid exists (one that is not ours to signal counts)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boot_id() -> str:
    """The kernel's id of this boot ("" where it cannot be read)."""
    return _boot_id()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
