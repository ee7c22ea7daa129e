"""The control group of one sandboxed run: its limits, its processes, its usage, its removal.

A run gets its own cgroup (e.g. `spos/research-001/<run-id>`) under the cgroup root
(`--cgroup-root`, default `/sys/fs/cgroup`). Both layouts are handled with plain file reads and
writes (no tree walk, one code path):

- cgroup v1: one directory per controller hierarchy (`memory`, `cpu`, `cpuacct`, `pids`,
  `blkio`, `freezer`, `devices`); the run's cgroup is created in each one present, and the
  process joins every one of them.
- cgroup v2: one unified tree (`cgroup.controllers` at the root); the needed controllers are
  enabled down the path with `cgroup.subtree_control`.

CPU, memory and task limits are required: if one is asked for and the kernel offers no way to
enforce it, creating the cgroup fails rather than running the action unlimited. The I/O weight
and (on v2, which needs an eBPF program) the device list are best effort; what could not be
applied is listed in `RunCgroup.unenforced`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import re
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.cgroupfs import CPU_PERIOD_US, cpu_quota_us, io_weight
from reconciler.errors import SposError

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer", "devices")
V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
# Device nodes every run may use (bubblewrap's /dev holds exactly these): null, zero, full,
# random, urandom, tty, ptmx and the private pty slaves behind it.
STANDARD_DEVICES = (
    ("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
    ("c", 5, 0), ("c", 5, 2), ("c", 136, None),
)
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")
_KILL_WAIT_SECONDS = 5.0
_REMOVE_WAIT_SECONDS = 2.0
_WEIGHT_IDLE = "io weight (written, but no disk uses the BFQ scheduler, so it has no effect)"


class CgroupError(SposError):
    """A run's cgroup could not be created, limited or removed."""


@dataclass(frozen=True)
class Limits:
    """The resource limits of one run, from the compiled quota; None means unlimited."""

    cpu_percent: float | None = None
    memory_bytes: int | None = None
    tasks_max: int | None = None
    io_weight: int | None = None
    nice: int | None = None


@dataclass(frozen=True)
class DeviceRule:
    """One device node a run may open: kind `c` or `b`, major, minor (None: every minor)."""

    kind: str
    major: int
    minor: int | None

    def v1_line(self) -> str:
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {self.major}:{minor} rwm"


def check_name(name: str) -> None:
    """A relative cgroup path of safe components: no `..`, no empty parts, no odd characters."""
    parts = name.split("/")
    if not name or not all(_NAME_PART.match(part) for part in parts):
        raise CgroupError(
            f"invalid cgroup name {name!r}: use relative components of letters, digits and "
            "_.@:- (e.g. spos/research-001/<run-id>)"
        )


