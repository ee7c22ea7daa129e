"""A real Debian cron daemon runs the lines spos renders.

`spos apply` (the installed package, run as a subprocess) renders `/etc/cron.d/spos-<agent>`
under a temporary root. Cron only reads the real `/etc/cron.d`, so the rendered file is copied
there under a unique name, unchanged, and cron is started under libfaketime at twenty times
real speed: a `* * * * *` line fires every ~3 s. The tests assert on what the job did (the
queued action), because this machine has no syslog.

Cron runs jobs with a minimal environment (PATH=/usr/bin:/bin, no PYTHONPATH), so the line
names an absolute interpreter: `<sys.executable> -m reconciler`, which finds the package
through the interpreter's own site-packages (an editable install works too).

Only one cron may run per machine: the tests skip when one is already running, and a lock
file serialises concurrent test runs on the same machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import reconciler

pytestmark = [pytest.mark.slow, pytest.mark.root]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SYSTEM_CRON_DIR = Path("/etc/cron.d")
LOCK_FILE = Path("/tmp/spos-test-real-cron.lock")
LOCK_WAIT_SECONDS = 90
FIRE_WAIT_SECONDS = 60
# Twenty times real speed, from a fixed midday start: no entry of Debian's own /etc/crontab
# (cron.hourly at :17, cron.daily at 06:25, ...) falls in the fake minutes a test run covers.
FAKETIME = "@2030-01-07 12:20:00 x20"

AGENT = "cron-probe"
TASK = "tick"
ACTIVE = "cron-probe-every-minute"
SUSPENDED = "cron-probe-suspended"
MANIFESTS = f"""\
apiVersion: spos/v1
kind: Agent
metadata:
  name: {AGENT}
spec:
  description: Does nothing; its queue shows that cron ran spos.
  tasks:
    {TASK}:
      command: ["/bin/true"]
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: {ACTIVE}
spec:
  agent: {AGENT}
  task: {TASK}
  cron: "* * * * *"
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: {SUSPENDED}
spec:
  agent: {AGENT}
  task: {TASK}
  cron: "* * * * *"
  suspend: true
