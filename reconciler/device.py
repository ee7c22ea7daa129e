"""All access to the device's file system, confined to one root directory.

Every path spos reads or writes on a device goes through a `Device`. A path is given as the
device sees it (`/etc/cron.d/spos-x`) and is resolved under `root`, so tests and demos run the
same code against a temporary directory that a real device runs against `/`.

Guarantees:
- a path never leaves the root (no `..`), and no component below the root may be a symlink, so
  nothing is read or written through a link someone planted;
- writes are atomic: a temporary file in the same directory, fsync, rename, fsync the directory.
  A crash leaves either the old or the new content, never a torn file.
"""

from __future__ import annotations

import errno
import os
import stat
from reconciler.cgroupfs import parent_for
from reconciler.errors import UnsafePathError

TYPE_CHECKING = False  # typing itself costs cron's every-minute enqueue ~10 ms to import
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from reconciler.systemctl import Systemctl


class Device:
    """The file system of one device, rooted at `root` (a real device uses `/`).

    `systemd` is the device's systemd when spos activates the units it writes
    (systemctl.detect); None: unit files are written and nothing is activated."""

    def __init__(self, root: str | os.PathLike = "/", cgroup_root: str = "/sys/fs/cgroup",
                 systemd: "Systemctl | None" = None):
        self._root = os.path.abspath(root).rstrip("/")
        self._cgroup_root = cgroup_root
        self._cgroups: CgroupTree | None = None
        self.systemd = systemd
        self._real_directories: set[str] = set()
        self._real_parents: dict[str, str] = {}  # device path of a real directory -> host path

    @property
    def cgroups(self) -> "CgroupTree":
        """The cgroup file system this device's spos owns a parent in (made when first used)."""
        if self._cgroups is None:
            self._cgroups = CgroupTree(self._cgroup_root, parent=parent_for(self._root or "/"))
        return self._cgroups

    @property
    def root(self) -> "Path":
        from pathlib import Path  # not at import: enqueueing, run by cron every minute, needs no pathlib

        return Path(self._root or "/")

    def __repr__(self) -> str:
        return f"Device({self._root or '/'!r})"

    def path(self, device_path: str) -> "Path":
        """The host path of `device_path`, refusing `..` and symlinked components."""
        from pathlib import Path

        return Path(self.host(device_path))

    def host(self, device_path: str) -> str:
        """`path()` as a string, for the many reads of a plan and for cron's enqueue, which
        should not pay for importing pathlib.

        A directory found to be a real directory (not a link) is remembered for the life of
        this Device, so walking many files of one directory checks it once; the last component
        is checked on every call.
        """
        return self._resolve(device_path)[0]

    def locate(self, device_path: str) -> tuple[str, os.stat_result | None]:
        """`host()` and `stat()` at once, from one lstat of the last component."""
        return self._resolve(device_path)

    def _resolve(self, device_path: str) -> tuple[str, os.stat_result | None]:
        """The host path and the lstat of its last component (None: absent)."""
        parent, _, name = device_path.rpartition("/")
        known = self._real_parents.get(parent)
        if known is not None and name not in ("", ".", ".."):
            current = f"{known}/{name}"
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return current, None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(
                    f"refusing to use {device_path}: {current} is a symlink; spos never "
                    "reads or writes through links"
                )
            return current, st
        parts = [p for p in device_path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafePathError(f"refusing path with '..': {device_path}")
        current = self._root
        last = len(parts) - 1
        st = None
        for index, part in enumerate(parts):
            current = f"{current}/{part}"
            if index < last and current in self._real_directories:
                continue
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                st = None
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(
                    f"refusing to use {device_path}: {current} is a symlink; spos never "
                    "reads or writes through links"
                )
            if index < last and stat.S_ISDIR(st.st_mode):
                self._real_directories.add(current)
        if parts and name and len(parts) > 1:
            parent_host = current.rpartition("/")[0]
            if parent_host in self._real_directories:
                self._real_parents[parent] = parent_host
        return current or "/", (st if parts else os.lstat(self._root or "/"))

    def read_bytes(self, device_path: str) -> bytes | None:
        """The file's content, or None when it does not exist. Refuses anything but a regular
        file (O_NONBLOCK: a planted FIFO must not hang the read)."""
        host = self.host(device_path)
        try:
            fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"refusing to read {device_path}: it is a symlink") from exc
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"refusing to read {device_path}: not a regular file")
            return read_all(fd, st.st_size)
        finally:
            os.close(fd)

    def read_text(self, device_path: str) -> str | None:
        data = self.read_bytes(device_path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def stat(self, device_path: str) -> os.stat_result | None:
        """lstat of the path (None: absent); refuses `..` and linked directories on the way."""
        return self._resolve(device_path)[1]

    def exists(self, device_path: str) -> bool:
        return self.stat(device_path) is not None

    def is_dir(self, device_path: str) -> bool:
        st = self.stat(device_path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, device_path: str) -> list[str]:
        """Sorted entry names, or an empty list when the directory does not exist."""
        try:
            return sorted(os.listdir(self.host(device_path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def ensure_root(self) -> None:
        """Create the root directory itself when missing (a fresh demo or test root)."""
        os.makedirs(self._root or "/", mode=0o755, exist_ok=True)

    def subdirectories(self, device_path: str) -> set[str]:
        """Names of the real directories (not links) directly in `device_path`."""
        try:
            with os.scandir(self.host(device_path)) as entries:
                return {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def makedirs(self, device_path: str, mode: int = 0o755) -> None:
        """Create the directory (with `mode`) and its missing parents (0755), each checked for
        symlinks."""
        parts = [p for p in device_path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            partial = "/" + "/".join(parts[:depth])
            host = self.host(partial)
            try:
                os.mkdir(host, mode if depth == len(parts) else 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(host).st_mode):
                    raise UnsafePathError(f"{partial} exists and is not a directory") from None

    def write_atomic(self, device_path: str, data: bytes, mode: int = 0o644,
                     renamed: Callable[[], None] | None = None) -> None:
        """Replace the file's content atomically; the parent directory must exist. `renamed`
        is called once the new content is in place under its name, before the directory is
        fsynced (the call returns only after that)."""
        self.write_staged(device_path, data, mode).commit(renamed)

    def replace(self, device_path: str, data: bytes, mode: int = 0o644) -> None:
        """Replace the file's content atomically, without waiting for the disk: for a file that
        says what a process is doing now and is rewritten every few seconds (a daemon's status
        heartbeat), where two fsyncs per write would only wear the storage, or a copy of what a
        durable file holds (a run's attachments, written out from its record). A reader sees the old
        content or the new one, never a mix; after a power loss the file may hold an older
        content, or be empty on a file system that does not order the rename after the data
        (readers of such files treat that as no status)."""
        self.write_staged(device_path, data, mode).commit(durable=False)

    def write_staged(self, device_path: str, data: bytes, mode: int = 0o644) -> StagedWrite:
        """The first half of write_atomic: the new content written beside the file, in a
        temporary file that is neither durable nor in place until `commit()`. The file
        keeps its old content meanwhile; `abort()` drops the new one. A failure to write
        raises here and leaves nothing behind."""
        host = self.host(device_path)
        st = self.stat(device_path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"refusing to replace {device_path}: not a regular file")
        directory, name = os.path.split(host)
        temp = os.path.join(directory, temporary_name(name))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        return StagedWrite(fd, temp, host)

    def remove(self, device_path: str) -> bool:
        """Delete a file (never a directory); False when it was already gone."""
        host = self.host(device_path)
        try:
            os.unlink(host)
        except FileNotFoundError:
            return False
        self._fsync_dir(os.path.dirname(host))
        return True

    def rmdir_if_empty(self, device_path: str) -> bool:
        """Remove an empty directory; a non-empty or missing one is left alone."""
        host = self.host(device_path)
        self._forget(host)
        try:
            os.rmdir(host)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def _forget(self, host: str) -> None:
        """A directory about to be removed is no longer known to be real (something else may
        take its name)."""
        self._real_directories = {d for d in self._real_directories
                                  if d != host and not d.startswith(host + "/")}
        self._real_parents = {k: v for k, v in self._real_parents.items()
                              if v != host and not v.startswith(host + "/")}

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMPORARY = ".spos-tmp-"


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_all(fd: int, size: int) -> bytes:
    """Everything left to read from `fd`, a regular file of about `size` bytes: a read of that
    much and one more that finds the end (reading on if the file grew meanwhile). A buffered
    file object would add an fstat, an isatty ioctl and two lseeks to those two reads."""
    chunks = [os.read(fd, size + 1)]
    while chunks[-1]:
        chunks.append(os.read(fd, max(size, 65536)))
    return chunks[0] if len(chunks) == 2 else b"".join(chunks)


def temporary_name(name: str) -> str:
    """The name of the file a write of `name` goes to before it is renamed into place."""
    return f".{name}{_TEMPORARY}{os.getpid()}"


def temporary_writer(name: str) -> int | None:
    """The pid of the process whose write made `name`, if it is such a temporary file."""
    _, marker, pid = name.rpartition(_TEMPORARY)
    return int(pid) if marker and name.startswith(".") and pid.isdigit() else None


class StagedWrite:
    """A file's new content, written but not yet durable or in place (Device.write_staged)."""

    def __init__(self, fd: int, temp: str, host: str):
        self._fd, self._temp, self._host = fd, temp, host

    def commit(self, renamed: Callable[[], None] | None = None, durable: bool = True) -> None:
        """fsync the new content, rename it over the file, fsync the directory (`renamed` is
        called between the last two; without `durable`, neither fsync: Device.replace). On
        failure the file keeps its old content and the new one is dropped."""
        fd, self._fd = self._fd, -1
        try:
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self._temp)
            raise
        os.close(fd)
        try:
            os.rename(self._temp, self._host)
        except BaseException:
            os.unlink(self._temp)
            raise
        if renamed is not None:
            renamed()
        if durable:
            Device._fsync_dir(os.path.dirname(self._host))

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass


class CgroupTree:
    """The cgroup file system at `root` (`--cgroup-root`, default `/sys/fs/cgroup`), where
    spos owns everything below `spos/`: one cgroup per agent, the executor's run cgroups below
    those. Both layouts: v1 has one hierarchy per controller, v2 one tree.

    Paths given here are relative to the root of each hierarchy (`spos/research-001`) and must
    be plain names below a `spos` parent (cgroupfs.parent_for); links are never followed below
    the root."""

    V1_CONTROLLERS = ("memory", "cpu", "pids", "blkio")

    def __init__(self, root: str = "/sys/fs/cgroup", parent: str = "spos"):
        self.root = os.path.abspath(root)
        self.parent = parent  # the cgroup this device's spos owns (cgroupfs.parent_for)
        self._version: int | None | bool = False
        self._weight_file: str | None | bool = False

    @property
    def version(self) -> int | None:
        """2, 1, or None when there is no cgroup file system at the root."""
        if self._version is False:
            if os.path.exists(f"{self.root}/cgroup.controllers"):
                self._version = 2
            elif any(os.path.exists(f"{self.root}/{c}/cgroup.procs") for c in self.V1_CONTROLLERS):
                self._version = 1
            else:
                self._version = None
        return self._version

    def weight_file(self) -> str | None:
        """The file that sets an I/O weight here, or None: v1 has CFQ's `blkio.weight` or BFQ's
        `blkio.bfq.weight` (only below the root, so BFQ is recognised by its statistics
        files), v2 `io.weight` when the io controller is available. Looked up once."""
        if self._weight_file is False:
            self._weight_file = self._find_weight_file()
        return self._weight_file

    def _find_weight_file(self) -> str | None:
        if self.version == 2:
            return "io.weight" if "io" in self._read(f"{self.root}/cgroup.controllers").split() else None
        if self.version == 1:
            blkio = f"{self.root}/blkio"
            if os.path.exists(f"{blkio}/blkio.weight"):
                return "blkio.weight"
            try:
                if any(name.startswith("blkio.bfq.") for name in os.listdir(blkio)):
                    return "blkio.bfq.weight"
            except OSError:
                return None
        return None

    def hierarchies(self) -> dict[str, str]:
        """Controller -> host directory of its hierarchy ('' -> the root for v2)."""
        if self.version == 2:
            return {"": self.root}
        return {c: f"{self.root}/{c}" for c in self.V1_CONTROLLERS
                if os.path.exists(f"{self.root}/{c}/cgroup.procs")}

    def children(self, path: str) -> set[str]:
        """Names of the cgroups directly below `path`, in any hierarchy."""
        found: set[str] = set()
        for base in self.hierarchies().values():
            try:
                with os.scandir(self._host(base, path)) as entries:
                    found.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return found

    def read(self, path: str, file: str) -> str | None:
        """`file` of cgroup `path` ("memory/memory.limit_in_bytes" on v1: controller first),
        stripped; None when missing."""
        try:
            return self._read(self._file(path, file))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, path: str, file: str, value: str) -> None:
        with open(self._file(path, file), "w") as handle:
            handle.write(value)

    def create(self, path: str, controllers: set[str]) -> None:
        """Make cgroup `path` (and its parents) in every hierarchy; on v2, enable `controllers`
        (cpu, memory, pids, io) on the way down so its limit files exist."""
        for base in self.hierarchies().values():
            os.makedirs(self._host(base, path), exist_ok=True)
        if self.version == 2:
            available = set(self._read(f"{self.root}/cgroup.controllers").split())
            level = self.root
            for part in path.split("/"):
                for controller in sorted(controllers & available):
                    with open(f"{level}/cgroup.subtree_control", "w") as handle:
                        handle.write(f"+{controller}")
                level = f"{level}/{part}"

    def processes(self, path: str) -> int:
        """How many processes are in cgroup `path` and below. spos puts every process of a run
        in all hierarchies, so one is read: memory's on v1 (else the first), the tree on v2."""
        pids: set[str] = set()
        hierarchies = self.hierarchies()
        for base in [hierarchies.get("memory") or next(iter(hierarchies.values()), None)]:
            if base is None:
                continue
            top = self._host(base, path)
            for directory, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    try:
                        pids.update(self._read(f"{directory}/cgroup.procs").split())
                    except OSError:
                        continue
        return len(pids)

    def remove(self, path: str) -> None:
        """Remove cgroup `path` and the empty cgroups below it, deepest first, in every
        hierarchy. A cgroup with processes cannot be removed (EBUSY)."""
        for base in self.hierarchies().values():
            top = self._host(base, path)
            if not os.path.isdir(top):
                continue
            for directory, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
                os.rmdir(directory)

    def remove_parent_if_empty(self) -> None:
        """Remove this device's spos parent cgroup once no agent cgroup is left in it (a demo
        or test root leaves nothing behind); it is made again when needed."""
        for base in self.hierarchies().values():
            try:
                os.rmdir(self._host(base, self.parent))
            except OSError:
                continue

    def _file(self, path: str, file: str) -> str:
        if self.version == 1:
            controller, _, name = file.partition("/")
            return f"{self._host(f'{self.root}/{controller}', path)}/{name}"
        return f"{self._host(self.root, path)}/{file}"

    @staticmethod
    def _host(base: str, path: str) -> str:
        parts = path.split("/")
        if not parts[0].startswith("spos") or any(p in ("", ".", "..") for p in parts):
            raise UnsafePathError(f"refusing cgroup path {path!r}: spos owns only spos*/ cgroups")
        current = base
        for part in parts:
            current = f"{current}/{part}"
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    raise UnsafePathError(f"refusing cgroup {path}: {current} is a symlink")
            except FileNotFoundError:
                return f"{base}/{path}"  # nothing below a missing cgroup exists either
        return current

    @staticmethod
    def _read(path: str) -> str:
        with open(path) as handle:
            return handle.read().strip()
