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
