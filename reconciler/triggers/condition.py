"""Condition triggers: fire when a system metric crosses a threshold and stays there.

Three parts, each with one job:
- `MetricSource` measures the device: psutil, and the thermal zones below the daemon's root.
- `Threshold` says whether one sample satisfies the condition (above, below or equals).
- `Arming` decides, from the samples and their times, when a holding condition fires and when
  it may fire again (`for`, `cooldown`, `rearm`). It is pure: the time is an argument.

`ConditionSource` ties them together on one thread that samples every `interval`.
"""

from __future__ import annotations

import glob
import ipaddress
import math
import os
import socket
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

import psutil

from reconciler.errors import SposError
from reconciler.triggers.base import Context, Emit, Event, Registration, Stoppable

METRICS = (
    "disk_usage", "cpu_percent", "memory_percent", "load", "cpu_temp", "network_available",
    "process_count",
)
REARM_MODES = ("recover", "cooldown")
DEFAULT_INTERVAL_SECONDS = 10.0
"""The schema's default `interval`; also used for an interval of 0, which would never pause."""
MILLIDEGREES_PER_DEGREE = 1000


class MetricUnavailable(SposError):
    """A metric could not be measured on this device; the message says why. Sampling again
    later may succeed (a sensor that appears, a path that is mounted)."""

    retryable = True


