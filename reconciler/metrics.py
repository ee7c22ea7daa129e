"""`spos metrics`: the device's runs, queue, triggers and syncs in the Prometheus text format.

Every scrape reads afresh the state the device's loops already keep, and nothing else: the run
records of every agent (executor/runs.py), the trigger daemon's `triggerd/status.json`, the
sync state `sync/state.json`, and whether an executor holds the wake pipe. Nothing is kept here
between scrapes, so these numbers can never disagree with `spos action list`, `spos trigger
list` or `spos status`.

Where a number comes from decides its type:

- Run records are removed by retention (docs/executor.md), so what is counted from them falls
  as well as rises: gauges, and a gauge histogram for durations. They describe the runs still
  on disk (by default a week of completed runs and a month of failed ones); read them as they
  are, never through rate().
- The trigger daemon counts events since it started and the sync state counts drift repairs
  since the device's state began: counters (a restart of the trigger daemon is a counter reset).

No label carries a run id: series grow with agents, tasks and triggers, never with runs.

Cost: a scrape lists each agent's four run directories, then reads and parses every record
once and keeps none: 60-80 µs a record on one core of a 2-core x86 VM, so 0.6-0.8 s for 10,000
finished runs, nine tenths of it RunStore.load (open, decode, check), which `spos action list`
pays too.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys
import threading
import time
from bisect import bisect_left
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.errors import SposError, UsageError
from reconciler.executor.enqueue import listening
from reconciler.executor.estimate import FLAGS, Outcome, trend
from reconciler.executor.estimate import outcome as outcome_of
from reconciler.executor.owner import process_alive
from reconciler.executor.runs import BUCKETS, STATES, TERMINAL_BUCKET, CorruptRecord, Run, RunStore
from reconciler.numbers import amount
from reconciler.sync import SyncState
from reconciler.triggers.daemon import read_status
from reconciler.triggers.gate import OUTCOMES

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
"""Upper bounds (seconds) of the run duration histogram; +Inf follows."""

SYNC_OUTCOMES = ("applied", "unchanged", "quarantined", "skipped", "refused", "failed")
"""Every outcome a sync records (reconciler.sync.SyncResult)."""

TRIGGER_UP_STATES = frozenset({"armed", "cooling down"})
"""Trigger states in which the source is listening: a condition trigger cooling down after it
fired is working as configured."""

USAGE_KEYS = {"cpuSeconds": "cpu", "peakMemoryBytes": "memory", "readBytes": "read",
              "writeBytes": "write", "networkSentBytes": "sent", "networkReceivedBytes": "received"}
"""The resource usage an attempt records (executor/cgroup.py), by what it is summed into."""


@dataclass
class AgentTally:
    """What one agent's run directories hold now."""

    queued: int = 0
    active: int = 0
    read_errors: int = 0


@dataclass
class TaskTally:
    """What the records of one agent's task add up to."""

    states: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    retries: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    usage: dict[str, float] = field(default_factory=dict)
    last_end: dict[str, float] = field(default_factory=dict)
    last_duration: tuple[float, float] | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, run: Run, state: str) -> None:
        record = run.record
        self.states[state] += 1
        self.retries += int(amount(record.get("attempt")) or 1) - 1
        ran = None
        for attempt in record.get("attempts") or ():
            if not isinstance(attempt, dict):
                continue
            if isinstance(attempt.get("state"), str):
                self.attempts[attempt["state"]] += 1
            seconds = amount(attempt.get("durationSeconds"))
            if seconds is not None:
                ran = (ran or 0.0) + seconds
            self._add_usage(attempt.get("usage"))
        if state not in TERMINAL_BUCKET:
            return
        self.outcomes.append(outcome_of(record))
        ended = _epoch(record.get("endedAt"))
        if ended is not None and ended >= self.last_end.get(state, ended):
            self.last_end[state] = ended
        if ran is not None:
            self.buckets[bisect_left(DURATION_BUCKETS, ran)] += 1
            self.duration_sum += ran
            if ended is not None and (self.last_duration is None or ended >= self.last_duration[0]):
                self.last_duration = (ended, ran)

    def _add_usage(self, usage) -> None:
        if not isinstance(usage, dict):
            return
        for key, into in USAGE_KEYS.items():
            value = amount(usage.get(key))
            if value is None:
                continue
            if into == "memory":
                self.usage[into] = max(self.usage.get(into, 0.0), value)
            else:
                self.usage[into] = self.usage.get(into, 0.0) + value


