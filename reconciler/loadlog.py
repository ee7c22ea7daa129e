"""The device's load over the last two weeks, sampled by `spos daemon` for `spos schedule suggest`.

A quiet hour can only be found from what the device did at that hour on earlier days, and
nothing else keeps that: the kernel's load averages and CPU counters say only what is going on
now. So the daemon appends one sample every INTERVAL_SECONDS to SAMPLES_FILE in the state
directory, one text line each (docs/suggest.md):

    <epoch seconds> <1-minute load average> <CPU percent> <memory percent> <CPUs>
    1767225600 0.42 12.5 41.0 4

The CPU percent is the share of all CPUs that was busy since the previous sample, so a sample
needs one before it: the first tick of a daemon only reads the CPU counters. Fields may be
added at the end of a line one day; readers take the first five.

A line is a sample only when its values could be one (the time a finite number, the load
within MAX_LOAD, both percents within 0..100, the CPUs within 1..MAX_CPUS): a hand edit or a
broken writer must not make an hour's mean absurd, and what is read from here is printed as
strict JSON. Any other line is skipped like a torn one.

The file is bounded. Appending is one write; once the oldest sample is a day past
KEEP_SECONDS, or the file past MAX_BYTES (whatever the clock says), the append compacts it to
the samples still kept, through the device's atomic write. A crash may leave a torn last line:
readers take only lines that end in a newline and parse, and the next append cuts it off
first.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

from reconciler import STATE_DIR
from reconciler.device import Device

SAMPLES_FILE = f"/{STATE_DIR}/load-samples"
INTERVAL_SECONDS = 300
KEEP_SECONDS = 14 * 86400
COMPACT_AFTER_SECONDS = 86400
"""How far past KEEP_SECONDS the oldest sample may be before the file is compacted: about one
compaction a day."""
MAX_BYTES = 256 * 1024
"""A bound whatever the clock does: 15 days of samples take about 120 KiB."""
FIELDS = 5
TORN_TAIL_BYTES = 256
"""How far back from the end a torn last line is looked for: a line is under 64 bytes."""
MAX_LOAD = 4_194_304.0
"""A load average counts runnable and waiting tasks, and Linux has at most this many
(PID_MAX_LIMIT): a larger load is not a sample."""
MAX_CPUS = 8192
"""The most CPUs a Linux kernel can be built for (NR_CPUS with x86-64's MAXSMP): more is not
a sample."""


@dataclass(frozen=True)
class Sample:
    at: float
    """When it was taken, in seconds since the epoch; it covers the INTERVAL_SECONDS before."""
    load1: float
    cpu_percent: float
    """Of all CPUs together: 100 is every CPU busy."""
    memory_percent: float
    cpus: int

    def line(self) -> str:
        return (f"{self.at:.0f} {self.load1:.2f} {self.cpu_percent:.1f} "
                f"{self.memory_percent:.1f} {self.cpus}\n")


@dataclass(frozen=True)
class Reading:
    """The counters one sample is made from."""

    load1: float
    cpu_busy: float
    """CPU seconds spent on anything but idling (and waiting for I/O), all CPUs, since boot."""
    cpu_total: float
    memory_percent: float
    cpus: int


def read_counters() -> Reading:
    """This machine's counters, through psutil. Guest time is already counted in user time,
    so it is left out of the total as psutil's own cpu_percent leaves it out."""
    import psutil

    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return Reading(load1=os.getloadavg()[0], cpu_busy=total - idle, cpu_total=total,
                   memory_percent=psutil.virtual_memory().percent,
                   cpus=psutil.cpu_count() or 1)


class Sampler:
    """Takes a sample when `tick` finds one due, every `interval` seconds, and never raises:
    a sample that cannot be taken or written is logged and skipped."""

    def __init__(self, device: Device, log: Callable[[str], None],
                 interval: float = INTERVAL_SECONDS, keep: float = KEEP_SECONDS,
                 counters: Callable[[], Reading] = read_counters,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.device, self.log = device, log
        self.interval, self.keep = interval, keep
        self.counters, self.clock, self.monotonic = counters, clock, monotonic
        self._due: float | None = None
        self._previous: Reading | None = None

    def tick(self) -> None:
        now = self.monotonic()
        if self._due is not None and now < self._due:
            return
        self._due = now + self.interval
        try:
            self._take()
        except Exception as exc:  # noqa: BLE001 - a full disk, a broken /proc: the daemon goes on
            self.log(f"spos daemon: load sample not taken: {type(exc).__name__}: {exc}")

    def _take(self) -> None:
        reading, previous = self.counters(), self._previous
        self._previous = reading
        if previous is None:
            return
        elapsed = reading.cpu_total - previous.cpu_total
        busy = (reading.cpu_busy - previous.cpu_busy) / elapsed if elapsed > 0 else 0.0
        sample = Sample(at=self.clock(), load1=reading.load1,
                        cpu_percent=min(max(busy * 100, 0.0), 100.0),
                        memory_percent=reading.memory_percent, cpus=reading.cpus)
        append(self.device, sample, self.keep)


def append(device: Device, sample: Sample, keep: float = KEEP_SECONDS) -> None:
    """Add `sample` at the end of the file; compact it when it holds more than it keeps."""
    device.makedirs(f"/{STATE_DIR}")
    host = device.host(SAMPLES_FILE)
    fd = os.open(host, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        size = _cut_torn_line(fd)
        line = sample.line().encode()
        os.write(fd, line)
        oldest = _parse(os.pread(fd, 64, 0).split(b"\n", 1)[0].decode("ascii", "replace"))
    finally:
        os.close(fd)
    too_old = oldest is None or sample.at - oldest.at > keep + COMPACT_AFTER_SECONDS
    if too_old or size + len(line) > MAX_BYTES:
        compact(device, sample.at, keep)


def _cut_torn_line(fd: int) -> int:
    """Remove what a crash left of a last line (all after the last newline); the new size."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, TORN_TAIL_BYTES), size - min(size, TORN_TAIL_BYTES))
    if not tail or tail.endswith(b"\n"):
        return size
    size -= len(tail) - tail.rfind(b"\n") - 1
    os.ftruncate(fd, size)
    return size


def compact(device: Device, now: float, keep: float = KEEP_SECONDS) -> None:
    """Rewrite the file atomically with only the samples of the `keep` seconds up to `now`,
    the newest of them in half of MAX_BYTES at most; torn and unreadable lines go."""
    lines, size = [], 0
    for sample in reversed(read(device, since=now - keep, until=now)):
        line = sample.line()
        size += len(line)
        if size > MAX_BYTES // 2:
            break
        lines.append(line)
    device.write_atomic(SAMPLES_FILE, "".join(reversed(lines)).encode())


def read(device: Device, since: float = -math.inf, until: float = math.inf) -> list[Sample]:
    """The readable, believable samples taken in [since, until], oldest first."""
    raw = device.read_text(SAMPLES_FILE) or ""
    complete = raw.split("\n")[:-1]  # after the last newline: nothing, or a torn line
    samples = (_parse(line) for line in complete)
    return sorted((s for s in samples if s is not None and since <= s.at <= until),
                  key=lambda s: s.at)


def _parse(line: str) -> Sample | None:
    """The sample `line` holds; None when it is torn, unreadable or holds values no sample
    could have (NaN fails every comparison)."""
    fields = line.split(" ")
    if len(fields) < FIELDS:
        return None
    try:
        at, load1, cpu, memory = (float(value) for value in fields[:4])
        cpus = int(fields[4])
    except ValueError:
        return None
    believable = (math.isfinite(at) and 0 <= load1 <= MAX_LOAD and 0 <= cpu <= 100
                  and 0 <= memory <= 100 and 1 <= cpus <= MAX_CPUS)
    return Sample(at, load1, cpu, memory, cpus) if believable else None
