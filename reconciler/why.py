"""`spos why RUN_ID`: where a run came from and what it ran under.

An operator looking at a run that misbehaved asks what started it, which revision and agent
config it ran under, what it was allowed to do and within which limits, and how its attempts
went. The run record has the source and the attempts; each attempt names the config it ran
under by digest, with the revision and manifest digest applied on the device at its start
(executor/provenance.py). The config itself comes from the copy the executor kept of it, so
the capabilities and limits shown are the ones in force even after the agent's config changed;
a run recorded before attempts named their config is shown with the current config, and says
so. What started it is completed from the device as it is now: the Schedule's cron line or
timer, whether the Trigger is still registered, the run whose hook queued it, and the hooks it
queued.

It reads and never changes anything. `explain` gives the dict `spos why --json` prints (its
shape is documented field by field in docs/why.md) and `text` renders that dict, and nothing
else, as the human view.

Records and configs may hold anything a hand edit, another spos version or the world outside (a
serial line, a file name, a webhook header) put there, so each is read in one way: a part of a
config with `_at` (null where a step has another shape), a duration or a limit with `_number`
(null unless a believable number), a list with `_list`; the dict leaves `explain` as strict JSON
(`_strict`), and `text` escapes every string in it (`_for_terminal`) before rendering any.
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import datetime
from functools import partial

from reconciler import AGENT_CONFIG, AGENTS_DIR, TRIGGERS_DIR
from reconciler.device import Device
from reconciler.errors import SposError, UsageError
from reconciler.executor import provenance
from reconciler.executor.report import missing
from reconciler.executor.runs import BUCKETS, CorruptRecord, Run, RunStore
from reconciler.kinds import cron, systemd
from reconciler.numbers import amount, printable, strict_json
from reconciler.sync import SyncState
from reconciler.views import clock, human_size

FORMAT = 1
ACCESS = ("read", "write", "execute", "network", "devices")
HOOK_WINDOW = (-5.0, 120.0)
"""Seconds around a run's end within which the hooks it queued were enqueued: they are looked
for among the runs whose file name says they were queued then, so no other record is read."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_QUEUED_AT = re.compile(r"\d{3}-(?P<ns>\d{20})-[0-9A-Za-z_-]+\.json")
_ONE_LINE = str.maketrans({"\n": "\\n", "\t": "\\t"})


def explain(device: Device, run_id: str) -> dict:
    """Everything `spos why RUN_ID --json` prints. Raises UsageError for a run the device
    does not have."""
    store = RunStore(device)
    run = store.find(run_id)
    if run is None:
        raise UsageError(missing(store, run_id))
    current_raw = _current_config(device, run.agent)
    current = provenance.digest(current_raw) if current_raw is not None else None
    attempts = _attempts(run, current)
    errors = run.record.get("followUpErrors")
    return strict_json({
        "format": FORMAT,
        "run": _run(run),
        "source": _source(device, store, run),
        "attempts": attempts,
        "config": _config(device, run, attempts, current_raw, current),
        "device": _device_now(device),
        "hooks": _hooks(store, run),
        "followUpErrors": [errors] if isinstance(errors, str) else _list(errors),
    })


# -- the run and its attempts -------------------------------------------------------------------


def _run(run: Run) -> dict:
    record = run.record
    return {
        "id": run.id, "agent": run.agent, "task": record.get("task"), "state": run.state,
        "reason": record.get("reason") or "", "attempt": record.get("attempt", 1),
        "priority": record.get("priority"), "enqueuedAt": record.get("enqueuedAt"),
        "notBefore": record.get("notBefore"), "notAfter": record.get("notAfter"),
        "startedAt": record.get("startedAt"), "endedAt": record.get("endedAt"),
        "exitCode": record.get("exitCode"),
    }


def _attempts(run: Run, current: str | None) -> list[dict]:
    """Every attempt, the one running now included, each with what it ran under and when the
    next one started (or, for a retry waiting in the queue, is due)."""
    record = run.record
    entries = [entry for entry in record.get("attempts") or [] if isinstance(entry, dict)]
    if run.state == "active":
        entries.append({"attempt": record.get("attempt", 1), "state": "active",
                        "startedAt": record.get("startedAt"), **provenance.of_attempt(record)})
    rows = [_attempt(entry, current) for entry in entries]
    for row, following in zip(rows, rows[1:]):
        row["nextAt"] = following["startedAt"]
    if rows and run.state == "queued" and record.get("notBefore"):
        rows[-1]["nextAt"] = record["notBefore"]
    for row in rows:
        row["nextAfterSeconds"] = _seconds_between(row["endedAt"], row["nextAt"])
    return rows


