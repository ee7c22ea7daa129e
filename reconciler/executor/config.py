"""Reading the compiled agent config, the executor's only source of what to run."""

from __future__ import annotations

from reconciler import AGENT_CONFIG, AGENTS_DIR, leanjson
from reconciler.device import Device
from reconciler.errors import SposError

SUPPORTED_FORMAT = 1


class ConfigError(SposError):
    """The agent or task cannot be run as configured; the message says why."""


def agent_config(device: Device, agent: str) -> dict:
    return read_agent_config(device, agent)[0]


class _Checked(dict):
    """A config read and checked by read_agent_config, shared by every caller that reads the
    same bytes: never changed once made. Its tasks' problems (task_config) are looked at once
    each."""

    __slots__ = ("task_problems",)

    def __init__(self, config: dict):
        super().__init__(config)
        self.task_problems: dict[str, str | None] = {}


_KEPT: dict[str, tuple[bytes, _Checked]] = {}
"""agent name -> the bytes of its agent.json last read and what they parsed to: a long-lived
reader (the executor starting a run, the trigger daemon queueing one) parses and checks an
unchanged config once. Compared by content, so it cannot go stale."""
KEEP_AT_MOST = 1024


def read_agent_config(device: Device, agent: str) -> tuple[dict, bytes]:
    """The agent's compiled config, and the exact bytes it was read from (the executor records
    their digest as the config each attempt ran under). Read every time; parsed and checked
    only when the bytes differ from the last read (`_KEPT`). The config must not be changed."""
    path = f"{AGENTS_DIR}/{agent}/{AGENT_CONFIG}"
    raw = device.read_bytes(path)
    if raw is None:
        raise ConfigError(f"agent {agent!r} is not applied on this device (no {path})")
    kept = _KEPT.get(agent)
    if kept is not None and kept[0] == raw:
        return kept[1], raw
    try:
        config = leanjson.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        raise ConfigError(f"{path} is not valid JSON; run spos apply to repair it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object; run spos apply to repair it")
    if config.get("format") != SUPPORTED_FORMAT:
        raise ConfigError(
            f"{path} has format {config.get('format')!r}; this executor reads format {SUPPORTED_FORMAT}"
        )
    problem = shape_problem(config)
    if problem:
        raise ConfigError(f"{path}: {problem}; run spos apply to repair it")
    config = _Checked(config)
    if len(_KEPT) >= KEEP_AT_MOST:
        _KEPT.clear()
    _KEPT[agent] = (raw, config)
    return config, raw


def task_config(config: dict, task: str) -> dict:
    """The task `task` of a config read by read_agent_config, its shape checked: a task of the
    wrong shape fails its own runs, never the agent's other tasks."""
    tasks = config.get("tasks") or {}
    if task not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise ConfigError(f"agent {config.get('agent')!r} has no task {task!r} (its tasks: {known})")
    checked = getattr(config, "task_problems", None)
    if checked is not None and task in checked:
        problem = checked[task]
    else:
        problem = task_problem(task, tasks[task])
        if checked is not None:
            checked[task] = problem
    if problem:
        path = f"{AGENTS_DIR}/{config.get('agent')}/{AGENT_CONFIG}"
        raise ConfigError(f"{path}: {problem}; run spos apply to repair it")
    return tasks[task]


# -- the shape of a config ----------------------------------------------------------------------
#
# apply writes agent.json from validated manifests, so what is checked here is only what a hand
# edit or damage can break and the executor relies on: the types and ranges of the fields of
# docs/agent-config.md. Without it a task whose `timeoutSeconds` is "1h" was claimed and then
# stopped the executor for every agent. Each check returns what is wrong, or None.

CONCURRENCY = ("Allow", "Forbid", "Replace", "Queue")
_CAPABILITY_LISTS = ("read", "write", "execute", "devices", "network")


def shape_problem(config: dict) -> str | None:
    """What in a parsed agent.json, but for its tasks' own fields (task_problem), does not have
    the shape docs/agent-config.md gives, as "`field` must be ..., got ..."; None when
    nothing is wrong."""
    tasks = config.get("tasks")
    if not isinstance(tasks, dict):
        return _wrong("tasks", "an object of tasks", tasks)
    return (_check(config, "agent", _text)
            or _check(config, "user", _optional(_text))
            or _capability_problem(config.get("capability"))
            or quota_problem(config.get("quota")))


def task_problem(name: str, task) -> str | None:
    """What in the task `name` of an agent.json is not of the shape docs/agent-config.md gives.
    What apply writes always passes: durations of 0 (none), whole numbers written as 2.0."""
    field = f"tasks.{name}"
    if not isinstance(task, dict):
        return _wrong(field, "an object", task)
    problem = (_check(task, "command", _optional(_argv), field)
               or _check(task, "steps", _optional(_steps), field)
               or _check(task, "timeoutSeconds", _optional(_not_negative), field)
               or _check(task, "heartbeatTimeoutSeconds", _optional(_not_negative), field)
               or _check(task, "priority", _optional(_priority), field)
               or _check(task, "concurrency", _optional(_concurrency), field)
               or _check(task, "env", _optional(_env), field)
               or _check(task, "workdir", _optional(_text), field)
               or _check(task, "flexible", _optional(_flag), field)
               or _check(task, "onSuccess", _optional(_names), field)
               or _check(task, "onFailure", _optional(_names), field)
               or _checkpoint_problem(task.get("checkpoint"), f"{field}.checkpoint")
               or _retries_problem(task.get("retries"), f"{field}.retries"))
    if problem:
        return problem
    if task.get("command") is None and not task.get("steps"):
        return f"`{field}` has neither a `command` nor `steps`"
    return None


