"""Continuous triggers: the task runs over and over, one interval after the previous run ended,
never overlapping itself. `pending` is a switch the test flips; emit records the events."""

from __future__ import annotations

import threading
import time

import pytest

from reconciler.triggers.base import Context, Event, Outcome, Registration
from reconciler.triggers.continuous import open_source
from waiting import wait_for

NAME = "loop"


class Recorder:
    """The emit of a test: records the monotonic time and data of each event and answers with
    `outcome`."""

    def __init__(self, outcome: str = "queued"):
        self.outcome = outcome
        self.times: list[float] = []
        self.data: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            self.times.append(time.monotonic())
            self.data.append(event.data)
            if self.outcome == "queued":
                return Outcome("queued", run=f"run-{len(self.times)}")
            return Outcome(self.outcome, detail="queue directory is read-only")

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.times)


class Pending:
    """`context.pending` of a test: True while the test says a run is pending; records the
    names it was asked about."""

    def __init__(self, value: bool):
        self.value = value
        self.asked: list[str] = []

    def __call__(self, name: str) -> bool:
        self.asked.append(name)
        return self.value


@pytest.fixture
def started():
    """`started(interval, pending, recorder)` -> a running continuous source; stopped after
    the test."""
    sources = []

    def start(interval: float, pending: Pending, recorder: Recorder):
        registration = Registration(name=NAME, agent="agent", task="task", type="continuous",
                                    config={"intervalSeconds": interval})
        context = Context(host=lambda path: path, pending=pending)
        source = open_source(registration, recorder, context)
        sources.append(source)
        source.start()
        return source

    yield start
    for source in sources:
        source.stop()


def test_fires_at_start_with_the_interval_in_the_event(started):
    recorder = Recorder()
    started(5, Pending(True), recorder)

    wait_for(lambda: recorder.count == 1, "the first event", 2)
    assert recorder.data[0] == {"interval": "5s"}


def test_does_not_fire_again_while_its_run_is_pending(started):
    recorder, pending = Recorder(), Pending(True)
    source = started(0.05, pending, recorder)

    wait_for(lambda: recorder.count == 1, "the first event", 2)
    wait_for(lambda: len(pending.asked) >= 3, "three polls of pending", 2)
    time.sleep(0.5)
    assert recorder.count == 1
    assert set(pending.asked) == {NAME}
    assert source.status().state == "running"
    assert source.status().detail == "waiting for run run-1 to end"


def test_fires_again_one_interval_after_the_run_ended(started):
    interval = 0.4
    recorder, pending = Recorder(), Pending(True)
    source = started(interval, pending, recorder)
    wait_for(lambda: recorder.count == 1, "the first event", 2)
    wait_for(lambda: source.status().state == "running", "the running state", 2)

    ended = time.monotonic()
    pending.value = False
    armed = wait_for(lambda: source.status().state == "armed" and source.status(),
                     "the armed state", 2)
    assert "next run at" in armed.detail
    wait_for(lambda: recorder.count == 2, "the second event", 3)

    assert recorder.times[1] - ended >= interval


def test_an_event_that_queued_nothing_is_tried_again_after_the_interval(started):
    recorder = Recorder(outcome="error")
    source = started(0.05, Pending(False), recorder)

    error = wait_for(lambda: source.status().state == "error" and source.status(),
                     "the error state", 2)
    assert "queue directory is read-only" in error.detail
    wait_for(lambda: recorder.count == 2, "the retry", 3)
    recorder.outcome = "queued"
    wait_for(lambda: recorder.count == 3, "the next event", 3)


def test_stop_ends_the_source_in_the_middle_of_a_wait(started):
    recorder = Recorder()
    source = started(60, Pending(False), recorder)
    wait_for(lambda: source.status().state == "armed" and recorder.count == 1,
             "the wait for the next run", 2)

    source.stop()
    source.stop()

    assert not [t for t in threading.enumerate() if t.name == f"trigger-{NAME}"]
    assert recorder.count == 1


def test_stop_ends_the_source_while_it_waits_for_a_run(started):
    recorder = Recorder()
    source = started(60, Pending(True), recorder)
    wait_for(lambda: source.status().state == "running", "the running state", 2)

    source.stop()

    assert not [t for t in threading.enumerate() if t.name == f"trigger-{NAME}"]


def test_a_registration_without_an_interval_is_refused():
    registration = Registration(name=NAME, agent="a", task="t", type="continuous", config={})
    with pytest.raises(ValueError, match="intervalSeconds"):
        open_source(registration, Recorder(), Context(host=lambda path: path))
