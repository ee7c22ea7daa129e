"""`spos schedule next`: when each Schedule fires next, and what its overlap and catch-up
policies would do with those fires.

Cron fire times are computed here, as the device computes them. A Schedule with `timeZone` is
matched minute by minute in that zone (`spos action run --cron-tz`, docs/cron.md): a wall time
that the clocks skip does not fire, one they repeat fires twice. A Schedule without one is read
by Debian's cron in the device's own zone, with cron's daylight saving rule: a fixed-time job
(no `*` in its minute or hour field) whose time is skipped runs right after the change and runs
once in a repeated hour; any other job follows the new time. Times are strictly after `now`.

Timer calendar events are computed by systemd itself, `systemd-analyze calendar --iterations=N`,
through the `calendar` function `next_fires` is handed (`systemd_calendar` by default): where
systemd-analyze is missing, those times are left out and the Schedule's notes say why. Boot and
interval timers (`onBootSec`, `onUnitActiveSec`) have no wall-clock times; they are described
relative to boot and to the last run.

Everything but `systemd_calendar` and `local_zone` is pure: the clock, the zone a Schedule
without `timeZone` is read in and the calendar are arguments. `next_fires` returns:

    {
      "now": ISO 8601, UTC: the moment the fires are counted from,
      "localZone": the zone of Schedules without a timeZone, and of timers (this machine's),
      "schedules": [                  # by first fire; then those without times; suspended last
        {
          "name": the Schedule, "agent": its agent, "task": the task it starts,
          "kind": "cron" | "timer",
          "expression": the expression in words, with the expression as written,
          "timeZone": the Schedule's timeZone, or null: the device's own (see localZone),
          "suspended": bool: when true, "next" and "nextUtc" are empty,
          "next": [ISO 8601 in the Schedule's zone, ...],   # up to `count`
          "nextUtc": [the same instants in UTC, ...],
          "relative": fires not tied to the clock ("5m after boot, then every 15m after the
                      last run started", "once at every boot, when cron starts"), or null,
          "overlap": what the concurrency does when a run lasts into the next fire,
          "catchUp": what happens to fires missed while the device is off or the executor busy,
          "notes": [anything else that moves or drops a fire: daylight saving, random delay,
                    accuracy, a flexible task, a selector, a setting that has no effect]
        }
      ]
    }

`text` renders that dict, and nothing else, as the listing `spos schedule next` prints.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reconciler import cronexpr, units
from reconciler.errors import SposError
from reconciler.manifest import ManifestSet

DEFAULT_TIMEOUT = "1h"
DEFAULT_CONCURRENCY = "Forbid"
DEFAULT_ACCURACY = "1m"
DEFAULT_BACKOFF = {"initial": "10s", "factor": 2, "max": "5m"}
RETRY_JITTER = 1.1
"""Retry waits are given or taken 10 % (docs/executor.md): the longest wait is 10 % over."""
SAMPLE = 16
"""Fires looked at to judge the gaps between them, when fewer are shown."""
HORIZON_DAYS = 28 * 366
"""How far ahead cron fires are searched: a full calendar cycle, so an expression that fires at
all fires within it."""
CALENDAR_TIMEOUT_SECONDS = 30.0
WIDTH = 100

Calendar = Callable[[str, tzinfo, datetime, int], list[datetime]]
"""(calendar event, zone, after, count) -> up to `count` elapses strictly after `after`, aware."""


class CalendarUnavailable(SposError):
    """systemd calendar events cannot be computed here (systemd-analyze is missing or failed)."""


@dataclass
class _Times:
    """When one Schedule fires, before it is put into words."""

    expression: str
    fires: list[datetime] = field(default_factory=list)
    """In UTC; at least as many as are shown (up to SAMPLE), to judge the gaps by."""
    gap: float | None = None
    """The shortest time between two fires, in seconds; None when not known."""
    uniform: bool = True
    """Whether every gap is that shortest one."""
    alone: str | None = None
    """Why no two fires can meet ("it fires once per boot"), when none can."""
    relative: str | None = None
    notes: list[str] = field(default_factory=list)


def next_fires(manifests: ManifestSet, agent: str | None = None, count: int = 5,
               now: datetime | None = None, zone: tzinfo | str | None = None,
               calendar: Calendar | None = None) -> dict:
    """The forecast of every Schedule in `manifests` (only `agent`'s, when given): the dict the
    module docstring describes. `now` defaults to the current time, `zone` (for Schedules
    without timeZone, and timers) to this machine's, `calendar` to `systemd_calendar`."""
    if count < 1:
        raise ValueError("count must be at least 1")
    now = _utc(now or datetime.now(timezone.utc))
    local = ZoneInfo(zone) if isinstance(zone, str) else (zone or local_zone())
    calendar = calendar or systemd_calendar
    agents = manifests.of_kind("Agent")
    forecasts = []
    for name, schedule in manifests.of_kind("Schedule").items():
        spec = schedule.spec
        if agent is not None and spec.get("agent") != agent:
            continue
        agent_spec = agents[spec["agent"]].spec if spec.get("agent") in agents else {}
        task = (agent_spec.get("tasks") or {}).get(spec.get("task")) or {}
        forecasts.append(_forecast(name, spec, agent_spec, task, now, local, count, calendar))
    forecasts.sort(key=_order)
    return {"now": _iso(now), "localZone": _zone_name(local), "schedules": forecasts}


def text(forecast: dict) -> str:
    """The listing `spos schedule next` prints: one block per Schedule, in the dict's order."""
    lines = textwrap.wrap(
        f"Next fires after {forecast['now']}. Schedules without a timeZone, and timers, are "
        f"shown in this machine's time zone, {forecast['localZone']}; the device reads them in "
        "its own.", WIDTH)
    if not forecast["schedules"]:
        lines += ["", "No Schedules."]
    for entry in forecast["schedules"]:
        lines += ["", *_block(entry, forecast["localZone"])]
    return "\n".join(lines) + "\n"


def systemd_calendar(event: str, zone: tzinfo, after: datetime, count: int) -> list[datetime]:
    """The next `count` elapses of a systemd calendar event after `after`, as systemd computes
    them, in UTC: `systemd-analyze calendar --iterations=N`, with `zone` as its local time.
    Raises CalendarUnavailable when systemd-analyze is missing or fails."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise CalendarUnavailable("systemd-analyze is not installed here")
    environment = {**os.environ, "LC_ALL": "C"}
    key = _zone_key(zone)
    if key:
        environment["TZ"] = key
    argv = [analyze, "calendar", f"--iterations={count}",
            f"--base-time=@{math.floor(after.timestamp())}", "--", event]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CALENDAR_TIMEOUT_SECONDS, env=environment)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CalendarUnavailable(f"systemd-analyze calendar failed: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit {done.returncode}"
        raise CalendarUnavailable(f"systemd-analyze calendar {event!r}: {why}")
    return _elapses(done.stdout, ZoneInfo(key) if key else timezone.utc)


def local_zone() -> tzinfo:
    """This machine's time zone, as its cron and systemd read local times: `TZ` when it names a
    zone, else /etc/localtime; UTC when neither says."""
    name = os.environ.get("TZ", "").lstrip(":")
    target = os.path.realpath("/etc/localtime")
    for key in (name, target.partition("/zoneinfo/")[2]):
        try:
            if key:
                return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    try:
        with open("/etc/localtime", "rb") as tzfile:
            return ZoneInfo.from_file(tzfile)
    except (OSError, ValueError):
        return timezone.utc


# ---------------------------------------------------------------- one Schedule


def _forecast(name: str, spec: dict, agent_spec: dict, task: dict, now: datetime,
              local: tzinfo, count: int, calendar: Calendar) -> dict:
    kind = "cron" if "cron" in spec else "timer"
    if kind == "cron":
        zone = ZoneInfo(spec["timeZone"]) if spec.get("timeZone") else local
        times = _cron_times(spec["cron"], zone, bool(spec.get("timeZone")), now, count)
    else:
        zone = local
        times = _timer_times(spec["timer"], zone, now, count, calendar)
    suspended = bool(spec.get("suspend"))
    shown = [] if suspended else times.fires[:count]
    return {
        "name": name,
        "agent": spec.get("agent"),
        "task": spec.get("task"),
        "kind": kind,
        "expression": times.expression,
        "timeZone": spec.get("timeZone") if kind == "cron" else None,
        "suspended": suspended,
        "next": [_iso(fire.astimezone(zone)) for fire in shown],
        "nextUtc": [_iso(fire) for fire in shown],
        "relative": times.relative,
        "overlap": _overlap(kind, spec, task, times),
        "catchUp": _catch_up(kind, spec),
        "notes": _notes(kind, spec, agent_spec, task, times),
    }


def _order(entry: dict) -> tuple:
    if entry["suspended"]:
        return 2, "", entry["name"]
    if not entry["nextUtc"]:
        return 1, "", entry["name"]
    return 0, entry["nextUtc"][0], entry["name"]


# ---------------------------------------------------------------- cron


@dataclass
class _Shift:
    """Wall times of one day that daylight saving skips ("gap") or repeats ("fold")."""

    day: date
    kind: str
    at: datetime
    """The first instant concerned, in UTC: where the forecast shows it or would have."""
    walls: list[str] = field(default_factory=list)


def _cron_times(expression: str, zone: tzinfo, zone_given: bool, now: datetime,
                count: int) -> _Times:
    written = expression.strip()
    if written == cronexpr.REBOOT:
        boot = "once at every boot, when cron starts"
        return _Times(expression=f"{boot} ({written})", alone="it fires once per boot",
                      relative=boot)
    parsed = cronexpr.parse(written)
    rule = None if zone_given else _fixed_time(written)
    sample, shifts = _cron_walk(parsed, zone, now, max(count, SAMPLE), rule)
    gaps = _gaps(sample)
    shortest = parsed.min_interval_minutes() * 60.0
    last_shown = sample[:count][-1] if sample else now
    return _Times(
        expression=f"{_cron_words(parsed)} ({written})",
        fires=sample,
        gap=min([shortest, *gaps]),
        uniform=_evenly_spaced(parsed) and all(gap == shortest for gap in gaps),
        notes=[_shift_note(shift, zone, rule) for shift in shifts if shift.at <= last_shown],
    )


def _evenly_spaced(parsed: cronexpr.CronExpr) -> bool:
    """Whether every gap between fires is the same, on the wall clock: the same days every week
    and times evenly spaced around the clock, or one time on one weekday."""
    if len(parsed.months) < 12 or len(parsed.days) < 31:
        return False
    times = sorted(hour * 60 + minute for hour in parsed.hours for minute in parsed.minutes)
    around = [later - earlier for earlier, later in zip(times, times[1:])]
    around.append(24 * 60 - times[-1] + times[0])
    if len(parsed.weekdays) == 7 or (parsed.days_restricted and parsed.weekdays_restricted):
        return len(set(around)) == 1  # every day (cron's rule: any day of the month will do)
    return len(times) == 1 and len(parsed.weekdays) == 1


def _cron_walk(parsed: cronexpr.CronExpr, zone: tzinfo, after: datetime, count: int,
               rule: bool | None) -> tuple[list[datetime], list[_Shift]]:
    """At least `count` fires strictly after `after`, in UTC (fewer when none come within the
    horizon), and the days whose fires daylight saving skips or repeats.

    `rule` None: spos's (every real minute whose wall time in `zone` matches fires); True /
    False: Debian cron's for a fixed-time / a wildcard job."""
    times_of_day = sorted(time(hour, minute) for hour in parsed.hours for minute in parsed.minutes)
    first_day = after.astimezone(zone).date() - timedelta(days=1)
    fires: list[datetime] = []
    shifts: dict[tuple[date, str], _Shift] = {}
    for offset in range(HORIZON_DAYS):
        day = first_day + timedelta(days=offset)
        if not parsed.matches(datetime.combine(day, times_of_day[0])):
            continue
        for moment in times_of_day:
            wall = datetime.combine(day, moment)
            instants, kind, at = _instants(wall, zone, rule)
            fires.extend(instant for instant in instants if instant > after)
            if kind and max(instants, default=at) > after:
                shift = shifts.setdefault((day, kind), _Shift(day, kind, at))
                shift.walls.append(f"{moment:%H:%M}")
        if len(fires) >= count:
            break
    return sorted(fires), list(shifts.values())


def _instants(wall: datetime, zone: tzinfo, rule: bool | None
              ) -> tuple[list[datetime], str, datetime]:
    """The instants (UTC) a fire at wall time `wall` in `zone` happens at; "gap" or "fold" when
    daylight saving skips or repeats that wall time, else ""; and the first instant concerned."""
    early = wall.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)
    late = wall.replace(tzinfo=zone, fold=1).astimezone(timezone.utc)
    if early == late:
        return [early], "", early
    if early < late:  # repeated: fold 0 is the first time the clocks show it
        return ([early] if rule is True else [early, late]), "fold", early
    change = _transition(late, early, zone)  # skipped
    return ([change] if rule is True else []), "gap", change


