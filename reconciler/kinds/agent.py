"""Agents on the device: a directory per agent and the compiled config the executor reads.

`/var/lib/systemprompt-os/agents/<name>/agent.json` holds the agent's tasks with every default
filled in and durations and sizes in plain numbers, plus the Capability and Quota it resolves
to. That file is the whole contract with the executor (see docs/agent-config.md); the executor
never reads manifests. Beside it, the run directories (queue, active, completed, failed,
checkpoints, logs, tmp, output).

Deleting an agent removes its config, so nothing runs it any more, and its run directories
when they are empty; run history and outputs are kept for the operator.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Collection, Iterable

from reconciler import AGENT_CONFIG, AGENTS_DIR, units
from reconciler.errors import UnsafePathError
from reconciler.kinds.recall import recall
from reconciler.manifest import Manifest, ManifestSet
from reconciler.resource import Change, Facts, Resource

if TYPE_CHECKING:
    from reconciler.device import Device
    from reconciler.memo import PlanMemo

CONFIG_FORMAT = 1
RUN_DIRECTORIES = ("queue", "active", "completed", "failed", "checkpoints", "logs", "tmp", "output")

TASK_DEFAULTS = {
    "timeout": "1h",
    "concurrency": "Forbid",
    "priority": 50,
}
RETRY_DEFAULTS = {"limit": 0, "initial": "10s", "factor": 2, "max": "5m"}
RETENTION_DEFAULTS = {"temp": "24h", "completed": "7d", "failed": "30d"}


def config_path(agent: str) -> str:
    return f"{AGENTS_DIR}/{agent}/{AGENT_CONFIG}"


def compile_agent(name: str, spec: dict, capability: dict | None, quota: dict | None) -> dict:
    """The executor's view of one agent: explicit, normalised, versioned. Pure."""
    agent_env = spec.get("env") or {}
    return {
        "format": CONFIG_FORMAT,
        "agent": name,
        "user": spec.get("user", "root"),
        "tasks": {
            task: _compile_task(task_spec, agent_env)
            for task, task_spec in sorted((spec.get("tasks") or {}).items())
        },
        "capability": capability,
        "quota": quota,
    }


def _compile_task(task: dict, agent_env: dict) -> dict:
    retries = task.get("retries") or {}
    backoff = retries.get("backoff") or {}
    checkpoint = task.get("checkpoint")
    compiled = {
        "command": task.get("command"),
        "steps": [
            {
                "name": step["name"],
                "command": step["command"],
                "timeoutSeconds": units.seconds(step["timeout"]) if "timeout" in step else None,
                "continueOnError": step.get("continueOnError", False),
            }
            for step in task.get("steps") or []
        ] or None,
        "timeoutSeconds": units.seconds(task.get("timeout", TASK_DEFAULTS["timeout"])),
        "retries": {
            "limit": _whole(retries.get("limit", RETRY_DEFAULTS["limit"])),
            "backoff": {
                "initialSeconds": units.seconds(backoff.get("initial", RETRY_DEFAULTS["initial"])),
                "factor": backoff.get("factor", RETRY_DEFAULTS["factor"]),
                "maxSeconds": units.seconds(backoff.get("max", RETRY_DEFAULTS["max"])),
            },
            "nonRetryableExitCodes": sorted(_whole(c) for c in retries.get("nonRetryableExitCodes") or []),
        },
        "concurrency": task.get("concurrency", TASK_DEFAULTS["concurrency"]),
        "priority": _whole(task.get("priority", TASK_DEFAULTS["priority"])),
        "env": {**agent_env, **(task.get("env") or {})},
        "workdir": task.get("workdir"),
        "checkpoint": None,
        "flexible": task.get("flexible", False),
        "heartbeatTimeoutSeconds": (
            units.seconds(task["heartbeat"]["timeout"]) if task.get("heartbeat") else None
        ),
        "onSuccess": list(task.get("onSuccess") or []),
        "onFailure": list(task.get("onFailure") or []),
    }
    checkpoint = checkpoint or {}  # on unless the task turns it off (docs/manifests.md)
    if checkpoint.get("enabled", True):
        interval = checkpoint.get("interval")
        compiled["checkpoint"] = {"intervalSeconds": units.seconds(interval) if interval else None}
    return compiled


def compile_capability(name: str, spec: dict) -> dict:
    def access(side: dict) -> dict:
        return {key: list(side.get(key) or []) for key in ("read", "write", "execute", "devices", "network")}

    return {
        "name": name,
        "allowed": access(spec.get("allowed") or {}),
        "denied": access(spec.get("denied") or {}),
    }


