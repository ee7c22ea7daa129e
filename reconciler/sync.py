"""`spos sync`: pull the manifests repository, verify it, and converge the device to it.

One sync, in order, holding the apply lock throughout:

1. fetch the branch into the local mirror (gitsync.Mirror); only a fast-forward of the applied
   revision is taken unless force-pushes are allowed;
2. a revision quarantined before is not tried again (a new commit lifts the quarantine);
3. with a keyring, the commit must carry a good signature by one of its keys;
4. check the revision's files out into `sync/checkout`, updated in place from the revision
   there before (only what the commit changed is written);
5. validate (schemas, cross-references, the repository's own policies), plan and apply, as
   `spos apply` does.

A revision refused at any step (force-push, signature, validation, policy, apply) is
quarantined: recorded with the reasons in `sync/state.json` so it is not retried in a loop, and
the last applied revision stays in force. When apply fails part-way, the previous revision is
applied again, so the device is back where it was. A failure that says nothing about the
revision (the remote unreachable, the disk full) is reported and tried again at the next sync.

The state directory keeps `mirror.git` (a cache), `checkout` (the revision's files, at a stable
path and updated in place, so the plan memo and the manifest cache carry over from one revision
to the next), `checkout.revision` (what it holds, trusted only within the boot that wrote it:
the files are not fsynced), and `state.json`, written atomically after every sync
(docs/sync.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from reconciler import STATE_DIR
from reconciler.device import Device
from reconciler.errors import ManifestError, SposError, UsageError

SYNC_DIR = f"/{STATE_DIR}/sync"
STATE_FILE = f"{SYNC_DIR}/state.json"
STATE_FORMAT = 1
MAX_REASONS = 20
"""Reasons kept per quarantined revision (the first ones; the count says how many there were)."""
MAX_QUARANTINED = 50
"""Quarantined revisions remembered, newest kept."""


@dataclass
class SyncOptions:
    """What to sync from. `path` and `policies` are directories inside the repository;
    `keyring` a file of trusted public keys (None: signatures are not checked)."""

    repo: str
    branch: str = "main"
    path: str = "agents.d"
    policies: str = "policies"
    keyring: str | None = None
    allow_force: bool = False
    device_labels: str | None = None
    cgroup_root: str | None = None
    lock_timeout: float = 60.0


@dataclass
class SyncResult:
    """What one sync did. `outcome` is one of: applied (changes made), unchanged (the device
    already matched), quarantined (the revision was refused now), skipped (it was refused
    before), refused (the branch was force-pushed; not quarantined, so --allow-force-push
    takes it), failed (something other than the revision failed; tried again next time).
    `notes` are what the sync left out of the revision without refusing it (links,
    submodules)."""

    outcome: str
    revision: str | None = None
    message: str = ""
    reasons: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("applied", "unchanged")

    def to_json(self) -> dict:
        return {"outcome": self.outcome, "revision": self.revision, "message": self.message,
                "reasons": self.reasons, "changed": self.changed, "failed": self.failed,
                "notes": self.notes}


class SyncState:
    """`sync/state.json`: the applied revision, the quarantined ones, the last sync's result,
    and the last drift check (docs/sync.md)."""

    def __init__(self, device: Device, data: dict | None = None):
        self.device = device
        data = data or {}

        def entry(key: str) -> dict | None:  # a field of the wrong shape (a hand edit) is dropped
            value = data.get(key)
            return value if isinstance(value, dict) else None

        applied = entry("applied")
        self.applied: dict | None = applied if isinstance((applied or {}).get("revision"), str) else None
        self.quarantined: dict[str, dict] = {
            sha: held for sha, held in (entry("quarantined") or {}).items()
            if isinstance(held, dict) and isinstance(held.get("at"), str)
            and isinstance(held.get("reasons"), list) and isinstance(held.get("stage"), str)}
        self.last: dict | None = _shaped(entry("last"))
        self.last_failure: dict | None = _shaped(entry("lastFailure"))
        self.drift: dict | None = entry("drift")
        self.repo: dict | None = entry("repo")

    @classmethod
    def load(cls, device: Device) -> "SyncState":
        """Unreadable: start afresh; the mirror and the checkout are still there."""
        from reconciler.state import read_json_object

        return cls(device, read_json_object(device, STATE_FILE))

    @property
    def applied_revision(self) -> str | None:
        return (self.applied or {}).get("revision")

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "repo": self.repo, "applied": self.applied,
                "quarantined": self.quarantined, "last": self.last,
                "lastFailure": self.last_failure, "drift": self.drift}

    def save(self) -> None:
        self.device.makedirs(SYNC_DIR, mode=0o755)
        payload = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        self.device.write_atomic(STATE_FILE, payload.encode(), mode=0o644)

    def quarantine(self, revision: str, stage: str, reasons: list[str], judged_with: str = "") -> None:
        self.quarantined[revision] = {
            "stage": stage, "at": now_iso(), "reasons": reasons[:MAX_REASONS], "count": len(reasons),
            "settings": judged_with,
        }
        while len(self.quarantined) > MAX_QUARANTINED:
            oldest = min(self.quarantined, key=lambda sha: self.quarantined[sha]["at"])
            del self.quarantined[oldest]

    def record(self, result: SyncResult) -> None:
        self.last = {"at": now_iso(), **result.to_json()}
        if not result.ok:
            self.last_failure = self.last


def _shaped(result: dict | None) -> dict | None:
    """A recorded sync result, when it has the fields every reader uses."""
    if result and isinstance(result.get("at"), str) and isinstance(result.get("outcome"), str) \
            and isinstance(result.get("message"), str) and isinstance(result.get("reasons", []), list):
        return result
    return None


def sync(root: str, options: SyncOptions, *,
         progress: Callable[..., None] = lambda text, total=None: None,
         detail: Callable[..., None] = lambda text, total=None: None,
         advance: Callable[[], None] = lambda: None,
         report: Callable = lambda change, error: None) -> SyncResult:
    """One sync of the device at `root` (see the module docstring). Never raises for what a
    revision contains; raises SposError only for what stops any sync (the lock held too long,
    the state directory unwritable). `progress(text, total=None)` is told each step, `detail`
    and `advance()` the steps of validation and each file checked (for a live display),
    `report(change, error)` each change applied."""
    from reconciler.gitsync import Mirror
    from reconciler.state import ApplyLock

    device = Device(root)
    device.ensure_root()
    with ApplyLock(device, timeout=options.lock_timeout):
        state = SyncState.load(device)
        state.repo = {"url": _redacted(options.repo), "branch": options.branch, "path": options.path}
        try:
            mirror = Mirror(device.host(SYNC_DIR), options.repo)
            result = _sync(device, state, mirror, options, (progress, detail, advance), report)
        except SposError as exc:
            result = SyncResult("failed", message=str(exc))
        except OSError as exc:  # a full disk, a state directory gone: tried again next time
            result = SyncResult("failed", message=f"{exc.strerror or exc}: "
                                                  f"{exc.filename or 'the state directory'}")
        state.record(result)
        state.save()
    return result


def _sync(device, state, mirror, options, feedback, report) -> SyncResult:
    progress = feedback[0]
    from reconciler.gitsync import (
        FetchError, ForcePushError, GitError, SignatureError, UnsafeTreeError,
    )

    progress(f"Fetching {options.branch} from {_redacted(options.repo)}...")
    try:
        fetched = mirror.fetch(options.branch, applied=state.applied_revision,
                               allow_force=options.allow_force)
    except ForcePushError as exc:  # found before any work: refused each time, not quarantined
        return SyncResult("refused", exc.sha, "the branch was force-pushed; revision "
                          f"{(state.applied_revision or 'none')[:12]} stays in force", [str(exc)])
    except (FetchError, GitError) as exc:
        return SyncResult("failed", message=f"could not fetch: {exc}")
    sha = fetched.sha
    held = state.quarantined.get(sha)
    if held is not None and held.get("settings") == settings(options):
        return SyncResult("skipped", sha, f"revision {sha[:12]} was quarantined at {held['at']} "
                          f"({held['stage']}); waiting for a new commit", list(held["reasons"]))
    state.quarantined.pop(sha, None)  # judged with other settings (keyring, labels, paths): again
    if options.keyring:
        progress(f"Verifying the signature of {sha[:12]}...")
        try:
            mirror.verify(sha, options.keyring)
        except SignatureError as exc:
            if not exc.status:  # the check could not run (no gpg, no keyring): not the commit's
                return SyncResult("failed", sha, "the signature could not be checked", [str(exc)])
            return _refuse(state, sha, "verify", [str(exc)], options=options)
    try:
        checkout, skipped = _checkout(device, mirror, sha, progress)
    except UnsafeTreeError as exc:  # the revision itself: names or sizes no export may write
        return _refuse(state, sha, "export", [str(exc)], options=options)
    except GitError as exc:  # git stopped or failed: nothing against the revision; next sync again
        return SyncResult("failed", sha, f"could not check out {sha[:12]}: {exc}")
    result = _converge(device, state, sha, checkout, options, feedback, report, mirror)
    result.notes = [f"{item.path}: {item.reason}" for item in skipped]
    return result


def _checkout(device: Device, mirror, sha: str, progress) -> tuple[str, tuple]:
    """The revision's files at `sync/checkout` (host path), and the entries left out (links,
    submodules). The checkout is updated in place from the revision checked out before, so
    files a commit did not change keep their inode and times, and the plan memo still knows
    them. While it is being changed there is no `checkout.revision`: after a crash the next
    sync exports afresh."""
    base = device.host(SYNC_DIR)
    checkout, marker = os.path.join(base, "checkout"), os.path.join(base, "checkout.revision")
    current = _read_marker(marker)
    if current == sha and os.path.isdir(checkout):
        return checkout, ()
    progress(f"Checking out {sha[:12]}...")
    exported = _move_checkout(mirror, checkout, marker, current, sha)
    return checkout, exported.skipped


def _move_checkout(mirror, checkout: str, marker: str, current: str | None, sha: str):
    """Make `checkout` hold revision `sha`: updated from `current` when it holds that, else
    exported afresh. When an update fails part-way, the checkout is exported again as
    `current` (when that fails too, it is left without a marker, and exported afresh next
    time)."""
    from reconciler.gitsync import UnsafeTreeError

    if current is not None and os.path.isdir(checkout):
        os.unlink(marker)
        try:
            exported = mirror.update(sha, checkout, current)
        except UnsafeTreeError:
            _write_marker(marker, current)  # the tree is checked before anything is changed
            raise
        except (SposError, OSError):
            _export_afresh(mirror, checkout, marker, current, quiet=True)
            raise
    else:
        exported = _export_afresh(mirror, checkout, marker, sha)
    _write_marker(marker, sha)
    return exported


def _export_afresh(mirror, checkout: str, marker: str, sha: str, quiet: bool = False):
    if os.path.exists(marker):
        os.unlink(marker)
    shutil.rmtree(checkout, ignore_errors=True)
    try:
        exported = mirror.export(sha, checkout)
    except (SposError, OSError):
        if quiet:
            return None
        raise
    if quiet:
        _write_marker(marker, sha)
    return exported


def _read_marker(marker: str) -> str | None:
    """The revision the checkout holds, when it was written since the machine booted: the
    files of a checkout are not fsynced, so after a power loss it is exported afresh."""
    from reconciler.executor.owner import boot_id

    text = _read(marker) or ""
    sha, _, booted = text.partition(" ")
    return sha if sha and booted == boot_id() else None


def _write_marker(marker: str, sha: str) -> None:
    from reconciler.executor.owner import boot_id

    _write(marker, f"{sha} {boot_id()}")


def _converge(device, state, sha, checkout, options, feedback, report, mirror) -> SyncResult:
    """Validate, plan and apply the checked-out revision; quarantine it when it is refused."""
    from reconciler.apply import apply_locked
    from reconciler.labels import LabelsError
    from reconciler.pipeline import make_plan

    progress, detail, advance = feedback
    request = _request(device, checkout, sha, options, progress, detail, advance)
    try:
        _, planned = make_plan(request)
    except ManifestError as exc:
        reasons = [_diagnostic(d, checkout) for d in exc.diagnostics]
        if not all(_in_revision(d, checkout) for d in exc.diagnostics):
            # the device's own files (its labels) are wrong, not the revision
            return SyncResult("failed", sha, "the device's configuration is invalid", reasons)
        return _refuse(state, sha, "validate", reasons, device, options, mirror)
    except LabelsError as exc:  # the device's labels (its host name, --device-labels)
        return SyncResult("failed", sha, "the device's labels cannot be used", [str(exc)])
    except UsageError as exc:
        return _refuse(state, sha, "validate", [str(exc).replace(checkout + "/", "")], device,
                       options, mirror)
    if not planned.has_changes:
        state.applied = _applied(sha, state, 0)
        return SyncResult("unchanged", sha, f"the device matches revision {sha[:12]}")
    progress(f"Applying {sha[:12]}...", len(planned.changes))
    result = apply_locked(device, planned, progress=report)
    changed = [change.id for change in result.applied]
    if result.failed:
        failed = [{"id": change.id, "error": error} for change, error in result.failed]
        refused = _refuse(state, sha, "apply", [f"{f['id']}: {f['error']}" for f in failed],
                          device, options, mirror)
        refused.changed, refused.failed = changed, failed
        return refused
    state.applied = _applied(sha, state, len(changed))
    return SyncResult("applied", sha, f"applied revision {sha[:12]}: {len(changed)} changed",
                      changed=changed)


def _refuse(state, sha, stage, reasons, device=None, options=None, mirror=None) -> SyncResult:
    """Quarantine `sha`; put the last applied revision back in force when the refused one was
    already checked out. The revision the device already runs is never quarantined: what
    stops it now is the device's, and the next sync tries again."""
    if sha == state.applied_revision:
        return SyncResult("failed", sha, f"revision {sha[:12]}, which the device runs, could not "
                          f"be converged ({stage}); tried again at the next sync", reasons)
    state.quarantine(sha, stage, reasons, settings(options) if options else "")
    message = f"revision {sha[:12]} quarantined ({stage}); revision " \
              f"{(state.applied_revision or 'none')[:12]} stays in force"
    if device is not None:
        restored = _restore(device, state, options, mirror)
        if restored:
            message += f"; {restored}"
    return SyncResult("quarantined", sha, message, reasons)


