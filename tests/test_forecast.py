"""`spos schedule next`: fire times and the overlap and catch-up policies in words.

Most tests are pure: a fixed `now`, an explicit zone for Schedules without a timeZone, and a
stand-in for systemd's calendar. Those marked `needs_systemd_analyze` ask systemd itself.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from textwrap import dedent

import pytest

from reconciler import forecast
from reconciler.forecast import CalendarUnavailable, next_fires
from reconciler.manifest import Manifest, ManifestSet
from reconciler.validate import load

EXAMPLES = Path(__file__).resolve().parent.parent / "agents.d"
NOW = datetime(2025, 3, 28, 12, 2, 30, tzinfo=timezone.utc)
"""A Friday; Europe/Berlin moves its clocks forward on Sunday 2025-03-30 at 02:00."""
TASK = {"command": ["/bin/true"], "timeout": "2m"}

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd): systemd computes "
           "calendar events",
)


def manifest_set(schedules: dict[str, dict], tasks: dict | None = None,
                 agents: tuple[str, ...] = ("alpha",)) -> ManifestSet:
    """Agents with `tasks` (one task `ping` by default) and Schedules of `ping` of the first."""
    manifests = [Manifest("Agent", name, {"tasks": tasks or {"ping": TASK}}, {}, "test.yaml", n, 1)
                 for n, name in enumerate(agents)]
    manifests += [Manifest("Schedule", name, {"agent": agents[0], "task": "ping", **spec}, {},
                           "test.yaml", len(agents) + n, 1)
                  for n, (name, spec) in enumerate(schedules.items())]
    return ManifestSet(manifests)


def no_calendar(event, zone, after, count):
    raise AssertionError(f"no calendar event expected, asked for {event!r}")


def weekly_calendar(event, zone, after, count):
    """Stands in for systemd: every Sunday at 04:00 UTC after `after`."""
    first = datetime(2025, 3, 30, 4, 0, tzinfo=timezone.utc)
    return [first + timedelta(weeks=n) for n in range(count)]


def forecast_of(schedules: dict[str, dict], tasks: dict | None = None, count: int = 5,
                zone: str = "UTC", calendar=no_calendar) -> dict:
    return next_fires(manifest_set(schedules, tasks), count=count, now=NOW, zone=zone,
                      calendar=calendar)


def only(result: dict) -> dict:
    [entry] = result["schedules"]
    return entry


# ---------------------------------------------------------------- cron


def test_every_five_minutes():
    entry = only(forecast_of({"health": {"cron": "*/5 * * * *"}}, count=3))
    assert entry["next"] == entry["nextUtc"] == [
        "2025-03-28T12:05:00+00:00", "2025-03-28T12:10:00+00:00", "2025-03-28T12:15:00+00:00"]
    assert entry["kind"] == "cron"
    assert entry["expression"] == "every 5 minutes (*/5 * * * *)"
    assert entry["timeZone"] is None and entry["relative"] is None
    assert entry["overlap"] == "a run ends (timeout 2m) before the next fire"
    assert entry["catchUp"] == (
        "cron does not run fires missed while the device is off (or cron is down); a run the "
        "executor cannot start at once waits in the queue, with no deadline")
    assert entry["notes"] == []


def test_fires_come_strictly_after_now():
    on_the_minute = NOW.replace(minute=5, second=0)
    result = next_fires(manifest_set({"health": {"cron": "*/5 * * * *"}}), count=1,
                        now=on_the_minute, zone="UTC", calendar=no_calendar)
    assert only(result)["next"] == ["2025-03-28T12:10:00+00:00"]
    assert result["now"] == "2025-03-28T12:05:00+00:00"


def test_daily_in_berlin_keeps_its_wall_time_across_the_change_to_summer_time():
    entry = only(forecast_of({"daily": {"cron": "0 9 * * *", "timeZone": "Europe/Berlin",
                                        "startingDeadline": "30m"}}, count=4))
    assert entry["next"] == ["2025-03-29T09:00:00+01:00", "2025-03-30T09:00:00+02:00",
                             "2025-03-31T09:00:00+02:00", "2025-04-01T09:00:00+02:00"]
    assert entry["nextUtc"] == ["2025-03-29T08:00:00+00:00", "2025-03-30T07:00:00+00:00",
                                "2025-03-31T07:00:00+00:00", "2025-04-01T07:00:00+00:00"]
    assert entry["timeZone"] == "Europe/Berlin"
    assert entry["expression"] == "daily at 09:00 (0 9 * * *)"
    assert entry["notes"] == []  # 09:00 is neither skipped nor repeated
    assert entry["catchUp"].endswith(
        "a run that cannot start within 30m of its fire (executor busy or down) is dropped")


def test_a_time_zone_schedule_skips_a_skipped_wall_time_and_fires_twice_in_a_repeated_one():
    spring = only(forecast_of({"night": {"cron": "30 2 * * *", "timeZone": "Europe/Berlin"}},
                              count=2))
    assert spring["next"] == ["2025-03-29T02:30:00+01:00", "2025-03-31T02:30:00+02:00"]
    assert spring["notes"] == ["on 2025-03-30 the clocks in Europe/Berlin skip 02:30 (they go "
                               "forward): that fire does not happen"]

    berlin = manifest_set({"night": {"cron": "30 2 * * *", "timeZone": "Europe/Berlin"}})
    autumn = next_fires(berlin, count=3, now=datetime(2025, 10, 25, 12, 0, tzinfo=timezone.utc),
                        zone="UTC", calendar=no_calendar)
    entry = only(autumn)
    assert entry["next"] == ["2025-10-26T02:30:00+02:00", "2025-10-26T02:30:00+01:00",
                             "2025-10-27T02:30:00+01:00"]
    assert entry["notes"] == ["on 2025-10-26 the clocks in Europe/Berlin show 02:30 twice (they "
                              "go back): that fire happens both times"]


def test_the_devices_cron_moves_a_skipped_fixed_time_job_and_runs_a_repeated_one_once():
    """Without timeZone, Debian's cron reads the line in the device's zone, with its own rule."""
    spring = only(forecast_of({"night": {"cron": "30 2 * * *"}}, count=2, zone="Europe/Berlin"))
    assert spring["timeZone"] is None
    assert spring["next"] == ["2025-03-29T02:30:00+01:00", "2025-03-30T03:00:00+02:00"]
    assert spring["notes"] == [
        "on 2025-03-30 the clocks in Europe/Berlin skip 02:30 (they go forward): cron runs it "
        "right after the change, at 2025-03-30T03:00:00+02:00"]

    autumn = only(next_fires(manifest_set({"night": {"cron": "30 2 * * *"}}), count=2,
                             now=datetime(2025, 10, 25, 12, 0, tzinfo=timezone.utc),
                             zone="Europe/Berlin", calendar=no_calendar))
    assert autumn["next"] == ["2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]
    assert autumn["notes"][0].endswith("cron runs it once, the first time")


def test_a_wildcard_job_follows_the_new_time_in_the_devices_zone():
    entry = only(forecast_of({"often": {"cron": "*/30 2 * * *"}}, count=3, zone="Europe/Berlin"))
    assert entry["next"] == ["2025-03-29T02:00:00+01:00", "2025-03-29T02:30:00+01:00",
                             "2025-03-31T02:00:00+02:00"]
    assert entry["notes"] == ["on 2025-03-30 the clocks in Europe/Berlin skip 02:00 to 02:30 "
                              "(they go forward): cron skips them"]


def test_reboot_has_no_clock_times():
    entry = only(forecast_of({"boot": {"cron": "@reboot"}}))
    assert entry["next"] == entry["nextUtc"] == []
    assert entry["relative"] == "once at every boot, when cron starts"
    assert entry["expression"] == "once at every boot, when cron starts (@reboot)"
    assert entry["overlap"] == ("it fires once per boot, so its runs do not overlap one another "
                                "(timeout 2m)")
    assert entry["catchUp"].startswith(
        "it fires at every boot, so nothing is missed while the device is off")


@pytest.mark.parametrize("concurrency, effect", [
    ("Forbid", "skips a fire while the previous run is going"),
    ("Allow", "lets runs overlap, up to 4 at once"),
    ("Replace", "stops the running one and starts the new one"),
    ("Queue", "makes the fire wait for it; when runs keep taking longer than 5m, waiting runs "
              "pile up"),
])
def test_a_run_longer_than_the_interval_meets_the_next_fire_as_concurrency_says(concurrency,
                                                                               effect):
    tasks = {"ping": {**TASK, "timeout": "20m", "concurrency": concurrency}}
    entry = only(forecast_of({"often": {"cron": "*/5 * * * *"}}, tasks))
    assert entry["overlap"] == (f"fires every 5m but a run may take up to 20m: concurrency "
                                f"{concurrency} (the task's) {effect}")


def test_the_schedules_concurrency_holds_over_the_tasks_and_forbid_is_the_default():
    slow = {"ping": {**TASK, "timeout": "20m", "concurrency": "Forbid"}}
    queued = only(forecast_of({"often": {"cron": "*/15 8-17 * * 1-5", "concurrency": "Queue",
                                         "startingDeadline": "4m"}}, slow))
    assert queued["expression"] == "every 15 minutes during hours 08-17 on Monday to Friday " \
                                   "(*/15 8-17 * * 1-5)"
    assert queued["overlap"] == (
        "fires as often as every 15m but a run may take up to 20m: concurrency Queue (the "
        "Schedule's) makes the fire wait for it; when runs keep taking longer than 15m, waiting "
        "runs pile up; a fire that cannot start within startingDeadline 4m is dropped")

    plain = only(forecast_of({"often": {"cron": "*/5 * * * *"}},
                             {"ping": {"command": ["/bin/true"]}}))
    assert plain["overlap"] == ("fires every 5m but a run may take up to 1h: concurrency Forbid "
                                "(the default) skips a fire while the previous run is going")


def test_retries_that_reach_the_next_fire_are_said():
    tasks = {"ping": {**TASK, "timeout": "6h", "concurrency": "Forbid",
                      "retries": {"limit": 3, "backoff": {"initial": "5m", "factor": 2,
                                                          "max": "30m"}}}}
    entry = only(forecast_of({"nightly": {"cron": "0 2 * * *"}}, tasks))
    assert entry["overlap"] == (
        "a run ends (timeout 6h) before the next fire; but a failing run, retried up to 3 times, "
        "can go on for up to 24h38m30s, past the next fire, where concurrency Forbid (the "
        "task's) applies")


# ---------------------------------------------------------------- timers


def test_calendar_times_come_from_the_calendar_it_is_handed():
    asked = []

    def calendar(event, zone, after, count):
        asked.append((event, str(zone), after, count))
        return weekly_calendar(event, zone, after, count)

    entry = only(forecast_of({"rotate": {"timer": {"onCalendar": "Sun *-*-* 04:00:00",
                                                   "randomizedDelaySec": "10m"}}},
                             count=2, calendar=calendar))
    assert asked == [("Sun *-*-* 04:00:00", "UTC", NOW, forecast.SAMPLE)]
    assert entry["kind"] == "timer" and entry["timeZone"] is None
    assert entry["expression"] == 'calendar "Sun *-*-* 04:00:00"'
    assert entry["next"] == ["2025-03-30T04:00:00+00:00", "2025-04-06T04:00:00+00:00"]
    assert entry["overlap"] == "a run ends (timeout 2m) before the next fire"
    assert entry["notes"] == [
        "each fire delayed by up to 10m at random (randomizedDelaySec); the times shown are the "
        "earliest",
        "systemd may start a run up to 1m late to group wake-ups (accuracy, the default)",
    ]


@needs_systemd_analyze
def test_calendar_times_from_systemd_in_the_devices_zone():
    entry = only(forecast_of({"rotate": {"timer": {"onCalendar": ["Sun *-*-* 04:00:00",
                                                                  "Wed *-*-* 12:00"]}}},
                             count=3, zone="Europe/Berlin", calendar=None))
    assert entry["next"] == ["2025-03-30T04:00:00+02:00", "2025-04-02T12:00:00+02:00",
                             "2025-04-06T04:00:00+02:00"]
    assert entry["nextUtc"][0] == "2025-03-30T02:00:00+00:00"
    assert entry["expression"] == 'calendar "Sun *-*-* 04:00:00" and "Wed *-*-* 12:00"'


@needs_systemd_analyze
def test_systemd_calendar_counts_strictly_after_the_base_time():
    sunday = datetime(2025, 3, 30, 4, 0, tzinfo=timezone.utc)
    fires = forecast.systemd_calendar("Sun *-*-* 04:00:00", timezone.utc, sunday, 2)
    assert fires == [sunday + timedelta(weeks=1), sunday + timedelta(weeks=2)]
    assert forecast.systemd_calendar("2001-01-01", timezone.utc, sunday, 3) == []


def test_without_systemd_analyze_calendar_times_are_left_out_with_a_note():
    def missing(event, zone, after, count):
        raise CalendarUnavailable("systemd-analyze is not installed here")

    result = forecast_of({"rotate": {"timer": {"onCalendar": "Sun *-*-* 04:00:00"}}},
                         calendar=missing)
    entry = only(result)
    assert entry["next"] == []
    assert entry["notes"][0] == ("the onCalendar times are not shown: systemd-analyze is not "
                                 "installed here; systemd computes them on the device")
    assert entry["overlap"] == ("not known here without the fire times; a run may take up to 2m")
    assert "  next:     none to show (see the notes)" in forecast.text(result)


def test_boot_and_interval_timers_are_described_relative_to_boot_and_the_last_run():
    entry = only(forecast_of({"upload": {"timer": {"onBootSec": "5m", "onUnitActiveSec": "15m",
                                                   "randomizedDelaySec": "10m",
                                                   "accuracy": "1m"}}}))
    relative = "5m after boot, then every 15m after the last run started"
    assert entry["relative"] == entry["expression"] == relative
    assert entry["next"] == []
    assert entry["overlap"] == "a run ends (timeout 2m) before the next fire"
    assert entry["catchUp"] == ("nothing to catch up from boot and the last run: the first run "
                                "comes 5m after boot, each next one 15m after the last run "
                                "started")
    assert entry["notes"] == [
        "each fire delayed by up to 10m at random (randomizedDelaySec); the times shown are the "
        "earliest",
        "systemd may start a run up to 1m late to group wake-ups (accuracy)",
    ]


def test_a_timer_run_longer_than_its_interval():
    tasks = {"ping": {**TASK, "timeout": "20m", "concurrency": "Replace"}}
    entry = only(forecast_of({"upload": {"timer": {"onBootSec": "5m",
                                                   "onUnitActiveSec": "15m"}}}, tasks))
    assert entry["overlap"] == (
        "fires every 15m but a run may take up to 20m: systemd starts no second run of the "
        "timer's service while one is going; against the task's other runs (cron, triggers, by "
        "hand) concurrency Replace (the task's) stops them and then starts the timer's run")


def test_boot_only_and_interval_only_timers():
    boot = only(forecast_of({"report": {"timer": {"onBootSec": "2m", "persistent": True}}}))
    assert boot["relative"] == "2m after boot"
    assert boot["overlap"] == ("it fires once per boot, so its runs do not overlap one another "
                               "(timeout 2m)")
    assert "persistent has no effect without onCalendar" in boot["notes"]

    interval = only(forecast_of({"tick": {"timer": {"onUnitActiveSec": "1h"},
                                          "startingDeadline": "5m"}}))
    assert interval["relative"] == "every 1h after the last run started"
    assert ("onUnitActiveSec counts from the last run, and after boot there is none: nothing "
            "starts the first run (add onBootSec)") in interval["notes"]
    assert ("startingDeadline 5m has no effect on a timer: the run starts at the fire time"
            in interval["notes"])


@pytest.mark.parametrize("persistent, said", [
    (True, "a calendar fire missed while the device was off runs once at boot (persistent: true)"),
    (False, "a calendar fire missed while the device was off is not run (persistent is off)"),
])
def test_persistent_catches_up_a_missed_calendar_fire_at_boot(persistent, said):
    entry = only(forecast_of({"rotate": {"timer": {"onCalendar": "Sun *-*-* 04:00:00",
                                                   "persistent": persistent}}},
                             calendar=weekly_calendar))
    assert entry["catchUp"] == said


# ---------------------------------------------------------------- the listing


def test_suspended_schedules_are_listed_without_times_and_last():
    result = forecast_of({"paused": {"cron": "* * * * *", "suspend": True},
                          "boot": {"timer": {"onBootSec": "2m"}},
                          "hourly": {"cron": "0 * * * *"}})
    assert [entry["name"] for entry in result["schedules"]] == ["hourly", "boot", "paused"]
    paused = result["schedules"][-1]
    assert paused["suspended"] is True
    assert paused["next"] == paused["nextUtc"] == []
    assert paused["notes"][0] == ("suspended: its crontab line is commented out, so it starts "
                                  "nothing")
    listing = forecast.text(result).split("\n\n")[-1]
    assert listing.splitlines()[:4] == [
        "paused  cron  alpha/ping  (suspended)",
        "  when:     every minute (* * * * *)",
        "  zone:     the device's (shown in UTC)",
        "  next:     none: suspended",
    ]
    assert "overlap:" not in listing


def test_schedules_are_sorted_by_their_next_fire():
    result = forecast_of({"a-yearly": {"cron": "0 0 1 1 *"},
                          "b-daily": {"cron": "0 9 * * *", "timeZone": "Asia/Tokyo"},
                          "c-minutely": {"cron": "* * * * *"},
                          "d-weekly": {"timer": {"onCalendar": "Sun *-*-* 04:00:00"}}},
                         calendar=weekly_calendar)
    assert [entry["name"] for entry in result["schedules"]] == [
        "c-minutely", "b-daily", "d-weekly", "a-yearly"]
    assert only({"schedules": result["schedules"][1:2]})["next"][0] == "2025-03-29T09:00:00+09:00"


def test_only_one_agents_schedules():
    manifests = manifest_set({"mine": {"cron": "0 * * * *"}}, agents=("alpha", "beta"))
    manifests.manifests.append(Manifest("Schedule", "theirs", {
        "agent": "beta", "task": "ping", "cron": "*/5 * * * *"}, {}, "test.yaml", 9, 1))
    both = next_fires(manifests, now=NOW, zone="UTC")
    assert [entry["name"] for entry in both["schedules"]] == ["theirs", "mine"]
    beta = next_fires(manifests, agent="beta", now=NOW, zone="UTC")
    assert [entry["name"] for entry in beta["schedules"]] == ["theirs"]
    nobody = next_fires(manifests, agent="gamma", now=NOW, zone="UTC")
    assert nobody["schedules"] == []
    assert forecast.text(nobody).endswith("\n\nNo Schedules.\n")


def test_the_text_is_rendered_from_the_json_form():
    result = forecast_of({"daily": {"cron": "0 9 * * *", "timeZone": "Europe/Berlin"}}, count=2)
    assert forecast.text(json.loads(json.dumps(result))) == dedent("""\
        Next fires after 2025-03-28T12:02:30+00:00. Schedules without a timeZone, and timers, are shown in
        this machine's time zone, UTC; the device reads them in its own.

        daily  cron  alpha/ping
          when:     daily at 09:00 (0 9 * * *)
          zone:     Europe/Berlin
          next:     2025-03-29T09:00:00+01:00  (UTC 2025-03-29T08:00:00+00:00)
                    2025-03-30T09:00:00+02:00  (UTC 2025-03-30T07:00:00+00:00)
          overlap:  a run ends (timeout 2m) before the next fire
          catch-up: cron does not run fires missed while the device is off (or cron is down); a run the
                    executor cannot start at once waits in the queue, with no deadline
        """)


@pytest.mark.parametrize("expression, words", [
    ("0 * * * *", "every hour at :00"),
    ("0 */6 * * *", "daily at 00:00, 06:00, 12:00 and 18:00"),
    ("0 */2 * * *", "every 2 hours at :00"),
    ("30 3 * * 0", "at 03:30 on Sundays"),
    ("0 8 1 * *", "at 08:00 on the 1st of every month"),
    ("0 0 1,15 * 1", "at 00:00 on the 1st and 15th of every month or on Mondays"),
    ("15 10 * 1-3,12 6,7", "at 10:15 on Saturdays and Sundays in January to March and December"),
    ("@weekly", "at 00:00 on Sundays"),
])
def test_cron_expressions_in_words(expression, words):
    entry = only(forecast_of({"s": {"cron": expression}}, count=1))
    assert entry["expression"] == f"{words} ({expression})"


# ---------------------------------------------------------------- the command


def write_manifests(directory: Path) -> Path:
    directory.mkdir()
    (directory / "alpha.yaml").write_text(dedent("""\
        apiVersion: spos/v1
        kind: Agent
        metadata: {name: alpha}
        spec:
          tasks:
            ping: {command: [/bin/true], timeout: 2m}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: a-yearly}
        spec: {agent: alpha, task: ping, cron: "0 0 1 1 *"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: b-hourly}
        spec: {agent: alpha, task: ping, cron: "17 * * * *", timeZone: Asia/Kolkata}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: c-every-two-minutes}
        spec: {agent: alpha, task: ping, cron: "*/2 * * * *"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: d-paused}
        spec: {agent: alpha, task: ping, cron: "* * * * *", suspend: true}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: e-boot}
        spec: {agent: alpha, task: ping, timer: {onBootSec: 2m}}
        """))
    return directory


def listed(text: str) -> list[tuple[str, str | None]]:
    """(Schedule name, its first `next:` value) per block of the listing, in order."""
    blocks = []
    for block in text.split("\n\n")[1:]:
        lines = block.splitlines()
        first = next((line.split("next:", 1)[1].split()[0] for line in lines
                      if line.startswith("  next:")), None)
        blocks.append((lines[0].split()[0], first))
    return blocks


def test_the_command_prints_json_and_a_listing_sorted_by_next_fire(spos, tmp_path):
    manifests = write_manifests(tmp_path / "agents.d")
    result = spos("schedule", "next", manifests, "--json", "-n", "3")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert set(data) == {"now", "localZone", "schedules"}
    names = [entry["name"] for entry in data["schedules"]]
    assert sorted(names) == ["a-yearly", "b-hourly", "c-every-two-minutes", "d-paused", "e-boot"]
    assert names[-2:] == ["e-boot", "d-paused"]
    timed = [entry["nextUtc"] for entry in data["schedules"][:3]]
    assert all(len(times) == 3 for times in timed)
    assert [times[0] for times in timed] == sorted(times[0] for times in timed)
    kolkata = next(entry for entry in data["schedules"] if entry["name"] == "b-hourly")
    assert all(time.endswith(":17:00+05:30") for time in kolkata["next"])
    assert all(time.endswith(":47:00+00:00") for time in kolkata["nextUtc"])

    text = spos("schedule", "next", manifests)
    assert text.code == 0, text.err
    blocks = listed(text.out)
    assert sorted(name for name, _ in blocks) == sorted(names)
    firsts = [datetime.fromisoformat(first) for _, first in blocks[:3]]
    assert firsts == sorted(firsts)
    assert blocks[3:] == [("e-boot", "no"), ("d-paused", "none:")]


def test_the_command_lists_every_example_schedule(spos):
    examples = set(load(EXAMPLES, None).of_kind("Schedule"))
    result = spos("schedule", "next", EXAMPLES)
    assert result.code == 0, result.err
    assert {name for name, _ in listed(result.out)} == examples

    monitor = spos("schedule", "next", EXAMPLES, "--agent", "monitor-001", "--json")
    assert monitor.code == 0, monitor.err
    assert [entry["name"] for entry in json.loads(monitor.out)["schedules"]] == [
        "monitor-001-health", "monitor-001-boot"]
