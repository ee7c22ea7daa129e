"""Organisation-wide guardrails (`Policy` documents) checked against every manifest. Pure: how
often a timer's calendar events fire is given by the caller (systemd computes it).

A policy can deny paths, executables, devices and network to every Capability, put ceilings on
Quotas and task timeouts, bound how often schedules fire, and require every Agent to name a
Capability and a Quota. A violation is reported at the field that breaks the rule, naming the
policy that forbids it.

A denied path is granted by allowing it, anything below it or a directory above it. A denied
network destination is granted by any allowed rule that reaches some address and port of it,
unless the Capability's own `denied` list refuses all of it again ("any, but not the metadata
service" is a common and compliant Capability).
"""

from __future__ import annotations

import ipaddress
import posixpath
from functools import lru_cache
from typing import Callable, Iterable

from reconciler import cronexpr, units
from reconciler.manifest import Manifest

Violation = tuple[Manifest, tuple, str, str]
CalendarInterval = Callable[[tuple[str, ...]], "float | None"]
"""The shortest time between two firings of a timer with these onCalendar events, or None."""
DEFAULT_TIMEOUT = "1h"
"""The timeout of a task that sets none (agent.schema.json); ceilings.timeout counts it."""


def violations(manifests: list[Manifest],
               calendar_interval: CalendarInterval | None = None) -> Iterable[Violation]:
    """Every way `manifests` break the Policy documents among them. Without
    `calendar_interval`, timers' calendar events are not held to `schedules.minInterval`."""
    policies = [m for m in manifests if m.kind == "Policy"]
    others = [m for m in manifests if m.kind != "Policy"]
    for policy in policies:
        spec = policy.spec
        yield from _denials(policy, spec.get("deny") or {}, others)
        yield from _ceilings(policy, spec.get("ceilings") or {}, others)
        yield from _schedule_bounds(policy, spec.get("schedules") or {}, others,
                                    calendar_interval)
        yield from _requirements(policy, spec.get("require") or {}, others)


def _by(policy: Manifest) -> str:
    return f"policy {policy.name!r} ({policy.where})"


def _overlaps(allowed: str, denied: str) -> bool:
    """Allowing `allowed` grants `denied` when one contains the other (compared after resolving
    `.`, `..` and repeated slashes, so `/usr/local/../bin` is `/usr/bin`)."""
    a, d = _normal(allowed), _normal(denied)
    return a == d or d.startswith(a if a == "/" else a + "/") or a.startswith(d if d == "/" else d + "/")


