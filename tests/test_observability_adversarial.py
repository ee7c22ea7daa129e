"""Odd and hostile device state against the commands that only look: `spos why`, `spos action
monitor` and `watch`, `spos action resources`, the estimates of `spos plan` and `spos schedule
suggest`.

Each test lays out a little state in a temporary device root the way tests/test_monitor.py,
tests/test_why.py and tests/test_suggest.py do (run records written as the executor names and
writes them, an agent.json, load samples), with one field of the wrong type, out of range, or
holding bytes no one expected, and runs the command as a person would: `python -m reconciler`
in a process of its own, TZ=UTC. What it must do, whatever it reads: a clear one-line error or
`-` / null for what it cannot make sense of, never a traceback; `--json` that any JSON parser
reads (no NaN or Infinity); and nothing written to the device.

Every wait is bounded and polls; nothing sleeps longer than a poll.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_suggest import agent_yaml

from reconciler.executor.owner import identity

REPO = Path(__file__).resolve().parent.parent
STATE = "var/lib/systemprompt-os"
AGENTS = f"{STATE}/agents"
WAIT = 10  # the longest any single wait may take, in seconds
ESCAPES = "\x1b]0;owned\x07\x1b[2J\r"
"""A window-title change, a screen clear and a carriage return: what a terminal must not be
handed raw from a run's own words."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def spos(*args, cwd: Path = REPO) -> Result:
    """`spos ARGS` in a process of its own, as a person runs it."""
    done = subprocess.run([sys.executable, "-m", "reconciler", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TZ": "UTC", "PYTHONPATH": str(REPO)})
    return Result(done.returncode, done.stdout, done.stderr)


def strict_json(text: str):
    """JSON as any parser but Python's reads it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err, result.err


def record(root: Path, agent: str, bucket: str, serial: int, raw: str | None = None, **fields) -> str:
    """A run record as the executor keeps it (fields override the defaults; `raw`: the file's
    text as it is). Returns the run id."""
    run_id = f"20261126T090000-{serial:08x}"
    data = {"format": 1, "id": run_id, "agent": agent, "task": "scan", "priority": 50,
            "enqueuedAt": "2026-11-26T09:00:00.000+00:00", "notAfter": None,
            "source": {"kind": "manual"}, "attempt": 1, **fields}
    directory = root / AGENTS / agent / bucket
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{serial}.tmp"
    temporary.write_text(json.dumps(data) if raw is None else raw)
    temporary.rename(directory / f"050-{serial:020d}-{run_id}.json")  # as atomically as the executor
    return run_id


def active(root: Path, agent: str, serial: int, **fields) -> str:
    """An active run whose executor (this process) is alive, started at 09:04."""
    return record(root, agent, "active", serial, **{
        "state": "active", "executor": identity(), "startedAt": "2026-11-26T09:04:00.000+00:00", **fields})


def files(root: Path) -> dict[str, tuple]:
    """Every path under the root with its type, size, inode and modification time."""
    found = {}
    for directory, names, others in os.walk(root):
        for name in names + others:
            status = os.lstat(os.path.join(directory, name))
            found[os.path.join(directory, name)] = (status.st_mode, status.st_size, status.st_ino,
                                                    status.st_mtime_ns)
    return found


# -- spos why ----------------------------------------------------------------------------------


def test_why_a_run_whose_followup_errors_is_a_number(device_root):
    """`followUpErrors: 5` in a hand-edited or foreign record: `spos why` (text and --json)
    dies with `TypeError: 'int' object is not iterable` instead of showing the run."""
    run_id = record(device_root, "alpha", "completed", 1, state="completed", followUpErrors=5,
                    endedAt="2026-11-26T09:01:00.000+00:00")
    before = files(device_root)

    for extra in ((), ("--json",)):
        result = spos("why", run_id, *extra, "--root", device_root)
        no_traceback(result)
        assert result.code == 0, result.err
    assert files(device_root) == before


def test_why_a_trigger_run_whose_event_is_not_an_object(device_root):
    """A Trigger's `source.event` that is a list or a string (the record as another version or
    a hand edit left it): `spos why` prints `AttributeError: 'list' object has no attribute
    'items'`."""
    run_id = record(device_root, "alpha", "completed", 1, state="completed",
                    source={"kind": "trigger", "trigger": "drop", "type": "filesystem",
                            "event": ["created", "/srv/in/a.csv"]})

    result = spos("why", run_id, "--root", device_root)

    no_traceback(result)
    assert result.code == 0
    assert "Trigger drop" in result.out


def test_why_an_attempt_whose_duration_is_a_string(device_root):
    """An attempt with `durationSeconds: "12"`: `spos why` (text) dies with `TypeError: '<'
    not supported between instances of 'str' and 'int'`; --json shows it. The text should
    leave the duration out (or show `-`)."""
    run_id = record(device_root, "alpha", "completed", 1, state="completed", attempts=[
        {"attempt": 1, "state": "completed", "startedAt": "2026-11-26T09:00:00.000+00:00",
         "endedAt": "2026-11-26T09:00:12.000+00:00", "durationSeconds": "12", "exitCode": 0}])

    result = spos("why", run_id, "--root", device_root)

    no_traceback(result)
    assert result.code == 0
    assert "#1 completed" in result.out


def test_why_json_is_strict_json_when_a_record_holds_an_overflowing_number(device_root):
    """`1e999` in a record is read as infinity: `spos why --json` then prints `Infinity`, which
    no JSON parser but Python's reads, and the text dies with `OverflowError: cannot convert
    float infinity to integer`. What cannot be a duration should be null / `-`."""
    attempt = ('{"attempt": 1, "state": "completed", "startedAt": "2026-11-26T09:00:00.000+00:00", '
               '"endedAt": "2026-11-26T09:00:12.000+00:00", "durationSeconds": 1e999}')
    run_id = "20261126T090000-00000001"
    record(device_root, "alpha", "completed", 1, raw=(
        f'{{"format": 1, "id": "{run_id}", "agent": "alpha", "task": "scan", "attempt": 1, '
        f'"state": "completed", "attempts": [{attempt}]}}'))

    shown = spos("why", run_id, "--json", "--root", device_root)
    said = spos("why", run_id, "--root", device_root)

    no_traceback(shown)
    strict_json(shown.out)
    no_traceback(said)
    assert said.code == 0


@pytest.mark.parametrize("config", [
    pytest.param({"tasks": ["scan"]}, id="tasks-a-list"),
    pytest.param({"tasks": {"scan": {"retries": [2]}}}, id="retries-a-list"),
    pytest.param({"quota": {"name": "q", "storageBytes": [1]}}, id="storage-a-list"),
    pytest.param({"capability": {"name": "c", "allowed": ["read"]}}, id="allowed-a-list"),
    pytest.param({"capability": {"name": "c", "allowed": {"read": 5}}}, id="read-a-number"),
    pytest.param({"tasks": {"scan": {"retries": {"limit": 1, "nonRetryableExitCodes": 3}}}},
                 id="exit-codes-a-number"),
])
def test_why_with_an_agent_json_of_an_odd_shape(device_root, config):
    """An agent.json that is an object but whose `tasks`, `quota`, `capability` or `retries`
    has another shape (hand-edited, or from another spos version): `spos why` and
    `spos why --json` die with AttributeError / TypeError. The part that cannot be read should
    be null, as an agent.json that is not an object already is."""
    raw = json.dumps({"format": 1, "agent": "alpha", **config}).encode()
    agent = device_root / AGENTS / "alpha"
    agent.mkdir(parents=True)
    (agent / "agent.json").write_bytes(raw)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    run_id = record(device_root, "alpha", "completed", 1, state="completed",
                    attempts=[{"attempt": 1, "state": "completed", "configDigest": digest}])

    for extra in ((), ("--json",)):
        result = spos("why", run_id, *extra, "--root", device_root)
        no_traceback(result)
        assert result.code == 0, result.err


def test_why_does_not_hand_a_serial_line_to_the_terminal_raw(device_root):
    """A run started by a serial Trigger records the line the device sent (docs/queue.md):
    bytes from outside. `spos why` prints `event: line=...` as it is, so a sensor (or whoever
    controls the wire, a file name under a watched directory, a webhook header) can set the
    operator's window title, clear the screen or rewrite the line shown. Control characters
    should be shown escaped, as `spos action show` does with JSON."""
    run_id = record(device_root, "alpha", "completed", 1, state="completed",
                    source={"kind": "trigger", "trigger": "sensor", "type": "serial",
                            "event": {"device": "/dev/ttyUSB0", "line": f"temp=21.5{ESCAPES}ok"}})

    result = spos("why", run_id, "--root", device_root)

    assert result.code == 0, result.err
    assert "\x1b" not in result.out and "\x07" not in result.out and "\r" not in result.out


# -- spos action monitor -----------------------------------------------------------------------


def test_monitor_json_is_strict_json_when_a_progress_percent_is_not_finite(device_root):
    """A record whose `progress.percent` reads as NaN or infinity (`NaN`, `1e999`): `spos action
    monitor --json` prints `"percent": NaN` / `Infinity`, which jq and every other parser
    refuse; the text shows `nan%`. docs/monitor.md: percent is 0-100 or null."""
    for serial, value in ((1, "NaN"), (2, "1e999")):
        run_id = f"20261126T090000-{serial:08x}"
        record(device_root, "alpha", "active", serial, raw=(
            f'{{"format": 1, "id": "{run_id}", "task": "scan", "attempt": 1, "state": "active", '
            f'"executor": {json.dumps(identity())}, "startedAt": "2026-11-26T09:04:00.000+00:00", '
            f'"progress": {{"percent": {value}, "message": "half"}}}}'))

    result = spos("action", "monitor", "--json", "--root", device_root)

    assert result.code == 0, result.err
    snap = strict_json(result.out)
    for run in snap["agents"][0]["active"]:
        assert run["progress"]["percent"] is None or 0 <= run["progress"]["percent"] <= 100


def test_monitor_text_with_a_huge_integer_progress_percent(device_root):
    """`"percent": 1000...0` (400 digits, valid JSON): `spos action monitor` dies with
    `OverflowError: int too large to convert to float`."""
    active(device_root, "alpha", 1, progress={"percent": 10 ** 400, "message": "half"})

    result = spos("action", "monitor", "--root", device_root)

    no_traceback(result)
    assert result.code == 0


def test_monitor_an_executor_owner_with_a_list_in_it(device_root):
    """An active record whose `executor` is an object holding a list (`{"pid": [1]}`): every
    `spos action monitor`, --json included, dies with `TypeError: unhashable type: 'list'`, for
    every agent on the device. The run should show as `abandoned` (its owner cannot be told)."""
    active(device_root, "alpha", 1, executor={"pid": [1], "bootId": "b", "startTicks": 1})
    active(device_root, "beta", 2)

    result = spos("action", "monitor", "--json", "--root", device_root)

    no_traceback(result)
    assert result.code == 0
    states = {run["id"][-1]: run["state"] for agent in strict_json(result.out)["agents"]
              for run in agent["active"]}
    assert states == {"1": "abandoned", "2": "running"}


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"])
def test_monitor_a_start_time_at_the_edge_of_the_calendar(device_root, moment):
    """A `startedAt` that parses but whose local time falls outside years 1-9999: the table
    dies with `ValueError: year 10000 is out of range` (--json works). It should show `-`, as
    it does for a time that does not parse."""
    active(device_root, "alpha", 1, startedAt=moment)

    result = spos("action", "monitor", "--root", device_root)

    no_traceback(result)
    assert result.code == 0


def test_monitor_does_not_hand_a_progress_message_to_the_terminal_raw(device_root):
    """A run sets its progress message itself (`message ...` on its progress channel, kept as
    written after strip()). `spos action monitor` prints it into the table as it is, and the
    live view draws it as it is: a run can clear the operator's screen, set the window title
    or overwrite the row. Control characters should be shown escaped."""
    from rich.console import Console

    from reconciler import monitor
    from reconciler.device import Device

    active(device_root, "alpha", 1, progress={"percent": 40.0, "message": f"ranking{ESCAPES}done"})

    table = spos("action", "monitor", "--root", device_root)
    screen = io.StringIO()
    Console(file=screen, width=160, height=20, force_terminal=True, color_system="standard").print(
        monitor.live_view(monitor.snapshot(Device(device_root)), 20))

    assert table.code == 0, table.err
    assert "\x1b" not in table.out and "\x07" not in table.out and "\r" not in table.out
    assert "\x1b]0;" not in screen.getvalue() and "\x1b[2J" not in screen.getvalue()


def test_monitor_and_watch_refuse_an_empty_agent_name(device_root):
    """`spos action monitor --agent "$AGENT"` with AGENT unset: the empty name is taken as the
    agents directory itself, and the snapshot shows an agent named "" with nothing in it
    (exit 0); `spos action watch --agent ""` watches nothing, silently, forever.
    docs/monitor.md: an agent that is not there is an error (exit 1) naming it."""
    active(device_root, "alpha", 1)

    result = spos("action", "monitor", "--agent", "", "--root", device_root)
    watcher = subprocess.Popen([sys.executable, "-m", "reconciler", "action", "watch", "--agent", "",
                                "--root", str(device_root)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "TZ": "UTC"})
    try:
        deadline = time.monotonic() + 5
        while watcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        watched = watcher.poll()
    finally:
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGINT)
        watcher.communicate(timeout=WAIT)

    assert result.code == 1 and "no agent" in result.err, (result.code, result.out)
    assert watched == 1, "watch --agent '' kept watching"


def test_monitor_counts_a_run_that_goes_back_to_the_queue_while_it_looks(device_root, monkeypatch):
    """docs/monitor.md: the directories are listed "in the order runs move through them, so a
    run that moves meanwhile is counted twice at worst, never missed". A retry moves a run
    back, from active/ to queue/: when the executor requeues it between the listing of queue/
    and that of active/, the snapshot counts it nowhere (0 queued, 0 active) and shows no run."""
    from reconciler import monitor
    from reconciler.device import Device

    active(device_root, "alpha", 1)
    [claimed] = (device_root / AGENTS / "alpha" / "active").iterdir()
    (device_root / AGENTS / "alpha" / "queue").mkdir()
    listed = monitor._entries

    def entries(device, agent, bucket):
        names = listed(device, agent, bucket)
        if bucket == "queue" and claimed.exists():  # the executor requeues it for its retry now
            claimed.rename(device_root / AGENTS / "alpha" / "queue" / claimed.name)
        return names

    monkeypatch.setattr(monitor, "_entries", entries)
    snap = monitor.snapshot(Device(device_root))

    assert snap["totals"]["queued"] + snap["totals"]["active"] >= 1, snap["totals"]


def test_monitor_live_with_an_interval_too_large_for_a_float(device_root):
    """`--interval` with a 400-digit number of seconds: `OverflowError: int too large to
    convert to float`, a traceback, instead of the one-line usage error a bad duration gets."""
    (device_root / AGENTS / "alpha").mkdir(parents=True)

    result = spos("action", "monitor", "--live", "--interval", "1" + "0" * 400 + "s",
                  "--root", device_root)

    no_traceback(result)
    assert result.code == 1
    assert len(result.err.strip().splitlines()) == 1


# -- spos action watch -------------------------------------------------------------------------


class Watch:
    """`spos action watch --agent A` running, its standard output read as it comes."""

    def __init__(self, root: Path, agent: str, *extra: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "action", "watch", "--agent", agent, *extra,
             "--root", str(root)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "TZ": "UTC"})
        self.out = b""

    def until(self, text: str) -> bool:
        """Whether `text` appeared on its output within WAIT seconds (False: it ended first,
        or the time ran out)."""
        deadline = time.monotonic() + WAIT
        while text.encode() not in self.out and time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    return False
                self.out += chunk
        return text.encode() in self.out

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=WAIT)
        return self.process.returncode, err.decode(errors="replace")


def watch_a_run_end(root: Path, json_lines: bool, **fields) -> tuple[bool, int, str]:
    """Start watching agent alpha (one active run, told at once), then let a run end with
    `fields` in its record. (whether its end was told, watch's exit code, its stderr)."""
    active(root, "alpha", 1)
    watch = Watch(root, "alpha", *(("--json",) if json_lines else ()))
    try:
        assert watch.until("started"), "watch did not tell the active run"
        record(root, "alpha", "completed", 2, **{"endedAt": "2026-11-26T09:06:00.000+00:00", **fields})
        told = watch.until("ended")
    finally:
        code, err = watch.stop()
    return told, code, err


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_watch_goes_on_when_a_record_state_is_not_a_string(device_root, json_lines):
    """A run that ends with `state: ["failed"]` in its record: `spos action watch` (text and
    --json) dies with `TypeError: unhashable type: 'list'` and stops watching the agent."""
    told, code, err = watch_a_run_end(device_root, json_lines, state=["failed"])

    assert "Traceback" not in err, err
    assert told and code == 0


def test_watch_goes_on_when_a_duration_is_not_a_number(device_root):
    """A run that ends with `durationSeconds: "12"`: `spos action watch` dies with `TypeError:
    '<' not supported between instances of 'str' and 'int'` and stops watching."""
    told, code, err = watch_a_run_end(device_root, False, state="completed", durationSeconds="12")

    assert "Traceback" not in err, err
    assert told and code == 0


def test_watch_goes_on_when_an_end_time_is_at_the_edge_of_the_calendar(device_root):
    """A run that ends with `endedAt: 9999-12-31T23:59:59-12:00`: `spos action watch` dies
    with `ValueError: year 10000 is out of range`."""
    told, code, err = watch_a_run_end(device_root, False, state="completed",
                                      endedAt="9999-12-31T23:59:59-12:00")

    assert "Traceback" not in err, err
    assert told and code == 0


# -- spos action resources and spos plan's estimates --------------------------------------------


def completed_runs(root: Path, agent: str, task: str, durations: list, first: int = 1) -> None:
    for n, seconds in enumerate(durations):
        record(root, agent, "completed", first + n, task=task, state="completed",
               durationSeconds=seconds, endedAt=f"2026-11-26T{n % 24:02d}:00:00.000+00:00")


def test_resources_with_a_duration_too_large_for_a_float(device_root):
    """One finished run whose `durationSeconds` is a 400-digit integer (valid JSON): `spos action
    resources`, --json and `spos metrics` die with `OverflowError: int too large to convert to
    float`."""
    completed_runs(device_root, "alpha", "scan", [12.0, 10 ** 400])

    for command in (("action", "resources"), ("action", "resources", "--json"), ("metrics",)):
        result = spos(*command, "--root", device_root)
        no_traceback(result)
        assert result.code == 0, command


def test_resources_json_is_strict_json_when_the_slowdown_overflows(device_root):
    """Ten completed runs, the first five of the smallest float (5e-324 s) and the last five of 10 s:
    the slowdown ratio overflows to infinity and `spos action resources --json` prints
    `"slowdown": Infinity`."""
    completed_runs(device_root, "alpha", "scan", [5e-324] * 5 + [10.0] * 5)

    result = spos("action", "resources", "--json", "--root", device_root)

    assert result.code == 0, result.err
    strict_json(result.out)


def test_resources_with_a_record_state_that_is_not_a_string(device_root):
    """A finished record with `state: ["completed"]`: `spos action resources` and `spos metrics`
    die with `TypeError: unhashable type: 'list'` (`action list` shows the run)."""
    record(device_root, "alpha", "completed", 1, state=["completed"])

    for command in (("action", "resources", "--json"), ("metrics",)):
        result = spos(*command, "--root", device_root)
        no_traceback(result)
        assert result.code == 0, command


@pytest.fixture
def applied(manifests, device_root) -> Path:
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    schedule = manifests / "backup-001.yaml"
    schedule.write_text(schedule.read_text().replace('cron: "0 2 * * *"', 'cron: "30 1 * * *"', 1))
    return manifests


def test_plan_with_a_duration_too_large_for_a_float_in_the_history(applied, device_root):
    """A Schedule moved, and among its task's finished runs one whose `durationSeconds` is a
    400-digit integer: `spos plan` itself dies with `OverflowError` and shows no plan at all.
    An estimate is for reading (docs/plan-format.md): a record it cannot use must not stop
    the plan."""
    completed_runs(device_root, "backup-001", "nightly_backup", [250.0, 260.0, 10 ** 400])

    result = spos("plan", applied, "--root", device_root, "--json")

    no_traceback(result)
    assert result.code == 0
    assert "cron/backup-001-nightly" in result.out


def test_plan_estimate_of_a_task_whose_runs_all_failed(applied, device_root):
    """docs/plan-format.md#estimates: "a task without any finished run gets no entry", so a
    task with finished runs gets one. A rescheduled task whose 4 runs all failed gets none:
    `estimates` is empty and the plan says nothing of it, when it is exactly the task an
    operator moving it wants to hear about (completedRuns 0, estimate null)."""
    for n in range(4):
        record(device_root, "backup-001", "failed", n + 1, task="nightly_backup", state="failed",
               durationSeconds=30.0, endedAt=f"2026-11-26T0{n}:00:00.000+00:00")

    result = spos("plan", applied, "--root", device_root, "--json")

    assert result.code == 0, result.err
    entries = strict_json(result.out)["estimates"]
    assert [(e["change"], e["task"], e["completedRuns"], e["estimate"]) for e in entries] == [
        ("cron/backup-001-nightly", "nightly_backup", 0, None)]


# -- spos schedule suggest ---------------------------------------------------------------------


DAY = 86400


@pytest.fixture
def project(tmp_path) -> Path:
    """agents.d/ with one flexible daily task in a project directory."""
    (tmp_path / "project" / "agents.d").mkdir(parents=True)
    (tmp_path / "project" / "agents.d" / "backup.yaml").write_text(
        agent_yaml("backup", "nightly", '"0 2 * * *"'))
    return tmp_path / "project"


def history(root: Path, extra_lines: str = "", cpus: int = 4, usage_cpu: float = 600.0) -> None:
    """Three days of load samples up to a minute ago (quiet at 04:00 UTC, busy at 02:00),
    `extra_lines` appended, and three completed runs of backup/nightly at 02:00 using
    `usage_cpu` seconds."""
    now = time.time()
    lines, moment = [], now - 3 * DAY + 300
    while moment <= now - 60:
        hour = datetime.fromtimestamp(moment - 150, timezone.utc).hour
        cpu = {2: 70.0, 4: 5.0}.get(hour, 30.0)
        lines.append(f"{moment:.0f} {cpu / 25:.2f} {cpu:.1f} 40.0 {cpus}\n")
        moment += 300
    samples = root / STATE / "load-samples"
    samples.parent.mkdir(parents=True, exist_ok=True)
    samples.write_text("".join(lines) + extra_lines)
    end = datetime.now(timezone.utc)
    for day in range(1, 4):
        started = (end - timedelta(days=day)).replace(hour=2, minute=0, second=0, microsecond=0)
        ended = started + timedelta(seconds=1200)
        record(root, "backup", "completed", day, task="nightly", state="completed",
               startedAt=started.isoformat(), endedAt=ended.isoformat(), durationSeconds=1200.0,
               attempts=[{"attempt": 1, "state": "completed", "startedAt": started.isoformat(),
                          "endedAt": ended.isoformat(), "durationSeconds": 1200.0,
                          "usage": {"cpuSeconds": usage_cpu, "peakMemoryBytes": 50_000_000}}])


def last_hour_lines(template: str, count: int = 2) -> str:
    """`count` sample lines taken half a minute ago (so in one hour), from a template with `{at}`."""
    return template.format(at=f"{time.time() - 30:.0f}") * count


@pytest.mark.parametrize("lines,usage_cpu", [
    pytest.param("{at} 0.5 1e308 40.0 4\n", 600.0, id="cpu-percent-1e308"),
    pytest.param("{at} 1e308 10.0 40.0 4\n", 600.0, id="load-1e308"),
    pytest.param("{at} 0.5 10.0 1e308 4\n", 600.0, id="memory-1e308"),
    pytest.param("", 1e308, id="run-cpu-seconds-1e308"),
])
def test_suggest_json_is_strict_json_whatever_the_samples_say(project, device_root, lines, usage_cpu):
    """Load-sample lines with finite but absurd values (1e308 percent of CPU, a load of 1e308),
    or a run that recorded 1e308 CPU seconds: the hour's mean overflows and `spos schedule
    suggest --json` prints `Infinity` / `NaN`, which no JSON parser but Python's reads."""
    history(device_root, last_hour_lines(lines), usage_cpu=usage_cpu)

    result = spos("schedule", "suggest", "--json", "--root", device_root, cwd=project)

    assert result.code == 0, result.err
    strict_json(result.out)


def test_suggest_with_a_sample_that_counts_too_many_cpus(project, device_root):
    """The newest sample names a 400-digit number of CPUs (one garbage line): `spos schedule
    suggest` dies with `OverflowError: int too large to convert to float`."""
    history(device_root, f"{time.time() - 30:.0f} 0.5 10.0 40.0 {10 ** 400}\n")

    result = spos("schedule", "suggest", "--root", device_root, cwd=project)

    no_traceback(result)
    assert result.code == 0


def test_suggest_skips_a_sample_with_an_impossible_cpu_percent(project, device_root):
    """One garbage line saying -100000 % of the CPUs were busy at 11:00 UTC yesterday is taken
    as a sample: hour 11's mean CPU becomes about -2700 %, `hours` says so, and the nightly
    job is proposed at 11:00 instead of the quiet 04:00. docs/suggest.md: field 3 is the
    percent of all CPUs busy; a line that is not a sample should be skipped, as a torn one is."""
    yesterday = datetime.now(timezone.utc).replace(hour=11, minute=30, second=0, microsecond=0)
    if yesterday.timestamp() > time.time() - 3600:
        yesterday -= timedelta(days=1)
    history(device_root, f"{yesterday.timestamp():.0f} 0.5 -100000 40.0 4\n")

    result = spos("schedule", "suggest", "--json", "--root", device_root, cwd=project)

    assert result.code == 0, result.err
    proposal = strict_json(result.out)
    assert all(hour["cpuPercent"] is None or 0 <= hour["cpuPercent"] <= 100 for hour in proposal["hours"])
    assert [entry["to"] for entry in proposal["suggestions"]] == ["0 4 * * *"]


def test_a_record_nested_too_deeply_is_a_corrupt_record_not_a_traceback(device_root):
    """A run file of 100,000 nested lists is valid JSON that Python's decoder gives up on with
    RecursionError: every listing that reads records died with a traceback. It is a corrupt
    record like any other unreadable one, and the other runs are shown."""
    record(device_root, "alpha", "active", 1, raw="[" * 100_000 + "]" * 100_000)
    record(device_root, "alpha", "completed", 2, state="completed")

    for command in (("action", "monitor", "--json"), ("action", "list", "--json"), ("metrics",),
                    ("action", "resources", "--json")):
        result = spos(*command, "--root", device_root)
        no_traceback(result)
        assert result.code == 0, (command, result.err)
    assert "20261126T090000-00000002" in spos("action", "list", "--root", device_root).out


# -- status files damaged by hand ------------------------------------------------------------

LIVE = os.getpid()  # a process that is alive: the status files' daemons "run"


@pytest.mark.parametrize("path, content", [
    ("triggerd/status.json", {"pid": 2 ** 64, "triggers": {}}),
    ("daemon.json", {"pid": 2 ** 63}),
    ("triggerd/status.json", {"pid": LIVE, "triggers": [1, 2]}),
    ("triggerd/status.json", {"pid": LIVE, "triggers": {"x": "armed"}}),
    ("daemon.json", {"pid": LIVE, "updatedAt": 12345}),
    ("daemon.json", {"pid": LIVE, "children": {"executor": {"pid": 5}}}),
    ("daemon.json", {"pid": LIVE, "children": [1]}),
    ("sync/state.json", {"drift": {"lastRepair": "yesterday"}}),
    ("sync/state.json", {"drift": {"lastRepair": {"repaired": "x"}}}),
    ("sync/state.json", {"applied": {"revision": "a" * 40}}),
    ("triggerd/status.json", "[" * 100_000 + "]" * 100_000),
    ("daemon.json", "[" * 100_000 + "]" * 100_000),
], ids=["huge-trigger-pid", "huge-daemon-pid", "triggers-a-list", "trigger-a-string",
        "updated-at-a-number", "child-without-running", "children-a-list", "repair-a-string",
        "repair-without-at", "applied-without-at", "triggers-nested-too-deeply",
        "daemon-nested-too-deeply"])
def test_status_trigger_list_and_metrics_read_hand_damaged_status_files(device_root, path, content):
    """Status files say what a live process is doing; one edited by hand is shown as far as it
    makes sense, never as a traceback (state.py: a reader then shows nothing rather than fail)."""
    target = device_root / STATE / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content if isinstance(content, str) else json.dumps(content))
    for command in (("status",), ("status", "--json"), ("trigger", "list"), ("metrics",)):
        done = spos(*command, "--root", device_root)
        no_traceback(done)
        assert done.code == 0, (command, done.err)


@pytest.mark.parametrize("triggers", [[1, 2], {"probe": "armed"}], ids=["a-list", "a-string"])
def test_trigger_list_with_a_registration_and_a_status_of_the_wrong_shape(device_root, triggers):
    registrations = device_root / STATE / "triggers"
    registrations.mkdir(parents=True)
    (registrations / "probe.json").write_text(json.dumps(
        {"type": "filesystem", "agent": "a", "task": "t", "enabled": True}))
    status = device_root / STATE / "triggerd/status.json"
    status.parent.mkdir(parents=True)
    status.write_text(json.dumps({"pid": LIVE, "triggers": triggers}))
    for command in (("trigger", "list"), ("trigger", "list", "--json"), ("status",)):
        done = spos(*command, "--root", device_root)
        no_traceback(done)
        assert done.code == 0, (command, done.err)


def test_one_linked_agent_directory_or_bucket_leaves_the_others_listed(device_root):
    """`action resources` and `action monitor` pass over an agent directory, or a run
    directory, that is a link (as `action list` does), and show every other agent."""
    assert spos("apply", "agents.d", "--root", device_root, "--auto-approve").code == 0
    agents = device_root / AGENTS
    (agents / "monitor-link").symlink_to(agents / "monitor-001")
    queue = agents / "backup-001/queue"
    queue.rmdir()
    queue.symlink_to(device_root / "elsewhere", target_is_directory=True)
    for command in (("action", "resources"), ("action", "resources", "--json"),
                    ("action", "monitor"), ("action", "monitor", "--json")):
        done = spos(*command, "--root", device_root)
        no_traceback(done)
        assert done.code == 0, (command, done.err)
        assert "research-001" in done.out and "backup-001" in done.out, (command, done.out)


def test_a_damaged_finished_record_is_named_and_its_log_still_shown(device_root):
    """A record in completed/ cut short by hand: show and why say the record cannot be read
    (not that there is no such run), and logs still prints the run's log."""
    run_id = record(device_root, "probe", "completed", 7, raw='{"format": 1, "id": "cut sh')
    log = device_root / AGENTS / "probe/logs" / f"{run_id}.log"
    log.parent.mkdir(parents=True)
    log.write_text("the run's own words\n")
    for command in (("action", "show", run_id), ("why", run_id)):
        done = spos(*command, "--root", device_root)
        no_traceback(done)
        assert done.code == 1 and f"run '{run_id}' of probe: its record " in done.err, done.err
    shown = spos("action", "logs", run_id, "--root", device_root)
    assert shown.code == 0 and shown.out == "the run's own words\n", shown


def test_logs_of_a_run_whose_log_is_a_fifo_does_not_wait(device_root):
    run_id = record(device_root, "probe", "completed", 8, state="completed")
    log = device_root / AGENTS / "probe/logs" / f"{run_id}.log"
    log.parent.mkdir(parents=True)
    os.mkfifo(log)
    done = spos("action", "logs", run_id, "--root", device_root)
    assert done.code == 1 and "is not a regular file" in done.err, done


def test_action_list_keeps_one_line_a_run_whatever_its_reason_says(device_root):
    record(device_root, "probe", "failed", 9, state="failed",
           reason="first line\nsecond line\r\nthird")
    record(device_root, "probe", "completed", 10, state="completed")
    done = spos("action", "list", "--root", device_root)
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == 3, lines  # the header and two runs
    assert any(line.endswith("first line\\nsecond line\\r\\nthird") for line in lines), lines
