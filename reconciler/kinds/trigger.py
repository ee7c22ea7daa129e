"""Trigger registrations: one file per Trigger, which the trigger daemon loads.

`/var/lib/systemprompt-os/triggers/<name>.json` holds the Trigger compiled for the daemon:
every default filled in, durations in seconds, sizes in bytes, the broker URL split into its
parts (docs/triggers.md has the format). The daemon reads nothing else and reloads a
registration when its file changes, so apply changing one trigger leaves the others' watches,
connections and listeners alone. Deleting a Trigger removes its file, and the daemon stops it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Collection, Iterable

from reconciler import TRIGGERS_DIR, units
from reconciler.errors import UnsafePathError
from reconciler.kinds.recall import recall
from reconciler.manifest import Manifest, ManifestSet, mqtt_broker
from reconciler.resource import Change, Facts, Resource

if TYPE_CHECKING:
    from reconciler.device import Device
    from reconciler.memo import PlanMemo

REGISTRATION_FORMAT = 1
TYPES = ("filesystem", "webhook", "serial", "condition", "mqtt", "continuous")

DEFAULT_EVENTS = ["create", "close_write"]
DEFAULT_MAX_BODY = "1Mi"
DEFAULT_MAX_LINE = 4096
DEFAULT_CONDITION_INTERVAL = "10s"
DEFAULT_MQTT_KEEPALIVE = "60s"


def registration_path(name: str) -> str:
    return f"{TRIGGERS_DIR}/{name}.json"


def _seconds(value: str | None, default: str | None = None) -> float | int | None:
    value = value if value is not None else default
    return units.seconds(value) if value is not None else None


def _filesystem(spec: dict) -> dict:
    return {
        "path": spec["path"].rstrip("/") or "/",
        "events": sorted(spec.get("events") or DEFAULT_EVENTS),
        "recursive": spec.get("recursive", False),
        "patterns": list(spec.get("patterns") or []),
        "ignore": list(spec.get("ignore") or []),
        "settleSeconds": _seconds(spec.get("settle"), "0s"),
    }


def _webhook(spec: dict) -> dict:
    return {
        "path": spec["path"],
        "secretFile": spec["secretFile"],
        "timestampToleranceSeconds": _seconds(spec.get("timestampTolerance")),
        "maxBodyBytes": units.size_bytes(spec.get("maxBodySize", DEFAULT_MAX_BODY)),
    }


def _serial(spec: dict) -> dict:
    return {
        "device": spec["device"],
        "baudrate": spec.get("baudrate", 9600),
        "mode": spec.get("mode", "line"),
        "pattern": spec.get("pattern"),
        "maxLineLength": spec.get("maxLineLength", DEFAULT_MAX_LINE),
    }


def _condition(spec: dict) -> dict:
    return {
        "metric": spec["metric"],
        "path": spec.get("path", "/") if spec["metric"] == "disk_usage" else None,
        "interface": spec.get("interface"),
        "above": spec.get("above"),
        "below": spec.get("below"),
        "equals": spec.get("equals"),
        "forSeconds": _seconds(spec.get("for"), "0s"),
        "cooldownSeconds": _seconds(spec.get("cooldown"), "0s"),
        "rearm": spec.get("rearm", "recover"),
        "intervalSeconds": _seconds(spec.get("interval"), DEFAULT_CONDITION_INTERVAL),
    }


def _mqtt(spec: dict) -> dict:
    host, port, tls = mqtt_broker(spec["broker"])
    return {
        "host": host,
        "port": port,
        "tls": tls,
        "topic": spec["topic"],
        "qos": spec.get("qos", 0),
        "clientId": spec.get("clientId"),
        "username": spec.get("username"),
        "passwordFile": spec.get("passwordFile"),
        "keepaliveSeconds": _seconds(spec.get("keepalive"), DEFAULT_MQTT_KEEPALIVE),
    }


def _continuous(spec: dict) -> dict:
    return {"intervalSeconds": _seconds(spec["interval"])}


_COMPILERS = {
    "filesystem": _filesystem, "webhook": _webhook, "serial": _serial,
    "condition": _condition, "mqtt": _mqtt, "continuous": _continuous,
}


def compile_trigger(name: str, spec: dict) -> dict:
    """The daemon's view of one Trigger: explicit and normalised. Pure."""
    kind = next(k for k in TYPES if k in spec)
    limit = spec.get("rateLimit")
    return {
        "format": REGISTRATION_FORMAT,
        "name": name,
        "agent": spec["agent"],
        "task": spec["task"],
        "type": kind,
        "enabled": spec.get("enabled", True),
        "policy": {
            "concurrency": spec.get("concurrency"),
            "debounceSeconds": _seconds(spec.get("debounce"), "0s"),
            "rateLimit": (
                {"count": limit["count"], "intervalSeconds": units.seconds(limit["interval"])}
                if limit else None
            ),
        },
        kind: _COMPILERS[kind](spec[kind]),
    }


