"""A booted systemd: `spos apply` activates the units it renders, and a timer fires and runs the
action.

systemd is not this machine's init system, so the test boots one, as docs/systemd.md and the
machine notes describe: `systemd-nspawn --boot` on an overlay of the host's root whose writable
layer is a tmpfs, with a private network, inside a private mount namespace (`unshare --mount
--propagation private`), so nothing it writes reaches the host. The host's enabled units are
disabled in the overlay (their `*.wants` links removed), so only systemd's own services and
what spos enables run. `spos apply --root /` runs inside the container (`nsenter`), where
`/run/systemd/system` exists: there spos activates what it writes.

nspawn mounts a fresh /tmp in the container, so the Python that runs spos and the checkout are
bound in read-only where they would otherwise be hidden; the manifests are bound at /srv.

The container's cgroups are not spos's to manage here (agents' cgroups are tested in
test_cgroups.py), so apply runs with a --cgroup-root that has none. Every wait is bounded; the
container is powered off, then killed, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reconciler

pytestmark = [pytest.mark.slow, pytest.mark.root]

BOOT_SECONDS = 60
FIRE_SECONDS = 60
COMMAND_SECONDS = 120
STOP_SECONDS = 30
MANIFESTS = "/srv/spos-e2e/agents.d"
OUTPUT = "/var/lib/systemprompt-os/agents/probe/output"
INTERVAL, CALENDAR = "spos-schedule-probe-interval.timer", "spos-schedule-probe-calendar.timer"

PROBE = f"""\
apiVersion: spos/v1
kind: Agent
metadata: {{name: probe}}
spec:
  capability: probe
  quota: probe
  tasks:
    tick:
      command: ["/bin/sh", "-c", "echo tick >> {OUTPUT}/ticks"]
    tock:
      command: ["/bin/sh", "-c", "echo tock >> {OUTPUT}/tocks"]
---
apiVersion: spos/v1
kind: Capability
metadata: {{name: probe}}
spec:
  allowed:
    execute: [/bin/sh, /usr/bin/dash]
    write: [{OUTPUT}]
    network: [none]
  denied:
    read: [/etc/shadow]
---
apiVersion: spos/v1
kind: Quota
metadata: {{name: probe}}
spec: {{nice: 5}}   # limits that need cgroup controllers the container does not have are left out
"""
INTERVAL_SCHEDULE = """\
---
apiVersion: spos/v1
kind: Schedule
metadata: {name: probe-interval}
spec:
  agent: probe
  task: tick
  timer: {onBootSec: 1s, onUnitActiveSec: INTERVAL, accuracy: 1s}SUSPEND
"""
CALENDAR_SCHEDULE = """\
---
apiVersion: spos/v1
kind: Schedule
metadata: {name: probe-calendar}
spec:
  agent: probe
  task: tock
  timer: {onCalendar: "*:*:0/2", accuracy: 1s}
