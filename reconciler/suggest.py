"""`spos schedule suggest`: quieter cron times for the Schedules of flexible tasks, as a diff
the operator can commit.

A task marked `flexible: true` may run at another time than the one written, and which time is
quieter can only be told from this device's past: the load samples `spos daemon` takes
(loadlog.py) say how busy each hour was, the finished runs say how long each task takes and how
much of that load was its own. Nothing is changed: the result is a unified diff of the manifests
that rewrites `cron:` values and nothing else.

How a time is chosen (docs/suggest.md says it for operators):

- The day is cut in hours, in the zone the Schedule is read in. An hour's load is the mean CPU
  percent of the samples taken in it. A Schedule that fires on some weekdays only is judged on
  those days' hours once a week of samples is there.
- A task's own runs (their attempts' CPU seconds, spread over their start to end) are taken
  out of the hours they ran in, so that it is not moved away from itself; where it is moved to,
  its p50 runtime and CPU are put in at each new fire, so that the next task sees it there.
  Tasks whose runs take the most CPU choose first.
- A fire's window is its p95 runtime from its start. The quietest window wins: least CPU, then
  least 1-minute load, then the smallest move. A move must gain MIN_GAIN_PERCENT of CPU.
- Only the hours and the minute move. A daily job stays daily, one every 6 hours keeps its
  period (its hours move together), the day fields are kept as written. An hourly job can
  change its minute only; one that fires several times an hour is left alone.
- The minute is the one farthest (up to SPREAD_MINUTES) from the fires of every other cron
  Schedule, then the nearest to its current minute: tasks moved to one hour do not start
  together.

`propose` returns (docs/suggest.md has it field by field):

    {
      "now": ISO 8601, UTC,
      "localZone": the zone of Schedules without timeZone, and of "hours",
      "samples": {"count", "from", "to", "coveredSeconds", "intervalSeconds", "cpus"},
      "runs": how many finished runs were read,
      "reason": why nothing could be proposed at all, or null,
      "hours": [{"hour", "samples", "cpuPercent", "load1", "memoryPercent", "runsCpuPercent"}],
      "quietHours": [hour, ...],
      "suggestions": [{"schedule", "agent", "task", "file", "line", "timeZone", "from", "to",
                       "reason", "expected": {"runtimeP95Seconds", "runs",
                                              "cpuPercent": {"now", "proposed"},
                                              "load1": {"now", "proposed"}}}],
      "unchanged": [{"schedule", "agent", "task", "reason"}],
      "diff": the unified diff, "" when nothing is proposed
    }

`text` renders that dict, and nothing else.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

from reconciler import cronexpr, forecast, loadlog
from reconciler.device import Device
from reconciler.executor import estimate
from reconciler.executor.runs import RunStore
from reconciler.manifest import Manifest
from reconciler.numbers import amount
from reconciler.source import locate
from reconciler.validate import load

MIN_COVERED_SECONDS = 86400.0
"""Samples must cover a day before any hour can be called quiet."""
WEEK_COVERED_SECONDS = 7 * 86400.0
"""From a week of samples on, a Schedule of some weekdays is judged on those days' hours."""
MIN_HOUR_SAMPLES = 3
"""An hour with fewer samples (a quarter of an hour seen) is unknown: no window may touch it."""
MIN_GAIN_PERCENT = 5.0
"""Points of device CPU a move must gain; less is not worth a change to commit."""
SPREAD_MINUTES = 5
"""A start this many minutes from every other Schedule's fire is far enough."""
QUIET_HOURS = 4
"""How many of the quietest hours are named."""
QUARTER_HOUR = 900
"""Every zone's offset is a multiple of it: a run is cut at these to be put in local hours."""
WIDTH = 100


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Attempt:
    """CPU a run used (or will use), spread evenly from its start to its end (epoch seconds)."""

    start: float
    end: float
    cpu_seconds: float


@dataclass
class _Schedule:
    manifest: Manifest
    agent: str
    task: str
    spec: dict
    flexible: bool
    zone: tzinfo
    records: list[dict]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def expression(self) -> str | None:
        return self.spec["cron"].strip() if "cron" in self.spec else None

    def fields(self) -> list[str]:
        return cronexpr.MACROS.get(self.expression, self.expression).split()