def _transition(start: datetime, end: datetime, zone: tzinfo) -> datetime:
    """The first whole minute from `start` at which `zone` has changed its offset."""
    before = start.astimezone(zone).utcoffset()
    moment = start.replace(second=0, microsecond=0)
    while moment < end and moment.astimezone(zone).utcoffset() == before:
        moment += timedelta(minutes=1)
    return moment


def _fixed_time(expression: str) -> bool:
    """Debian's cron moves a job across a daylight saving change only when neither its minute nor
    its hour field is a wildcard (`@hourly` is one); crontab(8) calls the others wildcard jobs."""
    fields = cronexpr.MACROS.get(expression, expression).split()
    return not (fields[0].startswith("*") or fields[1].startswith("*"))


def _shift_note(shift: _Shift, zone: tzinfo, rule: bool | None) -> str:
    one = len(shift.walls) == 1
    said = shift.walls[0] if one else f"{shift.walls[0]} to {shift.walls[-1]}"
    it, subject = ("it", "that fire") if one else ("them", "those fires")
    if shift.kind == "gap":
        head = f"on {shift.day} the clocks in {_zone_name(zone)} skip {said} (they go forward): "
        if rule is None:
            return head + f"{subject} {'does' if one else 'do'} not happen"
        if rule:
            moved = _iso(shift.at.astimezone(zone))
            return head + f"cron runs {it} right after the change, at {moved}"
        return head + f"cron skips {it}"
    head = f"on {shift.day} the clocks in {_zone_name(zone)} show {said} twice (they go back): "
    if rule is None:
        return head + f"{subject} {'happens' if one else 'happen'} both times"
    if rule:
        return head + f"cron runs {it} once, the first time"
    return head + f"cron runs {it} both times"


