"""One fixed device state, laid out by hand the way spos's processes leave it: run records of
two tasks in every state, a torn record, an idle agent, a live trigger daemon's status and a
sync state. `spos metrics`, `spos status` and the listings are checked against it."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

STATE = "var/lib/systemprompt-os"
AGENT = "research-001"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc).timestamp()
HOUR = 3600.0
MIB = 1024 * 1024
APPLIED = "4db0c13a5c69e0a1b2c3d4e5f60718293a4b5c6d"
QUARANTINED = ("ff1a8ca0a41c0000000000000000000000000000", "0badc0de00000000000000000000000000000000")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def attempt(number: int, state: str, seconds: float | None = None, usage: dict | None = None) -> dict:
    entry = {"attempt": number, "startedAt": iso(NOW - 5 * HOUR), "endedAt": iso(NOW - 5 * HOUR),
             "state": state, "exitCode": 0 if state == "completed" else None, "reason": ""}
    if seconds is not None:
        entry.update(durationSeconds=seconds, usage=usage or {})
    return entry


def usage(cpu: float, memory: int, read: int, write: int, sent: int | None = None,
          received: int | None = None) -> dict:
    found = {"cpuSeconds": cpu, "peakMemoryBytes": memory, "readBytes": read, "writeBytes": write}
    if sent is not None:
        found.update(networkSentBytes=sent, networkReceivedBytes=received)
    return found


class DeviceState:
    """A device root with run records, a trigger daemon status and a sync state, as written by
    the processes that own them."""

    def __init__(self, root: Path):
        self.root = root
        self.serial = 0
        self.run_ids: list[str] = []

    def agent(self, agent: str) -> Path:
        directory = self.root / STATE / "agents" / agent
        for bucket in ("queue", "active", "completed", "failed"):
            (directory / bucket).mkdir(parents=True, exist_ok=True)
        return directory

    def run(self, agent: str, task: str, bucket: str, state: str | None = None, *, attempt: int = 1,
            attempts: list | None = None, ended_hours_ago: float | None = None,
            duration: float | None = None) -> str:
        self.serial += 1
        run_id = f"20261126T090000-{self.serial:08x}"
        record = {"format": 1, "id": run_id, "agent": agent, "task": task, "priority": 50,
                  "enqueuedAt": iso(NOW - 6 * HOUR), "notAfter": None,
                  "source": {"kind": "schedule", "name": f"{agent}-daily"}, "attempt": attempt}
        if state is not None:
            record["state"] = state
        if attempts is not None:
            record["attempts"] = attempts
        if ended_hours_ago is not None:
            record["endedAt"] = iso(NOW - ended_hours_ago * HOUR)
        if duration is not None:
            record["durationSeconds"] = duration
        name = f"050-{int(NOW * 1e9) + self.serial:020d}-{run_id}.json"
        (self.agent(agent) / bucket / name).write_text(json.dumps(record, indent=2, sort_keys=True))
        self.run_ids.append(run_id)
        return run_id

    def state_file(self, path: str, data: dict) -> None:
        target = self.root / STATE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def trigger_status(agent: str, task: str, kind: str, state: str, events: int = 0, last_fired: str | None = None,
             **outcomes: int) -> dict:
    """A trigger as the daemon's status lists it: what it starts, its state, its counts."""
    counts = {**dict.fromkeys(("queued", "debounced", "duplicate", "limited", "skipped", "disabled", "error"), 0),
              **outcomes}
    return {"type": kind, "agent": agent, "task": task, "state": state, "detail": "", "digest": "d",
            "events": events, **counts, "lastEvent": None, "lastFired": last_fired, "lastRun": None,
            "lastError": ""}


def build(root: Path) -> DeviceState:
    """research-001 with two tasks' runs queued, active and ended (completed, timeout, expired,
    cancelled), a torn record, an agent with no runs, a live trigger daemon with three triggers,
    and a sync state with an applied revision, two quarantined ones, a quarantining last sync
    and three drift repairs."""
    state = DeviceState(root)
    scan, report = "daily_scan", "weekly_report"
    state.run(AGENT, scan, "completed", "completed", ended_hours_ago=3,
              attempts=[attempt(1, "completed", 12.5, usage(2.0, 100 * MIB, 1000, 500))])
    state.run(AGENT, scan, "completed", "completed", attempt=2, ended_hours_ago=2, attempts=[
        attempt(1, "failed", 0.5, usage(0.25, 50 * MIB, 10, 20)),
        attempt(2, "completed", 40.0, usage(3.0, 200 * MIB, 2000, 1000, 5000, 70000))])
    state.run(AGENT, scan, "failed", "timeout", ended_hours_ago=1,
              attempts=[attempt(1, "timeout", 4000.0, usage(1.0, 80 * MIB, 0, 0))])
    state.run(AGENT, scan, "queue", "queued", attempt=2,  # waiting for its retry
              attempts=[attempt(1, "failed", 2.0, usage(0.5, 10 * MIB, 5, 5))])
    state.run(AGENT, scan, "failed", "expired", ended_hours_ago=0.5)  # never started
    state.run(AGENT, report, "active", "active", attempts=[])
    state.run(AGENT, report, "queue")
    state.run(AGENT, report, "failed", "cancelled", attempt=2, ended_hours_ago=4, attempts=[
        attempt(1, "interrupted"), attempt(2, "cancelled", 7.0)])
    agent = state.agent(AGENT)
    (agent / "queue" / "050-00000000000000000099-torn.json").write_text("{not json")
    (agent / "queue" / ".050-00000000000000000100-x.json.spos-tmp-1").write_text("{}")  # being written
    (agent / "failed" / "050-00000000000000000098-old.json.corrupt").write_text("set aside")
    state.agent("idle-001")

    state.state_file("triggerd/status.json", {
        "format": 1, "pid": os.getpid(), "startedAt": iso(NOW - 10 * HOUR), "listen": "127.0.0.1:9180",
        "listenError": None, "updatedAt": iso(NOW),
        "triggers": {
            "research-001-github": trigger_status(AGENT, scan, "webhook", "armed", events=9, queued=4,
                                            duplicate=2, limited=1, skipped=1, error=1,
                                            last_fired=iso(NOW - 600)),
            "research-001-drop": trigger_status(AGENT, report, "filesystem", "error"),
            "research-001-broken": {"state": "error", "detail": "not JSON", "digest": "e"},
        },
    })
    last = {"at": iso(NOW - 60), "outcome": "quarantined", "revision": QUARANTINED[0],
            "message": "revision ff1a8ca0a41c quarantined (validate)", "reasons": ["bad"],
            "changed": [], "failed": [], "notes": []}
    state.state_file("sync/state.json", {
        "format": 1, "repo": {"url": "https://git.example.net/fleet", "branch": "main", "path": "agents.d"},
        "applied": {"revision": APPLIED, "at": iso(NOW - 2 * HOUR), "changed": 23, "checkedAt": iso(NOW - 60)},
        "quarantined": {sha: {"stage": "validate", "at": iso(NOW - 60 - n), "reasons": ["bad"], "count": 1,
                              "settings": ""} for n, sha in enumerate(QUARANTINED)},
        "last": last, "lastFailure": last,
        "drift": {"checkedAt": iso(NOW - 30), "revision": APPLIED, "repairs": 3, "lastRepair": None},
    })
    return state