class Cgroups:
    """The cgroup file systems under one root: a v2 unified tree, or v1 hierarchies."""

    def __init__(self, root: str | os.PathLike = "/sys/fs/cgroup"):
        self.root = Path(root)
        self.version = _detect_version(self.root)
        self.hierarchies = _v1_hierarchies(self.root) if self.version == 1 else {}
        # Where each v1 hierarchy really is: co-mounted controllers (cpu,cpuacct) share one
        # tree, so a run's cgroup is one directory there. Resolved once, not for every run.
        self._real = {c: os.path.realpath(path) for c, path in self.hierarchies.items()}

    @property
    def renames(self) -> bool:
        """Whether a cgroup can be renamed here: v1 hierarchies allow it, cgroup v2 refuses
        every rename (EPERM)."""
        return self.version == 1

    def describe(self) -> str:
        if self.version == 2:
            controllers = " ".join(self._v2_available()) or "none"
            return f"cgroup v2 at {self.root} (controllers: {controllers})"
        if self.version == 1:
            controllers = " ".join(sorted(self.hierarchies)) or "no controllers"
            return f"cgroup v1 at {self.root} ({controllers})"
        return f"no cgroup file system at {self.root}"

    def missing_controllers(self) -> list[str]:
        """Controllers the sandbox uses that this machine lacks."""
        if self.version == 1:
            return [c for c in V1_CONTROLLERS if c not in self.hierarchies]
        if self.version == 2:
            return [c for c in V2_CONTROLLERS if c not in self._v2_available()]
        return list(V1_CONTROLLERS)

    def create(self, name: str, limits: Limits, devices: tuple[DeviceRule, ...]) -> RunCgroup:
        """Create the run's cgroup (and missing parents), write its limits. Fails on a cgroup
        that still holds processes; an empty leftover of the same name is reused."""
        check_name(name)
        if self.version is None:
            raise CgroupError(f"no cgroup file system at {self.root}")
        run = self.existing(name)
        try:
            fresh = all([_make_cgroup(directory) for directory in run.directories])
            if not fresh and run.pids():  # a cgroup made here a moment ago is empty
                raise CgroupError(f"cgroup {name} already holds processes")
            if self.version == 1:
                run.unenforced = _limit_v1(self.hierarchies, run, limits, devices)
            else:
                run.unenforced = _limit_v2(self.root, name, limits)
        except OSError as exc:
            run.remove()
            raise CgroupError(f"cannot set up cgroup {name}: {exc}") from exc
        except CgroupError:
            run.remove()
            raise
        return run

    def children(self, name: str) -> list[str]:
        """The names of the child cgroups of `name`, in any hierarchy."""
        found: set[str] = set()
        for directory in self.existing(name).directories:
            try:
                with os.scandir(directory) as entries:
                    found.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return sorted(found)

    def rename(self, run: RunCgroup, name: str) -> RunCgroup:
        """Give `run`'s cgroup another name under the same parent, in every hierarchy, with its
        processes in it (a prepared sandbox's cgroup becomes its run's; only where `renames`).
        When a leftover of that name is in the way (EEXIST), an empty one is
        removed and the rename tried again; one with processes is an error. All or nothing."""
        target = self.existing(name)
        if run.directories and posixpath.dirname(run.directories[0]) != \
                posixpath.dirname(target.directories[0]):
            raise CgroupError(f"cannot rename cgroup {run.name} to {name}: another parent")
        try:
            try:
                _rename_each(run.directories, target.directories)
            except FileExistsError:  # a leftover of that name: cgroupfs does not rename over it
                if target.pids():
                    raise CgroupError(f"cgroup {name} already holds processes") from None
                target.remove()
                _rename_each(run.directories, target.directories)
        except OSError as exc:
            raise CgroupError(f"cannot rename cgroup {run.name} to {name}: {exc}") from exc
        target.unenforced = run.unenforced
        return target

    def existing(self, name: str) -> RunCgroup:
        """The run cgroup of this name, whether or not it exists (for reaping leftovers)."""
        check_name(name)
        if self.version == 2:
            return RunCgroup(name, 2, {"unified": f"{self.root}/{name}"})
        dirs = {c: f"{path}/{name}" for c, path in self.hierarchies.items()}
        unique: dict[str, str] = {}
        for controller, directory in dirs.items():
            unique.setdefault(self._real[controller], directory)
        return RunCgroup(name, 1, dirs, list(unique.values()))

    def _v2_available(self) -> list[str]:
        return _read(self.root / "cgroup.controllers").split()


def _rename_each(old: list[str], new: list[str]) -> None:
    """Rename each directory of `old` to its counterpart in `new`; all or none: on a failure
    the ones renamed are renamed back before the error is raised."""
    done: list[tuple[str, str]] = []
    try:
        for source, target in zip(old, new):
            os.rename(source, target)
            done.append((source, target))
    except OSError:
        for source, target in reversed(done):
            with contextlib.suppress(OSError):
                os.rename(target, source)
        raise


