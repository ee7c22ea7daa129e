"""What a plan's schedule and quota changes mean for the tasks they touch, judged by history.

An operator moving a Schedule or shrinking a Quota wants to know what the task usually needs
before applying: `spos plan` shows, under each such change, the task's estimate from its
finished runs on this device (executor/estimate.py) next to the limits it will run under.
Which changes count:

- a Schedule's cron line or timer created, updated or replaced: the task it starts;
- an Agent whose compiled quota or a task's timeout changes: each of its tasks.

The limits are those after the change: the changed agent's new compiled config, or for a
Schedule change the agent's config as applied on the device (the plan leaves it as it is) or
as this plan changes it. Only the newest runs are read (HISTORY_RUNS per agent), so a long
history costs no more than a short one. Reads the device; never writes.
"""

from __future__ import annotations

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.executor.config import ConfigError, agent_config
from reconciler.executor.runs import RUN_FILE, CorruptRecord, RunStore
from reconciler.kinds import BY_NAME
from reconciler.resource import Change, Plan

HISTORY_RUNS = 500
"""Finished runs read per agent, newest first by enqueue time."""

STARTING = ("create", "update", "replace")


def expectations(device: Device, plan: Plan) -> list[dict]:
    """One entry per (change, agent, task) whose task has finished runs on the device:
    {"change", "agent", "task", "finishedRuns", "completedRuns", "estimate" (None below
    estimate.MIN_RUNS completed runs), "flags", "timeoutSeconds", "memoryLimitBytes", "quota"};
    see docs/plan-format.md."""
    touched = _touched(plan.changes)
    if not touched:
        return []
    present = set(device.listdir(AGENTS_DIR))
    configs = {c.id.split("/", 1)[1]: (c.after or {}).get("config")
               for c in plan.changes if c.kind == "agent" and c.action in STARTING}
    histories: dict[str, dict[str, list[dict]]] = {}
    found = []
    for change_id, agent, task in touched:
        if agent not in present:
            continue
        if agent not in histories:
            histories[agent] = _history(RunStore(device), agent)
        records = histories[agent].get(task, [])
        if not records:
            continue
        from reconciler.executor import estimate

        config = configs[agent] if agent in configs else _applied_config(device, agent)
        task_config = ((config or {}).get("tasks") or {}).get(task) or {}
        quota = (config or {}).get("quota") or {}
        found.append({
            "change": change_id,
            "agent": agent,
            "task": task,
            "finishedRuns": len(records),
            "completedRuns": len(estimate.completed_runs(records)),
            "estimate": estimate.estimate(records),
            "flags": estimate.trend(map(estimate.outcome, records))["flags"],
            "timeoutSeconds": task_config.get("timeoutSeconds"),
            "memoryLimitBytes": quota.get("memoryBytes"),
            "quota": quota.get("name"),
        })
    return found


def _touched(changes: list[Change]) -> list[tuple[str, str, str]]:
    """(change id, agent, task) for every change that starts a task anew or under new limits."""
    touched = []
    for change in changes:
        if change.action not in STARTING:
            continue
        if change.kind == "agent":
            touched.extend((change.id, change.id.split("/", 1)[1], task) for task in _limits_changed(change))
            continue
        starts = getattr(BY_NAME[change.kind], "starts", None)
        started = starts(change.after or {}) if starts else None
        if started:
            touched.append((change.id, *started))
    return touched


def _limits_changed(change: Change) -> list[str]:
    """The agent's tasks whose memory limit or timeout this change sets anew: all of them when
    the quota changes, else those whose timeout does; none for a new agent, which has no runs."""
    if change.action == "create" or change.before is None:
        return []
    old, new = (change.before or {}).get("config") or {}, (change.after or {}).get("config") or {}
    if not isinstance(old, dict):  # the device's copy could not be read: every limit is set anew
        old = {}
    old_tasks, new_tasks = old.get("tasks") or {}, new.get("tasks") or {}
    if (old.get("quota") or {}) != (new.get("quota") or {}):
        return sorted(new_tasks)
    return sorted(task for task, spec in new_tasks.items()
                  if (old_tasks.get(task) or {}).get("timeoutSeconds") != spec.get("timeoutSeconds"))


def _history(store: RunStore, agent: str) -> dict[str, list[dict]]:
    """The agent's newest finished run records, by task."""
    names = [(name, bucket) for bucket in ("completed", "failed") for name in store.names(agent, bucket)
             if RUN_FILE.fullmatch(name)]
    names.sort(key=lambda item: item[0][4:24], reverse=True)  # the enqueue time in ns
    by_task: dict[str, list[dict]] = {}
    for name, bucket in names[:HISTORY_RUNS]:
        try:
            record = store.load(agent, bucket, name).record
        except (FileNotFoundError, CorruptRecord):
            continue
        by_task.setdefault(str(record.get("task")), []).append(record)
    return by_task


def _applied_config(device: Device, agent: str) -> dict | None:
    try:
        return agent_config(device, agent)
    except ConfigError:
        return None
