"""How runs are shown: one line per run in listings, the whole story in `action show`. Pure."""

from __future__ import annotations

import json

from reconciler.executor import estimate
from reconciler.numbers import strict_json
from reconciler.executor.runs import Run


def summary(run: Run) -> dict:
    """The listing row, also the `--json` form of `list` and `history`. A record written by
    hand may hold anything in the fields only shown: they are shown as they are, never a
    reason to fail (strict_json makes them JSON)."""
    record = run.record
    return {
        "id": run.id,
        "agent": run.agent,
        "task": record.get("task"),
        "state": run.state,
        "attempt": record.get("attempt", 1),
        "priority": record.get("priority"),
        "enqueuedAt": record.get("enqueuedAt"),
        "startedAt": record.get("startedAt"),
        "endedAt": record.get("endedAt"),
        "durationSeconds": record.get("durationSeconds"),
        "exitCode": record.get("exitCode"),
        "reason": _text(record.get("reason")),
    }


def missing(store, run_id: str) -> str:
    """Why `store.find(run_id)` found nothing, for the commands that name a run: its record
    was set aside as corrupt, or cannot be read where it is, or there is no such run."""
    aside = store.found_aside(run_id)
    if aside is not None:
        agent, path, reason = aside
        return (f"run {run_id!r} of {agent} was set aside, unreadable, as {path}: {reason} "
                f"(spos action logs {run_id} shows what was noted)")
    damaged = store.unreadable(run_id)
    if damaged is not None:
        agent, path, reason = damaged
        return (f"run {run_id!r} of {agent}: its record {path} cannot be read: {reason} "
                f"(spos action logs {run_id} shows its log)")
    return f"no run {run_id!r} on this device"


def sort_time(value) -> str:
    """A time field as a sort key: ISO 8601 text sorts as text; anything else first."""
    return value if isinstance(value, str) else ""


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(strict_json(value))


COLUMNS = (("id", 26), ("agent", 18), ("task", 22), ("state", 10), ("attempt", 7), ("exitCode", 8))


def table(rows: list[dict]) -> str:
    if not rows:
        return "No runs.\n"
    header = "  ".join(name.upper().ljust(width) for name, width in COLUMNS) + "  REASON"
    lines = [header]
    for row in rows:  # one line a run: a line break in a cell is shown as \n
        cells = ["" if row[name] is None else _one_line(row[name]) for name, _ in COLUMNS]
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS)) + "  "
                     + _one_line(row["reason"]))
    return "\n".join(lines) + "\n"


def _one_line(value) -> str:
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


def task_history(run: Run, finished: list[Run]) -> list[dict]:
    """The records, among `finished` (its agent's completed/ and failed/ runs), of `run`'s task."""
    return [other.record for other in finished if other.record.get("task") == run.record.get("task")]


def shown(run: Run, history: list[dict]) -> dict:
    """The `--json` form of `action show`: the record, where it is, and its task's estimate."""
    return strict_json({**run.record, "state": run.state, "agent": run.agent,
                        "estimate": estimate.estimate(history)})


def detail(run: Run, history: list[dict] | None = None) -> str:
    """The text of `action show`; with `history` (task_history), the task's estimate last."""
    record = run.record
    lines = [
        f"Run {run.id}: {run.agent}/{record.get('task')}",
        f"  state:      {run.state}" + (f" ({_text(record['reason'])})" if record.get("reason") else ""),
        f"  priority:   {record.get('priority')}",
        f"  source:     {json.dumps(strict_json(record.get('source')))}",
        f"  enqueued:   {record.get('enqueuedAt')}",
    ]
    for key, label in (("notBefore", "not before"), ("notAfter", "not after"), ("startedAt", "started"),
                       ("endedAt", "ended"), ("durationSeconds", "duration"), ("exitCode", "exit code")):
        if record.get(key) is not None:
            lines.append(f"  {label + ':':<11} {record[key]}")
    if record.get("progress"):
        lines.append(f"  progress:   {json.dumps(strict_json(record['progress']))}")
    if record.get("stepsDone"):
        lines.append(f"  steps done: {', '.join(record['stepsDone'])}")
    if record.get("usage"):
        lines.append(f"  usage:      {json.dumps(strict_json(record['usage']), sort_keys=True)}")
    attempts = record.get("attempts") or []
    if attempts:
        lines.append("  attempts:")
        for attempt in attempts:
            lines.append(
                f"    #{attempt.get('attempt')} {attempt.get('state')} exit={attempt.get('exitCode')} "
                f"{attempt.get('startedAt')} -> {attempt.get('endedAt')}"
                + (f": {_text(attempt['reason'])}" if attempt.get("reason") else "")
            )
    if history is not None:
        found = estimate.estimate(history)
        lines.append("  " + estimate.line(found, len(estimate.completed_runs(history))))
    return "\n".join(lines) + "\n"