# ---------------------------------------------------------------- timers


def _timer_times(timer: dict, zone: tzinfo, now: datetime, count: int,
                 calendar: Calendar) -> _Times:
    events = timer.get("onCalendar") or []
    events = [events] if isinstance(events, str) else list(events)
    interval = timer.get("onUnitActiveSec")
    relative = _relative(timer)
    notes: list[str] = []
    sample: list[datetime] = []
    alone = None if interval or events else "it fires once per boot"
    try:
        wanted = max(count, SAMPLE)
        sample = sorted({fire for event in events for fire in calendar(event, zone, now, wanted)})
        sample = sample[:wanted]
    except CalendarUnavailable as exc:
        notes.append(f"the onCalendar times are not shown: {exc}; systemd computes them on the "
                     "device")
    else:
        if events and not sample:
            notes.append("no calendar event comes again: the calendar fires no more")
        if events and len(sample) < 2 and not interval:
            boot = ", and once per boot" if timer.get("onBootSec") else ""
            alone = f"it fires once more at most{boot}"
    gaps = _gaps(sample)
    candidates = [*gaps, *([float(units.seconds(interval))] if interval else [])]
    quoted = ['"' + event + '"' for event in events]
    described = [f"calendar {_and(quoted)}"] if events else []
    return _Times(
        expression="; ".join([*described, *([relative] if relative else [])]),
        fires=sample,
        gap=min(candidates, default=None),
        uniform=len(set(candidates)) <= 1 and not (events and interval),
        alone=alone,
        relative=relative,
        notes=notes,
    )


