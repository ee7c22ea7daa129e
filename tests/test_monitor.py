"""`spos action monitor` and `spos action watch` (reconciler/monitor.py), as people read them.

- What users read is locked with syrupy snapshots of one fixed state: run records written into
  a temporary root as the executor writes them, a cgroup tree of plain files holding one run's
  CPU time and memory (as in tests/test_resources.py), a fixed `now`, and TZ=UTC. The one-shot
  table, its JSON and a frame of the live view are all rendered from that one snapshot.
- The live view runs as a real process in a pseudo-terminal; what a person would see is
  rendered from its bytes by pyte, a terminal emulator (with xterm's alternate screen added, so
  the test sees the screen the person had before, once the view is left).
- watch runs as a real process while runs are queued, claimed, retried and ended by the same
  RunStore moves, records and log writer (rotation included) the executor uses; and once with
  the real executor, whose run's own cgroup monitor measures too (root and the sandbox needed).

Every wait is bounded (WAIT seconds) and polls; nothing sleeps longer than a poll.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyte
import pytest
from sandboxes import sandbox_missing
import waiting
from rich.console import Console

from reconciler import monitor
from reconciler.cgroupfs import parent_for
from reconciler.device import Device
from reconciler.executor.enqueue import enqueue
from reconciler.executor.owner import identity
from reconciler.executor.runs import Run, RunStore
from reconciler.executor.supervise import LogWriter, now_iso, run_dirs

REPO = Path(__file__).resolve().parent.parent
AGENTS = "var/lib/systemprompt-os/agents"
NOW = datetime(2026, 11, 26, 9, 5, tzinfo=timezone.utc).timestamp()
WAIT = 15  # the longest any single wait may take, in seconds
GONE = {"pid": 1, "bootId": "an earlier boot", "startTicks": 1}
"""The owner of a run whose executor died: not this boot's."""


def wait_for(predicate, what: str, timeout: float = WAIT):
    return waiting.wait_for(predicate, what, timeout)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Times are shown in the device's zone: make it UTC, here and in the processes started."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- a fixed state ---------------------------------------------------------------------------


def record_file(root: Path, agent: str, bucket: str, serial: int, **fields) -> Path:
    """A run record as the executor keeps it, named as the queue names it."""
    run_id = f"20261126T090000-{serial:08x}"
    record = {"format": 1, "id": run_id, "agent": agent, "task": "scan", "priority": 50,
              "enqueuedAt": "2026-11-26T09:00:00.000+00:00", "notAfter": None,
              "source": {"kind": "schedule", "name": f"{agent}-hourly"}, "attempt": 1, **fields}
    directory = root / AGENTS / agent / bucket
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"050-{serial:020d}-{run_id}.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def cgroup_files(cgroups: Path, root: Path, agent: str, serial: int, files: dict[str, str]) -> None:
    """Files of a run's own cgroup in a v1 tree of plain files (`controller/file`: content)."""
    run = f"{parent_for(str(root))}/{agent}/20261126T090000-{serial:08x}"
    for file, content in files.items():
        controller, _, name = file.partition("/")
        (cgroups / controller / run).mkdir(parents=True, exist_ok=True)
        (cgroups / controller / run / name).write_text(content + "\n")


