"""`spos daemon`: the always-on GitOps agent of a device.

One process keeps the device converged and runs its work:

- **sync** every `interval` plus a random share of `jitter` (so a fleet does not hit the
  remote at the same second): fetch, verify, validate, plan, apply (sync.py);
- **drift repair** every `drift_interval` between syncs: the applied revision planned again
  without fetching, and what differs applied, each repair recorded (sync.repair_drift);
- a **load sample** every 5 minutes, for `spos schedule suggest` (loadlog.py);
- the **executor** and the **trigger daemon** as supervised child processes (`spos executor`,
  `spos triggers`): one that exits is started again after a backoff that doubles from 1 s up
  to a minute, and resets once a child has run for a minute. The children are watched by a
  thread of their own, woken by a child's exit (a pidfd), so a sync that takes minutes (a
  slow fetch) does not keep the executor down.

SIGTERM, SIGINT or SIGHUP: the children get SIGTERM at once (the executor drains its active
runs), no new sync starts, and the daemon exits once the sync going on (if any) has ended and the
children have; after `stop_timeout` each child's whole process group is killed. Nothing a
sync or drift check raises ends the daemon: it is reported in the status and tried again.
After every cycle `daemon.json` in the state directory is written atomically: the children,
when the next sync is due, what the last cycle did (docs/sync.md, `spos status`).
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from reconciler import STATE_DIR, loadlog
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.state import hold_alone, objects_by_name, read_json_object
from reconciler.sync import SyncOptions, now_iso, repair_drift, sync

STATUS_FILE = f"/{STATE_DIR}/daemon.json"
LOCK_FILE = f"/{STATE_DIR}/daemon.lock"
STATUS_FORMAT = 1
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 60.0, 60.0
"""A child that exits is started again after BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX;
one that ran HEALTHY_AFTER seconds starts the count afresh."""
STATUS_HEARTBEAT = 30.0
"""Seconds between status writes when nothing changed."""
TICK = 1.0
"""How often the main loop looks for work while no sync or drift check is due."""
POLL_CHILDREN = 0.25
"""How often the children are looked at where the kernel has no pidfds (before Linux 5.3)."""


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
    terminated: bool = False
    pidfd: int | None = None
    """Readable once the process has exited; None where the kernel has no pidfds."""

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.log_path), mode=0o755, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the daemon reaches it once, via us
            )
        self.started, self.terminated = time.monotonic(), False
        try:  # the pid cannot be another process's yet: only we reap it
            self.pidfd = os.pidfd_open(self.process.pid)
        except OSError:
            self.pidfd = None

    def check(self, now: float) -> None:
        """Start it when due; note an exit and schedule the restart."""
        if self.process is None:
            if now >= self.due:
                try:
                    self.start()
                except OSError as exc:  # fork refused, its log directory gone: try again later
                    self.last_exit = {"at": now_iso(), "code": None, "ranSeconds": 0,
                                      "error": f"could not start: {exc.strerror or exc}"}
                    self.restarts += 1
                    self.due = now + self.backoff
                    self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            return
        code = self.process.poll()
        if code is None:
            return
        ran = now - self.started
        self.last_exit = {"at": now_iso(), "code": code, "ranSeconds": round(ran, 1)}
        self.process = None
        self._close_pidfd()
        self.restarts += 1
        if ran >= HEALTHY_AFTER:
            self.backoff = BACKOFF_FIRST
        self.due = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def terminate(self) -> None:
        """SIGTERM, once: a second one could reach it while it is already shutting down."""
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, deadline: float) -> None:
        """Wait until `deadline` (monotonic) for it to end after SIGTERM, then kill its whole
        process group (it is a session leader: what it started goes too)."""
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

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
        self.lock = threading.RLock()
        """Held to change or read the children, and to write the status: the supervisor
        thread does both while the main thread syncs. Re-entrant, as a signal handler in the
        main thread may take it while the main thread holds it."""
        self._wake: int | None = None
        """An eventfd that wakes the supervisor thread; open while `run` runs."""
        self._supervisor = threading.Thread(target=self._supervise, name="spos-supervisor", daemon=True)
        self._supervisor.fork_safe = True
        """A sync may fork a child that parses manifests (pipeline._forkable) while this thread
        runs. It takes no lock that child uses: it imports only modules loaded already, writes
        to stderr only to report its own failure (the child writes nothing), and its own locks
        (`lock`, its children's Popen objects') are not the child's."""
        self.load = loadlog.Sampler(self.device, log)
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
        """Until SIGTERM/SIGINT. Raises state.AlreadyServed, before anything else, when another
        `spos daemon` serves the device: two would sync twice and each start its children."""
        lock = hold_alone(self.device, LOCK_FILE, "spos daemon")
        try:
            self._handle_signals()
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self._supervisor.start()
                while not self.stopping.is_set():
                    self.cycle()
                    self.stopping.wait(self._sleep())
            finally:
                self.shutdown()
        finally:
            os.close(lock)
            wake, self._wake = self._wake, None  # a signal from here on wakes nothing
            if wake is not None:
                os.close(wake)

    def _supervise(self) -> None:
        """The supervisor thread: start each child when due and note its exit as it happens,
        until the daemon stops. A child is never started once `stopping` is set: that is read
        under the lock `stop` takes to terminate the children. What it raises is reported and
        the children are looked at again a second later, as a sync's failure is."""
        while True:
            try:
                waiting = self._supervise_once()
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the children unwatched
                self.log(f"spos daemon: supervising the children failed: {type(exc).__name__}: {exc}")
                waiting = ([], TICK)
            if waiting is None:
                return
            watched, timeout = waiting
            poller = select.poll()
            for fd in (self._wake, *watched):
                poller.register(fd, select.POLLIN)
            ready = poller.poll(None if timeout is None else math.ceil(timeout * 1000))  # ms, not early
            if any(fd == self._wake for fd, _ in ready):
                os.eventfd_read(self._wake)

    def _supervise_once(self) -> tuple[list[int], float | None] | None:
        """Each child started or its exit noted, as due; then the pidfds to wait on and for how
        long at most (seconds, None for ever); None once the daemon stops."""
        with self.lock:
            if self.stopping.is_set():
                return None
            now = time.monotonic()
            for child in self.children:
                child.check(now)
            watched = [child.pidfd for child in self.children if child.pidfd is not None]
            due = [max(0.0, child.due - now) for child in self.children if child.process is None]
            if any(child.process is not None and child.pidfd is None for child in self.children):
                due.append(POLL_CHILDREN)
        self.write_status()
        return watched, min(due, default=None)

    def cycle(self) -> None:
        """Whatever is due now: a load sample, a sync, or a drift check (the children are
        the supervisor thread's)."""
        now = time.monotonic()
        if self.stopping.is_set():
            return
        self.load.tick()
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
        except Exception as exc:  # noqa: BLE001 - the lock held too long, a full disk, a bug: the
            # daemon goes on, reports it, and tries again at the next interval
            self.last_sync = {"at": now_iso(), "outcome": "failed",
                              "message": f"{type(exc).__name__}: {exc}"}
        else:
            self.last_sync = {"at": now_iso(), **result.to_json()}
        self.log(f"spos daemon: sync {self.last_sync['outcome']}: {self.last_sync['message']}")

    def _repair_drift(self) -> None:
        try:
            check = repair_drift(self.root, self.options)
        except Exception as exc:  # noqa: BLE001 - as for a sync: reported, tried again
            check = {"at": now_iso(), "error": f"{type(exc).__name__}: {exc}"}
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
        return max(0.0, min(self.next_sync, self.next_drift, now + TICK) - now)

    def stop(self) -> None:
        """No new sync starts; the children are told at once, so the executor starts draining
        even while a sync (a slow fetch) is still going."""
        self.stopping.set()
        with self.lock:
            for child in self.children:
                child.terminate()
        self._wake_supervisor()
        from reconciler import gitsync, state

        gitsync.abort()  # a fetch hanging on the remote ends now; the sync reports it failed
        state.stop_waiting()  # and so does a wait for the apply lock

    def shutdown(self) -> None:
        self.stopping.set()
        self._wake_supervisor()
        if self._supervisor.is_alive():
            self._supervisor.join()
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + self.settings.stop_timeout
        for child in self.children:
            child.stop(deadline)
        self.write_status(final=True)

    def _wake_supervisor(self) -> None:
        if self._wake is not None:
            os.eventfd_write(self._wake, 1)

    def _handle_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # SIGHUP too: its default action would end the daemon at once, leaving its
            # children (each in a session of its own) running without it
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        with self.lock:
            status = self.status()
            text, now = json.dumps(status, sort_keys=True), time.monotonic()
            if not final and self._written and self._written[0] == text \
                    and now - self._written[1] < STATUS_HEARTBEAT:
                return
            status["updatedAt"] = now_iso()
            if final:
                status["stoppedAt"] = status["updatedAt"]
            try:
                self.device.replace(STATUS_FILE, (json.dumps(status, indent=2) + "\n").encode())
            except (OSError, SposError):
                return  # `spos status` then shows it as stale; the work goes on
            self._written = (text, now)


def read_status(device: Device) -> dict | None:
    """The status the daemon last wrote, or None. Its `children` is always name -> object:
    entries of another shape (a hand edit) are dropped here, for every reader."""
    status = read_json_object(device, STATUS_FILE)
    if status is not None:
        status["children"] = objects_by_name(status.get("children"))
    return status


def _iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
