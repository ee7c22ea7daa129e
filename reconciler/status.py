"""`spos status`: what the device runs and how its loops are doing, from their state files.

It reads, and never changes: the sync state (`sync/state.json`: the applied revision, the
quarantined ones, the last sync, the last drift check), the daemon's `daemon.json`, the
trigger daemon's `triggerd/status.json`, and whether an executor holds the wake pipe. No
daemon needs to run for it to work.
"""

from __future__ import annotations

from reconciler.agentd import read_status as read_daemon_status
from reconciler.device import Device
from reconciler.executor.enqueue import listening
from reconciler.executor.owner import process_alive
from reconciler.sync import SyncState, elapsed_since
from reconciler.triggers.daemon import read_status as read_trigger_status

STALE_AFTER = 120.0
"""A daemon status older than this, from a process still alive, is reported as stale."""


def collect(device: Device) -> dict:
    """Everything `spos status --json` prints (docs/sync.md has the shape)."""
    state = SyncState.load(device)
    last = state.last or {}
    pending = None
    if last and last.get("revision") and last.get("revision") != state.applied_revision:
        pending = {key: last.get(key) for key in ("revision", "outcome", "message", "reasons", "at")}
    return {
        "root": str(device.root),
        "repo": state.repo,
        "applied": state.applied,
        "lastSync": state.last,
        "pending": pending,
        "lastFailure": state.last_failure,
        "quarantined": [
            {"revision": sha, **entry}
            for sha, entry in sorted(state.quarantined.items(), key=lambda item: item[1]["at"],
                                     reverse=True)
        ],
        "drift": state.drift,
        "daemon": _daemon(read_daemon_status(device)),
        "executor": _executor(device),
        "triggers": _triggers(read_trigger_status(device)),
    }


def _daemon(status: dict | None) -> dict:
    if status is None:
        return {"running": False, "detail": "spos daemon has not run here"}
    pid = status.get("pid")
    if status.get("stoppedAt"):
        return {"running": False, "pid": pid, "detail": f"stopped at {status['stoppedAt']}"}
    if not process_alive(pid):
        return {"running": False, "pid": pid,
                "detail": f"pid {pid} died; its last status is from {status.get('updatedAt')}"}
    age = elapsed_since(status.get("updatedAt"))
    detail = f"pid {pid} since {status.get('startedAt')}, next sync at {status.get('nextSyncAt')}"
    if age is not None and age > STALE_AFTER:
        detail += f" (no status written for {age:.0f}s: it may be stuck)"
    return {"running": True, "pid": pid, "detail": detail, "nextSyncAt": status.get("nextSyncAt"),
            "children": status["children"]}


def _executor(device: Device) -> dict:
    if listening(device):
        return {"running": True, "detail": "an executor is serving the queue"}
    return {"running": False, "detail": "no executor is running: queued runs wait"}


def _triggers(status: dict | None) -> dict:
    if status is None or status.get("stoppedAt") or not process_alive(status.get("pid")):
        return {"running": False, "detail": "the trigger daemon is not running", "states": {}}
    states: dict[str, int] = {}
    problems = []
    for name, trigger in sorted(status["triggers"].items()):
        state = trigger.get("state")
        state = state if isinstance(state, str) else "?"
        states[state] = states.get(state, 0) + 1
        if state == "error":
            problems.append(f"{name}: {trigger.get('detail', '')}")
    counted = ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "no triggers"
    return {"running": True, "detail": f"pid {status.get('pid')}: {counted}", "states": states,
            "errors": problems}


def text(report: dict) -> str:
    lines = []
    applied, repo = report["applied"], report["repo"] or {}
    source = f" from {repo.get('url')} {repo.get('branch')}:{repo.get('path')}" if repo else ""
    if applied:
        lines.append(f"Applied:    {str(applied.get('revision'))[:12]} at {applied.get('at')} "
                     f"({applied.get('changed', 0)} changed){source}")
    else:
        lines.append("Applied:    nothing synced yet (spos sync or spos daemon)")
    last = report["lastSync"]
    if last:
        lines.append(f"Last sync:  {last.get('at')} {last.get('outcome')}: {last.get('message')}")
    pending = report["pending"]
    if pending:
        lines.append(f"Pending:    {str(pending.get('revision'))[:12]} {pending.get('outcome')}: "
                     f"{pending.get('message')}")
        reasons = pending.get("reasons")
        lines.extend(f"              {reason}" for reason in reasons if isinstance(reasons, list))
    failure = report["lastFailure"]
    if failure and failure != last:
        lines.append(f"Last failure: {failure.get('at')} {failure.get('outcome')}: "
                     f"{failure.get('message')}")
    if report["quarantined"]:
        held = ", ".join(f"{q['revision'][:12]} ({q['stage']})" for q in report["quarantined"][:5])
        lines.append(f"Quarantined: {held}")
    drift = report["drift"]
    if drift:
        said = f"checked {drift.get('checkedAt')}, {drift.get('repairs', 0)} repair(s) so far"
        repair = drift.get("lastRepair")
        if isinstance(repair, dict):
            repaired = repair.get("repaired")
            repaired = [str(item) for item in repaired] if isinstance(repaired, list) else []
            said += f"; last at {repair.get('at')}: {', '.join(repaired) or 'none'}"
            if isinstance(repair.get("failed"), list) and repair["failed"]:
                said += f" ({len(repair['failed'])} failed)"
        lines.append(f"Drift:      {said}")
    daemon = report["daemon"]
    lines.append(f"Daemon:     {'running' if daemon['running'] else 'not running'} ({daemon['detail']})")
    for name, child in (daemon.get("children") or {}).items():
        exits = f", restarted {child['restarts']} time(s)" if child.get("restarts") else ""
        running = f"running, pid {child.get('pid')}" if child.get("running") else "not running"
        lines.append(f"  {name}: {running}{exits}")
    lines.append(f"Executor:   {'running' if report['executor']['running'] else 'not running'} "
                 f"({report['executor']['detail']})")
    triggers = report["triggers"]
    lines.append(f"Triggers:   {'running' if triggers['running'] else 'not running'} ({triggers['detail']})")
    lines.extend(f"              {problem}" for problem in triggers.get("errors") or [])
    return "\n".join(lines) + "\n"