@pytest.fixture
def state(tmp_path) -> tuple[Path, Path]:
    """(device root, cgroup root) of a device caught at 09:05:00:

    - alpha: 3 queued; 4 active: one running for a minute at 40% whose cgroup says 1.5 s of
      CPU and 250M of memory, one claimed for its second attempt and not started yet, one
      with a cancel request waiting that reported only a message, and one between two steps
      (no cgroup); 5 completed; 1 failed, and a file set aside as not a record (not counted).
    - beta: one active run whose executor is gone; 2 failed.
    - gamma: applied, no runs.
    """
    root, cgroups = tmp_path / "device", tmp_path / "cgroup"
    for controller in ("memory", "cpu", "cpuacct", "pids"):
        (cgroups / controller).mkdir(parents=True)
        (cgroups / controller / "cgroup.procs").write_text("")
    me = identity()
    for serial in (1, 2, 3):
        record_file(root, "alpha", "queue", serial)
    record_file(root, "alpha", "active", 4, state="active", executor=me,
                startedAt="2026-11-26T09:04:00.000+00:00",
                progress={"percent": 40.0, "message": "fetched 120 of 300 papers"})
    cgroup_files(cgroups, root, "alpha", 4, {"cpuacct/cpuacct.usage": "1500000000",
                                             "memory/memory.usage_in_bytes": "250000000"})
    earlier = "2026-11-26T08:50:00.000+00:00"
    record_file(root, "alpha", "active", 5, state="active", executor=me, attempt=2, startedAt=earlier,
                attempts=[{"attempt": 1, "startedAt": earlier, "endedAt": "2026-11-26T08:51:00.000+00:00",
                           "state": "failed", "exitCode": 1, "reason": ""}])
    cancelled = record_file(root, "alpha", "active", 6, state="active", executor=me,
                            startedAt="2026-11-26T09:00:30.000+00:00", progress={"message": "ranking"})
    Path(f"{cancelled}.cancel").write_text('{"runId": "20261126T090000-00000006", "attempt": 1}')
    record_file(root, "alpha", "active", 7, state="active", executor=me,
                startedAt="2026-11-26T07:59:59.000+00:00", stepsDone=["fetch"])
    for serial in range(10, 15):
        record_file(root, "alpha", "completed", serial, state="completed")
    failed = record_file(root, "alpha", "failed", 15, state="failed")
    Path(f"{failed}.corrupt").write_text("not a record")
    Path(f"{failed}.corrupt.reason").write_text("not valid JSON")
    record_file(root, "beta", "active", 20, state="active", executor=GONE,
                startedAt="2026-11-26T08:00:00.000+00:00")
    record_file(root, "beta", "failed", 21, state="timeout")
    record_file(root, "beta", "failed", 22, state="cancelled")
    (root / AGENTS / "gamma").mkdir()
    return root, cgroups


def executor_listening(root: Path) -> int:
    """The executor's wake pipe, held open for reading as a running executor holds it."""
    pipe = root / "var/lib/systemprompt-os/executor.wake"
    os.mkfifo(pipe)
    return os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)


# -- what the snapshot says ------------------------------------------------------------------


def test_the_table_and_json_of_a_fixed_state(state, snapshot):
    root, cgroups = state
    reader = executor_listening(root)
    try:
        snap = monitor.snapshot(Device(root, cgroup_root=str(cgroups)), now=NOW)
    finally:
        os.close(reader)

    assert json.dumps(snap, indent=2) + "\n" == snapshot(name="json")
    assert monitor.text(snap) == snapshot(name="text")


def test_a_frame_of_the_live_view(state, snapshot):
    root, cgroups = state
    snap = monitor.snapshot(Device(root, cgroup_root=str(cgroups)), now=NOW)

    assert frame(snap, 110, 20) == snapshot(name="110x20")
    assert frame(snap, 80, 12) == snapshot(name="80x12")  # the idle agent and some runs left out


def frame(snap: dict, columns: int, lines: int) -> str:
    console = Console(width=columns, height=lines, color_system=None, force_terminal=False)
    with console.capture() as captured:
        console.print(monitor.live_view(snap, lines))
    return captured.get()


def test_the_live_view_fits_its_terminal_whatever_the_state(state):
    root, cgroups = state
    snap = monitor.snapshot(Device(root, cgroup_root=str(cgroups)), now=NOW)
    many = {**snap, "agents": [{**agent, "agent": f"{agent['agent']}-{copy}"}
                               for copy in range(40) for agent in snap["agents"]]}

    for columns, lines in ((120, 40), (80, 24), (40, 10), (12, 9)):
        shown = frame(many, columns, lines).splitlines()
        assert len(shown) <= lines, (columns, lines, shown)
    assert frame(many, 8, 3)  # smaller still: cut off by the screen below, drawn all the same
    assert "more runs" in frame(many, 120, 40) and "more agents" in frame(many, 120, 40)


def test_what_a_run_reports_is_shown_as_it_wrote_it(state):
    root, cgroups = state
    message = "[bold]not markup[/] [/oops]"
    record_file(root, "gamma", "active", 40, state="active", executor=identity(),
                startedAt="2026-11-26T09:04:30.000+00:00", progress={"percent": 12.5, "message": message})
    snap = monitor.snapshot(Device(root, cgroup_root=str(cgroups)), now=NOW)

    assert message in frame(snap, 160, 30)
    assert f"12% {message}" in monitor.text(snap)


def test_nothing_measurable_is_null_never_an_error(state):
    root, _ = state
    snap = monitor.snapshot(Device(root, cgroup_root=str(root / "sys/fs/cgroup")), now=NOW)

    runs = [run for agent in snap["agents"] for run in agent["active"]]
    assert len(runs) == 5
    assert all(run["cpuSeconds"] is None and run["memoryBytes"] is None for run in runs)
    assert snap["executorRunning"] is False


