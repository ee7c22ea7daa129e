"""Cancelling a run from outside the executor.

A queued run is moved straight to failed/ as cancelled (a rename: if an executor claims it at
the same instant, the rename fails and the run is treated as running). A running run gets a
cancel request next to its record; the executor sees it on its next wake-up, sends SIGTERM,
waits its grace period, then kills every process in the run's cgroup.
"""

from __future__ import annotations

from reconciler.errors import UsageError
from reconciler.executor.enqueue import wake
from reconciler.executor.runs import RunStore
from reconciler.executor.supervise import now_iso


def cancel(store: RunStore, run_id: str) -> str:
    """Cancel `run_id`; returns what happened, in a sentence."""
    run = store.find(run_id)
    if run is None:
        raise UsageError(f"no run {run_id!r} on this device")
    if run.bucket == "queue" and store.move(run, "failed"):
        run.record.update(state="cancelled", reason="cancelled by request before it started",
                          endedAt=now_iso())
        store.save(run)
        return f"run {run_id} cancelled before it started"
    run = store.find(run_id)
    if run is not None and run.bucket == "active":
        store.device.write_atomic(run.path + ".cancel", b"cancel\n", mode=0o644)
        wake(store.device)
        return f"run {run_id} is running: asked the executor to stop it (SIGTERM, then the whole cgroup)"
    state = run.state if run else "gone"
    return f"run {run_id} already ended ({state}); nothing to cancel"