class DeviceCollector:
    """A prometheus_client collector: every collect() reads the device's state files afresh."""

    def __init__(self, device: Device):
        self.device = device

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        agents, tasks = tally_runs(RunStore(self.device))
        families = [
            *_run_families(agents, tasks),
            *_trigger_families(read_status(self.device)),
            *_sync_families(SyncState.load(self.device)),
            _gauge("spos_executor_up", "1 when an executor holds the wake pipe open: queued runs "
                                       "are being served", 1 if listening(self.device) else 0),
        ]
        families.append(_gauge("spos_scrape_duration_seconds",
                               "Time this scrape took to read the device's state",
                               time.monotonic() - started))
        return iter(families)


CLIENT_TIMEOUT = 10.0
"""Seconds a connection to the listener may stay silent, or leave the answer unread."""
MAX_CONNECTIONS = 32
"""Connections the listener serves at once; Prometheus needs one per scrape."""


def exposition(device: Device) -> str:
    """The device's metrics now, in the Prometheus text format (version 0.0.4)."""
    return generate_latest(_registry(device)).decode()


def serve(device: Device, address: str, port: int,
          listening_now: Callable[[], None] = lambda: None) -> None:
    """Answer GET /metrics on `address`:`port` (404 elsewhere), reading the device afresh for
    each scrape, until SIGTERM or SIGINT; `listening_now` is called once the port is bound. A
    scraper asking for OpenMetrics gets it. Signal handlers are installed only on the main
    thread (the only one Python delivers signals to) and the previous ones are restored on
    return."""
    server = _MetricsServer(address, port, _registry(device))
    listening_now()

    def stop() -> None:  # shutdown() waits for serve_forever(), which runs on this very thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    try:
        with _until_signalled(stop):
            server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def write_textfile(device: Device, path: str, interval: float = 15.0, once: bool = False) -> None:
    """Write the metrics to `path` (a host path, such as node_exporter's textfile directory)
    atomically, then every `interval` seconds until SIGTERM or SIGINT; only once with `once`."""
    if not once and interval <= 0:
        raise UsageError(f"the interval must be more than 0 seconds, got {interval:g}")
    registry = _registry(device)
    stopping = threading.Event()
    with _until_signalled(stopping.set):
        while True:
            if once:
                _replace(path, generate_latest(registry))
                return
            try:
                _replace(path, generate_latest(registry))
            except Exception as exc:  # noqa: BLE001 - said, and tried again at the next interval
                print(f"spos metrics: cannot write {path}: {exc}; trying again in {interval:g}s",
                      file=sys.stderr, flush=True)
            if stopping.wait(interval):
                return


# -- reading ---------------------------------------------------------------------------------


def tally_runs(store: RunStore) -> tuple[dict[str, AgentTally], dict[tuple[str, str], TaskTally]]:
    """Every run record on disk, read once: per agent, and per (agent, task). A bucket's names
    are all listed before any record is read, so a run moving on meanwhile is missed by this
    scrape (its file is gone when read) rather than counted twice."""
    agents: dict[str, AgentTally] = {}
    tasks: dict[tuple[str, str], TaskTally] = {}
    store.refused.clear()  # what this scrape passes over (a link, something not a directory)
    for agent in store.agents():
        tally = agents[agent] = AgentTally()
        listed = []
        for bucket in BUCKETS:
            try:
                listed += [(bucket, name) for name in store.names(agent, bucket)]
            except (OSError, SposError):
                tally.read_errors += 1
            if f"{AGENTS_DIR}/{agent}/{bucket}" in store.refused:
                tally.read_errors += 1
        for bucket, name in listed:
            try:
                run = store.load(agent, bucket, name)
            except FileNotFoundError:
                continue
            except (CorruptRecord, OSError, SposError):
                tally.read_errors += 1
                continue
            state = _state_of(run)
            if state == "queued":
                tally.queued += 1
            elif state == "active":
                tally.active += 1
            tasks.setdefault((agent, run.record["task"]), TaskTally()).add(run, state)
    for path in store.refused:  # an agent's directory that is a link: none of it can be read
        parent, _, name = path.rpartition("/")
        if parent == AGENTS_DIR and name not in agents:
            agents[name] = AgentTally(read_errors=len(BUCKETS))
    return agents, tasks