def propose(device: Device, path: str, agent: str | None = None, now: datetime | None = None,
            zone: tzinfo | str | None = None) -> dict:
    """The proposal for the Schedules in the manifests at `path` (only `agent`'s, when given),
    from `device`'s load samples and finished runs: the dict the module docstring describes.
    `now` defaults to the current time, `zone` (of Schedules without timeZone) to this
    machine's. Raises ManifestError when the manifests are invalid."""
    manifests = load(path, None)  # what the Schedules say; policies change no fire time
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    local = ZoneInfo(zone) if isinstance(zone, str) else (zone or forecast.local_zone())
    history = _History(loadlog.read(device, since=now.timestamp() - loadlog.KEEP_SECONDS,
                                    until=now.timestamp()))
    records = _finished_records(device)
    schedules = _schedules(manifests, records, local)
    lacking = history.lacking()
    outcomes = {} if lacking else _Placer(history, schedules, now).place_all()
    shown = [s for s in schedules if agent is None or s.agent == agent]
    reason = lacking or _no_flexible(shown, agent)
    suggestions, unchanged = _entries(shown, outcomes, reason)
    return {
        "now": now.isoformat(timespec="seconds"),
        "localZone": _zone_name(local),
        "samples": history.to_json(),
        "runs": sum(map(len, records.values())),
        "reason": reason,
        **_day(history, local, records, known=not lacking),
        "suggestions": suggestions,
        "unchanged": unchanged,
        "diff": _diff(suggestions, shown),
    }


def text(result: dict) -> str:
    """What `spos schedule suggest` prints: the history it rests on, the quietest hours, one
    block per suggestion, the Schedules left alone, then the diff."""
    lines = _wrap(_history_line(result))
    if result["quietHours"]:
        hours = {entry["hour"]: entry for entry in result["hours"]}
        quiet = ", ".join(f"{hour:02d}:00 {hours[hour]['cpuPercent']:.0f}%"
                          for hour in result["quietHours"])
        lines += _wrap(f"Quietest hours ({result['localZone']}, CPU in use): {quiet}.")
    for entry in result["suggestions"]:
        lines += ["", f"{entry['schedule']} ({entry['agent']}/{entry['task']}), "
                      f"{entry['file']}:{entry['line']}",
                  f"  {entry['from']}  ->  {entry['to']}"
                  + (f"  ({entry['timeZone']})" if entry["timeZone"] else "")]
        lines += _wrap(entry["reason"], indent="  ")
    if result["unchanged"]:
        lines += ["", "Left alone:"]
        for entry in result["unchanged"]:
            lines += _wrap(f"{entry['schedule']}: {entry['reason']}", indent="  ",
                           then="      ")
    if not result["suggestions"]:
        why = result["reason"] or "no Schedule would be quieter at another time (see above)"
        lines += [""] + _wrap(f"No changes proposed: {why}.")
        return "\n".join(lines) + "\n"
    lines += ["", "Apply with `git apply` at the top of the repository, then commit:", ""]
    return "\n".join(lines) + "\n" + result["diff"]


def _finished_records(device: Device) -> dict[tuple[str, str], list[dict]]:
    """(agent, task) -> the records of its runs in completed/ and failed/."""
    found: dict[tuple[str, str], list[dict]] = {}
    for run in RunStore(device).runs(buckets=("completed", "failed")):
        found.setdefault((run.agent, run.record["task"]), []).append(run.record)
    return found


def _schedules(manifests, records: dict, local: tzinfo) -> list[_Schedule]:
    agents = manifests.of_kind("Agent")
    found = []
    for name, manifest in sorted(manifests.of_kind("Schedule").items()):
        spec = manifest.spec
        tasks = agents[spec["agent"]].spec.get("tasks") or {}
        task = tasks.get(spec["task"]) or {}
        zone = ZoneInfo(spec["timeZone"]) if spec.get("timeZone") else local
        found.append(_Schedule(manifest, spec["agent"], spec["task"], spec,
                               bool(task.get("flexible")), zone,
                               records.get((spec["agent"], spec["task"]), [])))
    return found


def _attempts(record: dict) -> list[_Attempt]:
    """The attempts of a finished run that recorded their CPU time (a believable amount),
    start and end."""
    found = []
    for attempt in record.get("attempts") or ():
        usage = attempt.get("usage") if isinstance(attempt, dict) else None
        cpu = amount(usage.get("cpuSeconds")) if isinstance(usage, dict) else None
        start, end = _epoch(attempt.get("startedAt")), _epoch(attempt.get("endedAt"))
        if cpu is not None and start is not None and end is not None and end >= start:
            found.append(_Attempt(start, end, cpu))
    return found