def _attempt(entry: dict, current: str | None) -> dict:
    digest = _string(entry.get("configDigest"))
    return {
        "attempt": entry.get("attempt"), "state": entry.get("state"),
        "startedAt": entry.get("startedAt"), "endedAt": entry.get("endedAt"),
        "durationSeconds": _number(entry.get("durationSeconds")), "exitCode": entry.get("exitCode"),
        "reason": entry.get("reason") or "",
        "configDigest": digest, "revision": _string(entry.get("revision")),
        "manifestDigest": _string(entry.get("manifestDigest")),
        "configChanged": None if digest is None else digest != current,
        "nextAt": None, "nextAfterSeconds": None,
    }


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return round(datetime.fromisoformat(end).timestamp() - datetime.fromisoformat(start).timestamp(), 3)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


# -- what started it ----------------------------------------------------------------------------


def _source(device: Device, store: RunStore, run: Run) -> dict:
    """The record's `source` as queued, completed from the device as it is now."""
    source = run.record.get("source")
    source = dict(source) if isinstance(source, dict) else {"kind": None}
    kind = source.get("kind")
    if kind == "schedule":
        source["onDevice"] = _schedule(device, run.agent, source.get("name"))
    elif kind == "execute":
        source["timers"] = _timers_running(device, run.agent, run.record.get("task"))
    elif kind == "trigger":
        name = source.get("trigger")
        source["registered"] = _named(name) and _read_bytes(device, f"{TRIGGERS_DIR}/{name}.json") is not None
    elif kind == "hook":
        parent = store.find(source["run"], agent=run.agent) if _named(source.get("run")) else None
        source["parent"] = _brief(parent) if parent else None
    return source


def _schedule(device: Device, agent: str, name) -> dict | None:
    """The Schedule's cron line, or its timer, as it is on the device now; None when neither is."""
    if not _named(name):
        return None
    line = cron.parse_entries(_read(device, cron.file_for(agent)) or "").get(f"cron/{name}")
    if line:
        return _cron_line(cron.file_for(agent), line)
    path = systemd.unit_path(name, "timer")
    text = _read(device, path)
    if text is None or not systemd.is_owned(text, f"timer/{name}"):
        return None
    settings = systemd.parse_unit(text).get("Timer") or {}
    return {"kind": "timer", "path": path, "line": None,
            "when": ", ".join(f"{key}={_joined(value)}" for key, value in settings.items()),
            "timeZone": None, "user": None, "suspended": False, "timer": settings}


def _cron_line(path: str, line: str) -> dict:
    suspended = line.startswith(cron.SUSPENDED)
    words = line.removeprefix(cron.SUSPENDED).split()
    timing = 1 if words and words[0].startswith("@") else 5
    try:
        command = shlex.split(" ".join(words[timing + 1:]).replace("\\%", "%"))
    except ValueError:
        command = words[timing + 1:]
    expression = cron.option_value(command, "--cron") or " ".join(words[:timing])
    return {"kind": "cron", "path": path, "line": line, "when": expression,
            "timeZone": cron.option_value(command, "--cron-tz"),
            "user": words[timing] if len(words) > timing else None,
            "suspended": suspended, "timer": None}


def _timers_running(device: Device, agent: str, task) -> list[dict]:
    """The timer Schedules on the device whose service runs `spos action execute` of this
    agent's `task`: which of them (or a person) ran it, the record does not say."""
    found = []
    for entry in device.listdir(systemd.UNIT_DIR):
        name = entry.removeprefix(systemd.UNIT_PREFIX).removesuffix(".service")
        if not entry.startswith(systemd.UNIT_PREFIX) or not entry.endswith(".service") or not _named(name):
            continue
        text = _read(device, f"{systemd.UNIT_DIR}/{entry}")
        if text is None or not systemd.is_owned(text, f"timer/{name}"):
            continue
        words = _joined(systemd.parse_unit(text).get("Service", {}).get("ExecStart", "")).split()
        if cron.option_value(words, "--agent") == agent and cron.option_value(words, "--task") == task:
            schedule = _schedule(device, agent, name)
            if schedule is not None:
                found.append({"name": name, **schedule})
    return found