def _state_of(run: Run) -> str:
    """The directory says whether a run waits, runs or ended; the record says how it ended."""
    if run.bucket == "queue":
        return "queued"
    if run.bucket == "active":
        return "active"
    state = run.record.get("state")
    return state if isinstance(state, str) and TERMINAL_BUCKET.get(state) == run.bucket else run.bucket


# -- families --------------------------------------------------------------------------------


def _run_families(agents: dict[str, AgentTally],
                  tasks: dict[tuple[str, str], TaskTally]) -> list[Metric]:
    """The executor's families, from tally_runs()."""
    runs = GaugeMetricFamily("spos_runs", "Runs whose record is on disk, by state (finished runs "
                             "stay until retention removes them)", labels=["agent", "task", "state"])
    depth = GaugeMetricFamily("spos_queue_depth", "Runs in the agent's queue: new ones and retries "
                              "waiting for their time", labels=["agent"])
    active = GaugeMetricFamily("spos_active_runs", "Runs of the agent being run now", labels=["agent"])
    errors = GaugeMetricFamily("spos_run_read_errors", "Run files or directories of the agent this "
                               "scrape could not read (not a run record, a link, no permission)",
                               labels=["agent"])
    attempts = GaugeMetricFamily("spos_run_attempts", "Attempts recorded in the runs on disk, by how "
                                 "each ended (interrupted: its executor stopped or died)",
                                 labels=["agent", "task", "state"])
    retries = GaugeMetricFamily("spos_run_retries", "Attempts beyond the first, over the runs on disk",
                                labels=["agent", "task"])
    durations = GaugeHistogramMetricFamily(
        "spos_run_duration_seconds", "Execution time of the finished runs on disk (their attempts' "
        "durations added up); runs that never started are left out", labels=["agent", "task"])
    last_duration = GaugeMetricFamily("spos_run_last_duration_seconds", "Execution time of the task's "
                                      "run that ended last", labels=["agent", "task"])
    last_end = GaugeMetricFamily("spos_run_last_end_timestamp_seconds", "When the task's last run "
                                 "that ended in this state ended", labels=["agent", "task", "state"])
    cpu = GaugeMetricFamily("spos_run_cpu_seconds", "CPU time used by the attempts recorded in the "
                            "runs on disk", labels=["agent", "task"])
    memory = GaugeMetricFamily("spos_run_memory_peak_bytes", "Highest peak memory of an attempt "
                               "recorded in the runs on disk", labels=["agent", "task"])
    io = GaugeMetricFamily("spos_run_io_bytes", "Bytes read and written by the attempts recorded in "
                           "the runs on disk", labels=["agent", "task", "direction"])
    network = GaugeMetricFamily("spos_run_network_bytes", "Bytes sent and received over the network "
                                "by the attempts recorded in the runs on disk (runs on the host's "
                                "network are not counted)", labels=["agent", "task", "direction"])
    slowdown = GaugeMetricFamily("spos_task_slowdown_ratio", "Median runtime of the task's last 5 "
                                 "completed runs over the median of those before (given 10)",
                                 labels=["agent", "task"])
    failed_share = GaugeMetricFamily("spos_task_failed_share", "Part of the task's last 10 runs that "
                                     "ran to an outcome that failed or timed out", labels=["agent", "task"])
    flagged = GaugeMetricFamily("spos_task_flagged", "1 when the task is flagged: trending_slower "
                                "(slowdown over 1.5), failing_often (failed share over one half)",
                                labels=["agent", "task", "flag"])
    for agent, tally in sorted(agents.items()):
        depth.add_metric([agent], tally.queued)
        active.add_metric([agent], tally.active)
        errors.add_metric([agent], tally.read_errors)
    for (agent, task), tally in sorted(tasks.items()):
        for state in STATES:
            runs.add_metric([agent, task, state], tally.states[state])
        for state, count in sorted(tally.attempts.items()):
            attempts.add_metric([agent, task, state], count)
        retries.add_metric([agent, task], tally.retries)
        cumulative, counts = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), tally.buckets):
            cumulative += count
            counts.append((_bound(bound), cumulative))
        durations.add_metric([agent, task], counts, gsum_value=tally.duration_sum)
        if tally.last_duration is not None:
            last_duration.add_metric([agent, task], tally.last_duration[1])
        for state, ended in sorted(tally.last_end.items()):
            last_end.add_metric([agent, task, state], ended)
        if "cpu" in tally.usage:
            cpu.add_metric([agent, task], tally.usage["cpu"])
        if "memory" in tally.usage:
            memory.add_metric([agent, task], tally.usage["memory"])
        for direction in ("read", "write"):
            if direction in tally.usage:
                io.add_metric([agent, task, direction], tally.usage[direction])
        for direction in ("sent", "received"):
            if direction in tally.usage:
                network.add_metric([agent, task, direction], tally.usage[direction])
        found = trend(tally.outcomes)
        if found["slowdown"] is not None:
            slowdown.add_metric([agent, task], found["slowdown"])
        if found["failedShare"] is not None:
            failed_share.add_metric([agent, task], found["failedShare"])
        for flag in FLAGS:
            flagged.add_metric([agent, task, flag.replace(" ", "_")], 1 if flag in found["flags"] else 0)
    return [runs, depth, active, errors, attempts, retries, durations, last_duration, last_end,
            cpu, memory, io, network, slowdown, failed_share, flagged]