def test_what_a_record_holds_of_the_wrong_kind_is_null_or_dash(state):
    """Records written by hand: an owner that cannot be told alive is abandoned, a percent that
    is no number from 0 to 100 is null, a message that is no text is "", a start time that is
    no time is "-" in the table, and a task's newline is shown escaped, on one line."""
    root, cgroups = state
    record_file(root, "gamma", "active", 40, state="active", task="scan\nnext", startedAt=5,
                executor={"pid": [1], "bootId": {"b": 1}, "startTicks": "1"},
                progress={"percent": 150, "message": {"a": 1}})
    record_file(root, "gamma", "active", 41, state="active", executor=identity(), startedAt="soon",
                progress={"percent": "40", "message": None})
    snap = monitor.snapshot(Device(root, cgroup_root=str(cgroups)), now=NOW)

    gamma = snap["agents"][2]["active"]
    assert [(run["state"], run["startedAt"], run["runtimeSeconds"], run["progress"]) for run in gamma] == [
        ("abandoned", None, None, {"percent": None, "message": ""}),
        ("running", "soon", None, {"percent": None, "message": ""})]
    rows = {line.split()[0]: line.split() for line in monitor.text(snap).splitlines()
            if line.startswith("2026")}
    assert rows["20261126T090000-00000028"][2:5] == ["scan\\x0anext", "1", "abandoned"]
    assert rows["20261126T090000-00000029"][4:7] == ["running", "-", "-"]
    assert "scan\\x0anext" in frame(snap, 160, 30)


NEXT = {"queue": ("active", "failed"), "active": ("queue", "completed", "failed")}
"""Where a run goes from where it is: claimed, requeued (a retry, or its executor died), ended
(from the queue: cancelled or expired)."""


def ways(place: str, moves: int):
    """Every way a run that starts at `place` may go in up to `moves` moves."""
    yield (place,)
    if moves:
        for there in NEXT.get(place, ()):
            yield from ((place, *rest) for rest in ways(there, moves - 1))


def test_a_run_that_moves_once_or_twice_during_a_look_is_counted(tmp_path, monkeypatch):
    """docs/monitor.md: a run that moves once or twice while a snapshot lists its agent's
    directories (claimed and requeued, requeued and claimed again, ended) is counted; tried
    for every way and every moment between two listings."""
    run = record_file(tmp_path, "alpha", "queue", 1)
    directories = tmp_path / AGENTS / "alpha"
    for bucket in ("queue", "active", "completed", "failed"):
        (directories / bucket).mkdir(exist_ok=True)
    listed, listings_in_a_look = monitor._entries, len(monitor.LOOK_ORDER)
    for way in (*ways("queue", 2), *ways("active", 2)):
        for moments in itertools.combinations_with_replacement(range(listings_in_a_look + 1), len(way) - 1):
            next(directories.glob(f"*/{run.name}")).rename(directories / way[0] / run.name)
            listings = itertools.count()

            def entries(device, agent, bucket, way=way, moments=moments):
                listing = next(listings)
                for there, moment in zip(way[1:], moments):
                    if moment == listing:  # the run moves before this listing
                        next(directories.glob(f"*/{run.name}")).rename(directories / there / run.name)
                return listed(device, agent, bucket)

            monkeypatch.setattr(monitor, "_entries", entries)
            counts = monitor.snapshot(Device(tmp_path), now=NOW)["totals"]
            assert sum(counts.values()) >= 1, (way, moments, counts)


def test_the_command_prints_the_snapshot(spos, state):
    root, cgroups = state

    as_json = spos("action", "monitor", "--root", root, "--cgroup-root", cgroups, "--json")
    alpha = spos("action", "monitor", "--root", root, "--cgroup-root", cgroups, "--agent", "alpha")

    assert as_json.code == 0, as_json.err
    snap = json.loads(as_json.out)
    assert [agent["agent"] for agent in snap["agents"]] == ["alpha", "beta", "gamma"]
    assert snap["totals"] == {"queued": 3, "active": 5, "completed": 5, "failed": 3}
    assert snap["agents"][0]["active"][0]["cpuSeconds"] == 1.5
    assert alpha.code == 0, alpha.err
    assert "alpha" in alpha.out and "beta" not in alpha.out
    assert "20261126T090000-00000004" in alpha.out and "40% fetched 120 of 300 papers" in alpha.out