def _hooks(store: RunStore, run: Run) -> list[dict]:
    """The runs this run's end queued as its onSuccess / onFailure hooks, still on the device.
    Only runs whose file name says they were queued around its end are read."""
    ended = _epoch(run.record.get("endedAt"))
    if ended is None:
        return []
    low, high = ((ended + offset) * 1e9 for offset in HOOK_WINDOW)
    found = []
    for bucket in BUCKETS:
        for name in store.names(run.agent, bucket):
            queued = _QUEUED_AT.fullmatch(name)
            if not queued or not low <= int(queued["ns"]) <= high:
                continue
            try:
                other = store.load(run.agent, bucket, name)
            except (FileNotFoundError, CorruptRecord):
                continue
            source = other.record.get("source") or {}
            if isinstance(source, dict) and source.get("kind") == "hook" and source.get("run") == run.id:
                found.append({**_brief(other), "on": source.get("on")})
    return sorted(found, key=lambda hook: hook["id"])


def _brief(run: Run) -> dict:
    record = run.record
    return {"id": run.id, "agent": run.agent, "task": record.get("task"), "state": run.state,
            "reason": record.get("reason") or "", "exitCode": record.get("exitCode"),
            "endedAt": record.get("endedAt")}


# -- what it ran under --------------------------------------------------------------------------


def _config(device: Device, run: Run, attempts: list[dict], current_raw: bytes | None,
            current: str | None) -> dict:
    """The config of the latest attempt that recorded one: its capabilities and limits, read
    from its copy, and how the agent's config differs now. Without a recorded config, or
    without its copy, the current config stands in (`from`: "current")."""
    used = next((row["configDigest"] for row in reversed(attempts) if row["configDigest"]), None)
    now = _parse(current_raw)
    then = now if used is not None and used == current else _copy(device, run.agent, used)
    shown = then if then is not None else now
    task = run.record.get("task")
    return {
        "digest": used,
        "current": current,
        "changed": None if used is None else used != current,
        "from": None if shown is None else ("run" if then is not None else "current"),
        "capability": _capability(shown),
        "limits": _limits(shown, task, run.record),
        "changes": _changes(then, now, task, run.record) if then is not None and now is not None else [],
    }


def _copy(device: Device, agent: str, digest: str | None) -> dict | None:
    """The kept copy of the config with `digest`, when it is there and still hashes to it."""
    if digest is None or not digest.startswith("sha256:"):
        return None
    raw = _read_bytes(device, provenance.copy_path(agent, digest))
    if raw is None or provenance.digest(raw) != digest:
        return None
    return _parse(raw)


def _capability(config: dict | None) -> dict | None:
    if config is None or not isinstance(config.get("capability"), dict):
        return None
    capability = partial(_at, config, "capability")
    return {
        "name": capability("name"),
        **{side: {access: _list(capability(side, access)) for access in ACCESS}
           for side in ("allowed", "denied")},
    }


def _limits(config: dict | None, task_name, record: dict) -> dict | None:
    if config is None:
        return None
    quota = partial(_at, config, "quota")
    task = partial(_at, config, "tasks", task_name)
    own = record.get("concurrency")
    return {
        "quota": quota("name"),
        **{key: _number(quota(key), negative=key == "nice")
           for key in ("cpuPercent", "memoryBytes", "tasksMax", "ioWeight", "nice")},
        "storageBytes": {kind: _number(quota("storageBytes", kind)) for kind in ("temp", "output", "log")},
        "timeoutSeconds": _number(task("timeoutSeconds")),
        "heartbeatTimeoutSeconds": _number(task("heartbeatTimeoutSeconds")),
        "retries": {
            "limit": _number(task("retries", "limit", default=0)),
            **{key: _number(task("retries", "backoff", key))
               for key in ("initialSeconds", "factor", "maxSeconds")},
            "nonRetryableExitCodes": _list(task("retries", "nonRetryableExitCodes")),
        },
        "concurrency": own or task("concurrency"),
        "concurrencyFrom": "run" if own else "task",
        "priority": record.get("priority"),
        "user": config.get("user"),
    }


