"""`spos triggers`: load the registrations, run a source per trigger, follow changes.

The daemon sleeps until something happens: a registration file written, replaced or removed
(inotify on the registrations directory, or on the nearest directory above it until it
exists), a trigger's counts or state changing, a failed source due to be started again, or
the status heartbeat. Where inotify cannot watch, the registrations are listed every
`reload_interval`. A registration whose file content changed is stopped and started again;
one that disappeared is stopped; a new one is started. Every other trigger keeps running through a reload: its inotify
watches, serial port, broker connection and webhook route stay as they are, so no event of an
unchanged trigger is dropped. A debounce window open on a trigger that is stopped is queued at
once, not lost.

The daemon's own state (status, seen delivery ids) lives in `<state>/triggerd/`; the
registrations are the reconciler's and are only read. The status file is written atomically
whenever something `spos trigger list` shows has changed (at most every STATUS_PACE seconds
during a burst of events), and at least every `heartbeat` seconds (STATUS_HEARTBEAT unless
given; the status says which), so a reader can tell a live daemon from one that hangs. The
heartbeat also lists the registrations again, in case an inotify event was lost, and rereads
what a status reads from outside (a webhook's secret).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from reconciler import STATE_DIR, TRIGGERS_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.state import hold_alone, objects_by_name, read_json_object
from reconciler.triggers.base import Context, Registration, Source, Status, Stoppable
from reconciler.triggers.gate import Gate

STATUS_FILE = f"/{STATE_DIR}/triggerd/status.json"
LOCK_FILE = f"/{STATE_DIR}/triggerd/daemon.lock"
"""Held (flock) by the one trigger daemon serving a device, with its pid in it: a second one
would queue every event twice."""
STATUS_FORMAT = 1
STATUS_HEARTBEAT = 30.0
"""Seconds between status writes when nothing changed (`spos triggers --heartbeat`): an idle
daemon whose registrations inotify watches wakes this often."""
HEARTBEAT_RANGE = (1.0, 3600.0)
"""The heartbeats a daemon accepts, and a status reader believes."""
STATUS_PACE = 0.5
"""Seconds at least between two status writes woken by triggers' counts or states changing: a
steady stream of events rewrites the status twice a second, not once per event."""
SOURCE_RETRY = 30.0
"""Seconds before a source that failed to start is started again."""
START_WAIT = 1.0
"""How long the loop waits for one source to start before it goes on without it. A source's
start may block (a large tree to scan, a hung mount): it finishes on its own thread."""
DEFAULT_LISTEN = ("127.0.0.1", 9180)


@dataclass
class Running:
    registration: Registration
    gate: Gate
    source: Source | None
    failed: str = ""
    failed_at: float = 0.0
    starting: bool = False
    stopped: bool = False


@dataclass
class Broken:
    """A registration file the daemon cannot use; `spos trigger list` shows why."""

    digest: str
    problem: str


class TriggerDaemon:
    def __init__(self, device: Device, *, listen: tuple[str, int] = DEFAULT_LISTEN,
                 metrics=None, reload_interval: float = 0.5, heartbeat: float = STATUS_HEARTBEAT):
        self.device = device
        self.listen = listen
        self.metrics = metrics
        self.reload_interval = reload_interval
        if not HEARTBEAT_RANGE[0] <= heartbeat <= HEARTBEAT_RANGE[1]:
            raise ValueError(f"heartbeat {heartbeat!r}: from {HEARTBEAT_RANGE[0]:g} to "
                             f"{HEARTBEAT_RANGE[1]:g} seconds")
        self.heartbeat = heartbeat
        self.running: dict[str, Running] = {}
        self.broken: dict[str, Broken] = {}
        self.listener = None
        self.listener_problem = ""
        self.stopping = threading.Event()
        self.started_at = time.time()
        self._seen_files: dict[str, tuple] | None = None
        self._last_status: str | None = None
        self._listener_tried = 0.0
        self._lock = threading.Lock()
        self._status_written = self._status_tried = self._stepped = self._listed = 0.0
        self._context = Context(host=_below(str(device.root)), metrics=metrics, pending=self._pending)
        self._watch = _Watch(device)
        # Written to by nudge() from any thread; closed as run() ends, under _nudge_lock, so a
        # source thread that nudges late never writes to a descriptor reused for something else.
        # Re-entrant: a signal handler's nudge runs on the main thread, which may hold it.
        self._nudge_read, self._nudge_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._nudge_lock = threading.RLock()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM/SIGINT (or `stop()`): follow the registrations, keep status current.
        Raises state.AlreadyServed, before anything else, when another daemon serves the device."""
        lock = hold_alone(self.device, LOCK_FILE, "trigger daemon")
        self._handle_signals()
        listing = True
        try:
            while not self.stopping.is_set():
                self._watch.arm()  # before listing: a change made after the listing is reported
                self.step(listing or self._watch.renewed)
                self._watch.renewed = False
                listing = self._sleep()
        finally:
            try:
                self.shutdown()
                self._watch.close()
                with self._nudge_lock:
                    fds = (self._nudge_read, self._nudge_write)
                    self._nudge_read = self._nudge_write = -1  # first: a signal may nudge meanwhile
                    for fd in fds:
                        os.close(fd)
            finally:
                os.close(lock)

    def step(self, listing: bool = True) -> None:
        """One pass: reload what changed (unless `listing` is False: no registration can have),
        retry sources that failed, write the status."""
        self._stepped = time.monotonic()
        if listing:
            self._listed = self._stepped
            files = self._registration_files()
            if files != self._seen_files:
                self._seen_files = files
                self.reload(files)
        self._retry_failed()
        self.write_status()

    def stop(self) -> None:
        self.stopping.set()
        self.nudge()

    def nudge(self) -> None:
        """Wake the loop: something the status shows changed. Any thread, and a signal
        handler. Every nudge writes: one that left the wake-up to another nudge under way could
        be lost, when the loop had read that one's byte already. It waits only for another
        nudge's write (or the pipe's closing), never for the loop."""
        with self._nudge_lock:
            if self._nudge_write >= 0:
                try:
                    os.write(self._nudge_write, b".")
                except OSError:  # full: a wake-up is pending already
                    pass

    def _sleep(self) -> bool:
        """Until a registration changes, a trigger's counts or state do, or the next thing
        falls due (the heartbeat, a retry; the next listing where inotify cannot watch).
        Returns whether the registrations need listing: not after a wake-up for counts or
        states alone."""
        now = time.monotonic()
        due = max(self._status_written, self._status_tried) + self.heartbeat
        for running in self.running.values():
            if running.source is None and not running.starting:
                due = min(due, running.failed_at + SOURCE_RETRY)
        if self.listener is None and any(r.registration.type == "webhook" for r in self.running.values()):
            due = min(due, self._listener_tried + SOURCE_RETRY)
        watched = self._watch.arm()
        if self._watch.renewed:  # watching afresh: what happened meanwhile went unreported
            return True
        # The next listing, counted from the last one (not from the last status write, which a
        # stream of events keeps pushing back): at the heartbeat, in case inotify missed
        # something, or every reload_interval where it cannot watch.
        listing = self._listed + (self.heartbeat if watched is not None else self.reload_interval)
        due = min(due, listing)
        poller = select.poll()
        poller.register(self._nudge_read, select.POLLIN)
        if watched is not None:
            poller.register(watched, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(0, int((due - now) * 1000) + 1))}
        registrations = watched is not None and watched in ready and self._watch.drain()
        if self._nudge_read in ready:
            try:
                while os.read(self._nudge_read, 4096):
                    pass
            except BlockingIOError:
                pass
            if not registrations and time.monotonic() < due:  # counts or states alone
                self.stopping.wait(self._stepped + STATUS_PACE - time.monotonic())
                reported = self._watch.pending() and self._watch.drain()
                return reported or time.monotonic() >= listing
        return True

    def shutdown(self) -> None:
        for name in list(self.running):
            self._stop(name)
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        self.write_status(final=True)

    def _handle_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    # -- registrations ----------------------------------------------------------------------

    def _registration_files(self) -> dict[str, tuple]:
        """name -> (mtime_ns, size, inode) of every registration file; an entry that is not a
        regular file (a link, a directory) is listed by its problem, and shown as broken."""
        found: dict[str, tuple] = {}
        try:
            entries = self.device.listdir(TRIGGERS_DIR)
        except (OSError, SposError) as exc:
            return {"": ("unreadable", str(exc))}
        for entry in entries:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            try:
                st = self.device.stat(f"{TRIGGERS_DIR}/{entry}")
            except (OSError, SposError) as exc:
                found[entry[:-5]] = ("unreadable", str(exc))
                continue
            if st is not None:
                found[entry[:-5]] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found

    def reload(self, files: dict[str, tuple] | None = None) -> None:
        """Converge the running triggers to the registration files."""
        files = self._registration_files() if files is None else files
        wanted: dict[str, Registration] = {}
        self.broken = {}
        for name, seen in files.items():
            if seen[0] == "unreadable":
                self.broken[name or "(registrations)"] = Broken("", seen[1])
                continue
            try:
                raw = self.device.read_bytes(f"{TRIGGERS_DIR}/{name}.json")
            except (OSError, SposError) as exc:
                self.broken[name] = Broken("", str(exc))
                continue
            if raw is None:
                continue
            digest = hashlib.sha256(raw).hexdigest()
            current = self.running.get(name)
            if current is not None and current.registration.digest == digest:
                wanted[name] = current.registration
                continue
            try:
                registration = Registration.from_json(json.loads(raw), digest)
                if registration.name != name:
                    raise ValueError(f"its name is {registration.name!r}, not {name!r}")
            except (ValueError, TypeError, KeyError) as exc:
                self.broken[name] = Broken(digest, f"{TRIGGERS_DIR}/{name}.json: {exc}")
                continue
            wanted[name] = registration
        for name in [n for n in self.running if n not in wanted
                     or wanted[n].digest != self.running[n].registration.digest]:
            self._stop(name)
        self._ensure_listener(wanted.values())
        for name, registration in sorted(wanted.items()):
            if name not in self.running:
                self._start(registration)

    def _start(self, registration: Registration) -> None:
        gate = Gate(self.device, registration)
        gate.changed = self.nudge
        running = Running(registration, gate, None)
        self.running[registration.name] = running
        self._open(running)

    def _open(self, running: Running) -> None:
        """Start the trigger's source on a thread of its own, and wait for it START_WAIT at
        most: a source that takes longer is `starting` meanwhile, and never holds up the
        loop (reloads, status, SIGTERM)."""
        if running.registration.type == "webhook" and self.listener is None:
            self._failed(running, self.listener_problem or "the webhook listener is not running")
            return
        running.starting = True
        thread = threading.Thread(target=self._start_source, args=(running,), daemon=True,
                                  name=f"start {running.registration.name}")
        thread.start()
        thread.join(START_WAIT)

    def _start_source(self, running: Running) -> None:
        registration = running.registration
        try:
            module = importlib.import_module(f"reconciler.triggers.{registration.type}")
            source = module.open_source(registration, running.gate, self._context)
            if isinstance(source, Stoppable):
                source.changed = self.nudge
            source.start()
        except Exception as exc:  # one trigger that cannot start never stops the others
            self._failed(running, str(exc) or repr(exc))
            return
        with self._lock:
            running.starting = False
            if not running.stopped:
                running.source, running.failed = source, ""
                self.nudge()
                return
        source.stop()  # it was stopped (a reload, SIGTERM) while it was starting

    def _failed(self, running: Running, why: str) -> None:
        with self._lock:
            running.source, running.failed, running.failed_at = None, why, time.monotonic()
            running.starting = False
        self.nudge()

    def _retry_failed(self) -> None:
        now = time.monotonic()
        if self.listener is None and now - self._listener_tried >= SOURCE_RETRY:
            self._ensure_listener(r.registration for r in self.running.values())
        for running in self.running.values():
            if (running.source is None and not running.starting
                    and now - running.failed_at >= SOURCE_RETRY):
                self._open(running)

    def _stop(self, name: str) -> None:
        running = self.running.pop(name)
        with self._lock:
            running.stopped = True
        if running.source is not None:
            try:
                running.source.stop()
            except Exception:  # noqa: BLE001 - stopping one must not keep the others running
                pass
        running.gate.close(flush=True)

    def _ensure_listener(self, registrations) -> None:
        """The shared HTTP listener runs while at least one webhook trigger is registered."""
        wanted = any(r.type == "webhook" for r in registrations)
        if wanted and self.listener is None:
            self._listener_tried = time.monotonic()
            from reconciler.triggers.webhook import Listener

            listener = Listener(*self.listen)
            try:
                listener.start()
            except OSError as exc:
                self.listener_problem = f"cannot listen on {self.listen[0]}:{self.listen[1]}: {exc.strerror or exc}"
                return
            self.listener, self.listener_problem = listener, ""
        elif not wanted and self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.listener is not None:
            self._context.listener = self.listener

    def _pending(self, name: str) -> bool:
        running = self.running.get(name)
        return running is not None and running.gate.pending() is not None

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        triggers = {}
        for name, running in self.running.items():
            triggers[name] = {**self._describe(running), **running.gate.counts.as_json(),
                              "digest": running.registration.digest}
        for name, broken in self.broken.items():
            triggers[name] = {"state": "error", "detail": broken.problem, "digest": broken.digest}
        listen = None
        if self.listener is not None:
            listen = f"{self.listen[0]}:{self.listener.port}"
        return {
            "format": STATUS_FORMAT,
            "pid": os.getpid(),
            "startedAt": _iso(self.started_at),
            "listen": listen,
            "listenError": self.listener_problem or None,
            "heartbeatSeconds": self.heartbeat,
            "triggers": dict(sorted(triggers.items())),
        }

    @staticmethod
    def _describe(running: Running) -> dict:
        registration = running.registration
        if not registration.enabled:
            state = Status("disabled", "enabled: false in its manifest")
        elif running.starting:
            state = Status("starting", "its source is still starting")
        elif running.source is None:
            state = Status("error", f"could not start: {running.failed}; retried every {SOURCE_RETRY:g}s")
        else:
            state = running.source.status()
        held = running.gate.debouncing()
        detail = state.detail
        if held:
            detail = f"{detail}; {held} event(s) held by debounce" if detail else f"{held} event(s) held by debounce"
        return {"type": registration.type, "agent": registration.agent, "task": registration.task,
                "state": state.state, "detail": detail}

    def write_status(self, final: bool = False) -> None:
        status = self.status()
        if final:
            status["stoppedAt"] = _iso(time.time())
        # Compared compactly (json's C encoder; `indent` takes the pure-Python one), written
        # indented, and only when it changed or a heartbeat is due.
        text = json.dumps(status, sort_keys=True, separators=(",", ":"))
        now = time.monotonic()
        if not final and text == self._last_status and now - self._status_written < self.heartbeat:
            return
        status["updatedAt"] = _iso(time.time())
        self._status_tried = now
        try:
            self.device.makedirs(STATUS_FILE.rsplit("/", 1)[0], mode=0o755)
            self.device.replace(STATUS_FILE, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode())
        except (OSError, SposError):
            return  # shown as a stale status; the triggers themselves go on
        self._last_status, self._status_written = text, now


