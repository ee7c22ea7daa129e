"""`spos schedule suggest` and the load samples it rests on.

The sampler is driven with stand-in counters and clocks; the daemon's hook is shown to call it
and to survive it failing. Suggestions are made from synthetic samples and run records written
into a temporary device root, with a fixed `now` and zone, over manifests written for each test
into a project directory that is the working directory (so files read `agents.d/<file>`). The
diff is applied by real `git apply` and the result validated by `spos validate`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler import loadlog
from reconciler.agentd import Daemon, DaemonSettings
from reconciler.device import Device
from reconciler.loadlog import Reading, Sample, Sampler
from reconciler.suggest import propose, text
from reconciler.sync import SyncOptions

STATE = "var/lib/systemprompt-os"
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)
"""A Sunday; Europe/Berlin is at UTC+1 until 2026-03-29."""
DAY = 86400


# ---------------------------------------------------------------- the samples


class Counters:
    """Stands in for the machine: each reading adds `busy` of every 10 CPU seconds."""

    def __init__(self, busy: float = 2.5, fail: bool = False):
        self.busy, self.fail, self.total = busy, fail, 0.0

    def __call__(self) -> Reading:
        if self.fail:
            raise OSError("cannot read /proc/stat")
        self.total += 10.0
        return Reading(load1=0.75, cpu_busy=self.total * self.busy / 10, cpu_total=self.total,
                       memory_percent=41.0, cpus=4)


class Clock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def sampler(device: Device, logged: list[str], counters=None, interval: float = 300.0,
            clock=None, monotonic=None) -> Sampler:
    return Sampler(device, logged.append, interval=interval, counters=counters or Counters(),
                   clock=clock or Clock(NOW.timestamp()), monotonic=monotonic or Clock())


def samples_file(root: Path) -> Path:
    return root / STATE / "load-samples"


def test_a_sample_is_taken_once_per_interval_the_first_tick_only_reads_the_counters(device_root):
    device, logged, monotonic = Device(device_root), [], Clock()
    taker = sampler(device, logged, monotonic=monotonic)

    for moment in (0, 100, 299, 300, 450, 600, 899):
        monotonic.now = moment
        taker.tick()

    assert samples_file(device_root).read_text() == (
        f"{NOW.timestamp():.0f} 0.75 25.0 41.0 4\n" * 2)  # at 300 and 600: 2.5 of 10 CPU seconds
    assert loadlog.read(device) == [Sample(NOW.timestamp(), 0.75, 25.0, 41.0, 4)] * 2
    assert logged == []


def test_the_file_keeps_two_weeks_and_is_compacted_atomically(device_root):
    device = Device(device_root)
    start = NOW.timestamp() - 16 * DAY
    early = [Sample(start + n * 300, 0.5, 10.0, 40.0, 2) for n in range(15 * 288 - 1)]
    samples_file(device_root).parent.mkdir(parents=True)
    samples_file(device_root).write_text("".join(sample.line() for sample in early))
    sizes = []
    for n in range(len(early), 16 * 288):  # a day more, a sample every 5 minutes
        loadlog.append(device, Sample(start + n * 300, 0.5, 10.0, 40.0, 2))
        sizes.append(samples_file(device_root).stat().st_size)

    kept = loadlog.read(device)
    newest = start + (16 * 288 - 1) * 300
    assert kept[-1].at == newest and newest - kept[0].at < loadlog.KEEP_SECONDS + DAY
    assert min(sizes) < sizes[0], "compacted once the oldest sample was a day past two weeks"
    assert max(sizes) < loadlog.MAX_BYTES
    assert not [p for p in samples_file(device_root).parent.iterdir() if "spos-tmp" in p.name]


def test_the_file_stays_bounded_whatever_the_clock_says(device_root):
    device = Device(device_root)
    stuck = Sample(NOW.timestamp(), 123.45, 100.0, 100.0, 64)  # never too old
    samples_file(device_root).parent.mkdir(parents=True)
    samples_file(device_root).write_text(stuck.line() * (loadlog.MAX_BYTES // len(stuck.line())))
    for _ in range(10):
        loadlog.append(device, stuck)
        assert samples_file(device_root).stat().st_size <= loadlog.MAX_BYTES
    assert samples_file(device_root).stat().st_size <= loadlog.MAX_BYTES // 2 + 10 * len(stuck.line())


def test_a_torn_last_line_is_skipped_and_cut_off_by_the_next_append(device_root):
    device = Device(device_root)
    first = Sample(NOW.timestamp() - 600, 0.5, 10.0, 40.0, 4)
    samples_file(device_root).parent.mkdir(parents=True)
    torn = "1773576000 0.61 12.5 40.0 1"  # cut short in "16", its number of CPUs
    samples_file(device_root).write_text(first.line() + torn)

    assert loadlog.read(device) == [first]

    second = Sample(NOW.timestamp(), 0.7, 20.0, 41.0, 4)
    loadlog.append(device, second)
    assert samples_file(device_root).read_text() == first.line() + second.line()


@pytest.mark.parametrize("line", [
    "1773576000 0.61 -100000 40.0 4",  # CPU percent below 0
    "1773576000 0.61 100.1 40.0 4",  # above 100
    "1773576000 0.61 12.5 1e308 4",  # memory percent above 100
    "1773576000 -0.1 12.5 40.0 4",  # a negative load
    "1773576000 1e308 12.5 40.0 4",  # a load larger than Linux can have tasks
    "1773576000 0.61 nan 40.0 4",
    "inf 0.61 12.5 40.0 4",
    "1773576000 0.61 12.5 40.0 0",  # no CPU
    f"1773576000 0.61 12.5 40.0 {10 ** 400}",  # more CPUs than Linux can be built for
])
def test_a_line_no_sample_could_be_is_skipped(device_root, line):
    device = Device(device_root)
    kept = Sample(NOW.timestamp(), 4194304.0, 100.0, 0.0, 8192)  # the largest believable
    samples_file(device_root).parent.mkdir(parents=True)
    samples_file(device_root).write_text(line + "\n" + kept.line())

    assert loadlog.read(device) == [kept]


def test_a_sample_that_cannot_be_taken_or_written_is_logged_and_skipped(device_root):
    device, logged = Device(device_root), []
    sampler(device, logged, counters=Counters(fail=True)).tick()
    (device_root / STATE).mkdir(parents=True)
    samples_file(device_root).mkdir()  # the file cannot be opened for writing
    unwritable = sampler(device, logged, interval=0)
    unwritable.tick()
    unwritable.tick()

    assert logged == [
        "spos daemon: load sample not taken: OSError: cannot read /proc/stat",
        f"spos daemon: load sample not taken: IsADirectoryError: [Errno 21] Is a directory: "
        f"'{samples_file(device_root)}'",
    ]


def test_the_daemon_samples_on_its_loop_and_goes_on_when_sampling_fails(device_root):
    logged = []
    daemon = Daemon(str(device_root), SyncOptions(repo=str(device_root / "no-remote")),
                    DaemonSettings(children=()), log=logged.append)
    daemon.next_sync = daemon.next_drift = math.inf  # only the sampler is due
    assert isinstance(daemon.load, Sampler)
    daemon.load = sampler(daemon.device, logged, interval=0)

    daemon.cycle()
    daemon.cycle()
    assert len(loadlog.read(daemon.device)) == 1

    daemon.load = sampler(daemon.device, logged, counters=Counters(fail=True))
    daemon.cycle()
    assert logged == ["spos daemon: load sample not taken: OSError: cannot read /proc/stat"]
    assert json.loads((device_root / STATE / "daemon.json").read_text())["pid"] == os.getpid()


def test_the_real_counters_give_a_plausible_reading():
    reading = loadlog.read_counters()
    assert reading.cpus >= 1 and 0 <= reading.memory_percent <= 100
    assert 0 <= reading.cpu_busy <= reading.cpu_total and reading.load1 >= 0


# ---------------------------------------------------------------- a device with a history


def quiet_at_four(hour: int) -> float:
    """The device's CPU percent by hour (UTC): busy at night and at 09:00, quiet at 04:00."""
    return {1: 70.0, 2: 70.0, 9: 70.0, 4: 5.0, 5: 12.0}.get(hour, 30.0)


