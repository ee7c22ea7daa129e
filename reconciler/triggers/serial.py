"""Serial triggers: lines, matching lines or raw data from a serial device become events.

The registration's `serial` section: `device` (the node, opened below the daemon's root),
`baudrate` (default 9600), `mode` (default line), `pattern` (mode pattern only) and
`maxLineLength` (bytes, default 4096).

- line: each line fires. Lines end at `\\n`; a `\\r` before it is stripped; empty lines are
  ignored. Event data `{"device": <device as configured>, "line": <the line as UTF-8, undecodable
  bytes replaced>}`, payload the line's bytes without its line end.
- pattern: like line, but only lines in which `regex.search(pattern)` finds a match fire
  (Python's `re` syntax). A match is given MATCH_SECONDS: a line on which it takes longer (a
  pattern that backtracks catastrophically) is passed over and said in the status, and the
  match runs without holding the interpreter, so the daemon's other triggers go on meanwhile.
- data: each read from the device (up to 4096 bytes, whatever had arrived) fires with data
  `{"device": ...}` and the bytes as payload.

A line longer than `maxLineLength` bytes is not buffered further: its first `maxLineLength`
bytes fire once, as soon as they are in, with `"truncated": "1"` added to the data (in pattern
mode only if they match), and the rest of that line is discarded up to the next line end.

A device that is absent, that goes away (a hang-up, an I/O error, or its node removed or
replaced, which is checked whenever the device has been quiet for 0.2 s) or that cannot be
opened is retried every 0.5 s, with status `waiting` meanwhile; a partial line read before it
went away is discarded. Reads time out every 0.2 s so `stop()` is prompt.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

import serial

from reconciler.triggers.base import Context, Emit, Event, Registration, Stoppable

RETRY_SECONDS = 0.5
"""How often an absent or vanished device is looked for again."""
READ_TIMEOUT_SECONDS = 0.2
"""The longest a read waits; bounds how long `stop()` and a removed node go unnoticed."""
CHUNK_BYTES = 4096
"""The most bytes taken from the device in one read (one data-mode event)."""
MATCH_SECONDS = 0.1
"""How long a pattern may take to match one line."""
DEFAULT_BAUDRATE = 9600
DEFAULT_MAX_LINE_LENGTH = 4096
STOP_JOIN_SECONDS = 1.0


class DeviceGone(Exception):
    """The open device stopped being readable: hung up, failed, or its node is gone."""


@dataclass(frozen=True)
class Line:
    """One line as read, without its line end; `truncated` when it was cut at the limit."""

    content: bytes
    truncated: bool = False


class LineSplitter:
    """Splits a byte stream into lines, holding at most `max_length` (+1 for a `\\r`) bytes
    of an unfinished line. Pure: it only sees the chunks it is fed."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._partial = bytearray()
        self._discarding = False

    def feed(self, chunk: bytes) -> list[Line]:
        """The lines that `chunk` completes, in order, plus the head of an over-long line the
        first time it passes the limit. Empty lines are left out."""
        lines: list[Line] = []
        *ended, unfinished = chunk.split(b"\n")
        for piece in ended:
            lines.extend(self._append(piece))
            lines.extend(self._end_line())
        lines.extend(self._append(unfinished))
        return lines

    def reset(self) -> None:
        """Forgets the unfinished line (the device went away mid-line)."""
        self._partial.clear()
        self._discarding = False

    def _append(self, piece: bytes) -> list[Line]:
        if self._discarding:
            return []
        self._partial += piece
        if not self._over_limit():
            return []
        head = bytes(self._partial[: self.max_length])
        self._partial.clear()
        self._discarding = True
        return [Line(head, truncated=True)]

    def _over_limit(self) -> bool:
        """Longer than the limit, not counting one trailing `\\r` that a `\\n` may still follow."""
        extra = len(self._partial) - self.max_length
        return extra > 1 or (extra == 1 and not self._partial.endswith(b"\r"))

    def _end_line(self) -> list[Line]:
        if self._discarding:
            self._discarding = False
            return []
        content = bytes(self._partial).removesuffix(b"\r")
        self._partial.clear()
        return [Line(content)] if content else []


