"""`spos action run --wait` enqueues, waits for the run's final state and exits with its code.

The waiting command runs as its own process (`python -m reconciler action run ... --wait`,
and once through the lean cron entry point), against a real `spos executor` daemon with its
sandbox, on a temporary device root. Every wait is bounded; actions sleep at most a few
seconds. Needs root, bubblewrap and cgroups, like tests/test_executor.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from sandboxes import sandbox_missing
import waiting

import reconciler
from reconciler.cli import EXIT_WAIT_TIMEOUT, _exit_code

REPO = Path(__file__).resolve().parent.parent
STATE = "var/lib/systemprompt-os"
WAIT = 20




needs_executor = pytest.mark.skipif(bool(sandbox_missing()), reason=sandbox_missing() or "")


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def wait_for(predicate, what: str, timeout: float = WAIT):
    return waiting.wait_for(predicate, what, timeout)


class Device:
    """A temporary device root with one applied agent, an executor daemon, and waiting commands."""

    def __init__(self, root: Path, tmp_path: Path, spos):
        self.root, self.tmp_path, self.spos = root, tmp_path, spos
        self.agent = f"wait-{uuid.uuid4().hex[:8]}"
        self.processes: list[subprocess.Popen] = []
        self.executor: subprocess.Popen | None = None

    def apply(self, tasks: dict) -> None:
        docs = [
            {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "wait-test"},
             "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}},
            {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": self.agent},
             "spec": {"capability": "wait-test", "tasks": tasks}},
        ]
        manifests = self.tmp_path / "agents.d"
        manifests.mkdir(exist_ok=True)
        (manifests / "agents.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
        result = self.spos("apply", manifests, "--root", self.root, "--auto-approve")
        assert result.code == 0, result.err + result.out

    def start_executor(self) -> None:
        log = open(self.tmp_path / "executor.log", "wb")
        self.executor = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "executor", "--root", str(self.root), "--grace", "1s",
             "--rescan", "60s"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
        log.close()
        self.processes.append(self.executor)
        wake = self.root / STATE / "executor.wake"

        def listening():
            assert self.executor.poll() is None, (self.tmp_path / "executor.log").read_text()
            try:
                os.close(os.open(wake, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                return False
            return True

        wait_for(listening, "the executor to read its wake pipe")

    def wait(self, task: str, *args: str, command: list[str] | None = None) -> subprocess.Popen:
        """`spos action run --wait` for `task`, as a process; its stdout is read line by line."""
        argv = command or [sys.executable, "-m", "reconciler"]
        process = subprocess.Popen(
            [*argv, "--root", str(self.root), "action", "run", "--agent", self.agent, "--task", task,
             "--wait", *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.processes.append(process)
        return process

    def first_line(self, process: subprocess.Popen) -> str:
        line = process.stdout.readline().strip()
        assert line, process.stderr.read()
        return line

    def finish(self, process: subprocess.Popen, timeout: float = WAIT) -> tuple[int, str, str]:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err

    def enqueue(self, task: str) -> str:
        result = self.spos("action", "run", "--root", self.root, "--agent", self.agent, "--task", task)
        assert result.code == 0, result.err
        return result.out.strip()

    def record(self, run_id: str) -> dict:
        result = self.spos("action", "show", run_id, "--json", "--root", self.root)
        assert result.code == 0, result.err
        return json.loads(result.out)

    def wait_state(self, run_id: str, *states: str) -> dict:
        return wait_for(lambda: (r := self.record(run_id))["state"] in states and r,
                        f"run {run_id} to be {' or '.join(states)}")

    def output(self, name: str) -> Path:
        return self.root / STATE / "agents" / self.agent / "output" / name

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None and process is not self.executor:
                process.kill()
                process.wait(5)
        if self.executor is not None and self.executor.poll() is None:
            self.executor.send_signal(signal.SIGTERM)
            try:
                self.executor.wait(15)
            except subprocess.TimeoutExpired:
                self.executor.kill()
                self.executor.wait(5)


@pytest.fixture
def device(device_root, tmp_path, spos):
    dev = Device(device_root, tmp_path, spos)
    yield dev
    dev.close()


# -- the exit code -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state, exit_code, expected", [
    ("completed", 0, 0),
    ("failed", 7, 7),
    ("failed", -9, 137),        # killed by SIGKILL (out of memory, say)
    ("failed", None, 1),        # could not start
    ("timeout", -15, 143),      # SIGTERM at the timeout
    ("timeout", -9, 137),       # SIGKILL after the grace period
    ("timeout", 0, 1),          # the action exited 0 on SIGTERM: still not a success
    ("cancelled", -15, 143),
    ("cancelled", None, 1),     # cancelled before it started
    ("skipped", None, 1),
    ("expired", None, 1),
])
def test_the_exit_code_of_a_finished_run(state, exit_code, expected):
    assert _exit_code({"state": state, "exitCode": exit_code}) == expected


# -- waiting for a real executor ----------------------------------------------------------------------


@needs_executor
def test_wait_prints_the_id_first_and_exits_with_the_actions_exit_code(device):
    device.apply({"ok": {"command": sh("sleep 1; echo fine")},
                  "bad": {"command": sh("sleep 1; echo failing; exit 7")}})
    device.start_executor()
    for task, expected in (("ok", 0), ("bad", 7)):
        waiting = device.wait(task)
        run_id = device.first_line(waiting)
        assert waiting.poll() is None, "the id is printed before the run ends"
        code, rest, err = device.finish(waiting)
        assert code == expected, err
        assert rest == ""
        record = device.record(run_id)
        assert record["exitCode"] == expected and record["attempt"] == 1
        if expected:
            assert f"spos: run {run_id} failed: step main exited with 7" in err
        else:
            assert record["state"] == "completed" and err == ""


@needs_executor
def test_wait_goes_on_through_retries_until_none_is_pending(device):
    count = 'n=$(cat $SPOS_OUTPUT_DIR/{0} 2>/dev/null || echo 0); n=$((n+1)); echo $n > $SPOS_OUTPUT_DIR/{0}'
    device.apply({
        "flaky": {"command": sh(count.format("flaky") + "; [ $n -ge 2 ] || exit 5"),
                  "retries": {"limit": 2, "backoff": {"initial": "1s"}}},
        "broken": {"command": sh(count.format("broken") + "; exit 3"),
                   "retries": {"limit": 1, "backoff": {"initial": "1s"}}},
    })
    device.start_executor()

    waiting = device.wait("flaky")
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code == 0, err
    record = device.record(run_id)
    assert [a["state"] for a in record["attempts"]] == ["failed", "completed"]
    assert device.output("flaky").read_text().strip() == "2"

    waiting = device.wait("broken")
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code == 3, err
    assert [a["state"] for a in device.record(run_id)["attempts"]] == ["failed", "failed"]


@needs_executor
def test_timeout_cancel_and_skip_end_the_wait_with_their_codes(device):
    device.apply({
        "slow": {"command": ["/bin/sleep", "30"], "timeout": "1s"},
        "long": {"command": ["/bin/sleep", "30"]},
        "single": {"command": ["/bin/sleep", "3"], "concurrency": "Forbid"},
    })
    device.start_executor()

    waiting = device.wait("slow")
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code in (143, 137) and f"spos: run {run_id} timeout: run timed out after 1s" in err

    waiting = device.wait("long")
    run_id = device.first_line(waiting)
    device.wait_state(run_id, "active")
    assert device.spos("action", "cancel", run_id, "--root", device.root).code == 0
    code, _, err = device.finish(waiting)
    assert code in (143, 137) and f"spos: run {run_id} cancelled" in err  # SIGTERM, or SIGKILL

    first = device.enqueue("single")
    device.wait_state(first, "active")
    waiting = device.wait("single")
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code == 1 and f"spos: run {run_id} skipped: concurrency Forbid" in err
    device.wait_state(first, "completed")


@needs_executor
def test_ctrl_c_stops_the_waiting_but_not_the_run(device):
    device.apply({"t": {"command": sh("sleep 2; echo done > $SPOS_OUTPUT_DIR/done")}})
    device.start_executor()
    waiting = device.wait("t")
    run_id = device.first_line(waiting)
    device.wait_state(run_id, "active")

    waiting.send_signal(signal.SIGINT)
    code, _, err = device.finish(waiting, timeout=5)

    # (on a failure, say how the run went: a run that ended at once would end the waiting too)
    assert code == 130, f"exit {code}; stderr: {err!r}; run: {json.dumps(device.record(run_id))}"
    assert f"spos: stopped waiting; run {run_id} was not cancelled and goes on" in err
    assert "Traceback" not in err
    assert device.wait_state(run_id, "completed", "failed", "cancelled")["state"] == "completed"
    assert device.output("done").read_text() == "done\n"


def test_wait_timeout_gives_up_and_the_run_stays_queued(device):
    device.apply({"t": {"command": ["/bin/true"]}})
    started = time.monotonic()
    waiting = device.wait("t", "--wait-timeout", "1s")
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code == EXIT_WAIT_TIMEOUT == 124
    assert 1.0 <= time.monotonic() - started < 10
    assert f"spos: no executor is running here; run {run_id} waits in the queue" in err
    assert f"spos: gave up waiting after 1s; run {run_id} is queued and goes on" in err
    assert device.record(run_id)["state"] == "queued"


def test_wait_options_are_checked_before_anything_is_queued(device):
    device.apply({"t": {"command": ["/bin/true"]}})
    queue = device.root / STATE / "agents" / device.agent / "queue"
    for args, message in (
        (["--wait-timeout", "1s"], "--wait-timeout goes with --wait"),
        (["--wait", "--wait-timeout", "soon"], "--wait-timeout: not a duration"),
    ):
        result = device.spos("action", "run", "--root", device.root, "--agent", device.agent,
                             "--task", "t", *args)
        assert result.code == 1 and message in result.err
    assert not list(queue.glob("*.json"))


def _watching(pid: int) -> bool:
    """Whether the process holds an inotify instance."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == "anon_inode:inotify" for fd in fds.iterdir())
    except OSError:  # an fd closed while looked at: look again
        return False