def write_samples(root: Path, days: float, cpu_of_hour=quiet_at_four, end: datetime = NOW) -> None:
    """A sample every 5 minutes for `days` up to `end`."""
    lines, moment = [], end.timestamp() - days * DAY + 300
    while moment <= end.timestamp():
        hour = datetime.fromtimestamp(moment - 150, timezone.utc).hour
        lines.append(Sample(moment, cpu_of_hour(hour) / 25, cpu_of_hour(hour), 40.0, 4).line())
        moment += 300
    samples_file(root).parent.mkdir(parents=True, exist_ok=True)
    samples_file(root).write_text("".join(lines))


def write_runs(root: Path, agent: str, task: str, hour: int, minute: int = 0, days: int = 3,
               seconds: float = 1200.0, cpu: float = 600.0, end: datetime = NOW) -> None:
    """A completed run of `task` at hour:minute (UTC) on each of the last `days` days."""
    completed = root / STATE / "agents" / agent / "completed"
    completed.mkdir(parents=True, exist_ok=True)
    for day in range(1, days + 1):
        started = (end - timedelta(days=day)).replace(hour=hour, minute=minute)
        ended = started + timedelta(seconds=seconds)
        run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        attempt = {"attempt": 1, "state": "completed", "startedAt": started.isoformat(),
                   "endedAt": ended.isoformat(), "durationSeconds": seconds,
                   "usage": {"cpuSeconds": cpu, "peakMemoryBytes": 50_000_000}}
        record = {"format": 1, "id": run_id, "agent": agent, "task": task, "state": "completed",
                  "attempt": 1, "startedAt": started.isoformat(), "endedAt": ended.isoformat(),
                  "durationSeconds": seconds, "attempts": [attempt]}
        name = f"050-{int(started.timestamp() * 1e9):020d}-{run_id}.json"
        (completed / name).write_text(json.dumps(record))


