"""Desired state: every resource the manifests call for on this device. Pure: no I/O."""

from __future__ import annotations

from reconciler.kinds import ALL
from reconciler.manifest import ManifestSet
from reconciler.resource import Facts, Resource


def render(manifests: ManifestSet, facts: Facts) -> dict[str, Resource]:
    """Resource id -> desired resource, for every kind. A pure function of its arguments."""
    desired: dict[str, Resource] = {}
    for kind in ALL:
        for resource in kind.render(manifests, facts):
            desired[resource.id] = resource
    return desired


def notices(manifests: ManifestSet) -> list[str]:
    """What the manifests declare that this version of spos validates but does not put on the
    device, said plainly so that a plan never implies more than apply will do. Pure."""
    timers = sorted(n for n, m in manifests.of_kind("Schedule").items() if "timer" in m.spec)
    triggers = sorted(manifests.of_kind("Trigger"))
    said = []
    if timers:
        said.append(
            f"{len(timers)} timer Schedule(s) ({', '.join(timers)}) are validated but not "
            "rendered: systemd timers are not managed by this version of spos."
        )
    if triggers:
        said.append(
            f"{len(triggers)} Trigger(s) ({', '.join(triggers)}) are validated but not "
            "registered: the trigger daemon is not part of this version of spos."
        )
    return said