def _no_flexible(schedules: list[_Schedule], agent: str | None) -> str | None:
    if any(s.flexible and s.expression for s in schedules):
        return None
    of = f" of agent {agent}" if agent else ""
    return (f"no cron Schedule{of} starts a flexible task; mark a task `flexible: true` in its "
            "Agent to let spos propose another time for it")


# ---------------------------------------------------------------- load per hour


@dataclass
class _Profile:
    """The device's load per hour of the day (24) or of the week (168, Sunday first), in one
    zone, from the samples taken in each hour."""

    zone: tzinfo
    weekly: bool
    samples: list[int]
    cpu: list[float]
    load: list[float]
    memory: list[float]

    @property
    def hours(self) -> int:
        return len(self.samples)

    def bucket(self, epoch: float) -> int:
        local = datetime.fromtimestamp(epoch, self.zone)
        return local.hour + (24 * (local.isoweekday() % 7) if self.weekly else 0)


class _History:
    """The samples of the last loadlog.KEEP_SECONDS: profiles in any zone, and the share of
    the device's CPU that runs took in each hour."""

    def __init__(self, samples: list[loadlog.Sample]):
        self.samples = samples
        self.interval = loadlog.INTERVAL_SECONDS
        self.cpus = samples[-1].cpus if samples else 1
        self.start = samples[0].at - self.interval if samples else 0.0
        self.end = samples[-1].at if samples else 0.0
        self._profiles: dict[tuple[tzinfo, bool], _Profile] = {}

    @property
    def covered(self) -> float:
        return self.end - self.start if self.samples else 0.0

    def lacking(self) -> str | None:
        """Why the samples are too few to tell a quiet hour, or None."""
        if not self.samples:
            return (f"no load samples yet: `spos daemon` takes one every "
                    f"{_span(self.interval)} into {loadlog.SAMPLES_FILE}; suggest again once "
                    "it has run for a day")
        if self.covered < MIN_COVERED_SECONDS:
            return (f"not enough load history: the samples cover {_span(self.covered)} of the "
                    f"{_span(MIN_COVERED_SECONDS)} needed; suggest again once `spos daemon` has "
                    "sampled the load for a day")
        return None

    def profile(self, zone: tzinfo, weekly: bool) -> _Profile:
        key = (zone, weekly)
        if key not in self._profiles:
            self._profiles[key] = self._measure(zone, weekly)
        return self._profiles[key]

    def _measure(self, zone: tzinfo, weekly: bool) -> _Profile:
        hours = 168 if weekly else 24
        profile = _Profile(zone, weekly, [0] * hours, [0.0] * hours, [0.0] * hours, [0.0] * hours)
        for sample in self.samples:
            hour = profile.bucket(sample.at - self.interval / 2)  # it covers the interval before
            profile.samples[hour] += 1
            profile.cpu[hour] += sample.cpu_percent
            profile.load[hour] += sample.load1
            profile.memory[hour] += sample.memory_percent
        for hour, count in enumerate(profile.samples):
            for values in (profile.cpu, profile.load, profile.memory):
                values[hour] = values[hour] / count if count else 0.0
        return profile

    def share(self, profile: _Profile, weighted: list[tuple[_Attempt, float]]) -> list[float]:
        """Per hour of `profile`: the percent of the device's CPU the attempts took (weight 1)
        or that is taken out (weight -1), within the sampled time."""
        seconds = [0.0] * profile.hours
        for attempt, weight in weighted:
            for moment, cpu in self._pieces(attempt):
                seconds[profile.bucket(moment)] += weight * cpu
        return [100 * spent / (count * self.interval * self.cpus) if count else 0.0
                for spent, count in zip(seconds, profile.samples)]

    def _pieces(self, attempt: _Attempt):
        """(moment, CPU seconds) of each quarter hour of the attempt within the samples."""
        start, end = max(attempt.start, self.start), min(attempt.end, self.end)
        if attempt.end <= attempt.start:
            if self.start <= attempt.start <= self.end:
                yield attempt.start, attempt.cpu_seconds
            return
        rate = attempt.cpu_seconds / (attempt.end - attempt.start)
        while start < end:
            cut = min(end, (math.floor(start / QUARTER_HOUR) + 1) * QUARTER_HOUR)
            yield start, rate * (cut - start)
            start = cut

    def to_json(self) -> dict:
        return {
            "count": len(self.samples),
            "from": _iso(self.start) if self.samples else None,
            "to": _iso(self.end) if self.samples else None,
            "coveredSeconds": round(self.covered),
            "intervalSeconds": self.interval,
            "cpus": self.cpus if self.samples else None,
        }


