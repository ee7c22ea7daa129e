"""Condition triggers: a metric that crosses a threshold and stays there fires the trigger.

The firing rules (`for`, `cooldown`, `rearm`) are driven through the real source and its thread
with a metric source whose value the test sets, at short durations. MetricSource itself is
tested against this machine and against a fake device root.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from reconciler.triggers.base import Context, Event, Outcome, Registration
from reconciler.triggers.condition import MetricSource, MetricUnavailable, open_source
from waiting import wait_for

INTERVAL = 0.02
HOLD = 0.2
COOLDOWN = 0.3


class SetMetric:
    """A metric source whose value the test sets; an exception as the value is raised."""

    def __init__(self, value):
        self.value = value
        self.samples = 0

    def sample(self, config):
        self.samples += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def set_and_settle(self, value, samples: int = 3):
        """Sets the value and returns once the source has taken `samples` samples of it."""
        self.value = value
        seen = self.samples
        wait_for(lambda: self.samples >= seen + samples, f"{samples} samples of {value!r}", 2)


class Recorder:
    """The emit of a test: records each event with the monotonic time it arrived."""

    def __init__(self):
        self.events: list[tuple[float, Event]] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            self.events.append((time.monotonic(), event))
            return Outcome("queued", run=f"run-{len(self.events)}")

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.events)

    def time_of(self, index: int) -> float:
        return self.events[index][0]

    def data(self, index: int) -> dict:
        return self.events[index][1].data


@pytest.fixture
def started():
    """`started(config, metric)` -> (source, recorder): a running condition source; stopped
    after the test."""
    sources = []

    def start(config: dict, metric):
        config = {"intervalSeconds": INTERVAL, **config}
        registration = Registration(name="hot", agent="agent", task="task", type="condition",
                                    config=config)
        recorder = Recorder()
        context = Context(host=lambda path: path, metrics=metric)
        source = open_source(registration, recorder, context)
        sources.append(source)
        source.start()
        return source, recorder

    yield start
    for source in sources:
        source.stop()


def state_of(source) -> str:
    return source.status().state


def test_fires_only_after_the_condition_held_for_the_whole_span(started):
    metric = SetMetric(91.3)
    begun = time.monotonic()
    source, recorder = started({"metric": "cpu_percent", "above": 90, "forSeconds": 0.5}, metric)

    holding = wait_for(lambda: source.status().state == "holding" and source.status(),
                       "the holding state", 2)
    assert recorder.count == 0
    assert "since" in holding.detail and "fires at" in holding.detail
    wait_for(lambda: recorder.count == 1, "the fire", 3)
    assert recorder.time_of(0) - begun >= 0.5
    assert recorder.data(0) == {"metric": "cpu_percent", "value": "91.3", "threshold": "above 90"}


def test_a_dip_during_the_span_restarts_it(started):
    hold = 1.0  # long beside the set-up before the dip, which a loaded machine can stretch
    metric = SetMetric(95.0)
    source, recorder = started({"metric": "cpu_percent", "above": 90, "forSeconds": hold}, metric)

    metric.set_and_settle(95.0)
    metric.set_and_settle(50.0)
    assert state_of(source) == "armed" and recorder.count == 0
    back = time.monotonic()
    metric.value = 95.0
    wait_for(lambda: recorder.count == 1, "the fire", 5)

    assert recorder.time_of(0) - back >= hold


def test_fires_once_while_it_keeps_holding_and_again_after_crossing_back(started):
    metric = SetMetric(95.0)
    source, recorder = started({"metric": "cpu_percent", "above": 90}, metric)

    wait_for(lambda: recorder.count == 1, "the first fire", 2)
    metric.set_and_settle(96.0, samples=15)
    assert recorder.count == 1
    assert state_of(source) == "waiting to recover"
    assert "re-arms once cpu_percent is no longer above 90" in source.status().detail

    metric.set_and_settle(50.0)
    assert state_of(source) == "armed"
    metric.value = 95.0
    wait_for(lambda: recorder.count == 2, "the fire after crossing back", 2)


def test_a_sample_that_is_no_number_is_no_recovery(started):
    """NaN from the metric source is no reading: an error, like a failed sample, and not a
    crossing back, so the condition that still holds does not fire a second time."""
    metric = SetMetric(95.0)
    source, recorder = started({"metric": "cpu_percent", "above": 90}, metric)

    wait_for(lambda: recorder.count == 1, "the first fire", 2)
    metric.set_and_settle(float("nan"))
    assert state_of(source) == "error" and "NaN" in source.status().detail
    metric.set_and_settle(95.0, samples=10)
    assert recorder.count == 1


def test_a_condition_back_during_the_cooldown_fires_only_once_it_passed(started):
    metric = SetMetric(95.0)
    cooldown = 0.8  # long enough to watch it from inside, however slowly samples come
    source, recorder = started(
        {"metric": "cpu_percent", "above": 90, "cooldownSeconds": cooldown}, metric)

    wait_for(lambda: recorder.count == 1, "the first fire", 2)
    metric.set_and_settle(50.0, samples=2)
    metric.set_and_settle(95.0, samples=2)
    assert state_of(source) == "cooling down"
    assert "until" in source.status().detail
    wait_for(lambda: recorder.count == 2, "the fire after the cooldown", 3)

    assert recorder.time_of(1) - recorder.time_of(0) >= cooldown


def test_rearm_cooldown_fires_again_while_holding_once_cooldown_and_span_passed(started):
    metric = SetMetric(95.0)
    hold = 0.1
    source, recorder = started({"metric": "cpu_percent", "above": 90, "forSeconds": hold,
                                "cooldownSeconds": COOLDOWN, "rearm": "cooldown"}, metric)

    wait_for(lambda: recorder.count == 2, "the second fire while holding", 3)

    assert recorder.time_of(1) - recorder.time_of(0) >= COOLDOWN + hold


def test_below_fires_when_the_value_is_under_the_bound(started):
    metric = SetMetric(20.0)
    source, recorder = started({"metric": "memory_percent", "below": 10}, metric)

    metric.set_and_settle(20.0)
    assert recorder.count == 0
    metric.value = 5.5
    wait_for(lambda: recorder.count == 1, "the fire", 2)
    assert recorder.data(0) == {"metric": "memory_percent", "value": "5.5", "threshold": "below 10"}


def test_equals_fires_on_the_boolean_and_names_the_interface(started):
    metric = SetMetric(True)
    config = {"metric": "network_available", "interface": "eth0", "equals": False}
    source, recorder = started(config, metric)

    metric.set_and_settle(True)
    assert recorder.count == 0
    metric.value = False
    wait_for(lambda: recorder.count == 1, "the fire", 2)
    assert recorder.data(0) == {"metric": "network_available", "value": "false",
                                "threshold": "equals false", "interface": "eth0"}


def test_disk_usage_events_name_the_path(started):
    metric = SetMetric(97.25)
    source, recorder = started({"metric": "disk_usage", "path": "/var", "above": 95}, metric)

    wait_for(lambda: recorder.count == 1, "the fire", 2)
    assert recorder.data(0) == {"metric": "disk_usage", "value": "97.25", "threshold": "above 95",
                                "path": "/var"}


def test_a_failing_sample_shows_an_error_never_fires_and_restarts_the_hold(started):
    metric = SetMetric(95.0)
    source, recorder = started({"metric": "cpu_temp", "above": 90, "forSeconds": HOLD}, metric)

    metric.set_and_settle(MetricUnavailable("no temperature sensor: none here"))
    assert recorder.count == 0
    assert state_of(source) == "error"
    assert "no temperature sensor: none here" in source.status().detail

    back = time.monotonic()
    metric.value = 95.0
    wait_for(lambda: recorder.count == 1, "the fire after recovery", 3)
    assert recorder.time_of(0) - back >= HOLD


def test_a_fire_whose_run_could_not_be_queued_fires_again_while_it_still_holds(started):
    metric = SetMetric(95.0)
    refusing = {"on": True}
    tries = []

    def emit(event):
        tries.append(time.monotonic())
        if refusing["on"]:
            return Outcome("error", detail="could not queue a run: No space left on device")
        return Outcome("queued", run="run-1")

    registration = Registration(name="full", agent="agent", task="task", type="condition",
                                config={"intervalSeconds": INTERVAL, "metric": "disk_usage",
                                        "above": 90, "forSeconds": HOLD})
    source = open_source(registration, emit, Context(host=lambda path: path, metrics=metric))
    source.start()
    try:
        wait_for(lambda: len(tries) >= 3, "the fire to be tried at every sample", 3)
        assert tries[1] - tries[0] < HOLD  # the hold is not started again after a refusal
        assert state_of(source) == "error"
        assert "could not be queued (could not queue a run: No space left on device)" in source.status().detail
        refusing["on"] = False
        wait_for(lambda: state_of(source) == "waiting to recover", "the run to be queued", 3)
        fired = len(tries)
        metric.set_and_settle(96.0, samples=10)
        assert len(tries) == fired  # queued once: fired, and waits for the value to cross back
    finally:
        source.stop()


def test_an_unexpected_sampling_failure_is_an_error_too(started):
    metric = SetMetric(RuntimeError("driver crashed"))
    source, recorder = started({"metric": "load", "above": 1}, metric)

    metric.set_and_settle(RuntimeError("driver crashed"))
    assert state_of(source) == "error"
    assert "driver crashed" in source.status().detail
    metric.value = 3.0
    wait_for(lambda: recorder.count == 1, "the fire after recovery", 2)


def test_stop_ends_sampling(started):
    metric = SetMetric(50.0)
    source, recorder = started({"metric": "cpu_percent", "above": 90}, metric)
    metric.set_and_settle(50.0)

    source.stop()
    source.stop()
    stopped_at = metric.samples
    time.sleep(5 * INTERVAL)
    assert metric.samples == stopped_at
    assert not [t for t in threading.enumerate() if t.name == "trigger-hot"]


def test_without_an_injected_source_it_samples_the_machine():
    recorder = Recorder()
    registration = Registration(name="busy", agent="agent", task="task", type="condition",
                                config={"metric": "process_count", "above": 0,
                                        "intervalSeconds": INTERVAL})
    source = open_source(registration, recorder, Context(host=lambda path: path))
    source.start()
    try:
        wait_for(lambda: recorder.count == 1, "the fire", 2)
    finally:
        source.stop()
    assert int(recorder.data(0)["value"]) > 0


def test_a_registration_without_a_threshold_is_refused():
    registration = Registration(name="x", agent="a", task="t", type="condition",
                                config={"metric": "load"})
    with pytest.raises(ValueError, match="above, below or equals"):
        open_source(registration, Recorder(), Context(host=lambda path: path, metrics=SetMetric(1)))


def below(root):
    """The `host` of a daemon whose --root is `root`."""
    return lambda path: os.path.join(str(root), path.lstrip("/"))


def write_zone(root, zone: int, text: str):
    zone_dir = root / "sys" / "class" / "thermal" / f"thermal_zone{zone}"
    zone_dir.mkdir(parents=True)
    (zone_dir / "temp").write_text(text)


def test_disk_usage_measures_the_file_system_below_the_root(tmp_path):
    sampled = MetricSource(below(tmp_path)).sample({"metric": "disk_usage", "path": "/"})

    assert sampled == pytest.approx(psutil.disk_usage(str(tmp_path)).percent, abs=1.0)


def test_disk_usage_of_a_missing_path_is_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="disk_usage"):
        MetricSource(below(tmp_path)).sample({"metric": "disk_usage", "path": "/no/such/dir"})


def test_cpu_temp_reads_the_kernels_millidegrees_below_the_root(tmp_path):
    write_zone(tmp_path, 0, "85000\n")

    assert MetricSource(below(tmp_path)).sample({"metric": "cpu_temp"}) == 85.0


def test_cpu_temp_is_the_hottest_zone(tmp_path):
    write_zone(tmp_path, 0, "42000\n")
    write_zone(tmp_path, 1, "85500\n")
    write_zone(tmp_path, 2, "not a number\n")

    assert MetricSource(below(tmp_path)).sample({"metric": "cpu_temp"}) == 85.5


def test_cpu_temp_without_a_sensor_is_unavailable_and_says_where_it_looked_on_the_device(tmp_path):
    with pytest.raises(MetricUnavailable, match="no temperature sensor") as raised:
        MetricSource(below(tmp_path)).sample({"metric": "cpu_temp"})
    assert "no readable /sys/class/thermal/thermal_zone*/temp" in str(raised.value)
    assert str(tmp_path) not in str(raised.value)


def test_process_count_counts_this_machines_processes(tmp_path):
    count = MetricSource(below(tmp_path)).sample({"metric": "process_count"})

    assert count > 0


@pytest.mark.parametrize("metric", ["cpu_percent", "memory_percent"])
def test_percentages_are_percentages(tmp_path, metric):
    value = MetricSource(below(tmp_path)).sample({"metric": metric})

    assert 0.0 <= value <= 100.0


def test_load_is_the_one_minute_load_average(tmp_path):
    assert MetricSource(below(tmp_path)).sample({"metric": "load"}) >= 0.0


def test_loopback_does_not_make_the_network_available(tmp_path):
    available = MetricSource(below(tmp_path)).sample(
        {"metric": "network_available", "interface": "lo"})

    assert available is False


def test_a_missing_interface_is_not_available(tmp_path):
    available = MetricSource(below(tmp_path)).sample(
        {"metric": "network_available", "interface": "nosuch0"})

    assert available is False
