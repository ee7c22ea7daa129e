"""spos's own state on the device, under `<root>/var/lib/systemprompt-os/`.

- `inventory.json`: the id and digest of every resource spos applied, with the revision and
  time; what decides pruning (stale = inventoried minus desired) and what "drift" is measured
  against. Written once per apply, atomically.
- `apply.lock`: held (flock) by the one apply that may run at a time; it names its holder.
- `cache/manifests.marshal`: parsed, checked manifests by content hash (see validate.py).
- `cache/plan.marshal`: what a plan remembers between runs (see memo.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import datetime, timezone

from reconciler import STATE_DIR
from reconciler.device import Device
from reconciler.errors import LockHeldError, SposError, UnsafePathError

INVENTORY = f"/{STATE_DIR}/inventory.json"
LOCK = f"/{STATE_DIR}/apply.lock"
MANIFEST_CACHE = f"/{STATE_DIR}/cache/manifests.marshal"
PLAN_MEMO = f"/{STATE_DIR}/cache/plan.marshal"
INVENTORY_FORMAT = 1


def read_inventory(device: Device) -> dict:
    """The last applied inventory; an empty one on a device spos never applied to. One that
    cannot be read as spos writes it (edited by hand, or by a spos of another inventory format)
    is read as empty too, with "unreadable" saying why: spos then knows its resources by their
    markers, as after an apply killed before it wrote the inventory, and the next apply writes
    it afresh."""
    empty = {"format": INVENTORY_FORMAT, "resources": {}}
    try:
        raw = device.read_text(INVENTORY)
    except (OSError, UnicodeDecodeError, SposError) as exc:
        return {**empty, "unreadable": str(exc)}
    if raw is None:
        return empty
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return {**empty, "unreadable": f"not JSON ({exc})"}
    except RecursionError:
        return {**empty, "unreadable": "not JSON (nested too deeply to parse)"}
    if not isinstance(data, dict) or data.get("format") != INVENTORY_FORMAT:
        return {**empty, "unreadable": f"not an inventory of format {INVENTORY_FORMAT}"}
    resources = data.setdefault("resources", {})
    if not isinstance(resources, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("kind"), str)
            for entry in resources.values()):
        return {**empty, "unreadable": "its resources are not id -> {kind, digest}"}
    return data


def write_inventory(device: Device, resources: dict, revision: str | None, manifest_digest: str) -> None:
    device.makedirs(f"/{STATE_DIR}")
    payload = {
        "format": INVENTORY_FORMAT,
        "revision": revision,
        "manifestDigest": manifest_digest,
        "appliedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resources": dict(sorted(resources.items())),
    }
    device.write_atomic(INVENTORY, _one_resource_per_line(payload).encode(), mode=0o644)


def _one_resource_per_line(payload: dict) -> str:
    """The inventory as JSON that diffs and greps well, one resource per line. Written line by
    line with the C encoder: `indent=` would use the pure-Python one, ~10x slower. An entry of
    the usual shape, a kind and a digest, is put together from its quoted strings, which is
    what the encoder writes for it at a third of the cost (an apply writes every entry)."""
    head = {key: value for key, value in payload.items() if key != "resources"}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    encode = json.JSONEncoder(sort_keys=True).encode  # one encoder, not one per line
    quote = json.encoder.encode_basestring_ascii
    entries = [
        f'    {quote(rid)}: {{"digest": {quote(entry["digest"])}, "kind": {quote(entry["kind"])}}}'
        if type(entry) is dict and len(entry) == 2 and type(entry.get("digest")) is str
        and type(entry.get("kind")) is str
        else f"    {quote(rid)}: {encode(entry)}"
        for rid, entry in payload["resources"].items()
    ]
    body = ",\n".join(entries)
    resources = '  "resources": {\n' + body + "\n  }" if entries else '  "resources": {}'
    return "{\n" + "\n".join(lines) + "\n" + resources + "\n}\n"


def read_json_object(device: Device, path: str) -> dict | None:
    """A JSON object spos wrote itself (a status, a sync state), or None when the file is
    missing, unreadable, not JSON or not an object: a reader then shows nothing rather than
    failing."""
    try:
        raw = device.read_text(path)
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError, OSError, SposError):  # RecursionError: nested too deeply
        return None
    return data if isinstance(data, dict) else None


def cache_file(device: Device, create: bool = False):
    """Where the manifest cache lives, or None before spos has state on this device (unless
    `create`: an apply that is about to create that state)."""
    if not create and not device.is_dir(f"/{STATE_DIR}"):
        return None
    return device.path(MANIFEST_CACHE)


def memo_file(device: Device, create: bool = False) -> str | None:
    """Where plans keep their memo, or None before spos has state on this device (unless
    `create`)."""
    if not create and not device.is_dir(f"/{STATE_DIR}"):
        return None
    return device.host(PLAN_MEMO)


_STOP_WAITING = threading.Event()


def stop_waiting() -> None:
    """Let no ApplyLock wait any longer in this process, from now on: a daemon told to stop
    must not sit out a lock timeout (spos daemon's --stop-timeout)."""
    _STOP_WAITING.set()


class ApplyLock:
    """One apply at a time per device. A second one waits up to `timeout` seconds, then fails
    naming the holder (pid, command, since when)."""

    def __init__(self, device: Device, timeout: float = 0.0):
        self.device = device
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> "ApplyLock":
        self.device.makedirs(f"/{STATE_DIR}")
        path = self.device.path(LOCK)
        fd = open_lock(path)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline or _STOP_WAITING.is_set():
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise LockHeldError(
                        f"another spos apply holds {path}: {holder or 'holder unknown'}; "
                        + ("stopped waiting: spos is shutting down" if _STOP_WAITING.is_set() else
                           "wait for it, or pass --lock-timeout to wait")
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        command = " ".join(_own_command())
        os.pwrite(fd, f"pid {os.getpid()} ({command}) since {since}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def open_lock(path) -> int:
    """An fd of the lock file at host path `path` (created when missing). Taking a lock
    truncates the file and writes the holder into it, so it must be a regular file of its own:
    a symbolic link, or a hard link that makes it a second name of another file, is refused
    (UnsafePathError naming it) before anything is written."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePathError(f"lock file {path} is a symbolic link; spos writes its holder into "
                              "its lock: remove the link, and spos creates the file afresh") from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(status.st_mode) else \
            f"a hard link to a file with {status.st_nlink} names"
        raise UnsafePathError(f"lock file {path} is {what}; spos writes its holder into its lock, "
                              "which would change that file: remove it, and spos creates it afresh")
    return fd


def _own_command() -> list[str]:
    """This process's command line as the lock shows it: the user part of a URL (a password,
    a token) replaced by ***, as everywhere spos shows a repository URL."""
    from reconciler.gitsync import redacted

    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as handle:
            words = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return ["spos"]
    return [redacted(word) for word in words]


def objects_by_name(value) -> dict[str, dict]:
    """`value` as name -> object, what a status file's `triggers` or `children` should be:
    entries of another shape (a hand edit) dropped, anything but an object read as empty."""
    if not isinstance(value, dict):
        return {}
    return {name: entry for name, entry in value.items() if isinstance(entry, dict)}


class AlreadyServed(SposError):
    """Another process of the same kind serves this device (hold_alone)."""


def hold_alone(device: Device, lock_path: str, what: str) -> int:
    """Take the flock at device path `lock_path` for the life of this process (the caller closes
    the returned fd when it is done), with this pid written in it; raises AlreadyServed naming
    the pid that holds it. For the daemons a device runs one of: two would do everything twice."""
    device.makedirs(lock_path.rsplit("/", 1)[0], mode=0o755)
    fd = open_lock(device.host(lock_path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise AlreadyServed(
            f"another {what}{f' (pid {holder})' if holder.isdigit() else ''} already serves "
            f"{device.root} (it holds {lock_path}); two would do everything twice: stop that "
            "one first") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
