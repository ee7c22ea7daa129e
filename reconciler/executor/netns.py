"""Network namespaces with only a loopback, kept for the next run of the same agent.

A run whose Capability gives it no network at all gets a network namespace with only its own
loopback (docs/sandbox.md, "Network rules by destination"). Making one per run, and above all
the kernel tearing it down after the run (on a work queue, with RCU grace periods), costs about
a millisecond of processor time a run on a small device: a sixth of everything a trivial
sandboxed run costs. So a `NetworkPool` keeps the namespace of a run that ended and gives it to
a later run of the same group (the runs whose cgroups share a parent: one agent's runs).

A namespace is given to one run at a time. It goes back to the pool only once the run's cgroup
was removed, so no process of that run is left in it; a run whose cgroup could not be removed
closes its namespace instead. A run holds no capability in it (bubblewrap drops them all), so
it cannot change the namespace for the next: its loopback, addresses, routes and settings stay
as made here. What one run can leave to the next is what the kernel keeps of its closed
connections for a minute (TIME_WAIT), which makes a later `bind` to the same port fail without
SO_REUSEADDR, as on any host. Two runs of one agent never share a namespace at the same time.

Namespaces are made by a short-lived thread of the calling process: unshare(CLONE_NEWNET)
moves only the calling thread, so the process's other threads, and the thread that asked, stay
in the host's network. The pool holds at most `limit` namespaces, the oldest given back closed
first; the kernel frees a namespace when its last fd and process are gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
from collections import OrderedDict

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in the 24-byte union
_NEVER = {errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
"""unshare's answers that no later try would change: no privilege, no kernel support."""


class NetworkPool:
    """Network namespaces with only a loopback, up, by group. Not thread-safe: the executor's
    loop alone uses it."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self._free: OrderedDict[str, list[int]] = OrderedDict()
        self._kept = 0
        self.unavailable: str | None = None  # why namespaces cannot be made here, once known

    def take(self, group: str) -> Lease | None:
        """A namespace for one run of `group`: one its earlier run left, or a new one. None
        when none can be made here (the caller then has the sandbox make its own, which reports
        the real error if that fails too)."""
        free = self._free.get(group)
        if free:
            fd = free.pop()
            self._kept -= 1
            if not free:
                del self._free[group]
            return Lease(self, group, fd)
        if self.unavailable is not None:
            return None
        try:
            return Lease(self, group, new_namespace())
        except OSError as exc:
            if exc.errno in _NEVER:
                self.unavailable = str(exc)
            return None  # for now (out of fds or memory): the next run asks again
        except RuntimeError:  # no thread could be started
            return None

    def give(self, group: str, fd: int) -> None:
        """Take back the namespace `fd` once the run of `group` that had it has no process
        left. The pool owns the fd from here on."""
        self._free.setdefault(group, []).append(fd)
        self._free.move_to_end(group)
        self._kept += 1
        while self._kept > self.limit:
            oldest, fds = next(iter(self._free.items()))
            os.close(fds.pop(0))
            self._kept -= 1
            if not fds:
                del self._free[oldest]

    def kept(self) -> int:
        return self._kept

    def close(self) -> None:
        for fds in self._free.values():
            for fd in fds:
                os.close(fd)
        self._free.clear()
        self._kept = 0


class Lease:
    """One run's hold on a namespace of the pool: `fd` to enter it; `give_back()` once the run
    has no process left, `close()` otherwise (or when it never started). Either, once."""

    def __init__(self, pool: NetworkPool, group: str, fd: int):
        self._pool = pool
        self.group = group
        self.fd = fd

    def give_back(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._pool.give(self.group, fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def new_namespace() -> int:
    """A new network namespace whose loopback is up (127.0.0.1 and ::1), as an O_CLOEXEC fd.
    OSError when it cannot be made (no CAP_SYS_ADMIN, a kernel without network namespaces)."""
    outcome: list = []

    def make() -> None:
        try:
            _unshare(CLONE_NEWNET)
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _loopback_up()
            except BaseException:
                os.close(fd)
                raise
            outcome.append(fd)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=make, name="spos-netns", daemon=True)
    thread.start()
    thread.join()
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]


def ready() -> None:
    """Load what `enter` uses, in a parent about to fork the child that calls it."""
    _libc()
    _errno()


def enter(fd: int) -> None:
    """Move the calling thread into the namespace `fd` (setns); in a forked child, before
    bubblewrap is executed (after `ready()` in the parent)."""
    libc = _libc()
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = _errno()
        raise OSError(error, f"cannot enter the run's network namespace: {os.strerror(error)}")


def _unshare(flags: int) -> None:
    libc = _libc()
    if libc.unshare(flags) != 0:
        error = _errno()
        raise OSError(error, f"cannot make a network namespace: {os.strerror(error)}")


def _loopback_up() -> None:
    """Bring `lo` up in the calling thread's namespace; the kernel then gives it 127.0.0.1/8
    and ::1, as bubblewrap's --unshare-net does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # allowed where AF_INET is not
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()
