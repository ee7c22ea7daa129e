"""reconciler.cronexpr: cron expressions exactly as Debian's cron reads them.

`matches` is compared with croniter over thousands of minutes for expressions where the two
agree on the rules; where Debian's cron and croniter differ (a day field starting with `*/` is
"unrestricted" for cron), the test says so and follows cron.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from croniter import croniter

from reconciler import cronexpr
from reconciler.cronexpr import CronSyntaxError


def test_parse_expands_every_field():
    expr = cronexpr.parse("*/15 9-17/4 1,15 jan 1-5")
    assert expr.minutes == {0, 15, 30, 45}
    assert expr.hours == {9, 13, 17}
    assert expr.days == {1, 15}
    assert expr.months == {1}
    assert expr.weekdays == {1, 2, 3, 4, 5}
    assert (expr.days_restricted, expr.weekdays_restricted) == (True, True)


def test_stars_are_every_value_and_unrestricted():
    expr = cronexpr.parse("* * * * *")
    assert (len(expr.minutes), len(expr.hours), len(expr.days), len(expr.months), len(expr.weekdays)) \
        == (60, 24, 31, 12, 7)
    assert (expr.days_restricted, expr.weekdays_restricted) == (False, False)


@pytest.mark.parametrize("text, weekdays", [
    ("0 0 * * 7", {0}),
    ("0 0 * * 0", {0}),
    ("0 0 * * 0-7", {0, 1, 2, 3, 4, 5, 6}),
    ("0 0 * * 5-7", {5, 6, 0}),
    ("0 0 * * sun", {0}),
    ("0 0 * * SAT", {6}),
])
def test_seven_is_sunday_too(text, weekdays):
    assert cronexpr.parse(text).weekdays == weekdays


@pytest.mark.parametrize("macro, expanded", sorted(cronexpr.MACROS.items()))
def test_macros(macro, expanded):
    assert cronexpr.parse(macro) == replace(cronexpr.parse(expanded), text=macro)
    cronexpr.validate(macro)


def test_reboot_is_valid_but_has_no_times():
    cronexpr.validate("@reboot")
    with pytest.raises(CronSyntaxError):
        cronexpr.parse("@reboot")


@pytest.mark.parametrize("text, message", [
    ("0 * * * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
    ("", "expected 5 fields (minute hour day-of-month month day-of-week), got 0"),
    ("60 * * * *", "minute field: '60' is outside 0-59"),
    ("0 0 32 * *", "day of month field: '32' is outside 1-31"),
    ("0 0 * 0 *", "month field: '0' is outside 1-12"),
    ("0 0 * * mon-fri",
     "day of week field: 'mon-fri' is not a valid element (month and weekday names are allowed only alone)"),
    ("0 0 * jan,feb *",
     "month field: 'jan' is not a valid element (month and weekday names are allowed only alone)"),
    ("10/5 * * * *", "minute field: a step needs a range or '*', got '10/5'"),
    ("*/0 * * * *", "minute field: step must be at least 1 in '*/0'"),
    ("0 20-8 * * *", "hour field: range '20-8' runs backwards"),
    ("0 0 L * *", "day of month field: 'L' is not a valid element"),
    ("0 0 15W * *", "day of month field: '15W' is not a valid element"),
    ("0 0 * * 5#3", "day of week field: '5#3' is not a valid element"),
    ("0 0 ? * *", "day of month field: '?' is not a valid element"),
    ("0 0 31 4,6,9,11 *", "never fires: no month it names has a day of month it names"),
    ("0 0 30 2 *", "never fires: no month it names has a day of month it names"),
    ("٣٠ * * * *", "minute field: '٣٠' is not a valid element"),   # Arabic-Indic digits
    ("0 9 * * １", "day of week field: '１' is not a valid element"),  # a fullwidth digit
    ("0\u00a09 * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
    ("@every_5m", "unknown macro '@every_5m'; known: @yearly, @annually, @monthly, @weekly, @daily, "
                  "@midnight, @hourly, @reboot"),
    ("@HOURLY", "unknown macro '@HOURLY' (macros are lower case); known: @yearly, @annually, "
                "@monthly, @weekly, @daily, @midnight, @hourly, @reboot"),
])
def test_invalid_expressions(text, message):
    with pytest.raises(CronSyntaxError) as raised:
        cronexpr.validate(text)
    assert str(raised.value) == message


@pytest.mark.parametrize("text", [
    "0 0 29 2 *",        # leap years only, but it fires
    "0 0 30 2 1",        # never on the 30th, but on every Monday in February
    "0 0 31 * *",
    "*/100 * * * *",     # a step longer than the range: minute 0 only
])
def test_valid_edge_cases(text):
    cronexpr.validate(text)


MONDAY = datetime(2024, 3, 4, 12, 0)   # the 4th
FRIDAY_1ST = datetime(2024, 3, 1, 12, 0)
TUESDAY = datetime(2024, 3, 5, 12, 0)


@pytest.mark.parametrize("text, moment, fires", [
    ("0 12 1 * 1", MONDAY, True),        # both restricted: the weekday is enough...
    ("0 12 1 * 1", FRIDAY_1ST, True),    # ...and so is the day of month
    ("0 12 1 * 1", TUESDAY, False),
    ("0 12 1 * *", MONDAY, False),       # only the day restricted: it must match
    ("0 12 * * 1", FRIDAY_1ST, False),   # only the weekday restricted: it must match
    ("0 12 */2 * 1", MONDAY, False),     # `*/2` starts with `*`: unrestricted, so AND (see below)
    ("0 12 */2 * 1", datetime(2024, 3, 11, 12, 0), True),   # an odd Monday
    ("0 12 * * *", datetime(2024, 3, 4, 12, 1), False),
    ("0 12 * * *", datetime(2024, 3, 4, 11, 0), False),
    ("0 12 * mar *", MONDAY, True),
    ("0 12 * apr *", MONDAY, False),
    ("0 0 * * 7", datetime(2024, 3, 10, 0, 0), True),       # a Sunday
])
def test_matches(text, moment, fires):
    assert cronexpr.parse(text).matches(moment) is fires


def test_day_fields_starting_with_a_star_count_as_unrestricted_as_in_debian_cron():
    """crontab(5): the OR rule applies when both day fields are restricted ("aren't *"); cron's
    parser decides that by the field's first character, so `*/2` is unrestricted. croniter
    treats it as restricted and reads an OR: the two differ here, and spos follows cron."""
    assert cronexpr.parse("0 12 */2 * 1").matches(MONDAY) is False
    assert croniter.match("0 12 */2 * 1", MONDAY) is True


@pytest.mark.parametrize("text, minutes", [
    ("* * * * *", 1),
    ("*/5 * * * *", 5),
    ("0,1 * * * *", 1),
    ("0 * * * *", 60),
    ("0 0,23 * * *", 60),         # 23:00 to midnight
    ("0 9 * * *", 1440),
    ("0 9 * * 1-5", 1440),
    ("0 9 * * 1,2", 1440),
    ("30 3 * * 0", 7 * 1440),
    ("30 3 * * 7", 7 * 1440),
    ("0 0 1,15 * *", 14 * 1440),  # 1st to 15th; 15th to the next 1st is longer
    ("0 0 1,15 * 1", 1440),       # Monday the 14th, then the 15th
    ("0 12 */2 * *", 1440),       # the 31st, then the 1st
    ("@monthly", 28 * 1440),
    ("@yearly", 365 * 1440),
    ("0 0 29 2 *", 1461 * 1440),
])
def test_min_interval_minutes(text, minutes):
    assert cronexpr.parse(text).min_interval_minutes() == minutes


def test_min_interval_is_the_shortest_gap_croniter_sees():
    for text in ("0 0 1,15 * 1", "30 23 * * 5", "0 12 */2 * *", "0 0 * 1,2 *"):
        times = croniter(text, datetime(2024, 1, 1)).all_next(datetime)
        firings = [next(times) for _ in range(500)]
        shortest = min((b - a for a, b in zip(firings, firings[1:])), default=None)
        assert shortest == timedelta(minutes=cronexpr.parse(text).min_interval_minutes()), text


@pytest.mark.parametrize("text, widened", [
    ("0 9 * * *", "0,15,30,45 * * * *"),
    ("30 3 * * 0", "0,15,30,45 * * * *"),
    ("5 * * * *", "5,20,35,50 * * * *"),
    ("*/20 * * * *", "0,5,10,15,20,25,30,35,40,45,50,55 * * * *"),
    ("* 9 * * *", ",".join(map(str, range(60))) + " * * * *"),
])
def test_widen_for_time_zone(text, widened):
    assert cronexpr.widen_for_time_zone(cronexpr.parse(text)) == widened


@pytest.mark.parametrize("zone", [
    "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns",
    "Australia/Eucla", "Pacific/Chatham",
])
def test_the_widened_line_fires_whenever_the_expression_fires_in_the_zone(zone):
    """The crontab line runs on device time (UTC here); the command checks the zone. So every
    minute the expression matches in `zone` must be a minute the widened line matches."""
    expr = cronexpr.parse("7 9 * * 1-5")
    widened = cronexpr.parse(cronexpr.widen_for_time_zone(expr))
    tz = zoneinfo.ZoneInfo(zone)
    start = datetime(2024, 3, 20, tzinfo=timezone.utc)    # across the March DST changes
    fired = 0
    for hour in range(24 * 21):
        for minute in range(60):
            moment = start + timedelta(hours=hour, minutes=minute)
            if expr.matches(moment.astimezone(tz)):
                fired += 1
                assert widened.matches(moment), moment
    assert fired == 15


START = datetime(2024, 2, 26, 0, 0)   # across a leap day and a month end


def fire_times(text: str, start: datetime, end: datetime) -> set[datetime]:
    times = croniter(text, start - timedelta(minutes=1)).all_next(datetime)
    found = set()
    for moment in times:
        if moment >= end:
            return found
        found.add(moment)


@pytest.mark.parametrize("text", [
    "*/5 * * * *",
    "0 * * * *",
    "15,45 9-17 * * 1-5",
    "0-59/7 */3 * * *",
    "0 22 * * 1-5",
    "59 23 * * *",
    "@hourly",
])
def test_matches_agrees_with_croniter_minute_by_minute(text):
    expr = cronexpr.parse(text)
    end = START + timedelta(minutes=5_000)
    minutes = (START + timedelta(minutes=n) for n in range(5_000))
    assert {moment for moment in minutes if expr.matches(moment)} == fire_times(text, START, end)


@pytest.mark.parametrize("text", [
    "30 3 * * 0",
    "30 3 * * 7",
    "0 12 1,15 * 1",        # cron's OR rule
    "0 12 13 * 5",
    "0 0 29 2 *",
    "0 6 1-7 * *",
    "5 4 * 1,2 *",
    "@weekly",
    "@monthly",
    "@yearly",
])
def test_matches_agrees_with_croniter_day_by_day(text):
    """Over eight years, at every minute of the day the expression names."""
    expr = cronexpr.parse(text)
    end = datetime(2032, 1, 1)
    ours = set()
    day = datetime(2024, 1, 1)
    while day < end:
        for hour in expr.hours:
            for minute in expr.minutes:
                moment = day.replace(hour=hour, minute=minute)
                if expr.matches(moment):
                    ours.add(moment)
        day += timedelta(days=1)
    assert ours == fire_times(text, datetime(2024, 1, 1), end)


@pytest.mark.parametrize("weekdays", ["1-5", "1", "0,6", "2,4,6", "0-6", "5,1", "3"])
def test_weekday_rules_give_the_gap_a_walk_over_the_calendar_gives(weekdays):
    from reconciler.cronexpr import _CYCLE_DAYS, _calendar_cycle, _fires_on

    expr = cronexpr.parse(f"0 9 * * {weekdays}")
    rule = (expr.months, expr.days, expr.weekdays, expr.days_restricted and expr.weekdays_restricted)
    firing = [n for n, day in enumerate(_calendar_cycle()) if _fires_on(rule, *day)]
    walked = min((b - a for a, b in zip(firing, firing[1:])), default=_CYCLE_DAYS)
    assert expr.min_interval_minutes() == walked * 1440
