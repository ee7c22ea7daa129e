"""Landlock: the kernel's own per-process file and port allowlist, the layer that limits what a
sandboxed action may read, write and execute beyond what mounts can express.

Mounts make the host read-only and hide denied paths; they cannot say "only these programs may
be started" or "only these directories may be read". Landlock can: a process restricts itself,
irreversibly and for all its descendants, to a set of (path, rights) rules. The ruleset is built
here, in the executor, as plain data (`Ruleset`); the in-sandbox launcher (`_launch.py`) applies
it right before it executes the action, after bubblewrap has set up the mounts (a
Landlock-restricted process may not mount, so it cannot be applied earlier).

Every file-system right the kernel knows (up to ABI 7) is handled, so whatever a rule does not
grant is denied. A rule on a directory covers everything beneath it. Landlock cannot deny below
an allowed directory; that is what the sandbox's mount-level hiding of denied paths is for.
"""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass

SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
CREATE_RULESET_VERSION = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13      # ABI 2
TRUNCATE = 1 << 14   # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6

_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # valid on a non-directory

READ = READ_FILE | READ_DIR
RUN = EXECUTE | READ
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE)
DEVICE = READ | WRITE_FILE | IOCTL_DEV | TRUNCATE

# What every program needs to start and to look up names, time and addresses: installed
# software and libraries, and a short list of /etc files. Everything else in /etc (ssl, the
# backup agent's whole /etc...) must be granted by the capability.
SYSTEM_READ = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ld.so.preload",
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/hosts",
    "/etc/resolv.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols",
    "/etc/localtime", "/etc/timezone", "/etc/alternatives", "/etc/hostname",
    "/sys/devices/system/cpu",
    "/proc",  # the run's own procfs: only its own processes
    "/run",   # the run's own empty tmpfs (plus resolv.conf's target when it has network)
)
SYSTEM_READ_GLOBS = ("/etc/python3*",)  # Debian's sitecustomize, read by every python3
PRIVATE_WRITE = ("/tmp", "/dev/shm")     # the run's own tmpfs, gone when it ends
DEVICE_TREE = "/dev"                     # bubblewrap's minimal /dev (+ the allowed nodes)
# The ELF interpreter is opened for execution by the kernel on every exec of a dynamic program.
LOADER_GLOBS = ("/lib*/ld-linux*.so*", "/lib/*/ld-linux*.so*", "/usr/lib*/ld-linux*.so*",
                "/usr/lib/*/ld-linux*.so*", "/lib/ld-musl-*.so*")


@functools.cache
def supported_abi() -> int:
    """The Landlock ABI version of the running kernel, 0 when Landlock is unavailable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_long(0),
                           ctypes.c_long(CREATE_RULESET_VERSION))
    return max(0, int(version))


def handled_fs(abi: int) -> int:
    return _FS_RIGHTS_BY_ABI.get(abi, (1 << 16) - 1) if abi > 0 else 0


@functools.cache
def system_extras() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(extra readable paths, dynamic loaders) found on this machine, looked up once."""
    reads = tuple(p for pattern in SYSTEM_READ_GLOBS for p in sorted(glob.glob(pattern)))
    loaders = tuple(sorted({p for pattern in LOADER_GLOBS for p in glob.glob(pattern)}))
    return reads, loaders


@dataclass(frozen=True)
class Ruleset:
    """A Landlock ruleset as data: what the launcher hands to the kernel. Paths are device
    paths as the action sees them; a path missing inside the sandbox is skipped."""

    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    paths: tuple[tuple[int, str], ...]
    ports: tuple[tuple[int, int], ...]

    def launcher_args(self) -> list[str]:
        args = [str(self.abi), str(self.handled_fs), str(self.handled_net), str(self.scoped),
                str(FILE_RIGHTS & self.handled_fs), str(len(self.paths))]
        for rights, path in self.paths:
            args += [str(rights), path]
        args.append(str(len(self.ports)))
        for rights, port in self.ports:
            args += [str(rights), str(port)]
        return args


NO_RULESET = Ruleset(0, 0, 0, 0, (), ())


def ruleset_for(abi: int, *, read: tuple[str, ...], write: tuple[str, ...],
                execute: tuple[str, ...], devices: tuple[str, ...],
                connect_ports: tuple[int, ...] | None) -> Ruleset:
    """The rules of one run: system files readable, the capability's read/write/execute
    paths, the private tmpfs writable, /dev usable (which nodes exist there is the sandbox's
    business), and TCP connect limited to `connect_ports` when given (ABI 4)."""
    if abi <= 0:
        return NO_RULESET
    handled = handled_fs(abi)
    extra_reads, loaders = system_extras()
    rules: list[tuple[int, str]] = []
    rules += [(READ, p) for p in (*SYSTEM_READ, *extra_reads, *read)]
    rules += [(WRITE, p) for p in (*PRIVATE_WRITE, *write)]
    rules += [(RUN, p) for p in (*loaders, *execute)]
    rules += [(DEVICE, p) for p in (DEVICE_TREE, *devices)]
    ports: tuple[tuple[int, int], ...] = ()
    handled_net = 0
    if connect_ports is not None and abi >= 4:
        handled_net = NET_CONNECT_TCP
        ports = tuple((NET_CONNECT_TCP, port) for port in sorted(set(connect_ports)))
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    return Ruleset(abi, handled, handled_net, scoped,
                   tuple((rights & handled, path) for rights, path in rules), ports)