def _relative(timer: dict) -> str | None:
    boot, interval = timer.get("onBootSec"), timer.get("onUnitActiveSec")
    if boot and interval:
        return f"{boot} after boot, then every {interval} after the last run started"
    if boot:
        return f"{boot} after boot"
    if interval:
        return f"every {interval} after the last run started"
    return None


def _elapses(output: str, zone: tzinfo) -> list[datetime]:
    """The instants `systemd-analyze calendar` printed, in UTC: its `(in UTC)` lines, or, when
    the local zone is UTC and it prints none, the elapses themselves."""
    local, utc = [], []
    for line in output.splitlines():
        match = _ELAPSE.match(line)
        if match and match.group(2) != "never":
            stamp = datetime.strptime(" ".join(match.group(2).split()[1:3]), "%Y-%m-%d %H:%M:%S")
            (utc if match.group(1) == "(in UTC)" else local).append(stamp)
    if utc:
        return [stamp.replace(tzinfo=timezone.utc) for stamp in utc]
    return [stamp.replace(tzinfo=zone).astimezone(timezone.utc) for stamp in local]


_ELAPSE = re.compile(r"^\s*(Next elapse|Iter\. #\d+|\(in UTC\)):\s*(.+?)\s*$")


# ---------------------------------------------------------------- policies in words