def _changes(then: dict, now: dict, task, record: dict) -> list[dict]:
    """Each capability or limit whose value differs between the two configs."""
    before = dict(_leaves({"capability": _capability(then), "limits": _limits(then, task, record)}))
    after = dict(_leaves({"capability": _capability(now), "limits": _limits(now, task, record)}))
    return [{"field": field, "then": before.get(field), "now": after.get(field)}
            for field in sorted(set(before) | set(after)) if before.get(field) != after.get(field)]


def _leaves(value, prefix: str = ""):
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def _device_now(device: Device) -> dict:
    """What is applied on the device now, and what spos sync last applied, if it ever did."""
    state = SyncState.load(device)
    repo = state.repo or {}
    synced = None
    if state.applied_revision:
        synced = {"revision": state.applied_revision, "at": (state.applied or {}).get("at"),
                  "url": repo.get("url"), "branch": repo.get("branch"), "path": repo.get("path")}
    return {**provenance.read_applied(device), "sync": synced}


# -- reading ------------------------------------------------------------------------------------


def _current_config(device: Device, agent: str) -> bytes | None:
    return _read_bytes(device, f"{AGENTS_DIR}/{agent}/{AGENT_CONFIG}")


def _read_bytes(device: Device, path: str) -> bytes | None:
    try:
        return device.read_bytes(path)
    except (OSError, SposError):
        return None


def _read(device: Device, path: str) -> str | None:
    raw = _read_bytes(device, path)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _parse(raw: bytes | None) -> dict | None:
    try:
        config = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        return None
    return config if isinstance(config, dict) else None


def _string(value) -> str | None:
    """A field a hand edit may have given another type, as a string or None."""
    return value if isinstance(value, str) else None


def _number(value, *, negative: bool = False):
    """A field meant to be a number, as it is when it is a believable one (numbers.amount), else
    None: a string, `1e999` or a list is no size or duration to show."""
    return value if amount(value, negative=negative) is not None else None


def _list(value) -> list:
    """A field meant to be a list, as a list: empty when it is anything else."""
    return list(value) if isinstance(value, list) else []


def _at(value, *keys, default=None):
    """The part of a parsed config at `keys`, read step by step: `default` where a step is
    missing or null, None where a step that must be an object is not one (a hand edit, or a
    config of another shape)."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key) if isinstance(key, str) else None
        if value is None:
            return default
    return value


def _named(name) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name))


def _joined(value) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


def _epoch(text) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


# -- the human view -----------------------------------------------------------------------------


def text(explained: dict) -> str:
    """The human form of `explain`'s dict. Pure."""
    explained = _for_terminal(explained)
    sections = [_run_text(explained), _source_text(explained["source"]),
                _ran_under_text(explained), _capability_text(explained["config"]),
                _limits_text(explained["config"]), _attempts_text(explained["attempts"]),
                _hooks_text(explained)]
    return "\n".join("\n".join(lines) + "\n" for lines in sections if lines)


def _run_text(explained: dict) -> list[str]:
    run = explained["run"]
    lines = [f"Run {run['id']}: {run['agent']}/{run['task']}",
             f"  state:     {run['state']}" + (f" ({run['reason']})" if run["reason"] else ""),
             f"  enqueued:  {run['enqueuedAt']}, priority {run['priority']}"]
    if run["notBefore"] and run["state"] == "queued":
        lines.append(f"  waiting:   attempt {run['attempt']} is due at {run['notBefore']}")
    return lines


def _source_text(source: dict) -> list[str]:
    kind = source.get("kind")
    lines = ["Started by"]
    if kind == "schedule":
        lines.append(f"  Schedule {source.get('name')} (spos action run --schedule, from its cron line)")
        lines += _on_device_text(source.get("onDevice"), "    ")
    elif kind == "trigger":
        count = source.get("events", 1)
        lines.append(f"  Trigger {source.get('trigger')} ({source.get('type')}), "
                     f"{count} event{'s' if count != 1 else ''}"
                     + (f", delivery {source['delivery']}" if source.get("delivery") else ""))
        if source.get("event"):
            lines.append(f"    event: {_pairs(source['event'])}")
        lines.append("    registered on this device now" if source.get("registered")
                     else "    no longer registered on this device")
    elif kind == "hook":
        lines.append(f"  the {source.get('on')} hook of run {source.get('run')} (spos why {source.get('run')})")
        parent = source.get("parent")
        lines.append(f"    {_brief_text(parent)}" if parent
                     else "    that run is no longer on this device (retention removed it)")
    elif kind == "execute":
        lines.append("  spos action execute: a timer Schedule's service, or by hand")
        for timer in source.get("timers") or []:
            lines.append(f"    timer Schedule {timer['name']} runs this task:")
            lines += _on_device_text(timer, "      ")
    elif kind == "manual":
        lines.append("  spos action run, by hand or from a script (no Schedule named)")
    else:
        lines.append(f"  {json.dumps(source)}")
    return lines