@pytest.mark.parametrize("arguments, message", [
    (("--agent", "nobody"), "there is no agent 'nobody' on this device"),
    (("--live",), "--live draws on a terminal, and standard output is not one"),
    (("--live", "--json"), "choose one"),
    (("--live", "--interval", "soon"), "--interval: not a duration"),
])
def test_what_the_command_refuses(spos, state, arguments, message):
    root, _ = state

    result = spos("action", "monitor", "--root", root, *arguments)

    assert result.code == 1
    assert message in result.err


# -- the live view, in a terminal ------------------------------------------------------------


class Screen(pyte.Screen):
    """pyte's terminal with xterm's alternate screen (private mode 1049), which pyte leaves out:
    entering it keeps what was shown, leaving it shows that again, as a person's terminal does."""

    ALTERNATE = 1049

    def __init__(self, columns: int, lines: int):
        super().__init__(columns, lines)
        self.primary = None

    def set_mode(self, *modes, **kwargs):
        if kwargs.get("private") and self.ALTERNATE in modes and self.primary is None:
            self.primary = ({number: dict(line) for number, line in self.buffer.items()},
                            self.cursor.x, self.cursor.y)
            self.erase_in_display(2)
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes, **kwargs):
        super().reset_mode(*modes, **kwargs)
        if kwargs.get("private") and self.ALTERNATE in modes and self.primary is not None:
            lines, self.cursor.x, self.cursor.y = self.primary
            self.buffer.clear()
            for number, line in lines.items():
                self.buffer[number].update(line)
            self.primary = None

    @property
    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.display)


class Terminal:
    """A command in a pseudo-terminal of `columns` x `lines` (its controlling terminal, so
    Ctrl-C reaches it as from a keyboard), and what a person would see on that terminal."""

    def __init__(self, argv: list[str], columns: int, lines: int, before: str):
        self.screen = Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        self.stream.feed(before.encode())  # what the terminal showed before the command started
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size its terminal, then become the command
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
                os.chdir(REPO)
                # os.environ, not the inherited environment: readline, once loaded, exports
                # COLUMNS and LINES into the latter, and they would pin the size rich sees
                os.execve(sys.executable, [sys.executable, *argv], dict(os.environ))
            finally:
                os._exit(127)
        self.output = b""
        self.code = None

    def resize(self, columns: int, lines: int) -> None:
        """As a person dragging the window: the command gets SIGWINCH."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.screen.resize(lines, columns)

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def shows(self, *texts: str, timeout: float = WAIT) -> str:
        """The screen once it shows every one of `texts`."""
        def showing():
            self._read(0.05)
            return all(text in self.screen.text for text in texts) and self.screen.text

        try:
            return wait_for(showing, f"the screen to show {texts}", timeout)
        except pytest.fail.Exception:
            raise AssertionError(f"the screen never showed {texts}:\n{self.screen.text}") from None

    def exit_code(self, timeout: float = WAIT) -> int:
        """How the command ended, once it has; everything it wrote is on the screen by then."""
        def ended():
            self._read(0.05)
            if self.code is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
            return self.code is not None

        wait_for(ended, "the command to exit", timeout)
        while self._read(0):
            continue
        return self.code

    def local_modes(self) -> int:
        """The terminal's local modes (ICANON, ECHO...) as the command left them."""
        return termios.tcgetattr(self.fd)[3]

    def close(self) -> None:
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the command has closed the terminal
            return False
        self.output += data
        self.stream.feed(data)
        return bool(data)


@pytest.fixture
def terminal():
    started = []

    def start(root: Path, columns: int = 110, lines: int = 24, *extra: str) -> Terminal:
        prompt = "$ spos action monitor --live\r\n"
        started.append(Terminal(["-m", "reconciler", "action", "monitor", "--live", "--root", str(root),
                                 "--interval", "200ms", *extra], columns, lines, prompt))
        return started[-1]

    yield start
    for each in started:
        each.close()


