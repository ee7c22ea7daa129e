"""Continuous triggers: run a task over and over, never overlapping itself.

The source fires as soon as it starts. After each event it waits until no run the trigger
queued is still queued or running (`context.pending`), then waits `interval`, then fires
again. An event that queued nothing (the queue could not be written, the trigger is disabled
or rate limited) is simply tried again `interval` later, but never sooner than a second later,
so that an interval of 0s does not spin.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

from reconciler.triggers.base import Context, Emit, Event, Outcome, Registration, Stoppable

RAN = ("queued", "skipped")
"""Outcomes after which a run of the trigger existed: the next one follows `interval` after it
ended. (skipped: a run queued earlier, say before the daemon restarted, had not ended.)"""
SHORTEST_RETRY_SECONDS = 1.0
"""The least time between an event that queued nothing and the next one."""
LONGEST_POLL_SECONDS = 0.15
"""How often, at most, `pending` is asked whether the last run has ended."""
SHORTEST_POLL_SECONDS = 0.01


class ContinuousSource(Stoppable):
    """Fires one event per cycle on its own thread: fire, wait for the run to end, wait
    `interval`. Status is `running` while a run it queued has not ended, `armed` (or `error`
    when the event could not be queued) while it waits for the next cycle."""

    def __init__(self, registration: Registration, emit: Emit, pending: Callable[[str], bool]):
        super().__init__()
        self._name = registration.name
        self._emit = emit
        self._pending = pending
        self._interval = float(registration.config["intervalSeconds"])
        self._poll = min(LONGEST_POLL_SECONDS, max(self._interval, SHORTEST_POLL_SECONDS))
        self.set_status("armed", "first run at start")

    def start(self) -> None:
        """Starts the cycle (the first event is emitted at once); a second call does nothing."""
        self.start_thread(f"trigger-{self._name}")

    def stop(self) -> None:
        """Stops the cycle, also in the middle of a wait; returns once the thread has ended
        (within about a second). A run already queued is left to finish. Idempotent."""
        self.stop_thread()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                stopped = self._cycle()
            except Exception as exc:  # a source never raises out of its thread
                retry = time.monotonic() + self._retry_after()
                self.set_status("error", f"{type(exc).__name__}: {exc}; trying again at "
                                         f"{_clock(retry)}")
                stopped = self.wait(self._retry_after())
            if stopped:
                return

    def _cycle(self) -> bool:
        """Fires once, waits for the run to end, then for the interval. True when stopped."""
        outcome = self._emit(Event(data={"interval": interval_text(self._interval)}))
        if self._wait_for_run(outcome):
            return True
        pause = self._interval if outcome.status in RAN else self._retry_after()
        self.set_status(*self._between_runs(outcome, time.monotonic() + pause))
        return self.wait(pause)

    def _retry_after(self) -> float:
        """How long to wait after an event that queued nothing."""
        return max(self._interval, SHORTEST_RETRY_SECONDS)

    def _wait_for_run(self, outcome: Outcome) -> bool:
        """Waits while a run the trigger queued (this one, or an earlier one the event was
        skipped for) is still queued or running. True when stopped meanwhile."""
        run = f"run {outcome.run}" if outcome.run else "the run it queued earlier"
        while self._pending(self._name):
            self.set_status("running", f"waiting for {run} to end")
            if self.wait(self._poll):
                return True
        return False

    def _between_runs(self, outcome: Outcome, next_run: float) -> tuple[str, str]:
        """The status while waiting for the next cycle: (state, detail)."""
        when = f"next run at {_clock(next_run)}"
        if outcome.status == "error":
            return "error", f"the run could not be queued: {outcome.detail}; trying again, {when}"
        if outcome.status == "queued":
            return "armed", f"run {outcome.run} ended; {when}"
        because = f": {outcome.detail}" if outcome.detail else ""
        return "armed", f"last event was {outcome.status}{because}; {when}"


def interval_text(seconds: float) -> str:
    """The interval as events carry it: `5s`, `0.5s`, `300s`."""
    return f"{seconds:g}s"


def _clock(moment: float) -> str:
    """A `time.monotonic()` moment as wall-clock UTC, to the second."""
    epoch = time.time() + (moment - time.monotonic())
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def open_source(registration: Registration, emit: Emit, context: Context) -> ContinuousSource:
    """Builds the source of a continuous trigger without starting it; it asks
    `context.pending` whether the runs it queued have ended. Raises ValueError when the config
    has no interval."""
    if not isinstance(registration.config.get("intervalSeconds"), (int, float)):
        raise ValueError("a continuous trigger needs intervalSeconds")
    return ContinuousSource(registration, emit, context.pending)