def _on_device_text(schedule: dict | None, indent: str) -> list[str]:
    if schedule is None:
        return [f"{indent}not on this device now (no cron line or timer of that name)"]
    state = " (suspended: commented out)" if schedule["suspended"] else ""
    if schedule["kind"] == "cron":
        zone = f" in {schedule['timeZone']}" if schedule["timeZone"] else ""
        return [f"{indent}cron {schedule['when']}{zone} as {schedule['user']}{state}, in {schedule['path']}"]
    return [f"{indent}timer {schedule['when']}, in {schedule['path']}"]


def _brief_text(run: dict) -> str:
    said = f"{run['agent']}/{run['task']}: {run['state']}"
    if run["exitCode"] is not None:
        said += f", exit {run['exitCode']}"
    return said + (f" ({run['reason']})" if run["reason"] else "")


def _ran_under_text(explained: dict) -> list[str]:
    attempts, config, now = explained["attempts"], explained["config"], explained["device"]
    lines = ["Ran under"]
    if not attempts:
        lines.append("  no attempt has started")
    previous = None
    for row in attempts:
        said = _provenance_text(row, now)
        lines.append(f"  attempt {row['attempt']}: " + ("the same" if said == previous else said))
        previous = said
    if config["digest"] is not None:
        if config["current"] is None:
            lines.append("  the agent is no longer applied on this device (no agent.json)")
        elif config["changed"]:
            lines.append(f"  the agent's config has changed since: now {_short(config['current'])}")
            lines += [f"    {change['field']}: {_in_units(change['field'], change['then'])} -> "
                      f"{_in_units(change['field'], change['now'])}" for change in config["changes"]]
            if not config["changes"]:
                lines.append("    (not in its capabilities or limits)")
        else:
            lines.append("  the agent's config is the same now")
    if now["revision"] and any(row["revision"] and row["revision"] != now["revision"] for row in attempts):
        lines.append(f"  the device runs revision {now['revision'][:12]} now{_synced(now['revision'], now)}")
    return lines


def _provenance_text(row: dict, now: dict) -> str:
    if row["configDigest"] is None:
        return "not recorded (the executor that ran it did not record what attempts ran under)"
    said = f"config {_short(row['configDigest'])}, "
    if row["revision"]:
        said += f"revision {row['revision'][:12]}{_synced(row['revision'], now)}"
    elif row["manifestDigest"]:
        said += "no git revision (applied by hand from a directory that is not a git checkout)"
    else:
        said += "no revision (nothing applied by spos apply or spos sync on the device)"
    if row["manifestDigest"]:
        said += f", manifests {_short(row['manifestDigest'])}"
    return said


def _synced(revision: str, now: dict) -> str:
    """Where the revision came from, when it is the one spos sync applied last."""
    sync = now["sync"]
    if sync and sync["revision"] == revision:
        return f" (synced from {sync['url']} {sync['branch']}:{sync['path']})"
    return ""


def _capability_text(config: dict) -> list[str]:
    if config["from"] is None:
        return ["Capabilities and limits",
                "  unknown: neither the config the run ran under nor the agent's is on this device"]
    lines = [f"Capabilities ({_whose(config)})"]
    capability = config["capability"]
    if capability is None:
        lines.append("  no Capability: nothing is allowed but the run's own directories")
        return lines
    lines.append(f"  {'capability:':<12} {capability['name']}")
    for access in ACCESS:
        denied = capability["denied"][access]
        lines.append(f"  {access + ':':<12} {_value(capability['allowed'][access])}"
                     + (f"; denied: {_value(denied)}" if denied else ""))
    lines.append("  (a run may also write its own checkpoint, temporary and output directories)")
    return lines


