"""The data that flows from render to plan to apply: resources, changes, and the plan itself.

A `Resource` is one thing spos owns on the device (an agent's compiled config, a crontab
entry), described by JSON-able attributes. Two resources with the same attributes are the same:
equality is a digest of the canonical JSON. A `Change` says what apply must do to one resource;
the set of actions is closed (create, update, replace, delete) and each has the symbol the views
show. A reason explains a change to the reader; it never drives apply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from reconciler.errors import StalePlanError

PLAN_FORMAT = 1

SYMBOLS = {"create": "+", "update": "~", "replace": "-/+", "delete": "-"}
ACTIONS = tuple(SYMBOLS)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
"""json.dumps with options builds an encoder per call; a plan digests every resource."""


def digest(attrs: Any) -> str:
    canonical = _CANONICAL(attrs)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class Resource:
    """One resource: `id`, `kind`, `attrs` and the `source` manifest it was rendered from.

    `note` is what a reader of the plan should know about the resource as found (a cgroup's
    live processes); it is not an attribute, so it never makes a change.

    A resource may be known by its digest alone, with `load` giving the whole resource only if
    someone asks for `attrs` or `source`: a plan compares digests, and reads attributes only
    for what changed. With both, `digest` must be the digest of what `load` returns.
    """

    __slots__ = ("id", "kind", "note", "_attrs", "_source", "_digest", "_load")

    def __init__(self, id: str, kind: str, attrs: dict | None = None, source: str = "", *,
                 digest: str | None = None, load: Callable[[], "Resource"] | None = None,
                 note: str = ""):
        if attrs is None and (digest is None or load is None):
            raise ValueError("a resource needs its attrs, or a digest and a way to load them")
        self.id, self.kind, self.note = id, kind, note
        self._attrs, self._source, self._digest, self._load = attrs, source, digest, load

    def _loaded(self) -> None:
        whole = self._load()
        if whole is None:
            raise StalePlanError(
                f"{self.id} changed on the device while spos was planning; plan again"
            )
        self._attrs, self._source, self._load = whole.attrs, whole.source, None

    @property
    def attrs(self) -> dict:
        if self._attrs is None:
            self._loaded()
        return self._attrs

    @property
    def source(self) -> str:
        if self._load is not None:
            self._loaded()
        return self._source

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = digest(self._attrs)
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resource):
            return NotImplemented
        return (self.id, self.kind, self.attrs, self.source) == (
            other.id, other.kind, other.attrs, other.source)

    __hash__ = None

    def __repr__(self) -> str:
        return f"Resource(id={self.id!r}, kind={self.kind!r}, digest={self.digest!r})"


@dataclass(frozen=True)
class Change:
    id: str
    kind: str
    action: str
    reason: str
    before: dict | None
    after: dict | None
    fields: list[dict] = field(default_factory=list)
    source: str = ""

    @property
    def symbol(self) -> str:
        return SYMBOLS[self.action]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "action": self.action,
            "symbol": self.symbol,
            "reason": self.reason,
            "source": self.source,
            "fields": self.fields,
            "before": self.before,
            "after": self.after,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Change":
        return cls(
            id=data["id"],
            kind=data["kind"],
            action=data["action"],
            reason=data["reason"],
            before=data["before"],
            after=data["after"],
            fields=data.get("fields", []),
            source=data.get("source", ""),
        )


@dataclass
class Plan:
    """What apply will do, and what it was computed from.

    `observed` holds the digest of every resource as it was seen on the device (None: absent)
    and `inventory` the digest of the inventory; a saved plan whose device no longer matches
    them is stale. `desired` holds the digest of every desired resource, changed or not: it is
    what the inventory records once the plan is applied.
    """

    root: str
    changes: list[Change]
    desired: dict[str, dict]
    observed: dict[str, str | None]
    inventory: str
    manifests: dict
    notices: list[str] = field(default_factory=list)
    version: str = ""
    estimates: list[dict] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def summary(self) -> dict[str, int]:
        counts = {action: 0 for action in ACTIONS}
        for change in self.changes:
            counts[change.action] += 1
        changed = {change.id for change in self.changes}
        counts["unchanged"] = sum(1 for rid in self.desired if rid not in changed)
        return counts

    def to_json(self) -> dict:
        return {
            "formatVersion": PLAN_FORMAT,
            "spos": self.version,
            "root": self.root,
            "manifests": self.manifests,
            "summary": self.summary(),
            "changes": [change.to_json() for change in self.changes],
            "notices": self.notices,
            "estimates": self.estimates,
            "desired": self.desired,
            "observed": self.observed,
            "inventory": self.inventory,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("formatVersion") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {data.get('formatVersion')!r}")
        return cls(
            root=data["root"],
            changes=[Change.from_json(c) for c in data["changes"]],
            desired=data["desired"],
            observed=data["observed"],
            inventory=data["inventory"],
            manifests=data["manifests"],
            notices=data.get("notices", []),
            version=data.get("spos", ""),
            estimates=data.get("estimates", []),
        )


@dataclass(frozen=True)
class Facts:
    """What rendering needs to know about the device, gathered by the caller.

    `spos_command` is the argv that cron and systemd run to reach spos (cron's PATH is minimal,
    so it is absolute); `root` is passed on as `--root` when it is not `/`. The cgroup facts
    say which layout agents' cgroups are rendered for (cgroupfs.py). `activate_units` says
    whether apply activates the systemd units it writes (systemd is the init system and the
    root is `/`: reconciler/systemctl.py), so whether timers are planned as enabled.
    `labels` are the device's labels (reconciler/labels.py), which Agents' selectors match:
    given as a mapping or pairs, kept as sorted pairs so that equal labels give equal facts
    (and the same `repr`, which keys the plan memo).
    """

    spos_command: tuple[str, ...]
    root: str = "/"
    cgroup_version: int | None = None  # of --cgroup-root: 1, 2, or None (no cgroups managed)
    cgroup_parent: str = "spos"  # the cgroup spos owns for this device (cgroupfs.parent_for)
    cgroup_weight_file: str | None = None  # where an I/O weight is set, if anywhere
    activate_units: bool = False
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(sorted(dict(self.labels).items())))

    @property
    def label_map(self) -> dict[str, str]:
        """The device's labels, label key -> value."""
        return dict(self.labels)

    def spos_argv(self, *words: str) -> list[str]:
        """The command line that runs `spos WORDS...` on this device, `--root` included."""
        root = ["--root", self.root] if self.root != "/" else []
        return [*self.spos_command, *root, *words]
