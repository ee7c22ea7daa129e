"""Serial triggers read a real pseudo-terminal standing in for /dev/ttyUSB0: lines, patterns
and raw data fire with exact data, long lines stay bounded, and a device that goes away or is
not there yet is waited for and read again once it is back."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from reconciler.triggers import serial as serial_trigger
from reconciler.triggers.base import Context, Event, Outcome, Registration
from waiting import wait_for

DEVICE = "/dev/ttyUSB0"


class Recorder:
    """A stand-in for the gate: keeps every event it is handed."""

    def __init__(self):
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            self.events.append(event)
        return Outcome("queued", run="run-1")

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)


class FakeDevice:
    """A pty pair linked at `<root>/dev/ttyUSB0`; the test writes to the master side."""

    def __init__(self, root: Path):
        self.link = root / DEVICE.lstrip("/")
        self.link.parent.mkdir(parents=True, exist_ok=True)
        self.master: int | None = None
        self.slave_name = ""

    def plug(self) -> None:
        master, slave = os.openpty()
        self.master, self.slave_name = master, os.ttyname(slave)
        os.close(slave)
        self.link.symlink_to(self.slave_name)

    def unplug(self) -> None:
        os.close(self.master)
        self.master = None
        self.link.unlink()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def device(root):
    fake = FakeDevice(root)
    yield fake
    fake.close()


@pytest.fixture
def start_source(root):
    """Builds and starts a serial source over `root` with the given config; stops it after."""
    sources = []

    def start(**config):
        recorder = Recorder()
        registration = Registration(
            name="door-sensor", agent="site-agent", task="on_line", type="serial",
            config={"device": DEVICE, "baudrate": 115200, **config},
        )
        context = Context(host=lambda path: str(root / path.lstrip("/")))
        source = serial_trigger.open_source(registration, recorder, context)
        sources.append(source)
        source.start()
        return source, recorder

    yield start
    for source in sources:
        source.stop()


def armed(source) -> bool:
    return source.status().state == "armed"


def waiting(source) -> bool:
    return source.status().state == "waiting"


def events_count(recorder: Recorder, count: int):
    return lambda: len(recorder.snapshot()) >= count and recorder.snapshot()


def test_each_line_fires_with_its_text_and_bytes(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)

    device.send(b"door open\n\nzone 2 \xff\n")

    events = wait_for(events_count(recorder, 2), "two line events", 3)
    assert [(e.data, e.payload) for e in events] == [
        ({"device": DEVICE, "line": "door open"}, b"door open"),
        ({"device": DEVICE, "line": "zone 2 \ufffd"}, b"zone 2 \xff"),
    ]


def test_crlf_line_ends_are_stripped(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)

    device.send(b"OK\r\n")

    [event] = wait_for(events_count(recorder, 1), "a line event", 3)
    assert event.data["line"] == "OK"
    assert event.payload == b"OK"


def test_a_line_sent_in_pieces_fires_once_whole(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)

    device.send(b"temperature=2")
    time.sleep(0.3)
    device.send(b"1.5\n")

    [event] = wait_for(events_count(recorder, 1), "a line event", 3)
    assert event.payload == b"temperature=21.5"


def test_pattern_mode_fires_only_on_matching_lines(device, start_source):
    device.plug()
    source, recorder = start_source(mode="pattern", pattern=r"^ALARM\b")
    wait_for(lambda: armed(source), "the source to open the device", 3)

    device.send(b"ok\nALARMS are fine\nALARM zone 3\nheartbeat\nALARM zone 4\n")

    def last_line_seen():
        events = recorder.snapshot()
        return events and events[-1].payload == b"ALARM zone 4" and events

    events = wait_for(last_line_seen, "the last matching line", 3)
    assert [(e.data["line"], e.payload) for e in events] == [
        ("ALARM zone 3", b"ALARM zone 3"), ("ALARM zone 4", b"ALARM zone 4"),
    ]


def test_a_pattern_that_backtracks_forever_passes_the_line_over_and_stops_nothing(
        device, start_source):
    """A pattern such as `^(a|aa)+$` takes exponential time on a line of a's ending in b. The
    match is cut short (the line passed over, said in the status) and runs without holding the
    interpreter: meanwhile other threads of the daemon go on, and the next line is matched."""
    device.plug()
    source, recorder = start_source(mode="pattern", pattern=r"^(a|aa)+$|^ALARM")
    wait_for(lambda: armed(source), "the source to open the device", 3)
    ticks = []
    stop = threading.Event()

    def ticking():  # stands in for the daemon's other triggers and its heartbeat
        while not stop.wait(0.01):
            ticks.append(time.monotonic())

    other = threading.Thread(target=ticking, daemon=True)
    other.start()
    try:
        device.send(b"a" * 200 + b"b\nALARM zone 1\n")
        events = wait_for(events_count(recorder, 1), "the line after the slow one", 5)
    finally:
        stop.set()
        other.join()
    assert [e.data["line"] for e in events] == ["ALARM zone 1"]
    assert "longer than" in source.status().detail
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.09, f"another thread waited {max(gaps):.3f}s while the pattern ran"


def test_data_mode_fires_with_the_raw_bytes(device, start_source):
    device.plug()
    source, recorder = start_source(mode="data")
    wait_for(lambda: armed(source), "the source to open the device", 3)
    sent = b"\x00\x01\x02raw\r\nno line end"

    device.send(sent)

    def everything_arrived():
        events = recorder.snapshot()
        return b"".join(e.payload for e in events) == sent and events

    events = wait_for(everything_arrived, "all bytes as data events", 3)
    assert all(e.data == {"device": DEVICE} for e in events)


def test_an_endless_line_fires_its_head_once_and_the_next_line_is_intact(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line", maxLineLength=16)
    wait_for(lambda: armed(source), "the source to open the device", 3)

    for _ in range(20):
        device.send(b"x" * 1000)
    device.send(b"\r\nnext\n")

    events = wait_for(events_count(recorder, 2), "the cut line and the next line", 3)
    assert [(e.data, e.payload) for e in events] == [
        ({"device": DEVICE, "line": "x" * 16, "truncated": "1"}, b"x" * 16),
        ({"device": DEVICE, "line": "next"}, b"next"),
    ]


def test_a_line_of_exactly_the_limit_is_not_cut(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line", maxLineLength=4)
    wait_for(lambda: armed(source), "the source to open the device", 3)

    device.send(b"abcd\r\n")

    [event] = wait_for(events_count(recorder, 1), "a line event", 3)
    assert event.data == {"device": DEVICE, "line": "abcd"}


def test_a_removed_device_is_waited_for_and_read_again_when_back(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)
    device.send(b"before\npartial line from the old device")
    wait_for(events_count(recorder, 1), "the first line", 3)

    device.unplug()
    wait_for(lambda: waiting(source), "status waiting after the device went away", 3)
    assert DEVICE in source.status().detail

    device.plug()
    wait_for(lambda: armed(source), "the source to reopen the device", 3)
    device.send(b"after\n")

    events = wait_for(events_count(recorder, 2), "a line from the new device", 3)
    assert [e.payload for e in events] == [b"before", b"after"]


def test_a_removed_node_is_noticed_while_the_old_device_stays_open(device, start_source):
    device.plug()
    source, recorder = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)
    old_master = device.master
    device.link.unlink()
    wait_for(lambda: waiting(source), "status waiting after the node was removed", 3)

    device.plug()
    wait_for(lambda: armed(source), "the source to open the new device", 3)
    device.send(b"from the new device\n")
    os.write(old_master, b"from the old device\n")

    [event] = wait_for(events_count(recorder, 1), "a line from the new device", 3)
    assert event.payload == b"from the new device"
    os.close(old_master)


def test_a_device_absent_at_start_is_read_once_it_appears(device, start_source):
    source, recorder = start_source(mode="line")
    wait_for(lambda: waiting(source) and "absent" in source.status().detail,
             "status waiting for the absent device", 3)

    device.plug()
    wait_for(lambda: armed(source), "the source to open the device", 3)
    device.send(b"hello\n")

    [event] = wait_for(events_count(recorder, 1), "a line event", 3)
    assert event.data == {"device": DEVICE, "line": "hello"}


def test_stop_closes_the_device(device, start_source):
    device.plug()
    source, _ = start_source(mode="line")
    wait_for(lambda: armed(source), "the source to open the device", 3)
    assert device.slave_name in open_fd_targets()

    source.stop()
    source.stop()

    assert device.slave_name not in open_fd_targets()


def test_an_invalid_pattern_is_an_error_status(start_source):
    source, _ = start_source(mode="pattern", pattern="(unclosed")

    assert source.status().state == "error"
    assert "(unclosed" in source.status().detail


def open_fd_targets() -> set[str]:
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return targets
