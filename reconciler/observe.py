"""Actual state: read what spos owns on the device, for every resource kind. Read-only."""

from __future__ import annotations

from reconciler.device import Device
from reconciler.kinds import ALL
from reconciler.memo import PlanMemo
from reconciler.resource import Resource


def observe(
    device: Device, ids: set[str], discover: bool = True, memo: PlanMemo | None = None
) -> dict[str, Resource]:
    """Resource id -> the resource as found on the device. With `discover`, each kind also
    reports what it finds carrying its ownership marker, so ids missing from a lost inventory
    are still pruned; without it, a kind may read only `ids` (what apply re-checks). With a
    `memo`, a kind may skip reading files whose stat it remembers (see memo.py)."""
    actual: dict[str, Resource] = {}
    for kind in ALL:
        wanted = {rid for rid in ids if rid.startswith(f"{kind.name}/")}
        actual.update(kind.observe(device, wanted, discover=discover, memo=memo))
    return actual
