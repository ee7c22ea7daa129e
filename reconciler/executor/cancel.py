"""Cancelling a run from outside the process that runs it.

A queued run ends at once as cancelled: its record rewritten in queue/ to say so, then renamed
into failed/ (`_end_queued`). A running run gets a cancel request
next to its record, `active/<run file>.cancel`, naming the attempt it was made against:

    {"runId": "...", "attempt": 2, "reason": "cancelled by request", "requestedAt": "..."}

The run's owner (an executor, or `spos action execute`) sees the request at once when woken,
and within a second anyway: SIGTERM, its grace period, then every process in the run's cgroup is
killed, and the run ends as cancelled with the request's reason. An attempt that ended on its
own before the request was seen keeps its state, but is not retried. The request is removed
once the run's end is recorded; when the owner died, the next executor's recovery honours it
(the run ends as cancelled instead of running again). A request for another attempt than the
one running is stale and ignored, so it cannot stop a later attempt; one whose run left
active/ is a stray and removed (RunStore.remove_strays).

Writing a request happens under the claim lock, and so does the recording of a run's end: a
request is either seen by the owner or finds the run already ended.
"""

from __future__ import annotations

import json

from reconciler.errors import UsageError
from reconciler.executor.enqueue import wake
from reconciler.executor.owner import alive
from reconciler.executor.report import missing
from reconciler.executor.runs import CorruptRecord, Run, RunStore, storage_failure
from reconciler.executor.supervise import now_iso

BY_REQUEST = "cancelled by request"


def cancel(store: RunStore, run_id: str) -> str:
    """Cancel `run_id`; returns what happened, in a sentence."""
    if store.find(run_id) is None:
        raise UsageError(missing(store, run_id))
    with store.locked():
        run = store.find(run_id)
        if run is not None and run.bucket == "queue":
            attempt = run.record.get("attempt", 1)
            when = ("before it started" if attempt == 1 else
                    f"while waiting to retry (attempt {attempt})")
            return f"run {run_id} cancelled {when}" + _end_queued(store, run, f"{BY_REQUEST} {when}")
        run = store.find(run_id)
        if run is not None and run.bucket == "active" and ask(store, run, BY_REQUEST):
            if not alive(run.record.get("executor") or {}):
                return (f"run {run_id} is active but its executor is gone: the next executor to "
                        "start stops what is left of it and records it as cancelled")
            return f"run {run_id} is running: asked the executor to stop it (SIGTERM, then the whole cgroup)"
    state = run.state if run else "gone"
    return f"run {run_id} already ended ({state}); nothing to cancel"


def _end_queued(store: RunStore, run: Run, reason: str) -> str:
    """End a queued run as cancelled, under the claim lock, and say how it went. Its record is
    rewritten where it is, atomically, to say so; then it is renamed into failed/. A write the
    file system refuses changes nothing. Cut short after the rewrite, or with failed/ refusing
    the rename, the run stays in queue/ saying it was cancelled: executors move such a file to
    failed/ and never run it (Executor._load_queued), and waiters read it as ended."""
    run.record.update(state="cancelled", reason=reason, endedAt=now_iso())
    run.record.pop("attachments", None)  # an ended run keeps no copy (docs/queue.md)
    store.save(run)
    try:
        store.move(run, "failed")
    except OSError as exc:
        if not storage_failure(exc):
            raise
        return (f"; its record stays in queue/ until failed/ takes it ({exc.strerror}): "
                "no executor runs it")
    return ""


def ask(store: RunStore, run: Run, reason: str) -> bool:
    """Ask the owner of an active run to cancel the attempt it is in, and wake the executors.
    Call under `store.locked()`. False when the run is no longer active. A request already
    made for this attempt is kept as it is."""
    try:
        current = store.load(run.agent, "active", run.name)
    except (FileNotFoundError, CorruptRecord):
        return False
    if requested(store, current) is None:
        request = {"runId": current.id, "attempt": current.record.get("attempt", 1),
                   "reason": reason, "requestedAt": now_iso()}
        store.device.write_atomic(store.sidecar(current, "cancel"),
                                  (json.dumps(request) + "\n").encode(), mode=0o644)
        wake(store.device, run.agent)
    return True


def requested(store: RunStore, run: Run) -> str | None:
    """The reason of a cancel request for the attempt `run` is in, or None. A request for
    another run or attempt is stale and counts as none (it is removed under the lock, when the
    run ends or as a stray). A request file without those details, written by hand, counts."""
    raw = store.device.read_text(store.sidecar(run, "cancel"))
    if raw is None:
        return None
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        return BY_REQUEST
    if not isinstance(request, dict):
        return BY_REQUEST
    attempt = run.record.get("attempt", 1)
    if request.get("runId", run.id) != run.id or request.get("attempt", attempt) != attempt:
        return None
    reason = request.get("reason")
    return reason if isinstance(reason, str) and reason else BY_REQUEST


def withdraw(store: RunStore, run: Run) -> None:
    """Remove the run's cancel request (its end is recorded). Call under `store.locked()`. A
    file system that refuses leaves it to the stray collection."""
    try:
        store.device.remove(store.sidecar(run, "cancel"))
    except OSError as exc:
        if not storage_failure(exc):
            raise