@needs_executor
def test_waiting_sleeps_until_woken_and_ends_as_soon_as_the_run_does(device):
    device.apply({"t": {"command": sh("sleep 3")}})
    device.start_executor()
    waiting = device.wait("t")
    run_id = device.first_line(waiting)
    device.wait_state(run_id, "active")
    process = psutil.Process(waiting.pid)
    # measured once it waits: it prints the run id before it sets up its watch (10 to 30 ms of
    # CPU, which a loaded machine pushes into the window)
    wait_for(lambda: _watching(waiting.pid) and process.status() == psutil.STATUS_SLEEPING,
             "the waiting command to watch the run and sleep")
    before = sum(process.cpu_times()[:2])
    time.sleep(1.5)
    used = sum(process.cpu_times()[:2]) - before
    assert waiting.poll() is None
    assert used < 0.05, f"waiting used {used:.3f}s of CPU in 1.5s"

    wait_for(lambda: waiting.poll() is not None, "the waiting command to end")
    ended = time.time()
    assert waiting.returncode == 0, waiting.stderr.read()
    lag = ended - datetime.fromisoformat(device.record(run_id)["endedAt"]).timestamp()
    assert lag < 1.0, f"the wait ended {lag:.2f}s after the run (no wake-up?)"


@needs_executor
def test_the_lean_cron_entry_point_hands_wait_to_the_full_command_line(device):
    device.apply({"bad": {"command": sh("exit 7")}})
    device.start_executor()
    entry = str(Path(reconciler.__file__).parent / "_cron.py")
    waiting = device.wait("bad", command=[sys.executable, "-I", "-S", entry])
    run_id = device.first_line(waiting)
    code, _, err = device.finish(waiting)
    assert code == 7, err
    assert device.record(run_id)["state"] == "failed"
