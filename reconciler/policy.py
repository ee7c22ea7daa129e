"""Organisation-wide guardrails (`Policy` documents) checked against every manifest. Pure.

A policy can deny paths, executables, devices and network to every Capability, put ceilings on
Quotas and task timeouts, bound how often schedules fire, and require every Agent to name a
Capability and a Quota. A violation is reported at the field that breaks the rule, naming the
policy that forbids it.
"""

from __future__ import annotations

from typing import Iterable

from reconciler import cronexpr, units
from reconciler.manifest import Manifest

Violation = tuple[Manifest, tuple, str, str]


def violations(manifests: list[Manifest]) -> Iterable[Violation]:
    """Every way `manifests` break the Policy documents among them."""
    policies = [m for m in manifests if m.kind == "Policy"]
    others = [m for m in manifests if m.kind != "Policy"]
    for policy in policies:
        spec = policy.spec
        yield from _denials(policy, spec.get("deny") or {}, others)
        yield from _ceilings(policy, spec.get("ceilings") or {}, others)
        yield from _schedule_bounds(policy, spec.get("schedules") or {}, others)
        yield from _requirements(policy, spec.get("require") or {}, others)


def _by(policy: Manifest) -> str:
    return f"policy {policy.name!r} ({policy.where})"


def _overlaps(allowed: str, denied: str) -> bool:
    """Allowing `allowed` grants `denied` when one contains the other."""
    a, d = allowed.rstrip("/") or "/", denied.rstrip("/") or "/"
    return a == d or d.startswith(a if a == "/" else a + "/") or a.startswith(d if d == "/" else d + "/")


def _denials(policy: Manifest, deny: dict, manifests: list[Manifest]) -> Iterable[Violation]:
    for capability in (m for m in manifests if m.kind == "Capability"):
        allowed = capability.spec.get("allowed") or {}
        for access in ("read", "write", "execute", "devices"):
            for index, path in enumerate(allowed.get(access) or []):
                for denied in deny.get(access) or []:
                    if _overlaps(path, denied):
                        yield capability, ("spec", "allowed", access, index), (
                            f"allowing {access} of {path} grants {denied}, which {_by(policy)} denies"
                        ), ""
        denied_network = set(deny.get("network") or [])
        for index, item in enumerate(allowed.get("network") or []):
            if item in denied_network or ("any" in denied_network and item != "none"):
                yield capability, ("spec", "allowed", "network", index), (
                    f"network {item!r} is denied by {_by(policy)}"
                ), ""


_QUOTA_CEILINGS = {
    "cpu": (units.percent, "CPU"),
    "memory": (units.size_bytes, "memory"),
    "tasksMax": (int, "tasksMax"),
    "ioWeight": (int, "ioWeight"),
}


def _ceilings(policy: Manifest, ceilings: dict, manifests: list[Manifest]) -> Iterable[Violation]:
    for quota in (m for m in manifests if m.kind == "Quota"):
        for field, (measure, label) in _QUOTA_CEILINGS.items():
            if field in ceilings and field in quota.spec:
                if measure(quota.spec[field]) > measure(ceilings[field]):
                    yield quota, ("spec", field), (
                        f"{label} {quota.spec[field]} is above the ceiling {ceilings[field]} "
                        f"of {_by(policy)}"
                    ), ""
    if "timeout" not in ceilings:
        return
    limit = units.seconds(ceilings["timeout"])
    for agent in (m for m in manifests if m.kind == "Agent"):
        for task_name, task in (agent.spec.get("tasks") or {}).items():
            timeout = task.get("timeout")
            if timeout and units.seconds(timeout) > limit:
                yield agent, ("spec", "tasks", task_name, "timeout"), (
                    f"timeout {timeout} is above the ceiling {ceilings['timeout']} of {_by(policy)}"
                ), ""


def _schedule_bounds(policy: Manifest, bounds: dict, manifests: list[Manifest]) -> Iterable[Violation]:
    if "minInterval" not in bounds:
        return
    minimum = units.seconds(bounds["minInterval"])
    for schedule in (m for m in manifests if m.kind == "Schedule"):
        interval, path = _shortest_interval(schedule.spec)
        if interval is not None and interval < minimum:
            yield schedule, path, (
                f"fires every {_human(interval)}, more often than the minimum interval "
                f"{bounds['minInterval']} of {_by(policy)}"
            ), ""


def _shortest_interval(spec: dict) -> tuple[float | None, tuple]:
    expression = spec.get("cron")
    if isinstance(expression, str):
        if expression.strip().lower() == cronexpr.REBOOT:
            return None, ()
        return cronexpr.parse(expression).min_interval_minutes() * 60.0, ("spec", "cron")
    timer = spec.get("timer") or {}
    if "onUnitActiveSec" in timer:
        return units.seconds(timer["onUnitActiveSec"]), ("spec", "timer", "onUnitActiveSec")
    return None, ()


def _requirements(policy: Manifest, require: dict, manifests: list[Manifest]) -> Iterable[Violation]:
    for agent in (m for m in manifests if m.kind == "Agent"):
        for field in ("capability", "quota"):
            if require.get(field) and not agent.spec.get(field):
                yield agent, ("spec",), f"every Agent must name a {field} ({_by(policy)})", (
                    f"add spec.{field}")


def _human(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