def _trigger_families(status: dict | None) -> list[Metric]:
    """The trigger daemon's families, from its status file (None: it never wrote one)."""
    status = status or {}
    # running as `spos status` tells: a status not marked stopped, from a live process
    daemon_up = bool(status) and not status.get("stoppedAt") and process_alive(status.get("pid"))
    up = GaugeMetricFamily("spos_trigger_up", "1 when the trigger daemon runs and the trigger is "
                           "armed (or cooling down after it fired)", labels=["trigger"])
    info = InfoMetricFamily("spos_trigger", "What each registered trigger starts",
                            labels=["trigger"])
    events = CounterMetricFamily("spos_trigger_events_total", "Events the trigger received since "
                                 "the trigger daemon started", labels=["trigger"])
    outcomes = CounterMetricFamily(
        "spos_trigger_outcomes_total", "What became of the trigger's events since the trigger "
        "daemon started (queued: a run was queued, the trigger fired)", labels=["trigger", "outcome"])
    fired = GaugeMetricFamily("spos_trigger_last_fired_timestamp_seconds", "When the trigger last "
                              "queued a run", labels=["trigger"])
    for name, trigger in sorted((status.get("triggers") or {}).items()):
        up.add_metric([name], 1 if daemon_up and trigger.get("state") in TRIGGER_UP_STATES else 0)
        info.add_metric([name], {key: str(trigger.get(key) or "") for key in ("agent", "task", "type")})
        count = amount(trigger.get("events"))
        if count is not None:
            events.add_metric([name], count)
        for outcome in OUTCOMES:
            count = amount(trigger.get(outcome))
            if count is not None:
                outcomes.add_metric([name, outcome], count)
        last_fired = _epoch(trigger.get("lastFired"))
        if last_fired is not None:
            fired.add_metric([name], last_fired)
    return [_gauge("spos_triggers_daemon_up", "1 when the trigger daemon runs", 1 if daemon_up else 0),
            up, info, events, outcomes, fired]


