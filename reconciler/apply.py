"""Carry out a plan on the device, exactly as planned, and record the result.

A saved plan is applied under the lock after re-observing every resource it looked at: when one
of them, or the inventory, changed since it was made, it is refused ("stale plan"). `spos apply
DIR` takes the lock before planning instead, so nothing can change between its plan and its
apply and there is nothing to re-check (`apply_locked`). It then applies changes kind by kind (creates and updates in kind
order, deletes in reverse), each kind changing only what its changes name; then a kind with a
`finish` step acts once on all of its changes that were applied (one systemd daemon-reload,
then activation). A failure on one resource does not stop the others. Whatever happened, the
inventory is written once at the end (in `finally`) so that it stays true: what was applied is
recorded, a failed delete stays inventoried for the next run, a failed create is not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from reconciler.device import Device
from reconciler.errors import StalePlanError
from reconciler.kinds import ALL
from reconciler.observe import observe
from reconciler.resource import Change, Plan, digest
from reconciler.state import ApplyLock, read_inventory, write_inventory


@dataclass
class ApplyResult:
    applied: list[Change] = field(default_factory=list)
    failed: list[tuple[Change, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def apply(
    device: Device,
    plan: Plan,
    *,
    lock_timeout: float = 0.0,
    progress: Callable[[Change, str | None], None] = lambda change, error: None,
) -> ApplyResult:
    """Apply a saved `plan` to `device`. Raises StalePlanError (changing nothing) when the device
    no longer looks as it did when the plan was made."""
    device.ensure_root()
    with ApplyLock(device, timeout=lock_timeout):
        _refuse_if_stale(device, plan, read_inventory(device)["resources"])
        return apply_locked(device, plan, progress=progress)


def apply_locked(
    device: Device,
    plan: Plan,
    *,
    progress: Callable[[Change, str | None], None] = lambda change, error: None,
) -> ApplyResult:
    """Apply `plan`, made while the caller held the apply lock it still holds."""
    inventory = read_inventory(device)
    result = ApplyResult()
    resources = dict(inventory["resources"])
    try:
        for kind, changes in _in_order(plan.changes):
            for change, error in kind.apply(device, changes):
                progress(change, error)
                if error is None:
                    result.applied.append(change)
                else:
                    result.failed.append((change, error))
        _finish(device, result, progress)
    finally:
        _record(resources, plan, result)
        write_inventory(
            device, resources, plan.manifests.get("revision"), plan.manifests.get("digest", "")
        )
    return result


def _refuse_if_stale(device: Device, plan: Plan, inventory: dict) -> None:
    problems = []
    if digest(inventory) != plan.inventory:
        problems.append("the inventory changed (another apply ran since)")
    actual = observe(device, set(plan.observed), discover=False)
    for rid in sorted(plan.observed):
        now = actual[rid].digest if rid in actual else None
        if plan.observed[rid] != now:
            problems.append(f"{rid} changed on the device")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StalePlanError(f"stale plan: {shown}. Run plan again.")


def _finish(device: Device, result: ApplyResult,
            progress: Callable[[Change, str | None], None]) -> None:
    """Let each kind act once on everything of its kind that was applied (systemd reloads once
    per apply, then activates). A change whose finishing fails counts as failed."""
    for kind in ALL:
        finish = getattr(kind, "finish", None)
        applied = [change for change in result.applied if change.kind == kind.name]
        if finish is None or not applied:
            continue
        for change, error in finish(device, applied):
            progress(change, error)
            result.applied.remove(change)
            result.failed.append((change, error))


def _in_order(changes: list[Change]):
    by_kind = {kind.name: [] for kind in ALL}
    for change in changes:
        by_kind[change.kind].append(change)
    for kind in ALL:
        upserts = [c for c in by_kind[kind.name] if c.action != "delete"]
        if upserts:
            yield kind, upserts
    for kind in reversed(ALL):
        deletes = [c for c in by_kind[kind.name] if c.action == "delete"]
        if deletes:
            yield kind, deletes


def _record(resources: dict, plan: Plan, result: ApplyResult) -> None:
    """Make `resources` (the inventory) say what is now true on the device."""
    failed = {change.id for change, _ in result.failed}
    for change in result.applied:
        if change.action == "delete":
            resources.pop(change.id, None)
        else:
            resources[change.id] = plan.desired[change.id]
    changed = {change.id for change in plan.changes}
    for rid, entry in plan.desired.items():
        if rid not in changed:
            resources[rid] = entry
    for rid in list(resources):
        if rid not in plan.desired and plan.observed.get(rid) is None and rid not in failed:
            del resources[rid]
