"""Desired state: every resource the manifests call for on this device. Pure: no I/O.

Fleet targeting happens here, once, before any kind renders: an Agent whose selector does not
match the device's labels (Facts.labels) is left out of the manifests the kinds see, with the
Schedules and Triggers that start its tasks. What was applied for it before is then no longer
desired, and the plan prunes it like a deleted agent.
"""

from __future__ import annotations

import hashlib
from functools import partial

from reconciler import selector
from reconciler.kinds import ALL
from reconciler.manifest import ManifestSet
from reconciler.resource import Facts, Resource

SHOWN_NAMES = 10
"""How many untargeted Agents a notice names before it only counts the rest."""


def render(manifests: ManifestSet, facts: Facts, reuse: dict[str, str] | None = None,
           inputs: dict[str, dict] | None = None) -> dict[str, Resource]:
    """Resource id -> desired resource, for every kind, from the manifests that target this
    device (`for_device`). A pure function of its arguments.

    `reuse` maps ids to the digest they were rendered to from inputs with the same key
    (`input_keys`) and the same facts: those are not rendered, only known by that digest, and
    rendered on their own if their attributes are asked for. `inputs` is what `inputs(manifests)`
    gives, when the caller has it already."""
    reuse = reuse or {}
    targeted = for_device(manifests, facts)
    if targeted is not manifests or inputs is None:
        inputs = kind_inputs(targeted)
    manifests = targeted
    desired: dict[str, Resource] = {}
    for kind in ALL:
        for resource in kind.render(manifests, facts, skip=reuse):
            desired[resource.id] = resource
        whole = _Deferred(kind, manifests, facts)
        for rid in inputs[kind.name].keys() & reuse.keys():
            desired[rid] = Resource(rid, kind.name, digest=reuse[rid], load=partial(whole.get, rid))
    return desired


def kind_inputs(manifests: ManifestSet) -> dict[str, dict[str, tuple]]:
    """Kind name -> resource id -> the manifests that resource is rendered from."""
    return {kind.name: kind.inputs(manifests) for kind in ALL}


def input_keys(manifests: ManifestSet, inputs: dict[str, dict] | None = None) -> dict[str, str]:
    """Resource id -> a key naming the contents of every manifest it is rendered from; equal
    keys (with equal facts and code), equal resources. No key when an origin is unknown.
    `inputs` is what `kind_inputs(manifests)` gives, when the caller has it already.

    Every resource the manifests declare has a key, whether it targets this device or not:
    `render` decides that from the facts, and leaves out what does not, reused or not."""
    inputs = inputs if inputs is not None else kind_inputs(manifests)
    keys = {}
    sha256 = hashlib.sha256
    for kind in ALL:
        for rid, sources in inputs[kind.name].items():
            origins = [m.origin for m in sources]
            if all(origins):
                keys[rid] = sha256("\n".join([kind.name, *origins]).encode()).hexdigest()
    return keys


def for_device(manifests: ManifestSet, facts: Facts) -> ManifestSet:
    """The manifests this device renders: all but the Agents whose selector does not match its
    labels, and those Agents' Schedules and Triggers. Pure."""
    return manifests.without_agents(untargeted(manifests, facts))


def untargeted(manifests: ManifestSet, facts: Facts) -> list[str]:
    """The names of the Agents whose selector does not match this device's labels, sorted."""
    labels = facts.label_map
    return sorted(name for name, agent in manifests.of_kind("Agent").items()
                  if not selector.matches(agent.refs.selector, labels))


def render_one(manifests: ManifestSet, facts: Facts, kind, rid: str) -> Resource | None:
    """The one resource `rid` of `kind`, from manifests already targeted (`for_device`). Pure.

    What a plan asks for when a resource it knew only by digest differs from the device: that
    resource alone is rendered, however many the repository declares."""
    for resource in kind.render(manifests, facts, skip=_AllBut(rid)):
        if resource.id == rid:
            return resource
    return None


class _AllBut:
    """A kind's `skip` that skips every id but one."""

    def __init__(self, rid: str):
        self.rid = rid

    def __contains__(self, rid: str) -> bool:
        return rid != self.rid


class _Deferred:
    """A kind's reused resources, each rendered on its own the first time it is asked for."""

    def __init__(self, kind, manifests: ManifestSet, facts: Facts):
        self.kind, self.manifests, self.facts = kind, manifests, facts

    def get(self, rid: str) -> Resource | None:
        return render_one(self.manifests, self.facts, self.kind, rid)


def notices(manifests: ManifestSet, facts: Facts) -> list[str]:
    """What the manifests declare that spos validates but does not (fully) put on this device,
    and what validation could not check, said plainly so that a plan never implies more than
    apply will do. Pure."""
    said = list(manifests.notes)
    skipped = untargeted(manifests, facts)
    if skipped:
        named = ", ".join(skipped[:SHOWN_NAMES])
        if len(skipped) > SHOWN_NAMES:
            named += f" and {len(skipped) - SHOWN_NAMES} more"
        said.append(
            f"{len(skipped)} Agent(s) do not target this device (labels: "
            f"{selector.describe(facts.label_map)}): {named}. Their selectors do not match, so "
            "neither they nor their Schedules and Triggers are rendered here."
        )
    manifests = manifests.without_agents(skipped)
    timers = sorted(n for n, m in manifests.of_kind("Schedule").items() if m.refs.timer)
    if timers and not facts.activate_units:
        said.append(
            f"{len(timers)} timer Schedule(s) ({', '.join(timers)}) are written as systemd units "
            "but not activated: spos activates units only with --root / on a device whose init "
            "system is systemd (/run/systemd/system exists). Elsewhere nothing starts them."
        )
    return said