def _overlap(kind: str, spec: dict, task: dict, times: _Times) -> str:
    policy, whose = _concurrency(spec, task)
    timeout_text = task.get("timeout") or DEFAULT_TIMEOUT
    timeout = float(units.seconds(timeout_text))
    limit = f"timeout {timeout_text}" + ("" if task.get("timeout") else ", the default")
    if times.alone:
        return f"{times.alone}, so its runs do not overlap one another ({limit})"
    if times.gap is None:
        return f"not known here without the fire times; a run may take up to {timeout_text}"
    if timeout < times.gap:
        said = f"a run ends ({limit}) before the next fire"
        retries = (task.get("retries") or {}).get("limit", 0)
        failing = _failing_run(task, timeout)
        if retries and failing >= times.gap:
            then = ("and systemd starts no second run while it is going" if kind == "timer" else
                    f"where concurrency {policy} ({whose}) applies")
            said += (f"; but a failing run, retried up to {retries} time{'s' * (retries > 1)}, "
                     f"can go on for up to {_span(failing)}, past the next fire, {then}")
        return said
    gap = _span(times.gap)
    head = (f"fires {'every' if times.uniform else 'as often as every'} {gap} but a run may "
            f"take up to {timeout_text}")
    if kind == "timer":
        return (f"{head}: systemd starts no second run of the timer's service while one is going; "
                f"against the task's other runs (cron, triggers, by hand) concurrency {policy} "
                f"({whose}) {_TIMER_POLICY[policy]}")
    effect = _cron_policy(policy, timeout, times.gap, spec)
    return f"{head}: concurrency {policy} ({whose}) {effect}"


_TIMER_POLICY = {
    "Allow": "lets them overlap",
    "Forbid": "skips the timer's run while one of them is going",
    "Replace": "stops them and then starts the timer's run",
    "Queue": "makes the timer's run wait until they have ended",
}


def _cron_policy(policy: str, timeout: float, gap: float, spec: dict) -> str:
    if policy == "Allow":
        return f"lets runs overlap, up to {math.ceil(timeout / gap)} at once"
    if policy == "Forbid":
        return "skips a fire while the previous run is going"
    if policy == "Replace":
        return "stops the running one and starts the new one"
    deadline = spec.get("startingDeadline")
    dropped = (f"; a fire that cannot start within startingDeadline {deadline} is dropped"
               if deadline else "")
    return (f"makes the fire wait for it; when runs keep taking longer than {_span(gap)}, "
            f"waiting runs pile up{dropped}")


def _concurrency(spec: dict, task: dict) -> tuple[str, str]:
    if spec.get("concurrency"):
        return spec["concurrency"], "the Schedule's"
    if task.get("concurrency"):
        return task["concurrency"], "the task's"
    return DEFAULT_CONCURRENCY, "the default"


def _failing_run(task: dict, timeout: float) -> float:
    """The longest a run that keeps failing can go on: every attempt to its timeout, plus the
    longest waits between them."""
    retries = task.get("retries") or {}
    backoff = {**DEFAULT_BACKOFF, **(retries.get("backoff") or {})}
    initial, ceiling = units.seconds(backoff["initial"]), units.seconds(backoff["max"])
    waits = sum(min(initial * backoff["factor"] ** (n - 1), ceiling) * RETRY_JITTER
                for n in range(1, retries.get("limit", 0) + 1))
    return (retries.get("limit", 0) + 1) * timeout + waits


