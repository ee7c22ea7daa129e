"""The policy between a trigger's events and the queue, the same for every kind of source.

In order, an event is:
1. dropped when the trigger is registered with `enabled: false` (disabled);
2. acknowledged but not queued when its delivery id was seen before (duplicate);
3. held when the trigger has a `debounce`: the first event opens a window of that length, every
   event until it closes joins it, and the window's events are queued as one run (debounced);
4. dropped when the trigger already queued `count` runs in the last `interval` (limited);
5. dropped when the trigger's concurrency is Forbid, or it is a continuous trigger, and a run
   it queued is still queued or running (skipped);
6. queued: one run, with the events and the last event's payload attached (queued), or not,
   when the queue cannot be written (error).

Concurrency Allow, Replace and Queue are the executor's to carry out: the run's record carries
the trigger's choice. Counts of each outcome, and when the trigger last fired, are kept for
`spos trigger list`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from reconciler import AGENTS_DIR, STATE_DIR
from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.executor.enqueue import enqueue
from reconciler.triggers.base import Event, Outcome, Registration

SEEN_DELIVERIES = 4096
"""Delivery ids remembered per trigger (the most recent ones), across restarts."""
MAX_COALESCED = 1000
"""Events of one debounce window listed in the run's events file; later ones are counted."""
OUTCOMES = ("queued", "debounced", "duplicate", "limited", "skipped", "disabled", "error")


@dataclass
class Counts:
    """What `spos trigger list` shows of a trigger's history since the daemon started."""

    events: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    last_event: float | None = None
    last_fired: float | None = None
    last_run: str | None = None
    last_error: str = ""

    def as_json(self) -> dict:
        return {
            "events": self.events,
            **self.outcomes,
            "lastEvent": _iso(self.last_event),
            "lastFired": _iso(self.last_fired),
            "lastRun": self.last_run,
            "lastError": self.last_error,
        }


class Gate:
    """One trigger's policy; `__call__` is the `emit` its source is given. Thread-safe."""

    def __init__(self, device: Device, registration: Registration):
        self.device = device
        self.registration = registration
        self.counts = Counts()
        self._lock = threading.RLock()
        self._window: list[Event] = []
        self._window_count = 0
        self._timer: threading.Timer | None = None
        self._fired: deque[float] = deque()
        self._seen = _DeliveryLog(device, registration.name)
        self._mine: dict[str, str | None] = {}  # queue file name -> run id when this trigger's
        self._closed = False
        self.changed: Callable[[], None] = lambda: None
        """Called after the counts or the debounce window changed (the daemon writes them out)."""

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            if self._closed:  # a reload or shutdown closed it; the sender should try again
                outcome = self._count(Outcome("error", detail="the trigger is being restarted"))
            else:
                self.counts.events += 1
                self.counts.last_event = time.time()
                outcome = self._count(self._admit(event))
        self.changed()
        return outcome

    def _admit(self, event: Event) -> Outcome:
        registration = self.registration
        if not registration.enabled:
            return Outcome("disabled")
        if event.delivery and not self._seen.add(event.delivery):
            return Outcome("duplicate", detail=f"delivery {event.delivery} was seen before")
        if registration.debounce_seconds > 0:
            self._window_count += 1
            if self._window and self._window[-1].payload is not None:
                # only the last event's payload is handed on: hold no other
                self._window[-1] = Event(self._window[-1].data, None, self._window[-1].delivery)
            if len(self._window) < MAX_COALESCED:
                self._window.append(event)
            else:
                self._window[-1] = event  # the last event is the one the run is told about
            if self._timer is None and not self._closed:
                self._timer = threading.Timer(registration.debounce_seconds, self._close_window)
                self._timer.daemon = True
                self._timer.start()
            return Outcome("debounced")
        outcome = self._fire([event], 1)
        if outcome.status == "error" and event.delivery:
            self._seen.forget(event.delivery)  # the sender retries it; that is not a duplicate
        return outcome

    def _close_window(self) -> None:
        with self._lock:
            events, count = self._window, self._window_count
            self._window, self._window_count, self._timer = [], 0, None
            if events and not self._closed:
                self._count(self._fire(events, count))
        self.changed()

    def _fire(self, events: list[Event], count: int) -> Outcome:
        registration, now = self.registration, time.monotonic()
        if registration.rate_limit is not None:
            limit, interval = registration.rate_limit
            while self._fired and self._fired[0] <= now - interval:
                self._fired.popleft()
            if len(self._fired) >= limit:
                return Outcome("limited", detail=f"{limit} runs in the last {interval:g}s already")
        if registration.concurrency == "Forbid" or registration.type == "continuous":
            busy = self.pending()
            if busy:
                return Outcome("skipped", detail=f"run {busy} it queued has not ended")
        try:
            record = self._enqueue(events, count)
        except (SposError, OSError, ValueError) as exc:
            self.counts.last_error = f"could not queue a run: {exc}"
            return Outcome("error", detail=self.counts.last_error)
        self._fired.append(now)
        self.counts.last_fired, self.counts.last_run = time.time(), record["id"]
        return Outcome("queued", run=record["id"])

    def _enqueue(self, events: list[Event], count: int) -> dict:
        source, attachments = self.compose(events, count)
        return enqueue(self.device, self.registration.agent, self.registration.task, source=source,
                       concurrency=self.registration.concurrency, attachments=attachments)

    def compose(self, events: list[Event], count: int) -> tuple[dict, dict[str, bytes]]:
        """The queued run's `source` and the files attached to it, for these events."""
        registration, last = self.registration, events[-1]
        source = {
            "kind": "trigger",
            "trigger": registration.name,
            "type": registration.type,
            "event": last.data,
            "events": count,
        }
        if last.delivery:
            source["delivery"] = last.delivery
        listed = {
            "trigger": registration.name,
            "type": registration.type,
            "count": count,
            "events": [event.data for event in events],
        }
        attachments = {"events.json": (json.dumps(listed, indent=2) + "\n").encode()}
        if last.payload is not None:
            attachments["payload"] = last.payload
        return source, attachments

    def _count(self, outcome: Outcome) -> Outcome:
        self.counts.outcomes[outcome.status] += 1
        return outcome

    # -- runs this trigger queued -----------------------------------------------------------

    def pending(self) -> str | None:
        """The id of a run this trigger queued that is still queued or running, if any: one
        queued by this gate, or found in queue/ or active/ with this trigger as its source
        (queued before a restart, or by `spos trigger test`)."""
        with self._lock:
            agent, live, listed = self.registration.agent, [], set()
            for bucket in ("queue", "active"):
                directory = f"{AGENTS_DIR}/{agent}/{bucket}"
                for name in self.device.listdir(directory):
                    listed.add(name)
                    run = self._owner(directory, name)
                    if run is not None:
                        live.append(run)
            self._mine = {name: run for name, run in self._mine.items() if name in listed}
            return live[-1] if live else None

    def _owner(self, directory: str, name: str) -> str | None:
        """The run id in file `name` when this trigger queued it. Each file is read once: a
        run's file keeps its name from queue/ to active/."""
        if name not in self._mine:
            run = None
            if name.endswith(".json"):
                try:
                    record = json.loads(self.device.read_text(f"{directory}/{name}") or "{}")
                except (ValueError, SposError, OSError):
                    record = {}
                source = record.get("source") if isinstance(record, dict) else None
                if isinstance(source, dict) and source.get("kind") == "trigger" \
                        and source.get("trigger") == self.registration.name:
                    run = record.get("id")
            self._mine[name] = run
        return self._mine[name]

    # -- lifecycle --------------------------------------------------------------------------

    def close(self, flush: bool = True) -> None:
        """Stop taking events. With `flush`, an open debounce window is queued now rather than
        lost (a trigger changed by a reload, the daemon stopping)."""
        with self._lock:
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            if flush and self._window:
                events, count = self._window, self._window_count
                self._window, self._window_count = [], 0
                self._count(self._fire(events, count))
            self._closed = True
            self._seen.close()

    def debouncing(self) -> int:
        """How many events the open debounce window holds (0: none open)."""
        with self._lock:
            return self._window_count