class MetricSource:
    """Measures the device's metrics. `host(device_path)` maps a path on the device to this
    machine (the daemon's --root stands in for /); only paths go through it: CPU, memory, load,
    processes and interfaces are those of the machine the daemon runs on."""

    def __init__(self, host: Callable[[str], str]):
        self._host = host
        psutil.cpu_percent(interval=None)
        self._samplers = {
            "disk_usage": self._disk_usage,
            "cpu_percent": lambda config: psutil.cpu_percent(interval=None),
            "memory_percent": lambda config: psutil.virtual_memory().percent,
            "load": lambda config: os.getloadavg()[0],
            "cpu_temp": lambda config: self._cpu_temp(),
            "network_available": lambda config: network_available(config.get("interface")),
            "process_count": lambda config: len(psutil.pids()),
        }

    def sample(self, config: dict) -> float | bool:
        """The current value of `config["metric"]`: a percentage, the 1-minute load, degrees
        Celsius, a process count, or whether the network is available. Raises
        MetricUnavailable, saying why, when it cannot be measured."""
        metric = config.get("metric")
        sampler = self._samplers.get(metric)
        if sampler is None:
            raise MetricUnavailable(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        try:
            return sampler(config)
        except OSError as exc:
            raise MetricUnavailable(f"cannot measure {metric}: {exc}") from exc

    def _disk_usage(self, config: dict) -> float:
        """Percent used of the file system holding `config["path"]` (default /)."""
        return psutil.disk_usage(self._host(config.get("path") or "/")).percent

    def _cpu_temp(self) -> float:
        """The hottest sensor, in degrees Celsius: the kernel's thermal zones below the root,
        else (only when the root is this machine's /) whatever psutil finds."""
        thermal_dir = self._host("/sys/class/thermal")
        zones = thermal_zone_temperatures(thermal_dir)
        if zones:
            return max(zones)
        looked_at = "no readable /sys/class/thermal/thermal_zone*/temp"
        if self._root_is_this_machine():
            sensors = [reading.current for readings in psutil.sensors_temperatures().values()
                       for reading in readings]
            if sensors:
                return max(sensors)
            looked_at += " and psutil reports none"
        raise MetricUnavailable(f"no temperature sensor: {looked_at}")

    def _root_is_this_machine(self) -> bool:
        return os.path.realpath(self._host("/")) == "/"


def thermal_zone_temperatures(thermal_dir: str) -> list[float]:
    """Degrees Celsius of every `thermal_zone*/temp` in `thermal_dir` that can be read (the
    kernel writes millidegrees); zones that cannot be read or hold no number are left out."""
    temperatures = []
    for path in sorted(glob.glob(os.path.join(glob.escape(thermal_dir), "thermal_zone*", "temp"))):
        try:
            with open(path) as file:
                temperatures.append(int(file.read().strip()) / MILLIDEGREES_PER_DEGREE)
        except (OSError, ValueError):
            continue
    return temperatures


def network_available(interface: str | None) -> bool:
    """Whether `interface` (or, when None, any interface) is up and has an address other than
    loopback or link-local. Loopback never counts: it reaches nothing beyond the device. An
    interface that does not exist is not available."""
    stats = psutil.net_if_stats()
    addresses = psutil.net_if_addrs()
    names = [interface] if interface else list(stats)
    return any(name in stats and stats[name].isup
               and any(_routable(address) for address in addresses.get(name, ()))
               for name in names)


def _routable(address) -> bool:
    """An IPv4 or IPv6 address that is neither loopback nor link-local."""
    if address.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        ip = ipaddress.ip_address(address.address.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local)


@dataclass(frozen=True)
class Threshold:
    """The condition over one sample: it holds while the value is above `above`, below `below`
    or equal to `equals` (every bound that is given)."""

    above: float | None = None
    below: float | None = None
    equals: bool | None = None

    @classmethod
    def from_config(cls, config: dict) -> "Threshold":
        """Raises ValueError when the config gives no bound at all."""
        threshold = cls(config.get("above"), config.get("below"), config.get("equals"))
        if threshold.above is None and threshold.below is None and threshold.equals is None:
            raise ValueError("a condition needs above, below or equals")
        return threshold

    def holds(self, value: float | bool) -> bool:
        return ((self.above is None or value > self.above)
                and (self.below is None or value < self.below)
                and (self.equals is None or value == self.equals))

    def __str__(self) -> str:
        """`above 90`, `below 10`, `equals true`."""
        parts = [(word, bound) for word, bound in
                 (("above", self.above), ("below", self.below), ("equals", self.equals))
                 if bound is not None]
        return " and ".join(f"{word} {value_text(bound)}" for word, bound in parts)


def value_text(value: float | bool) -> str:
    """A metric value or bound as an event carries it: `91.3`, `90`, `true`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return str(round(value, 2))


@dataclass
class Arming:
    """When a holding condition fires, and when it may fire again. Pure: every method takes the
    monotonic time of the sample as an argument.

    The condition fires once it has held in every sample for `hold_seconds`. After a fire it does
    not fire again before `cooldown_seconds` have passed, and a hold counts only from the end of
    the cooldown. With rearm `recover` it fires again only after a sample where the condition did
    not hold; with rearm `cooldown`, a condition that held all along fires again `hold_seconds`
    after the end of the cooldown. A sample that could not be taken restarts the hold."""

    hold_seconds: float = 0.0
    cooldown_seconds: float = 0.0
    rearm: str = "recover"
    holding_since: float | None = None
    """When the current hold started counting; None while the condition does not hold (or
    while a fired condition waits to recover)."""
    cooling_until: float = -math.inf
    fired_at: float | None = None
    awaiting_recovery: bool = False

    def observe(self, now: float, holds: bool) -> bool:
        """Records one sample taken at `now`; True when the trigger fires on it."""
        if not holds:
            self.holding_since = None
            self.awaiting_recovery = False
            return False
        if self.awaiting_recovery:
            return False
        if self.holding_since is None:
            self.holding_since = max(now, self.cooling_until)
        if now - self.holding_since < self.hold_seconds:
            return False
        self._fire(now)
        return True

    def sample_failed(self) -> None:
        """A sample could not be taken: the condition is not known to have held, so the hold
        starts again with the next sample that holds."""
        self.holding_since = None

    def fires_at(self) -> float | None:
        """When the current hold fires if the condition keeps holding; None without one."""
        return None if self.holding_since is None else self.holding_since + self.hold_seconds

    def _fire(self, now: float) -> None:
        self.fired_at = now
        self.cooling_until = now + self.cooldown_seconds
        if self.rearm == "recover":
            self.awaiting_recovery = True
            self.holding_since = None
        else:
            self.holding_since = self.cooling_until


class ConditionSource(Stoppable):
    """Samples one metric every interval on its own thread and emits an event each time the
    condition fires (see `Arming`). A sample that fails shows as status error, never fires, and
    restarts the hold; sampling goes on."""

    def __init__(self, registration: Registration, emit: Emit, metrics):
        super().__init__()
        config = registration.config
        self._name = registration.name
        self._config = config
        self._emit = emit
        self._metrics = metrics
        self._metric = config["metric"]
        self._threshold = Threshold.from_config(config)
        self._interval = float(config.get("intervalSeconds") or DEFAULT_INTERVAL_SECONDS)
        self._arming = Arming(
            hold_seconds=float(config.get("forSeconds") or 0),
            cooldown_seconds=float(config.get("cooldownSeconds") or 0),
            rearm=config.get("rearm") or "recover",
        )
        self.set_status("armed", f"{self._metric} {self._threshold}; first sample at start")

    def start(self) -> None:
        """Starts sampling (the first sample is taken at once); a second call does nothing."""
        self.start_thread(f"trigger-{self._name}")

    def stop(self) -> None:
        """Stops sampling; returns once the thread has ended (within about a second, unless a
        sample itself hangs). Idempotent."""
        self.stop_thread()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception as exc:  # a source never raises out of its thread
                self.set_status("error", f"{type(exc).__name__}: {exc}")
            if self.wait(self._interval):
                return

    def _step(self) -> None:
        """Takes one sample, fires when the condition says so, and shows where it stands."""
        now = time.monotonic()
        try:
            value = self._sample()
        except MetricUnavailable as exc:
            self._arming.sample_failed()
            self.set_status("error", f"{exc}; sampling again every {self._interval:g}s")
            return
        before = replace(self._arming)
        if self._arming.observe(now, self._threshold.holds(value)):
            outcome = self._emit(self._event(value))
            if getattr(outcome, "status", None) == "error":
                # Not queued (a full disk, say, which is what a disk_usage condition is
                # about): it has not fired, and the next sample that holds tries again.
                since = before.holding_since
                self._arming = replace(before, holding_since=max(now, before.cooling_until)
                                       if since is None else since)
                self.set_status("error", f"{self._metric} {self._threshold} held, but its run "
                                f"could not be queued ({outcome.detail}); trying again with the "
                                f"next sample in {self._interval:g}s")
                return
        self.set_status(*self._describe(now, value))

    def _sample(self) -> float | bool:
        """The metric's value; anything that goes wrong while sampling is MetricUnavailable."""
        try:
            value = self._metrics.sample(self._config)
        except MetricUnavailable:
            raise
        except Exception as exc:
            raise MetricUnavailable(f"sampling {self._metric} failed: {exc}") from exc
        if isinstance(value, float) and math.isnan(value):  # no reading: neither held nor recovered
            raise MetricUnavailable(f"sampling {self._metric} gave no number (NaN)")
        return value

    def _event(self, value: float | bool) -> Event:
        data = {"metric": self._metric, "value": value_text(value),
                "threshold": str(self._threshold)}
        if self._metric == "disk_usage":
            data["path"] = self._config.get("path") or "/"
        if self._config.get("interface"):
            data["interface"] = self._config["interface"]
        return Event(data=data)

    def _describe(self, now: float, value: float | bool) -> tuple[str, str]:
        """The status after the sample `value` taken at `now`: (state, detail)."""
        arming = self._arming
        condition = f"{self._metric} {self._threshold}"
        current = f"now {value_text(value)}"
        if arming.awaiting_recovery:
            cooling = (f"; cooling down until {_clock(arming.cooling_until)}"
                       if now < arming.cooling_until else "")
            return ("waiting to recover",
                    f"fired at {_clock(arming.fired_at)}; re-arms once {self._metric} is no longer "
                    f"{self._threshold} ({current}){cooling}")
        if now < arming.cooling_until:
            return "cooling down", f"until {_clock(arming.cooling_until)}; {condition}, {current}"
        if arming.holding_since is not None:
            return ("holding",
                    f"{condition} since {_clock(arming.holding_since)} ({current}); fires at "
                    f"{_clock(arming.fires_at())} if it keeps holding")
        return "armed", f"waiting for {condition} ({current})"


def _clock(moment: float) -> str:
    """A `time.monotonic()` moment as wall-clock UTC, to the second."""
    epoch = time.time() + (moment - time.monotonic())
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def open_source(registration: Registration, emit: Emit, context: Context) -> ConditionSource:
    """Builds the source of a condition trigger without starting it. Samples `context.metrics`
    when given (the daemon's shared source, or a test's), else a new MetricSource over
    `context.host`. Raises ValueError for a config no manifest validation lets through: an
    unknown metric or rearm mode, or no threshold."""
    config = registration.config
    if config.get("metric") not in METRICS:
        raise ValueError(f"metric {config.get('metric')!r} is not one of {', '.join(METRICS)}")
    if (config.get("rearm") or "recover") not in REARM_MODES:
        raise ValueError(f"rearm {config.get('rearm')!r} is not one of {', '.join(REARM_MODES)}")
    metrics = context.metrics if context.metrics is not None else MetricSource(context.host)
    return ConditionSource(registration, emit, metrics)