class _Watch:
    """inotify on the registrations directory; until that exists, on the nearest directory
    above it, for the next one on the way to appear. Whatever it reports, the loop lists the registrations again; when the watched
    directory itself goes (deleted, moved, replaced) or events were lost, the watch is set up
    afresh before the loop sleeps again. None from `arm()`: nothing can be watched (no
    inotify, no state directory, a link on the way): the loop lists every reload_interval."""

    def __init__(self, device: Device):
        self.device = device
        self.inotify = None
        self.awaited: str | None = None  # watching a directory above, for this entry to appear
        self.renewed = False  # set whenever a watch is set up; the loop then lists at once
        self.watched: tuple[str, int, int] | None = None  # path, device and inode watched

    def arm(self) -> int | None:
        """The fd to wait on, watching afresh if need be: also when the watched directory is
        no longer the one at its path (a directory above it was moved or replaced, which
        inotify does not report)."""
        if self.inotify is not None:
            path, dev, ino = self.watched
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    return self.inotify.fd
            except OSError:
                pass
            self.close()
        from reconciler.triggers import filesystem as fs

        try:
            directory = self.device.host(TRIGGERS_DIR)
            inotify = fs.Inotify()
        except (OSError, SposError, fs.WatchFailed):
            return None
        flags = fs.IN_ONLYDIR | fs.IN_DONT_FOLLOW | fs.IN_DELETE_SELF | fs.IN_MOVE_SELF
        registrations = (fs.IN_CREATE | fs.IN_DELETE | fs.IN_MODIFY | fs.IN_CLOSE_WRITE
                         | fs.IN_MOVED_FROM | fs.IN_MOVED_TO)
        appearing = fs.IN_CREATE | fs.IN_MOVED_TO
        # The registrations directory, else the nearest directory above it (up to the root),
        # for the next directory on the way to appear.
        path, awaited, mask = directory, None, registrations
        top = str(self.device.root)
        while True:
            try:
                st = os.lstat(path)  # before the watch: a later replacement shows as a change
                if inotify.add_watch(path, mask | flags) is not None:
                    self.inotify, self.awaited, self.renewed = inotify, awaited, True
                    self.watched = (path, st.st_dev, st.st_ino)
                    return inotify.fd
            except (OSError, fs.WatchFailed):
                pass
            if path == top or os.path.dirname(path) == path:
                break
            path, awaited, mask = os.path.dirname(path), os.path.basename(path), appearing
        inotify.close()
        return None

    def drain(self) -> bool:
        """Read what was reported: whether it concerns the registrations. The watch is dropped
        when it has to be set up afresh (its directory gone, events lost, or the registrations
        directory made where only its parent was watched)."""
        from reconciler.inotify import IN_Q_OVERFLOW, WATCH_GONE

        events = self.inotify.read()
        if any(event.mask & (WATCH_GONE | IN_Q_OVERFLOW) for event in events):
            self.close()
            return True
        if self.awaited is not None:
            if not any(event.name == self.awaited for event in events):
                return False  # another entry of the directory above
            self.close()  # watched afresh, one level nearer (or the registrations themselves)
        return bool(events)

    def pending(self) -> bool:
        """Whether something was reported that `drain()` has not read yet."""
        return self.inotify is not None and self.inotify.readable(0)

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


def _below(root: str):
    """Device path -> host path, following links: the paths a trigger names are the operator's
    to choose, and a link is often the right name (/dev/serial/by-id/…). The reconciler's own
    files are written through Device, which refuses links."""
    if root in ("", "/"):
        return lambda path: path
    return lambda path: os.path.join(root, path.lstrip("/"))


def read_status(device: Device) -> dict | None:
    """The status a daemon last wrote, or None when none did (or it is unreadable). Its
    `triggers` is always name -> object: entries of another shape (a hand edit) are dropped
    here, for every reader."""
    status = read_json_object(device, STATUS_FILE)
    if status is not None:
        status["triggers"] = objects_by_name(status.get("triggers"))
    return status


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