def _catch_up(kind: str, spec: dict) -> str:
    if kind == "cron":
        deadline = spec.get("startingDeadline")
        if spec["cron"].strip() == cronexpr.REBOOT:
            missed = "it fires at every boot, so nothing is missed while the device is off"
        else:
            missed = "cron does not run fires missed while the device is off (or cron is down)"
        late = (f"a run that cannot start within {deadline} of its fire (executor busy or down) "
                "is dropped" if deadline else
                "a run the executor cannot start at once waits in the queue, with no deadline")
        return f"{missed}; {late}"
    timer, parts = spec["timer"], []
    if timer.get("onCalendar"):
        parts.append("a calendar fire missed while the device was off runs once at boot "
                     "(persistent: true)" if timer.get("persistent") else
                     "a calendar fire missed while the device was off is not run "
                     "(persistent is off)")
    boot, interval = timer.get("onBootSec"), timer.get("onUnitActiveSec")
    if boot or interval:
        counted = (f"the first run comes {boot} after boot" if boot else "") + (
            ", " if boot and interval else "") + (
            f"each next one {interval} after the last run started" if interval else "")
        parts.append(f"nothing to catch up from boot and the last run: {counted}")
    return "; ".join(parts)


def _notes(kind: str, spec: dict, agent_spec: dict, task: dict, times: _Times) -> list[str]:
    notes = []
    if spec.get("suspend"):
        notes.append("suspended: " + ("its crontab line is commented out" if kind == "cron" else
                                      "its timer is not enabled") + ", so it starts nothing")
    notes += times.notes
    if kind == "timer":
        notes += _timer_notes(spec)
    if task.get("flexible"):
        notes.append("the task is flexible: a run may be moved to a quieter time than its fire")
    if agent_spec.get("selector"):
        notes.append(f"only on devices that agent {spec.get('agent')}'s selector matches")
    return notes


def _timer_notes(spec: dict) -> list[str]:
    timer, notes = spec["timer"], []
    if timer.get("randomizedDelaySec"):
        notes.append(f"each fire delayed by up to {timer['randomizedDelaySec']} at random "
                     "(randomizedDelaySec); the times shown are the earliest")
    accuracy = timer.get("accuracy")
    notes.append(f"systemd may start a run up to {accuracy or DEFAULT_ACCURACY} late to group "
                 f"wake-ups (accuracy{'' if accuracy else ', the default'})")
    if timer.get("persistent") and not timer.get("onCalendar"):
        notes.append("persistent has no effect without onCalendar")
    if timer.get("onUnitActiveSec") and not (timer.get("onBootSec") or timer.get("onCalendar")):
        notes.append("onUnitActiveSec counts from the last run, and after boot there is none: "
                     "nothing starts the first run (add onBootSec)")
    if spec.get("startingDeadline"):
        notes.append(f"startingDeadline {spec['startingDeadline']} has no effect on a timer: "
                     "the run starts at the fire time")
    return notes


# ---------------------------------------------------------------- cron expressions in words

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_FEW_TIMES = 4
"""Up to this many times a day are listed as clock times."""


def _cron_words(parsed: cronexpr.CronExpr) -> str:
    """`0 9 * * 1-5` -> "at 09:00 on Monday to Friday"; `*/5 * * * *` -> "every 5 minutes"."""
    minutes, hours = sorted(parsed.minutes), sorted(parsed.hours)
    days = _day_words(parsed)
    if len(minutes) * len(hours) <= _FEW_TIMES:
        when = "at " + _and([f"{hour:02}:{minute:02}" for hour in hours for minute in minutes])
        return f"{when} {days}" if days else f"daily {when}"
    when = _time_words(minutes, hours)
    return f"{when} {days}" if days else when


def _time_words(minutes: list[int], hours: list[int]) -> str:
    step = _step(minutes, 60)
    if len(minutes) == 60:
        each = "every minute"
    elif step:
        each = f"every {step} minutes" + (f" from :{minutes[0]:02}" if minutes[0] else "")
    else:
        each = "at " + _and([f":{minute:02}" for minute in minutes])
    if len(hours) == 24:
        return f"every hour {each}" if each.startswith("at ") else each
    step = _step(hours, 24)
    if step and hours[0] == 0:
        return f"every {step} hours {each}" if each.startswith("at ") else (
            f"{each} of every {_ordinal(step)} hour")
    return f"{each} during hours " + ", ".join(
        f"{low:02}" if low == high else f"{low:02}-{high:02}" for low, high in _runs(hours))