def _normal(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


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
        carved_out = (capability.spec.get("denied") or {}).get("network") or []
        for index, item in enumerate(allowed.get("network") or []):
            for denied in deny.get("network") or []:
                if _network_overlaps(item, denied) and not any(
                    _network_covers(own, denied) for own in carved_out
                ):
                    yield capability, ("spec", "allowed", "network", index), (
                        f"allowing network {item!r} grants {denied!r}, which {_by(policy)} denies"
                    ), f"narrow the rule, or add {denied!r} to spec.denied.network"


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
            if "timeout" in task and units.seconds(task["timeout"]) > limit:
                yield agent, ("spec", "tasks", task_name, "timeout"), (
                    f"timeout {task['timeout']} is above the ceiling {ceilings['timeout']} "
                    f"of {_by(policy)}"
                ), ""
            elif "timeout" not in task and units.seconds(DEFAULT_TIMEOUT) > limit:
                yield agent, ("spec", "tasks", task_name), (
                    f"the default timeout {DEFAULT_TIMEOUT} is above the ceiling "
                    f"{ceilings['timeout']} of {_by(policy)}"
                ), f"set a timeout of at most {ceilings['timeout']}"


def _network_overlaps(allowed: str, denied: str) -> bool:
    """Whether some destination (address and port) matches both rules."""
    return any(
        a.version == d.version and a.overlaps(d) and (a_port is None or d_port is None or a_port == d_port)
        for a, a_port in destinations(allowed)
        for d, d_port in destinations(denied)
    )


def _network_covers(own: str, denied: str) -> bool:
    """Whether a Capability's own `denied` rule refuses every destination of `denied`."""
    if own == denied:
        return True
    inside = destinations(own, names=False)
    return all(
        any(d.version == o.version and d.subnet_of(o) and o_port in (None, d_port) for o, o_port in inside)
        for d, d_port in destinations(denied)
    )


_NAMED_NETWORKS = {
    "any": ("0.0.0.0/0", "::/0"),
    "loopback": ("127.0.0.0/8", "::1/128"),
    "none": (),
}


_SCHEME_PORTS = {"http": 80, "https": 443}


def host_rule(rule: str) -> tuple[str, int | None] | None:
    """(host name, port or None) for a rule naming a host (`arxiv.org`, `arxiv.org:8443`,
    `https://arxiv.org`, where the scheme gives the port) or any host on a port (`*:22`, host
    `*`); None for an address rule. Pure: names are resolved only when a run starts."""
    if rule in _NAMED_NETWORKS:
        return None
    scheme, sep, rest = rule.partition("://")
    if not sep:
        scheme, rest = "", rule
    host, _, port_text = rest.rstrip("/").partition(":")
    if host != "*" and ("." not in host or not any(c.isalpha() for c in host.rsplit(".", 1)[-1])):
        return None  # an IPv4 address or an IPv6 one (those have no final alphabetic label)
    if ":" in port_text or "[" in host:
        return None
    port = int(port_text) if port_text else _SCHEME_PORTS.get(scheme)
    return host.lower(), port


def destinations(rule: str, *, names: bool = True) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]]:
    """A network rule as (network, port or None) pairs; `none` has none. ValueError when the
    rule has the schema's shape but is no address (`1:2:3`).

    A host name may resolve to any address, so it stands for every address on its port; with
    `names=False` it stands for none (what a rule can be relied on to cover). `*:PORT` is every
    address on that port either way."""
    named = host_rule(rule)
    if named is not None:
        if named[0] != "*" and not names:
            return []
        return [(ipaddress.ip_network(n), named[1]) for n in _NAMED_NETWORKS["any"]]
    if rule in _NAMED_NETWORKS:
        return [(ipaddress.ip_network(n), None) for n in _NAMED_NETWORKS[rule]]
    address, port = rule, None
    if rule.startswith("["):
        address, _, rest = rule[1:].partition("]")
        port = int(rest[1:]) if rest else None
    elif rule.count(":") == 1:
        address, _, text = rule.partition(":")
        port = int(text)
    return [(ipaddress.ip_network(address, strict=False), port)]


def _schedule_bounds(policy: Manifest, bounds: dict, manifests: list[Manifest],
                     calendar_interval: CalendarInterval | None) -> Iterable[Violation]:
    if "minInterval" not in bounds:
        return
    minimum = units.seconds(bounds["minInterval"])
    for schedule in (m for m in manifests if m.kind == "Schedule"):
        interval, path = _shortest_interval(schedule.spec, calendar_interval)
        if interval is not None and interval < minimum:
            yield schedule, path, (
                f"fires every {_human(interval)}, more often than the minimum interval "
                f"{bounds['minInterval']} of {_by(policy)}"
            ), ""


@lru_cache(maxsize=1024)
def _cron_interval(expression: str) -> float:
    """Seconds between the closest two firings; many Schedules share few expressions."""
    return cronexpr.parse(expression).min_interval_minutes() * 60.0


def _shortest_interval(spec: dict, calendar_interval: CalendarInterval | None
                       ) -> tuple[float | None, tuple]:
    """The shortest time between two firings of a Schedule, and the field that sets it; None
    for one that does not repeat (or whose calendar events are not computed)."""
    expression = spec.get("cron")
    if isinstance(expression, str):
        if expression.strip().lower() == cronexpr.REBOOT:
            return None, ()
        return _cron_interval(expression), ("spec", "cron")
    timer = spec.get("timer") or {}
    found: list[tuple[float, tuple]] = []
    if "onUnitActiveSec" in timer:
        found.append((units.seconds(timer["onUnitActiveSec"]), ("spec", "timer", "onUnitActiveSec")))
    calendar = timer.get("onCalendar")
    events = [calendar] if isinstance(calendar, str) else calendar if isinstance(calendar, list) else []
    events = tuple(event.strip() for event in events if isinstance(event, str))
    interval = calendar_interval(events) if events and calendar_interval else None
    if interval is not None:
        found.append((interval, ("spec", "timer", "onCalendar")))
    return min(found, key=lambda pair: pair[0]) if found else (None, ())


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