def _day(history: _History, local: tzinfo, records: dict, known: bool) -> dict:
    """"hours" and "quietHours" in the device's zone; empty without enough history."""
    if not known:
        return {"hours": [], "quietHours": []}
    profile = history.profile(local, weekly=False)
    attempts = [(a, 1.0) for runs in records.values() for record in runs for a in _attempts(record)]
    return {"hours": _hours(profile, history.share(profile, attempts)),
            "quietHours": _quiet_hours(profile)}


def _hours(profile: _Profile, runs: list[float]) -> list[dict]:
    return [{
        "hour": hour,
        "samples": profile.samples[hour],
        "cpuPercent": _round(profile.cpu[hour]) if profile.samples[hour] else None,
        "load1": round(profile.load[hour], 2) if profile.samples[hour] else None,
        "memoryPercent": _round(profile.memory[hour]) if profile.samples[hour] else None,
        "runsCpuPercent": _round(runs[hour]) if profile.samples[hour] else None,
    } for hour in range(profile.hours)]


def _quiet_hours(profile: _Profile) -> list[int]:
    known = [hour for hour in range(profile.hours) if profile.samples[hour] >= MIN_HOUR_SAMPLES]
    return sorted(known, key=lambda hour: (round(profile.cpu[hour], 1), profile.load[hour],
                                           hour))[:QUIET_HOURS]


# ---------------------------------------------------------------- placing


@dataclass(frozen=True)
class _Times:
    """When a Schedule fires within a day: its hours and minutes, in its zone."""

    hours: tuple[int, ...]
    minutes: tuple[int, ...]

    def starts(self, weekdays: tuple[int, ...] | None) -> list[int]:
        """Minutes from the start of the profile's cycle (the day, or Sunday 00:00)."""
        day = [hour * 60 + minute for hour in self.hours for minute in self.minutes]
        if weekdays is None:
            return day
        return [weekday * 1440 + start for weekday in weekdays for start in day]


@dataclass
class _Window:
    """The load a Schedule's runs meet at some times."""

    times: _Times
    cpu: float
    load: float
    shift: int


@dataclass
class _Outcome:
    """What became of one Schedule: a new expression, or the reason it keeps its own."""

    reason: str
    to: str | None = None
    expected: dict = field(default_factory=dict)