def _restore(device: Device, state: SyncState, options: SyncOptions, mirror) -> str:
    """Check the applied revision out again in place of the refused one, and re-apply it when
    the refused revision changed anything. Returns what was done, in words; never raises (a
    refused revision stays quarantined whatever happens here)."""
    from reconciler.apply import apply_locked
    from reconciler.pipeline import make_plan

    base = device.host(SYNC_DIR)
    checkout, marker = os.path.join(base, "checkout"), os.path.join(base, "checkout.revision")
    applied = state.applied_revision
    if applied is None or mirror is None:
        return ""
    try:
        _move_checkout(mirror, checkout, marker, _read_marker(marker), applied)
        _, planned = make_plan(_request(device, checkout, applied, options))
        if not planned.has_changes:
            return ""
        result = apply_locked(device, planned)
    except (SposError, OSError) as exc:
        return f"putting {applied[:12]} back failed: {exc}; the next sync tries again"
    if result.failed:
        return f"re-applying {applied[:12]} left {len(result.failed)} change(s) failed"
    return f"re-applied {applied[:12]} ({len(result.applied)} change(s) undone)"


def _request(device, checkout, sha, options, progress=lambda text, total=None: None,
             detail=lambda text, total=None: None, advance=lambda: None):
    from reconciler.pipeline import PlanRequest

    policies = os.path.join(checkout, options.policies)
    return PlanRequest(
        path=os.path.join(checkout, options.path), root=str(device.root),
        policies=policies if os.path.isdir(policies) else None,
        cgroup_root=options.cgroup_root, device_labels=options.device_labels,
        creating_state=True, revision=sha, stage=progress, detail=detail, advance=advance,
    )


