"""What a plan remembers between runs, so that a plan with nothing to do costs little however
large the repository: `<state>/cache/plan.marshal`.

Two things are remembered:

- **Values derived from files, keyed by the files' stat.** The content hash of each manifest
  file, the digest of each agent's observed config, the entries of each crontab file. A value
  is used again only while every file it came from has the same inode, size, modification time
  and change time (the change time cannot be set back by hand: any write, rename or chmod moves
  it). A value is remembered only when those times are at least `SETTLE_SECONDS` old when the
  file is read: a file written again within the same clock tick would keep its times, so a
  fresh file is always read again (git's "racily clean" rule).
- **The desired state of one set of manifest contents.** The kind and digest of every resource
  the manifests render to, the plan's notices and how many manifests were declared, keyed by
  the digest of every manifest and policy file's content. When that digest is the same, the
  manifests need not be parsed, checked or rendered: they would give the same result. Any
  resource that turns out to differ from the device is then rendered in full.
- **What each resource was rendered from.** With each digest, a key naming the contents of the
  manifests that resource is rendered from (render.input_keys). When some manifests changed,
  all are loaded and checked again (from the cache of parsed documents), but only resources
  whose key changed are rendered: an edit to one agent renders that agent.

Everything is keyed by spos's version, its code and schemas, the facts rendering uses (the
device's labels among them) and the directories planned, so an upgrade, a different `--root`
or a change of labels starts afresh. The memo is only ever
a shortcut: deleting it, or any damage to it, makes the next plan slower and never different.
It sits beside the inventory and is trusted as much: both are spos's own, root-owned state.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import stat
import time
from contextlib import suppress

from reconciler.source import (
    MAX_FILE_BYTES, content_digest, discover, display_name, read_bounded, schemas_path,
)

SETTLE_SECONDS = 2
_FORMAT = 3


def signature(stats: tuple) -> list | None:
    """The identity of the files a value was derived from, as stored: None for a file that is
    absent, else inode, size, mtime and ctime in nanoseconds."""
    return [None if st is None else [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            for st in stats]


class PlanMemo:
    """The memo of one device and one set of planning inputs. `path` None: remember nothing."""

    def __init__(self, path: str | None, key: str):
        self.path, self.key = path, key
        self.values: dict[str, list] = {}
        self.seen: set[str] = set()
        self.desired: dict | None = None
        self.dirty = False
        self._now_ns = time.time_ns()
        if path is None:
            return
        try:
            with open(path, "rb") as handle:
                stored = marshal.loads(handle.read())
        except (OSError, ValueError, EOFError, TypeError):
            return
        if isinstance(stored, dict) and stored.get("format") == _FORMAT and stored.get("key") == key:
            self.values = _well_formed_values(stored.get("values"))
            self.desired = _well_formed_desired(stored.get("desired"))

    def lookup(self, name: str, stats: tuple):
        """The value remembered for `name` if the files it came from are unchanged, else None."""
        self.seen.add(name)
        entry = self.values.get(name)
        if entry is not None and entry[0] == signature(stats):
            return entry[1]
        return None

    def remember(self, name: str, stats: tuple, value) -> None:
        """Keep `value`, derived from files whose stat (taken before reading them) is `stats`,
        unless one of them changed too recently to be told apart from a later write."""
        self.seen.add(name)
        settled = self._now_ns - SETTLE_SECONDS * 1_000_000_000
        if any(st is not None and max(st.st_mtime_ns, st.st_ctime_ns) >= settled for st in stats):
            self.dirty |= self.values.pop(name, None) is not None
            return
        self.values[name] = [signature(stats), value]
        self.dirty = True

    def desired_for(self, manifest_digest: str) -> dict | None:
        """{resources: {id: [kind, digest, input key]}, notices, declared} as rendered from
        manifests with this digest, if that is what was rendered last."""
        if self.desired is not None and self.desired.get("manifestDigest") == manifest_digest:
            return self.desired
        return None

    def rendered(self) -> dict[str, list]:
        """{id: [kind, digest, input key]} as last rendered, whatever the manifests were."""
        resources = (self.desired or {}).get("resources")
        return resources if isinstance(resources, dict) else {}

    def remember_desired(self, manifest_digest: str, resources: dict, keys: dict[str, str],
                         notices: list[str], declared: int) -> None:
        self.desired = {
            "manifestDigest": manifest_digest,
            "resources": {rid: [r.kind, r.digest, keys.get(rid)] for rid, r in resources.items()},
            "notices": notices,
            "declared": declared,
        }
        self.dirty = True

    def save(self) -> None:
        """Write the memo atomically when something new was learnt. Best effort: a memo that
        cannot be written only costs the next plan time."""
        if self.path is None or not self.dirty:
            return
        values = self.values if self.values.keys() <= self.seen else {
            name: entry for name, entry in self.values.items() if name in self.seen}
        payload = {"format": _FORMAT, "key": self.key, "values": values, "desired": self.desired}
        temp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            with open(temp, "wb") as handle:
                handle.write(marshal.dumps(payload))  # five times faster to write than JSON
            os.replace(temp, self.path)
            forerunner = os.path.join(os.path.dirname(self.path), "plan.json")  # the JSON memo
            if forerunner != self.path:
                with suppress(OSError):
                    os.unlink(forerunner)
        except OSError:
            with suppress(OSError):
                os.unlink(temp)


def _well_formed_values(values) -> dict[str, list]:
    if not isinstance(values, dict):
        return {}
    return {name: entry for name, entry in values.items()
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)}


def _well_formed_desired(desired) -> dict | None:
    """The remembered desired state, or None when any part of it is not as written."""
    if not isinstance(desired, dict) or not isinstance(desired.get("resources"), dict):
        return None
    if not isinstance(desired.get("notices"), list) or not isinstance(desired.get("declared"), int):
        return None
    for entry in desired["resources"].values():
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and (entry[2] is None or isinstance(entry[2], str))):
            return None
    return desired


def fingerprint(manifest_dir: str, policy_dir: str | None, memo: PlanMemo
                ) -> tuple[str | None, dict[str, tuple[str, str]], dict[str, list[str]]]:
    """The digest `validate.load` gives these directories, reading only the files whose content
    hash `memo` does not know, and {path: (display name, content hash)} of the files, for
    `load`, and the files found in each directory (for `load` not to walk them again). Digest
    None when a file cannot be read the way `load` reads it: `load` then says why. Files are
    hashed, never parsed: the digest names their contents."""
    cwd = os.path.realpath(os.getcwd())
    hashes, known, listed = {}, {}, {}
    for directory in (manifest_dir, policy_dir):
        if directory is None:
            continue
        if not os.path.isdir(directory):
            return None, known, {}
        # os.walk does not enter linked directories, so below the resolved top only a file
        # itself can be a link.
        top, real_top = os.path.normpath(directory), os.path.realpath(directory)
        unlisted: list[tuple[str, str, str]] = []
        listed[directory] = paths = discover(directory, unlisted)
        if unlisted:
            return None, known, {}
        for path in paths:
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    real, st = os.path.realpath(path), os.stat(path)
                else:
                    real = real_top + path[len(top):]
            except OSError:
                return None, known, {}
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                return None, known, {}
            name = f"manifest:{real}"
            digest = memo.lookup(name, (st,))
            if digest is None:
                raw, unreadable = read_bounded(path)
                if unreadable:
                    return None, known, {}
                digest = hashlib.sha256(raw).hexdigest()
                memo.remember(name, (st,), digest)
            display = display_name(path, cwd, real)
            hashes[display] = digest
            known[path] = (display, digest)
    return content_digest(hashes), known, listed


def code_fingerprint() -> str:
    """Changes whenever spos's code or schemas do, installed or edited in a checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for directory in (package, os.path.join(package, "kinds"), schemas_path()):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith((".py", ".json")):
                st = os.stat(os.path.join(directory, name))
                digest.update(f"{directory}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
