"""`spos action resources`: what each agent uses now, next to what its Quota allows.

Everything is read afresh and nothing is kept: the agent's cgroup (`<parent>/<agent>`,
docs/cgroups.md) for CPU time, memory, processes and I/O, its `tmp/` and `output/` directories
for storage (executor/storage.py), and its run records for how many runs wait, run, completed
and failed (counted as `spos metrics` counts them). The limits come from the compiled config's
`quota`.

What cannot be measured here is None (null in JSON, "-" in the table), never an error: an
agent without a cgroup, a controller that is not mounted, a file the kernel does not offer
(`memory.peak` before Linux 5.19), a limit the Quota does not set, an agent without a Quota.
CPU time is a running total, so it has no percentage of the limit: that would take two readings
an interval apart.
"""

from __future__ import annotations

from collections import Counter

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.executor.cgroup import Cgroups
from reconciler.executor.config import ConfigError, agent_config
from reconciler.executor.estimate import trend
from reconciler.executor.runs import TERMINAL_BUCKET, RunStore
from reconciler.executor.storage import DIRECTORIES, usage
from reconciler.metrics import tally_runs
from reconciler.views import human_size

STORAGE = ("temp", "output")
"""The storage quotas shown; logs are bounded per run by rotation, not by what is on disk."""

CURRENT_FILES = {1: {"memory": "memory/memory.usage_in_bytes", "tasks": "pids/pids.current"},
                 2: {"memory": "memory.current", "tasks": "pids.current"}}
"""Per cgroup version, the files holding the memory in use and the processes now."""

HEADER = ("AGENT", "CPU", "MEMORY", "PEAK", "TASKS", "IO READ/WRITE", "TEMP", "OUTPUT",
          "RUNS Q/A/C/F", "FLAGGED")


def collect(device: Device) -> dict:
    """Every agent on the device, by name: {"cgroupVersion", "agents": [...]}."""
    store = RunStore(device)
    tallies, tasks = tally_runs(store)
    return {
        "cgroupVersion": device.cgroups.version,
        "agents": [_agent(device, agent, tallies[agent], tasks) for agent in sorted(tallies)],
    }


def text(report: dict) -> str:
    """The report as a table, one agent a row, rendered from the JSON form."""
    if not report["agents"]:
        return "No agents are applied on this device.\n"
    rows = [HEADER, *(_row(agent) for agent in report["agents"])]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
                   for row in rows)


# -- measuring -------------------------------------------------------------------------------


def _agent(device: Device, agent: str, tally, tasks: dict) -> dict:
    quota = _quota(device, agent)
    cgroup = _cgroup_usage(device, agent)
    return {
        "agent": agent,
        "cgroup": cgroup["path"],
        "cpu": {"seconds": cgroup["cpuSeconds"], "limitPercent": quota.get("cpuPercent")},
        "memory": {"bytes": cgroup["memory"], "peakBytes": cgroup["peakMemoryBytes"],
                   **_against(cgroup["memory"], quota.get("memoryBytes"), "limitBytes")},
        "tasks": {"count": cgroup["tasks"], **_against(cgroup["tasks"], quota.get("tasksMax"), "limit")},
        "io": {"readBytes": cgroup["readBytes"], "writeBytes": cgroup["writeBytes"]},
        "storage": {name: _storage(device, agent, name, (quota.get("storageBytes") or {}).get(name))
                    for name in STORAGE},
        "runs": _runs(agent, tally, tasks),
        "byTask": _by_task(agent, tasks),
    }


def _quota(device: Device, agent: str) -> dict:
    """The compiled quota; {} for an agent without one, no longer applied, or whose config
    cannot be read safely (a link, a directory): one agent's trouble is not the listing's."""
    try:
        return agent_config(device, agent).get("quota") or {}
    except (ConfigError, SposError, OSError):
        return {}