class RunCgroup:
    """One run's cgroup: joined before the action starts, read for usage, killed, removed.
    Paths are strings: a run's start and end touch these files dozens of times."""

    def __init__(self, name: str, version: int, dirs: dict[str, str],
                 directories: list[str] | None = None):
        self.name = name
        self.version = version
        self.dirs = {controller: str(path) for controller, path in dirs.items()}
        self.unenforced: tuple[str, ...] = ()
        if directories is None:  # co-mounted v1 controllers share one directory
            unique: dict[str, str] = {}
            for path in self.dirs.values():
                parent, _, leaf = path.rpartition("/")
                unique.setdefault(os.path.realpath(parent) + "/" + leaf, path)
            directories = list(unique.values())
        self.directories = directories

    def open_join_fds(self) -> list[int]:
        """Write-only fds a forked child writes `0` to, to join before it executes anything
        (close-on-exec, so nothing after that inherits them). On v1 these are the `tasks`
        files: the child has a single thread, so moving that thread moves the whole process,
        and the kernel (6.0 and later) moves a thread that moves itself without the global
        threadgroup lock, whose write side waits for an RCU grace period (10-15 ms here, per
        hierarchy after a quiet moment; `cgroup.procs` always takes it). On v2, the leaf's
        `cgroup.procs`."""
        joined = "tasks" if self.version == 1 else "cgroup.procs"
        fds: list[int] = []
        try:
            for directory in self.directories:
                fds.append(os.open(f"{directory}/{joined}", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def pids(self) -> set[int]:
        """Every process in the cgroup, as host pids (on v1, in any of its hierarchies)."""
        found: set[int] = set()
        for directory in self.directories:
            try:
                found.update(map(int, _read_bytes(f"{directory}/cgroup.procs").split()))
            except FileNotFoundError:
                continue
        return found

    def exiting(self) -> set[int]:
        """The processes to wait for once a run's main process exited: on v1, those of its
        first hierarchy alone. A process leaves every hierarchy at once when it exits, and none
        in a sandbox can move itself (no capability, cgroup files read-only); `remove()`
        still finds one left anywhere, since the kernel refuses to remove a busy cgroup."""
        for directory in self.directories:
            try:
                return set(map(int, _read_bytes(f"{directory}/cgroup.procs").split()))
            except FileNotFoundError:
                continue
        return set()

    def exists(self) -> bool:
        return any(os.path.isdir(directory) for directory in self.directories)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, including ones that double-forked or ignore
        SIGTERM, and wait (bounded) until none is left. v2: `cgroup.kill`; v1: freeze so nothing
        can fork while the list is read, kill every pid, thaw."""
        if not self.exists():
            return
        kill_file = f"{self.dirs['unified']}/cgroup.kill" if self.version == 2 else None
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while self.pids() and time.monotonic() < deadline:
            if kill_file is not None and os.path.exists(kill_file):
                _write(kill_file, "1")
            elif "freezer" in self.dirs:
                self._kill_frozen(self.dirs["freezer"], deadline)
            else:
                _kill(self.pids(), signal.SIGKILL)
            time.sleep(0.002)
        if self.pids():
            survivors = sorted(self.pids())
            raise CgroupError(f"processes of cgroup {self.name} survived SIGKILL: {survivors}")

    def empties_within(self, seconds: float) -> bool:
        """Whether the cgroup is (or becomes, within `seconds`) empty by itself: after a normal
        exit, bubblewrap's pid-namespace init may still be on its way out (tearing down its
        mounts takes a few milliseconds). Waits on pidfds of what is left, so it wakes as the
        last one leaves, without polling; a process leaves its cgroup before its pidfd says
        it exited."""
        deadline = time.monotonic() + seconds
        while True:
            pids = self.exiting()
            if not pids:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _wait_for_exits(pids, remaining)

    def pidfds(self) -> list[int]:
        """pidfds of the processes in the cgroup (close-on-exec; the caller closes them), to
        learn without polling when they are gone: a process leaves its cgroup before its pidfd
        becomes readable. Empty when the cgroup is empty, or when pidfds cannot be opened."""
        fds: list[int] = []
        for pid in self.exiting():
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
            except OSError:
                for fd in fds:
                    os.close(fd)
                return []
        return fds

    def signal_all(self, signum: int, *, spare: set[int] = frozenset()) -> None:
        """Send `signum` to every process in the cgroup except `spare`."""
        _kill(self.pids() - set(spare), signum)

    def usage(self) -> dict:
        """CPU seconds, peak memory and bytes read/written by the cgroup so far (None where the
        kernel does not count it)."""
        if self.version == 2:
            return _usage_v2(self.dirs["unified"])
        return _usage_v1(self.dirs)

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer kill a process of this cgroup (memory limit reached)?"""
        if self.version == 2:
            events = _keyed(f"{self.dirs['unified']}/memory.events")
        else:
            events = _keyed(f"{self.dirs['memory']}/memory.oom_control") if "memory" in self.dirs else {}
        return int(events.get("oom_kill", 0)) > 0

    def remove(self) -> None:
        """Remove the run's directories (only the leaf: parents belong to the agent). The
        kernel refuses to remove a cgroup with processes (EBUSY): then they are killed first;
        a cgroup busy for a moment after its last exit is retried."""
        for directory in self.directories:
            try:
                os.rmdir(directory)
                continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {directory}: {exc}") from exc
            if self.pids():
                self.kill_all()
            _rmdir_when_free(directory)

    def _kill_frozen(self, freezer: str, deadline: float) -> None:
        state = f"{freezer}/freezer.state"
        _write(state, "FROZEN")
        try:
            while _read(state).strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.001)
            _kill(self.pids(), signal.SIGKILL)
        finally:
            _write(state, "THAWED")