def _steps(steps, field):
    if not isinstance(steps, list):
        return _wrong(field, "a list of steps", steps)
    for index, step in enumerate(steps):
        at = f"{field}[{index}]"
        if not isinstance(step, dict):
            return _wrong(at, "an object", step)
        problem = (_check(step, "name", _text, at) or _check(step, "command", _argv, at)
                   or _check(step, "timeoutSeconds", _optional(_not_negative), at)
                   or _check(step, "continueOnError", _optional(_flag), at))
        if problem:
            return problem
    return None


def _checkpoint_problem(checkpoint, field) -> str | None:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, dict):
        return _wrong(field, "an object or null", checkpoint)
    return _check(checkpoint, "intervalSeconds", _optional(_not_negative), field)


def _retries_problem(retries, field) -> str | None:
    if retries is None:
        return None
    if not isinstance(retries, dict):
        return _wrong(field, "an object or null", retries)
    problem = (_check(retries, "limit", _optional(_count), field)
               or _check(retries, "nonRetryableExitCodes", _optional(_codes), field))
    if problem:
        return problem
    backoff = retries.get("backoff")
    if backoff is None:
        return None
    if not isinstance(backoff, dict):
        return _wrong(f"{field}.backoff", "an object or null", backoff)
    return _each(backoff, ("initialSeconds", "factor", "maxSeconds"), _optional(_not_negative),
                 f"{field}.backoff")


def _capability_problem(capability) -> str | None:
    if capability is None:
        return None
    if not isinstance(capability, dict):
        return _wrong("capability", "an object or null", capability)
    for side in ("allowed", "denied"):
        lists = capability.get(side)
        if lists is None:
            continue
        if not isinstance(lists, dict):
            return _wrong(f"capability.{side}", "an object or null", lists)
        problem = _each(lists, _CAPABILITY_LISTS, _optional(_names), f"capability.{side}")
        if problem:
            return problem
    return None


def quota_problem(quota) -> str | None:
    """What in an agent.json's `quota` is not of the shape docs/agent-config.md gives (the
    retention pass reads it too), or None."""
    if quota is None:
        return None
    if not isinstance(quota, dict):
        return _wrong("quota", "an object or null", quota)
    problem = _each(quota, ("cpuPercent", "memoryBytes", "ioWeight", "tasksMax", "nice"),
                    _optional(_number), "quota")
    for group in ("storageBytes", "retentionSeconds"):
        sizes = quota.get(group)
        if problem or sizes is None:
            continue
        if not isinstance(sizes, dict):
            return _wrong(f"quota.{group}", "an object or null", sizes)
        problem = _each(sizes, tuple(sizes), _optional(_not_negative), f"quota.{group}")
    return problem


def _each(container: dict, keys, check, parent: str) -> str | None:
    """The first problem `check` finds among container's `keys`."""
    for key in keys:
        problem = _check(container, key, check, parent)
        if problem:
            return problem
    return None


def _check(container: dict, key: str, check, parent: str = "") -> str | None:
    """`check` of container[key] (a missing key is null); the field named from `parent`."""
    return check(container.get(key), f"{parent}.{key}" if parent else key)


def _optional(check):
    return lambda value, field: None if value is None else check(value, field)


def _wrong(field: str, what: str, value) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"`{field}` must be {what}, got {shown}"


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and value not in (float("inf"), float("-inf")))


def _number(value, field):
    return None if _is_number(value) else _wrong(field, "a number or null", value)


def _not_negative(value, field):
    return None if _is_number(value) and value >= 0 else _wrong(field, "a number from 0", value)


def _whole(value) -> bool:
    """A whole number, also as JSON Schema counts one: 2 or 2.0."""
    return _is_number(value) and float(value).is_integer()


def _count(value, field):
    return None if _whole(value) and value >= 0 else _wrong(field, "a whole number from 0", value)


def _priority(value, field):
    ok = _whole(value) and 0 <= value <= 100
    return None if ok else _wrong(field, "a whole number from 0 to 100", value)


def _concurrency(value, field):
    return None if value in CONCURRENCY else _wrong(field, f"one of {', '.join(CONCURRENCY)}", value)


def _flag(value, field):
    return None if isinstance(value, bool) else _wrong(field, "true or false", value)


def _text(value, field):
    return None if isinstance(value, str) else _wrong(field, "a string", value)


def _names(value, field):
    ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    return None if ok else _wrong(field, "a list of strings", value)


def _argv(value, field):
    ok = isinstance(value, list) and value and all(isinstance(item, str) for item in value)
    return None if ok else _wrong(field, "a command: a non-empty list of strings", value)


def _codes(value, field):
    ok = isinstance(value, list) and all(_whole(code) for code in value)
    return None if ok else _wrong(field, "a list of exit codes", value)


def _env(value, field):
    ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    return None if ok else _wrong(field, "an object of strings", value)
