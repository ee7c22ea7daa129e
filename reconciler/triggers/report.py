"""`spos trigger list` and `spos trigger test`: what the registrations and the daemon say.

Both read the registrations (the reconciler's) and the daemon's status file; neither needs a
daemon to run. `test` queues through the same gate and attachments as a real event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from datetime import datetime

from reconciler import AGENTS_DIR, TRIGGERS_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.executor.enqueue import ATTACHMENTS_DIR, travel_in_record
from reconciler.executor.owner import process_alive
from reconciler.triggers.base import Event, Registration
from reconciler.triggers.daemon import HEARTBEAT_RANGE, STATUS_HEARTBEAT, read_status
from reconciler.triggers.gate import Gate

STALE_AFTER = 3
"""A status file older than this many of its daemon's heartbeats (`heartbeatSeconds`, else
STATUS_HEARTBEAT), from a daemon that is still alive, is shown as stale."""


class TriggerError(SposError):
    """A trigger named on the command line cannot be used; the message says why."""


def listing(device: Device) -> dict:
    """Every registration with the daemon's view of it (docs/triggers.md: `trigger list --json`)."""
    status = read_status(device)
    daemon = _daemon(status)
    seen = status["triggers"] if daemon["running"] else {}
    triggers = []
    for entry in device.listdir(TRIGGERS_DIR):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        name = entry[:-5]
        try:
            raw = device.read_bytes(f"{TRIGGERS_DIR}/{entry}") or b""
        except (OSError, SposError) as exc:
            triggers.append({**_entry(name, b"", None, daemon), "state": "error", "detail": str(exc)})
            continue
        triggers.append(_entry(name, raw, seen.get(name), daemon))
    return {"daemon": daemon, "triggers": triggers}


def _daemon(status: dict | None) -> dict:
    if status is None:
        return {"running": False, "pid": None, "detail": "no trigger daemon has run on this device",
                "listen": None}
    pid = status.get("pid")
    if status.get("stoppedAt"):
        return {"running": False, "pid": pid, "listen": None,
                "detail": f"the trigger daemon stopped at {status['stoppedAt']}"}
    if not process_alive(pid):
        return {"running": False, "pid": pid, "listen": None,
                "detail": f"the trigger daemon (pid {pid}) died; its last status is from {status.get('updatedAt')}"}
    detail = f"pid {pid}, since {status.get('startedAt')}"
    if status.get("listen"):
        detail += f", webhooks on {status['listen']}"
    if status.get("listenError"):
        detail += f", webhooks not served: {status['listenError']}"
    updated = _epoch(status.get("updatedAt"))
    heartbeat = status.get("heartbeatSeconds")
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) \
            or not HEARTBEAT_RANGE[0] <= heartbeat <= HEARTBEAT_RANGE[1]:
        heartbeat = STATUS_HEARTBEAT  # NaN too: no comparison holds
    if updated is not None and time.time() - updated > STALE_AFTER * heartbeat:
        detail += f" (status not updated since {status.get('updatedAt')})"
    return {"running": True, "pid": pid, "detail": detail, "listen": status.get("listen")}


def _entry(name: str, raw: bytes, seen: dict | None, daemon: dict) -> dict:
    try:
        registration = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        registration = {}
    if not isinstance(registration, dict):
        registration = {}
    entry = {
        "name": name,
        "type": registration.get("type"),
        "agent": registration.get("agent"),
        "task": registration.get("task"),
        "enabled": registration.get("enabled", True),
    }
    if not daemon["running"]:
        state, detail, seen = "not running", "start it with: spos triggers", {}
    elif seen is None or seen.get("digest") != hashlib.sha256(raw).hexdigest():
        state, detail, seen = "loading", "changed; the daemon loads it at its next look", {}
    else:
        state, detail = seen.get("state"), seen.get("detail", "")
    return {**entry, "state": state, "detail": detail, **{key: seen.get(key) for key in COUNTS}}


COUNTS = ("events", "queued", "debounced", "duplicate", "limited", "skipped", "disabled", "error",
          "lastEvent", "lastFired", "lastRun", "lastError")
"""What `trigger list --json` gives of each trigger's history (null without a running daemon)."""


def text(report: dict) -> str:
    daemon = report["daemon"]
    lines = [f"Trigger daemon: {'running' if daemon['running'] else 'not running'} ({daemon['detail']})"]
    if not report["triggers"]:
        return "\n".join(lines + ["No triggers are registered (apply Trigger manifests first)."]) + "\n"
    rows = [("NAME", "TYPE", "AGENT/TASK", "STATE", "LAST FIRED", "EVENTS", "QUEUED", "DETAIL")]
    for t in report["triggers"]:
        rows.append(tuple(str(cell) for cell in (
            t["name"], t["type"] or "?", f"{t['agent']}/{t['task']}", t["state"] or "?",
            _short_time(t.get("lastFired")), _number(t.get("events")), _number(t.get("queued")),
            _detail(t),
        )))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _detail(entry: dict) -> str:
    parts = [entry.get("detail") or ""]
    dropped = [f"{entry[key]} {key}" for key in ("duplicate", "limited", "skipped", "error")
               if entry.get(key)]
    if dropped:
        parts.append("not queued: " + ", ".join(dropped))
    if entry.get("lastError"):
        parts.append(f"last error: {entry['lastError']}")
    return "; ".join(p for p in parts if p)


