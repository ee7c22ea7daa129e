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
from reconciler.errors import UnsafePathError

TYPE_CHECKING = False  # typing itself costs cron's every-minute enqueue ~10 ms to import
if TYPE_CHECKING:
    from pathlib import Path


class Device:
    """The file system of one device, rooted at `root` (a real device uses `/`)."""

    def __init__(self, root: str | os.PathLike = "/"):
        self._root = os.path.abspath(root).rstrip("/")
        self._real_directories: set[str] = set()
        self._real_parents: dict[str, str] = {}  # device path of a real directory -> host path

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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"refusing to read {device_path}: not a regular file")
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

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

    def write_atomic(self, device_path: str, data: bytes, mode: int = 0o644) -> None:
        """Replace the file's content atomically; the parent directory must exist."""
        host = self.host(device_path)
        st = self.stat(device_path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"refusing to replace {device_path}: not a regular file")
        directory, name = os.path.split(host)
        temp = os.path.join(directory, f".{name}.spos-tmp-{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        try:
            os.rename(temp, host)
        except BaseException:
            os.unlink(temp)
            raise
        self._fsync_dir(directory)

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
