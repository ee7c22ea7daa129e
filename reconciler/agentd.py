"""`spos daemon`: the always-on GitOps agent of a device.

One process keeps the device converged and runs its work:

- **sync** every `interval` plus a random share of `jitter` (so a fleet does not hit the
  remote at the same second): fetch, verify, validate, plan, apply (sync.py);
- **drift repair** every `drift_interval` between syncs: the applied revision planned again
  without fetching, and what differs applied, each repair recorded (sync.repair_drift);
- the **executor** and the **trigger daemon** as supervised child processes (`spos executor`,
  `spos triggers`): one that exits is started again after a backoff that doubles from 1 s up
  to a minute, and resets once a child has run for a minute.

SIGTERM or SIGINT: no new sync starts, the children get SIGTERM (the executor drains its
active runs), and the daemon exits once they have (killing them after `stop_timeout`).
After every cycle `daemon.json` in the state directory is written atomically: the children,
when the next sync is due, what the last cycle did (docs/sync.md, `spos status`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from reconciler import STATE_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.state import read_json_object
from reconciler.sync import SyncOptions, now_iso, repair_drift, sync

STATUS_FILE = f"/{STATE_DIR}/daemon.json"
STATUS_FORMAT = 1
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 60.0, 60.0
"""A child that exits is started again after BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX;
one that ran HEALTHY_AFTER seconds starts the count afresh."""
STATUS_HEARTBEAT = 30.0
"""Seconds between status writes when nothing changed."""
SUPERVISE_EVERY = 1.0
"""How often children are looked at while nothing else is due."""


@dataclass
class Child:
    """A supervised child process: `spos executor` or `spos triggers`."""

    name: str
    argv: list[str]
    log_path: str
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    due: float = 0.0
    last_exit: dict | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the daemon reaches it once, via us
            )
        self.started = time.monotonic()

    def check(self, now: float) -> None:
        """Start it when due; note an exit and schedule the restart."""
        if self.process is None:
            if now >= self.due:
                self.start()
            return
        code = self.process.poll()
        if code is None:
            return
        ran = now - self.started
        self.last_exit = {"at": now_iso(), "code": code, "ranSeconds": round(ran, 1)}
        self.process = None
        self.restarts += 1
        if ran >= HEALTHY_AFTER:
            self.backoff = BACKOFF_FIRST
        self.due = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def stop(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def to_json(self) -> dict:
        running = self.process is not None and self.process.poll() is None
        return {"running": running, "pid": self.process.pid if running else None,
                "restarts": self.restarts, "lastExit": self.last_exit, "log": self.log_path}


@dataclass
class DaemonSettings:
    interval: float = 60.0
    jitter: float = 10.0
    drift_interval: float = 60.0
    stop_timeout: float = 30.0
    children: tuple[str, ...] = ("executor", "triggers")
    child_args: dict[str, list[str]] = field(default_factory=dict)


class Daemon:
    def __init__(self, root: str, options: SyncOptions, settings: DaemonSettings,
                 log=lambda text: print(text, file=sys.stderr, flush=True)):
        self.device = Device(root)
        self.root = str(self.device.root)
        self.options = options
        self.settings = settings
        self.log = log
        self.stopping = threading.Event()
        self.started_at = now_iso()
        self.children = [self._child(name) for name in settings.children]
        self.next_sync = 0.0
        self.next_sync_at = time.time()
        self.next_drift = 0.0
        self._written: tuple[str, float] | None = None
        self.last_sync: dict | None = None
        self.last_drift: dict | None = None

    def _child(self, name: str) -> Child:
        logs = self.device.host(f"/{STATE_DIR}/logs")
        os.makedirs(logs, mode=0o755, exist_ok=True)
        argv = [sys.executable, "-m", "reconciler", name, "--root", self.root,
                *self.settings.child_args.get(name, [])]
        return Child(name, argv, os.path.join(logs, f"{name}.log"))

    def run(self) -> None:
        self._handle_signals()
        try:
            while not self.stopping.is_set():
                self.cycle()
                self.stopping.wait(self._sleep())
        finally:
            self.shutdown()

    def cycle(self) -> None:
        """Whatever is due now: supervise the children, sync, or check for drift."""
        now = time.monotonic()
        for child in self.children:
            child.check(now)
        if now >= self.next_sync:
            self._sync()
            now = time.monotonic()
            wait = self.settings.interval + random.uniform(0, self.settings.jitter)
            self.next_sync, self.next_sync_at = now + wait, time.time() + wait
            self.next_drift = now + self.settings.drift_interval
        elif now >= self.next_drift:
            self._repair_drift()
            self.next_drift = time.monotonic() + self.settings.drift_interval
        self.write_status()

    def _sync(self) -> None:
        try:
            result = sync(self.root, self.options)
        except SposError as exc:  # the lock held too long, the state unwritable: try next time
            self.last_sync = {"at": now_iso(), "outcome": "failed", "message": str(exc)}
        else:
            self.last_sync = {"at": now_iso(), **result.to_json()}
        self.log(f"spos daemon: sync {self.last_sync['outcome']}: {self.last_sync['message']}")

    def _repair_drift(self) -> None:
        try:
            check = repair_drift(self.root, self.options)
        except SposError as exc:
            check = {"at": now_iso(), "error": str(exc)}
        if check is None:
            return
        self.last_drift = check
        for rid in check.get("repaired", []):
            self.log(f"spos daemon: drift repaired: {rid}")
        for failure in check.get("failed", []):
            self.log(f"spos daemon: drift not repaired: {failure['id']}: {failure['error']}")
        if check.get("error"):
            self.log(f"spos daemon: drift check failed: {check['error']}")

    def _sleep(self) -> float:
        now = time.monotonic()
        due = [self.next_sync, self.next_drift, now + SUPERVISE_EVERY]
        due += [child.due for child in self.children if child.process is None]
        return max(0.0, min(due) - now)

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.children:
            child.stop(self.settings.stop_timeout)
        self.write_status(final=True)

    def _handle_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop())

    def status(self) -> dict:
        return {
            "format": STATUS_FORMAT,
            "pid": os.getpid(),
            "startedAt": self.started_at,
            "repo": {"branch": self.options.branch, "path": self.options.path},
            "intervalSeconds": self.settings.interval,
            "jitterSeconds": self.settings.jitter,
            "driftIntervalSeconds": self.settings.drift_interval,
            "nextSyncAt": _iso(self.next_sync_at),
            "lastSync": self.last_sync,
            "lastDriftCheck": self.last_drift,
            "children": {child.name: child.to_json() for child in self.children},
        }

    def write_status(self, final: bool = False) -> None:
        """Atomically, when something in it changed, and at least every STATUS_HEARTBEAT
        seconds so that a reader can tell a live daemon from a dead one."""
        status = self.status()
        text, now = json.dumps(status, sort_keys=True), time.monotonic()
        if not final and self._written and self._written[0] == text \
                and now - self._written[1] < STATUS_HEARTBEAT:
            return
        status["updatedAt"] = now_iso()
        if final:
            status["stoppedAt"] = status["updatedAt"]
        try:
            self.device.write_atomic(STATUS_FILE, (json.dumps(status, indent=2) + "\n").encode())
        except (OSError, SposError):
            return  # `spos status` then shows it as stale; the work goes on
        self._written = (text, now)


def read_status(device: Device) -> dict | None:
    return read_json_object(device, STATUS_FILE)


def _iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