PAYLOAD_LIMIT = 64 * 1024 * 1024
"""The largest payload `spos trigger test --payload` reads; a webhook trigger's own
`maxBodySize` applies within it."""


def read_payload(path: str) -> bytes:
    """A test payload's content: a regular file of at most PAYLOAD_LIMIT bytes (a device or a
    FIFO named by mistake must neither hang nor fill memory). ValueError says what is wrong."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > PAYLOAD_LIMIT:
            raise ValueError(f"{st.st_size} bytes; a test payload is at most {PAYLOAD_LIMIT} bytes")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(PAYLOAD_LIMIT + 1)
    finally:
        os.close(fd)
    if len(data) > PAYLOAD_LIMIT:
        raise ValueError(f"more than {PAYLOAD_LIMIT} bytes; a test payload is at most that")
    return data


def fire(device: Device, name: str, payload: bytes | None = None, dry_run: bool = False) -> dict:
    """Fire trigger `name` by hand with one test event, as its source would, and say what was
    (with `dry_run`: would be) queued. Debounce and rate limit are bypassed, so the run is
    queued at once; a disabled trigger fires all the same; concurrency Forbid still applies.
    A webhook trigger refuses a payload its listener would refuse (over its `maxBodySize`)."""
    registration = _registration(device, name)
    if payload is not None and registration.type == "webhook":
        from reconciler.triggers.webhook import DEFAULT_MAX_BODY_BYTES

        limit = (registration.config or {}).get("maxBodyBytes", DEFAULT_MAX_BODY_BYTES)
        if isinstance(limit, int) and len(payload) > limit:
            raise TriggerError(f"the payload is {len(payload)} bytes; trigger {name}'s webhook "
                               f"takes at most {limit} (its maxBodySize) and answers 413 to more")
    manual = dataclasses.replace(registration, enabled=True, debounce_seconds=0.0, rate_limit=None)
    gate = Gate(device, manual)
    event = Event(data={"test": "1"}, payload=payload)
    source, attachments = gate.compose([event], 1)
    tmp = f"{AGENTS_DIR}/{registration.agent}/tmp/<run id>/{ATTACHMENTS_DIR}"
    result = {
        "trigger": name,
        "type": registration.type,
        "agent": registration.agent,
        "task": registration.task,
        "concurrency": registration.concurrency,
        "source": source,
        "attachments": {file: len(content) for file, content in sorted(attachments.items())},
        # Small ones travel in the queue record; the executor writes them as the run starts.
        "attachmentsInRecord": travel_in_record(attachments),
        "dryRun": dry_run,
    }
    if dry_run:
        busy = gate.pending() if registration.concurrency == "Forbid" or registration.type == "continuous" else None
        result["status"] = "would skip" if busy else "would queue"
        result["detail"] = f"run {busy} it queued has not ended" if busy else ""
        result["attachmentsDir"] = tmp
        return result
    try:
        outcome = gate(event)
    finally:
        gate.close(flush=False)
    result["status"], result["run"], result["detail"] = outcome.status, outcome.run, outcome.detail
    if outcome.run:
        result["attachmentsDir"] = tmp.replace("<run id>", outcome.run)
    return result


def _registration(device: Device, name: str) -> Registration:
    path = f"{TRIGGERS_DIR}/{name}.json"
    try:
        raw = device.read_bytes(path) if "/" not in name and name not in ("", ".", "..") else None
    except (OSError, SposError) as exc:
        raise TriggerError(f"{path}: {exc}") from None
    if raw is None:
        known = sorted(e[:-5] for e in device.listdir(TRIGGERS_DIR)
                       if e.endswith(".json") and not e.startswith("."))
        raise TriggerError(f"no trigger {name!r} is registered on this device "
                           f"(registered: {', '.join(known) or 'none'})")
    try:
        return Registration.from_json(json.loads(raw), hashlib.sha256(raw).hexdigest())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TriggerError(f"{path}: {exc}; run spos apply to repair it") from None


def fire_text(result: dict) -> str:
    verb = {"queued": "Queued", "would queue": "Would queue"}.get(result["status"])
    if result["status"] == "would skip":
        why = ("a continuous trigger never overlaps its own runs"
               if result.get("type") == "continuous" else "concurrency Forbid")
        return f"Would queue nothing ({why}): {result['detail']}\n"
    what = f"{result['agent']}/{result['task']}"
    if verb is None:  # nothing was queued: no source, no attachments to tell of
        return f"Not queued ({result['status']}): {result.get('detail') or 'see spos trigger list'}\n"
    if result.get("run"):
        lines = [f"{verb} run {result['run']} of {what} from trigger {result['trigger']}."]
    else:
        lines = [f"{verb} a run of {what} from trigger {result['trigger']}."]
    lines.append(f"  source: {json.dumps(result['source'], sort_keys=True)}")
    if result.get("concurrency"):
        lines.append(f"  concurrency: {result['concurrency']} (the trigger's)")
    later = " (in the queued record; written there when the run starts)" \
        if result.get("attachmentsInRecord") else ""
    for file, size in result["attachments"].items():
        lines.append(f"  attachment: {result.get('attachmentsDir', '')}/{file} ({size} bytes){later}")
    return "\n".join(lines) + "\n"




def _epoch(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def _short_time(text) -> str:
    return str(text)[:19].replace("T", " ") if text else "-"


def _number(value) -> str:
    return "-" if value is None else str(value)
