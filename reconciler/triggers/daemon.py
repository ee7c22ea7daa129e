"""`spos triggers`: load the registrations, run a source per trigger, follow changes.

The daemon looks at the registrations directory every `reload_interval` (a listing and one
stat per file). A registration whose file content changed is stopped and started again; one
that disappeared is stopped; a new one is started. Every other trigger keeps running through a
reload: its inotify watches, serial port, broker connection and webhook route stay as they are,
so no event of an unchanged trigger is dropped. A debounce window open on a trigger that is
stopped is queued at once, not lost.

The daemon's own state (status, seen delivery ids) lives in `<state>/triggerd/`; the
registrations are the reconciler's and are only read. The status file is written atomically
whenever something `spos trigger list` shows has changed, and at least every STATUS_HEARTBEAT
seconds, so a reader can tell a live daemon from one that died.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from reconciler import STATE_DIR, TRIGGERS_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.state import read_json_object
from reconciler.triggers.base import Context, Registration, Source, Status
from reconciler.triggers.gate import Gate

STATUS_FILE = f"/{STATE_DIR}/triggerd/status.json"
STATUS_FORMAT = 1
STATUS_HEARTBEAT = 10.0
"""Seconds between status writes when nothing changed."""
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
                 metrics=None, reload_interval: float = 0.5):
        self.device = device
        self.listen = listen
        self.metrics = metrics
        self.reload_interval = reload_interval
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
        self._status_written = 0.0
        self._context = Context(host=_below(str(device.root)), metrics=metrics, pending=self._pending)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM/SIGINT (or `stop()`): follow the registrations, keep status current."""
        self._handle_signals()
        try:
            while not self.stopping.is_set():
                self.step()
                self.stopping.wait(self.reload_interval)
        finally:
            self.shutdown()

    def step(self) -> None:
        """One pass: reload what changed, retry sources that failed, write the status."""
        files = self._registration_files()
        if files != self._seen_files:
            self._seen_files = files
            self.reload(files)
        self._retry_failed()
        self.write_status()

    def stop(self) -> None:
        self.stopping.set()

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
            source.start()
        except Exception as exc:  # one trigger that cannot start never stops the others
            self._failed(running, str(exc) or repr(exc))
            return
        with self._lock:
            running.starting = False
            if not running.stopped:
                running.source, running.failed = source, ""
                return
        source.stop()  # it was stopped (a reload, SIGTERM) while it was starting

    def _failed(self, running: Running, why: str) -> None:
        with self._lock:
            running.source, running.failed, running.failed_at = None, why, time.monotonic()
            running.starting = False

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
        text = json.dumps(status, indent=2, sort_keys=True)
        now = time.monotonic()
        if not final and text == self._last_status and now - self._status_written < STATUS_HEARTBEAT:
            return
        status["updatedAt"] = _iso(time.time())
        try:
            self.device.makedirs(STATUS_FILE.rsplit("/", 1)[0], mode=0o755)
            self.device.write_atomic(STATUS_FILE, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode())
        except (OSError, SposError):
            return  # shown as a stale status; the triggers themselves go on
        self._last_status, self._status_written = text, now


def _below(root: str):
    """Device path -> host path, following links: the paths a trigger names are the operator's
    to choose, and a link is often the right name (/dev/serial/by-id/…). The reconciler's own
    files are written through Device, which refuses links."""
    if root in ("", "/"):
        return lambda path: path
    return lambda path: os.path.join(root, path.lstrip("/"))


def read_status(device: Device) -> dict | None:
    """The status a daemon last wrote, or None when none did (or it is unreadable)."""
    return read_json_object(device, STATUS_FILE)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