class _Placer:
    """Chooses new times for the flexible Schedules one after the other; each choice is seen by
    the next (the load it moves, the minutes it takes)."""

    def __init__(self, history: _History, schedules: list[_Schedule], now: datetime):
        self.history, self.schedules, self.now = history, schedules, now
        self.moved: list[tuple[_Attempt, float]] = []
        self.taken: dict[str, set[int]] = {
            s.name: _utc_minutes(s, _times(s), now) for s in schedules if _has_times(s)}

    def place_all(self) -> dict[str, _Outcome]:
        outcomes = {}
        for schedule in sorted(self.schedules, key=_heaviest_first):
            outcomes[schedule.name] = self.place(schedule)
        return outcomes

    def place(self, schedule: _Schedule) -> _Outcome:
        held = _held(schedule)
        if held:
            return _Outcome(held)
        found = estimate.estimate(schedule.records)
        if found is None:
            completed = len(estimate.completed_runs(schedule.records))
            return _Outcome(f"not enough run history to know how long it takes: {completed} "
                            f"completed run{'' if completed == 1 else 's'}, "
                            f"{estimate.MIN_RUNS} needed")
        outcome = self._choose(schedule, found)
        if outcome.to is not None:
            self._take(schedule, outcome.to, found)
        return outcome

    def _choose(self, schedule: _Schedule, found: dict) -> _Outcome:
        current = _times(schedule)
        if len(current.hours) == 24:
            return self._choose_minute(schedule, current, found)
        weekdays = _weekdays(schedule, self.history)
        profile = self.history.profile(schedule.zone, weekly=weekdays is not None)
        own = [(attempt, -1.0) for record in schedule.records for attempt in _attempts(record)]
        share = self.history.share(profile, own + self.moved)
        value = [max(cpu + extra, 0.0) for cpu, extra in zip(profile.cpu, share)]
        minutes = math.ceil(min(found["p95Seconds"], 86400) / 60) or 1
        windows = self._windows(schedule, current, profile, value, weekdays, minutes)
        before = _window(current, 0, profile, value, weekdays, minutes)
        best = min(windows, key=lambda w: (round(w.cpu, 1), round(w.load, 2), w.shift,
                                           w.times.hours), default=None)
        return _judge(schedule, found, before, best)

    def _windows(self, schedule: _Schedule, current: _Times, profile: _Profile,
                 value: list[float], weekdays, minutes: int) -> list[_Window]:
        distance = _distances(self._others(schedule))
        found, seen = [], set()
        for shift in range(24):
            hours = tuple(sorted((hour + shift) % 24 for hour in current.hours))
            if hours in seen:
                continue
            seen.add(hours)
            times = _Times(hours, (_spread_minute(hours, current.minutes[0], distance),))
            window = _window(times, min(shift, 24 - shift), profile, value, weekdays, minutes)
            if window is not None:
                found.append(window)
        return found

    def _choose_minute(self, schedule: _Schedule, current: _Times, found: dict) -> _Outcome:
        distance = _distances(self._others(schedule))
        minute = current.minutes[0]
        best = _spread_minute(current.hours, minute, distance)
        now_apart, best_apart = (min(distance[h * 60 + m] for h in current.hours)
                                 for m in (minute, best))
        if now_apart >= SPREAD_MINUTES or best_apart <= now_apart:
            return _Outcome(f"it fires every hour, so only its minute could move, and no minute "
                            f"is farther from other Schedules' fires than :{minute:02d} "
                            f"({_apart(now_apart)})")
        near = ", ".join(self._near(schedule, current, now_apart))
        crowded = (f"also the minute of {near}" if now_apart == 0
                   else f"{now_apart} minute{'' if now_apart == 1 else 's'} from {near}")
        return _Outcome(
            f"it fires every hour, so only its minute moves: :{minute:02d} is {crowded}; "
            f":{best:02d} is {_apart(best_apart)}",
            to=_expression(schedule, _Times(current.hours, (best,))),
            expected=_expected(found, None, None))

    def _others(self, schedule: _Schedule) -> set[int]:
        """The minutes of the day, in `schedule`'s zone, at which other cron Schedules fire."""
        offset = _offset_minutes(schedule.zone, self.now)
        return {(minute + offset) % 1440 for name, taken in self.taken.items()
                if name != schedule.name for minute in taken}

    def _near(self, schedule: _Schedule, current: _Times, apart: int) -> list[str]:
        mine = _utc_minutes(schedule, current, self.now)
        return sorted(name for name, taken in self.taken.items() if name != schedule.name
                      and any(_circular(a, b) <= apart for a in mine for b in taken))

    def _take(self, schedule: _Schedule, expression: str, found: dict) -> None:
        """Move the load and the minutes of `schedule` to its new `expression`."""
        moved = cronexpr.parse(expression)
        times = _Times(tuple(sorted(moved.hours)), tuple(sorted(moved.minutes)))
        self.taken[schedule.name] = _utc_minutes(schedule, times, self.now)
        self.moved += [(attempt, -1.0) for record in schedule.records
                       for attempt in _attempts(record)]
        cpu = found["p50CpuSeconds"] or 0.0
        for fire in _fires(moved, schedule.zone, self.history.start, self.history.end):
            self.moved.append((_Attempt(fire, fire + found["p50Seconds"], cpu), 1.0))


def _held(schedule: _Schedule) -> str | None:
    """Why `schedule` is not one to move, whatever the load says; None when it may move."""
    if not schedule.flexible:
        return f"its task {schedule.task} is not flexible"
    if schedule.expression is None:
        return ("a timer Schedule: only cron expressions are proposed; move its onCalendar by "
                "hand, or spread it with randomizedDelaySec")
    if schedule.spec.get("suspend"):
        return "suspended: it starts nothing"
    if schedule.expression == cronexpr.REBOOT:
        return "it fires at boot, not at a time of day"
    closest = cronexpr.parse(schedule.expression).min_interval_minutes()
    if closest < 60:
        return (f"it fires more than once an hour ({closest} minutes apart at the closest): "
                "such frequent work meets every hour's load; only Schedules that fire at most "
                "once an hour are moved")
    return None


