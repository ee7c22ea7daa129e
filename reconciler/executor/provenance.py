"""What an attempt ran under: the agent config it loaded and what was applied on the device.

`spos why` answers "which config, which revision" for a run long after the agent's config
changed, so the executor records it as each attempt starts (docs/queue.md, "What an attempt
ran under"):

- `configDigest`: `sha256:` of the exact `agent.json` bytes the executor loaded for the
  attempt. A copy of those bytes is kept once per distinct digest in
  `agents/<agent>/configs/sha256-<hex>.json`, so the capabilities and limits in force can be
  shown after the config changed; retention removes a copy once no run record names it
  (never the current config's).
- `revision` and `manifestDigest`: what the last `spos apply` or `spos sync` recorded in
  spos's inventory (`inventory.json`): the git revision of the manifests (null when they were
  applied from a directory that is not a git checkout) and the digest of the manifest set.
  Both are null on a device where spos never applied anything (agent configs put there by
  hand).

Starting a run must stay cheap: the digest is of bytes the executor has already read, a copy is
written only when missing (one lstat otherwise), and the inventory, which holds one line per
resource and so grows with the fleet, is read again only when its file changed, and then only
its first lines, where `reconciler.state` writes the revision and manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.state import INVENTORY, read_json_object

FIELDS = ("configDigest", "revision", "manifestDigest")
"""The fields an attempt's provenance adds to its run record and to its entry in `attempts`."""

NOTHING_APPLIED = {"revision": None, "manifestDigest": None}

CONFIGS_DIR = "configs"
"""Inside an agent's directory: the copies of the configs its runs ran under."""

_HEAD_BYTES = 64 * 1024
_RESOURCES_LINE = b'\n  "resources":'


def digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def copy_name(config_digest: str) -> str:
    """`sha256:<hex>` -> `sha256-<hex>.json`, the copy's file name in `configs/`."""
    return config_digest.replace(":", "-", 1) + ".json"


def copy_path(agent: str, config_digest: str) -> str:
    return f"{AGENTS_DIR}/{agent}/{CONFIGS_DIR}/{copy_name(config_digest)}"


def of_attempt(record: dict) -> dict:
    """The provenance of the attempt a run record is at, for its entry in `attempts`."""
    return {key: record[key] for key in FIELDS if key in record}


class Provenance:
    """Records what attempts run under, for one executor: the inventory's head is kept until
    the file changes (a new inode, size or modification time)."""

    def __init__(self, device: Device):
        self.device = device
        self._inventory_key: tuple | None = None
        self._applied = dict(NOTHING_APPLIED)

    def start(self, agent: str, raw: bytes) -> dict:
        """The provenance fields of an attempt of `agent` that loaded the config `raw`; keeps
        a copy of that config when there is none yet. Never fails a run: a copy that cannot be
        written is missing, which `spos why` says."""
        config_digest = digest(raw)
        self._keep_copy(agent, config_digest, raw)
        return {"configDigest": config_digest, **self.applied()}

    def applied(self) -> dict:
        """`revision` and `manifestDigest` of what is applied on the device now."""
        try:
            status = os.stat(self.device.host(INVENTORY))
            key = (status.st_ino, status.st_size, status.st_mtime_ns)
        except (OSError, SposError):
            key = None
        if key != self._inventory_key:
            self._applied = read_applied(self.device) if key else dict(NOTHING_APPLIED)
            self._inventory_key = key
        return dict(self._applied)

    def _keep_copy(self, agent: str, config_digest: str, raw: bytes) -> None:
        path = copy_path(agent, config_digest)
        try:
            if self.device.stat(path) is None:
                self.device.makedirs(path.rsplit("/", 1)[0], mode=0o750)
                self.device.write_atomic(path, raw, mode=0o644)
        except (OSError, SposError):
            return


def read_applied(device: Device) -> dict:
    """The revision and manifest digest at the head of the inventory, read from its first
    lines; the whole file is parsed only when it is not laid out as `reconciler.state`
    writes it."""
    try:
        data = _parsed_head(_head(device))
    except (OSError, SposError):
        return dict(NOTHING_APPLIED)
    if data is None:
        data = read_json_object(device, INVENTORY) or {}
    return {key: data.get(key) if isinstance(data.get(key), str) else None
            for key in ("revision", "manifestDigest")}


def _head(device: Device) -> bytes:
    fd = os.open(device.host(INVENTORY), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(fd, _HEAD_BYTES)
    finally:
        os.close(fd)


def _parsed_head(head: bytes) -> dict | None:
    """`{"format": 1, "revision": ..., ..., ` up to the resources, as an object; None when the
    resources line is not where `reconciler.state` puts it."""
    before, found, _ = head.partition(_RESOURCES_LINE)
    if not found:
        return None
    try:
        data = json.loads(before.rstrip().rstrip(b",") + b"}")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