"""

BOOT_SCRIPT = """\
set -eu
mount -t tmpfs spos-e2e "$BASE"
mkdir "$BASE/upper" "$BASE/work" "$BASE/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$BASE/upper,workdir=$BASE/work" "$BASE/root"
rm -rf "$BASE"/root/etc/systemd/system/*.wants "$BASE"/root/etc/systemd/system/spos-schedule-*
rm -rf "$BASE/root/var/lib/systemprompt-os"
exec systemd-nspawn --quiet --register=no --keep-unit --private-network \\
    --directory="$BASE/root" "$@" --boot
"""


def _skip_unless_nspawn_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: booting systemd-nspawn, mounting an overlay")
    for program in ("systemd-nspawn", "unshare", "nsenter"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (.ci/run installs systemd-container and "
                        "util-linux)")


def _bind_options(manifests: Path) -> list[str]:
    """Read-only binds for what the container's fresh /tmp would hide: the interpreter, its
    environment and the checkout spos runs from (CI keeps its virtual environment in /tmp)."""
    package_root = Path(reconciler.__file__).resolve().parent.parent
    wanted = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, package_root)})
    outermost = [p for p in wanted if not any(p != q and p.startswith(q + "/") for q in wanted)]
    return [f"--bind-ro={path}" for path in outermost if path.startswith("/tmp/")] + [
        f"--bind-ro={manifests}:{MANIFESTS}"]


class Container:
    """A booted systemd in a container; `run` executes a command inside it."""

    def __init__(self, nspawn: subprocess.Popen, log: Path, manifests: Path):
        self.nspawn, self.log, self.manifests, self.pid = nspawn, log, manifests, None

    def wait_until_booted(self) -> None:
        deadline = time.monotonic() + BOOT_SECONDS
        while self.pid is None:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd-nspawn did not boot a container here: {self.log.read_text()[-2000:]}")
            self.pid = _init_below(self.nspawn.pid)
            time.sleep(0.1)
        state = self.run("systemctl", "is-system-running", "--wait", timeout=BOOT_SECONDS)
        while not state.stdout.strip() and time.monotonic() < deadline:  # its bus is not up yet
            time.sleep(0.2)
            state = self.run("systemctl", "is-system-running", "--wait", timeout=BOOT_SECONDS)
        assert state.stdout.strip() in ("running", "degraded"), (state, self.log.read_text()[-2000:])

    def run(self, *argv: str, timeout: float = COMMAND_SECONDS) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def spos(self, *argv: str) -> subprocess.CompletedProcess:
        """spos inside the container, rendering units with the command a device gets."""
        return self.run("env", "-u", "SPOS_COMMAND", sys.executable, "-m", "reconciler", *argv)

    def apply(self) -> subprocess.CompletedProcess:
        return self.spos("apply", MANIFESTS, "--auto-approve", "--cgroup-root", "/nonexistent")

    def lines(self, path: str) -> list[str]:
        return self.run("cat", path).stdout.splitlines()

    def systemctl(self, *argv: str) -> str:
        return self.run("systemctl", *argv).stdout.strip()

    def stop(self) -> None:
        """Power off; after STOP_SECONDS kill what is left. Never raises."""
        with contextlib.suppress(ProcessLookupError, OSError):
            os.kill(self.nspawn.pid, signal.SIGTERM)  # nspawn asks the container to power off
        try:
            self.nspawn.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            # The container's init first: killing it ends its whole pid namespace.
            targets = [(os.kill, self.pid)] if self.pid else []
            for kill, pid in [*targets, (os.killpg, self.nspawn.pid)]:
                with contextlib.suppress(ProcessLookupError, OSError):
                    kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(timeout=STOP_SECONDS)


def _init_below(ancestor: int) -> int | None:
    """The pid of the container's init: the `systemd` process descending from nspawn."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        parents[int(entry)] = (int(fields[1]), comm)
    for pid, (_, comm) in parents.items():
        if comm != "systemd":
            continue
        step = pid
        while step in parents and step > 1:
            step = parents[step][0]
            if step == ancestor:
                return pid
    return None


def write_manifests(directory: Path, interval: str = "2s", suspend: bool = False,
                    calendar: bool = True) -> None:
    interval_schedule = INTERVAL_SCHEDULE.replace("INTERVAL", interval).replace(
        "SUSPEND", "\n  suspend: true" if suspend else "")
    (directory / "probe.yaml").write_text(
        PROBE + interval_schedule + (CALENDAR_SCHEDULE if calendar else ""))


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    _skip_unless_nspawn_possible()
    work = tmp_path_factory.mktemp("booted-systemd")
    manifests = work / "agents.d"
    manifests.mkdir()
    write_manifests(manifests)
    (work / "base").mkdir()
    log = work / "nspawn.log"
    with log.open("wb") as output:
        nspawn = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", BOOT_SCRIPT, "boot",
             *_bind_options(manifests)],
            env={**os.environ, "BASE": str(work / "base"), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    booted = Container(nspawn, log, manifests)
    try:
        booted.wait_until_booted()
        yield booted
    finally:
        booted.stop()


def wait_for(check, what: str, container: Container):
    deadline = time.monotonic() + FIRE_SECONDS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    journal = container.run("journalctl", "--no-pager", "-n", "60", "-u", "spos-schedule-*").stdout
    pytest.fail(f"{what} within {FIRE_SECONDS}s; the units' journal:\n{journal}")


def test_apply_activates_the_timers_and_they_run_the_actions(container):
    applied = container.apply()

    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "not activated" not in applied.stdout
    assert "  +   timer/probe-interval: done" in applied.stdout
    for timer in (INTERVAL, CALENDAR):
        assert container.systemctl("is-enabled", timer) == "enabled"
        assert container.systemctl("is-active", timer) == "active"

    wait_for(lambda: len(container.lines(f"{OUTPUT}/ticks")) >= 2,
             "the interval timer did not run its task twice", container)
    wait_for(lambda: len(container.lines(f"{OUTPUT}/tocks")) >= 1,
             "the calendar timer did not run its task", container)

    history = json.loads(container.spos("action", "history", "--agent", "probe", "--json").stdout)
    assert {(run["task"], run["state"]) for run in history} == {("tick", "completed"),
                                                              ("tock", "completed")}
    replanned = container.spos("plan", MANIFESTS, "--cgroup-root", "/nonexistent",
                               "--detailed-exitcode")
    assert replanned.returncode == 0, replanned.stdout + replanned.stderr


def test_apply_restarts_changed_timers_stops_suspended_ones_and_removes_deleted_ones(container):
    write_manifests(container.manifests, interval="3s")
    changed = container.apply()

    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "OnUnitActiveUSec=3s" in container.systemctl("show", INTERVAL, "-p", "TimersMonotonic")

    write_manifests(container.manifests, interval="3s", suspend=True, calendar=False)
    pruned = container.apply()

    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert container.systemctl("is-active", INTERVAL) == "inactive"
    assert container.systemctl("is-enabled", INTERVAL) != "enabled"
    units = container.run("ls", "/etc/systemd/system", "/etc/systemd/system/timers.target.wants")
    assert "spos-schedule-probe-calendar" not in units.stdout
    assert "spos-schedule-probe-interval.timer" in units.stdout  # suspended: kept, not enabled
    assert container.systemctl("is-active", CALENDAR) == "inactive"
    assert "spos-schedule" not in container.systemctl("list-timers", "--no-legend")