def agent_yaml(name: str, task: str, cron: str, flexible: bool = True, extra: str = "") -> str:
    return f"""\
apiVersion: spos/v1
kind: Agent
metadata:
  name: {name}
spec:
  tasks:
    {task}:
      command: ["/bin/true"]
      flexible: {str(flexible).lower()}
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: {name}-{task.replace('_', '-')}
spec:
  agent: {name}
  task: {task}
  cron: {cron}
{extra}"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty agents.d/ in the working directory."""
    (tmp_path / "project" / "agents.d").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


def write(project: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        (project / "agents.d" / name).write_bytes(content.encode())


def suggest(device_root: Path, agent: str | None = None) -> dict:
    return propose(Device(device_root), "agents.d", agent=agent, now=NOW, zone="UTC")


def moved(result: dict) -> dict[str, str]:
    return {entry["schedule"]: entry["to"] for entry in result["suggestions"]}


def left(result: dict) -> dict[str, str]:
    return {entry["schedule"]: entry["reason"] for entry in result["unchanged"]}


# ---------------------------------------------------------------- windows and moves


def test_the_quiet_hours_come_from_the_samples_and_the_runs_share_of_them(project, device_root):
    write(project, {"backup.yaml": agent_yaml("backup", "nightly", '"0 2 * * *"')})
    write_samples(device_root, days=3)
    write_runs(device_root, "backup", "nightly", hour=2, cpu=3600.0)

    result = suggest(device_root)

    assert result["quietHours"] == [4, 5, 0, 3]
    hours = {entry["hour"]: entry for entry in result["hours"]}
    assert hours[4] == {"hour": 4, "samples": 36, "cpuPercent": 5.0, "load1": 0.2,
                        "memoryPercent": 40.0, "runsCpuPercent": 0.0}
    assert hours[2]["cpuPercent"] == 70.0
    # Of the 3 runs, the 2 within the samples took 2 x 3600 CPU seconds in hour 2, seen by 36
    # samples of 5 minutes on 4 CPUs: 16.7 %.
    assert hours[2]["runsCpuPercent"] == 16.7
    assert result["samples"] == {"count": 864, "from": "2026-03-12T12:00:00+00:00",
                                 "to": "2026-03-15T12:00:00+00:00", "coveredSeconds": 3 * DAY,
                                 "intervalSeconds": 300.0, "cpus": 4}
    assert result["runs"] == 3


def test_a_daily_flexible_task_moves_to_the_quiet_hour_and_a_fixed_one_stays(project, device_root):
    write(project, {
        "backup.yaml": agent_yaml("backup", "nightly", '"0 2 * * *"'),
        "report.yaml": agent_yaml("report", "daily", '"0 2 * * *"', flexible=False),
    })
    write_samples(device_root, days=3)
    write_runs(device_root, "backup", "nightly", hour=2)
    write_runs(device_root, "report", "daily", hour=2)

    result = suggest(device_root)

    assert moved(result) == {"backup-nightly": "0 4 * * *"}
    assert left(result) == {"report-daily": "its task daily is not flexible"}
    [entry] = result["suggestions"]
    assert (entry["file"], entry["line"], entry["from"]) == ("agents.d/backup.yaml", 18, "0 2 * * *")
    assert entry["expected"] == {"runtimeP95Seconds": 1200.0, "runs": 3,
                                 "cpuPercent": {"now": 67.2, "proposed": 5.0},
                                 "load1": {"now": 2.8, "proposed": 0.2}}
    assert entry["reason"] == (
        "67% CPU in use during its runs at 02:00, 5% at 04:00, over its p95 runtime of 20m00s "
        "(from 3 runs), not counting its own load")


def test_two_flexible_tasks_are_spread_by_minute_and_by_load(project, device_root):
    write(project, {
        "light.yaml": agent_yaml("light", "tidy", '"0 2 * * *"'),
        "heavy.yaml": agent_yaml("heavy", "crunch", '"0 2 * * *"'),
    })
    write_samples(device_root, days=3)
    write_runs(device_root, "light", "tidy", hour=2, cpu=60.0)
    write_runs(device_root, "heavy", "crunch", hour=2, seconds=1800.0, cpu=3600.0)

    result = suggest(device_root)

    # crunch takes the most CPU and chooses first: 04:00, as far from tidy's 02:00 as any
    # minute. At 4 CPUs for 30 minutes its 3600 s make hour 4 busier than hour 5.
    assert moved(result) == {"heavy-crunch": "0 4 * * *", "light-tidy": "0 5 * * *"}


def test_tasks_moved_to_one_hour_do_not_start_in_the_same_minute(project, device_root):
    write(project, {
        "one.yaml": agent_yaml("one", "tidy", '"0 2 * * *"'),
        "two.yaml": agent_yaml("two", "tidy", '"0 2 * * *"'),
    })
    write_samples(device_root, days=3, cpu_of_hour=lambda hour: 5.0 if hour == 4 else 50.0)
    write_runs(device_root, "one", "tidy", hour=2, cpu=1.0)
    write_runs(device_root, "two", "tidy", hour=2, cpu=1.0)

    assert moved(suggest(device_root)) == {"one-tidy": "0 4 * * *", "two-tidy": "5 4 * * *"}


def test_an_hourly_task_moves_its_minute_only_and_a_frequent_one_stays(project, device_root):
    write(project, {
        "poll.yaml": agent_yaml("poll", "fetch", '"0 * * * *"'),
        "health.yaml": agent_yaml("health", "check", '"*/15 * * * *"'),
        "sweep.yaml": agent_yaml("sweep", "files", '"0 2 * * *"', flexible=False),
    })
    write_samples(device_root, days=2)
    for hour in range(24):
        write_runs(device_root, "poll", "fetch", hour=hour, days=1, seconds=30.0, cpu=5.0)

    result = suggest(device_root)

    assert moved(result) == {"poll-fetch": "5 * * * *"}
    assert result["suggestions"][0]["reason"] == (
        "it fires every hour, so only its minute moves: :00 is also the minute of health-check, "
        "sweep-files; :05 is 5 or more minutes from any other Schedule's fire")
    assert left(result)["health-check"].startswith(
        "it fires more than once an hour (15 minutes apart at the closest)")


def test_a_task_every_six_hours_keeps_its_period_and_the_way_it_is_written(project, device_root):
    write(project, {
        "stepped.yaml": agent_yaml("stepped", "sync", '"0 */6 * * *"'),
        "listed.yaml": agent_yaml("listed", "sync", '"30 1,7,13,19 * * *"'),
    })
    write_samples(device_root, days=2)
    for hour in (0, 6, 12, 18):
        write_runs(device_root, "stepped", "sync", hour=hour, days=2, cpu=1.0)
    for hour in (1, 7, 13, 19):
        write_runs(device_root, "listed", "sync", hour=hour, minute=30, days=2, cpu=1.0)

    # 04:00, 10:00, 16:00 and 22:00 meet 24 % CPU on average, every other phase 30 % or more
    assert moved(suggest(device_root)) == {"listed-sync": "30 4,10,16,22 * * *",
                                           "stepped-sync": "0 4-23/6 * * *"}


def test_a_move_that_gains_little_or_a_task_without_history_is_left_alone(project, device_root):
    write(project, {
        "calm.yaml": agent_yaml("calm", "tidy", '"0 3 * * *"'),
        "fresh.yaml": agent_yaml("fresh", "tidy", '"0 2 * * *"'),
    })
    write_samples(device_root, days=2, cpu_of_hour=lambda hour: 5.0 if hour == 4 else 8.0)
    write_runs(device_root, "calm", "tidy", hour=3, cpu=1.0)
    write_runs(device_root, "fresh", "tidy", hour=2, days=2)

    result = suggest(device_root)

    assert result["suggestions"] == [] and result["diff"] == ""
    assert left(result) == {
        "calm-tidy": "moving it would gain little: 8% CPU in use during its runs at 03:00, 5% at "
                     "04:00; a move must gain 5 points",
        "fresh-tidy": "not enough run history to know how long it takes: 2 completed runs, 3 needed",
    }
    assert text(result).endswith(
        "No changes proposed: no Schedule would be quieter at another time (see above).\n")


def test_without_a_day_of_samples_nothing_is_proposed_and_it_says_what_is_needed(project, device_root):
    write(project, {"backup.yaml": agent_yaml("backup", "nightly", '"0 2 * * *"')})
    write_samples(device_root, days=0.5)
    write_runs(device_root, "backup", "nightly", hour=2)

    result = suggest(device_root)

    need = ("not enough load history: the samples cover 12h of the 1d needed; suggest again once "
            "`spos daemon` has sampled the load for a day")
    assert result["reason"] == need
    assert (result["suggestions"], result["hours"], result["diff"]) == ([], [], "")
    assert left(result) == {"backup-nightly": need}
    assert f"No changes proposed: {need}." in " ".join(text(result).split())

    shutil.rmtree(device_root / STATE)
    assert suggest(device_root)["reason"] == (
        "no load samples yet: `spos daemon` takes one every 5m into "
        "/var/lib/systemprompt-os/load-samples; suggest again once it has run for a day")


def test_a_schedules_time_zone_is_honoured(project, device_root):
    write(project, {"backup.yaml": agent_yaml("backup", "nightly", '"0 3 * * *"',
                                              extra="  timeZone: Europe/Berlin\n")})
    write_samples(device_root, days=3)
    write_runs(device_root, "backup", "nightly", hour=2)  # 03:00 in Berlin, UTC+1 in March

    [entry] = suggest(device_root)["suggestions"]

    assert (entry["from"], entry["to"], entry["timeZone"]) == ("0 3 * * *", "0 5 * * *",
                                                              "Europe/Berlin")  # 04:00 UTC
    assert "at 03:00 (Europe/Berlin)" in entry["reason"]


def test_a_weekly_task_is_judged_on_its_own_weekday_once_there_is_a_week(project, device_root):
    def cpu(moment: float) -> float:
        local = datetime.fromtimestamp(moment, timezone.utc)
        if local.isoweekday() % 7 == 0 and local.hour == 4:
            return 90.0
        return quiet_at_four(local.hour)

    write(project, {"weekly.yaml": agent_yaml("weekly", "clean", '"30 2 * * 0"')})
    lines, moment = [], NOW.timestamp() - 8 * DAY + 300
    while moment <= NOW.timestamp():
        lines.append(Sample(moment, 1.0, cpu(moment - 150), 40.0, 4).line())
        moment += 300
    samples_file(device_root).parent.mkdir(parents=True)
    samples_file(device_root).write_text("".join(lines))
    write_runs(device_root, "weekly", "clean", hour=2, minute=30)

    # Every other day is quiet at 04:00; on Sundays 05:00 is the quietest hour.
    assert moved(suggest(device_root)) == {"weekly-clean": "30 5 * * 0"}


def test_timers_suspended_and_boot_schedules_are_left_alone_with_a_reason(project, device_root):
    write(project, {"misc.yaml": agent_yaml("misc", "tidy", '"0 2 * * *"', extra="  suspend: true\n")
                    + """\
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: misc-boot
spec:
  agent: misc
  task: tidy
  cron: "@reboot"
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: misc-timer
spec:
  agent: misc
  task: tidy
  timer:
    onBootSec: 5m
"""})
    write_samples(device_root, days=2)

    assert left(suggest(device_root)) == {
        "misc-boot": "it fires at boot, not at a time of day",
        "misc-tidy": "suspended: it starts nothing",
        "misc-timer": "a timer Schedule: only cron expressions are proposed; move its onCalendar "
                      "by hand, or spread it with randomizedDelaySec",
    }


def test_agent_limits_what_is_proposed_not_what_is_counted(project, device_root):
    write(project, {
        "backup.yaml": agent_yaml("backup", "nightly", '"0 2 * * *"'),
        "other.yaml": agent_yaml("other", "nightly", '"0 4 * * *"', flexible=False),
    })
    write_samples(device_root, days=3)
    write_runs(device_root, "backup", "nightly", hour=2)

    result = suggest(device_root, agent="backup")

    assert moved(result) == {"backup-nightly": "5 4 * * *"}  # other's 04:00 still counts
    assert left(result) == {}
    assert suggest(device_root, agent="other")["reason"] == (
        "no cron Schedule of agent other starts a flexible task; mark a task `flexible: true` in "
        "its Agent to let spos propose another time for it")


# ---------------------------------------------------------------- the diff


QUOTED = {
    "plain.yaml": agent_yaml("plain", "nightly", "0 2 * * *  # nightly, after the backups"),
    "single.yaml": agent_yaml("single", "nightly", "'0 2 * * *'").replace("\n", "\r\n"),
    "flow.yaml": agent_yaml("flow", "nightly", '"0 2 * * *"').replace(
        "spec:\n  agent: flow\n  task: nightly\n  cron: \"0 2 * * *\"\n",
        'spec: {agent: flow, task: nightly, "cron": "0 2 * * *"}'),  # no newline at the end
}


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL":
                                           "t@example.org", "GIT_COMMITTER_NAME": "t",
                                           "GIT_COMMITTER_EMAIL": "t@example.org"})


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_diff_applies_with_git_and_changes_only_the_cron_values(project, device_root, spos,
                                                                     monkeypatch):
    write(project, QUOTED)
    write_samples(device_root, days=3)
    for agent in ("plain", "single", "flow"):
        write_runs(device_root, agent, "nightly", hour=2, cpu=1.0)
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "manifests")
    before = {name: (project / "agents.d" / name).read_bytes() for name in QUOTED}
    monkeypatch.chdir(project / "agents.d")  # paths are the repository's, from anywhere in it

    result = propose(Device(device_root), ".", now=NOW, zone="UTC")

    assert sorted(moved(result).values()) == ["0 4 * * *", "10 4 * * *", "5 4 * * *"]
    assert "--- a/agents.d/flow.yaml\n+++ b/agents.d/flow.yaml\n" in result["diff"]
    (project / "suggest.diff").write_text(result["diff"])
    git(project, "apply", "--check", "suggest.diff")
    git(project, "apply", "suggest.diff")
    assert spos("validate", "--root", device_root, ".").code == 0
    for name, old in before.items():
        new = (project / "agents.d" / name).read_bytes()
        changed = [(a, b) for a, b in zip(old.split(b"\n"), new.split(b"\n")) if a != b]
        assert len(old.split(b"\n")) == len(new.split(b"\n")) and len(changed) == 1, name
        [(was, now)] = changed
        assert was.replace(b"0 2 * * *", b"") == now.replace(moved_to(result, name), b"")
    assert (project / "agents.d" / "flow.yaml").read_bytes().endswith(b'* * *"}')
    assert (project / "agents.d" / "single.yaml").read_bytes().count(b"\r\n") == before[
        "single.yaml"].count(b"\r\n")
    assert propose(Device(device_root), ".", now=NOW, zone="UTC")["suggestions"] == []


