"""Run records on disk: where each run is, and the only ways it moves.

A run is one JSON file. Its directory is its state bucket, per agent under
`<state>/agents/<agent>/`:

    queue/      queued, or waiting for a retry (`notBefore`)
    active/     claimed by an executor, running
    completed/  succeeded
    failed/     failed, timed out, cancelled, skipped or expired (the record's `state` says which)

The file keeps its name in every bucket, `<100-priority>-<enqueue ns>-<run id>.json`, so the
queue sorts by priority, then age. Every move is a rename within one file system, so a run is
in exactly one bucket at any instant; claiming is `rename(queue/x, active/x)`, which succeeds
for exactly one of several executors. A record is rewritten with the device layer's atomic
write, so readers never see a torn file.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from reconciler import AGENTS_DIR
from reconciler.device import Device

BUCKETS = ("queue", "active", "completed", "failed")
TERMINAL_BUCKET = {
    "completed": "completed",
    "failed": "failed",
    "timeout": "failed",
    "cancelled": "failed",
    "skipped": "failed",
    "expired": "failed",
}
STATES = ("queued", "active", *TERMINAL_BUCKET)


@dataclass
class Run:
    """A run record and where it lives."""

    agent: str
    bucket: str
    name: str
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def state(self) -> str:
        return self.record.get("state") or ("queued" if self.bucket == "queue" else self.bucket)

    @property
    def path(self) -> str:
        return f"{AGENTS_DIR}/{self.agent}/{self.bucket}/{self.name}"


class CorruptRecord(Exception):
    """A run file that is not a readable record; it is set aside, never retried."""


class RunStore:
    """Every agent's runs on one device."""

    def __init__(self, device: Device):
        self.device = device

    def agents(self) -> list[str]:
        return [name for name in self.device.listdir(AGENTS_DIR) if not name.startswith(".")]

    def names(self, agent: str, bucket: str) -> list[str]:
        return [
            name for name in self.device.listdir(f"{AGENTS_DIR}/{agent}/{bucket}")
            if name.endswith(".json") and not name.startswith(".")
        ]

    def load(self, agent: str, bucket: str, name: str) -> Run:
        raw = self.device.read_text(f"{AGENTS_DIR}/{agent}/{bucket}/{name}")
        if raw is None:
            raise FileNotFoundError(name)
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise CorruptRecord(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise CorruptRecord(f"{name}: not a run record")
        return Run(agent, bucket, name, record)

    def runs(self, agent: str | None = None, buckets=BUCKETS) -> Iterator[Run]:
        """Every readable run, bucket by bucket, in queue order within a bucket."""
        for name_of_agent in [agent] if agent else self.agents():
            for bucket in buckets:
                for name in self.names(name_of_agent, bucket):
                    try:
                        yield self.load(name_of_agent, bucket, name)
                    except (FileNotFoundError, CorruptRecord):
                        continue

    def find(self, run_id: str) -> Run | None:
        suffix = f"-{run_id}.json"
        # A run that moves while we look (claimed, finished, or queued again for a retry,
        # which is a move back to an earlier bucket) is looked for again.
        for _ in range(3):
            for agent in self.agents():
                for bucket in BUCKETS:
                    for name in self.names(agent, bucket):
                        if name.endswith(suffix):
                            try:
                                return self.load(agent, bucket, name)
                            except FileNotFoundError:
                                continue
                            except CorruptRecord:
                                return None
        return None

    def save(self, run: Run) -> None:
        """Rewrite the record in place, atomically."""
        data = (json.dumps(run.record, indent=2, sort_keys=True) + "\n").encode()
        self.device.write_atomic(run.path, data, mode=0o644)

    def claim(self, run: Run) -> bool:
        """Move a queued run to active; False when another executor was faster. Executors
        hold `locked()` around the claim and the write of their ownership."""
        return self.move(run, "active")

    @contextmanager
    def locked(self):
        """The claim lock (flock on `agents/.claims.lock`). A claim and the recording of its
        owner happen under it, and so does recovery: a run claimed a moment ago is never
        mistaken for one whose executor died."""
        fd = os.open(self.device.path(f"{AGENTS_DIR}/.claims.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def finish(self, run: Run, state: str) -> None:
        """Record the final state and move the run to its terminal bucket."""
        run.record["state"] = state
        self._relocate(run, TERMINAL_BUCKET[state])

    def requeue(self, run: Run) -> None:
        """Put an active run back in the queue (a retry, or a run whose executor died): the
        record is rewritten in active/, then renamed, so no executor can claim a queued copy
        while the active one still exists."""
        run.record["state"] = "queued"
        self.save(run)
        self.move(run, "queue")

    def set_aside(self, agent: str, bucket: str, name: str, reason: str) -> None:
        """Move an unreadable file out of the way, into failed/, renamed so it is never retried."""
        source = self.device.path(f"{AGENTS_DIR}/{agent}/{bucket}/{name}")
        target = self.device.path(f"{AGENTS_DIR}/{agent}/failed/{name}.corrupt")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        note = self.device.path(f"{AGENTS_DIR}/{agent}/failed/{name}.corrupt.reason")
        note.write_text(reason + "\n")

    def _relocate(self, run: Run, bucket: str) -> None:
        """Write the updated record into `bucket`, then drop the old copy. A crash in between
        leaves two copies; the executor's recovery keeps the one in the later bucket."""
        target = Run(run.agent, bucket, run.name, run.record)
        self.device.makedirs(f"{AGENTS_DIR}/{run.agent}/{bucket}", mode=0o750)
        self.save(target)
        if bucket != run.bucket:
            self.device.remove(run.path)
        run.bucket = bucket

    def move(self, run: Run, bucket: str) -> bool:
        """Rename the run's file into `bucket`; False when it was no longer where `run` says."""
        source = self.device.path(run.path)
        self.device.makedirs(f"{AGENTS_DIR}/{run.agent}/{bucket}", mode=0o750)
        target = self.device.path(f"{AGENTS_DIR}/{run.agent}/{bucket}/{run.name}")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return False
        run.bucket = bucket
        return True