def _judge(schedule: _Schedule, found: dict, before: _Window | None,
           best: _Window | None) -> _Outcome:
    zone = f" ({schedule.spec['timeZone']})" if schedule.spec.get("timeZone") else ""
    if before is None or best is None:
        return _Outcome("the hours it fires in were not sampled enough to compare (the device "
                        "was off, or the daemon down): suggest again once they are")
    if best.times.hours == before.times.hours:
        return _Outcome(f"it already fires in the quietest hours: {_percent(before.cpu)} CPU in "
                        f"use during its runs at {_at(before.times)}{zone}")
    if before.cpu - best.cpu < MIN_GAIN_PERCENT:
        return _Outcome(f"moving it would gain little: {_percent(before.cpu)} CPU in use during "
                        f"its runs at {_at(before.times)}{zone}, {_percent(best.cpu)} at "
                        f"{_at(best.times)}; a move must gain {MIN_GAIN_PERCENT:.0f} points")
    return _Outcome(
        f"{_percent(before.cpu)} CPU in use during its runs at {_at(before.times)}{zone}, "
        f"{_percent(best.cpu)} at {_at(best.times)}, over its p95 runtime of "
        f"{estimate.clock(found['p95Seconds'])} (from {found['runs']} runs), not counting "
        "its own load",
        to=_expression(schedule, best.times), expected=_expected(found, before, best))


