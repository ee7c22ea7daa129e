"""One active run: its sandboxed process, its log, its progress channel, its clock.

A run is a sequence of steps (a single-command task is one step). Each step is its own
sandboxed process; the run's record says which steps finished, so a retried or resumed run
starts at the first unfinished one. Output (stdout and stderr together) is copied to the run's
log as it arrives, within the quota's log size (the log is rotated once to `.1`). Progress
lines arrive on the fd named by `SPOS_PROGRESS_FD` (see docs/executor.md); every line is a heartbeat.
A log or record the state file system refuses to write (full, failing, read-only) fails the run,
never the executor: see `ActiveRun.storage_problem`.

Durations use the monotonic clock; wall-clock times are only recorded for people.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.executor.runs import Run, storage_failure

DEFAULT_LOG_BYTES = 10 * 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def run_dirs(agent: str, run_id: str) -> dict[str, str]:
    """Device paths of the directories a run may write."""
    base = f"{AGENTS_DIR}/{agent}"
    return {
        "checkpoint": f"{base}/checkpoints/{run_id}",
        "tmp": f"{base}/tmp/{run_id}",
        "output": f"{base}/output",
        "log": f"{base}/logs/{run_id}.log",
    }


@dataclass
class LogWriter:
    """Appends to a run's log, rotating once to `.1` when it would pass `limit` bytes.

    A write the file system refuses (`storage_failure`) does not raise: it is kept in
    `failure`, the run's further output is dropped, and the executor fails the run. What is
    written before the first `open()` is kept until then (a run's first step may be worked
    out before its log is made: Executor._hand_over)."""

    device: Device
    path: str
    limit: int
    fd: int = -1
    size: int = 0
    failure: OSError | None = None
    early: list[bytes] | None = field(default_factory=list)

    def open(self) -> None:
        host = self.device.host(self.path)
        self.fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size
        early, self.early = self.early, None
        for data in early or ():
            self._append(data)

    def write(self, data: bytes) -> None:
        """Append the run's output; dropped once a write failed."""
        if self.failure is None:
            self._append(data)

    def note(self, text: str) -> None:
        """Append a `--- spos` line. Tried even after a failed write: when room came back, the
        end of the run is in its log."""
        self._append(f"--- spos {now_iso()} {text}\n".encode())

    def _append(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
            return
        try:
            while data and self.fd >= 0:
                room = self.limit - self.size
                if room <= 0 or (self.size and len(data) > room):
                    self._rotate()
                    room = self.limit
                piece, data = data[:room], data[room:]  # a chunk bigger than the limit is split
                while piece:
                    written = os.write(self.fd, piece)
                    self.size += written
                    piece = piece[written:]
        except OSError as exc:
            if not storage_failure(exc):
                raise
            self.failure = self.failure or exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _rotate(self) -> None:
        host = self.device.path(self.path)
        os.close(self.fd)
        self.fd = -1
        os.replace(host, f"{host}.1")
        self.open()


@dataclass
class Step:
    index: int
    name: str
    argv: list[str]
    timeout: float | None
    continue_on_error: bool


def steps_of(task: dict) -> list[Step]:
    if task.get("steps"):
        return [
            Step(i, s["name"], s["command"], s.get("timeoutSeconds"), s.get("continueOnError", False))
            for i, s in enumerate(task["steps"])
        ]
    return [Step(0, "main", task["command"], None, False)]


@dataclass
class ActiveRun:
    """Bookkeeping for one run between its claim and its end."""

    run: Run
    task: dict
    config: dict
    log: LogWriter
    steps: list[Step]
    deadline: float
    step: Step | None = None
    process: object = None
    output_fd: int = -1
    progress_fd: int = -1
    step_deadline: float | None = None
    terminated_at: float | None = None
    ending: str | None = None       # "timeout", "cancelled" or "failed" once the executor decided so
    reason: str = ""
    record_failure: OSError | None = None  # the record could not be written (see storage_problem)
    setup_problem: str | None = None  # why the run cannot start, found while preparing it
    claim: bool = False  # the claim's record is yet to be written (Executor._commit_claim)
    holds_claim_lock: bool = False  # its claim was refused: the lock is kept until its end
    network: tuple | None = None  # the first step's network, worked out before the claim
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_saved: float = 0.0
    progress_buffer: bytes = b""
    usage: dict = field(default_factory=dict)
    # Between a step's exit and its end: pidfds of what is left in its cgroup (bubblewrap's
    # namespace init on its way out), the step's exit code, and until when to wait for them.
    settling: list[int] = field(default_factory=list)
    exit_code: int | None = None
    settle_deadline: float = 0.0

    @property
    def id(self) -> str:
        return self.run.id

    def remaining_steps(self) -> list[Step]:
        done = set(self.run.record.get("stepsDone", []))
        return [s for s in self.steps if s.name not in done]

    def next_deadline(self, grace: float) -> float:
        if self.settling:
            return self.settle_deadline
        if self.terminated_at is not None:
            return self.terminated_at + grace
        if self.storage_problem():
            return 0.0  # to be stopped at once
        return min(d for d in (self.deadline, self.step_deadline, self.heartbeat_deadline()) if d is not None)

    def heartbeat_deadline(self) -> float | None:
        limit = self.task.get("heartbeatTimeoutSeconds")
        return None if not limit else self.last_heartbeat + float(limit)

    def expired(self, now: float) -> str | None:
        """Why the run must be stopped now (a timeout or a missing heartbeat), or None."""
        if now >= self.deadline:
            return f"run timed out after {self.task.get('timeoutSeconds'):g}s"
        if self.step_deadline is not None and now >= self.step_deadline:
            return f"step {self.step.name} timed out after {self.step.timeout:g}s"
        heartbeat = self.heartbeat_deadline()
        if heartbeat is not None and now >= heartbeat:
            return f"hung: no heartbeat for {self.task['heartbeatTimeoutSeconds']:g}s"
        return None

    def storage_problem(self) -> str | None:
        """Why the run must fail because the state file system refused its record or its log
        (full, over quota, failing or read-only), or None."""
        for what, failure in (("record", self.record_failure), ("log", self.log.failure)):
            if failure is not None:
                return f"its {what} could not be written: {failure.strerror}"
        return None

    def handle_progress(self, data: bytes) -> bool:
        """Parse progress lines; True when the record changed."""
        self.progress_buffer += data
        self.last_heartbeat = time.monotonic()
        changed = False
        while b"\n" in self.progress_buffer:
            line, self.progress_buffer = self.progress_buffer.split(b"\n", 1)
            changed |= self._progress_line(line.decode(errors="replace").strip())
        if len(self.progress_buffer) > 4096:
            self.progress_buffer = b""
        return changed

    def _progress_line(self, line: str) -> bool:
        record = self.run.record
        record["heartbeatAt"] = now_iso()
        word, _, rest = line.partition(" ")
        if word == "progress":
            value, _, message = rest.partition(" ")
            try:
                record["progress"] = {"percent": max(0.0, min(100.0, float(value))), "message": message}
            except ValueError:
                return True
        elif word == "message":
            record.setdefault("progress", {})["message"] = rest
        return True