def _whole(value):
    """A whole number as an int: JSON Schema counts 64.0 as an integer, and YAML gives it for
    `64.0`, but what reads it (a cgroup's pids.max, setpriority) wants 64."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def compile_quota(name: str, spec: dict) -> dict:
    storage = spec.get("storage") or {}
    retention = {**RETENTION_DEFAULTS, **(spec.get("retention") or {})}
    return {
        "name": name,
        "cpuPercent": units.percent(spec["cpu"]) if "cpu" in spec else None,
        "memoryBytes": units.size_bytes(spec["memory"]) if "memory" in spec else None,
        "ioWeight": _whole(spec.get("ioWeight")),
        "tasksMax": _whole(spec.get("tasksMax")),
        "nice": _whole(spec.get("nice")),
        "storageBytes": {k: units.size_bytes(v) for k, v in sorted(storage.items())},
        "retentionSeconds": {k: units.seconds(v) for k, v in sorted(retention.items())},
    }


class AgentKind:
    name = "agent"
    replace_on: tuple[str, ...] = ()

    def inputs(self, manifests: ManifestSet) -> dict[str, tuple[Manifest, ...]]:
        """Resource id -> every manifest its rendering reads (render.py relies on this). Pure."""
        capabilities, quotas = manifests.of_kind("Capability"), manifests.of_kind("Quota")
        return {
            f"agent/{agent.name}": tuple(m for m in (
                agent, capabilities.get(agent.refs.capability),
                quotas.get(agent.refs.quota)) if m is not None)
            for agent in manifests.of_kind("Agent").values()
        }

    def render(self, manifests: ManifestSet, facts: Facts,
               skip: Collection[str] = ()) -> Iterable[Resource]:
        """One resource per Agent, but those whose id is in `skip`. Pure."""
        capabilities = {n: compile_capability(n, m.spec) for n, m in manifests.of_kind("Capability").items()}
        quotas = {n: compile_quota(n, m.spec) for n, m in manifests.of_kind("Quota").items()}
        for agent in manifests.of_kind("Agent").values():
            if f"agent/{agent.name}" in skip:
                continue
            config = compile_agent(
                agent.name,
                agent.spec,
                capabilities.get(agent.spec.get("capability")),
                quotas.get(agent.spec.get("quota")),
            )
            yield Resource(
                id=f"agent/{agent.name}",
                kind=self.name,
                attrs={
                    "path": config_path(agent.name),
                    "directories": list(RUN_DIRECTORIES),
                    "config": config,
                },
                source=agent.where,
            )

    def observe(self, device: "Device", ids: set[str], discover: bool = True,
                memo: "PlanMemo | None" = None) -> dict[str, Resource]:
        """Every agent with a compiled config on the device. The config is what makes an agent
        exist: without it nothing runs the agent, so leftover run directories alone are absent
        (a config deleted by hand is planned as a create, not an update from null).

        With a `memo`, an agent whose config file and directory have the stat they had when
        last read is known by its digest, and read again only if its attributes are needed."""
        names = {rid.split("/", 1)[1] for rid in ids}
        if discover:
            names.update(device.subdirectories(AGENTS_DIR))
        found = {}
        for name in sorted(names):
            resource = self._read(device, name) if memo is None else self._recall(device, name, memo)
            if resource is not None:
                found[resource.id] = resource
        return found

    def _recall(self, device: "Device", name: str, memo: "PlanMemo") -> Resource | None:
        # The directory's stat covers which run directories exist: adding, removing or
        # replacing an entry changes its modification time.
        stats = (device.stat(config_path(name)), device.stat(f"{AGENTS_DIR}/{name}"))
        return recall(memo, f"agent:{name}", stats, f"agent/{name}", self.name,
                      lambda: self._read(device, name))

    def _read(self, device: "Device", name: str) -> Resource | None:
        raw = device.read_text(config_path(name))
        if raw is None:
            return None
        existing = device.subdirectories(f"{AGENTS_DIR}/{name}")
        present = [d for d in RUN_DIRECTORIES if d in existing]
        try:
            config = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            config = "unreadable: not valid JSON"
        return Resource(
            id=f"agent/{name}",
            kind=self.name,
            attrs={"path": config_path(name), "directories": present, "config": config},
        )

    def apply(self, device: "Device", changes: list[Change]) -> Iterable[tuple[Change, str | None]]:
        for change in changes:
            try:
                if change.action == "delete":
                    self._delete(device, change.before)
                else:
                    self._write(device, change.after)
            except (OSError, UnsafePathError) as exc:
                yield change, str(exc)
            else:
                yield change, None

    @staticmethod
    def _write(device: "Device", attrs: dict) -> None:
        directory = attrs["path"].rsplit("/", 1)[0]
        for sub in attrs["directories"]:
            device.makedirs(f"{directory}/{sub}", mode=0o750)
        payload = json.dumps(attrs["config"], indent=2, sort_keys=True) + "\n"
        if device.read_text(attrs["path"]) != payload:
            device.write_atomic(attrs["path"], payload.encode(), mode=0o644)

    @staticmethod
    def _delete(device: "Device", attrs: dict) -> None:
        directory = attrs["path"].rsplit("/", 1)[0]
        device.remove(attrs["path"])
        for sub in RUN_DIRECTORIES:
            device.rmdir_if_empty(f"{directory}/{sub}")
        device.rmdir_if_empty(directory)


KIND = AgentKind()
