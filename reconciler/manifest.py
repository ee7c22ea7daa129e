"""The validated manifest set: what the operator declared, indexed by kind and name.

Data only. A `Manifest` remembers the file and line it came from so that later stages (policy
checks, plan views) can point back at the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable

KINDS = ("Agent", "Schedule", "Trigger", "Quota", "Capability", "Policy")
RUN_BY_AGENT = ("Schedule", "Trigger")
"""The kinds that start an Agent's task, naming it as `spec.agent`: they go where it goes."""
API_VERSION = "spos/v1"


@dataclass(frozen=True)
class Manifest:
    kind: str
    name: str
    spec: dict
    labels: dict
    file: str
    index: int
    line: int
    origin: str = field(default="", compare=False)
    """The document's content identity (file content hash and index): equal origins, equal
    documents. Empty when unknown."""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @classmethod
    def from_document(cls, data: dict[str, Any], file: str, index: int, line: int,
                      origin: str = "") -> "Manifest":
        metadata = data.get("metadata") or {}
        return cls(
            kind=data["kind"],
            name=metadata["name"],
            spec=data.get("spec") or {},
            labels=metadata.get("labels") or {},
            file=file,
            index=index,
            line=line,
            origin=origin,
        )


@dataclass
class ManifestSet:
    """Every manifest of one revision, plus where it came from."""

    manifests: list[Manifest] = field(default_factory=list)
    revision: str | None = None
    digest: str = ""
    notes: list[str] = field(default_factory=list)
    """What validation could not check here (said, not an error)."""

    def of_kind(self, kind: str) -> dict[str, Manifest]:
        """Name -> manifest of one kind. Indexed once: render asks for each kind many times."""
        index = self.__dict__.get("_by_kind")
        if index is None or index[0] != len(self.manifests):
            by_kind: dict[str, dict[str, Manifest]] = {}
            for m in self.manifests:
                by_kind.setdefault(m.kind, {})[m.name] = m
            index = self.__dict__["_by_kind"] = (len(self.manifests), by_kind)
        return dict(index[1].get(kind, {}))

    def without_agents(self, names: Collection[str]) -> "ManifestSet":
        """The same revision without the Agents named or the Schedules and Triggers that start
        their tasks: what a device that does not run those agents renders."""
        if not names:
            return self
        names = set(names)
        kept = [m for m in self.manifests
                if not (m.kind == "Agent" and m.name in names
                        or m.kind in RUN_BY_AGENT and m.spec.get("agent") in names)]
        return ManifestSet(kept, revision=self.revision, digest=self.digest, notes=self.notes)

    def __len__(self) -> int:
        return len(self.manifests)


def dotted_path(parts: Iterable) -> str:
    """A field path as users write it: `spec.tasks.scan.steps[0].name`."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
