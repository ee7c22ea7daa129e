"""Timer Schedules as systemd units (reconciler/kinds/systemd.py).

What systemd itself says of every unit spos renders (`systemd-analyze verify`: any output is a
failure, since unknown keys and bad values only warn), the units as operators read them
(snapshots), values that must reach systemd exactly, calendar events and time spans checked at
validation, and how apply activates units where systemd is the init system.

Plans and applies per case are golden cases (tests/cases/timer/); a booted systemd firing a
rendered timer is tests/test_systemd_boot.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from reconciler import systemctl as systemctl_module
from reconciler.apply import apply
from reconciler.pipeline import spos_command
from reconciler.device import Device
from reconciler.errors import ManifestError
from reconciler.kinds import systemd
from reconciler.observe import observe
from reconciler.plan import plan
from reconciler.render import render
from reconciler.resource import Facts
from reconciler.state import read_inventory
from reconciler.systemctl import SystemctlError
from reconciler.validate import load

EXAMPLES = Path(__file__).resolve().parent.parent / "agents.d"
REAL_WHICH = shutil.which
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (.ci/run installs systemd)")


def unit_files(manifests, facts: Facts) -> dict[str, str]:
    """File name -> text of every unit the manifests render to."""
    files = {}
    for resource in systemd.KIND.render(manifests, facts):
        for suffix in systemd.SUFFIXES:
            unit = resource.attrs[suffix]
            files[os.path.basename(unit["path"])] = systemd.unit_text(resource.id, unit)
    return files


def verify(files: dict[str, str], directory: Path) -> subprocess.CompletedProcess:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *(str(directory / name) for name in sorted(files))],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def real_facts(monkeypatch, root: str = "/") -> Facts:
    """Facts with the spos command a device gets (this interpreter and the lean entry point):
    verify checks that ExecStart's program exists."""
    monkeypatch.delenv("SPOS_COMMAND", raising=False)
    return Facts(spos_command=spos_command(), root=root)


# ---------------------------------------------------------------- systemd accepts every unit

@needs_analyze
def test_systemd_analyze_verify_accepts_every_unit_of_the_examples(monkeypatch, tmp_path):
    files = unit_files(load(EXAMPLES), real_facts(monkeypatch))

    assert len(files) == 6  # three timer Schedules in agents.d
    checked = verify(files, tmp_path / "units")

    assert (checked.returncode, checked.stderr, checked.stdout) == (0, "", "")


TRICKY = """\
    apiVersion: spos/v1
    kind: Agent
    metadata: {name: odd}
    spec:
      capability: odd
      quota: odd
      tasks:
        run:
          command: ["/bin/true"]
    ---
    apiVersion: spos/v1
    kind: Capability
    metadata: {name: odd}
    spec:
      allowed:
        write: ["/srv/a b", "/srv/100%", '/srv/q"uote', /srv/back\\\\slash, /srv/data]
        devices: [/dev/ttyUSB0, /dev/serial/by-id/usb-1a86 x]
        network: [loopback]
      denied:
        read: [/usr/lib, /srv/data/secret]
        write: [/srv/data/config, /elsewhere]
    ---
    apiVersion: spos/v1
    kind: Quota
    metadata: {name: odd}
    spec: {cpu: "12.345%", memory: "1", ioWeight: 10000, tasksMax: 4194304, nice: -20}
    ---
    apiVersion: spos/v1
    kind: Schedule
    metadata: {name: odd-many}
    spec:
      agent: odd
      task: run
      timer:
        onCalendar: ["Mon..Fri *-*-* 08:00 Europe/Berlin", "  *:0/15  ", "2001-01-01"]
        onBootSec: 1d2h3m4s5ms
        onUnitActiveSec: 106751991d
        randomizedDelaySec: 0s
        accuracy: 500ms
        persistent: true
    ---
    apiVersion: spos/v1
    kind: Schedule
    metadata: {name: odd-suspended}
    spec: {agent: odd, task: run, suspend: true, timer: {onBootSec: 0s, persistent: true}}
"""