def settings(options: SyncOptions) -> str:
    """What a revision is judged with besides its content: the directories read in it, the
    device labels asked for, the trusted keys. A quarantine holds only while these are the
    same: trusting the signer's key, or fixing --device-labels, lets the revision be tried."""
    import hashlib

    keyring = ""
    if options.keyring:
        try:
            with open(options.keyring, "rb") as handle:
                keyring = hashlib.sha256(handle.read()).hexdigest()
        except OSError:
            keyring = "unreadable"
    judged = [options.path, options.policies, options.device_labels, keyring]
    return hashlib.sha256(json.dumps(judged).encode()).hexdigest()[:16]


def _applied(sha: str, state: SyncState, changed: int) -> dict:
    if state.applied_revision == sha and state.applied:
        return {**state.applied, "checkedAt": now_iso()}
    return {"revision": sha, "at": now_iso(), "changed": changed, "checkedAt": now_iso()}


def _in_revision(diagnostic, checkout: str) -> bool:
    path = os.path.abspath(str(diagnostic.file))
    return path == checkout or path.startswith(checkout + os.sep)


def _diagnostic(diagnostic, checkout: str) -> str:
    """FILE:LINE:COL: message, FILE relative to the repository for the revision's files."""
    where = str(diagnostic.file)
    if _in_revision(diagnostic, checkout):
        where = os.path.relpath(os.path.abspath(where), checkout)
    position = f"{where}:{diagnostic.line}:{diagnostic.col}" if diagnostic.line else where
    field_path = f" (at {diagnostic.field_path})" if diagnostic.field_path else ""
    summary = str(diagnostic.summary).replace(checkout + os.sep, "")
    return f"{position}: {summary}{field_path}"