class SerialSource(Stoppable):
    """Reads one serial device on a daemon thread and emits its lines or data."""

    def __init__(self, registration: Registration, emit: Emit, context: Context):
        super().__init__()
        config = registration.config
        self.name = registration.name
        self.device = config["device"]
        self.host_path = context.host(self.device)
        self.baudrate = int(config.get("baudrate") or DEFAULT_BAUDRATE)
        self.mode = config.get("mode") or "line"
        self.splitter = LineSplitter(int(config.get("maxLineLength") or DEFAULT_MAX_LINE_LENGTH))
        self.emit = emit
        self.pattern, problem = _compile(config.get("pattern"), self.mode)
        if problem:
            self.set_status("error", problem)
        else:
            self.set_status("waiting", f"device {self.device} not opened yet")

    def start(self) -> None:
        """Starts reading; a source whose configuration is unusable stays in its error state."""
        if self.status().state != "error":
            self.start_thread(f"trigger-serial-{self.name}")

    def stop(self) -> None:
        """Stops reading and closes the device, within about a second. Idempotent."""
        self.stop_thread(STOP_JOIN_SECONDS)

    def _run(self) -> None:
        """Opens, reads until the device goes away, and tries again every RETRY_SECONDS."""
        while True:
            port = self._open()
            if port is not None:
                self._read(port)
            if self.wait(RETRY_SECONDS):
                return

    def _read(self, port: serial.Serial) -> None:
        """Reads `port` until stopped or gone, then closes it and forgets any partial line."""
        try:
            self._read_until_gone(port)
        except DeviceGone as gone:
            self.set_status("waiting", f"device {self.device} went away ({gone}); retrying every {RETRY_SECONDS}s")
        except Exception as error:  # whatever fails, the thread lives on and reopens the device
            self.set_status("error", f"reading {self.device} failed ({error!r}); retrying every {RETRY_SECONDS}s")
        finally:
            port.close()
            self.splitter.reset()

    def _open(self) -> serial.Serial | None:
        """The device opened and configured, status armed; None (status says why) when it
        cannot be opened now."""
        if not os.path.exists(self.host_path):
            self.set_status("waiting", f"device {self.device} is absent; retrying every {RETRY_SECONDS}s")
            return None
        try:
            # exclusive: a second opener (another Trigger on the device, or any program) fails
            # here and says so, rather than each reader silently getting part of the bytes
            port = serial.Serial(self.host_path, self.baudrate, timeout=0, exclusive=True)
        except (serial.SerialException, OSError) as error:
            self.set_status("waiting", f"device {self.device} cannot be opened ({error}); retrying every {RETRY_SECONDS}s")
            return None
        self.set_status("armed", f"reading {self.device}")
        return port

    def _read_until_gone(self, port: serial.Serial) -> None:
        """Emits what the device sends until stopped; raises DeviceGone when it goes away."""
        identity = _identity(os.fstat(port.fileno()))
        while not self.stopping.is_set():
            chunk = _read_chunk(port.fileno())
            if chunk:
                self._handle(chunk)
            elif self._node_identity() != identity:
                raise DeviceGone("its node was removed or replaced")

    def _node_identity(self) -> tuple[int, int, int] | None:
        try:
            return _identity(os.stat(self.host_path))
        except OSError:
            return None

    def _handle(self, chunk: bytes) -> None:
        if self.mode == "data":
            self.emit(Event(data={"device": self.device}, payload=chunk))
            return
        for line in self.splitter.feed(chunk):
            if self.pattern is None or self._matches(line.content.decode("utf-8", "replace")):
                self.emit(self._line_event(line))

    def _matches(self, text: str) -> bool:
        try:
            return self.pattern.search(text, timeout=MATCH_SECONDS, concurrent=True) is not None
        except TimeoutError:
            self.set_status("armed", f"reading {self.device}; a line took the pattern longer than "
                                     f"{MATCH_SECONDS:g}s to match and was passed over")
            return False

    def _line_event(self, line: Line) -> Event:
        data = {"device": self.device, "line": line.content.decode("utf-8", "replace")}
        if line.truncated:
            data["truncated"] = "1"
        return Event(data=data, payload=line.content)


def _compile(pattern: str | None, mode: str):
    """The pattern compiled for pattern mode (None otherwise), or a problem in words."""
    if mode not in ("line", "pattern", "data"):
        return None, f"mode {mode!r} is not one of line, pattern, data"
    if mode != "pattern":
        return None, ""
    if not pattern:
        return None, "mode pattern needs a pattern"
    import regex

    try:
        return regex.compile(pattern), ""
    except regex.error as error:
        return None, f"pattern {pattern!r} is not a valid regular expression: {error}"


def _read_chunk(fd: int) -> bytes:
    """What has arrived on `fd` (at most CHUNK_BYTES), or b"" after READ_TIMEOUT_SECONDS of
    silence. Raises DeviceGone on a hang-up or an I/O error."""
    ready, _, _ = select.select([fd], [], [], READ_TIMEOUT_SECONDS)
    if not ready:
        return b""
    try:
        chunk = os.read(fd, CHUNK_BYTES)
    except BlockingIOError:
        return b""
    except OSError as error:
        raise DeviceGone(error.strerror or str(error)) from error
    if not chunk:
        raise DeviceGone("hung up")
    return chunk


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_rdev


def open_source(registration: Registration, emit: Emit, context: Context) -> SerialSource:
    """The serial source for `registration`, built but not started."""
    return SerialSource(registration, emit, context)

