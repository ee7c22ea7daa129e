"""Cron expressions exactly as Debian's cron reads them: parsing, matching, interval bounds.

Pure: no clock, no files. croniter accepts more than the cron daemon does (seconds fields, `L`,
`W`, `#`), so validation here follows crontab(5) instead: five fields of `*`, numbers, ranges,
steps and lists; month and weekday names only as single values; the `@` macros, in lower case
(cron compares them case-sensitively and ignores a line with `@Daily`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
REBOOT = "@reboot"

_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {n: i for i, n in enumerate(
        "jan feb mar apr may jun jul aug sep oct nov dec".split(), start=1)}),
    ("day of week", 0, 7, {n: i for i, n in enumerate("sun mon tue wed thu fri sat".split())}),
)
_ELEMENT = re.compile(r"^(\*|[0-9]+(?:-[0-9]+)?)(?:/([0-9]+))?$")
"""ASCII digits only: Python's \\d and str.split() would also read `٣٠` as 30 and split at a
no-break space, and the expression goes into the crontab line as written."""
_BLANKS = re.compile(r"[ \t]+")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CYCLE_START, _CYCLE_DAYS = date(2001, 1, 1), 28 * 365 + 7
"""28 years: every combination of leap year and weekday of 1 January (exact for 1901-2099)."""


class CronSyntaxError(ValueError):
    """The expression is not one Debian's cron would run; the message says which field."""


@dataclass(frozen=True)
class CronExpr:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, moment: datetime) -> bool:
        """Whether cron would fire at `moment` (to the minute), with cron's day-or-weekday rule."""
        if moment.minute not in self.minutes or moment.hour not in self.hours:
            return False
        return _fires_on(self._day_rule, moment.month, moment.day, moment.isoweekday() % 7)

    def min_interval_minutes(self) -> int:
        """The fewest minutes between two consecutive firings."""
        times = sorted(h * 60 + m for h in self.hours for m in self.minutes)
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        gaps.append((_shortest_day_gap(self._day_rule) - 1) * 1440 + 1440 - times[-1] + times[0])
        return min(gaps)

    @property
    def _day_rule(self) -> tuple:
        either = self.days_restricted and self.weekdays_restricted
        return self.months, self.days, self.weekdays, either


def _fires_on(rule: tuple, month: int, day: int, weekday: int) -> bool:
    """Whether cron fires on this day (weekday 0 = Sunday) at all: when both day fields are
    restricted, either one matching is enough (cron's rule)."""
    months, days, weekdays, either = rule
    if month not in months:
        return False
    if either:
        return day in days or weekday in weekdays
    return day in days and weekday in weekdays


@lru_cache(maxsize=256)
def _shortest_day_gap(rule: tuple) -> int:
    """The fewest days from one firing day to the next (1: consecutive days) over a whole
    calendar cycle; the cycle's length when the rule picks one day or none."""
    months, days, weekdays, either = rule
    all_days, all_weekdays = len(days) == 31, len(weekdays) == 7
    every_day = (all_days or all_weekdays) if either else (all_days and all_weekdays)
    if len(months) == 12 and every_day:
        return 1
    if len(months) == 12 and all_days and not either and weekdays:
        # weekdays only (`* * 1-5`): the closest two of them around the week
        chosen = sorted(weekdays)
        return min((b - a) % 7 or 7 for a, b in zip(chosen, chosen[1:] + chosen[:1]))
    firing = [n for n, day in enumerate(_calendar_cycle()) if _fires_on(rule, *day)]
    return min((later - earlier for earlier, later in zip(firing, firing[1:])), default=_CYCLE_DAYS)


@lru_cache(maxsize=4096)
def parse(text: str) -> CronExpr:
    """Parse a five-field expression or an `@` macro (not `@reboot`, which has no times)."""
    expanded = MACROS.get(text.strip(), text).strip(" \t")
    fields = _BLANKS.split(expanded) if expanded else []
    if len(fields) != 5:
        raise CronSyntaxError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    sets = [_parse_field(value, *spec) for value, spec in zip(fields, _FIELDS)]
    weekdays = frozenset(7 if d == 7 else d for d in sets[4])
    if 7 in weekdays:
        weekdays = (weekdays - {7}) | {0}
    return CronExpr(
        text=text,
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=weekdays,
        days_restricted=not fields[2].startswith("*"),
        weekdays_restricted=not fields[4].startswith("*"),
    )


def validate(text: str) -> None:
    """Raise CronSyntaxError unless Debian's cron accepts `text` as a schedule that fires."""
    stripped = text.strip()
    if stripped == REBOOT:
        return
    if stripped.startswith("@") and stripped not in MACROS:
        known = ", ".join([*MACROS, REBOOT])
        case = " (macros are lower case)" if stripped.lower() in (*MACROS, REBOOT) else ""
        raise CronSyntaxError(f"unknown macro {stripped!r}{case}; known: {known}")
    expr = parse(text)
    if not expr.weekdays_restricted and not any(
        day <= _DAYS_IN_MONTH[month - 1] for month in expr.months for day in expr.days
    ):
        raise CronSyntaxError("never fires: no month it names has a day of month it names")


@lru_cache(maxsize=1)
def _calendar_cycle() -> tuple[tuple[int, int, int], ...]:
    """(month, day, weekday with 0 = Sunday) of every day of the cycle, in order."""
    days = (_CYCLE_START + timedelta(days=n) for n in range(_CYCLE_DAYS))
    return tuple((d.month, d.day, d.isoweekday() % 7) for d in days)


def widen_for_time_zone(expr: CronExpr) -> str:
    """A device-local expression that fires at every minute `expr` could fire in ANY time zone.

    Zone offsets are whole quarter hours, so the minutes are shifted by 0/15/30/45 and every
    other field is opened. The command then checks the real zone before enqueueing.
    """
    minutes = sorted({(m + shift) % 60 for m in expr.minutes for shift in (0, 15, 30, 45)})
    return f"{','.join(map(str, minutes))} * * * *"


def _parse_field(value: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset:
    lowered = value.lower()
    if lowered in names:
        return frozenset([names[lowered]])
    result: set[int] = set()
    for element in value.split(","):
        match = _ELEMENT.match(element)
        if not match:
            hint = " (month and weekday names are allowed only alone)" if any(
                n in lowered for n in names) else ""
            raise CronSyntaxError(f"{name} field: {element!r} is not a valid element{hint}")
        span, step = match.group(1), match.group(2)
        if span == "*":
            start, end = low, high
        elif "-" in span:
            start, end = (int(part) for part in span.split("-"))
        else:
            if step is not None:
                raise CronSyntaxError(f"{name} field: a step needs a range or '*', got {element!r}")
            start = end = int(span)
        if not (low <= start <= high and low <= end <= high):
            raise CronSyntaxError(f"{name} field: {element!r} is outside {low}-{high}")
        if start > end:
            raise CronSyntaxError(f"{name} field: range {element!r} runs backwards")
        stride = int(step) if step is not None else 1
        if stride < 1:
            raise CronSyntaxError(f"{name} field: step must be at least 1 in {element!r}")
        result.update(range(start, end + 1, stride))
    return frozenset(result)