@needs_analyze
@pytest.mark.parametrize("root", ["/", '/srv/dev ice"%n$HOME\\x'], ids=["root", "odd-root"])
def test_systemd_analyze_verify_accepts_units_at_the_edges(monkeypatch, tmp_path, root):
    """Paths with spaces, quotes, '%' and backslashes; the largest and smallest values each
    setting takes; lists; a suspended timer; a root that needs quoting."""
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "agents.d/odd.yaml").write_text(dedent(TRICKY))
    files = unit_files(load(tmp_path / "agents.d"), real_facts(monkeypatch, root))

    checked = verify(files, tmp_path / "units")

    assert (checked.returncode, checked.stderr, checked.stdout) == (0, "", "")


@needs_analyze
def test_verify_would_catch_a_bad_unit(tmp_path):
    """The check above is not vacuous: systemd-analyze reports a bad value on stderr."""
    checked = verify({"x.service": "[Service]\nExecStart=/bin/true\nCPUQuota=0.001%\n"}, tmp_path)
    assert "Invalid CPU quota" in checked.stderr


# ---------------------------------------------------------------- what the units say

def test_the_examples_units(snapshot):
    """The units of agents.d as a device gets them (root /, SPOS_COMMAND pinned by conftest)."""
    files = unit_files(load(EXAMPLES), Facts(spos_command=("/usr/local/bin/spos",), root="/"))
    assert files == snapshot


def test_sandboxing_never_hides_what_the_service_runs():
    """A denied read covering the spos command or its interpreter's libraries is left to the
    executor (which refuses such a run with a clear message) instead of making the service fail
    to start."""
    capability = {"allowed": {}, "denied": {"read": ["/usr/lib", "/opt/spos", "/srv/secret"]}}
    command = ["/usr/bin/python3", "-I", "-S", "/opt/spos/reconciler/_cron.py", "action", "execute"]

    settings = systemd.sandboxing(capability, Facts(spos_command=("x",)), command)

    assert settings["InaccessiblePaths"] == "-/srv/secret"