def moved_to(result: dict, file: str) -> bytes:
    [entry] = [e for e in result["suggestions"] if e["file"].endswith(file)]
    return entry["to"].encode()


# ---------------------------------------------------------------- what users read


SNAPSHOT_FILES = {
    "backup.yaml": agent_yaml("backup", "nightly", '"0 2 * * *"'),
    "research.yaml": agent_yaml("research", "digest", '"0 3 * * *"',
                                extra="  timeZone: Europe/Berlin\n"),
    "poll.yaml": agent_yaml("poll", "fetch", "'0 * * * *'"),
    "monitor.yaml": agent_yaml("monitor", "health", '"*/5 * * * *"', flexible=False),
    "fresh.yaml": agent_yaml("fresh", "tidy", '"30 9 * * 1-5"'),
}


def fixed_state(project: Path, device_root: Path) -> dict:
    write(project, SNAPSHOT_FILES)
    write_samples(device_root, days=3)
    write_runs(device_root, "backup", "nightly", hour=2, cpu=2400.0)
    write_runs(device_root, "research", "digest", hour=2, seconds=600.0, cpu=300.0)
    write_runs(device_root, "poll", "fetch", hour=11, seconds=20.0, cpu=2.0)
    write_runs(device_root, "fresh", "tidy", hour=9, minute=30, days=1)
    return suggest(device_root)