def test_the_live_view_shows_runs_as_they_progress_and_q_restores_the_terminal(state, terminal):
    root, _ = state
    progress = root / AGENTS / "alpha/active/050-00000000000000000004-20261126T090000-00000004.json"

    shown = terminal(root)
    screen = shown.shows("00000004", "fetched 120 of 300 papers", "40%", "━")
    assert "alpha" in screen and "scan" in screen and "abandoned" in screen
    assert "3 queued" in screen and "q quits" in screen
    assert shown.local_modes() & (termios.ICANON | termios.ECHO) == 0  # keys are read as typed

    record = json.loads(progress.read_text())
    record["progress"] = {"percent": 75.0, "message": "ranking 225 papers"}
    progress.write_text(json.dumps(record))
    record_file(root, "alpha", "queue", 30)
    shown.shows("75%", "ranking 225 papers", "4 queued")

    shown.type(b"q")

    assert shown.exit_code() == 0
    assert shown.screen.text.splitlines()[0] == "$ spos action monitor --live"
    assert "00000004" not in shown.screen.text  # the person's own screen is back
    assert shown.output.rindex(b"\x1b[?1049l") > shown.output.rindex(b"\x1b[?1049h")
    assert shown.output.endswith(b"\x1b[?25h\x1b[?1049l")  # the cursor is shown again
    assert shown.local_modes() & (termios.ICANON | termios.ECHO) == termios.ICANON | termios.ECHO


def test_a_tiny_terminal_then_a_resize_then_ctrl_c(state, terminal):
    root, _ = state

    shown = terminal(root, 30, 5)
    shown.shows("5 active")
    shown.resize(110, 24)
    shown.shows("00000004", "40%")
    shown.type(b"\x03")  # Ctrl-C, as typed: SIGINT from the terminal

    assert shown.exit_code() == 0
    assert "00000004" not in shown.screen.text
    assert shown.local_modes() & (termios.ICANON | termios.ECHO) == termios.ICANON | termios.ECHO


# -- watch -----------------------------------------------------------------------------------

CONFIG = {"format": 1, "agent": "", "user": "root", "tasks": {"scan": {"command": ["/bin/true"], "priority": 50}}}


class Executor:
    """Moves runs as the executor does (executor/dispatch.py), running nothing: the same
    RunStore claims and moves, the same record fields, the same log writer. Logs rotate past
    `log_bytes`, so a test sees a rotation after a few lines."""

    def __init__(self, root: Path, agent: str, log_bytes: int = 200):
        self.device = Device(root)
        self.store = RunStore(self.device)
        self.agent = agent
        self.log_bytes = log_bytes
        config = {**CONFIG, "agent": agent}
        self.device.makedirs(f"/{AGENTS}/{agent}", mode=0o750)
        self.device.write_atomic(f"/{AGENTS}/{agent}/agent.json", json.dumps(config).encode())

    def enqueue(self) -> str:
        return enqueue(self.device, self.agent, "scan")["id"]

    def run(self, run_id: str, bucket: str = "queue") -> Run:
        return self.store.find(run_id, self.agent, (bucket,))

    def start(self, run_id: str) -> Run:
        run = self.run(run_id)
        assert self.store.claim(run)
        run.record.update(state="active", startedAt=now_iso(), executor=identity(), reason="")
        run.record.setdefault("attempts", [])
        self.store.save(run)
        self.note(run, f"attempt {run.record['attempt']} of run {run.id} started")
        return run

    def write(self, run: Run, text: str) -> None:
        log = self._log(run)
        log.write(text.encode())
        log.close()

    def note(self, run: Run, text: str) -> None:
        log = self._log(run)
        log.note(text)
        log.close()

    def end(self, run: Run, state: str, code: int | None, retry_in: float | None = None) -> None:
        record = run.record
        attempt = record["attempt"]
        record["attempts"].append({"attempt": attempt, "startedAt": record["startedAt"], "endedAt": now_iso(),
                                   "state": state, "exitCode": code, "reason": "", "durationSeconds": 0.5})
        record.update(endedAt=now_iso(), exitCode=code, reason="", durationSeconds=0.5)
        with self.store.locked():
            if retry_in is not None:
                not_before = datetime.fromtimestamp(time.time() + retry_in, timezone.utc)
                record.update(attempt=attempt + 1, notBefore=not_before.isoformat(timespec="milliseconds"))
                self.note(run, f"attempt {attempt} {state}; retry in {retry_in:.1f}s")
                self.store.requeue(run)
            else:
                self.note(run, f"run {state}")
                self.store.finish(run, state)

    def _log(self, run: Run) -> LogWriter:
        path = run_dirs(self.agent, run.id)["log"]
        self.device.makedirs(path.rpartition("/")[0], mode=0o750)
        log = LogWriter(self.device, path, self.log_bytes)
        log.open()
        return log


