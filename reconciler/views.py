"""What users read: the plan and validation results as text, rendered from their JSON form.

The text view takes the same dict that `--json` prints, so the two cannot disagree. Pure.
"""

from __future__ import annotations

import json
from typing import Any

WIDTH = 100


def plan_text(plan: dict) -> str:
    """The human plan, Terraform style: one block per change, then the summary line."""
    lines = []
    changes = plan["changes"]
    if changes:
        lines.append(f"spos will make these changes under root {plan['root']}:")
        lines.append("")
        expected: dict[str, list[dict]] = {}
        for entry in plan.get("estimates", []):
            expected.setdefault(entry["change"], []).append(entry)
        for change in changes:
            lines.extend(_change_lines(change))
            lines.extend(f"        # {expectation_text(entry)}" for entry in expected.get(change["id"], ()))
            lines.append("")
    for notice in plan.get("notices", []):
        lines.append(f"Note: {notice}")
    if plan.get("notices"):
        lines.append("")
    lines.append(summary_line(plan["summary"]))
    return "\n".join(lines) + "\n"


def summary_line(summary: dict) -> str:
    if not any(summary[a] for a in ("create", "update", "replace", "delete")):
        return f"No changes. The device matches the manifests ({summary['unchanged']} resources)."
    return (
        f"Plan: {summary['create']} to create, {summary['update']} to update, "
        f"{summary['replace']} to replace, {summary['delete']} to delete, "
        f"{summary['unchanged']} unchanged."
    )


def _change_lines(change: dict) -> list[str]:
    head = f"  {change['symbol']:<3} {change['id']}"
    source = f"  [{change['source']}]" if change.get("source") else ""
    lines = [f"{head}  ({change['reason']}){source}"]
    if change["action"] in ("update", "replace"):
        lines.extend(f"        # {sentence}" for sentence in in_words(change))
        for field in change["fields"]:
            lines.append(f"        {field['path']}: {_short(field['before'])} -> {_short(field['after'])}")
    elif change["action"] == "create":
        for path, value in _leaves(change["after"]):
            if value in (None, [], {}):
                continue
            lines.append(f"        {path}: {_short(value)}")
    return lines


def expectation_text(entry: dict) -> str:
    """What a task changed by the plan usually takes, against the limits it will have:
    "research-001/scan expected 4m12s (p95 6m01s), peak 610M: fits the 2G quota"."""
    task = f"{entry['agent']}/{entry['task']}"
    found = entry["estimate"]
    flags = "".join(f"; {flag}" for flag in entry.get("flags", ()))
    if found is None:
        runs, finished = entry["completedRuns"], entry.get("finishedRuns", entry["completedRuns"])
        return (f"{task}: {runs} completed run{'' if runs == 1 else 's'} of {finished} finished, "
                f"too few for an estimate{flags}")
    said = f"{task} expected {clock(found['p50Seconds'])} (p95 {clock(found['p95Seconds'])})"
    peak, limit = found["p95PeakMemoryBytes"], entry["memoryLimitBytes"]
    if peak is not None:
        said += f", peak {human_size(peak)}"
        if limit is not None:
            quota = f"the {human_size(limit)} memory quota"
            said += f": fits {quota}" if peak <= limit else f": over {quota}, it would be OOM-killed"
    timeout = entry["timeoutSeconds"]
    if timeout is not None and found["p95Seconds"] > timeout:
        said += f"; p95 exceeds the {clock(timeout)} timeout"
    return said + flags


_ACCESS = {
    "read": "read access to", "write": "write access to", "execute": "the right to run",
    "devices": "access to the device", "network": "network access to",
}
_QUOTA = (("memoryBytes", "memory", "size"), ("cpuPercent", "CPU", "percent"),
          ("tasksMax", "tasks", "plain"), ("ioWeight", "I/O weight", "plain"),
          ("nice", "nice level", "plain"))


def in_words(change: dict) -> list[str]:
    """What an update to an agent's capability or limits means, as an operator reviews it:
    "research-001 gains write access to /data/out", "research-001: memory 2G -> 4G". Pure."""
    before, after = change.get("before") or {}, change.get("after") or {}
    name = change["id"].split("/", 1)[-1]
    if change["kind"] == "agent":
        old, new = before.get("config") or {}, after.get("config") or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            return []  # the device's copy could not be read: its fields say so, nothing to compare
        return _capability_words(name, old.get("capability") or {}, new.get("capability") or {}) \
            + _quota_words(name, old.get("quota") or {}, new.get("quota") or {})
    if change["kind"] == "cgroup":
        said = []
        for key, label, show in (("memory", "memory limit", _kernel_size), ("cpu", "CPU limit", _kernel_cpu),
                                 ("tasks", "tasks limit", str), ("ioWeight", "I/O weight", str)):
            if before.get(key) != after.get(key):
                said.append(f"{name}: {label} {show(before.get(key))} -> {show(after.get(key))}")
        return said
    return []


