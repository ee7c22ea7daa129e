"""Cron expressions exactly as Debian's cron reads them: parsing, matching, interval bounds.

Pure: no clock, no files. croniter accepts more than the cron daemon does (seconds fields, `L`,
`W`, `#`), so validation here follows crontab(5) instead: five fields of `*`, numbers, ranges,
steps and lists; month and weekday names only as single values; the `@` macros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

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
_ELEMENT = re.compile(r"^(\*|\d+(?:-\d+)?)(?:/(\d+))?$")


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
        if moment.month not in self.months:
            return False
        day_ok = moment.day in self.days
        weekday_ok = (moment.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def min_interval_minutes(self) -> int:
        """A lower bound on the minutes between two consecutive firings."""
        times = sorted(h * 60 + m for h in self.hours for m in self.minutes)
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        gaps.append(1440 - times[-1] + times[0])
        return min(gaps)


def parse(text: str) -> CronExpr:
    """Parse a five-field expression or an `@` macro (not `@reboot`, which has no times)."""
    expanded = MACROS.get(text.strip().lower(), text)
    fields = expanded.split()
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
    """Raise CronSyntaxError unless Debian's cron accepts `text` as a schedule."""
    if text.strip().lower() == REBOOT:
        return
    if text.strip().startswith("@") and text.strip().lower() not in MACROS:
        known = ", ".join([*MACROS, REBOOT])
        raise CronSyntaxError(f"unknown macro {text.strip()!r}; known: {known}")
    parse(text)


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
