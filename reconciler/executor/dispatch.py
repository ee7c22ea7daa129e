"""The executor's loop: claim queued runs, supervise them, record how they ended.

One thread, one `selectors` loop. It sleeps until something happens: a message on the wake
pipe (`spos action run` writes the agent's name after enqueueing), output or progress from a
run, a run's process exiting (pidfd), or the next deadline (a timeout, the end of a grace
period, a retry becoming due), or inotify reporting a record renamed into an agent's queue
(queuewatch.py: a run queued without a message on the pipe is seen at once). A periodic rescan
(every 5 minutes; every 30 s at most while some queue is not watched) catches whatever both
missed, so a deleted wake pipe or an executor that was down only delays work. Idle, it uses no
CPU.

Delivery is at-least-once: a run found in `active/` whose executor is gone is run again, with
the attempt counted and its checkpoint handed over (unless the task turns checkpoints off).

A state file system that refuses a write (full, over quota, failing, read-only) fails the run
whose log or record it was, never the executor. A run is claimed only with room set aside for
recording its end (RunStore.reserve); an end that still cannot be written leaves the run in
`active/`, its processes stopped, and is written again every STORAGE_RETRY seconds, or by the
next executor's recovery if this one stops first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import selectors
import signal
import stat
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

from reconciler import AGENT_CONFIG, AGENTS_DIR, STATE_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.executor import cancel, network, prepared, provenance, storage
from reconciler.executor.config import ConfigError, read_agent_config, task_config
from reconciler.executor.enqueue import (ATTACHMENTS_DIR, WAKE_OVERFLOW, WAKE_PIPE, attachments_dir, enqueue,
                                        trigger_env, woken_agents, write_attachments)
from reconciler.executor.owner import alive, identity
from reconciler.executor.prepared import PreparedPool
from reconciler.executor.queuewatch import QueueWatch
from reconciler.executor.retention import PeriodicCleanup, remove_tree
from reconciler.executor.runs import (RUN_FILE, TERMINAL_BUCKET, CorruptRecord, Listings, Run, RunStore,
                                      storage_failure)
from reconciler.executor.sandbox import Limits, SandboxError, SandboxSpec, adopt_orphans, reap_orphans
from reconciler.executor.supervise import (
    DEFAULT_LOG_BYTES, DEFAULT_PATH, ActiveRun, LogWriter, now_iso, run_dirs, steps_of,
)
from reconciler.numbers import amount

DEFAULT_RETRY_CAP = 300.0
ELSEWHERE_CHECK = 0.2
"""How often `action execute` looks at a run whose retry another executor took."""
STORAGE_RETRY = 2.0
"""Seconds between tries of a write the state file system refused: a claim, the end of a run."""
CANCEL_CHECK = 1.0
"""With runs active, cancel requests are looked for after every wake-up (a request comes with
one) and at least this often, so that one reaches its run when no wake-up did (`spos action
execute` reads no wake pipe). Not on every turn of the loop: a run's output wakes it often."""
REPLACE_RECHECK = 0.25
"""How often a queued run of a Replace (or Queue) task looks again whether the runs it replaces
(or waits for) in other processes have ended."""
SETTLE_WAIT = 0.05
"""After a step's main process exited, how long the loop waits (doing other work meanwhile)
for the rest of its cgroup to exit by itself before `SandboxedRun.settle` kills it."""
WAKE_READS = 4
"""Reads of the wake pipe per turn of the loop: writers that keep it full cannot hold the loop
(timeouts, exits) in one drain."""
WAKE_AGENTS = 256
"""Agents named by wake-ups and not listed yet (every slot busy) beyond which every queue is
listed instead."""
RESCAN_UNWATCHED = 30.0
"""The longest time between rescans while some agent's queue is not watched (no inotify, or
its watch limit reached)."""


@dataclass
class Settings:
    max_parallel: int = 4
    max_per_agent: int = 2
    grace: float = 10.0
    rescan: float = 300.0  # while every queue is watched; RESCAN_UNWATCHED at most otherwise
    save_interval: float = 1.0
    cleanup_interval: float = 3600.0  # retention passes (retention.py); 0: none
    storage_interval: float = 5.0  # how often an agent's storage is measured while it runs
    prepared: int = 4  # sandboxes kept prepared for recently active agents (prepared.py); 0: none
    prepared_idle: float = 600.0  # an unused prepared sandbox is closed after this


@dataclass
class Ahead:
    """What a run's start needs that is worked out before its claim, outside the claim lock."""

    network: tuple = (False, None)  # (host network?, egress rules), network.setup_for
    over_quota: str | None = None  # why the agent is over its storage quota


class Early(NamedTuple):
    """A run's first step as `Executor._hand_over` left it: its spec, and its start in a
    prepared sandbox, held until the run's log and attachments are written (None without)."""

    spec: SandboxSpec
    started: tuple | None