def _capability_words(agent: str, old: dict, new: dict) -> list[str]:
    said = []
    if old.get("name") != new.get("name"):
        said.append(f"{agent} now uses capability {new.get('name') or 'none'} "
                    f"(was {old.get('name') or 'none'})")
    for side in ("allowed", "denied"):
        for access, what in _ACCESS.items():
            was = set((old.get(side) or {}).get(access) or [])
            now = set((new.get(side) or {}).get(access) or [])
            for item in sorted(now - was):
                said.append(f"{agent} gains {what} {item}" if side == "allowed"
                            else f"{agent} is now denied {what} {item}")
            for item in sorted(was - now):
                said.append(f"{agent} loses {what} {item}" if side == "allowed"
                            else f"{agent} is no longer denied {what} {item}")
    return said


def _quota_words(agent: str, old: dict, new: dict) -> list[str]:
    said = []
    if old.get("name") != new.get("name"):
        said.append(f"{agent} now uses quota {new.get('name') or 'none'} (was {old.get('name') or 'none'})")
    for key, label, kind in _QUOTA:
        if old.get(key) != new.get(key):
            said.append(f"{agent}: {label} {_quantity(old.get(key), kind)} -> {_quantity(new.get(key), kind)}")
    for group, label, kind in (("storageBytes", "storage", "size"), ("retentionSeconds", "retention", "time")):
        was, now = old.get(group) or {}, new.get(group) or {}
        for key in sorted(was.keys() | now.keys()):
            if was.get(key) != now.get(key):
                said.append(f"{agent}: {label} {key} {_quantity(was.get(key), kind)} -> "
                            f"{_quantity(now.get(key), kind)}")
    return said


def _quantity(value, kind: str) -> str:
    if value is None:
        return "unlimited" if kind in ("size", "percent", "plain") else "none"
    if kind == "size":
        return human_size(value)
    if kind == "percent":
        return f"{value:g}%"
    if kind == "time":
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f"{value // seconds}{unit}"
        return f"{value}s"
    return str(value)


def human_size(value: int) -> str:
    """Bytes in the units manifests use (decimal): 256000000 -> 256M, 3999997952 -> 4G."""
    for unit, factor in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= factor:
            return f"{value / factor:.1f}".removesuffix(".0") + unit
    return f"{value}B"


def clock(seconds: float) -> str:
    """0.4s, 42s, 4m12s, 1h05m."""
    if seconds < 10:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _kernel_size(value: str | None) -> str:
    return human_size(int(value)) if value and value.isdigit() else str(value)


def _kernel_cpu(value: str | None) -> str:
    quota, _, period = (value or "").partition(" ")
    if quota.isdigit() and period.isdigit():
        return f"{int(quota) * 100 / int(period):g}%"
    return str(value)


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        out = []
        for key, child in value.items():
            out.extend(_leaves(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, value)]


def _short(value: Any) -> str:
    """The value as JSON, lists and objects cut at WIDTH. Strings are shown whole: a crontab
    line that changed past the cut would otherwise read the same on both sides of the arrow."""
    text = json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) or len(text) <= WIDTH:
        return text
    return text[: WIDTH - 3] + "..."


def apply_line(change: dict, error: str | None) -> str:
    if error:
        return f"  {change['symbol']:<3} {change['id']}: FAILED: {error}"
    return f"  {change['symbol']:<3} {change['id']}: done"


def diagnostics_text(diagnostics: list[dict]) -> str:
    lines = []
    for d in diagnostics:
        where = f" (at {d['field']})" if d["field"] else ""
        lines.append(f"{d['file']}:{d['line']}:{d['col']}: {d['severity']}: {d['summary']}{where}")
        if d["hint"]:
            lines.append(f"    hint: {d['hint']}")
    count = len(diagnostics)
    lines.append(f"{count} problem{'s' if count != 1 else ''} found; nothing was changed.")
    return "\n".join(lines) + "\n"