def _whose(config: dict) -> str:
    if config["from"] == "run":
        return "from the config the run ran under"
    if config["digest"] is None:
        return "from the agent's current config: no attempt recorded the config it ran under"
    return f"from the agent's current config: no copy of {_short(config['digest'])} is kept"


def _limits_text(config: dict) -> list[str]:
    limits = config["limits"]
    if limits is None:
        return []
    retries, storage = limits["retries"], limits["storageBytes"]
    backoff = (f", backoff {_duration(retries['initialSeconds'])} x{_value(retries['factor'])} "
               f"at most {_duration(retries['maxSeconds'])}") if retries["limit"] else ""
    never = retries["nonRetryableExitCodes"]
    return [
        "Limits",
        f"  {'quota:':<12} {limits['quota'] or 'none'}: cpu {_percent(limits['cpuPercent'])}, "
        f"memory {_size(limits['memoryBytes'])}, tasks {_value(limits['tasksMax'])}, "
        f"io weight {_value(limits['ioWeight'])}, nice {_value(limits['nice'])}",
        f"  {'storage:':<12} temp {_size(storage['temp'])}, output {_size(storage['output'])}, "
        f"log {_size(storage['log'])}",
        f"  {'timeout:':<12} {_duration(limits['timeoutSeconds'])}, heartbeat "
        f"{_duration(limits['heartbeatTimeoutSeconds'])}",
        f"  {'retries:':<12} {_value(retries['limit'])}{backoff}"
        + (f"; never after exit {_value(never)}" if never else ""),
        f"  {'concurrency:':<12} {_value(limits['concurrency'])} (the {limits['concurrencyFrom']}'s)",
        f"  {'priority:':<12} {_value(limits['priority'])}; runs as {_value(limits['user'])}",
    ]


def _attempts_text(attempts: list[dict]) -> list[str]:
    if not attempts:
        return []
    lines = ["Attempts"]
    for row in attempts:
        exit_code = "" if row["exitCode"] is None else f", exit {row['exitCode']}"
        took = f" ({clock(row['durationSeconds'])})" if row["durationSeconds"] is not None else ""
        lines.append(f"  #{row['attempt']} {row['state']}{exit_code}: {row['startedAt']} -> "
                     f"{row['endedAt'] or 'running'}{took}" + (f": {row['reason']}" if row["reason"] else ""))
        if row["nextAt"] is not None:
            wait = row["nextAfterSeconds"]
            after = f" {clock(wait)} later," if wait is not None else ""
            lines.append(f"     next attempt{after} at {row['nextAt']}")
    return lines


def _hooks_text(explained: dict) -> list[str]:
    hooks, errors = explained["hooks"], explained["followUpErrors"]
    if not hooks and not errors:
        return []
    lines = ["Hooks it queued"]
    lines += [f"  {hook['on']}: run {hook['id']}, {_brief_text(hook)}" for hook in hooks]
    lines += [f"  could not queue: {error}" for error in errors]
    return lines


def _for_terminal(value):
    """`value` with every string in it, keys included, fit for one line of a terminal: control
    characters escaped (numbers.printable), a line break or a tab as `\\n` / `\\t`. What a
    record, a config or the device holds can then neither drive the terminal nor fake a line."""
    if isinstance(value, str):
        return printable(value).translate(_ONE_LINE)
    if isinstance(value, dict):
        return {_for_terminal(key): _for_terminal(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [_for_terminal(inner) for inner in value]
    return value


def _short(digest: str) -> str:
    kind, _, value = digest.partition(":")
    return f"{kind}:{value[:12]}" if value else digest[:12]


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _pairs(value) -> str:
    """An object as `key=value, ...`; anything else as `_value` shows it."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={inner}" for key, inner in value.items())
    return _value(value)


def _in_units(field: str, value) -> str:
    """A capability or limit as the limits are shown: sizes and durations in their units."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "Bytes" in field:
            return human_size(value)
        if field.endswith("Seconds"):
            return clock(value)
    return _value(value)


def _size(value) -> str:
    return "-" if value is None else human_size(value)


def _percent(value) -> str:
    return "-" if value is None else f"{value:g}%"


def _duration(value) -> str:
    return "-" if value is None else clock(value)