class _DeliveryLog:
    """The delivery ids a trigger has seen, most recent last, kept in memory and appended to
    `triggerd/deliveries/<name>` in the state directory (`+id` seen, `-id` forgotten again),
    so that a restarted daemon still knows them. The file is rewritten with the last
    SEEN_DELIVERIES ids when it loads and whenever it has grown to twice that."""

    def __init__(self, device: Device, name: str):
        self.device = device
        self.path = f"/{STATE_DIR}/triggerd/deliveries/{name}"
        self.ids: OrderedDict[str, None] = OrderedDict()
        self._file = None
        self._loaded = False
        self._lines = 0

    def add(self, delivery: str) -> bool:
        """False when `delivery` was seen before; otherwise remembers it."""
        self._load()
        delivery = _one_line(delivery)
        if delivery in self.ids:
            self.ids.move_to_end(delivery)
            return False
        self.ids[delivery] = None
        while len(self.ids) > SEEN_DELIVERIES:
            self.ids.popitem(last=False)
        self._append("+", delivery)
        return True

    def forget(self, delivery: str) -> None:
        """`delivery` was not queued after all: a retry of it is not a duplicate."""
        self._load()
        delivery = _one_line(delivery)
        if self.ids.pop(delivery, False) is None:
            self._append("-", delivery)

    def _append(self, sign: str, delivery: str) -> None:
        if self._lines >= 2 * SEEN_DELIVERIES:
            self._rewrite()
        elif self._file is not None:
            try:
                self._file.write(sign + delivery + "\n")
                self._file.flush()
                self._lines += 1
            except OSError:
                pass  # remembered in memory still; only a restart would forget it

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        text = self.device.read_text(self.path) or ""
        for line in text.split("\n"):
            if line.startswith("+"):
                self.ids[line[1:]] = None
                self.ids.move_to_end(line[1:])
            elif line.startswith("-"):
                self.ids.pop(line[1:], None)
        while len(self.ids) > SEEN_DELIVERIES:
            self.ids.popitem(last=False)
        self._rewrite()

    def _rewrite(self) -> None:
        self.close()
        try:
            self.device.makedirs(self.path.rsplit("/", 1)[0], mode=0o700)
            self.device.write_atomic(self.path, "".join(f"+{i}\n" for i in self.ids).encode(), mode=0o600)
            self._file = open(self.device.host(self.path), "a", encoding="utf-8")
            self._lines = len(self.ids)
        except OSError:
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


MAX_DELIVERY_ID = 200
"""Longer delivery ids are kept as their SHA-256, so the log stays small whatever is sent."""


def _one_line(delivery: str) -> str:
    """The id as the log keeps it: on one line (the log is split at newlines only), and
    short."""
    if len(delivery) > MAX_DELIVERY_ID:
        return "sha256:" + hashlib.sha256(delivery.encode("utf-8", "surrogateescape")).hexdigest()
    return delivery.replace("\n", " ").replace("\r", " ")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