"""


@dataclass
class CronRun:
    rendered_file: Path
    rendered: str
    queue: Path
    log: Path

    def records(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.queue.glob("*.json"))]

    def wait_for(self, enough, what: str) -> list[dict]:
        """Poll the queue until `enough(records)`; fail with a diagnosis after FIRE_WAIT_SECONDS."""
        deadline = time.monotonic() + FIRE_WAIT_SECONDS
        while time.monotonic() < deadline:
            records = self.records()
            if enough(records):
                return records
            time.sleep(0.2)
        pytest.fail(f"cron did not {what} within {FIRE_WAIT_SECONDS}s; queue: {self.records()}\n"
                    f"cron's output: {self.log.read_text()!r}\n{_run_like_cron(self.rendered)}")


def _skip_unless_real_cron_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: cron reads only the real /etc/cron.d, owned by root")
    if shutil.which("cron") is None:
        pytest.skip("Debian cron is not installed (.ci/run installs it: apt-get install cron)")
    if not LIBFAKETIME.exists():
        pytest.skip(f"libfaketime is not installed ({LIBFAKETIME}; .ci/run installs faketime)")


def _hold_machine_lock():
    handle = LOCK_FILE.open("a")
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                pytest.skip(f"another test run held {LOCK_FILE} for {LOCK_WAIT_SECONDS}s")
            time.sleep(0.5)


def _cron_already_running() -> bool:
    return subprocess.run(["pgrep", "-x", "cron"], capture_output=True).returncode == 0


def _spos(*args: str) -> subprocess.CompletedProcess:
    """The installed spos. SPOS_COMMAND is unset, so the rendered lines use the default a device
    gets: this interpreter running the lean entry point with -I -S."""
    env = {key: value for key, value in os.environ.items() if key != "SPOS_COMMAND"}
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def _command_of(cron_d_line: str) -> str:
    """The command field of an /etc/cron.d line (after five time fields and the user)."""
    return cron_d_line.split(None, 6)[6].replace("\\%", "%")


def _run_like_cron(rendered: str) -> str:
    """Run every active rendered line's command in cron's environment, to tell 'cron did not
    fire' from 'the command fails under cron'."""
    reports = []
    for line in rendered.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        result = subprocess.run(
            ["env", "-i", "PATH=/usr/bin:/bin", "SHELL=/bin/sh", "HOME=/root", "LOGNAME=root",
             "/bin/sh", "-c", _command_of(line)],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        reports.append(f"$ {_command_of(line)}\nexit {result.returncode}\n"
                       f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return "Running the rendered commands as cron would:\n" + "\n".join(reports)


@pytest.fixture(scope="module")
def cron_run(tmp_path_factory):
    """Apply the probe manifests, install the rendered file in /etc/cron.d, run cron fast."""
    _skip_unless_real_cron_possible()
    lock = _hold_machine_lock()
    try:
        if _cron_already_running():
            pytest.skip("a cron daemon is already running (only one cron per machine)")
        work = tmp_path_factory.mktemp("real-cron")
        manifests = work / "agents.d"
        manifests.mkdir()
        (manifests / f"{AGENT}.yaml").write_text(MANIFESTS)
        root = work / "device"
        root.mkdir()
        applied = _spos("apply", str(manifests), "--root", str(root), "--auto-approve")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        rendered_file = root / "etc/cron.d" / f"spos-{AGENT}"
        queue = root / f"var/lib/systemprompt-os/agents/{AGENT}/queue"
        installed = SYSTEM_CRON_DIR / f"spos-test-{os.getpid()}-{secrets.token_hex(4)}"
        run = CronRun(rendered_file, rendered_file.read_text(), queue, work / "cron.log")
        yield from _run_cron(run, installed)
    finally:
        lock.close()


def _run_cron(run: CronRun, installed: Path):
    daemon = None
    try:
        shutil.copyfile(run.rendered_file, installed)
        os.chown(installed, 0, 0)
        installed.chmod(stat.S_IMODE(run.rendered_file.stat().st_mode))
        with run.log.open("wb") as output:
            daemon = subprocess.Popen(
                ["cron", "-f", "-L", "0"],
                env={**os.environ, "FAKETIME": FAKETIME, "LD_PRELOAD": str(LIBFAKETIME)},
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        yield run
    finally:
        if daemon is not None:
            _stop_process_group(daemon)
        installed.unlink(missing_ok=True)


def _stop_process_group(daemon: subprocess.Popen) -> None:
    """Stop cron and the `cron` it forks for each running job (same process group), so that
    the next run's check for a running cron finds none."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal_number)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(daemon.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def test_spos_renders_a_file_cron_accepts(cron_run):
    """Debian cron skips /etc/cron.d files with a dot in the name or writable by group or others;
    its jobs get PATH=/usr/bin:/bin only, so the command must be absolute."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cron_run.rendered_file.name)
    assert stat.S_IMODE(cron_run.rendered_file.stat().st_mode) & 0o022 == 0
    entry = Path(reconciler.__file__).resolve().parent / "_cron.py"
    assert f"\n* * * * * root {shlex.quote(sys.executable)} -I -S {shlex.quote(str(entry))} --root " \
        in cron_run.rendered
    assert "\n#suspended# * * * * * root " in cron_run.rendered


def test_cron_fires_a_rendered_line_and_the_action_is_queued(cron_run):
    started = time.monotonic()
    records = cron_run.wait_for(lambda found: len(found) >= 1, "enqueue an action")
    first = records[0]
    assert first["format"] == 1
    assert first["agent"] == AGENT
    assert first["task"] == TASK
    assert first["source"] == {"kind": "schedule", "name": ACTIVE}
    assert first["attempt"] == 1
    print(f"real cron queued the first action {time.monotonic() - started:.1f}s into this test")


def test_cron_does_not_fire_a_suspended_schedule(cron_run):
    """Two firings of the active line mean cron has run two minutes that the suspended line
    (same expression, commented out) would have fired in too."""
    records = cron_run.wait_for(lambda found: len(found) >= 2, "fire the active schedule twice")
    assert {record["source"]["name"] for record in records} == {ACTIVE}