def _window(times: _Times, shift: int, profile: _Profile, value: list[float], weekdays,
            minutes: int) -> _Window | None:
    """The mean CPU and load over `minutes` from each start; None when one of the hours they
    touch has too few samples."""
    cycle = profile.hours * 60
    cpu = load = 0.0
    starts = times.starts(weekdays)
    for start in starts:
        moment, left = start, minutes
        while left > 0:
            hour = (moment // 60) % profile.hours
            if profile.samples[hour] < MIN_HOUR_SAMPLES:
                return None
            take = min(60 - moment % 60, left)
            cpu += value[hour] * take
            load += profile.load[hour] * take
            moment, left = (moment + take) % cycle, left - take
    total = minutes * len(starts)
    return _Window(times, cpu / total, load / total, shift)


def _expected(found: dict, before: _Window | None, best: _Window | None) -> dict:
    return {
        "runtimeP95Seconds": found["p95Seconds"],
        "runs": found["runs"],
        "cpuPercent": {"now": _round(before.cpu) if before else None,
                       "proposed": _round(best.cpu) if best else None},
        "load1": {"now": round(before.load, 2) if before else None,
                  "proposed": round(best.load, 2) if best else None},
    }


def _heaviest_first(schedule: _Schedule) -> tuple:
    found = estimate.estimate(schedule.records) if schedule.flexible else None
    cpu = (found or {}).get("p50CpuSeconds") or 0.0
    return -cpu, schedule.name


def _has_times(schedule: _Schedule) -> bool:
    """Whether it has times of day: a cron Schedule that is not @reboot or suspended."""
    return (schedule.expression not in (None, cronexpr.REBOOT)
            and not schedule.spec.get("suspend"))


def _times(schedule: _Schedule) -> _Times:
    parsed = cronexpr.parse(schedule.expression)
    return _Times(tuple(sorted(parsed.hours)), tuple(sorted(parsed.minutes)))


def _weekdays(schedule: _Schedule, history: _History) -> tuple[int, ...] | None:
    """The weekdays to judge `schedule` on, once there is a week of samples and it fires on
    some weekdays only (not on some days of the month); None: every day."""
    parsed = cronexpr.parse(schedule.expression)
    if (history.covered < WEEK_COVERED_SECONDS or parsed.days_restricted
            or not parsed.weekdays_restricted or len(parsed.months) < 12):
        return None
    return tuple(sorted(parsed.weekdays))


def _expression(schedule: _Schedule, times: _Times) -> str:
    """The Schedule's expression with `times` in it; its day fields as written."""
    fields = schedule.fields()
    return " ".join([_field(times.minutes, 60, fields[0]), _field(times.hours, 24, fields[1]),
                     *fields[2:]])


def _field(values: tuple[int, ...], size: int, written: str) -> str:
    """`*` for every value, `a-b/n` or `*/n` where the field was written with a step and the
    values still are one, else a list."""
    if len(values) == size:
        return "*"
    step = values[1] - values[0] if len(values) > 1 else 0
    stepped = step and values == tuple(range(values[0], size, step)) and values[0] < step
    if "/" in written and stepped:
        return f"*/{step}" if values[0] == 0 else f"{values[0]}-{size - 1}/{step}"
    return ",".join(map(str, values))


# ---------------------------------------------------------------- minutes apart


def _distances(taken: set[int]) -> list[int]:
    """For each minute of the day, how many minutes away the nearest taken minute is (around
    midnight too); SPREAD_MINUTES or more counts as SPREAD_MINUTES."""
    return [next((apart for apart in range(SPREAD_MINUTES)
                  if (minute + apart) % 1440 in taken or (minute - apart) % 1440 in taken),
                 SPREAD_MINUTES)
            for minute in range(1440)]


def _spread_minute(hours: tuple[int, ...], current: int, distance: list[int]) -> int:
    """The minute whose starts in `hours` are farthest from other fires (up to SPREAD_MINUTES),
    then nearest to `current`, then the earliest."""
    def rank(minute: int) -> tuple:
        apart = min(distance[hour * 60 + minute] for hour in hours)
        return -apart, abs(minute - current), minute

    return min(range(60), key=rank)


def _circular(a: int, b: int, size: int = 1440) -> int:
    gap = abs(a - b) % size
    return min(gap, size - gap)


def _utc_minutes(schedule: _Schedule, times: _Times, now: datetime) -> set[int]:
    offset = _offset_minutes(schedule.zone, now)
    return {(hour * 60 + minute - offset) % 1440 for hour in times.hours for minute in times.minutes}


def _offset_minutes(zone: tzinfo, now: datetime) -> int:
    return round(now.astimezone(zone).utcoffset().total_seconds() / 60)


def _fires(parsed: cronexpr.CronExpr, zone: tzinfo, start: float, end: float) -> list[float]:
    """The epochs in [start, end] at which `parsed` fires in `zone`."""
    first = datetime.fromtimestamp(start, zone).date()
    days = (datetime.fromtimestamp(end, zone).date() - first).days + 1
    fires = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        for hour in sorted(parsed.hours):
            for minute in sorted(parsed.minutes):
                wall = datetime(day.year, day.month, day.day, hour, minute)
                if parsed.matches(wall):
                    moment = wall.replace(tzinfo=zone).timestamp()
                    if start <= moment <= end:
                        fires.append(moment)
    return fires


# ---------------------------------------------------------------- entries and the diff


def _entries(shown: list[_Schedule], outcomes: dict[str, _Outcome],
             reason: str | None) -> tuple[list[dict], list[dict]]:
    """The "suggestions" and "unchanged" lists, by Schedule name."""
    suggestions, unchanged = [], []
    for schedule in shown:
        outcome = outcomes.get(schedule.name) or _Outcome(_held(schedule) or reason or "")
        entry = {"schedule": schedule.name, "agent": schedule.agent, "task": schedule.task}
        if outcome.to is None:
            unchanged.append({**entry, "reason": outcome.reason})
            continue
        suggestions.append({**entry, "file": schedule.manifest.file, "line": None,
                            "timeZone": schedule.spec.get("timeZone"),
                            "from": schedule.spec["cron"], "to": outcome.to,
                            "reason": outcome.reason, "expected": outcome.expected})
    located, failed = _located(suggestions, shown)
    return located, sorted(unchanged + failed, key=lambda entry: entry["schedule"])


def _located(suggestions: list[dict], shown: list[_Schedule]) -> tuple[list[dict], list[dict]]:
    """The suggestions whose `cron:` value was found on one line of their file, with that line;
    the others become unchanged entries that say what to write by hand."""
    by_name = {schedule.name: schedule for schedule in shown}
    located, failed = [], []
    for entry in suggestions:
        manifest = by_name[entry["schedule"]].manifest
        found = _cron_line(_read(manifest.file), manifest.index, entry["from"])
        if found is None:
            failed.append({key: entry[key] for key in ("schedule", "agent", "task")} | {
                "reason": f"its cron value in {manifest.file} is not written on one line; "
                          f"change it to {entry['to']!r} by hand ({entry['reason']})"})
            continue
        located.append({**entry, "line": found[0]})
    return located, failed


CRON_KEY = re.compile(r"""(?:cron|"cron"|'cron')[ \t]*:[ \t]*""")
"""The `cron` key where `locate` finds it, plain or quoted, up to its value."""


def _cron_line(text: str, index: int, expression: str) -> tuple[int, int, int, str] | None:
    """(line number, start, end, quote) of the `cron:` value of document `index`: the value
    spans [start, end) of that line, quotes included. None unless the line holds exactly
    `expression`, plain or in simple quotes."""
    number, column = locate(text, index, ("spec", "cron"))
    line = _lines(text)[number - 1]
    key = CRON_KEY.match(line, column - 1)
    if key is None:
        return None
    start = key.end()
    quote = line[start:start + 1] if line[start:start + 1] in ("'", '"') else ""
    if quote:
        end = line.find(quote, start + 1) + 1
        value = line[start + 1:end - 1] if end > 0 else None
    else:
        value = re.split(r"[ \t]+#", line[start:].rstrip("\r\n"), maxsplit=1)[0].rstrip(" \t")
        end = start + len(value)
    if value != expression or "\\" in value:
        return None
    return number, start, end, quote


def _diff(suggestions: list[dict], shown: list[_Schedule]) -> str:
    """A unified diff that sets each suggestion's `cron:` value and changes nothing else; its
    paths are relative to the top of the git repository holding the manifests."""
    by_name = {schedule.name: schedule for schedule in shown}
    by_file: dict[str, list[dict]] = {}
    for entry in suggestions:
        by_file.setdefault(entry["file"], []).append(entry)
    parts = []
    for file, entries in sorted(by_file.items(), key=lambda item: _repository_path(item[0])):
        text = _read(file)
        old = _lines(text)
        new = list(old)
        for entry in entries:
            number, start, end, quote = _cron_line(
                text, by_name[entry["schedule"]].manifest.index, entry["from"])
            line = new[number - 1]
            new[number - 1] = line[:start] + quote + entry["to"] + quote + line[end:]
        shown_path = _repository_path(file)
        parts.append(_unified(old, new, shown_path))
    return "".join(parts)


def _unified(old: list[str], new: list[str], path: str) -> str:
    """difflib's unified diff, with git's marker after a last line without a newline."""
    lines = []
    for line in difflib.unified_diff(old, new, f"a/{path}", f"b/{path}"):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)