def _day_words(parsed: cronexpr.CronExpr) -> str:
    days = sorted(parsed.days)
    weekdays = sorted((weekday + 6) % 7 for weekday in parsed.weekdays)  # Monday first
    some_days, some_weekdays = len(days) < 31, len(weekdays) < 7
    months = "" if len(parsed.months) == 12 else _and(
        [_MONTHS[low - 1] if low == high else f"{_MONTHS[low - 1]} to {_MONTHS[high - 1]}"
         for low, high in _runs(sorted(parsed.months))])
    step = _step(days, 32)
    dated = f"on every {_ordinal(step)} day" if step and days[0] == 1 else "on the " + _and(
        [_ordinal(low) if low == high else f"{_ordinal(low)} to {_ordinal(high)}"
         for low, high in _runs(days)])
    weekly = "on " + _and([f"{_WEEKDAYS[low]}s" if low == high else
                           f"{_WEEKDAYS[low]} to {_WEEKDAYS[high]}"
                           for low, high in _runs(weekdays)])
    of_month = f" of {months}" if months else " of every month"
    in_months = f" in {months}" if months else ""
    if some_days and some_weekdays:
        if parsed.days_restricted and parsed.weekdays_restricted:  # cron's rule: either
            return f"{dated}{of_month} or {weekly}{in_months}"
        return f"{dated}{of_month} that fall {weekly}"
    if some_days:
        return dated + of_month
    if some_weekdays:
        return weekly + in_months
    return in_months.strip()


def _step(values: list[int], size: int) -> int | None:
    """n when `values` are every n-th value from the first to the end of the field (`*/n`)."""
    if len(values) < 2:
        return None
    step = values[1] - values[0]
    return step if values == list(range(values[0], size, step)) and step > 1 else None


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 5] -> [(1, 3), (5, 5)]; a run of two stays two single values."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    split = []
    for low, high in runs:
        split += [(low, low), (high, high)] if high == low + 1 else [(low, high)]
    return split


def _ordinal(number: int) -> str:
    if 10 <= number % 100 <= 20:
        return f"{number}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# ---------------------------------------------------------------- text and time


def _block(entry: dict, local_zone: str) -> list[str]:
    head = f"{entry['name']}  {entry['kind']}  {entry['agent']}/{entry['task']}"
    rows = [("when", entry["expression"]),
            ("zone", entry["timeZone"] or f"the device's (shown in {local_zone})")]
    if entry["suspended"]:
        rows.append(("next", "none: suspended"))
    else:
        for number, (local, utc) in enumerate(zip(entry["next"], entry["nextUtc"])):
            shown = local if local == utc else f"{local}  (UTC {utc})"
            rows.append(("next" if number == 0 else "", shown))
        if not entry["next"]:
            calendar = entry["expression"].startswith("calendar")
            rows.append(("next", "no clock times (see when)" if entry["relative"] and not calendar
                         else "none to show (see the notes)"))
        rows += [("overlap", entry["overlap"]), ("catch-up", entry["catchUp"])]
    rows += [("note", note) for note in entry["notes"]]
    lines = [head + ("  (suspended)" if entry["suspended"] else "")]
    for label, value in rows:
        lines += textwrap.wrap(value, WIDTH, initial_indent=f"  {label + ':' if label else '':<10}",
                               subsequent_indent=" " * 12, break_on_hyphens=False)
    return lines


def _gaps(instants: list[datetime]) -> list[float]:
    return [gap for gap in ((later - earlier).total_seconds()
                            for earlier, later in zip(instants, instants[1:])) if gap > 0]


def _span(seconds: float) -> str:
    """Seconds as a spos duration: 300 -> "5m", 88200 -> "24h30m", 604800 -> "7d"."""
    total = round(seconds * 1000)
    days, rest = divmod(total, 86_400_000)
    if days < 2 or rest:
        rest = total
        days = 0
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, millis = divmod(rest, 1000)
    parts = zip((days, hours, minutes, whole, millis), ("d", "h", "m", "s", "ms"))
    return "".join(f"{amount}{unit}" for amount, unit in parts if amount) or "0s"


def _utc(moment: datetime) -> datetime:
    """`moment` in UTC; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _zone_key(zone: tzinfo) -> str | None:
    """The name `TZ` knows `zone` by, or None (read from a file that has no name)."""
    if zone is timezone.utc:
        return "UTC"
    return getattr(zone, "key", None)


def _zone_name(zone: tzinfo) -> str:
    return _zone_key(zone) or "localtime"
