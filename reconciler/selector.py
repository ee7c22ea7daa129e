"""Device selectors: whether an Agent's `selector` matches a device's labels. Pure: no I/O.

The Kubernetes label selector, as docs/manifests.md ("Selectors") describes it: every entry of
`matchLabels` and every `matchExpressions` condition must hold, and an empty or absent selector
matches every device. Selectors reach this module validated by the schema (known operators,
`values` non-empty for In / NotIn); it decides, it does not check.
"""

from __future__ import annotations

from typing import Mapping


def matches(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """Whether a device with `labels` is selected. None or `{}` selects every device."""
    if not selector:
        return True
    wanted = selector.get("matchLabels") or {}
    if any(labels.get(key) != value for key, value in wanted.items()):
        return False
    return all(_holds(condition, labels) for condition in selector.get("matchExpressions") or ())


def _holds(condition: Mapping, labels: Mapping[str, str]) -> bool:
    key, operator = condition["key"], condition["operator"]
    values = condition.get("values") or ()
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown selector operator {operator!r}")


def describe(labels: Mapping[str, str]) -> str:
    """Labels as `--device-labels` takes them, sorted: `k=v,k2=v2` (`none` for no labels)."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "none"