def _lines(text: str) -> list[str]:
    """The lines of `text` with their endings, split at newlines only (str.splitlines would
    split at form feeds and line separators too, which a YAML comment may hold)."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _read(file: str) -> str:
    with open(file, encoding="utf-8", newline="") as handle:
        return handle.read()


def _repository_path(file: str) -> str:
    """`file` relative to the top of its git work tree; relative to the current directory
    when it is in none."""
    real = os.path.realpath(file)
    directory = os.path.dirname(real)
    while not os.path.exists(os.path.join(directory, ".git")):
        parent = os.path.dirname(directory)
        if parent == directory:
            return os.path.relpath(real)
        directory = parent
    return os.path.relpath(real, directory)


# ---------------------------------------------------------------- words


def _history_line(result: dict) -> str:
    samples = result["samples"]
    if not samples["count"]:
        return f"No load samples; {result['runs']} finished runs."
    return (f"Load history: {samples['count']} samples from {samples['from']} to "
            f"{samples['to']} ({_span(samples['coveredSeconds'])}), {samples['cpus']} CPUs; "
            f"{result['runs']} finished runs.")


def _at(times: _Times) -> str:
    """02:00; 03:00, 09:00, 15:00 and 21:00; 02:00 and 02:30..."""
    moments = [f"{hour:02d}:{minute:02d}" for hour in times.hours for minute in times.minutes]
    if len(moments) > 4:
        return f"{', '.join(moments[:3])} and {len(moments) - 3} more times"
    return moments[0] if len(moments) == 1 else f"{', '.join(moments[:-1])} and {moments[-1]}"


def _apart(minutes: int) -> str:
    """How far a minute is from the nearest other Schedule's fire, in words."""
    if minutes >= SPREAD_MINUTES:
        return f"{SPREAD_MINUTES} or more minutes from any other Schedule's fire"
    return f"{minutes} minute{'' if minutes == 1 else 's'} from the nearest other Schedule's fire"


def _percent(value: float) -> str:
    return f"{value:.0f}%"


def _wrap(line: str, indent: str = "", then: str | None = None) -> list[str]:
    return textwrap.wrap(line, WIDTH, initial_indent=indent,
                         subsequent_indent=indent if then is None else then,
                         break_on_hyphens=False, break_long_words=False)


def _span(seconds: float) -> str:
    """5m, 3h20m, 1d2h, 14d."""
    minutes = round(seconds / 60)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")] if not days else [(days, "d"), (hours, "h")]
    return "".join(f"{count}{unit}" for count, unit in parts if count) or "0m"


def _round(value: float) -> float:
    return round(value, 1)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _epoch(text) -> float | None:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment.timestamp() if moment.tzinfo else moment.replace(tzinfo=timezone.utc).timestamp()


def _zone_name(zone: tzinfo) -> str:
    if zone is timezone.utc:
        return "UTC"
    return getattr(zone, "key", None) or "localtime"
