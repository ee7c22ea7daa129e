"""The on-disk action queue, as far as enqueueing goes (what cron calls every minute).

A queued action is one JSON file in `<state>/agents/<agent>/queue/`, written atomically; its
name sorts by priority (highest first), then by time. The format is a contract with the
executor, documented in docs/queue.md. This module imports only the standard library and the
device layer, so that `spos action run` starts fast.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timedelta, timezone

from reconciler import STATE_DIR
from reconciler.device import Device
from reconciler.errors import SposError

QUEUE_FORMAT = 1


class UnknownTaskError(SposError):
    """The agent or task is not applied on this device."""


def enqueue(
    device: Device,
    agent: str,
    task: str,
    *,
    priority: int | None = None,
    source: dict | None = None,
    deadline_seconds: float | None = None,
    now: float | None = None,
) -> dict:
    """Queue one run of `agent`/`task` and return the queued record (its `id` names the run)."""
    config = _agent_config(device, agent)
    tasks = config.get("tasks", {})
    if task not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise UnknownTaskError(f"agent {agent!r} has no task {task!r} (its tasks: {known})")
    if priority is None:
        priority = int(tasks[task].get("priority", 50))
    if not 0 <= priority <= 100:
        raise UnknownTaskError(f"priority must be 0-100, got {priority}")
    now = time.time() if now is None else now
    enqueued = datetime.fromtimestamp(now, timezone.utc)
    run_id = f"{enqueued:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    record = {
        "format": QUEUE_FORMAT,
        "id": run_id,
        "agent": agent,
        "task": task,
        "priority": priority,
        "enqueuedAt": enqueued.isoformat(timespec="milliseconds"),
        "notAfter": (
            (enqueued + timedelta(seconds=deadline_seconds)).isoformat(timespec="milliseconds")
            if deadline_seconds is not None else None
        ),
        "source": source or {"kind": "manual"},
        "attempt": 1,
    }
    name = f"{100 - priority:03d}-{int(now * 1e9):020d}-{run_id}.json"
    queue = f"/{STATE_DIR}/agents/{agent}/queue"
    if not device.is_dir(queue):
        device.makedirs(queue, mode=0o750)
    device.write_atomic(
        f"{queue}/{name}",
        (json.dumps(record, indent=2) + "\n").encode(),
        mode=0o644,
    )
    return record


def _agent_config(device: Device, agent: str) -> dict:
    path = f"/{STATE_DIR}/agents/{agent}/agent.json"
    raw = device.read_text(path) if "/" not in agent and agent not in ("", ".", "..") else None
    if raw is None:
        raise UnknownTaskError(f"agent {agent!r} is not applied on this device (no {path})")
    try:
        return json.loads(raw)
    except ValueError:
        raise UnknownTaskError(f"{path} is not valid JSON; run spos apply to repair it") from None
