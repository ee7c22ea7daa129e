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


def read_agent_config(device: Device, agent: str) -> tuple[dict, bytes]:
    """The agent's compiled config, and the exact bytes it was read from (the executor records
    their digest as the config each attempt ran under)."""
    path = f"{AGENTS_DIR}/{agent}/{AGENT_CONFIG}"
    raw = device.read_bytes(path)
    if raw is None:
        raise ConfigError(f"agent {agent!r} is not applied on this device (no {path})")
    try:
        config = leanjson.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON; run spos apply to repair it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object; run spos apply to repair it")
    if config.get("format") != SUPPORTED_FORMAT:
        raise ConfigError(
            f"{path} has format {config.get('format')!r}; this executor reads format {SUPPORTED_FORMAT}"
        )
    return config, raw


def task_config(config: dict, task: str) -> dict:
    tasks = config.get("tasks") or {}
    if task not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise ConfigError(f"agent {config.get('agent')!r} has no task {task!r} (its tasks: {known})")
    return tasks[task]