def _detect_version(root: Path) -> int | None:
    if (root / "cgroup.controllers").exists():
        return 2
    if any((root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return 1
    return None


def _v1_hierarchies(root: Path) -> dict[str, Path]:
    return {c: root / c for c in V1_CONTROLLERS if (root / c / "cgroup.procs").exists()}


def _limit_v1(hierarchies: dict[str, Path], run: RunCgroup, limits: Limits,
              devices: tuple[DeviceRule, ...]) -> tuple[str, ...]:
    unenforced: list[str] = []
    if limits.memory_bytes is not None:
        memory = _required(run, "memory", "memory limit")
        _write(f"{memory}/memory.limit_in_bytes", str(limits.memory_bytes))
        if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
            _write(f"{memory}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
    if limits.cpu_percent is not None:
        cpu = _required(run, "cpu", "CPU limit")
        _write(f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(f"{cpu}/cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu_percent)))
    if limits.tasks_max is not None:
        _write(f"{_required(run, 'pids', 'tasks limit')}/pids.max", str(limits.tasks_max))
    if limits.io_weight is not None:
        unenforced += _io_weight_v1(run.dirs.get("blkio"), limits.io_weight)
    if "devices" in run.dirs:
        devices_dir = run.dirs["devices"]
        _write(f"{devices_dir}/devices.deny", "a")
        _write(f"{devices_dir}/devices.allow",
               *(rule.v1_line() for rule in (*(DeviceRule(*d) for d in STANDARD_DEVICES), *devices)))
    else:
        unenforced.append("device list (no devices cgroup; only the sandbox's own /dev applies)")
    return tuple(unenforced)


def _limit_v2(root: Path, name: str, limits: Limits) -> tuple[str, ...]:
    wanted = {"memory"}  # always: the peak memory of a run is read from it
    if limits.cpu_percent is not None:
        wanted.add("cpu")
    if limits.tasks_max is not None:
        wanted.add("pids")
    if limits.io_weight is not None:
        wanted.add("io")
    enabled = _enable_down(root, name, wanted)
    leaf = f"{root}/{name}"
    unenforced = ["device list (cgroup v2 needs an eBPF program; only the sandbox's own /dev applies)"]
    if limits.memory_bytes is not None:
        _need(enabled, "memory", "memory limit", root)
        _write(f"{leaf}/memory.max", str(limits.memory_bytes))
        if os.path.exists(f"{leaf}/memory.swap.max"):
            _write(f"{leaf}/memory.swap.max", "0")
    if limits.cpu_percent is not None:
        _need(enabled, "cpu", "CPU limit", root)
        _write(f"{leaf}/cpu.max", f"{cpu_quota_us(limits.cpu_percent)} {CPU_PERIOD_US}")
    if limits.tasks_max is not None:
        _need(enabled, "pids", "tasks limit", root)
        _write(f"{leaf}/pids.max", str(limits.tasks_max))
    if limits.io_weight is not None:
        if "io" in enabled and os.path.exists(f"{leaf}/io.weight"):
            _write(f"{leaf}/io.weight", io_weight(limits.io_weight, "io.weight"))
            if not _bfq_in_use() and "enable=1" not in _read_or_empty(root / "io.cost.qos"):
                unenforced.append(_WEIGHT_IDLE)
        else:
            unenforced.append("io weight (no io controller)")
    return tuple(unenforced)


def _enable_down(root: Path, name: str, wanted: set[str]) -> set[str]:
    """Enable `wanted` controllers on every level from the root to the run's parent; returns
    the ones the run's cgroup ends up with."""
    enabled = set(_read(root / "cgroup.controllers").split()) & wanted
    level = root
    for part in name.split("/"):
        for controller in sorted(enabled):
            try:
                _write(level / "cgroup.subtree_control", f"+{controller}")
            except OSError:
                enabled.discard(controller)
        level = level / part
    return enabled


def _required(run: RunCgroup, controller: str, what: str) -> str:
    if controller not in run.dirs:
        raise CgroupError(f"a {what} was asked for, but there is no {controller} cgroup hierarchy")
    return run.dirs[controller]


def _need(enabled: set[str], controller: str, what: str, root: Path) -> None:
    if controller not in enabled:
        raise CgroupError(f"a {what} was asked for, but the {controller} controller is not "
                          f"available under {root}")


def _io_weight_v1(blkio: str | None, weight: int) -> list[str]:
    """Write the weight where v1 has one: CFQ's blkio.weight or BFQ's blkio.bfq.weight (scaled
    as cgroupfs.io_weight says). Returns what is not enforced."""
    if blkio is not None and os.path.exists(f"{blkio}/blkio.weight"):
        _write(f"{blkio}/blkio.weight", io_weight(weight, "blkio.weight"))
        return []
    if blkio is not None and os.path.exists(f"{blkio}/blkio.bfq.weight"):
        _write(f"{blkio}/blkio.bfq.weight", io_weight(weight, "blkio.bfq.weight"))
        return [] if _bfq_in_use() else [_WEIGHT_IDLE]
    return ["io weight (no blkio weight file)"]


@functools.cache
def _bfq_in_use() -> bool:
    """Weights only act on a disk whose I/O scheduler is BFQ."""
    return any("[bfq]" in _read_or_empty(p) for p in Path("/sys/block").glob("*/queue/scheduler"))


def _read_or_empty(path: Path) -> str:
    try:
        return _read(path)
    except OSError:
        return ""


def _usage_v1(dirs: dict[str, str]) -> dict:
    cpu_ns = _int_or_none(f"{dirs['cpuacct']}/cpuacct.usage") if "cpuacct" in dirs else None
    peak = _int_or_none(f"{dirs['memory']}/memory.max_usage_in_bytes") if "memory" in dirs else None
    read_bytes = write_bytes = None
    blkio = dirs.get("blkio")
    stats = _first_existing(blkio, ("blkio.throttle.io_service_bytes_recursive",
                                    "blkio.throttle.io_service_bytes"))
    if stats is not None:
        read_bytes = write_bytes = 0
        for fields in (line.split() for line in _read(stats).splitlines()):
            if len(fields) == 3 and fields[1] == "Read":
                read_bytes += int(fields[2])
            elif len(fields) == 3 and fields[1] == "Write":
                write_bytes += int(fields[2])
    return {
        "cpuSeconds": None if cpu_ns is None else cpu_ns / 1e9,
        "peakMemoryBytes": peak,
        "readBytes": read_bytes,
        "writeBytes": write_bytes,
    }


def _usage_v2(directory: str) -> dict:
    cpu_usec = _keyed(f"{directory}/cpu.stat").get("usage_usec")
    read_bytes = write_bytes = None
    if os.path.exists(f"{directory}/io.stat"):
        read_bytes = write_bytes = 0
        for line in _read(f"{directory}/io.stat").splitlines():
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            read_bytes += int(fields.get("rbytes", 0))
            write_bytes += int(fields.get("wbytes", 0))
    return {
        "cpuSeconds": None if cpu_usec is None else int(cpu_usec) / 1e6,
        "peakMemoryBytes": _int_or_none(f"{directory}/memory.peak"),
        "readBytes": read_bytes,
        "writeBytes": write_bytes,
    }


def _make_cgroup(directory: str) -> bool:
    """Create a run's cgroup directory and missing parents; True when this call made it (a
    new cgroup is empty), False when it was there already (a leftover of the same name)."""
    try:
        os.mkdir(directory)
        return True
    except FileExistsError:
        if not os.path.isdir(directory):
            raise
        return False
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return True


def _wait_for_exits(pids: set[int], timeout: float) -> None:
    """Wait (at most `timeout` seconds) until every process in `pids` has exited, on their
    pidfds. A pid that is gone already counts as exited; where pidfds cannot be opened, a
    short sleep stands in, so that the caller's loop never spins."""
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
            except OSError:
                time.sleep(min(timeout, 0.001))
                return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        pending = len(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                pending -= 1
    finally:
        for fd in fds:
            os.close(fd)


def _rmdir_when_free(directory: str) -> None:
    deadline = time.monotonic() + _REMOVE_WAIT_SECONDS
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise CgroupError(f"cannot remove cgroup {directory}: {exc}") from exc
            time.sleep(0.005)


def _kill(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _first_existing(directory: str | None, names: tuple[str, ...]) -> str | None:
    if directory is None:
        return None
    return next((f"{directory}/{n}" for n in names if os.path.exists(f"{directory}/{n}")), None)


def _keyed(path: str) -> dict[str, str]:
    """`key value` lines (memory.events, cpu.stat, memory.oom_control) as a dict."""
    try:
        return dict(line.split(None, 1) for line in _read(path).splitlines() if " " in line)
    except FileNotFoundError:
        return {}


def _int_or_none(path: str) -> int | None:
    try:
        return int(_read_bytes(path).strip())
    except (FileNotFoundError, ValueError):
        return None


def _read(path: str | Path) -> str:
    return _read_bytes(path).decode("ascii")


def _read_bytes(path: str | Path) -> bytes:
    """A cgroup file's content, without the text layer (they are read many times per run)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write(path: str | Path, *values: str) -> None:
    """One write(2) per value, on one open file: cgroup files take one value per write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for value in values:
            os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)