class TriggerKind:
    name = "trigger"
    replace_on: tuple[str, ...] = ()

    def inputs(self, manifests: ManifestSet) -> dict[str, tuple[Manifest, ...]]:
        """Resource id -> every manifest its rendering reads (render.py relies on this). Pure."""
        return {f"trigger/{name}": (trigger,) for name, trigger in manifests.of_kind("Trigger").items()}

    def render(self, manifests: ManifestSet, facts: Facts,
               skip: Collection[str] = ()) -> Iterable[Resource]:
        """One registration per Trigger, but those whose id is in `skip`. Pure."""
        for name, trigger in manifests.of_kind("Trigger").items():
            if f"trigger/{name}" in skip:
                continue
            yield Resource(
                id=f"trigger/{name}",
                kind=self.name,
                attrs={"path": registration_path(name), "registration": compile_trigger(name, trigger.spec)},
                source=trigger.where,
            )

    def observe(self, device: "Device", ids: set[str], discover: bool = True,
                memo: "PlanMemo | None" = None) -> dict[str, Resource]:
        """Every registration file on the device. With a `memo`, one whose stat is unchanged
        since it was last read is known by its digest and read again only when needed."""
        names = {rid.split("/", 1)[1] for rid in ids}
        if discover:
            names.update(entry[:-5] for entry in device.listdir(TRIGGERS_DIR)
                         if entry.endswith(".json") and not entry.startswith("."))
        found = {}
        for name in sorted(names):
            resource = self._read(device, name) if memo is None else self._recall(device, name, memo)
            if resource is not None:
                found[resource.id] = resource
        return found

    def _recall(self, device: "Device", name: str, memo: "PlanMemo") -> Resource | None:
        return recall(memo, f"trigger:{name}", (device.stat(registration_path(name)),),
                      f"trigger/{name}", self.name, lambda: self._read(device, name))

    def _read(self, device: "Device", name: str) -> Resource | None:
        raw = device.read_text(registration_path(name))
        if raw is None:
            return None
        try:
            registration = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            registration = "unreadable: not valid JSON"
        return Resource(
            id=f"trigger/{name}",
            kind=self.name,
            attrs={"path": registration_path(name), "registration": registration},
        )

    def apply(self, device: "Device", changes: list[Change]) -> Iterable[tuple[Change, str | None]]:
        for change in changes:
            try:
                if change.action == "delete":
                    device.remove(change.before["path"])
                else:
                    self._write(device, change.after)
            except (OSError, UnsafePathError) as exc:
                yield change, str(exc)
            else:
                yield change, None

    @staticmethod
    def _write(device: "Device", attrs: dict) -> None:
        if not device.is_dir(TRIGGERS_DIR):
            device.makedirs(TRIGGERS_DIR, mode=0o755)
        payload = json.dumps(attrs["registration"], indent=2, sort_keys=True) + "\n"
        device.write_atomic(attrs["path"], payload.encode(), mode=0o644)


KIND = TriggerKind()