class Watching:
    """`spos action watch` as a real process; its output lines as they come."""

    def __init__(self, root: Path, agent: str, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "action", "watch", "--root", str(root), "--agent", agent, *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        for stream, into in ((self.process.stdout, self.lines), (self.process.stderr, self.errors)):
            threading.Thread(target=_collect, args=(stream, into), daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def until(self, what: str, predicate):
        """The events (JSON lines) once `predicate(events)` holds."""
        try:
            return wait_for(lambda: predicate(self.events()) and self.events(), what)
        except pytest.fail.Exception:
            raise AssertionError(f"never saw {what}; printed:\n{''.join(self.lines)}{''.join(self.errors)}") from None

    def stop(self) -> int:
        """Ctrl-C, as from a terminal."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(WAIT)
        finally:
            self.process.kill()


def _collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@pytest.fixture
def watching():
    started = []

    def start(*args) -> Watching:
        started.append(Watching(*args))
        return started[-1]

    yield start
    for each in started:
        each.process.kill()
        each.process.wait(WAIT)


def of_run(events: list[dict], run_id: str) -> list[tuple]:
    """A run's events in order, with what tells them apart."""
    said = []
    for event in events:
        if event["run"] == run_id:
            detail = {"queued": (), "started": ("attempt",), "output": ("line",),
                      "retrying": ("attempt", "state", "exitCode", "inSeconds", "nextAttempt"),
                      "ended": ("attempt", "state", "exitCode", "durationSeconds")}[event["event"]]
            said.append((event["event"], *(event[key] for key in detail)))
    return said


def test_watch_follows_every_run_of_the_agent_as_json(device_root, watching):
    executor = Executor(device_root, "alpha")
    history = executor.start(executor.enqueue())
    executor.write(history, "from the past\n")
    executor.end(history, "completed", 0)
    running = executor.start(executor.enqueue())
    executor.write(running, "written before watching\n")
    waits = executor.enqueue()

    watch = watching(device_root, "alpha", "--json")
    watch.until("the active run", lambda events: of_run(events, running.id) == [("started", 1)])
    executor.write(running, "partial ")
    executor.write(running, "line\n")
    fresh = executor.enqueue()
    watch.until("the new run queued", lambda events: ("queued",) in of_run(events, fresh))
    run = executor.start(fresh)
    executor.write(run, "".join(f"line {n} of many\n" for n in range(1, 13)))  # a rotation on the way
    executor.end(run, "failed", 3, retry_in=2.0)
    watch.until("the retry", lambda events: any(e[0] == "retrying" for e in of_run(events, fresh)))
    run = executor.start(fresh)
    executor.write(run, "second try\n")
    executor.end(run, "completed", 0)
    executor.end(running, "failed", 1)
    first = executor.start(waits)
    executor.write(first, "no newline at the end")
    executor.end(first, "completed", 0)
    events = watch.until("every end", lambda events: all(
        any(e[0] == "ended" for e in of_run(events, run_id)) for run_id in (fresh, running.id, waits)))

    assert watch.stop() == 0
    assert of_run(events, history.id) == []
    assert of_run(events, running.id) == [("started", 1), ("output", "partial line"), ("ended", 1, "failed", 1, 0.5)]
    assert of_run(events, fresh) == [
        ("queued",), ("started", 1), *(("output", f"line {n} of many") for n in range(1, 13)),
        ("retrying", 1, "failed", 3, 2.0, 2), ("started", 2), ("output", "second try"),
        ("ended", 2, "completed", 0, 0.5),
    ]
    assert of_run(events, waits) == [("started", 1), ("output", "no newline at the end"),
                                     ("ended", 1, "completed", 0, 0.5)]
    assert (device_root / AGENTS / f"alpha/logs/{fresh}.log.1").exists()
    assert {event["agent"] for event in events} == {"alpha"}
    assert {event["task"] for event in events} == {"scan"}
    ended = next(event for event in events if event["run"] == fresh and event["event"] == "ended")
    assert ended["time"] == executor.run(fresh, "completed").record["endedAt"]


def test_a_run_queued_and_ended_between_two_looks_is_told_in_full(device_root, watching):
    executor = Executor(device_root, "alpha")
    running = executor.start(executor.enqueue())
    watch = watching(device_root, "alpha", "--json")
    watch.until("the active run", lambda events: of_run(events, running.id) == [("started", 1)])

    os.kill(watch.process.pid, signal.SIGSTOP)  # no look comes between queueing and the end
    try:
        quick = executor.enqueue()
        run = executor.start(quick)
        executor.write(run, "quick\n")
        executor.end(run, "failed", 2, retry_in=0.0)
        run = executor.start(quick)
        executor.end(run, "completed", 0)
    finally:
        os.kill(watch.process.pid, signal.SIGCONT)
    events = watch.until("the quick run's end", lambda events: ("ended", 2, "completed", 0, 0.5)
                         in of_run(events, quick))

    assert watch.stop() == 0
    assert of_run(events, quick) == [("queued",), ("started", 1), ("output", "quick"),
                                     ("retrying", 1, "failed", 2, 0.0, 2), ("started", 2),
                                     ("ended", 2, "completed", 0, 0.5)]
    times = [event["time"] for event in events if event["run"] == quick and event["event"] != "output"]
    assert times == sorted(times)  # told with the times the record gives, in order


def test_watch_as_text(device_root, watching):
    executor = Executor(device_root, "alpha")
    queued = executor.enqueue()

    watch = watching(device_root, "alpha")
    wait_for(lambda: watch.errors, "the header")
    run = executor.start(queued)
    executor.write(run, "hello\n")
    executor.end(run, "failed", 7, retry_in=3.0)
    wait_for(lambda: any("retrying" in line for line in watch.lines), "the retry")

    assert watch.stop() == 0
    short = queued.rpartition("-")[2]
    assert watch.errors == ["Watching alpha: 0 active, 1 queued. Ctrl-C stops.\n"]
    shown = [line.split(" ", 1)[1] for line in watch.lines if not line.startswith(" ")]
    assert shown == [f"{short} scan: started attempt 1\n",
                     f"{short} scan: retrying in 3s: attempt 1 failed exit 7 in 0.5s\n"]
    assert [line for line in watch.lines if line.startswith(" ")] == [f"{'':8} {short} | hello\n"]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in watch.lines if not line.startswith(" "))


def test_watch_shows_what_a_run_writes_escaped_and_keeps_it_in_json(device_root, watching):
    executor = Executor(device_root, "alpha")
    run = executor.start(executor.enqueue())
    as_text, as_json = watching(device_root, "alpha"), watching(device_root, "alpha", "--json")
    wait_for(lambda: as_text.lines and as_json.lines, "the active run")

    executor.write(run, "\x1b]0;owned\x07\x1b[2Jcleared\r\n")
    wait_for(lambda: len(as_text.lines) > 1 and len(as_json.lines) > 1, "the line")

    assert as_text.stop() == 0 and as_json.stop() == 0
    assert as_text.lines[1] == f"{'':8} {monitor.short_id(run.id)} | \\x1b]0;owned\\x07\\x1b[2Jcleared\n"
    assert as_json.events()[1]["line"] == "\x1b]0;owned\x07\x1b[2Jcleared"


def test_watch_json_is_strict_whatever_a_record_holds(device_root, watching):
    """NaN and Infinity (which Python's json reads and writes, and no other parser takes) are
    null; a time that is no time is when watch saw the run."""
    record_file(device_root, "alpha", "active", 1, state="active", executor=identity(),
                startedAt="2026-11-26T09:04:00.000+00:00")
    watch = watching(device_root, "alpha", "--json")
    wait_for(lambda: watch.lines, "the active run")
    run = record_file(device_root, "alpha", "failed", 2, state="failed", priority=float("nan"),
                      source={"kind": "manual", "weight": [float("inf")]}, endedAt=float("-inf"),
                      exitCode=float("nan"), durationSeconds=1e999, reason=["no text"])
    wait_for(lambda: len(watch.lines) >= 3, "the run's end")

    assert watch.stop() == 0
    _, queued, ended = (json.loads(line, parse_constant=pytest.fail) for line in watch.lines)
    assert (queued["priority"], queued["source"]) == (None, {"kind": "manual", "weight": [None]})
    assert (ended["state"], ended["exitCode"], ended["durationSeconds"], ended["reason"]) == (
        "failed", None, None, "")
    assert datetime.fromisoformat(ended["time"]).timestamp() >= run.stat().st_mtime - 1


def test_watch_reads_only_regular_log_files(device_root, tmp_path, watching):
    """A log that is a link is not followed, one that is a FIFO is not waited on: the runs are
    told, their output is not."""
    outside = tmp_path / "outside"
    outside.write_text("before\n")
    logs = device_root / AGENTS / "alpha/logs"
    logs.mkdir(parents=True)
    for serial in (1, 2):
        record_file(device_root, "alpha", "active", serial, state="active", executor=identity(),
                    startedAt="2026-11-26T09:04:00.000+00:00")
    (logs / "20261126T090000-00000001.log").symlink_to(outside)
    os.mkfifo(logs / "20261126T090000-00000002.log")
    watch = watching(device_root, "alpha", "--json")
    watch.until("both runs", lambda events: len(events) == 2)

    with outside.open("a") as appended:
        appended.write("not the run's\n")
    for serial in (1, 2):
        active = record_file(device_root, "alpha", "completed", serial, state="completed", exitCode=0)
        (device_root / AGENTS / "alpha/active" / active.name).unlink()
    events = watch.until("both ends", lambda events: len(events) == 4)

    assert watch.stop() == 0
    assert [event["event"] for event in events] == ["started", "started", "ended", "ended"]


def test_watch_refuses_an_agent_that_is_not_there(spos, device_root):
    result = spos("action", "watch", "--root", device_root, "--agent", "nobody")

    assert result.code == 1
    assert "there is no agent 'nobody' on this device" in result.err


# -- with the real executor ------------------------------------------------------------------




@pytest.mark.slow
@pytest.mark.root
def test_a_real_run_as_monitor_and_watch_see_it(spos, device_root, tmp_path, watching):
    missing = sandbox_missing()
    if missing:
        pytest.skip(missing)
    agent = f"mon-{uuid.uuid4().hex[:8]}"
    script = ('echo "progress 50 halfway" >&"$SPOS_PROGRESS_FD"; echo started; '
              'while [ ! -e "$SPOS_OUTPUT_DIR/go" ]; do sleep 0.05; done; echo done')
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    (manifests / "agent.yaml").write_text(json.dumps({
        "apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": agent},
        "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}},
    }) + "\n---\n" + json.dumps({
        "apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": agent},
        "spec": {"capability": agent, "tasks": {"wait": {"command": ["/bin/bash", "-c", script],
                                                         "timeout": "30s"}}},
    }) + "\n")
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    watch = watching(device_root, agent)
    wait_for(lambda: watch.errors, "watch to start")
    run_id = spos("action", "run", "--root", device_root, "--agent", agent, "--task", "wait").out.strip()
    executor = subprocess.Popen([sys.executable, "-m", "reconciler", "executor", "--root", str(device_root),
                                 "--once", "--grace", "1s"], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_for(lambda: _measured_run(spos, device_root, agent),
                        "monitor to see the run with its progress and memory")
        (device_root / AGENTS / agent / "output/go").touch()
        assert executor.wait(WAIT) == 0, executor.stderr.read()
    finally:
        executor.kill()
        _remove_cgroups(device_root, agent)
    wait_for(lambda: any(" ended " in line for line in watch.lines), "the run's end")

    assert watch.stop() == 0
    assert seen["id"] == run_id and seen["state"] == "running" and seen["task"] == "wait"
    assert seen["progress"] == {"percent": 50.0, "message": "halfway"}
    assert seen["cpuSeconds"] is not None and seen["runtimeSeconds"] >= 0
    short = run_id.rpartition("-")[2]
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in watch.lines] == [
        f"{short} wait: queued\n", f"{short} wait: started attempt 1\n", f"{'':8} {short} | started\n",
        f"{'':8} {short} | done\n", AnyEnd(f"{short} wait: ended completed exit 0 in "),
    ]


class AnyEnd(str):
    """A line that starts as given: the duration of a real run varies."""

    def __eq__(self, other) -> bool:
        return isinstance(other, str) and other.startswith(str(self))

    __hash__ = str.__hash__


def _measured_run(spos, root: Path, agent: str) -> dict | None:
    """The agent's active run, once monitor sees its progress and the memory of its cgroup."""
    result = spos("action", "monitor", "--root", root, "--cgroup-root", "/sys/fs/cgroup", "--agent", agent,
                  "--json")
    runs = json.loads(result.out)["agents"][0]["active"]
    return runs and runs[0]["progress"] and runs[0]["memoryBytes"] and runs[0]


def _remove_cgroups(root: Path, agent: str) -> None:
    """The agent's cgroup and this root's parent, which the executor made for the run's own
    (it removes only that one)."""
    parent = parent_for(str(root))
    for base in [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").iterdir()]:
        for directory in (base / parent / agent, base / parent):
            try:
                directory.rmdir()
            except OSError:
                continue