class Executor:
    def __init__(self, device: Device, sandbox, settings: Settings | None = None):
        self.device = device
        self.store = RunStore(device, Listings(device))
        self.provenance = provenance.Provenance(device)
        self.sandbox = sandbox
        self.settings = settings or Settings()
        self.selector = selectors.DefaultSelector()
        self.active: dict[str, ActiveRun] = {}
        self.storage_measured: dict[str, tuple[float, str | None]] = {}  # agent -> (when, why over)
        self.stopping = False
        self.identity = identity()
        self.wake_fd = -1
        self.watch: QueueWatch | None = None  # serve() watches the queues
        self.watch_problem_said: str | None = None
        self.wake_inode: tuple[int, int] | None = None
        self.signal_pipe: tuple[int, int] | None = None
        self.next_rescan = 0.0
        self.next_cancel_check = 0.0
        self.queue_changed = True  # the queue is looked at only after something changed it
        # What is queued, as last listed: agent -> queue file names. Only the queues that a
        # wake-up names are listed again (all of them on the rescan), not every agent's for
        # every enqueue: that cost as much as the device has agents.
        self.queued: dict[str, set[str]] = {}
        self.list_all = True
        self.list_agents: set[str] = set()
        self.retry_due: float | None = None
        self.unrecorded: dict[str, tuple[Run, str]] = {}  # ended runs whose end is still to be written
        self.storage_retry_at: float | None = None
        self.prepared: PreparedPool | None = None  # serve() keeps sandboxes prepared
        self._asked_to_adopt = False  # _adopt_orphans ran (once per executor)
        self.refused_said: set[str] = set()  # RunStore.refused, said on stderr

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, once: bool = False) -> None:
        """Run until stopped (SIGTERM/SIGINT drain: no new claims, active runs finish). With
        `once`, return as soon as nothing is queued and nothing is running."""
        self._install_signal_handlers()
        self._adopt_orphans()
        try:
            self._open_wake_pipe()
            self._watch_queues()
            if not once and self.settings.prepared > 0:
                self.prepared = PreparedPool(self.sandbox, self.device.cgroups.parent,
                                             self.settings.prepared, self.settings.prepared_idle)
            self.recover()
            self.queue_changed = True  # what was queued while no executor listened
            cleanup = PeriodicCleanup(self.device, self.settings.cleanup_interval)
            while True:
                if not self.stopping:
                    started_any = self.dispatch()
                    cleanup.run_if_due()
                else:
                    started_any = False
                if len(self.store.refused) > len(self.refused_said):
                    self._say_refused()
                if (self.stopping and not self.active) or (
                        once and not self.active and not started_any and not self._queued_anything()):
                    self._record_pending()  # a last try; what is left, the next executor recovers
                    return
                if self.prepared is not None:
                    self._keep_prepared()
                self._wait(self._timeout(once))
                self._enforce_deadlines()
        finally:
            for active in list(self.active.values()):
                self._stop_run(active, "executor stopped")
            if self.prepared is not None:
                self.prepared.close()
            if self.sandbox is not None:
                self.sandbox.networks.close()
            self._close_wake_pipe()
            self._close_signal_pipe()
            if self.watch is not None:
                self._unregister(self.watch.fd)
                self.watch.close()

    def _adopt_orphans(self) -> None:
        """Reap, here, what the sandboxes leave behind (sandbox.adopt_orphans); said on stderr
        when the kernel refuses, as each run's init is then left to the system's init."""
        if self._asked_to_adopt:
            return
        self._asked_to_adopt = True
        problem = adopt_orphans()
        if problem:
            print(f"spos executor: ended runs' processes are left to pid 1 to reap, and count "
                  f"against their agents' tasks limits until then: {problem}", file=sys.stderr)

    def _say_refused(self) -> None:
        """Say once, on stderr, each agent's directory or bucket passed over (a link, or not a
        directory): nothing in it runs until it is repaired, and every other agent is served."""
        for path, why in self.store.refused.items():
            if path not in self.refused_said:
                self.refused_said.add(path)
                print(f"spos executor: passing over {path}: {why}", file=sys.stderr)

    def _keep_prepared(self) -> None:
        """Between events: close prepared sandboxes unused for too long, and, when no queued
        run is waiting for a turn of the loop, prepare one (the loop comes back at once while
        more are due). Never while stopping."""
        self.prepared.expire(time.monotonic())
        if self.stopping:
            self.prepared.close()
        elif not self.queue_changed:
            self.prepared.fill(self._idle)

    def execute(self, run_id: str, agent: str, timeout: float | None = None) -> dict:
        """Run one run this process already owns (in active/) in the foreground, retries
        included, and return its final record (`spos action execute`)."""
        self._install_signal_handlers()
        self._adopt_orphans()
        try:
            while True:
                run = self.store.load(agent, "active", _name_of(self.store, agent, "active", run_id))
                config, raw = read_agent_config(self.device, agent)
                task = task_config(config, run.record.get("task"))
                if timeout is not None:
                    task = {**task, "timeoutSeconds": timeout}
                if run.record.get("attempt", 1) == 1 and not self._take_turn(run, task):
                    return run.record
                _refused(self.store.reserve, run)  # `enqueue(claim=True)` set none aside
                self._start(run, config, raw, task)
                while run_id in self.active:
                    if self.stopping:
                        for active in list(self.active.values()):
                            self._cancel(active, "interrupted")
                    deadline = min(a.next_deadline(self.settings.grace) for a in self.active.values())
                    self._wait(max(0.0, min(CANCEL_CHECK, deadline - time.monotonic())))
                    self._enforce_deadlines()
                if run.bucket != "queue":
                    return run.record
                # The retry's backoff; a signal ends the wait, and so does the run leaving
                # queue/ (`action cancel`, or an executor that took it), looked at every second
                # as this process reads no wake pipe.
                while not self.stopping:
                    delay = (_epoch(run.record.get("notBefore")) or 0) - time.time()
                    if delay <= 0 or not self.device.exists(run.path):
                        break
                    self._wait(min(delay, CANCEL_CHECK))
                if self.stopping:
                    self._end_unstarted(run, "cancelled", "interrupted while waiting to retry")
                    return run.record
                if not self._claim(run):
                    return self._ended_elsewhere(run)
        finally:
            self._record_pending()
            self._close_signal_pipe()

    def _ended_elsewhere(self, run: Run) -> dict:
        """The record of a run whose retry an executor claimed while `action execute` waited
        for it (the retry was in queue/, where any executor may take it): its final record once
        that executor ended it, so that execute's exit code is the run's, not the failed
        attempt's. A signal ends the wait with the record as it stands."""
        while True:
            found = self.store.find(run.id, run.agent)
            if found is None or found.bucket in ("completed", "failed") or self.stopping:
                return (found or run).record
            self._wait(ELSEWHERE_CHECK)

    def _take_turn(self, run: Run, task: dict) -> bool:
        """`action execute`, which owns its run from the start, honours concurrency too:
        Forbid ends it as skipped while another run of the task is active in a live process,
        Replace asks those runs to stop and waits until they ended, Queue waits for them. False
        when the run ended without starting (skipped, or interrupted while waiting)."""
        policy = run.record.get("concurrency") or task.get("concurrency", "Forbid")
        asked: set[str] = set()
        while policy != "Allow":
            others = [o for o in self._active_elsewhere(run.agent, run.record.get("task"))
                      if o.id != run.id]
            if not others:
                break
            if policy == "Forbid":
                return self._end_owned(run, "skipped",
                                       f"concurrency Forbid: run {others[0].id} of this task is active")
            if policy == "Replace":
                with self.store.locked():
                    for other in others:
                        if other.id not in asked:
                            cancel.ask(self.store, other, f"replaced by run {run.id} (concurrency Replace)")
                            asked.add(other.id)
            if self.stopping:
                return self._end_owned(run, "cancelled", f"interrupted while waiting for run {others[0].id} to end")
            self._wait(REPLACE_RECHECK)
        return True

    def _end_owned(self, run: Run, state: str, reason: str) -> bool:
        run.record.update(reason=reason, endedAt=now_iso())
        self._note(run.agent, run.id, f"run {state}: {reason}")
        with self.store.locked():
            self._record(run, state)
        return False

    def _timeout(self, once: bool) -> float:
        now = time.monotonic()
        deadlines = [self.next_rescan]
        deadlines += [a.next_deadline(self.settings.grace) for a in self.active.values()]
        if self.retry_due is not None:
            deadlines.append(self.retry_due)
        if self.storage_retry_at is not None:
            deadlines.append(self.storage_retry_at)
        if self.active:
            deadlines.append(self.next_cancel_check)
        if self.prepared is not None:
            if not self.stopping and not self.queue_changed and self.prepared.pending(self._idle):
                deadlines.append(now)  # _keep_prepared prepares the next one at once
            expiry = self.prepared.next_expiry()
            if expiry is not None:
                deadlines.append(expiry)
        timeout = max(0.0, min(deadlines) - now)
        return min(timeout, 0.5) if once else timeout

    def _wait(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            # An earlier event of this batch may have closed this fd (a step's exit closes its
            # output and progress pipes), and the number may even be reused already.
            if self.selector.get_map().get(key.fd) is not key:
                continue
            kind, active = key.data
            if kind == "wake":
                self._drain_wake()
            elif kind == "queues":
                self._read_queue_watch()
            elif kind == "signal":
                while _read_available(key.fd):
                    pass
            elif kind == "output":
                self._read_output(active)
            elif kind == "progress":
                self._read_progress(active)
            elif kind == "exit":
                self._step_exited(active)
            elif kind == "settled":
                self._leftover_exited(active, key.fd)

    # -- claiming ---------------------------------------------------------------------------

    def dispatch(self) -> bool:
        """Start every eligible queued run the limits allow. True when one started.

        The queue is looked at only when what it may start can have changed: a wake-up (an
        enqueue, a cancel), a run's end (a free slot), a retry or a recheck falling due, a
        storage retry, the periodic rescan. Not on every turn of the loop, which wakes for
        every chunk of a run's output: listing every agent's queue then cost as much as the
        agents are many."""
        now_mono = time.monotonic()
        if now_mono >= self.next_rescan:
            self.next_rescan = now_mono + self._rescan_interval()
            self._check_wake_pipe()
            self._collect_cancel_requests()
            self._collect_strays()
            reap_orphans(wait=0, adopted=True)  # what a run's clean-up did not get to
            if self.prepared is not None:
                self.prepared.retain(self._applied)
            self.queue_changed = self.list_all = True
        if self.storage_retry_at is not None and now_mono >= self.storage_retry_at:
            self.storage_retry_at = None
            self._record_pending()
            self.queue_changed = self.list_all = True
        if self.retry_due is not None and now_mono >= self.retry_due:
            self.retry_due = None  # looked at now, or at the next end when no slot is free
            self.queue_changed = True
        if not self.queue_changed or len(self.active) >= self.settings.max_parallel:
            return False  # the end of a run wakes the loop, and the queue is looked at again
        self.queue_changed = False
        self.retry_due = None
        self._list_queues()
        if self.watch is not None and not self.watch.complete:
            self._unwatched(now_mono)
        started = False
        for agent, name in self._queued():
            if len(self.active) >= self.settings.max_parallel:
                break
            if self._agent_running(agent) >= self.settings.max_per_agent:
                continue
            run = self._load_queued(agent, name)
            if run is not None:
                started |= self._consider(run)
        return started

    def _list_queues(self) -> None:
        """List again the queues that changed (every agent's after a wake-up that named none,
        on the rescan and at start)."""
        if self.list_all:
            self.list_all = False
            self.list_agents.clear()
            self.queued = {}
            if self.watch is not None:
                self.watch.begin_listing_all()
            for agent in self.store.agents():
                self._list_queue(agent)
        while self.list_agents:
            self._list_queue(self.list_agents.pop())

    def _list_queue(self, agent: str) -> None:
        if self.watch is not None:
            self.watch.watch(agent)  # first: a run queued from now on is reported
        try:
            names = set(self.store.names(agent, "queue"))
        except (OSError, SposError):
            names = set()  # not an agent's directory (any local user may write the pipe)
        if names:
            self.queued[agent] = names
        else:
            self.queued.pop(agent, None)

    def _queued(self) -> list[tuple[str, str]]:
        """(agent, file name) of every queued run, in queue order (names sort by priority,
        then time). Records are read only when a run is considered: the loop wakes on every
        chunk of output and every exit, and reading a long queue each time made draining it
        quadratic."""
        queued = [(name, agent) for agent, names in self.queued.items() for name in names]
        return [(agent, name) for name, agent in sorted(queued)]

    def _unqueued(self, agent: str, name: str) -> None:
        """The run's file left the queue (claimed here or elsewhere, cancelled, set aside)."""
        names = self.queued.get(agent)
        if names is not None:
            names.discard(name)
            if not names:
                del self.queued[agent]

    def _load_queued(self, agent: str, name: str) -> Run | None:
        try:
            run = self.store.load(agent, "queue", name)
        except FileNotFoundError:
            self._unqueued(agent, name)
            return None  # claimed or cancelled meanwhile
        except CorruptRecord as exc:
            self._unqueued(agent, name)
            self._set_aside(agent, "queue", name, str(exc))
            return None
        if run.record.get("state") in TERMINAL_BUCKET:
            # Ended in the queue (a cancel cut short before its rename, or failed/ refusing
            # it): moved on, never run; where the rename is refused, tried again later.
            self._unqueued(agent, name)
            with self.store.locked():
                if _refused(self.store.move, run, TERMINAL_BUCKET[run.record["state"]]):
                    self._retry_storage_later()
            return None
        return run

    def _queued_anything(self) -> bool:
        return any(self.store.names(agent, "queue") for agent in self.store.agents())

    def _consider(self, run: Run) -> bool:
        record = run.record
        now = time.time()
        not_before = _epoch(record.get("notBefore"))
        if not_before is not None and not_before > now and not _clock_stepped_back(
                not_before - now, record):
            due = time.monotonic() + (not_before - now)
            self.retry_due = due if self.retry_due is None else min(self.retry_due, due)
            return False
        not_after = _epoch(record.get("notAfter"))
        if not_after is not None and now > not_after and record.get("attempt", 1) == 1:
            return self._end_unstarted(run, "expired", "could not start before its deadline (notAfter)")
        try:
            config, raw = read_agent_config(self.device, run.agent)
            task = task_config(config, record.get("task"))
        except ConfigError as exc:
            return self._end_unstarted(run, "failed", str(exc))
        running = [a for a in self.active.values()
                   if a.run.agent == run.agent and a.run.record.get("task") == record.get("task")]
        policy = record.get("concurrency") or task.get("concurrency", "Forbid")
        if record.get("attempt", 1) > 1 and policy in ("Forbid", "Replace"):
            # A retry is no new start: Forbid and Replace decide those. It waits its turn.
            policy = "Queue"
        if policy in ("Forbid", "Queue") and not running:
            running = self._active_elsewhere(run.agent, record.get("task"))
        if running and policy == "Forbid":
            return self._end_unstarted(
                run, "skipped", f"concurrency Forbid: run {running[0].id} of this task is active")
        if running and policy == "Queue":
            # The end of a run here wakes the loop; one elsewhere sends no wake-up.
            due = time.monotonic() + REPLACE_RECHECK
            self.retry_due = due if self.retry_due is None else min(self.retry_due, due)
            return False
        if policy == "Replace":
            elsewhere = self._active_elsewhere(run.agent, record.get("task"))
            if running or elsewhere:
                self._replace(run, running, elsewhere)
                return False
        # What may be slow and does not need the claim (host names resolved for network rules,
        # the agent's storage measured) is done first: the claim lock is held from the claim
        # until its record is durable, and every other executor, cancel and recovery waits.
        ahead = Ahead(network=self._network_of(config),
                      over_quota=self._over_storage_quota(run.agent, config.get("quota") or {}))
        claim = self._claim(run, self._attempt_start(run, raw, task), stage=True)
        if claim is None:
            return False
        self._start(run, config, raw, task, recorded=True, claim=claim, ahead=ahead)
        return True

    def _active_elsewhere(self, agent: str, task: str) -> list[Run]:
        """Runs of `task` active in another live process: a second executor, or
        `spos action execute`."""
        return [other for other in self.store.runs(agent, buckets=("active",))
                if other.record.get("task") == task and other.id not in self.active
                and other.id not in self.unrecorded and alive(other.record.get("executor") or {})]

    def _replace(self, run: Run, here: list[ActiveRun], elsewhere: list[Run]) -> None:
        """Concurrency Replace: stop every active run of the task, here at once, in other
        processes through a cancel request. `run` stays queued until they all ended (their
        records left active/), so two runs of the task never overlap; as no wake-up comes when
        a run elsewhere ends, it looks again every REPLACE_RECHECK seconds."""
        reason = f"replaced by run {run.id} (concurrency Replace)"
        for active in here:
            self._cancel(active, reason)
        if elsewhere:
            with self.store.locked():
                for other in elsewhere:
                    cancel.ask(self.store, other, reason)
            due = time.monotonic() + REPLACE_RECHECK
            self.retry_due = due if self.retry_due is None else min(self.retry_due, due)

    def _claim(self, run: Run, start: dict | None = None, stage: bool = False):
        """Claim a queued run, set room aside for recording its end, and record this executor
        as its owner, under the claim lock that `recover` takes too. False (None with `stage`)
        when another executor was faster, or when the state file system has no room (the run
        stays queued and is tried again). `start`, the fields of the attempt about to start
        (`_attempt_start`), goes into the same write: one durable record per start.

        With `stage`, that record is not written yet: True is returned, the claim lock stays
        held, and `_commit_claim` writes the record and makes it durable once a prepared
        sandbox has the run's arguments, so the action starts while the record is written
        and fsynced (before anything slow: a fresh sandbox's fork, a leftover checkpoint's
        removal). Until then the run's file in active/ holds the record as it was queued,
        which is what a crash leaves (docs/executor.md, "Delivery"); a write refused then
        fails the run as a refused commit does."""
        before, name = dict(run.record), run.name
        pending = False
        self.store.lock()
        try:
            claimed = self.store.claim(run)
            self._unqueued(run.agent, name)
            if not claimed:
                return None if stage else False
            run.record.update({"state": "active", "executor": self.identity, **(start or {})})
            self.store.reserve(run)
            if stage:
                pending = True
                return True
            self.store.save(run)
        except OSError as exc:
            if not storage_failure(exc):
                raise
            run.record.clear()
            run.record.update(before)
            if run.bucket == "active":  # its file still holds the queued record: move it back
                self.store.release(run)
                if _refused(self.store.move, run, "queue"):
                    self.unrecorded[run.id] = (run, "queued")
            self.list_agents.add(run.agent)
            self._retry_storage_later()
            return None if stage else False
        finally:
            if not pending:
                self.store.unlock()
        return True

    def _commit_claim(self, active: ActiveRun) -> None:
        """Write the record of `active`'s pending claim, durably, and give the claim lock
        back. When the state file system refuses (twice: the second try with the run's
        reserve given up, as `_save` does), the run's file in active/ still holds the record
        as queued, without an owner: the lock is then kept until the run's end is recorded
        (`_release_claim_lock`), so that no executor takes the run for abandoned meanwhile,
        and the run is killed at once; it fails for its record (ActiveRun.storage_problem)."""
        pending, active.claim = active.claim, False
        if not pending:
            return
        try:
            failure = _refused(self.store.save, active.run)
            if failure and self.store.release(active.run):
                failure = _refused(self.store.save, active.run)
        except BaseException:
            self.store.unlock()
            raise
        if failure is None:
            self.store.unlock()
            return
        active.record_failure = active.record_failure or failure
        active.holds_claim_lock = True
        if active.process is not None:
            active.process.kill_all()

    def _release_claim_lock(self, active: ActiveRun) -> None:
        if active.holds_claim_lock:
            active.holds_claim_lock = False
            self.store.unlock()

    def _network_of(self, config: dict):
        """(host network?, egress rules) for the agent's Capability: host names resolved now."""
        capability = config.get("capability") or {}
        return network.setup_for((capability.get("allowed") or {}).get("network"),
                                 (capability.get("denied") or {}).get("network"))

    def _end_unstarted(self, run: Run, state: str, reason: str) -> bool:
        if not self._claim(run):
            return False
        run.record.update(reason=reason, endedAt=now_iso())
        self._note(run.agent, run.id, f"run {state}: {reason}")
        with self.store.locked():
            self._record(run, state)
        return False

    def _set_aside(self, agent: str, bucket: str, name: str, reason: str) -> None:
        """Move an unreadable run file out of the way (failed/<name>.corrupt, with its reason
        next to it), and say so in the log of the run its name gives."""
        if _refused(self.store.set_aside, agent, bucket, name, reason):
            return  # left where it is; found again on the next look
        named = RUN_FILE.fullmatch(name)
        if named:
            self._note(agent, named["id"], f"{reason}; set aside as failed/{name}.corrupt")

    def _note(self, agent: str, run_id: str, text: str) -> None:
        """A `--- spos` line in the log of a run that is not running here. Best effort: the
        record says the same whatever happens to the log."""
        log_path = run_dirs(agent, run_id)["log"]
        try:
            self.device.makedirs(log_path.rsplit("/", 1)[0], mode=0o750)
            log = LogWriter(self.device, log_path, DEFAULT_LOG_BYTES)
            log.open()
            log.note(text)
            log.close()
        except OSError:
            pass

    # -- starting and supervising ---------------------------------------------------------

    def _attempt_start(self, run: Run, raw: bytes, task: dict) -> dict:
        """The fields that say an attempt of `run` started under the config read from the
        bytes `raw`: when, in which executor, and what it runs under (its digest, and what is
        applied on the device). Without checkpoints every attempt starts at the first step."""
        fields = {"state": "active", "startedAt": now_iso(), "executor": self.identity,
                  "reason": "", "attempts": run.record.get("attempts") or [],
                  **self.provenance.start(run.agent, raw)}
        if task.get("checkpoint") is None:
            fields["stepsDone"] = []
        return fields

    def _start(self, run: Run, config: dict, raw: bytes, task: dict, recorded: bool = False,
               claim: bool = False, ahead: Ahead | None = None) -> None:
        """Start the run's next attempt under `config`, read from the bytes `raw`. `recorded`:
        the claim's record holds the attempt's start (`_attempt_start`) with the run's owner;
        otherwise (`action execute`, which owns its run from the start) it is written here,
        before the sandbox is spawned. `claim`: that write is pending (`_claim`), made as
        soon as the first step's sandbox has its arguments. `ahead`: what was worked out
        before the claim."""
        record = run.record
        attempt = record.get("attempt", 1)
        quota = config.get("quota") or {}
        log = LogWriter(self.device, run_dirs(run.agent, run.id)["log"],
                        (quota.get("storageBytes") or {}).get("log") or DEFAULT_LOG_BYTES)
        active = ActiveRun(
            run=run, task=task, config=config, log=log, steps=steps_of(task),
            deadline=time.monotonic() + float(task.get("timeoutSeconds") or 3600), claim=claim,
            network=ahead.network if ahead else None,
        )
        self.active[run.id] = active
        if not recorded:
            record.update(self._attempt_start(run, raw, task))
        early = self._hand_over(active) if recorded and not (ahead and ahead.over_quota) else None
        try:
            failure = _refused(self._prepare, active, not recorded, early is not None)
        except (SposError, OSError) as exc:  # its directories, as something else left them
            failure, active.setup_problem = None, active.setup_problem or str(exc)
        problem = active.storage_problem() or (failure and failure.strerror) or active.setup_problem \
            or (ahead.over_quota if ahead else self._over_storage_quota(run.agent, quota))
        if problem:
            if early is not None and early.started is not None:
                self._withdraw(active, early)
            active.ending, active.reason = "failed", f"could not start: {problem}"
            self._end(active, None)
            return
        log.note(f"attempt {attempt} of run {run.id} ({run.agent}/{record.get('task')}) started")
        self._next_step(active, early)

    def _hand_over(self, active: ActiveRun) -> Early | None:
        """Hand a claimed run's first step to its agent's prepared sandbox before the run's
        log and attachments are written: the launcher sets the run up (mounts, Landlock,
        user) while they are, and its action waits until `_next_step` releases it. Only
        into directories made here and now: what an earlier attempt left is first dealt with
        by `_prepare`. None when that does not apply (the run then starts as before);
        otherwise the step's spec and, when a prepared sandbox took the run, its start."""
        run = active.run
        if self.prepared is None or not self.prepared.has(run.agent) or not active.remaining_steps():
            return None
        dirs = run_dirs(run.agent, run.id)
        try:
            if any(self.device.stat(dirs[key]) is not None for key in ("checkpoint", "tmp")):
                return None
            _make_run_dirs(self.device, dirs)
            spec = self._spec(active, active.remaining_steps()[0], fresh=True)
        except Exception:  # _prepare and _next_step meet it again, and report it
            return None
        return Early(spec, self._spawn(active, spec, hold=True))

    def _withdraw(self, active: ActiveRun, early: Early) -> None:
        """End a held first step unstarted: the run could not be prepared after all. Its
        agent gets a sandbox prepared again, as after a run that started. A sandbox that
        cannot be removed now (a process stuck in the kernel) is left, as a prepared one
        that cannot be closed is (PreparedPool); the run's log says so."""
        self._commit_claim(active)  # tearing a sandbox down may take long: not under the lock
        process, output_read, progress_read, _ = early.started
        for fd in (output_read, progress_read):
            os.close(fd)
        try:
            process.cleanup()  # withdraws it: nothing of the run was executed
        except SandboxError as exc:
            active.log.note(f"its sandbox could not be removed: {exc}")
        if self.prepared is not None:
            self.prepared.want(active.run.agent, early.spec)

    def _prepare(self, active: ActiveRun, save: bool, fresh: bool = False) -> None:
        """The run's directories (unless `fresh`: `_hand_over` made them just now), its log,
        and (`save`) its record saying it started."""
        run = active.run
        dirs = run_dirs(run.agent, run.id)
        if not fresh:
            if active.task.get("checkpoint") is None:  # checkpoints off: every attempt starts afresh
                if self.device.stat(dirs["checkpoint"]) is not None:
                    self._commit_claim(active)  # a removal may take long: not under the claim lock
                    _remove_tree(self.device, dirs["checkpoint"])
            _make_run_dirs(self.device, dirs)
        _make_dir(self.device, dirs["log"].rsplit("/", 1)[0])
        active.log.open()
        if run.record.get("attachments"):
            # Written afresh for each attempt: an earlier one's action may have changed them,
            # or put a link, a file or a deep tree in their place; what cannot be removed or
            # written fails this run, never the executor. Directories made just now hold none.
            try:
                if not fresh and os.path.lexists(
                        os.path.join(self.device.host(dirs["tmp"]), ATTACHMENTS_DIR)):
                    self._commit_claim(active)  # a removal may take long: not under the claim lock
                    _remove_tree(self.device, attachments_dir(run.agent, run.id))
                write_attachments(self.device, run.agent, run.record)
            except (SposError, OSError) as exc:
                if isinstance(exc, OSError) and storage_failure(exc):
                    raise
                active.setup_problem = f"its attachments could not be written: {exc}"
        if save:
            self._save(active)

    def _next_step(self, active: ActiveRun, early: Early | None = None) -> None:
        """Start the run's next step, or end the run when none is left. `early`: the first
        step's spec, worked out by `_hand_over`, and its held start there if it has one."""
        remaining = active.remaining_steps()
        if not remaining:
            self._end(active, 0)
            return
        step = remaining[0]
        active.step = step
        active.step_deadline = time.monotonic() + step.timeout if step.timeout else None
        try:
            if early is not None and early.started is not None:
                spec = early.spec
                try:
                    early.started[0].release()
                except BaseException:
                    self._withdraw(active, early)
                    raise
                active.process, output_read, progress_read, ready = early.started
            else:
                spec = early.spec if early is not None else self._spec(active, step)
                active.process, output_read, progress_read, ready = self._spawn(active, spec)
        except Exception as exc:  # a run that cannot start fails visibly; the executor goes on
            active.reason = f"could not start step {step.name!r}: {exc}"
            active.log.note(active.reason)
            self._end(active, None)
            return
        self._commit_claim(active)  # while the sandbox starts the action
        if self.prepared is not None:
            self.prepared.want(active.run.agent, spec)
        active.log.note(f"step {step.name} started: {' '.join(step.argv)}"
                        + (" (prepared sandbox)" if ready else ""))
        active.output_fd, active.progress_fd = output_read, progress_read
        for fd in (output_read, progress_read):
            os.set_blocking(fd, False)
        self.selector.register(output_read, selectors.EVENT_READ, ("output", active))
        self.selector.register(progress_read, selectors.EVENT_READ, ("progress", active))
        self.selector.register(active.process.pidfd, selectors.EVENT_READ, ("exit", active))

    def _spawn(self, active: ActiveRun, spec, hold: bool = False):
        """Start `spec` in the agent's prepared sandbox when it has one that fits, else in a
        new one (the claim made durable first: the claim lock is not held while a sandbox is
        set up, a network linked, or a fork's child holds the lock's fd until it closes its
        fds). Returns (the run, its output and progress pipes' read ends, prepared?). With
        `hold`, only a prepared sandbox, whose run waits for its release (None without one)."""
        agent = active.run.agent
        slot = self.prepared.take(agent, spec) if self.prepared is not None else None
        if slot is not None:
            spec.env["SPOS_PROGRESS_FD"] = str(slot.progress_number)
            try:
                return slot.sandbox.start(spec, hold), slot.output_fd, slot.progress_fd, True
            except Exception:  # it ended, or cannot take this run: start afresh (start()
                slot.close()   # hands nothing of the run over when it raises)
        if hold:
            return None
        self._commit_claim(active)
        output_read, output_write = os.pipe()
        progress_read, progress_write = os.pipe()
        try:
            spec.env["SPOS_PROGRESS_FD"] = str(progress_write)
            process = self.sandbox.spawn(spec, stdout=output_write, stderr=output_write,
                                         pass_fds=(progress_write,))
        except BaseException:
            os.close(output_read)
            os.close(progress_read)
            raise
        finally:
            os.close(output_write)
            os.close(progress_write)
        return process, output_read, progress_read, False

    def _spec(self, active: ActiveRun, step, fresh: bool = False):
        """The sandbox spec of `step`. `fresh`: the run's directories were made just now
        (`_hand_over`), so its checkpoint directory is empty, and its attachments are yet to
        be written: those its record carries are named to the action too."""
        run, task, config = active.run, active.task, active.config
        dirs = run_dirs(run.agent, run.id)
        capability = config.get("capability") or {"allowed": {}, "denied": {}}
        allowed, denied = capability.get("allowed") or {}, capability.get("denied") or {}
        quota = config.get("quota") or {}
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": dirs["tmp"],
            "TMPDIR": dirs["tmp"],
            **(task.get("env") or {}),
            "SPOS_RUN_ID": run.id,
            "SPOS_AGENT": run.agent,
            "SPOS_TASK": run.record.get("task", ""),
            "SPOS_ATTEMPT": str(run.record.get("attempt", 1)),
            "SPOS_STEP": step.name,
            "SPOS_CHECKPOINT_DIR": dirs["checkpoint"],
            "SPOS_OUTPUT_DIR": dirs["output"],
        }
        if not fresh:
            with os.scandir(self.device.host(dirs["checkpoint"])) as entries:
                if any(entries):
                    env["SPOS_RESUME"] = "1"
        env.update(trigger_env(run.record.get("source") or {}, dirs["tmp"],
                               self.device.host(dirs["tmp"]),
                               (run.record.get("attachments") or {}) if fresh else ()))
        host_network, egress = active.network or network.setup_for(allowed.get("network"),
                                                                   denied.get("network"))
        active.network = None  # later steps resolve again
        for note in egress.notes if egress else ():
            active.log.write(f"--- spos: {note}\n".encode())
        return SandboxSpec(
            argv=list(step.argv),
            env=env,
            cwd=task.get("workdir") or dirs["tmp"],
            read=tuple(allowed.get("read") or ()),
            write=(*(allowed.get("write") or ()), dirs["checkpoint"], dirs["tmp"], dirs["output"]),
            per_run=(dirs["checkpoint"], dirs["tmp"]),
            execute=tuple(allowed.get("execute") or ()),
            denied=tuple(sorted({*(denied.get("read") or ()), *(denied.get("write") or ()),
                                 *(denied.get("execute") or ())})),
            devices=tuple(allowed.get("devices") or ()),
            network=host_network,
            egress=egress,
            limits=Limits(
                cpu_percent=quota.get("cpuPercent"),
                memory_bytes=quota.get("memoryBytes"),
                tasks_max=quota.get("tasksMax"),
                io_weight=quota.get("ioWeight"),
                nice=quota.get("nice"),
            ),
            cgroup_name=self._cgroup_of(run.agent, run.id),
            user=config.get("user", "root"),
        )

    def _cgroup_of(self, agent: str, run_id: str) -> str:
        """A run's cgroup: below its agent's, which apply made with the agent's Quota
        (docs/cgroups.md), so all of an agent's runs together stay within it."""
        return f"{self.device.cgroups.parent}/{agent}/{run_id}"

    def _read_output(self, active: ActiveRun) -> None:
        data = _read_available(active.output_fd)
        if data:
            active.log.write(data)
        elif data == b"":
            self._unregister(active.output_fd)
            os.close(active.output_fd)
            active.output_fd = -1

    def _read_progress(self, active: ActiveRun) -> None:
        data = _read_available(active.progress_fd)
        if data:
            if active.handle_progress(data):
                now = time.monotonic()
                if now - active.last_saved >= self.settings.save_interval:
                    active.last_saved = now
                    self._save(active)
        elif data == b"":
            self._unregister(active.progress_fd)
            os.close(active.progress_fd)
            active.progress_fd = -1

    def _step_exited(self, active: ActiveRun) -> None:
        """The step's main process (bubblewrap) exited. Its end is handled once the rest of its
        cgroup is gone too: bubblewrap's namespace init is usually still exiting, which the
        loop waits for on pidfds (`settled` events) while it serves other runs."""
        process = active.process
        code = process.wait()
        self._unregister(process.pidfd)
        for fd_name in ("output_fd", "progress_fd"):
            fd = getattr(active, fd_name)
            if fd >= 0:
                if fd_name == "output_fd":
                    rest = _read_available(fd)
                    while rest:
                        active.log.write(rest)
                        rest = _read_available(fd)
                self._unregister(fd)
                os.close(fd)
                setattr(active, fd_name, -1)
        active.exit_code = code
        active.settling = process.leftovers()
        if not active.settling:
            self._step_ended(active)
            return
        active.settle_deadline = time.monotonic() + SETTLE_WAIT
        for fd in active.settling:
            self.selector.register(fd, selectors.EVENT_READ, ("settled", active))

    def _leftover_exited(self, active: ActiveRun, fd: int) -> None:
        self._unregister(fd)
        os.close(fd)
        active.settling.remove(fd)
        if not active.settling:
            self._step_ended(active)

    def _stop_settling(self, active: ActiveRun) -> None:
        for fd in active.settling:
            self._unregister(fd)
            os.close(fd)
        active.settling = []

    def _step_ended(self, active: ActiveRun) -> None:
        """The step exited and its cgroup emptied (or the wait for it ran out: `settle` kills
        what is left): record its usage and go on with the next step or the run's end."""
        process, code = active.process, active.exit_code
        if active.settling:  # the wait ran out: what is left is killed, not waited for again
            self._stop_settling(active)
            process.kill_all()
        process.settle()
        _merge_usage(active.usage, process.usage())
        oom = process.oom_killed()
        setup_error = process.setup_error()
        process.cleanup()
        step = active.step
        active.log.note(f"step {step.name} exited with {code}" + (" (out of memory)" if oom else ""))
        if not active.ending and (code == 0 or step.continue_on_error):
            active.run.record.setdefault("stepsDone", []).append(step.name)
            if active.remaining_steps():  # the last step is recorded with the run's end
                self._save(active)
        problem = None if active.ending else active.storage_problem()
        if problem:
            active.ending, active.reason = "failed", problem
        if active.ending:
            self._end(active, code)
        elif code == 0 or step.continue_on_error:
            self._next_step(active)
        else:
            if setup_error:
                active.reason = f"step {step.name} could not start in its sandbox: {setup_error}"
            elif oom:
                active.reason = f"step {step.name} was killed: out of memory (quota memory limit)"
            elif code < 0:
                active.reason = f"step {step.name} was killed by signal {-code}"
            else:
                active.reason = f"step {step.name} exited with {code}"
            self._end(active, code)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for active in list(self.active.values()):
            if active.process is None:
                continue
            if active.settling:  # its step exited: neither a timeout nor a cancel applies now
                if now >= active.settle_deadline:
                    self._step_ended(active)
                continue
            if active.terminated_at is not None:
                if now >= active.terminated_at + self.settings.grace:
                    active.process.kill_all()
                continue
            problem = active.storage_problem() or self._over_storage_quota(
                active.run.agent, active.config.get("quota") or {})
            if problem:
                self._terminate(active, "failed", problem)
                continue
            reason = active.expired(now)
            if reason:
                self._terminate(active, "timeout", reason)
        if now >= self.next_cancel_check:
            self._collect_cancel_requests()

    def _over_storage_quota(self, agent: str, quota: dict) -> str | None:
        """Why `agent` is over its temp or output storage quota, or None. Measured at most once
        per `storage_interval` (a walk of its directories: not for every run's start); in
        between, the last measure answers. (The log quota is kept by rotating each run's log
        instead: LogWriter.)"""
        limits = {k: v for k, v in (quota.get("storageBytes") or {}).items()
                  if v is not None and k in ("temp", "output")}
        if not limits:
            return None
        now = time.monotonic()
        when, why = self.storage_measured.get(agent, (None, None))
        if when is None or now >= when + self.settings.storage_interval:
            why = storage.over_quota(self.device, agent, limits)
            self.storage_measured[agent] = (now, why)
        return why

    def _terminate(self, active: ActiveRun, ending: str, reason: str) -> None:
        active.ending, active.reason = ending, reason
        active.terminated_at = time.monotonic()
        active.log.note(f"{reason}: SIGTERM, then SIGKILL of the whole cgroup after {self.settings.grace:g}s")
        active.process.terminate()

    def _cancel(self, active: ActiveRun, reason: str) -> None:
        if active.ending is None and not active.settling:
            self._terminate(active, "cancelled", reason)

    def _stop_run(self, active: ActiveRun, reason: str) -> None:
        """The executor is going away with this run still active: end its processes and leave
        the run in active/, so the next executor reruns it (at-least-once)."""
        self._commit_claim(active)
        self._release_claim_lock(active)
        self._stop_settling(active)
        if active.process is not None:
            active.process.terminate()
            try:
                active.process.wait(timeout=self.settings.grace)
            except Exception:
                pass
            active.process.kill_all()
            active.process.cleanup()
        active.log.note(f"{reason}; the run will be rerun")
        active.log.close()

    # -- ending -----------------------------------------------------------------------------

    def _end(self, active: ActiveRun, code: int | None) -> None:
        self._commit_claim(active)  # a run that could not start: its end follows its claim
        del self.active[active.id]
        self.queue_changed = True  # a slot is free
        run, record = active.run, active.run.record
        elapsed = time.monotonic() - active.started
        attempt = record.get("attempt", 1)
        if active.ending:
            state = active.ending
        elif code == 0:
            state = "completed"
        else:
            state = "failed"
        record["attempts"].append({
            "attempt": attempt, "startedAt": record.get("startedAt"), "endedAt": now_iso(),
            "state": state, "exitCode": code, "reason": active.reason,
            "durationSeconds": round(elapsed, 3), "usage": active.usage,
            **provenance.of_attempt(record),
        })
        record.update(endedAt=now_iso(), exitCode=code, reason=active.reason,
                      durationSeconds=round(elapsed, 3), usage=active.usage)
        retries = (active.task.get("retries") or {})
        final = code in (retries.get("nonRetryableExitCodes") or ()) and state == "failed"
        if final:
            active.reason += " (not retried: the task marks this exit code as non-retryable)"
            record["reason"] = active.reason
        try:
            with self.store.locked():  # a cancel request is seen here, or finds the run ended
                request = cancel.requested(self.store, run)
                if request and state in ("failed", "timeout") and not final:
                    final = True
                    active.reason += f" (not retried: {request})"
                    record["reason"] = active.reason
                # Failures are what `limit` counts and what the backoff grows with: an attempt
                # an executor crash interrupted (recovery counts it in `attempt`) is neither.
                failures = sum(1 for earlier in record["attempts"]
                               if isinstance(earlier, dict)
                               and earlier.get("state") in ("failed", "timeout"))
                retry = state in ("failed", "timeout") and not final \
                    and failures <= int(retries.get("limit", 0))
                if retry:
                    delay = _backoff(retries.get("backoff") or {}, failures)
                    record.update(attempt=attempt + 1, notBefore=_iso(time.time() + delay),
                                  retryDelaySeconds=round(delay, 3))
                    active.log.note(
                        f"attempt {attempt} {state}: {active.reason}; retry in {delay:.1f}s")
                    active.log.close()
                    self._record(run, "queued")
                    return
                active.log.note(f"run {state}" + (f": {active.reason}" if active.reason else ""))
                active.log.close()
                try:
                    _refused(self._remove_run_trees, run, state)  # what is left, retention removes
                except (SposError, OSError) as exc:  # the action's own tree, as it left it
                    self._note(run.agent, run.id, f"its directories were left in place: {exc}")
                self._follow_up(run, active.task, state)
                if self._record(run, state):
                    cancel.withdraw(self.store, run)
        finally:
            self._release_claim_lock(active)  # kept when the claim could not be made durable

    def _remove_run_trees(self, run: Run, state: str) -> None:
        """The run's temporary directory, and its checkpoint once it completed."""
        if state == "completed":
            _remove_tree(self.device, run_dirs(run.agent, run.id)["checkpoint"])
        _remove_tree(self.device, run_dirs(run.agent, run.id)["tmp"])

    def _save(self, active: ActiveRun) -> bool:
        """Rewrite a running run's record. When the state file system refuses, the run's
        reserve is given up for one more try; failing again, the run fails for it (see
        ActiveRun.storage_problem)."""
        self._commit_claim(active)  # never overtaken by a later write
        failure = _refused(self.store.save, active.run)
        if failure and self.store.release(active.run):
            failure = _refused(self.store.save, active.run)
        if failure:
            active.record_failure = active.record_failure or failure
        return failure is None

    def _record(self, run: Run, state: str) -> bool:
        """Write the end of an attempt: the run back in the queue for its retry (`state`
        "queued") or in its final bucket. Call under the claim lock. When the state file system
        refuses, the run stays in active/ (its processes are stopped) and the write is tried
        again every STORAGE_RETRY seconds; False then."""
        if state == "queued":
            failure = _refused(self.store.requeue, run)
            self.list_agents.add(run.agent)
        else:
            run.record.pop("attachments", None)  # for its attempts; an ended run keeps no copy
            failure = _refused(self.store.finish, run, state)
        if failure is None:
            self.unrecorded.pop(run.id, None)
            return True
        self.unrecorded[run.id] = (run, state)
        self._retry_storage_later()
        return False

    def _record_pending(self) -> None:
        """Try again to write the ends the state file system refused."""
        for run, state in list(self.unrecorded.values()):
            with self.store.locked():
                if self._record(run, state) and state != "queued":
                    cancel.withdraw(self.store, run)

    def _retry_storage_later(self) -> None:
        if self.storage_retry_at is None:
            self.storage_retry_at = time.monotonic() + STORAGE_RETRY

    def _follow_up(self, run: Run, task: dict, state: str) -> None:
        """Enqueue the task's onSuccess / onFailure tasks (cancelled and skipped runs have none)."""
        hook = {"completed": "onSuccess", "failed": "onFailure", "timeout": "onFailure"}.get(state)
        for name in task.get(hook) or () if hook else ():
            try:
                enqueue(self.device, run.agent, name,
                        source={"kind": "hook", "run": run.id, "on": hook})
                self.list_agents.add(run.agent)  # not only if the wake pipe takes the message
            except ConfigError as exc:
                run.record.setdefault("followUpErrors", []).append(str(exc))
            except OSError as exc:
                if not storage_failure(exc):
                    raise
                run.record.setdefault("followUpErrors", []).append(
                    f"could not enqueue {name}: {exc.strerror}")

    # -- recovery and cancellation ------------------------------------------------------------

    def recover(self) -> None:
        """Runs left in active/ by an executor that is gone are queued again (attempt counted,
        checkpoint kept), or end as cancelled when a cancel request for them was waiting. A run
        whose record also reached a final bucket keeps that one. Stray requests and reserves
        are removed, and so are the cgroups of sandboxes that executors which are gone had
        prepared."""
        for agent in self.store.agents():
            prepared.sweep(self.sandbox, self.device.cgroups.parent, agent)
            if self.store.names(agent, "active") or self.store.strays(agent):
                with self.store.locked():
                    self._recover_agent(agent)
                    self.store.remove_strays(agent)

    def _recover_agent(self, agent: str) -> None:
        finished = set(self.store.names(agent, "completed")) | set(self.store.names(agent, "failed"))
        for name in self.store.names(agent, "active"):
            try:
                run = self.store.load(agent, "active", name)
            except FileNotFoundError:
                continue
            except CorruptRecord as exc:
                self._set_aside(agent, "active", name, str(exc))
                continue
            if name in finished:
                self.device.remove(run.path)
                continue
            owner = run.record.get("executor") or {}
            if owner != self.identity and alive(owner):
                continue
            self.sandbox.reap(self._cgroup_of(agent, run.id))
            attempt = run.record.get("attempt", 1)
            request = cancel.requested(self.store, run)
            if request:
                self._recover_cancelled(run, request)
                continue
            run.record.setdefault("attempts", []).append({
                "attempt": attempt, "startedAt": run.record.get("startedAt"), "endedAt": now_iso(),
                "state": "interrupted", "exitCode": None,
                "reason": "the executor stopped or died during the run",
                **provenance.of_attempt(run.record),
            })
            run.record.update(attempt=attempt + 1, notBefore=None,
                              reason="rerun: the executor stopped or died during the previous attempt")
            self._note(agent, run.id,
                       f"attempt {attempt} interrupted: the executor stopped or died; queued again")
            self._record(run, "queued")

    def _recover_cancelled(self, run: Run, request: str) -> None:
        """A run whose owner died with a cancel request waiting ends as cancelled: what was
        asked for, rather than a rerun."""
        reason = f"{request}; its executor had stopped or died, the rest of its cgroup was killed"
        run.record.setdefault("attempts", []).append({
            "attempt": run.record.get("attempt", 1), "startedAt": run.record.get("startedAt"),
            "endedAt": now_iso(), "state": "cancelled", "exitCode": None, "reason": reason,
            **provenance.of_attempt(run.record),
        })
        run.record.update(reason=reason, endedAt=now_iso())
        self._note(run.agent, run.id, f"run cancelled: {reason}")
        if self._record(run, "cancelled"):
            cancel.withdraw(self.store, run)

    def _collect_cancel_requests(self) -> None:
        """Act on cancel requests for runs active here. A request stays until the run's end
        is recorded, so that recovery still honours it if this executor dies meanwhile."""
        self.next_cancel_check = time.monotonic() + CANCEL_CHECK
        for active in list(self.active.values()):
            if active.ending is None and not active.settling:
                request = cancel.requested(self.store, active.run)
                if request:
                    self._cancel(active, request)

    def _collect_strays(self) -> None:
        """Remove cancel requests and reserves whose run left active/ (found on the rescan)."""
        for agent in self.store.agents():
            if self.store.strays(agent):
                with self.store.locked():
                    self.store.remove_strays(agent)

    # -- the wake pipe ----------------------------------------------------------------------

    def _open_wake_pipe(self) -> None:
        self.device.makedirs(f"/{STATE_DIR}")
        host = self.device.path(WAKE_PIPE)
        try:
            st = os.lstat(host)
            if not stat.S_ISFIFO(st.st_mode):
                os.unlink(host)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkfifo(host, 0o622)
        # O_RDWR keeps the pipe open with no writer, so select() does not spin on EOF.
        self.wake_fd = os.open(host, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(self.wake_fd)
        self.wake_inode = (st.st_dev, st.st_ino)
        self.selector.register(self.wake_fd, selectors.EVENT_READ, ("wake", None))

    def _check_wake_pipe(self) -> None:
        """A deleted or replaced wake pipe is recreated (found on the periodic rescan)."""
        try:
            st = os.lstat(self.device.path(WAKE_PIPE))
            if (st.st_dev, st.st_ino) == self.wake_inode and stat.S_ISFIFO(st.st_mode):
                return
        except FileNotFoundError:
            pass
        self._close_wake_pipe()
        self._open_wake_pipe()

    def _close_wake_pipe(self) -> None:
        if self.wake_fd >= 0:
            self._unregister(self.wake_fd)
            os.close(self.wake_fd)
            self.wake_fd = -1

    def _close_signal_pipe(self) -> None:
        if self.signal_pipe is not None:
            fds, self.signal_pipe = self.signal_pipe, None
            self._unregister(fds[0])
            for fd in fds:
                os.close(fd)

    def _drain_wake(self) -> None:
        """Read what the wake pipe holds, at most WAKE_READS reads a turn (what is left wakes
        the next one), keeping no more than the overflow threshold: half the pipe's size, as
        it is now (a writer may shrink it)."""
        try:
            overflow = min(WAKE_OVERFLOW, fcntl.fcntl(self.wake_fd, fcntl.F_GETPIPE_SZ) // 2)
        except OSError:
            overflow = WAKE_OVERFLOW
        chunks, size = [], 0
        for _ in range(WAKE_READS):
            chunk = _read_available(self.wake_fd)
            if not chunk:
                break
            size += len(chunk)
            if size < overflow:
                chunks.append(chunk)
        self._to_list(None if size >= overflow else woken_agents(b"".join(chunks)))
        self.queue_changed = True
        self.next_cancel_check = 0.0  # a cancel request comes with a wake-up: look at once

    def _to_list(self, agents: set[str] | None) -> None:
        """Remember the queues a wake-up or the queue watch named for the next listing (None:
        every queue; so too beyond WAKE_AGENTS names waiting)."""
        if agents is None or len(self.list_agents) + len(agents) > WAKE_AGENTS:
            self.list_all = True
        if self.list_all:
            self.list_agents.clear()
        else:
            self.list_agents |= agents

    # -- the queue watch ---------------------------------------------------------------------

    def _watch_queues(self) -> None:
        """Watch the queues with inotify (queuewatch.py). Each queue is watched when it is
        first listed: at the first rescan, which comes at once."""
        self.watch = QueueWatch(self.device)
        if self.watch.fd >= 0:
            self.selector.register(self.watch.fd, selectors.EVENT_READ, ("queues", None))

    def _unwatched(self, now: float) -> None:
        """Some queue is not watched: the next rescan comes within RESCAN_UNWATCHED, and why
        is said on stderr, once for each reason."""
        self.next_rescan = min(self.next_rescan, now + RESCAN_UNWATCHED)
        problem = self.watch.problem
        if problem and problem != self.watch_problem_said:
            self.watch_problem_said = problem
            print(f"spos executor: not every queue can be watched ({problem}); the queues are "
                  f"looked at every {self._rescan_interval():g}s", file=sys.stderr)

    def _read_queue_watch(self) -> None:
        agents, everything, came_or_went = self.watch.read()
        self._to_list(None if everything else agents)
        # While the state file system refuses writes, a claim it refused moves the run back
        # into its queue, which the watch reports: looking again at once would spin on that.
        # The storage retry lists every queue when it falls due.
        if (agents or everything) and self.storage_retry_at is None:
            self.queue_changed = True
        if came_or_went and self.prepared is not None:
            self.prepared.retain(self._applied)

    def _rescan_interval(self) -> float:
        """The long interval while the queues are watched, and at start, before the first
        listing watches them (with inotify at hand): a queue that listing cannot watch brings
        the next rescan within RESCAN_UNWATCHED (`_unwatched`)."""
        watch = self.watch
        if watch is not None and (watch.complete or (not watch.listed and watch.fd >= 0)):
            return self.settings.rescan
        return min(self.settings.rescan, RESCAN_UNWATCHED)

    # -- helpers ----------------------------------------------------------------------------

    def _idle(self, agent: str) -> bool:
        return self._agent_running(agent) == 0

    def _applied(self, agent: str) -> bool:
        return self.device.exists(f"{AGENTS_DIR}/{agent}/{AGENT_CONFIG}")

    def _agent_running(self, agent: str) -> int:
        return sum(1 for a in self.active.values() if a.run.agent == agent)

    def _unregister(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _install_signal_handlers(self) -> None:
        # The handler also writes to a pipe the loop selects on: Python retries an interrupted
        # select() with the remaining timeout, so a flag alone would wait for the next deadline.
        if self.signal_pipe is None:
            self.signal_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.selector.register(self.signal_pipe[0], selectors.EVENT_READ, ("signal", None))

        def drain(signum, frame):
            self.stopping = True
            if self.signal_pipe is not None:
                try:
                    os.write(self.signal_pipe[1], b"!")
                except OSError:
                    pass

        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)


def _refused(write, *args) -> OSError | None:
    """Call `write(*args)`; the storage failure it raised (the state file system is full,
    failing or read-only: `storage_failure`), or None. Anything else propagates."""
    try:
        write(*args)
    except OSError as exc:
        if not storage_failure(exc):
            raise
        return exc
    return None


def _clock_stepped_back(wait: float, record: dict) -> bool:
    """Whether a retry's wait is longer than its backoff asked for (`retryDelaySeconds`): the
    wall clock was stepped back since (NTP on a device without a real-time clock), and the
    retry is due now rather than the step's length late."""
    asked = amount(record.get("retryDelaySeconds"))
    return asked is not None and wait > asked + 1


def _backoff(backoff: dict, attempt: int) -> float:
    """Exponential, capped, with +-10 % jitter so retries of many runs do not align."""
    initial = float(backoff.get("initialSeconds", 10))
    factor = float(backoff.get("factor", 2))
    cap = float(backoff.get("maxSeconds", DEFAULT_RETRY_CAP))
    delay = min(initial * factor ** (attempt - 1), cap)
    return delay * random.uniform(0.9, 1.1)


def _merge_usage(total: dict, step: dict) -> None:
    for key, value in (step or {}).items():
        if value is None:
            continue
        if key.startswith("peak"):
            total[key] = max(total.get(key) or 0, value)
        else:
            total[key] = (total.get(key) or 0) + value


def _read_available(fd: int) -> bytes | None:
    """Bytes ready on a non-blocking fd; b'' at end of file; None when nothing is ready now."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def _remove_tree(device: Device, device_path: str) -> None:
    """Remove whatever is at a path of a run's own (a directory and everything below it, a
    file, a link) without following links. Usually it is an empty directory, or missing: one
    rmdir. Otherwise retention.remove_tree walks it without recursion or long paths (one fd per
    level): a tree deeper than retention.MAX_DEPTH, or holding a mount, raises RetentionError
    and is left in place."""
    parent, name = device_path.rsplit("/", 1)
    try:
        parent_fd = os.open(device.host(parent), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        remove_tree(parent_fd, name)
    finally:
        os.close(parent_fd)


def _make_run_dirs(device: Device, dirs: dict[str, str]) -> None:
    """The directories a run's sandbox binds (`run_dirs`: its checkpoints, its tmp, the
    agent's output)."""
    for key in ("checkpoint", "tmp", "output"):
        _make_dir(device, dirs[key])


def _make_dir(device: Device, device_path: str) -> None:
    """Create a run's directory (mode 0750) whose parent, the agent's directory, usually
    exists: one mkdir, and a walk from the root (Device.makedirs) only when the parent is
    missing. The path is resolved without following links either way."""
    host, st = device.locate(device_path)
    if st is None:
        try:
            os.mkdir(host, 0o750)
            return
        except OSError:  # no parent, or made meanwhile: the walk makes or checks it
            pass
    elif stat.S_ISDIR(st.st_mode):
        return
    device.makedirs(device_path, mode=0o750)  # refuses what is not a directory


def _name_of(store: RunStore, agent: str, bucket: str, run_id: str) -> str:
    for name in store.names(agent, bucket):
        if name.endswith(f"-{run_id}.json"):
            return name
    raise FileNotFoundError(f"run {run_id} is not in {agent}/{bucket}")


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def _iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
