"""Compare desired and actual resources and decide what apply must do. Pure: no I/O, no clock.

The decision per resource id:
- desired, absent on the device -> create;
- desired and present, attributes differ -> update, or replace when an attribute the kind
  cannot change in place differs (a crontab line moving to another file);
- present, no longer desired -> delete;
- identical -> nothing.

The reason is for the reader: whether the manifests changed, or the device drifted from what
the inventory says was applied.
"""

from __future__ import annotations

from reconciler.kinds import BY_NAME
from reconciler.manifest import dotted_path
from reconciler.resource import Change, Plan, Resource, digest


def plan(
    desired: dict[str, Resource],
    actual: dict[str, Resource],
    inventory: dict[str, dict],
    *,
    root: str,
    manifests: dict,
    version: str = "",
) -> Plan:
    """The changes that take `actual` to `desired`. `inventory` is id -> {kind, digest} as last
    applied; it only shapes the reasons shown. A pure function of its arguments."""
    changes = []
    for rid in sorted(set(desired) | set(actual)):
        change = _decide(desired.get(rid), actual.get(rid), inventory.get(rid))
        if change is not None:
            changes.append(change)
    observed_ids = set(desired) | set(actual) | set(inventory)
    return Plan(
        root=root,
        changes=changes,
        desired={rid: {"kind": r.kind, "digest": r.digest} for rid, r in sorted(desired.items())},
        observed={
            rid: (actual[rid].digest if rid in actual else None) for rid in sorted(observed_ids)
        },
        inventory=digest(inventory),
        manifests=manifests,
        version=version,
    )


def _decide(want: Resource | None, have: Resource | None, applied: dict | None) -> Change | None:
    if want is not None and have is None:
        reason = "deleted on the device (drift)" if applied else "new"
        return _change(want, "create", reason, None, want.attrs)
    if want is None and have is not None:
        reason = "no longer in the manifests"
        if have.note:
            reason += f"; {have.note}: apply keeps it until that ends"
        return _change(have, "delete", reason, have.attrs, None)
    if want is None or have is None or want.digest == have.digest:
        return None
    if applied is None:
        # cron lines and units carry spos's marker; agent configs, cgroups and registrations
        # are spos's by where they are
        found = ("with a spos marker" if getattr(BY_NAME[want.kind], "marked", False)
                 else "where spos keeps it")
        reason = f"found on the device {found}, not in the inventory"
    elif applied.get("digest") == want.digest:
        reason = "changed on the device (drift)"
    else:
        reason = "manifest changed"
    fields = field_changes(have.attrs, want.attrs)
    immutable = [f["path"] for f in fields if f["path"].split(".")[0] in BY_NAME[want.kind].replace_on]
    if immutable:
        reason = f"{reason}; {', '.join(immutable)} cannot change in place"
        return _change(want, "replace", reason, have.attrs, want.attrs, fields)
    return _change(want, "update", reason, have.attrs, want.attrs, fields)


def _change(resource: Resource, action, reason, before, after, fields=None) -> Change:
    return Change(
        id=resource.id,
        kind=resource.kind,
        action=action,
        reason=reason,
        before=before,
        after=after,
        fields=fields if fields is not None else [],
        source=resource.source,
    )


def field_changes(before: dict, after: dict) -> list[dict]:
    """Leaf-level differences as [{path, before, after}], paths dotted (`config.tasks.x.priority`).

    A field present on one side only shows `None` on the other. A list that changed length is
    one change, shown whole: items shifting by one would otherwise read as every later item
    changing."""
    changes: list[dict] = []

    def walk(old, new, path: tuple) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in old.keys() | new.keys():
                walk(old.get(key, _MISSING), new.get(key, _MISSING), (*path, key))
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            for index, (old_item, new_item) in enumerate(zip(old, new)):
                walk(old_item, new_item, (*path, index))
        elif type(old) is not type(new) or old != new:
            changes.append({
                "path": dotted_path(path),
                "before": None if old is _MISSING else old,
                "after": None if new is _MISSING else new,
            })

    walk(before, after, ())
    return sorted(changes, key=lambda change: change["path"])


_MISSING = object()
