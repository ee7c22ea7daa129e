"""inotify through ctypes: the one instance type the trigger daemon's file sources, the
executor's queue watch and `spos monitor` share.

The standard library has no inotify, and a library's watcher decides too much for these users:
which events it drops (IN_Q_OVERFLOW), how long it holds an unpaired move, whether it may
start on a path that does not exist yet. Each user reads the raw events and decides."""

from __future__ import annotations

import ctypes
import errno
import math
import os
import select
import struct
from typing import NamedTuple

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT
"""A watched directory itself was deleted, moved or unmounted, or its watch was removed."""

_EVENT_HEADER = struct.Struct("iIII")
_READ_BYTES = 65536

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.inotify_init1.argtypes = [ctypes.c_int]
    _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    _libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):  # a C library without inotify: Inotify() says so
    _libc = None


class WatchFailed(Exception):
    """Watching is impossible for now; the message says why in words, and what helps."""


class RawEvent(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: str


class Inotify:
    """One inotify instance (non-blocking, close-on-exec). Closing it removes every watch."""

    def __init__(self):
        if _libc is None:
            raise WatchFailed("inotify is not available (the C library has no inotify_init1)")
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise watch_failure(ctypes.get_errno(), "inotify")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int | None:
        """The watch descriptor of `path`, or None when it no longer exists or is no directory."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:
            return wd
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise watch_failure(err, path)

    def remove_watch(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[RawEvent]:
        """Every event queued now (none when nothing is)."""
        events: list[RawEvent] = []
        while True:
            try:
                chunk = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                return events
            events.extend(parse_events(chunk))

    def readable(self, seconds: float) -> bool:
        """Whether an event is queued, waiting for one at most `seconds`."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(math.ceil(seconds * 1000)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_events(chunk: bytes) -> list[RawEvent]:
    """The `struct inotify_event`s in what one read returned."""
    events, offset = [], 0
    while offset + _EVENT_HEADER.size <= len(chunk):
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(chunk, offset)
        offset += _EVENT_HEADER.size
        name = os.fsdecode(chunk[offset:offset + length].rstrip(b"\0"))
        offset += length
        events.append(RawEvent(wd, mask, cookie, name))
    return events


def watch_failure(err: int, what: str) -> WatchFailed:
    """Why watching `what` failed with `err`, in words, with the sysctl that raises a limit."""
    if err == errno.ENOSPC:
        return WatchFailed("inotify watch limit reached (sysctl fs.inotify.max_user_watches is "
                           f"{_sysctl('max_user_watches')}); raise fs.inotify.max_user_watches")
    if err == errno.EMFILE:
        return WatchFailed("inotify instance limit reached (sysctl fs.inotify.max_user_instances is "
                           f"{_sysctl('max_user_instances')}); raise fs.inotify.max_user_instances "
                           "or the open file limit")
    return WatchFailed(f"cannot watch {what}: {os.strerror(err)}")


def _sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"