def _cgroup_usage(device: Device, agent: str) -> dict:
    """The agent cgroup's path and usage; every value None when it has no cgroup."""
    tree = device.cgroups
    measured = dict.fromkeys(("path", "cpuSeconds", "memory", "peakMemoryBytes", "tasks",
                              "readBytes", "writeBytes"))
    if tree.version is None or agent not in tree.children(tree.parent):
        return measured
    path = f"{tree.parent}/{agent}"
    measured.update(Cgroups(tree.root).existing(path).usage(), path=path)
    for key, file in CURRENT_FILES[tree.version].items():
        measured[key] = _whole_number(tree.read(path, file))
    return measured


def _storage(device: Device, agent: str, name: str, limit: int | None) -> dict:
    """Bytes used (None past storage.MAX_ENTRIES, where the walk stops, or where the directory
    cannot be looked at safely) against the quota."""
    try:
        walked = usage(device.host(f"{AGENTS_DIR}/{agent}/{DIRECTORIES[name]}"))
    except (SposError, OSError):
        walked = None
    used = walked.bytes if walked is not None and walked.complete else None
    return {"bytes": used, **_against(used, limit, "limitBytes")}


def _runs(agent: str, tally, tasks: dict) -> dict:
    """Runs waiting, running, and ended by how they ended (TERMINAL_BUCKET)."""
    counts = {"queued": tally.queued, "active": tally.active, "completed": 0, "failed": 0}
    for (owner, _), task in tasks.items():
        if owner != agent:
            continue
        for state, count in task.states.items():
            bucket = TERMINAL_BUCKET.get(state, state)
            if bucket in ("completed", "failed"):
                counts[bucket] += count
    return counts


def _by_task(agent: str, tasks: dict) -> list[dict]:
    """Per task of the agent with finished runs: how they ended, and its trend (estimate.trend):
    flagged `trending slower` or `failing often`."""
    shown = []
    for (owner, task), tally in sorted(tasks.items()):
        if owner != agent or not tally.outcomes:
            continue
        found = trend(tally.outcomes)
        ended = Counter(TERMINAL_BUCKET.get(o.state) for o in tally.outcomes)
        shown.append({"task": task, "completed": ended["completed"], "failed": ended["failed"],
                      "slowdown": found["slowdown"], "failedShare": found["failedShare"],
                      "flags": found["flags"]})
    return shown


def _against(used: int | None, limit: int | None, limit_key: str) -> dict:
    """The limit and the percentage of it used (one decimal), None where either is unknown."""
    percent = None if used is None or not limit else round(used * 100 / limit, 1)
    return {limit_key: limit, "percent": percent}


def _whole_number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


# -- rendering -------------------------------------------------------------------------------


def _row(agent: dict) -> tuple[str, ...]:
    cpu, memory, tasks, io, runs = (agent[key] for key in ("cpu", "memory", "tasks", "io", "runs"))
    return (
        agent["agent"],
        f"{_seconds(cpu['seconds'])} / {_percent(cpu['limitPercent'])}",
        _of(_size(memory["bytes"]), _size(memory["limitBytes"]), memory["percent"]),
        _size(memory["peakBytes"]),
        _of(_plain(tasks["count"]), _plain(tasks["limit"]), tasks["percent"]),
        f"{_size(io['readBytes'])} / {_size(io['writeBytes'])}",
        *(_of(_size(used["bytes"]), _size(used["limitBytes"]), used["percent"])
          for used in (agent["storage"][name] for name in STORAGE)),
        "/".join(str(runs[key]) for key in ("queued", "active", "completed", "failed")),
        "; ".join(f"{task['task']}: {', '.join(task['flags'])}" for task in agent["byTask"] if task["flags"]),
    )


def _of(used: str, limit: str, percent: float | None) -> str:
    return f"{used} / {limit}" + ("" if percent is None else f" ({_percent(percent)})")


def _size(value: int | None) -> str:
    return "-" if value is None else human_size(value)


def _plain(value) -> str:
    return "-" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:g}%"