def test_the_proposal_as_text_and_json(project, device_root, snapshot):
    result = fixed_state(project, device_root)
    assert text(result) == snapshot(name="text")
    assert json.dumps(result, indent=2) + "\n" == snapshot(name="json")


def test_the_command_prints_the_same_proposal(project, device_root, spos, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")  # the zone of Schedules without timeZone: this machine's
    write(project, SNAPSHOT_FILES)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    write_samples(device_root, days=2, end=now)
    write_runs(device_root, "backup", "nightly", hour=2, end=now)

    shown = spos("schedule", "suggest", "--root", device_root, "--json")
    printed = spos("schedule", "suggest", "--root", device_root, "--agent", "backup")

    assert shown.code == printed.code == 0, shown.err + printed.err
    result = json.loads(shown.out)
    assert [entry["schedule"] for entry in result["suggestions"]] == ["backup-nightly"]
    assert "backup-nightly (backup/nightly), agents.d/backup.yaml:18" in printed.out
    assert printed.out.endswith(result["diff"])


def test_invalid_manifests_are_reported_with_their_place(project, device_root, spos):
    write(project, {"broken.yaml": agent_yaml("broken", "tidy", '"0 25 * * *"')})

    done = spos("schedule", "suggest", "--root", device_root)

    assert done.code == 1
    assert "agents.d/broken.yaml:18:3: error: invalid cron expression '0 25 * * *'" in done.err