def _redacted(url: str) -> str:
    from reconciler.gitsync import redacted

    return redacted(url)


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def elapsed_since(iso: str | None) -> float | None:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        return time.time() - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def repair_drift(root: str, options: SyncOptions, *,
                 report: Callable = lambda change, error: None) -> dict | None:
    """Between syncs: plan the applied revision's files (no fetch) and apply what differs, so
    a managed file changed by hand is put back. Records the check in `state.json` (`drift`:
    when it was checked, how many repairs so far, the last repair) and returns this check:
    {"at", "revision", "repaired": [ids], "failed": [{id, error}]}. None when
    nothing is applied yet, or when another apply holds the lock (tried again next time)."""
    from reconciler.apply import apply_locked
    from reconciler.pipeline import make_plan
    from reconciler.errors import LockHeldError
    from reconciler.state import ApplyLock

    device = Device(root)
    try:
        with ApplyLock(device, timeout=0):
            state = SyncState.load(device)
            sha = state.applied_revision
            checkout = device.host(f"{SYNC_DIR}/checkout")
            if sha is None or _read_marker(f"{checkout}.revision") != sha:
                return None
            _, planned = make_plan(_request(device, checkout, sha, options))
            repaired, failed = [], []
            if planned.has_changes:
                result = apply_locked(device, planned, progress=report)
                repaired = [change.id for change in result.applied]
                failed = [{"id": change.id, "error": error} for change, error in result.failed]
            before = state.drift or {}
            check = {"at": now_iso(), "revision": sha, "repaired": repaired, "failed": failed}
            state.drift = {
                "checkedAt": check["at"], "revision": sha,
                "repairs": before.get("repairs", 0) + len(repaired),
                "lastRepair": check if repaired or failed else before.get("lastRepair"),
            }
            state.save()
            return check
    except LockHeldError:
        return None
