"""Actual state: read what spos owns on the device, for every resource kind. Read-only."""

from __future__ import annotations

from reconciler.device import Device
from reconciler.kinds import ALL
from reconciler.resource import Resource


def observe(device: Device, ids: set[str], discover: bool = True) -> dict[str, Resource]:
    """Resource id -> the resource as found on the device. With `discover`, each kind also
    reports what it finds carrying its ownership marker, so ids missing from a lost inventory
    are still pruned; without it, a kind may read only `ids` (what apply re-checks)."""
    actual: dict[str, Resource] = {}
    for kind in ALL:
        wanted = {rid for rid in ids if rid.startswith(f"{kind.name}/")}
        actual.update(kind.observe(device, wanted, discover=discover))
    return actual
