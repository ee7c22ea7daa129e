"""The filesystem source: a Trigger fires when files under a device path are created, written,
deleted or moved.

One thread reads one inotify instance and hands each event that counts to `emit` as soon as it
is read (with `settleSeconds` 0 no timer or polling tick sits in between), as
`{"path": device path, "event": kind, "name": path relative to the watched path}`; a move adds
`"from"` (where the file came from, when that was under the watched path) or, for a file moved
out of what counts, `"to"` (where it went, when known). Only files have events; with
`recursive`, a directory that appears is watched at once and the files already in it are
reported as created (or moved in), so `mkdir -p a/b && touch a/b/f` does not lose `f`.

The source keeps a snapshot of the files that count (relative name -> inode, size, mtime). It
is how nothing is missed when inotify cannot say what happened: after a queue overflow, or when
the watched directory is deleted, replaced or moved away, or the path leads elsewhere (a directory
above it moved, a link on the way re-pointed: each directory the path passes through is watched
for the entry it takes, GUARD_MASK), the source drops its inotify instance,
watches the path afresh and reports create, modify and delete for what differs from the
snapshot. A path that does not exist is looked for every `WAITING_POLL_SECONDS`, with status
"waiting"; files found when it appears are reported as created. Files already there when the
source starts are not reported. A path that is a file is watched through its directory, and only
that file counts.

Why inotify is driven directly (ctypes, one poll loop) rather than through watchdog 6: watchdog
gives close_write, paired moves and watches on new subdirectories, but its inotify emitter
(observers/inotify_c.py, inotify_buffer.py) skips IN_Q_OVERFLOW (events with wd -1 are
dropped), so lost events would go unnoticed; it stops for good when the watched directory is
deleted and ignores IN_MOVE_SELF; it cannot start on a path that does not exist; and it holds
each unpaired IN_MOVED_FROM for 0.5 s at the head of a delay queue, which holds back every event
behind it, before two more threads and queues reach a handler. Rescanning, re-arming and
latency are what this source promises, so it reads inotify itself. A MOVED_FROM is paired with
its MOVED_TO by cookie within what one read returns; only when a read ends with a MOVED_FROM does
the source wait (at most `MOVE_PAIRING_SECONDS`) for the MOVED_TO that the kernel queues right
after it.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import posixpath
import select
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable

from reconciler.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_DONT_FOLLOW,
                                IN_EXCL_UNLINK, IN_IGNORED, IN_ISDIR, IN_MASK_ADD, IN_MODIFY, IN_MOVE_SELF,
                                IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW, WATCH_GONE,
                                Inotify, RawEvent, WatchFailed)
from reconciler.triggers.base import Context, Emit, Event, Registration, Stoppable

log = logging.getLogger(__name__)

EVENT_KINDS = ("create", "modify", "delete", "move", "close_write")
DEFAULT_EVENTS = ("create", "close_write")

WAITING_POLL_SECONDS = 0.5
"""How often a path that does not exist is looked for."""
ERROR_RETRY_SECONDS = 5.0
"""How soon watching is tried again after it failed (a watch limit, a permission)."""
MOVE_PAIRING_SECONDS = 0.05
"""How long a read that ends with IN_MOVED_FROM waits for its IN_MOVED_TO."""
STOP_SECONDS = 1.0

FileKey = tuple[int, int, int]
"""What identifies a file's content cheaply: inode, size, mtime in nanoseconds."""
Snapshot = dict[str, FileKey]
"""The files that count, by path relative to the watched path."""

GUARD_MASK = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_MOVE_SELF | IN_DELETE_SELF
              | IN_ONLYDIR | IN_MASK_ADD)
"""What a guard watches in a directory above the watched one: an entry on the way to it
created, deleted or renamed (a link re-pointed by `mv -T`, a parent swapped), or the directory
itself moved or deleted. Added to any watch the directory has already (IN_MASK_ADD)."""