@pytest.mark.parametrize("word, written", [
    ("/usr/bin/spos", "/usr/bin/spos"),
    ("a b", '"a b"'),
    ("100%", '"100%%"'),
    ("$HOME", '"$$HOME"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    (";", '";"'),
    ("line\nbreak", '"line\\x0abreak"'),
])
def test_exec_start_words_reach_systemd_as_written(word, written):
    """systemd.syntax(7): double quotes keep a word whole and `;` literal, a backslash escapes,
    `%` and `$` are doubled; a control character becomes an escape, never a new line."""
    assert systemd._exec_word(word) == written


def test_no_value_can_start_a_line_of_its_own():
    plain = unit_files(load(EXAMPLES), Facts(spos_command=("/usr/local/bin/spos",)))
    evil = unit_files(load(EXAMPLES), Facts(
        spos_command=("/usr/local/bin/spos\n[Service]\nExecStartPre=/bin/evil",),
        root="/srv\nExecStartPre=/bin/evil"))

    for name, text in evil.items():
        assert len(text.splitlines()) == len(plain[name].splitlines())
        assert not any(line.startswith("ExecStartPre") for line in text.splitlines())


def test_parse_unit_reads_what_unit_text_writes():
    unit = {"path": "/etc/systemd/system/x.service", "mode": "0644", "sections": {
        "Unit": {"Description": "x"},
        "Service": {"ExecStart": '/bin/x "a b"', "ReadWritePaths": ["-/a", '"-/b c"']},
    }}
    text = systemd.unit_text("timer/x", unit)

    assert systemd.is_owned(text, "timer/x") and not systemd.is_owned(text, "timer/y")
    assert systemd.parse_unit(text) == unit["sections"]


# ---------------------------------------------------------------- validation

@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    (root / "agents.d").mkdir(parents=True)
    (root / "agents.d/agent.yaml").write_text(dedent(AGENT))
    monkeypatch.chdir(root)
    return root


AGENT = """\
    apiVersion: spos/v1
    kind: Agent
    metadata: {name: worker}
    spec:
      tasks:
        tick:
          command: ["/bin/true"]
"""


def schedule(name: str, timer: str) -> str:
    return dedent(f"""\
        apiVersion: spos/v1
        kind: Schedule
        metadata: {{name: {name}}}
        spec:
          agent: worker
          task: tick
          timer: {timer}
    """)


def problems(result) -> list[str]:
    assert result.code == 1, result
    return [line for line in result.err.splitlines() if ": error: " in line or "hint:" in line]


@needs_analyze
def test_calendar_events_systemd_cannot_use_are_reported_where_they_are(project, spos):
    (project / "agents.d/a.yaml").write_text(
        schedule("a", '{onCalendar: ["Mon..Fri *-*-* 08:00", "Feb 30", "*-02-30"]}'))
    (project / "agents.d/b.yaml").write_text(
        schedule("b", '{onCalendar: "*-*-* 25:00"}') + "---\n"
        + schedule("c", '{onCalendar: "2001-01-01 00:00 UTC"}'))

    found = problems(spos("validate", "agents.d"))

    assert found == [
        "agents.d/a.yaml:7:48: error: 'Feb 30' is not a calendar event systemd can use: systemd "
        "cannot parse it (at spec.timer.onCalendar[1])",
        "    hint: write a systemd.time(7) event such as 'Mon..Fri *-*-* 08:00:00', '*-*-* 04:00 "
        "Europe/Berlin' or 'daily'; `systemd-analyze calendar EVENT` shows how systemd reads it",
        "agents.d/a.yaml:7:58: error: '*-02-30' is not a calendar event systemd can use: it never "
        "elapses: no date matches it (at spec.timer.onCalendar[2])",
        "    hint: write a systemd.time(7) event such as 'Mon..Fri *-*-* 08:00:00', '*-*-* 04:00 "
        "Europe/Berlin' or 'daily'; `systemd-analyze calendar EVENT` shows how systemd reads it",
        "agents.d/b.yaml:7:11: error: '*-*-* 25:00' is not a calendar event systemd can use: "
        "systemd cannot parse it (at spec.timer.onCalendar)",
        "    hint: write a systemd.time(7) event such as 'Mon..Fri *-*-* 08:00:00', '*-*-* 04:00 "
        "Europe/Berlin' or 'daily'; `systemd-analyze calendar EVENT` shows how systemd reads it",
    ]


@pytest.fixture
def calendar_runs(monkeypatch) -> list[list[str]]:
    """The systemd-analyze calendar commands validation runs."""
    runs: list[list[str]] = []
    real = subprocess.run

    def counting(argv, *args, **kwargs):
        if len(argv) > 1 and argv[1] == "calendar":
            runs.append(list(argv))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(systemctl_module.subprocess, "run", counting)
    return runs


@needs_analyze
def test_all_calendar_events_of_a_run_go_to_one_call_and_cached_files_to_none(
        project, calendar_runs, tmp_path):
    for name in ("a", "b", "c"):
        (project / f"agents.d/{name}.yaml").write_text(
            schedule(name, '{onCalendar: [weekly, daily, "*:0/5"]}'))
    cache = tmp_path / "cache.marshal"

    load(project / "agents.d", cache_file=cache)
    assert len(calendar_runs) == 1
    assert calendar_runs[0][-4:] == ["--", "weekly", "daily", "*:0/5"]  # each event once

    load(project / "agents.d", cache_file=cache)
    assert len(calendar_runs) == 1, "files in the document cache were checked again"

    (project / "agents.d/c.yaml").write_text(schedule("c", '{onCalendar: "monthly"}'))
    load(project / "agents.d", cache_file=cache)
    assert calendar_runs[1][-1:] == ["monthly"]


def test_without_systemd_analyze_calendar_events_are_noted_not_checked(
        project, spos, monkeypatch, tmp_path):
    monkeypatch.setattr(systemctl_module.shutil, "which", lambda name: None)
    (project / "agents.d/a.yaml").write_text(schedule("a", '{onCalendar: "not a calendar"}'))
    note = ("Note: timers' onCalendar values were not checked (systemd-analyze is not installed): "
            "systemd checks them when it loads the units. Validate where systemd is installed to "
            "check them now.")

    result = spos("validate", "agents.d")
    assert (result.code, result.err.splitlines()) == (0, [note])
    as_json = json.loads(spos("validate", "agents.d", "--json").out)
    assert as_json["notes"] == [note[len("Note: "):]]
    planned = spos("plan", "agents.d", "--root", tmp_path / "device")
    assert note in planned.out.splitlines()

    cache = tmp_path / "cache.marshal"
    load(project / "agents.d", cache_file=cache)
    if ANALYZE is not None:  # systemd-analyze arrives: the file was not cached unchecked
        monkeypatch.setattr(systemctl_module.shutil, "which", REAL_WHICH)
        with pytest.raises(ManifestError, match="1 problem"):
            load(project / "agents.d", cache_file=cache)


def test_timer_values_systemd_cannot_take_are_refused(project, spos):
    (project / "agents.d/a.yaml").write_text(
        schedule("a", '{onBootSec: 106751992d, onUnitActiveSec: 0s, accuracy: 106751991d}')
        + "---\n" + schedule("b", '{onCalendar: "daily\\\\"}'))

    assert problems(spos("validate", "agents.d")) == [
        "agents.d/a.yaml:7:11: error: '106751992d' is longer than a systemd timer can count "
        "(at spec.timer.onBootSec)",
        "    hint: systemd time spans end at 106751991d",
        "agents.d/a.yaml:7:34: error: an interval of 0 would start the task again as soon as it "
        "starts (at spec.timer.onUnitActiveSec)",
        "    hint: give an interval longer than 0, e.g. 15m",
        "agents.d/a.yaml:15:11: error: 'daily\\\\' contains a backslash (at spec.timer.onCalendar)",
        "    hint: calendar events never need one, and at the end of a unit file line it would "
        "join the next line to this one",
    ]


def test_limits_of_zero_are_refused(project, spos):
    (project / "agents.d/q.yaml").write_text(dedent("""\
        apiVersion: spos/v1
        kind: Quota
        metadata: {name: none}
        spec: {cpu: "0.004%", memory: "0"}
    """))

    assert problems(spos("validate", "agents.d")) == [
        "agents.d/q.yaml:4:8: error: '0.004%' is below the smallest CPU limit, 0.01% (at spec.cpu)",
        "    hint: a CPU limit of 0 lets nothing run; leave cpu out for no limit",
        "agents.d/q.yaml:4:23: error: a memory limit of 0 lets nothing run (at spec.memory)",
        "    hint: leave memory out for no limit",
    ]


# ---------------------------------------------------------------- activation

def test_systemd_is_detected_as_systemd_does_and_only_for_root_slash(monkeypatch, tmp_path):
    monkeypatch.setattr(systemctl_module, "RUNNING_MARKER", str(tmp_path / "absent"))
    assert systemctl_module.detect("/") is None

    monkeypatch.setattr(systemctl_module, "RUNNING_MARKER", str(tmp_path))
    assert isinstance(systemctl_module.detect("/"), systemctl_module.Systemctl)
    assert systemctl_module.detect(tmp_path) is None


NOT_ACTIVATED = (
    "Note: 3 timer Schedule(s) (iot-sensor-001-upload, maintenance-001-logrotate, "
    "monitor-001-boot) are written as systemd units but not activated: spos activates units "
    "only with --root / on a device whose init system is systemd (/run/systemd/system exists). "
    "Elsewhere nothing starts them.")


def test_plan_and_apply_say_units_are_written_but_not_activated(spos, manifests, device_root,
                                                                 tmp_path):
    planned = spos("plan", manifests, "--root", device_root, "-out", tmp_path / "plan.json")
    applied_from_plan = spos("apply", tmp_path / "plan.json", "--root", device_root)
    (device_root / "etc/systemd/system/spos-schedule-monitor-001-boot.timer").unlink()
    applied = spos("apply", manifests, "--root", device_root, "--auto-approve")

    for result in (planned, applied_from_plan, applied):
        assert result.code == 0, result.err
        assert NOT_ACTIVATED in result.out.splitlines()


def test_apply_activates_units_where_systemd_is_the_init_system(
        spos, manifests, device_root, monkeypatch, recording_systemctl):
    """The CLI hands the device's systemd to plan and apply: no notice, the timers planned as
    enabled, one reload, each new timer enabled and started; the next plan is empty."""
    systemctl = recording_systemctl(device_root)
    monkeypatch.setattr(systemctl_module, "detect", lambda root: systemctl)

    applied = spos("apply", manifests, "--root", device_root, "--auto-approve")

    assert applied.code == 0, applied.out + applied.err
    assert "not activated" not in applied.out
    assert systemctl.calls == [["daemon-reload"]] + [
        ["enable", "--now", f"spos-schedule-{name}.timer"]
        for name in ("iot-sensor-001-upload", "maintenance-001-logrotate", "monitor-001-boot")]
    assert spos("plan", manifests, "--root", device_root, "--detailed-exitcode").code == 0


class FailingSystemctl:
    """A systemctl whose commands starting with `failing` fail (the others are recorded)."""

    def __init__(self, recorder, failing: str):
        self.recorder, self.failing = recorder, failing

    def run(self, *arguments: str) -> None:
        if arguments[0] == self.failing:
            raise SystemctlError(f"systemctl {' '.join(arguments)}: Access denied")
        self.recorder.run(*arguments)


ONE_TIMER = """\
    apiVersion: spos/v1
    kind: Agent
    metadata: {name: alpha}
    spec:
      tasks:
        ping:
          command: ["/bin/true"]
    ---
    apiVersion: spos/v1
    kind: Schedule
    metadata: {name: alpha-boot}
    spec: {agent: alpha, task: ping, timer: {onBootSec: 2m}}
"""


def plan_for(device: Device, text: str, directory: Path):
    directory.mkdir(exist_ok=True)
    (directory / "case.yaml").write_text(dedent(text))
    manifests = load(directory)
    facts = Facts(spos_command=("/usr/local/bin/spos",), activate_units=device.systemd is not None)
    desired = render(manifests, facts)
    inventory = read_inventory(device)["resources"]
    return plan(desired, observe(device, set(desired) | set(inventory)), inventory,
                root="/", manifests={"path": "case", "revision": None, "digest": manifests.digest})


@pytest.mark.parametrize("failing", ["enable", "daemon-reload"])
def test_a_failed_activation_is_reported_and_the_next_apply_retries_it(
        tmp_path, recording_systemctl, failing):
    root = tmp_path / "device"
    recorder = recording_systemctl(root)
    device = Device(root, systemd=FailingSystemctl(recorder, failing))

    result = apply(device, plan_for(device, ONE_TIMER, tmp_path / "m"))

    assert [(change.id, error.split(":")[0]) for change, error in result.failed] == [
        ("timer/alpha-boot", "unit files written, not activated" if failing == "enable"
         else "systemd did not load the changed unit files")]
    assert "timer/alpha-boot" not in read_inventory(device)["resources"]
    assert (root / "etc/systemd/system/spos-schedule-alpha-boot.timer").is_file()

    device = Device(root, systemd=recorder)
    again = plan_for(device, ONE_TIMER, tmp_path / "m")
    assert [(c.id, c.action, [f["path"] for f in c.fields]) for c in again.changes] == [
        ("timer/alpha-boot", "update", ["enabled"])]
    assert apply(device, again).ok
    assert recorder.calls[-1] == ["enable", "--now", "spos-schedule-alpha-boot.timer"]
    assert plan_for(device, ONE_TIMER, tmp_path / "m").changes == []


def test_a_timer_that_cannot_be_stopped_is_not_deleted(tmp_path, recording_systemctl):
    root = tmp_path / "device"
    recorder = recording_systemctl(root)
    device = Device(root, systemd=recorder)
    assert apply(device, plan_for(device, ONE_TIMER, tmp_path / "m")).ok
    without_timer = ONE_TIMER.split("    ---")[0]

    device = Device(root, systemd=FailingSystemctl(recorder, "disable"))
    result = apply(device, plan_for(device, without_timer, tmp_path / "m"))

    assert [change.id for change, _ in result.failed] == ["timer/alpha-boot"]
    assert (root / "etc/systemd/system/spos-schedule-alpha-boot.timer").is_file()
    assert "timer/alpha-boot" in read_inventory(device)["resources"]

    device = Device(root, systemd=recorder)
    assert apply(device, plan_for(device, without_timer, tmp_path / "m")).ok
    assert not (root / "etc/systemd/system/spos-schedule-alpha-boot.timer").exists()
    assert recorder.calls[-2:] == [["disable", "--now", "spos-schedule-alpha-boot.timer"],
                                   ["daemon-reload"]]


def test_the_real_systemctl_reports_what_failed(tmp_path):
    runner = systemctl_module.Systemctl(command=(sys.executable, "-c",
                                                 "import sys; sys.exit('Unit x.timer not found.')"))
    with pytest.raises(SystemctlError, match="Unit x.timer not found."):
        runner.run("start", "x.timer")
