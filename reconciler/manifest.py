"""The validated manifest set: what the operator declared, indexed by kind and name.

Data only. A `Manifest` remembers the file and line it came from so that later stages (policy
checks, plan views) can point back at the source, and its `Refs`: the names it refers to.
"""

from __future__ import annotations

import posixpath

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, NamedTuple

KINDS = ("Agent", "Schedule", "Trigger", "Quota", "Capability", "Policy")
RUN_BY_AGENT = ("Schedule", "Trigger")
"""The kinds that start an Agent's task, naming it as `spec.agent`: they go where it goes."""
API_VERSION = "spos/v1"


class Refs(NamedTuple):
    """What other manifests and the planner need to know of a manifest without reading its
    whole spec: the names it refers to and how it is started. Derived from the spec alone, so
    it is remembered with the parsed file; a manifest of a file nobody changed is then checked
    against the others, and placed in the plan's inputs, without its spec being decoded.
    A field the spec does not hold as expected is None (the schema check reports it)."""

    capability: str | None = None
    quota: str | None = None
    selector: Any = None
    tasks: tuple | None = None
    agent: str | None = None
    task: str | None = None
    cron: bool = False
    timer: bool = False
    webhook: str | None = None
    serial: str | None = None  # a serial Trigger's device
    mqtt_client: str | None = None  # an mqtt Trigger's broker and clientId, when it names one

    @classmethod
    def of(cls, kind: str, spec: Any) -> "Refs":
        if not isinstance(spec, dict):
            return cls()
        if kind == "Agent":
            tasks = spec.get("tasks")
            return cls(capability=_text(spec.get("capability")), quota=_text(spec.get("quota")),
                       selector=spec.get("selector"),
                       tasks=tuple(tasks) if isinstance(tasks, dict) else None)
        if kind in RUN_BY_AGENT:
            webhook, serial, mqtt = spec.get("webhook"), spec.get("serial"), spec.get("mqtt")
            return cls(agent=_text(spec.get("agent")), task=_text(spec.get("task")),
                       cron="cron" in spec, timer="timer" in spec,
                       webhook=_text(webhook.get("path")) if isinstance(webhook, dict) else None,
                       serial=_path(serial.get("device")) if isinstance(serial, dict) else None,
                       mqtt_client=_mqtt_client(mqtt) if isinstance(mqtt, dict) else None)
        return cls()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _path(value: Any) -> str | None:
    """A path written one way (`/dev//ttyUSB0` and `/dev/./ttyUSB0` are `/dev/ttyUSB0`)."""
    return posixpath.normpath(value) if isinstance(value, str) and value else None


def mqtt_broker(url: str) -> tuple[str | None, int, bool] | None:
    """(host, port, TLS?) of an `mqtt://` or `mqtts://` broker URL, the host in lower case and
    the port's default (1883, 8883 with TLS) filled in; None when it cannot be read."""
    from urllib.parse import urlsplit  # here: every plan imports this module, few have brokers

    try:
        broker = urlsplit(url)
        port = broker.port
    except ValueError:
        return None
    tls = broker.scheme == "mqtts"
    return broker.hostname, port or (8883 if tls else 1883), tls


def _mqtt_client(spec: dict) -> str | None:
    """`<broker> <clientId>` with the broker written one way (`mqtt://host:port`, as the daemon
    connects to it), or None without a clientId or a readable broker."""
    client, broker = _text(spec.get("clientId")), _text(spec.get("broker"))
    found = mqtt_broker(broker) if client and broker else None
    if found is None or found[0] is None:
        return None
    host, port, tls = found
    host = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if tls else 'mqtt'}://{host}:{port} {client}"


_UNREAD = object()


class Manifest:
    """One document of a kind: its name, spec and labels, and where it was written.

    Immutable. `spec` and `labels` may be read only when first asked for (`deferred`): a
    plan that changed one file of thousands decodes the others' specs only where it renders
    or checks them. `refs` is always at hand. `origin` is the document's content identity
    (file content hash and index): equal origins, equal documents; empty when unknown."""

    def __init__(self, kind: str, name: str, spec: dict, labels: dict, file: str, index: int,
                 line: int, origin: str = "", refs: Refs | None = None, body=None):
        # One dict update rather than an attribute at a time: a load of 10,000 files makes
        # 20,000 of these, and attribute assignment is refused (immutable).
        self.__dict__.update(
            kind=kind, name=name, file=file, index=index, line=line, origin=origin,
            refs=refs if refs is not None else Refs.of(kind, spec),
            _spec=spec, _labels=labels, _body=body)

    @classmethod
    def deferred(cls, kind: str, name: str, file: str, index: int, line: int, origin: str,
                 refs: Refs, body: Callable[[], tuple[dict, dict]]) -> "Manifest":
        """A manifest whose spec and labels come from `body()` when first read."""
        return cls(kind, name, _UNREAD, _UNREAD, file, index, line, origin, refs, body)

    @property
    def spec(self) -> dict:
        if self._spec is _UNREAD:
            self._read()
        return self._spec

    @property
    def labels(self) -> dict:
        if self._labels is _UNREAD:
            self._read()
        return self._labels

    def _read(self) -> None:
        spec, labels = self._body()
        self.__dict__.update(_spec=spec, _labels=labels, _body=None)

    def __setattr__(self, name, value):
        raise AttributeError(f"Manifest is immutable: cannot set {name}")

    def __delattr__(self, name):
        raise AttributeError(f"Manifest is immutable: cannot delete {name}")

    def _key(self) -> tuple:
        return (self.kind, self.name, self.spec, self.labels, self.file, self.index, self.line)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # like the spec it holds

    def __repr__(self) -> str:
        return (f"Manifest(kind={self.kind!r}, name={self.name!r}, spec={self.spec!r}, "
                f"labels={self.labels!r}, file={self.file!r}, index={self.index!r}, "
                f"line={self.line!r})")

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
                        or m.kind in RUN_BY_AGENT and m.refs.agent in names)]
        return ManifestSet(kept, revision=self.revision, digest=self.digest, notes=self.notes)

    def __len__(self) -> int:
        return len(self.manifests)


def dotted_path(parts: Iterable) -> str:
    """A field path as users write it: `spec.tasks.scan.steps[0].name`."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
