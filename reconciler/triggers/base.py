"""What every trigger source shares: its registration, the events it emits, its lifecycle.

A source is built from one `Registration` and an `emit` callable. It watches for its events
on its own thread(s) once `start()` is called, and hands each one to `emit(Event(...))`; the
gate behind `emit` applies the trigger's policy and queues the action. `stop()` ends the
source's threads and releases what it holds (watches, sockets, devices) within about a second;
it is idempotent. A source never raises out of its threads: a problem it can recover from
(a device that went away, a broker that is down) is retried, and shown meanwhile through
`status()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

REGISTRATION_FORMAT = 1
TYPES = ("filesystem", "webhook", "serial", "condition", "mqtt", "continuous")
"""The event sources, in the order docs/triggers.md describes them."""

MAX_EVENT_VALUE = 4096
"""The longest value of an event's `data` entry, in characters; longer ones are cut. Each entry
reaches the action as an environment variable, where size is limited."""


@dataclass(frozen=True)
class Registration:
    """One compiled Trigger, as the reconciler wrote it. `config` is the section of its type
    (`raw[type]`), with durations in seconds and sizes in bytes; device paths in it are
    absolute paths on the device (below the daemon's root)."""

    name: str
    agent: str
    task: str
    type: str
    config: dict
    enabled: bool = True
    debounce_seconds: float = 0.0
    rate_limit: tuple[int, float] | None = None
    """At most `count` fires per `interval` seconds."""
    concurrency: str | None = None
    """Allow, Forbid, Replace or Queue; None leaves it to the task's own."""
    raw: dict = field(default_factory=dict, compare=False)
    digest: str = ""
    """Of the registration file's content: a reload restarts only triggers whose digest changed."""

    @classmethod
    def from_json(cls, raw: dict, digest: str = "") -> "Registration":
        """Raises ValueError naming what is wrong with a registration file."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != REGISTRATION_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}; this daemon reads format {REGISTRATION_FORMAT}")
        kind = raw.get("type")
        if kind not in TYPES:
            raise ValueError(f"type {kind!r} is not one of {', '.join(TYPES)}")
        if not isinstance(raw.get(kind), dict):
            raise ValueError(f"no {kind!r} section")
        for key in ("name", "agent", "task"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ValueError(f"{key!r} is missing")
        policy = raw.get("policy") or {}
        if not isinstance(policy, dict):
            raise ValueError("'policy' is not an object")
        limit = policy.get("rateLimit")
        if limit is not None and not isinstance(limit, dict):
            raise ValueError("'policy.rateLimit' is not an object")
        debounce = policy.get("debounceSeconds") or 0
        if not _number(debounce) or debounce < 0:
            raise ValueError(f"'policy.debounceSeconds' must be a number of seconds, got {debounce!r}")
        if limit:
            count, interval = limit.get("count"), limit.get("intervalSeconds")
            if not _number(count) or not float(count).is_integer() or count < 1:
                raise ValueError(f"'policy.rateLimit.count' must be a whole number from 1, got {count!r}")
            if not _number(interval) or interval < 0:
                raise ValueError(f"'policy.rateLimit.intervalSeconds' must be a number of seconds, "
                                 f"got {interval!r}")
        concurrency = policy.get("concurrency")
        if concurrency is not None and concurrency not in ("Allow", "Forbid", "Replace", "Queue"):
            raise ValueError(f"'policy.concurrency' must be Allow, Forbid, Replace or Queue, got {concurrency!r}")
        return cls(
            name=raw["name"], agent=raw["agent"], task=raw["task"], type=kind, config=raw[kind],
            enabled=bool(raw.get("enabled", True)),
            debounce_seconds=float(debounce),
            rate_limit=(int(limit["count"]), float(limit["intervalSeconds"])) if limit else None,
            concurrency=concurrency,
            raw=raw, digest=digest,
        )


def _number(value) -> bool:
    """A finite number (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            and value not in (float("inf"), float("-inf")))


@dataclass
class Event:
    """One thing that happened. `data` is small (strings only: each entry reaches the action as
    `SPOS_EVENT_<KEY>` and in the events file, see docs/triggers.md); `payload` is the bytes
    the action reads from the file `SPOS_PAYLOAD` names (a webhook body, a serial line, an MQTT
    message). `delivery` is an id the sender gives the event: one seen before is acknowledged
    but not queued twice."""

    data: dict[str, str]
    payload: bytes | None = None
    delivery: str | None = None

    def __post_init__(self):
        self.data = {str(k): str(v)[:MAX_EVENT_VALUE] for k, v in self.data.items()}


@dataclass(frozen=True)
class Outcome:
    """What became of one event. `status` is one of:
    queued (a run was queued: `run` is its id), debounced (held to be coalesced with the events
    that follow; queued when the debounce window closes), duplicate (its delivery id was seen
    before), limited (over the trigger's rate limit), skipped (concurrency Forbid or a
    continuous trigger: a run it queued is still queued or running), disabled (the trigger is
    registered with enabled: false), error (the run could not be queued: `detail` says why)."""

    status: str
    run: str | None = None
    detail: str = ""


Emit = Callable[[Event], Outcome]
"""Hands one event to the trigger's gate and returns what became of it. Thread-safe; blocks
only as long as writing one queue file takes."""


@dataclass(frozen=True)
class Status:
    """What `spos trigger list` shows of a source: `state` is armed, cooling down, waiting
    (for a device, a broker, a path to appear) or error; `detail` says why, in words."""

    state: str = "armed"
    detail: str = ""


class Source(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> Status: ...


class Stoppable:
    """A helper for sources built on a thread of their own: `start_thread` and `stop_thread`
    run and end it, `stopping` is set by the latter, and `wait(seconds)` sleeps that long or
    until stopped (True when stopped)."""

    def __init__(self):
        self.stopping = threading.Event()
        self.changed: Callable[[], None] = lambda: None
        """Called after the status changed (the daemon then writes it out)."""
        self._status = Status()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start_thread(self, name: str) -> None:
        """Run `self._run` on a daemon thread of its own; only the first call (before any
        stop) starts one."""
        if self._thread is not None or self.stopping.is_set():
            return
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop_thread(self, timeout: float = 1.0) -> None:
        """Set `stopping` and wait up to `timeout` for the thread to end (not when called from
        the thread itself). Idempotent."""
        self.stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait(self, seconds: float) -> bool:
        return self.stopping.wait(max(0.0, seconds))

    def set_status(self, state: str, detail: str = "") -> None:
        status = Status(state, detail)
        with self._lock:
            same, self._status = self._status == status, status
        if not same:
            self.changed()

    def status(self) -> Status:
        with self._lock:
            return self._status


@dataclass
class Context:
    """What the daemon hands every source besides its registration.

    - `host(device_path)`: the path on this machine of a device path (the daemon's `--root`
      stands in for `/`); a source opens files, devices and watches through it.
    - `listener`: the daemon's shared HTTP listener (webhook.Listener), for webhook sources.
    - `metrics`: where condition sources sample (condition.MetricSource); tests inject one.
    - `pending(name)`: whether a run the trigger `name` queued is still queued or running
      (continuous sources never overlap themselves).
    """

    host: Callable[[str], str]
    listener: Any = None
    metrics: Any = None
    pending: Callable[[str], bool] = lambda name: False
