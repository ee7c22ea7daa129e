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
        for change in changes:
            lines.extend(_change_lines(change))
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
        for field in change["fields"]:
            lines.append(f"        {field['path']}: {_short(field['before'])} -> {_short(field['after'])}")
    elif change["action"] == "create":
        for path, value in _leaves(change["after"]):
            if value in (None, [], {}):
                continue
            lines.append(f"        {path}: {_short(value)}")
    return lines


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