def _sync_families(state: SyncState) -> list[Metric]:
    """The sync loop's families, from `sync/state.json`."""
    last, failure, applied, drift = (state.last or {}, state.last_failure or {}, state.applied or {},
                                     state.drift or {})
    outcome = GaugeMetricFamily("spos_sync_last_outcome", "1 for the outcome of the last sync, 0 "
                                "for the others (all 0 before the first sync)", labels=["outcome"])
    for name in SYNC_OUTCOMES:
        outcome.add_metric([name], 1 if name == last.get("outcome") else 0)
    revision = InfoMetricFamily("spos_sync_applied", "The revision the device runs",
                                labels=["revision"])
    if state.applied_revision:
        revision.add_metric([state.applied_revision], {})
    repairs = drift.get("repairs")
    return [
        outcome,
        _gauge("spos_sync_last_timestamp_seconds", "When the last sync ended", _epoch(last.get("at"))),
        _gauge("spos_sync_last_failure_timestamp_seconds", "When the last sync that failed ended",
               _epoch(failure.get("at"))),
        revision,
        _gauge("spos_sync_applied_timestamp_seconds", "When the applied revision was applied",
               _epoch(applied.get("at"))),
        _gauge("spos_sync_quarantined_revisions", "Revisions refused and held back until a new "
                                                  "commit", len(state.quarantined)),
        CounterMetricFamily("spos_drift_repairs_total", "Changes made by hand that drift repair put "
                            "back", value=repairs if isinstance(repairs, int) else 0),
        _gauge("spos_drift_last_check_timestamp_seconds", "When drift was last checked",
               _epoch(drift.get("checkedAt"))),
    ]


def _gauge(name: str, documentation: str, value) -> GaugeMetricFamily:
    """A gauge without labels; without a sample when `value` is None (nothing to tell yet)."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"




def _epoch(iso) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


# -- exposing --------------------------------------------------------------------------------


def _registry(device: Device) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)  # no collect() at registration
    registry.register(DeviceCollector(device))
    return registry


class _MetricsHandler(BaseHTTPRequestHandler):
    server: "_MetricsServer"
    timeout = CLIENT_TIMEOUT  # a client that sends nothing, or reads nothing, is let go

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._answer(404, "text/plain; charset=utf-8", b"not found: the metrics are at /metrics\n")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        try:
            with self.server.scraping:  # one scrape reads the device at a time
                body = encoder(self.server.registry)
        except (OSError, SposError) as exc:  # the state cannot be read now; the next scrape may
            self._answer(500, "text/plain; charset=utf-8", f"spos metrics: {exc}\n".encode())
            return
        except Exception as exc:  # noqa: BLE001 - a bug, said on stderr; the scraper gets a 500
            print(f"spos metrics: the scrape failed: {exc!r}", file=sys.stderr, flush=True)
            self._answer(500, "text/plain; charset=utf-8", b"spos metrics: the scrape failed\n")
            return
        self._answer(200, content_type, body)

    def _answer(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        """Scrapes are not logged: one every few seconds would fill the log with nothing."""


class _MetricsServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once: a connection over that is
    closed at once, so clients that hold connections open cannot exhaust threads or fds."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: str, port: int, registry: CollectorRegistry):
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.registry = registry
        self.scraping = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((address, port), _MetricsHandler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A scraper that went away mid-answer, or timed out, is not an error; anything else
        is a bug."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse lookup of the address, which can hang for the DNS
        timeout on a device without DNS."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]



@contextmanager
def _until_signalled(on_signal: Callable[[], None]):
    """Call `on_signal` on SIGTERM or SIGINT while inside; the previous handlers come back on
    the way out. Off the main thread, where Python delivers no signals, nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, lambda *_: on_signal())
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _replace(path: str, data: bytes) -> None:
    """Replace the file at `path` atomically: a temporary file in its directory (a dot file, so
    node_exporter's `*.prom` never matches it), then a rename. Readers see the old file or the
    new one, never a part. Not fsynced: the file is rewritten every interval, so sparing a
    device's flash an fsync every 15 s costs at most an empty or stale file until the next write
    after a power loss."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.spos-tmp-{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