@dataclass(frozen=True)
class Config:
    """The `filesystem` section of a registration, with its defaults applied."""

    path: str
    events: frozenset[str]
    recursive: bool
    patterns: tuple[str, ...]
    ignore: tuple[str, ...]
    settle_seconds: float

    @classmethod
    def parse(cls, raw: dict) -> "Config":
        """Raises ValueError naming what is wrong."""
        path = raw.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path {path!r} is not an absolute path")
        for key in ("events", "patterns", "ignore"):
            value = raw.get(key)
            if value is not None and not (isinstance(value, list)
                                          and all(isinstance(item, str) for item in value)):
                raise ValueError(f"{key} must be a list of strings, got {value!r}")
        events = frozenset(raw.get("events") or DEFAULT_EVENTS)
        unknown = sorted(events - set(EVENT_KINDS))
        if unknown:
            raise ValueError(f"events {', '.join(unknown)} are not among {', '.join(EVENT_KINDS)}")
        settle = raw.get("settleSeconds") or 0
        if isinstance(settle, bool) or not isinstance(settle, (int, float)) or not settle >= 0:
            raise ValueError(f"settleSeconds must be a number of seconds from 0, got {settle!r}")
        return cls(
            path=posixpath.normpath(path), events=events, recursive=bool(raw.get("recursive", False)),
            patterns=tuple(raw.get("patterns") or ()), ignore=tuple(raw.get("ignore") or ()),
            settle_seconds=float(settle),
        )

    def selects(self, name: str) -> bool:
        """Whether the file at relative path `name` counts: it matches one of `patterns` (any
        file does when there are none) and none of `ignore`. A pattern without a `/` also
        matches the file's name alone, so `.*` ignores `sub/.x.swp` too."""
        if any(_matches(name, pattern) for pattern in self.ignore):
            return False
        return not self.patterns or any(_matches(name, pattern) for pattern in self.patterns)

    def inotify_mask(self) -> int:
        """The inotify events to ask for. Creations, deletions and moves are always needed (for
        the snapshot and new directories); writes only when they count or settling needs them."""
        mask = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
                | IN_ONLYDIR | IN_EXCL_UNLINK)
        if "modify" in self.events or self.settle_seconds:
            mask |= IN_MODIFY
        if "close_write" in self.events or self.settle_seconds:
            mask |= IN_CLOSE_WRITE
        return mask


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or (
        "/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(name), pattern))


CAUGHT_UP_AS = {
    "create": ("create", "close_write", "move"),
    "modify": ("modify", "close_write"),
    "delete": ("delete",),
}
"""A change found by a rescan is reported as the first of these kinds the trigger counts: a
file that appeared while events were lost was created and written, and perhaps moved in, so a
trigger that counts only close_write or move still hears of it."""


@dataclass(frozen=True)
class Layout:
    """Where the path was found when the source armed: the directory whose events are read (on
    this machine, and as a device path), and `only`, the one file that counts when the
    configured path is a file."""

    directory: str
    device_directory: str
    recursive: bool
    only: str | None = None
    key: tuple[int, int] | None = None
    """(device, inode) of the directory found: what the path led to when armed."""

    def device_path(self, name: str) -> str:
        return posixpath.join(self.device_directory, name)


def changes(before: Snapshot, after: Snapshot) -> list[tuple[str, str]]:
    """The (name, kind) events that turn `before` into `after`: first delete for each name
    that is gone, then create for a new name or one whose inode changed (the file was
    replaced) and modify for a changed size or mtime, each by name. Pure."""
    deleted = [(name, "delete") for name in sorted(before.keys() - after.keys())]
    found = []
    for name in sorted(after):
        old, new = before.get(name), after[name]
        if old is None or new[0] != old[0]:
            found.append((name, "create"))
        elif new != old:
            found.append((name, "modify"))
    return deleted + found


def is_below(name: str, directory: str) -> bool:
    """Whether relative path `name` is inside relative directory `directory`."""
    return name.startswith(directory + "/")


class Settling:
    """Events held until their file has had no further event for `seconds`: at most one per
    file, the latest that counts, with its data. Pure: the caller passes the time."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._held: dict[str, tuple[float, dict]] = {}

    def hold(self, name: str, data: dict, now: float) -> None:
        """`data` replaces what is held for `name`, and its quiet time starts again."""
        self._held[name] = (now + self.seconds, data)

    def extend(self, name: str, now: float) -> None:
        """An event that does not count itself still restarts the quiet time of a held one."""
        if name in self._held:
            self._held[name] = (now + self.seconds, self._held[name][1])

    def drop(self, name: str) -> None:
        self._held.pop(name, None)

    def take(self, name: str) -> dict | None:
        """Removes and returns the data held for `name`, if any."""
        held = self._held.pop(name, None)
        return None if held is None else held[1]

    def due(self, now: float) -> list[dict]:
        """Removes and returns the data of every event whose quiet time has passed, oldest first."""
        ready = sorted((deadline, name) for name, (deadline, _) in self._held.items() if deadline <= now)
        return [self._held.pop(name)[1] for _, name in ready]

    def next_deadline(self) -> float | None:
        return min((deadline for deadline, _ in self._held.values()), default=None)


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def scan(top: str, start: str, recursive: bool, enter: Callable[[str], bool]) -> Snapshot:
    """Every file (anything but a directory) in directory `start` (relative to `top`, "" for
    `top` itself) and, with `recursive`, in every directory below it, by relative path.
    `enter(directory)` is called for each directory before it is listed; one it refuses, or
    that vanished meanwhile, is skipped. Symbolic links are not followed below `top`."""
    files: Snapshot = {}
    directories = [start]
    while directories:
        directory = directories.pop()
        if not enter(directory):
            continue
        try:
            entries = list(os.scandir(os.path.join(top, directory) if directory else top))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = posixpath.join(directory, entry.name) if directory else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        directories.append(name)
                else:
                    files[name] = file_key(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
    return files


class Watches:
    """The inotify watches of one armed period, one per directory, by relative path ("" is the
    watched directory itself). `close()` releases the inotify fd and with it every watch."""

    def __init__(self, layout: Layout, mask: int):
        self.layout = layout
        self.mask = mask
        self.inotify = Inotify()
        self.directories: dict[int, str] = {}
        self.guards: dict[int, set[str]] = {}
        """Directories above the watched one (watch -> the names in it on the way down)."""

    @property
    def fd(self) -> int:
        return self.inotify.fd

    def watch_tree(self, start: str) -> Snapshot:
        """Watches directory `start` and, when recursive, every directory below it, each before
        it is listed, and returns the files found: a file created meanwhile is listed, or
        reported by inotify, or both. Empty when `start` is gone."""
        return scan(self.layout.directory, start, self.layout.recursive, self._watch)

    def _watch(self, directory: str) -> bool:
        path = os.path.join(self.layout.directory, directory) if directory else self.layout.directory
        wd = self.inotify.add_watch(path, self.mask | (IN_DONT_FOLLOW if directory else 0))
        if wd is None:
            return False
        self.directories[wd] = directory
        return True

    def guard(self, ways: list[tuple[str, str]]) -> None:
        """Watches each (directory, name) of `ways`: the directories the path passes through,
        as configured and as its links resolve, and the name it takes in each. One that is
        gone already is not watched: the path then leads elsewhere, which the caller checks.
        One that cannot be watched (permission, the watch limit) is left unguarded: the source
        still works, and a change there is noticed only as before (the watched directory's own
        deletion or move)."""
        for directory, name in ways:
            try:
                wd = self.inotify.add_watch(directory, GUARD_MASK)
            except WatchFailed:  # not allowed, or out of watches: that step goes unguarded
                continue
            if wd is not None:
                self.guards.setdefault(wd, set()).add(name)

    def path_changed(self, event: RawEvent) -> bool:
        """Whether `event` of a guard says the path may lead somewhere else now."""
        names = self.guards.get(event.wd)
        if names is None:
            return False
        return bool(event.mask & WATCH_GONE) or event.name in names

    def directory(self, wd: int) -> str | None:
        return self.directories.get(wd)

    def forget(self, wd: int) -> None:
        self.directories.pop(wd, None)

    def watching(self, directory: str) -> bool:
        return directory in self.directories.values()

    def rename_tree(self, old: str, new: str) -> None:
        """A watched directory moved within the tree: its watches (and those below) stay, under
        new names."""
        for wd, directory in list(self.directories.items()):
            if directory == old or is_below(directory, old):
                self.directories[wd] = new + directory[len(old):]

    def drop_tree(self, start: str) -> None:
        """Removes the watches of `start` and below (a directory that left the tree)."""
        for wd, directory in list(self.directories.items()):
            if directory == start or is_below(directory, start):
                self.inotify.remove_watch(wd)
                del self.directories[wd]

    def close(self) -> None:
        self.inotify.close()


class FilesystemSource(Stoppable):
    """Watches one path; see the module docstring for what it reports. The first arming happens
    in `start()`, so files created after `start()` returns are reported; everything after runs
    on the source's own thread, which is the only one to call `emit`."""

    def __init__(self, registration: Registration, emit: Emit, context: Context):
        super().__init__()
        self.registration = registration
        self.config = Config.parse(registration.config)
        self._emit = emit
        self._host = context.host
        self._snapshot: Snapshot = {}
        self._settling = Settling(self.config.settle_seconds)
        self._watches: Watches | None = None
        self._layout: Layout | None = None
        self._first_arming = True
        self._rearm_at: float | None = None
        self._wake_read = self._wake_write = -1
        self._pipe_lock = threading.Lock()

    # Lifecycle

    def start(self) -> None:
        """Arms the watches and starts the thread; only the first call does anything."""
        if self._thread is not None:
            return
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._guarded(self._arm)
        self.start_thread(f"trigger-filesystem-{self.registration.name}")

    def stop(self) -> None:
        """Ends the thread, which closes the inotify fd (every watch with it); idempotent."""
        self.stopping.set()
        with self._pipe_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"x")
                except BlockingIOError:
                    pass
        self.stop_thread(STOP_SECONDS)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._guarded(self._step)
        finally:
            self._disarm()
            with self._pipe_lock:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1

    def _guarded(self, work: Callable[[], None]) -> None:
        """Runs `work`; a failure becomes status "error" and a retry, never an exception out of
        the source."""
        try:
            work()
        except WatchFailed as failure:
            self._fail(str(failure))
        except Exception as failure:  # noqa: BLE001 - a source's thread must survive its bugs
            log.exception("filesystem trigger %s failed", self.registration.name)
            self._fail(f"{type(failure).__name__}: {failure}")

    def _fail(self, detail: str) -> None:
        self._disarm()
        self.set_status("error", f"{detail}; retrying every {ERROR_RETRY_SECONDS:g}s")
        self._rearm_at = time.monotonic() + ERROR_RETRY_SECONDS

    def _step(self) -> None:
        """One turn of the loop: re-arm when due, hand over settled events, wait for the next
        inotify event (or deadline, or stop) and handle what was read."""
        if self._rearm_at is not None and self._rearm_at <= time.monotonic():
            self._arm()
        for data in self._settling.due(time.monotonic()):
            self._hand_over(data)
        if self._wait_for_events() and not self.stopping.is_set():
            self._handle(self._read_batch())
            self._show_armed()

    def _wait_for_events(self) -> bool:
        """Sleeps until an inotify event is queued (True), the next deadline passes or stop()
        is called."""
        deadlines = [d for d in (self._rearm_at, self._settling.next_deadline()) if d is not None]
        timeout = -1 if not deadlines else max(0, math.ceil((min(deadlines) - time.monotonic()) * 1000))
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        if self._watches is not None:
            poller.register(self._watches.fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(timeout)}
        return self._watches is not None and self._watches.fd in ready

    # Arming

    def _arm(self) -> None:
        """Watches the path afresh and reports what differs from the snapshot; when the path
        does not exist, reports what was there as deleted and looks again later."""
        self._disarm()
        self._rearm_at = None
        layout = self._find_layout()
        if layout is None:
            self._compare({})
            self.set_status("waiting", f"{self.config.path} does not exist")
            self._rearm_at = time.monotonic() + WAITING_POLL_SECONDS
            return
        watches = Watches(layout, self.config.inotify_mask())
        try:
            found = watches.watch_tree("")
        except BaseException:
            watches.close()
            raise
        if not watches.directories:
            watches.close()
            self._rearm_at = time.monotonic() + WAITING_POLL_SECONDS
            return
        try:
            watches.guard(self._ways(layout))
        except BaseException:
            watches.close()
            raise
        self._watches, self._layout = watches, layout
        self._compare({name: key for name, key in found.items() if self._selects(name)})
        self._show_armed()
        if self._find_layout_key() != layout.key:  # changed while the guards were being set
            self._rearm_now()

    def _ways(self, layout: Layout) -> list[tuple[str, str]]:
        """(directory, name) for each step down to the watched directory from the device's
        root: along the path as configured, and along the directory its links resolve to."""
        configured = posixpath.normpath(self._host("/"))
        ways = []
        for part in [p for p in layout.device_directory.split("/") if p]:
            ways.append((configured, part))
            configured = posixpath.join(configured, part)
        root = os.path.realpath(self._host("/"))
        parent, name = posixpath.split(os.path.realpath(layout.directory))
        while name:
            ways.append((parent, name))
            if parent == root:
                break
            parent, name = posixpath.split(parent)
        return ways

    def _find_layout_key(self):
        layout = self._find_layout()
        return None if layout is None else layout.key

    def _find_layout(self) -> Layout | None:
        """Where to watch: the path itself when it is a directory, its directory when it is a
        file; None when it does not exist."""
        host = self._host(self.config.path)
        try:
            st = os.stat(host)
            if stat.S_ISDIR(st.st_mode):
                return Layout(host, self.config.path, self.config.recursive, key=(st.st_dev, st.st_ino))
            parent = os.stat(os.path.dirname(host))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Layout(os.path.dirname(host), posixpath.dirname(self.config.path), False,
                      only=os.path.basename(host), key=(parent.st_dev, parent.st_ino))

    def _compare(self, current: Snapshot) -> None:
        """Reports the differences between the snapshot and `current`, which becomes the
        snapshot. The first arming only takes the snapshot: files already there when the source
        starts are not events."""
        if self._first_arming:
            self._first_arming = False
        else:
            for name, kind in changes(self._snapshot, current):
                if kind == "delete":
                    self._settling.drop(name)
                self._report(name, self._caught_up(kind))
        self._snapshot = current

    def _disarm(self) -> None:
        if self._watches is not None:
            self._watches.close()
            self._watches = None

    def _show_armed(self) -> None:
        if self._watches is None:
            return
        if self._layout.only is not None:
            self.set_status("armed", f"watching {self.config.path}")
            return
        count = len(self._watches.directories)
        self.set_status("armed", f"watching {count} director{'y' if count == 1 else 'ies'}")

    # Events

    def _read_batch(self) -> list[RawEvent]:
        """What inotify has queued. A batch that ends with IN_MOVED_FROM waits briefly for
        more, so that the move's IN_MOVED_TO lands in the same batch."""
        inotify = self._watches.inotify
        events = inotify.read()
        while events and events[-1].mask & IN_MOVED_FROM and inotify.readable(MOVE_PAIRING_SECONDS):
            events.extend(inotify.read())
        return events

    def _handle(self, events: list[RawEvent]) -> None:
        """Turns one batch of inotify events into reports, pairing moves by cookie; an overflow
        or the watched directory going away re-arms (after the rest of the batch)."""
        cookies_moved_to = {event.cookie for event in events if event.mask & IN_MOVED_TO}
        moved_from: dict[int, tuple[int, str]] = {}
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self._rearm_now()
                continue
            if self._watches is not None and self._watches.path_changed(event) \
                    and self._find_layout_key() != self._layout.key:
                # The path leads to another directory now: what follows is the old one's,
                # and the re-arming reports what differs in the new one.
                self._rearm_now()
                break
            directory = self._watches.directory(event.wd) if self._watches else None
            if directory is None:
                continue
            if event.mask & WATCH_GONE:
                self._watch_gone(event, directory)
                continue
            name = posixpath.join(directory, event.name) if directory else event.name
            if event.mask & IN_MOVED_FROM and event.cookie in cookies_moved_to:
                moved_from[event.cookie] = (event.mask, name)
                continue
            source = moved_from.pop(event.cookie, (0, None))[1] if event.mask & IN_MOVED_TO else None
            self._dispatch(event.mask, name, source)
        for mask, name in moved_from.values():
            self._dispatch(mask, name, None)

    def _dispatch(self, mask: int, name: str, source: str | None) -> None:
        if mask & IN_ISDIR:
            self._directory_event(mask, name, source)
        else:
            self._file_event(mask, name, source)

    def _rearm_now(self) -> None:
        self._rearm_at = time.monotonic()

    def _watch_gone(self, event: RawEvent, directory: str) -> None:
        if directory == "":
            self._rearm_now()
        elif event.mask & IN_IGNORED:
            self._watches.forget(event.wd)

    def _file_event(self, mask: int, name: str, source: str | None) -> None:
        if mask & IN_CREATE:
            self._appeared(name, "create")
        elif mask & IN_MOVED_TO:
            if source is None:
                self._appeared(name, "move")
            else:
                self._moved(source, name)
        elif mask & IN_MOVED_FROM:
            self._moved_out(name)
        elif mask & IN_DELETE:
            self._deleted(name)
        elif mask & IN_MODIFY:
            self._changed(name, "modify")
        elif mask & IN_CLOSE_WRITE:
            self._changed(name, "close_write")

    def _directory_event(self, mask: int, name: str, source: str | None) -> None:
        """Directories have no events of their own; with recursive, their files do."""
        if not self._watches.layout.recursive:
            return
        if mask & IN_CREATE:
            # Files listed in a new directory may have been written before its watch existed.
            self._appeared_all(self._watches.watch_tree(name), self._caught_up("create"))
        elif mask & IN_MOVED_TO and source is not None:
            self._directory_moved(source, name)
        elif mask & IN_MOVED_TO:
            self._appeared_all(self._watches.watch_tree(name), "move")
        elif mask & IN_MOVED_FROM:
            self._watches.drop_tree(name)
            for gone in self._names_below(name):
                self._moved_out(gone)
        elif mask & IN_DELETE:
            self._watches.drop_tree(name)
            for gone in self._names_below(name):
                self._deleted(gone)

    def _directory_moved(self, old: str, new: str) -> None:
        """A directory moved within the tree: each file known in it moved (files that arrived
        in it since have events of their own). One that was renamed before it could be watched
        (created and put in place at once) is watched now, and its files reported as created."""
        if not self._watches.watching(old):
            self._appeared_all(self._watches.watch_tree(new), self._caught_up("create"))
            return
        self._watches.rename_tree(old, new)
        for name in self._names_below(old):
            self._moved(name, new + name[len(old):])

    def _names_below(self, directory: str) -> list[str]:
        return sorted(name for name in self._snapshot if is_below(name, directory))

    def _caught_up(self, kind: str) -> str:
        return next((k for k in CAUGHT_UP_AS[kind] if k in self.config.events), kind)

    def _appeared_all(self, found: Snapshot, kind: str) -> None:
        for name in sorted(found):
            self._appeared(name, kind, found[name])

    def _appeared(self, name: str, kind: str, key: FileKey | None = None) -> None:
        """A file was created or moved in. One already in the snapshot with the same inode was
        reported when its directory was listed (inotify then reported it too): not again."""
        if not self._selects(name):
            return
        key = key or self._stat(name)
        known = self._snapshot.get(name)
        if key is not None:
            self._snapshot[name] = key
        if known is not None and key is not None and known[0] == key[0]:
            return
        self._report(name, kind)

    def _changed(self, name: str, kind: str) -> None:
        if not self._selects(name):
            return
        key = self._stat(name)
        if key is not None:
            self._snapshot[name] = key
        self._report(name, kind)

    def _deleted(self, name: str) -> None:
        if not self._selects(name):
            return
        self._forget(name)
        self._report(name, "delete")

    def _moved(self, source: str, name: str) -> None:
        """A file renamed within the tree: reported at its new path with "from", or, when only
        its old path counts, at the old path with "to". An event still settling at the old
        path follows the file to the new one, unless the move counts and takes its place."""
        source_counts = self._selects(source)
        self._snapshot.pop(source, None)
        held = self._settling.take(source)
        if self._selects(name):
            key = self._stat(name)
            if key is not None:
                self._snapshot[name] = key
            if held is not None and "move" not in self.config.events:
                self._report(name, held["event"])
            self._report(name, "move", {"from": self._layout.device_path(source)})
        elif source_counts:
            self._report(source, "move", {"to": self._layout.device_path(name)})

    def _moved_out(self, name: str) -> None:
        if not self._selects(name):
            return
        self._forget(name)
        self._report(name, "move")

    def _forget(self, name: str) -> None:
        """The file is gone from `name`: out of the snapshot, and an event held for it is
        dropped (unless what follows counts itself and takes its place)."""
        self._snapshot.pop(name, None)
        self._settling.drop(name)

    def _selects(self, name: str) -> bool:
        only = self._layout.only if self._layout else None
        if only is not None and name != only:
            return False
        return self.config.selects(name)

    def _stat(self, name: str) -> FileKey | None:
        try:
            return file_key(os.lstat(os.path.join(self._layout.directory, name)))
        except OSError:
            return None

    def _report(self, name: str, kind: str, extra: dict | None = None) -> None:
        """An event for the file `name`: emitted now, or held until the file settles; one that
        does not count only restarts the settling of one held for the same file."""
        now = time.monotonic()
        if kind not in self.config.events:
            self._settling.extend(name, now)
            return
        data = {"path": self._layout.device_path(name), "event": kind, "name": name, **(extra or {})}
        if self.config.settle_seconds > 0:
            self._settling.hold(name, data, now)
        else:
            self._hand_over(data)

    def _hand_over(self, data: dict) -> None:
        """Emits one event; a failing emit is logged and costs only that event."""
        try:
            self._emit(Event(data=data))
        except Exception:  # noqa: BLE001 - the other files' events must still go out
            log.exception("filesystem trigger %s could not emit %s", self.registration.name, data)


def open_source(registration: Registration, emit: Emit, context: Context) -> FilesystemSource:
    """The source of a `filesystem` Trigger, not yet started. Raises ValueError for a
    registration whose `filesystem` section is unusable."""
    return FilesystemSource(registration, emit, context)
