"""The executor keeps the promises of docs/executor.md and docs/queue.md.

Every test applies real manifests to a temporary device root, enqueues with `spos action run`
and runs the real executor against it: `python -m reconciler executor` as a subprocess (a
daemon where killing or signalling it matters, `--once` otherwise), with the real sandbox
(bubblewrap, namespaces, Landlock) and real cgroups under /sys/fs/cgroup. Records are read back
with `spos action show --json`, as an operator would. Each agent has a unique name, so its run
cgroups (`spos/<agent>/<run>`) are its own; a test fails if one is left behind.

Durations are short (timeouts of 2 s, a grace of 1 s, backoffs of 1-2 s) and every wait is
bounded. Needs root, bubblewrap and cgroups: otherwise every test is skipped with the reason.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from sandboxes import sandbox_missing
import waiting

from reconciler.cgroupfs import parent_for
from reconciler.executor.enqueue import WAKE_PIPE

pytestmark = [pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parent.parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
STATE = "var/lib/systemprompt-os"
WAIT = 15  # the longest any single wait may take, in seconds




_SKIP = sandbox_missing()
if _SKIP:
    pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.skip(reason=_SKIP)]


def _one_line(script: str) -> str:
    """Manifest strings may not hold newlines (they could inject crontab lines)."""
    return "; ".join(line for line in script.splitlines() if line.strip())


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", _one_line(script)]


def bash(script: str) -> list[str]:
    """bash, for `>&$SPOS_PROGRESS_FD` (dash redirects only single-digit fds)."""
    return ["/bin/bash", "-c", _one_line(script)]


def python(program: str) -> list[str]:
    return ["/usr/bin/python3", "-c", f"exec({program!r})"]


def when(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def wait_for(predicate, what: str, timeout: float = WAIT):
    return waiting.wait_for(predicate, what, timeout)


def is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def run_cgroup_dirs(agent: str, run_id: str | None = None) -> list[Path]:
    """The run's cgroup directories in every hierarchy (v1) or the unified tree (v2)."""
    tail = f"spos*/{agent}" + (f"/{run_id}" if run_id else "")  # spos-<hash> for a test root
    return [p for p in [*CGROUP_ROOT.glob(tail), *CGROUP_ROOT.glob(f"*/{tail}")] if p.is_dir()]


def cgroup_pids(agent: str, run_id: str) -> dict[int, float]:
    """Host pids in the run's cgroup, with their start times (to tell a reused pid apart)."""
    found = {}
    for directory in run_cgroup_dirs(agent, run_id):
        try:
            pids = (directory / "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in map(int, pids):
            try:
                found[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                pass
    return found


def survivors(pids: dict[int, float], marker: str) -> list[str]:
    """Processes from `pids` that still live, and any host process whose command line holds
    `marker` (a unique argument the action gave its long sleeps)."""
    alive = []
    for pid, created in pids.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {process.cmdline()}")
        except psutil.Error:
            pass
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if marker in (process.info["cmdline"] or []) and process.info["status"] != psutil.STATUS_ZOMBIE:
            alive.append(f"{process.info['pid']} {process.info['cmdline']}")
    return alive


class Daemon:
    """`spos executor` as a real process."""

    def __init__(self, root: Path, log: Path, *args: str):
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "executor", "--root", str(root), "--grace", "1s", *args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )
        self.pid = self.process.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                pytest.fail(f"the executor did not exit within {timeout}s of SIGTERM")
        return self.process.returncode


class Device:
    """A temporary device root with applied agents, and `spos` pointed at it."""

    def __init__(self, root: Path, tmp_path: Path, spos):
        self.root = root
        self.tmp_path = tmp_path
        self.spos = spos
        self.agent = f"ex-{uuid.uuid4().hex[:8]}"
        self.agents = {self.agent}
        self.daemons: list[Daemon] = []

    # -- applying and enqueueing ---------------------------------------------------------

    def apply(self, tasks: dict, *, quota: dict | None = None, others: dict | None = None,
              cgroups: bool = False) -> None:
        """Apply one agent with `tasks` (manifest form), plus agents `others` {name: tasks}, all
        with a Capability allowing /bin and /usr/bin and a small Quota; with `cgroups`, the
        agents' own cgroups too (their Quota as a whole, under /sys/fs/cgroup)."""
        agents = {self.agent: tasks, **(others or {})}
        self.agents |= set(agents)
        docs = [
            {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "exec-test"},
             "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}},
            {"apiVersion": "spos/v1", "kind": "Quota", "metadata": {"name": "exec-test"},
             "spec": {"cpu": "100%", "memory": "256M", "tasksMax": 64, **(quota or {})}},
        ]
        for name, agent_tasks in agents.items():
            docs.append({"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": name},
                         "spec": {"capability": "exec-test", "quota": "exec-test", "tasks": agent_tasks}})
        manifests = self.tmp_path / "agents.d"
        manifests.mkdir(exist_ok=True)
        (manifests / "agents.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
        result = self.spos("apply", manifests, "--root", self.root, "--auto-approve",
                           *(["--cgroup-root", str(CGROUP_ROOT)] if cgroups else []))
        assert result.code == 0, result.err + result.out

    def other(self) -> str:
        name = f"ex-{uuid.uuid4().hex[:8]}"
        self.agents.add(name)
        return name

    def enqueue(self, task: str, *args, agent: str | None = None) -> str:
        result = self.spos("action", "run", "--root", self.root, "--agent", agent or self.agent,
                           "--task", task, *args)
        assert result.code == 0, result.err
        return result.out.strip()

    # -- looking -------------------------------------------------------------------------

    def record(self, run_id: str) -> dict:
        result = self.spos("action", "show", run_id, "--json", "--root", self.root)
        assert result.code == 0, result.err
        return json.loads(result.out)

    def wait_state(self, run_id: str, *states: str, timeout: float = WAIT) -> dict:
        last = {}

        def reached():
            last.update(self.record(run_id))
            return last["state"] in states and dict(last)

        try:
            return wait_for(reached, f"run {run_id} to be {' or '.join(states)}", timeout)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{exc}; last seen: {json.dumps(last)}\nlog:\n{self.log(run_id)}"
                                 + "".join(f"\nexecutor:\n{d.stderr()}" for d in self.daemons)) from None

    def agent_dir(self, agent: str | None = None) -> Path:
        return self.root / STATE / "agents" / (agent or self.agent)

    def output(self, name: str, agent: str | None = None) -> Path:
        return self.agent_dir(agent) / "output" / name

    def lines(self, name: str, agent: str | None = None) -> list[str]:
        path = self.output(name, agent)
        return path.read_text().split() if path.exists() else []

    def log(self, run_id: str, agent: str | None = None) -> str:
        path = self.agent_dir(agent) / "logs" / f"{run_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- executors -----------------------------------------------------------------------

    def once(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "reconciler", "executor", "--root", str(self.root), "--once",
             "--grace", "1s", *args],
            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
        assert result.returncode == 0, result.stderr
        return result

    def daemon(self, *args: str) -> Daemon:
        daemon = Daemon(self.root, self.tmp_path / f"executor-{len(self.daemons)}.log", *args)
        self.daemons.append(daemon)
        return daemon

    def wake_pipe(self) -> Path:
        return self.root / STATE / "executor.wake"

    def wait_ready(self, daemon: Daemon) -> None:
        """Until the daemon reads its wake pipe, then a moment for its first scan to end."""
        def listening():
            assert daemon.process.poll() is None, daemon.stderr()
            try:
                fd = os.open(self.wake_pipe(), os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no pipe yet, or nobody reading it (ENXIO)
                return False
            os.close(fd)
            return True

        wait_for(listening, "the executor to open its wake pipe")
        time.sleep(0.3)

    def close(self) -> list[str]:
        """Kill daemons the test left running; remove run cgroups left behind and return them
        (none may be left when the test stopped its daemons itself)."""
        killed = False
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait(5)
                killed = True
        leftovers = []
        for agent in self.agents:
            for directory in run_cgroup_dirs(agent):
                for run in sorted(p for p in directory.iterdir() if p.is_dir()):
                    leftovers.append(str(run))
                    try:
                        run.rmdir()
                    except OSError:
                        pass
                try:
                    directory.rmdir()
                except OSError:
                    pass
        parent = parent_for(str(self.root))
        for directory in [CGROUP_ROOT / parent, *CGROUP_ROOT.glob(f"*/{parent}")]:
            try:
                directory.rmdir()
            except OSError:
                pass
        return [] if killed else leftovers


@pytest.fixture
def device(device_root, tmp_path, spos):
    dev = Device(device_root, tmp_path, spos)
    yield dev
    leftovers = dev.close()
    assert not leftovers, f"run cgroups left behind: {leftovers}"


# -- a run from start to end ----------------------------------------------------------------


def test_enqueued_run_completes_with_its_output_and_usage_recorded(device):
    program = (
        "import os, sys\n"
        "block = bytearray(40_000_000)\n"                      # ~40 MB resident
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "n = 0\n"
        "while n < 3_000_000: n += 1\n"                        # some CPU time
        "print('hello from', os.environ['SPOS_RUN_ID'], 'attempt', os.environ['SPOS_ATTEMPT'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('SPOS_') or k in ('HOME', 'TMPDIR', 'PATH')}\n"
        "open(os.environ['SPOS_OUTPUT_DIR'] + '/env.json', 'w').write(__import__('json').dumps(env))\n"
        "open(os.environ['SPOS_CHECKPOINT_DIR'] + '/cp', 'w').write('x')\n"
    )
    device.apply({"hello": {"command": python(program), "timeout": "20s"}})
    run_id = device.enqueue("hello")
    queued = device.record(run_id)
    assert queued["state"] == "queued" and queued["attempt"] == 1
    assert queued["source"] == {"kind": "manual"} and queued["priority"] == 50

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed", record
    assert record["exitCode"] == 0 and record["attempt"] == 1
    assert [a["state"] for a in record["attempts"]] == ["completed"]
    started, ended = when(record["startedAt"]), when(record["endedAt"])
    assert when(record["enqueuedAt"]) <= started <= ended
    # the duration is timed inside the recorded window (its start after the claim was written,
    # which a slow disk stretches); the stamps are in milliseconds, truncated
    assert ended - started - 0.5 < record["durationSeconds"] <= ended - started + 0.002
    usage = record["usage"]
    assert {"cpuSeconds", "peakMemoryBytes", "readBytes", "writeBytes"} <= set(usage), usage
    assert 0.05 < usage["cpuSeconds"] < record["durationSeconds"] * os.cpu_count() + 0.5, usage
    assert 40_000_000 <= usage["peakMemoryBytes"] < 256_000_000, usage
    assert record["attempts"][0]["usage"] == usage

    log = device.log(run_id)
    assert f"hello from {run_id} attempt 1" in log and "to stderr" in log
    assert "--- spos" in log and "run completed" in log

    env = json.loads(device.output("env.json").read_text())
    tmp = f"/{STATE}/agents/{device.agent}/tmp/{run_id}"
    assert env["SPOS_AGENT"] == device.agent and env["SPOS_TASK"] == "hello" and env["SPOS_STEP"] == "main"
    assert env["HOME"] == env["TMPDIR"] == tmp
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "SPOS_RESUME" not in env and env["SPOS_PROGRESS_FD"].isdigit()
    # tmp is removed when the run ends; the checkpoint when it completes
    assert not (device.root / tmp.lstrip("/")).exists()
    assert not (device.agent_dir() / "checkpoints" / run_id).exists()

    listing = device.spos("action", "list", "--root", device.root, "--state", "completed", "--json")
    assert [row["id"] for row in json.loads(listing.out)] == [run_id]
    history = device.spos("action", "history", "--root", device.root)
    assert run_id in history.out and "completed" in history.out
    shown = device.spos("action", "show", run_id, "--root", device.root)
    assert "state:      completed" in shown.out and "#1 completed exit=0" in shown.out


def test_a_failing_run_records_its_exit_code_and_why(device):
    device.apply({"bad": {"command": sh("echo failing; exit 7"), "timeout": "10s"}})
    run_id = device.enqueue("bad")
    device.once()
    record = device.record(run_id)
    assert record["state"] == "failed" and record["exitCode"] == 7
    assert "exited with 7" in record["reason"]
    assert list((device.agent_dir() / "failed").glob(f"*-{run_id}.json"))
    assert "failing" in device.log(run_id)


def test_queue_order_is_priority_then_age(device):
    device.apply({"t": {"command": sh("echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/order"),
                        "concurrency": "Allow"}})
    runs = [(priority, device.enqueue("t", "--priority", str(priority))) for priority in (10, 90, 50, 90, 10)]
    expected = [run_id for _, run_id in sorted(runs, key=lambda r: -r[0])]  # stable: age breaks ties

    device.once("--max-parallel", "1")

    assert device.lines("order") == expected
    starts = [when(device.record(run_id)["startedAt"]) for run_id in expected]
    assert starts == sorted(starts)


# -- waking up --------------------------------------------------------------------------------


def test_a_running_executor_is_woken_by_the_pipe(device):
    device.apply({"t": {"command": sh("true")}})
    daemon = device.daemon("--rescan", "60s")
    device.wait_ready(daemon)

    before = time.time()
    run_id = device.enqueue("t")
    record = device.wait_state(run_id, "completed", timeout=5)
    assert when(record["startedAt"]) - before < 1.0, record
    assert daemon.stop() == 0


def test_a_deleted_or_replaced_wake_pipe_only_delays_work(device):
    device.apply({"t": {"command": sh("true"), "concurrency": "Allow"}})
    daemon = device.daemon("--rescan", "1s")
    device.wait_ready(daemon)

    device.wake_pipe().unlink()
    run_id = device.enqueue("t")  # nobody is woken
    device.wait_state(run_id, "completed", timeout=5)
    wait_for(lambda: is_fifo(device.wake_pipe()), "the wake pipe to be recreated", timeout=5)

    device.wake_pipe().unlink()
    device.wake_pipe().write_text("not a pipe")
    run_id = device.enqueue("t")
    device.wait_state(run_id, "completed", timeout=5)
    wait_for(lambda: is_fifo(device.wake_pipe()), "a pipe to replace the file", timeout=5)
    assert daemon.stop() == 0


def test_an_enqueue_wakes_the_executor_with_the_agents_name_once_the_record_is_in_place(device):
    """The message names the agent, so a woken executor lists that agent's queue alone (not
    every agent's on a device with hundreds); it is written once the record has its name."""
    from reconciler.device import Device as Root
    from reconciler.executor import enqueue as enqueueing

    device.apply({"t": {"command": sh("true")}})
    pipe = device.wake_pipe()
    os.mkfifo(pipe, 0o600)
    reader = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)
    queue = device.agent_dir() / "queue"
    seen = []
    wake = enqueueing.wake

    def looking(root, agent=None):
        seen.append(sorted(p.name for p in queue.iterdir() if not p.name.startswith(".")))
        wake(root, agent)

    try:
        enqueueing.wake = looking
        record = enqueueing.enqueue(Root(str(device.root)), device.agent, "t")
        message = os.read(reader, 4096)
    finally:
        enqueueing.wake = wake
        os.close(reader)
    assert message == device.agent.encode() + b"\n"
    assert len(seen) == 1 and len(seen[0]) == 1 and record["id"] in seen[0][0], seen


@pytest.mark.parametrize("data, agents", [
    (b"", set()),
    (b"research-001\n", {"research-001"}),
    (b"a\nb_2\na\n", {"a", "b_2"}),
    (b"!", None),  # names no agent (retention's nudge, an older spos)
    (b"a\n!", None),
    (b"a\n!!b\n", None),
    (b"../etc\n", None),  # anyone may write the pipe: what is not a name is no name
    (b"A\n", None),
    (b"-a\n", None),
    (b"x" * 64 + b"\n", None),
    (b"\xff\n", None),
    (b"\n", None),
    (b"a\n" * 16384, None),  # a drain this long may have followed a full pipe
])
def test_wake_messages_name_agents_or_ask_for_every_queue(data, agents):
    from reconciler.executor.enqueue import wake_message, woken_agents

    assert woken_agents(data) == agents
    assert woken_agents(wake_message("research-001") + wake_message("a")) == {"research-001", "a"}
    assert woken_agents(wake_message(None)) is None


def quiet_enqueue(root: Path, agent: str, task: str) -> str:
    """Enqueue without a message on the wake pipe (a writer killed after its rename, say)."""
    from reconciler.device import Device as Root
    from reconciler.executor import enqueue as enqueueing

    wake = enqueueing.wake
    try:
        enqueueing.wake = lambda root, agent=None: None
        return enqueueing.enqueue(Root(str(root)), agent, task)["id"]
    finally:
        enqueueing.wake = wake


@pytest.mark.parametrize("message", [b"!", b"../ex-other\n"])
def test_a_wake_up_naming_no_agent_has_every_queue_looked_at(device, message):
    """A wake-up lists only the queue of the agent it names; one that names no agent (or that
    cannot be read as a name) has every queue listed. (What the pipe alone does: a served
    executor also watches the queues, below.)"""
    other = device.other()
    device.apply({"t": {"command": sh("true")}}, others={other: {"t": {"command": sh("true")}}})
    executor = unserved_executor(device.root)
    quiet = quiet_enqueue(device.root, other, "t")
    os.close(os.open(device.wake_pipe(), os.O_RDWR))  # the executor's end keeps it open
    writer = os.open(device.wake_pipe(), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, device.agent.encode() + b"\n")
        executor._drain_wake()
        executor._list_queues()
        assert not any(quiet in name for name in executor.queued.get(other, ()))
        os.write(writer, message)
        executor._drain_wake()
        executor._list_queues()
    finally:
        os.close(writer)
    assert any(quiet in name for name in executor.queued.get(other, ())), executor.queued


def test_a_claim_the_full_disk_refused_is_tried_again_after_the_storage_retry(device, monkeypatch):
    """The refused claim moves the run back into its queue, which the queue watch reports:
    that must not have the executor claim it again at once, over and over."""
    device.apply({"t": {"command": sh("true")}})
    executor = unserved_executor(device.root)
    executor._watch_queues()
    tries = []

    def full(run):
        tries.append(time.monotonic())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(executor.store, "reserve", full)
    quiet_enqueue(device.root, device.agent, "t")
    executor.list_all = executor.queue_changed = True
    executor.next_rescan = time.monotonic() + 3600
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            executor.dispatch()
            executor._wait(min(executor._timeout(False), deadline - time.monotonic(), 0.2))
    finally:
        executor.watch.close()
    assert len(tries) == 1, f"{len(tries)} claims in 1 s"


def test_a_run_queued_without_a_wake_up_starts_at_once(device):
    """The executor watches every agent's queue (inotify): a run renamed into it is seen
    without a message on the pipe, with the rescan an hour away. So is one queued for an agent
    applied after the executor started, and one queued after the agent's run directories were
    removed and made again."""
    device.apply({"t": {"command": sh("true"), "concurrency": "Allow"}})
    daemon = device.daemon("--rescan", "1h")
    device.wait_ready(daemon)

    began = time.time()
    run_id = quiet_enqueue(device.root, device.agent, "t")
    record = device.wait_state(run_id, "completed", timeout=5)
    assert when(record["startedAt"]) - began < 1.0, record

    later = device.other()
    device.apply({"t": {"command": sh("true"), "concurrency": "Allow"}},
                 others={later: {"t": {"command": sh("true"), "concurrency": "Allow"}}})
    time.sleep(0.3)  # the executor has seen the new agent's directory and watches its queue
    began = time.time()
    record = device.wait_state(quiet_enqueue(device.root, later, "t"), "completed", timeout=5)
    assert when(record["startedAt"]) - began < 1.0, record

    queue = device.agent_dir(later) / "queue"
    queue.rename(queue.with_name("queue.old"))
    queue.mkdir()
    time.sleep(0.3)
    began = time.time()
    record = device.wait_state(quiet_enqueue(device.root, later, "t"), "completed", timeout=5)
    assert when(record["startedAt"]) - began < 1.0, record
    assert daemon.stop() == 0
    assert "not every queue" not in daemon.stderr()


def unserved_executor(root: Path):
    """An executor whose loop the test turns by hand (no sandbox: nothing is started)."""
    from reconciler import AGENTS_DIR
    from reconciler.device import Device as Root
    from reconciler.executor.dispatch import Executor, Settings

    executor = Executor(Root(str(root)), sandbox=None, settings=Settings(rescan=3600, cleanup_interval=0))
    executor.device.makedirs(AGENTS_DIR)
    executor._open_wake_pipe()
    executor._list_queues()  # the listing at start
    return executor


WAKE_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)
while True:
    try:
        os.write(fd, sys.argv[2].encode() * 512)
    except BlockingIOError:
        pass
"""


@pytest.mark.parametrize("message", ["!", "a\n"])
def test_writers_that_keep_the_wake_pipe_full_neither_hold_the_loop_nor_grow_it(device_root, message):
    """A drain reads a bounded amount (the rest wakes the next turn, between timeouts and exits)
    and keeps a bounded number of names to list."""
    executor = unserved_executor(device_root)
    pipe = executor.device.host(WAKE_PIPE)
    writers = [subprocess.Popen([sys.executable, "-c", WAKE_WRITER, pipe, message]) for _ in range(2)]
    try:
        time.sleep(0.3)
        longest = 0.0
        for _ in range(50):
            began = time.thread_time()  # the drain's own work: the writers keep both CPUs busy
            executor._drain_wake()
            longest = max(longest, time.thread_time() - began)
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    assert longest < 0.1, f"one drain took {longest:.2f}s of CPU"
    assert executor.list_all and not executor.list_agents


def test_a_full_wake_pipe_that_was_shrunk_has_every_queue_listed(device_root):
    """Whoever fills the pipe makes wake-ups be refused; a drain of half its size, as it is
    now (a writer may shrink it), lists every queue."""
    executor = unserved_executor(device_root)
    pipe = executor.device.host(WAKE_PIPE)
    writer = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
        assert os.write(writer, b"zz\n" * 1364 + b"zzz\n") == 4096
        executor._drain_wake()
    finally:
        os.close(writer)
    assert executor.list_all


NAME_LOOKUP_HELPER = """
import sys, time
from reconciler.device import Device
from reconciler.executor import network
from reconciler.executor.dispatch import Executor
from reconciler.executor.sandbox import Sandbox

setup_for = network.setup_for

def slow(allowed, denied, resolve=None):  # a resolver that does not answer at once
    open(sys.argv[2], "w").close()
    time.sleep(1.5)
    return setup_for(allowed, denied, resolve)

network.setup_for = slow
root = sys.argv[1]
Executor(Device(root), Sandbox(root=root)).serve(once=True)
"""


def test_the_claim_lock_is_not_held_while_host_names_are_resolved(device, tmp_path):
    """Cancel requests, other executors and recovery take the claim lock: what may be slow in
    starting a run (host names in network rules, the storage quota's walk) is done before
    the claim, outside it."""
    device.apply({"t": {"timeout": "20s", "command": sh("true"), "concurrency": "Allow"}})
    first = device.enqueue("t", "--priority", "90")
    second = device.enqueue("t", "--priority", "10")
    marker = tmp_path / "resolving"
    helper = subprocess.Popen([sys.executable, "-c", NAME_LOOKUP_HELPER, str(device.root), str(marker)],
                              cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, "the executor to resolve the first run's names")
        began = time.monotonic()
        result = device.spos("action", "cancel", second, "--root", device.root)
        took = time.monotonic() - began
        assert result.code == 0, result.err
        assert helper.wait(30) == 0, helper.stderr.read()
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert took < 1.0, f"spos action cancel waited {took:.1f}s for the claim lock"
    assert device.record(first)["state"] == "completed"
    assert device.record(second)["state"] == "cancelled"


def test_two_executors_never_run_the_same_claim(device):
    device.apply({"t": {"command": sh("echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/ran; sleep 0.1"),
                        "concurrency": "Allow"}})
    run_ids = [device.enqueue("t") for _ in range(20)]
    # Both start on a full queue and rescan often, so they race for every claim.
    daemons = [device.daemon("--rescan", "200ms", "--max-parallel", "4", "--max-per-agent", "4")
               for _ in range(2)]

    records = [device.wait_state(run_id, "completed", "failed") for run_id in run_ids]
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.stderr()

    ran = device.lines("ran")
    missing = set(run_ids) - set(ran)
    assert sorted(ran) == sorted(run_ids), [(device.record(m), device.log(m)) for m in missing]  # each ran once
    for record in records:
        assert record["state"] == "completed" and record["attempt"] == 1, record
        assert len(record["attempts"]) == 1, record
    owners = {record["executor"]["pid"] for record in records}
    assert owners <= {d.pid for d in daemons}


# -- at-least-once delivery ---------------------------------------------------------------------


def test_an_attempt_a_crash_interrupted_uses_none_of_the_retries(device):
    """`retries.limit` is how many times a failed run is retried: an attempt that ended
    because its executor died did not fail, so a run with limit 1 still fails twice."""
    device.apply({"t": {"command": sh('[ "$SPOS_ATTEMPT" = 1 ] && sleep 86401; exit 1'),
                        "timeout": "30s", "retries": {"limit": 1, "backoff": {"initial": "1s"}}}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: cgroup_pids(device.agent, run_id), "the run's processes")
    daemon.process.kill()
    daemon.process.wait(5)

    device.once()

    record = device.record(run_id)
    assert [a["state"] for a in record["attempts"]] == ["interrupted", "failed", "failed"], record
    assert record["state"] == "failed"


def test_a_retry_is_due_at_once_after_the_clock_was_stepped_back(device):
    """A retry waits `retryDelaySeconds` from when its attempt failed. A wall clock stepped
    back since (notBefore now far ahead) does not hold it for the length of the step."""
    device.apply({"t": {"command": sh('[ "$SPOS_ATTEMPT" -gt 1 ]'),
                        "retries": {"limit": 1, "backoff": {"initial": "1h"}}}})
    run_id = device.enqueue("t")
    daemon = device.daemon()
    try:
        queued = wait_for(lambda: (lambda r: r.get("attempt") == 2 and r)(device.record(run_id)),
                          "the retry to wait")
        assert 270 <= queued["retryDelaySeconds"] <= 330  # an hour, capped at the default max
    finally:
        daemon.stop()
    # As if the clock had been five minutes ahead when the attempt failed: the record says the
    # retry waits 10 s, and notBefore is five minutes and 10 s away.
    path = next((device.agent_dir() / "queue").glob(f"*{run_id}.json"))
    record = json.loads(path.read_text())
    record["retryDelaySeconds"] = 10
    path.write_text(json.dumps(record))

    started = time.monotonic()
    device.once()
    assert device.record(run_id)["state"] == "completed"
    assert time.monotonic() - started < 20


def test_executor_killed_mid_run_reruns_it_with_its_checkpoint(device):
    script = (
        'echo "attempt=$SPOS_ATTEMPT resume=${SPOS_RESUME:-0} '
        'checkpoint=$(cat $SPOS_CHECKPOINT_DIR/state 2>/dev/null)" >> $SPOS_OUTPUT_DIR/seen\n'
        'echo "written by attempt $SPOS_ATTEMPT" > $SPOS_CHECKPOINT_DIR/state\n'
        'if [ "$SPOS_ATTEMPT" = 1 ]; then sleep 86401; fi\n'
    )
    device.apply({"long": {"command": sh(script), "timeout": "30s"}})
    run_id = device.enqueue("long")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: (device.agent_dir() / "checkpoints" / run_id / "state").exists(), "attempt 1 to checkpoint")
    pids = wait_for(lambda: cgroup_pids(device.agent, run_id), "the run's processes")

    daemon.process.kill()
    daemon.process.wait(5)
    assert device.record(run_id)["state"] == "active"  # left in active/ by the dead executor

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert [a["state"] for a in record["attempts"]] == ["interrupted", "completed"]
    assert record["attempts"][0]["attempt"] == 1 and record["attempts"][1]["attempt"] == 2
    assert device.output("seen").read_text().splitlines() == [
        "attempt=1 resume=0 checkpoint=",
        "attempt=2 resume=1 checkpoint=written by attempt 1",
    ]
    assert not survivors(pids, "86401")
    assert not run_cgroup_dirs(device.agent, run_id)
    log = device.log(run_id)
    assert f"attempt 1 of run {run_id}" in log and "attempt 1 interrupted" in log
    assert f"attempt 2 of run {run_id}" in log and "run completed" in log


def test_runs_back_to_back_under_a_tight_tasks_quota_all_complete(device):
    """bubblewrap's monitor exits without reaping the sandbox's init; until something reaps
    that process it counts against the agent's tasks limit. The executor reaps it, so a quick
    run after another never finds the agent's limit taken by runs that ended."""
    device.apply({"quick": {"command": ["/bin/true"], "timeout": "20s"}}, quota={"tasksMax": 6},
                 cgroups=True)
    pids = next(d for d in run_cgroup_dirs(device.agent) if d.parent.parent.name == "pids")
    assert (pids / "pids.max").read_text().strip() == "6"
    runs = [device.enqueue("quick") for _ in range(20)]
    device.once("--max-parallel", "1")
    states = [device.record(run_id) for run_id in runs]
    assert [(r["state"], r["reason"]) for r in states] == [("completed", "")] * len(runs)
    assert (pids / "pids.current").read_text().strip() == "0"  # nothing left counted


def test_multi_step_task_resumes_at_the_first_unfinished_step(device):
    device.apply({"steps": {"timeout": "30s", "steps": [
        {"name": "one", "command": sh("echo one >> $SPOS_OUTPUT_DIR/count")},
        {"name": "two", "command": sh('echo two >> $SPOS_OUTPUT_DIR/count; '
                                      'if [ "$SPOS_ATTEMPT" = 1 ]; then sleep 86402; fi')},
        {"name": "three", "command": sh("echo three >> $SPOS_OUTPUT_DIR/count")},
    ]}})
    run_id = device.enqueue("steps")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: "two" in device.lines("count"), "step two to start")
    assert device.record(run_id)["stepsDone"] == ["one"]
    pids = wait_for(lambda: cgroup_pids(device.agent, run_id), "the run's processes")
    daemon.process.kill()
    daemon.process.wait(5)

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert device.lines("count") == ["one", "two", "two", "three"]  # step one is not rerun
    assert record["stepsDone"] == ["one", "two", "three"]
    assert not survivors(pids, "86402")


def test_a_task_without_checkpoints_restarts_from_its_first_step(device):
    device.apply({"steps": {"timeout": "30s", "checkpoint": {"enabled": False}, "steps": [
        {"name": "one", "command": sh("echo one >> $SPOS_OUTPUT_DIR/count")},
        {"name": "two", "command": sh('echo two >> $SPOS_OUTPUT_DIR/count; '
                                      'if [ "$SPOS_ATTEMPT" = 1 ]; then sleep 86407; fi')},
    ]}})
    run_id = device.enqueue("steps")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: "two" in device.lines("count"), "step two to start")
    daemon.process.kill()
    daemon.process.wait(5)
    device.once()
    assert device.record(run_id)["state"] == "completed"
    assert device.lines("count") == ["one", "two", "one", "two"]


WRITES_HELPER = """
import json, os, sys
from reconciler.device import Device
from reconciler.executor.dispatch import Executor, Settings
from reconciler.executor.sandbox import Sandbox

root = sys.argv[1]
writes, syncs = [], []
write_staged, fsync = Device.write_staged, os.fsync

def logged(self, path, data, mode=0o644):
    record = json.loads(data)
    writes.append([path.split("/")[-2], record.get("state"), sorted(
        key for key in ("startedAt", "executor", "configDigest", "stepsDone") if key in record)])
    return write_staged(self, path, data, mode)

def counted(fd):
    syncs.append(fd)
    return fsync(fd)

Device.write_staged, os.fsync = logged, counted
Executor(Device(root), Sandbox(root=root), Settings(cleanup_interval=0)).serve(once=True)
print(json.dumps({"writes": writes, "fsyncs": len(syncs)}))
"""
"""`spos executor --once` in-process, without its retention pass: every record it writes
(bucket, state, which of the start's fields it holds), and how many fsyncs."""

CRASH_HELPER = """
import os, sys
from reconciler.device import Device
from reconciler.executor.dispatch import Executor
from reconciler.executor.runs import RunStore
from reconciler.executor.sandbox import Sandbox

def die(store, run, state):
    os._exit(9)  # as if killed (or the power went) just before the run's end was written

RunStore.finish = die
root = sys.argv[1]
Executor(Device(root), Sandbox(root=root)).serve(once=True)
"""
"""An executor that dies once a run's last step has ended, before its end is recorded."""

CLAIM_CRASH_HELPER = """
import os, sys
from reconciler.device import Device
from reconciler.executor.dispatch import Executor
from reconciler.executor.runs import RunStore
from reconciler.executor.sandbox import Sandbox

stage = RunStore.stage

def staged_then_die(store, run):
    staged = stage(store, run)
    # killed (or the power went) once the sandbox had the run, before its claim was durable
    staged.commit = lambda renamed=None: os._exit(9)
    return staged

RunStore.stage = staged_then_die
root = sys.argv[1]
Executor(Device(root), Sandbox(root=root)).serve(once=True)
"""
"""An executor that dies while the record of a claim it made is still being written."""

CLAIM_REFUSED_HELPER = """
import errno, os, sys
from reconciler.device import Device
from reconciler.executor.dispatch import Executor
from reconciler.executor.runs import RunStore
from reconciler.executor.sandbox import Sandbox

stage = RunStore.stage
refused = []

def staged_then_refused(store, run):
    staged = stage(store, run)
    if len(refused) >= int(os.environ["REFUSE"]):
        return staged
    refused.append(run.id)

    def commit(renamed=None):  # the disk fails as the claim is made durable
        staged.abort()
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    staged.commit = commit
    return staged

RunStore.stage = staged_then_refused
root = sys.argv[1]
Executor(Device(root), Sandbox(root=root)).serve(once=True)
"""
"""An executor whose state file system refuses to make the first REFUSE records it stages
durable (a claim's, and the second try of it)."""


def in_process(helper: str, device) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", helper, str(device.root)], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_a_run_is_recorded_durably_once_as_it_starts_and_once_as_it_ends(device):
    device.apply({"steps": {"timeout": "20s", "steps": [
        {"name": "one", "command": sh("true")}, {"name": "two", "command": sh("true")}]}})
    device.enqueue("steps")
    device.once()  # the first run of a config also keeps a copy of it (configs/)
    run_id = device.enqueue("steps")

    result = in_process(WRITES_HELPER, device)

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    start = ["configDigest", "executor", "startedAt"]
    assert seen["writes"] == [
        ["active", "active", start],  # the claim, its owner and the attempt's start: one write
        ["active", "active", [*start, "stepsDone"]],  # step one done: a rerun starts at two
        ["completed", "completed", [*start, "stepsDone"]],  # step two, with the run's end
    ], seen
    assert seen["fsyncs"] == 2 * 3, seen  # each: the file, then its directory
    record = device.record(run_id)
    assert record["state"] == "completed" and record["stepsDone"] == ["one", "two"], record


def test_an_executor_dying_before_its_claim_is_durable_reruns_the_run_with_the_attempt_counted(device):
    device.apply({"t": {"timeout": "20s", "command": sh("echo ran >> $SPOS_OUTPUT_DIR/count")}})
    run_id = device.enqueue("t")

    died = in_process(CLAIM_CRASH_HELPER, device)
    assert died.returncode == 9, died.stderr
    left = device.record(run_id)
    # In active/ (the claim's rename), holding the record as it was queued: no owner, no start.
    assert left["state"] == "active" and left["attempt"] == 1, left
    assert left.get("executor") is None and left.get("startedAt") is None, left
    assert list((device.agent_dir() / "active").glob("*.json"))

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert [a["state"] for a in record["attempts"]] == ["interrupted", "completed"], record
    assert 1 <= device.lines("count").count("ran") <= 2  # at least once
    assert not list((device.agent_dir() / "active").iterdir())
    assert not run_cgroup_dirs(device.agent, run_id)


@pytest.mark.parametrize("refusals, state", [(1, "completed"), (2, "failed")])
def test_a_claim_the_disk_refuses_to_make_durable_is_tried_again_then_fails_its_run(
        device, monkeypatch, refusals, state):
    """Refused once, the claim is written again with the run's reserve given up, and the run
    goes on; refused again, the run is killed and fails for it. Other runs go on."""
    device.apply({"t": {"timeout": "20s", "command": sh("sleep 0.3"), "concurrency": "Allow"}})
    refused = device.enqueue("t")
    other = device.enqueue("t", "--priority", "10")
    monkeypatch.setenv("REFUSE", str(refusals))

    result = in_process(CLAIM_REFUSED_HELPER, device)

    assert result.returncode == 0, result.stderr
    record = device.record(refused)
    assert record["state"] == state, record
    if state == "failed":
        assert "its record could not be written: Input/output error" in record["reason"], record
    assert device.record(other)["state"] == "completed"
    assert not list((device.agent_dir() / "active").iterdir())


def test_an_executor_dying_before_a_runs_end_is_recorded_reruns_only_its_last_step(device):
    device.apply({"steps": {"timeout": "20s", "steps": [
        {"name": "one", "command": sh("echo one >> $SPOS_OUTPUT_DIR/count")},
        {"name": "two", "command": sh("echo two >> $SPOS_OUTPUT_DIR/count")},
    ]}})
    run_id = device.enqueue("steps")

    died = in_process(CRASH_HELPER, device)
    assert died.returncode == 9, died.stderr
    left = device.record(run_id)
    assert left["state"] == "active" and left["stepsDone"] == ["one"], left
    assert not run_cgroup_dirs(device.agent, run_id)  # emptied and removed before the end

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert [a["state"] for a in record["attempts"]] == ["interrupted", "completed"]
    assert record["attempts"][0]["startedAt"] and record["attempts"][0]["configDigest"]
    assert device.lines("count") == ["one", "two", "two"]
    assert record["stepsDone"] == ["one", "two"]


def test_a_record_left_in_active_beside_its_final_copy_is_dropped_not_rerun(device):
    """The removal of the active copy is not synced to disk: after a power loss it may be
    back next to the final record. Recovery keeps the final one."""
    device.apply({"t": {"command": sh("echo ran >> $SPOS_OUTPUT_DIR/ran")}})
    run_id = device.enqueue("t")
    device.once()
    final = next((device.agent_dir() / "completed").glob(f"*-{run_id}.json"))
    stale = json.loads(final.read_text())
    stale.update(state="active", executor={"pid": 1, "bootId": "an-earlier-boot", "startTicks": 1})
    for key in ("endedAt", "exitCode", "durationSeconds", "usage"):
        stale.pop(key, None)
    stale["attempts"] = []
    (device.agent_dir() / "active" / final.name).write_text(json.dumps(stale))

    device.once()

    assert not list((device.agent_dir() / "active").iterdir())
    assert device.record(run_id)["state"] == "completed"
    assert device.lines("ran") == ["ran"]


def test_a_run_whose_directories_were_removed_makes_them_again(device):
    device.apply({"t": {"command": sh("echo ran > $SPOS_OUTPUT_DIR/ran; pwd > $SPOS_OUTPUT_DIR/pwd")}})
    run_id = device.enqueue("t")
    for name in ("tmp", "checkpoints", "output", "logs", "active", "completed", "configs"):
        path = device.agent_dir() / name
        if path.is_dir():
            subprocess.run(["rm", "-rf", str(path)], check=True)
    device.once()
    assert device.record(run_id)["state"] == "completed"
    assert device.lines("ran") == ["ran"]
    assert "run completed" in device.log(run_id)


def test_a_runs_leftover_processes_are_gone_when_it_is_recorded(device):
    """The action exits at once, leaving a SIGTERM-ignoring process in a session of its own:
    everything in the run's pid namespace ends with it, and the run is recorded only once its
    cgroup is empty (and removed)."""
    device.apply({"t": {"command": sh('(trap "" TERM; setsid sleep 86408 &); echo left')}})
    run_id = device.enqueue("t")
    device.once()
    record = device.record(run_id)
    assert record["state"] == "completed" and record["exitCode"] == 0, record
    assert not survivors({}, "86408")
    assert not run_cgroup_dirs(device.agent, run_id)


def test_a_failed_step_ends_the_run_unless_it_may_fail(device):
    device.apply({
        "lenient": {"steps": [
            {"name": "flaky", "command": sh("exit 5"), "continueOnError": True},
            {"name": "after", "command": sh("echo after >> $SPOS_OUTPUT_DIR/lenient")},
        ]},
        "strict": {"steps": [
            {"name": "flaky", "command": sh("exit 5")},
            {"name": "after", "command": sh("echo after >> $SPOS_OUTPUT_DIR/strict")},
        ]},
    })
    lenient, strict = device.enqueue("lenient"), device.enqueue("strict")
    device.once()

    record = device.record(lenient)
    assert record["state"] == "completed" and record["stepsDone"] == ["flaky", "after"], record
    assert device.lines("lenient") == ["after"]
    record = device.record(strict)
    assert record["state"] == "failed" and record["exitCode"] == 5, record
    assert "step flaky exited with 5" in record["reason"]
    assert not device.lines("strict")
    log = device.log(strict)
    assert "step flaky started" in log and "step after" not in log


def test_a_step_timeout_ends_the_run(device):
    device.apply({"t": {"timeout": "30s", "steps": [
        {"name": "first", "command": sh("true")},
        {"name": "slow", "command": sh("sleep 86406"), "timeout": "1s"},
    ]}})
    run_id = device.enqueue("t")
    device.once(timeout=15)
    record = device.record(run_id)
    assert record["state"] == "timeout" and "step slow timed out after 1s" in record["reason"], record
    assert record["stepsDone"] == ["first"]
    assert record["durationSeconds"] < 1 + 1 + 1.5
    assert not survivors({}, "86406")


# -- ending -------------------------------------------------------------------------------------


def test_timeout_kills_double_forked_processes_that_ignore_sigterm(device):
    script = (
        "trap '' TERM\n"
        "( sleep 86403 & )\n"                                  # double-forked, ignores SIGTERM
        "trap 'echo got-term >> $SPOS_OUTPUT_DIR/term' TERM\n"
        "echo up > $SPOS_OUTPUT_DIR/up\n"
        "while :; do sleep 0.1; done\n"                        # survives SIGTERM too
    )
    device.apply({"stubborn": {"command": sh(script), "timeout": "2s"}})
    run_id = device.enqueue("stubborn")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.output("up").exists(), "the action to start")
    pids = wait_for(lambda: (p := cgroup_pids(device.agent, run_id)) and survivors(p, "86403") and p,
                    "the double-forked child")

    record = device.wait_state(run_id, "timeout", "failed", "completed", timeout=8)
    assert record["state"] == "timeout", record
    assert "timed out" in record["reason"]
    assert 2.0 <= record["durationSeconds"] < 2.0 + 1.0 + 1.5, record  # timeout + grace + slack
    assert device.lines("term"), "SIGTERM came first"
    assert not survivors(pids, "86403")
    assert not run_cgroup_dirs(device.agent, run_id)
    assert "SIGTERM" in device.log(run_id)
    assert daemon.stop() == 0


def test_failed_runs_are_retried_with_backoff(device):
    device.apply({
        "flaky": {
            "command": sh('echo "$SPOS_ATTEMPT:${SPOS_RESUME:-0}:$(cat $SPOS_CHECKPOINT_DIR/n 2>/dev/null)"'
                          " >> $SPOS_OUTPUT_DIR/attempts; echo $SPOS_ATTEMPT > $SPOS_CHECKPOINT_DIR/n; exit 1"),
            "retries": {"limit": 2, "backoff": {"initial": "1s", "factor": 2, "max": "10s"}},
        },
        "quick": {"command": sh("true")},
    })
    run_id = device.enqueue("flaky")
    other = device.enqueue("quick", "--priority", "10")  # queued behind the flaky run
    device.once()

    record = device.record(run_id)
    assert record["state"] == "failed" and record["attempt"] == 3, record
    # each attempt is told to resume and sees what the previous one left in its checkpoint
    assert device.lines("attempts") == ["1:0:", "2:1:1", "3:1:2"]
    attempts = record["attempts"]
    # a retry waiting for its time does not hold up other work
    assert when(device.record(other)["endedAt"]) < when(attempts[1]["startedAt"])
    assert [a["state"] for a in attempts] == ["failed"] * 3
    for n, expected in ((1, 1.0), (2, 2.0)):  # the wait before retry n, +-10 % jitter
        waited = when(attempts[n]["startedAt"]) - when(attempts[n - 1]["endedAt"])
        assert expected * 0.9 - 0.01 <= waited <= expected * 1.1 + 0.5, (n, waited)


def test_a_retry_waiting_in_the_queue_survives_an_executor_restart(device):
    device.apply({"flaky": {
        "command": sh('echo $SPOS_ATTEMPT >> $SPOS_OUTPUT_DIR/attempts; [ "$SPOS_ATTEMPT" != 1 ]'),
        # long enough that a loaded machine does not start the retry before the kill below
        "retries": {"limit": 1, "backoff": {"initial": "5s"}},
    }})
    run_id = device.enqueue("flaky")
    daemon = device.daemon("--rescan", "60s")
    waiting = wait_for(lambda: (r := device.record(run_id)).get("notBefore") and r["state"] == "queued" and r,
                       "the retry to wait in the queue")
    assert waiting["attempt"] == 2 and waiting["notBefore"]
    daemon.process.kill()
    daemon.process.wait(5)

    device.once()

    record = device.record(run_id)
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert device.lines("attempts") == ["1", "2"]
    assert when(record["attempts"][1]["startedAt"]) >= when(waiting["notBefore"])


def test_non_retryable_exit_codes_fail_at_once(device):
    device.apply({"bad": {
        "command": sh("echo x >> $SPOS_OUTPUT_DIR/attempts; exit 3"),
        "retries": {"limit": 2, "backoff": {"initial": "1s"}, "nonRetryableExitCodes": [3]},
    }})
    run_id = device.enqueue("bad")
    device.once()
    record = device.record(run_id)
    assert record["state"] == "failed" and record["exitCode"] == 3 and len(record["attempts"]) == 1
    assert "non-retryable" in record["reason"]
    assert device.lines("attempts") == ["x"]


def test_a_retry_gets_its_attachments_afresh_whatever_the_last_attempt_left(device):
    """Attachments carried in the queue record are written for each attempt (docs/queue.md,
    "Attachments"): an attempt that replaced them with a link to /etc leaves the next one
    its own copy again, nothing outside the run is touched, and the executor goes on."""
    from reconciler.device import Device as Root
    from reconciler.executor.enqueue import enqueue

    device.apply({"hooked": {
        "command": sh('if [ "$SPOS_ATTEMPT" = 1 ]; then rm -rf "$TMPDIR/spos-trigger"; '
                      'ln -s /etc "$TMPDIR/spos-trigger"; exit 1; fi; '
                      'cat "$SPOS_PAYLOAD" > "$SPOS_OUTPUT_DIR/payload"'),
        "retries": {"limit": 1, "backoff": {"initial": "1s"}}}})
    record = enqueue(Root(str(device.root)), device.agent, "hooked",
                     source={"kind": "trigger", "trigger": "t", "type": "webhook", "events": 1},
                     attachments={"events.json": b"{}\n", "payload": b"the body\n"})
    assert "attachments" in record
    device.once()
    ended = device.record(record["id"])
    assert ended["state"] == "completed" and len(ended["attempts"]) == 2, (ended, device.log(record["id"]))
    assert device.output("payload").read_bytes() == b"the body\n"
    assert "attachments" not in ended


def test_a_tree_too_deep_to_remove_fails_its_run_and_never_the_executor(device):
    """An attempt that leaves 300 nested directories where its attachments go (and in its tmp
    directory): the next attempt cannot have its attachments written afresh, so the run fails,
    "could not start"; its tree is left in place, said in its log; the executor goes on and
    runs the other queued run."""
    device.apply({
        "deep": {"command": sh('mkdir -p "$TMPDIR/spos-trigger/$(printf \'d/%.0s\' $(seq 300))"; exit 1'),
                 "retries": {"limit": 1, "backoff": {"initial": "1s"}}},
        "fine": {"command": sh("true")},
    })
    record = enqueue_with_payload(device, "deep")
    fine = device.enqueue("fine")
    device.once()
    ended = device.record(record["id"])
    assert ended["state"] == "failed" and "could not start" in ended["reason"], ended
    assert "attachments could not be written" in ended["reason"], ended
    assert "left in place" in device.log(record["id"])
    assert device.record(fine)["state"] == "completed"


def test_a_run_whose_tmp_directory_is_blocked_fails_and_others_go_on(device):
    """Something in the way of a run's directories (here a file where its tmp directory with
    its attachments belongs) fails that run, "could not start", never the executor."""
    device.apply({"t": {"command": sh("true")}})
    record = enqueue_with_payload(device, "t")
    blocker = device.agent_dir() / "tmp" / record["id"]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")  # where the run's tmp directory belongs
    fine = device.enqueue("t")
    device.once()
    failed = device.record(record["id"])
    assert failed["state"] == "failed" and "could not start" in failed["reason"], failed
    assert device.record(fine)["state"] == "completed"


def enqueue_with_payload(device, task: str) -> dict:
    from reconciler.device import Device as Root
    from reconciler.executor.enqueue import enqueue

    return enqueue(Root(str(device.root)), device.agent, task,
                   source={"kind": "trigger", "trigger": "t", "type": "webhook", "events": 1},
                   attachments={"payload": b"x"})


def test_hook_tasks_are_enqueued_on_success_and_on_final_failure(device):
    device.apply({
        "good": {"command": sh("true"), "onSuccess": ["after"]},
        "bad": {"command": sh("exit 1"), "onFailure": ["after"],
                "retries": {"limit": 1, "backoff": {"initial": "1s"}}},
        "after": {"command": sh("echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/after"), "concurrency": "Allow"},
    })
    good, bad = device.enqueue("good"), device.enqueue("bad")
    device.once()

    rows = json.loads(device.spos("action", "list", "--root", device.root, "--json").out)
    followers = [device.record(row["id"]) for row in rows if row["task"] == "after"]
    by_parent = {r["source"]["run"]: r for r in followers}
    assert sorted(by_parent) == sorted([good, bad]), followers  # one each: bad's retry did not fire
    assert by_parent[good]["source"] == {"kind": "hook", "run": good, "on": "onSuccess"}
    assert by_parent[bad]["source"] == {"kind": "hook", "run": bad, "on": "onFailure"}
    assert all(r["state"] == "completed" for r in followers)
    assert sorted(device.lines("after")) == sorted(r["id"] for r in followers)


def test_a_run_that_could_not_start_before_its_deadline_expires(device):
    device.apply({"t": {"command": sh("echo ran >> $SPOS_OUTPUT_DIR/ran"), "concurrency": "Allow"}})
    late = device.enqueue("t", "--deadline", "1s")
    in_time = device.enqueue("t", "--deadline", "1h")
    time.sleep(1.2)
    device.once()

    record = device.record(late)
    assert record["state"] == "expired" and "deadline" in record["reason"]
    assert "startedAt" not in record and not record.get("attempts")
    assert device.record(in_time)["state"] == "completed"
    assert device.lines("ran") == ["ran"]


# -- concurrency ----------------------------------------------------------------------------------


def _intervals(device, run_ids):
    records = [device.record(run_id) for run_id in run_ids]
    assert all(r["state"] == "completed" for r in records), records
    return [(when(r["startedAt"]), when(r["endedAt"])) for r in records]


def test_concurrency_forbid_skips_a_second_run(device):
    device.apply({"t": {"command": sh("sleep 1"), "concurrency": "Forbid"}})
    first, second = device.enqueue("t"), device.enqueue("t")
    device.once()
    assert device.record(first)["state"] == "completed"
    record = device.record(second)
    assert record["state"] == "skipped", record
    assert "Forbid" in record["reason"] and first in record["reason"]
    assert "startedAt" not in record


def test_concurrency_forbid_sees_a_run_of_another_process(device):
    device.apply({"t": {"command": sh("echo up > $SPOS_OUTPUT_DIR/up; sleep 1.5"), "concurrency": "Forbid"}})
    foreground = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
         "--agent", device.agent, "--task", "t", "--grace", "1s"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: device.output("up").exists(), "`action execute` to start its run")
        queued = device.enqueue("t")
        device.once()
        _, err = foreground.communicate(timeout=10)
    finally:
        if foreground.poll() is None:
            foreground.kill()
    assert foreground.returncode == 0
    executed = err.split()[1]
    record = device.record(queued)
    assert record["state"] == "skipped" and executed in record["reason"], record
    assert device.record(executed)["state"] == "completed"


def test_action_execute_exits_with_the_runs_end_when_an_executor_took_its_retry(device):
    """`action execute` leaves a retry in queue/ while it waits, where a running executor may
    take it: execute then exits with how the run ended, not with the failed attempt's code."""
    device.apply({"t": {"command": sh('[ "$SPOS_ATTEMPT" -gt 1 ] || exit 7'),
                        "retries": {"limit": 1, "backoff": {"initial": "2s"}}}})
    foreground = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
         "--agent", device.agent, "--task", "t"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    daemon = None
    try:
        queue = device.root / f"var/lib/systemprompt-os/agents/{device.agent}/queue"
        wait_for(lambda: queue.is_dir() and any(queue.glob("*.json")), "the retry to wait in queue/")
        foreground.send_signal(signal.SIGSTOP)  # the executor's turn: it takes the retry when due
        daemon = device.daemon()
        run_id = next(queue.glob("*.json")).name.rsplit("-", 2)[-2:]
        run_id = "-".join(run_id).removesuffix(".json")
        device.wait_state(run_id, "completed")
        foreground.send_signal(signal.SIGCONT)
        _, err = foreground.communicate(timeout=WAIT)
    finally:
        if foreground.poll() is None:
            foreground.send_signal(signal.SIGCONT)
            foreground.kill()
        if daemon is not None:
            daemon.stop()
    assert foreground.returncode == 0, err


def test_action_execute_waiting_to_retry_exits_soon_after_its_run_is_cancelled(device):
    """`action cancel` ends the retry waiting in queue/ at once; `action execute`, which reads
    no wake pipe, sees it within a second or so, not when the backoff would have ended."""
    device.apply({"t": {"command": sh("exit 7"),
                        "retries": {"limit": 1, "backoff": {"initial": "2m", "max": "2m"}}}})
    foreground = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
         "--agent", device.agent, "--task", "t"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        queue = device.agent_dir() / "queue"
        wait_for(lambda: queue.is_dir() and any(queue.glob("*.json")), "the retry to wait in queue/")
        run_id = "-".join(next(queue.glob("*.json")).name.removesuffix(".json").split("-")[-2:])
        result = device.spos("action", "cancel", run_id, "--root", device.root)
        assert result.code == 0 and "while waiting to retry" in result.out, result.out + result.err
        asked = time.monotonic()
        _, err = foreground.communicate(timeout=WAIT)
        waited = time.monotonic() - asked
    finally:
        if foreground.poll() is None:
            foreground.kill()
    assert waited < 3, f"execute went on waiting {waited:.1f}s after the cancel"
    assert foreground.returncode != 0, err
    assert device.record(run_id)["state"] == "cancelled"


@pytest.mark.parametrize("policy", ["Forbid", "Replace"])
def test_a_retry_is_no_new_start_for_forbid_or_replace(device, policy):
    """Forbid and Replace judge new starts. A run whose retry falls due while a newer run of
    the task is active is neither skipped (Forbid) nor does it cancel the newer run (Replace):
    it waits its turn, and then retries."""
    script = ('[ "$SPOS_ATTEMPT" -gt 1 ] && exit 0; '
              '[ -e $SPOS_OUTPUT_DIR/failed-once ] && { sleep 2; exit 0; }; '
              'touch $SPOS_OUTPUT_DIR/failed-once; exit 1')
    device.apply({"t": {"command": sh(script), "concurrency": policy,
                        "retries": {"limit": 1, "backoff": {"initial": "1s"}}}})
    daemon = device.daemon()
    try:
        first = device.enqueue("t")
        wait_for(lambda: device.record(first).get("attempt") == 2, "the first run to wait to retry")
        second = device.enqueue("t")  # starts at once, and is still running when the retry is due
        assert device.wait_state(second, "completed", "cancelled", "failed")["state"] == "completed"
        record = device.wait_state(first, "completed", "skipped", "failed", "cancelled")
    finally:
        daemon.stop()
    assert record["state"] == "completed", record
    assert [attempt["state"] for attempt in record["attempts"]] == ["failed", "completed"]


def test_concurrency_replace_cancels_the_active_run(device):
    script = "trap 'exit 143' TERM; echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/started; sleep 1 & wait"
    device.apply({"t": {"command": sh(script), "concurrency": "Replace"}})
    first = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.lines("started") == [first], "the first run to start")
    second = device.enqueue("t")

    record = device.wait_state(second, "completed", "failed")
    assert record["state"] == "completed"
    replaced = device.record(first)
    assert replaced["state"] == "cancelled", replaced
    assert f"replaced by run {second}" in replaced["reason"]
    assert device.lines("started") == [first, second]
    assert when(record["startedAt"]) >= when(replaced["endedAt"])
    assert daemon.stop() == 0


# The first run of `t` ignores SIGTERM, so it only ends when its whole cgroup is killed after
# the grace period; the runs after it end at once.
REPLACED_FIRST = sh("echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/started; "
                    "if [ $(wc -l < $SPOS_OUTPUT_DIR/started) = 1 ]; then trap '' TERM; sleep 86408; fi")


def test_concurrency_replace_cancels_a_run_of_action_execute_before_starting(device):
    other = device.other()
    device.apply({"t": {"command": REPLACED_FIRST, "concurrency": "Replace", "timeout": "30s"}},
                 others={other: {"quick": {"command": sh("true")}}})
    foreground = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
         "--agent", device.agent, "--task", "t", "--grace", "1s"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        executed = wait_for(lambda: device.lines("started"), "`action execute` to start its run")[0]
        pids = wait_for(lambda: cgroup_pids(device.agent, executed), "its processes")
        daemon = device.daemon("--rescan", "60s")
        second = device.enqueue("t")
        meanwhile = device.enqueue("quick", agent=other)
        record = device.wait_state(second, "completed", "failed", "cancelled")
        foreground.communicate(timeout=10)
    finally:
        if foreground.poll() is None:
            foreground.kill()
    assert record["state"] == "completed", record
    replaced = device.record(executed)
    assert replaced["state"] == "cancelled", replaced
    assert f"replaced by run {second}" in replaced["reason"]
    assert foreground.returncode != 0
    # the new run started only once the old one had ended, its cgroup killed ...
    assert device.lines("started") == [executed, second]
    assert when(record["startedAt"]) >= when(replaced["endedAt"])
    assert not survivors(pids, "86408")
    # ... and the wait held up nothing else
    assert when(device.record(meanwhile)["endedAt"]) < when(record["startedAt"])
    assert not list((device.agent_dir() / "active").iterdir())  # no request or reserve is left
    assert daemon.stop() == 0


def test_concurrency_replace_cancels_a_run_of_another_executor(device):
    device.apply({"t": {"command": REPLACED_FIRST, "concurrency": "Replace", "timeout": "30s"}})
    first = device.enqueue("t")
    holder = device.daemon("--rescan", "60s", "--max-parallel", "1")  # claims nothing more
    wait_for(lambda: device.lines("started") == [first], "the first run to start")
    pids = wait_for(lambda: cgroup_pids(device.agent, first), "its processes")
    # Both executors read the one wake pipe and only one gets the byte: a short rescan lets the
    # replacer find the new run even when the holder, which has no room for it, took the wake-up.
    replacer = device.daemon("--rescan", "200ms")
    device.wait_ready(replacer)
    second = device.enqueue("t")

    record = device.wait_state(second, "completed", "failed", "cancelled")
    assert record["state"] == "completed", record
    replaced = device.record(first)
    assert replaced["state"] == "cancelled" and replaced["executor"]["pid"] == holder.pid, replaced
    assert f"replaced by run {second}" in replaced["reason"]
    assert device.lines("started") == [first, second]
    assert when(record["startedAt"]) >= when(replaced["endedAt"])
    assert not survivors(pids, "86408")
    assert "SIGTERM" in device.log(first)
    for daemon in (holder, replacer):
        assert daemon.stop() == 0, daemon.stderr()


def test_concurrency_allow_runs_side_by_side(device):
    device.apply({"t": {"command": sh("sleep 1"), "concurrency": "Allow"}})
    run_ids = [device.enqueue("t"), device.enqueue("t")]
    device.once()
    (s1, e1), (s2, e2) = _intervals(device, run_ids)
    assert s2 < e1 and s1 < e2  # they overlapped


def test_max_per_agent_limits_runs_of_one_agent(device):
    other = device.other()
    device.apply({"t": {"command": sh("sleep 0.7"), "concurrency": "Allow"}},
                 others={other: {"t": {"command": sh("sleep 0.7")}}})
    mine = [device.enqueue("t"), device.enqueue("t")]
    theirs = device.enqueue("t", agent=other)
    device.once("--max-per-agent", "1")
    (s1, e1), (s2, e2) = _intervals(device, mine)
    assert s2 >= e1 - 0.01  # one at a time for this agent ...
    other_record = device.record(theirs)
    assert other_record["state"] == "completed"
    assert when(other_record["startedAt"]) < e1  # ... while the other agent's ran alongside


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_a_queued_run(device):
    device.apply({"t": {"command": sh("echo ran >> $SPOS_OUTPUT_DIR/ran")}})
    run_id = device.enqueue("t")
    result = device.spos("action", "cancel", run_id, "--root", device.root)
    assert result.code == 0 and "cancelled" in result.out
    device.once()
    record = device.record(run_id)
    assert record["state"] == "cancelled" and record["reason"]
    assert "startedAt" not in record and not device.lines("ran")
    again = device.spos("action", "cancel", run_id, "--root", device.root)
    assert again.code == 0 and "already ended" in again.out


def test_cancel_of_a_queued_run_the_file_system_refuses_changes_nothing(device):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "spos-test-full", str(device.root)], check=True)
    try:
        device.apply({"t": {"command": sh("true")}})
        run_id = device.enqueue("t")
        [queued] = list((device.agent_dir() / "queue").iterdir())
        before = queued.read_bytes()
        filler = device.root / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # every block: not even a temporary file fits
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        result = device.spos("action", "cancel", run_id, "--root", device.root)
        assert result.code == 1 and "No space left on device" in result.err, result.err
        assert [p.name for p in queued.parent.iterdir()] == [queued.name] and queued.read_bytes() == before
        filler.unlink()
        assert device.record(run_id)["state"] == "queued"
    finally:
        subprocess.run(["umount", "-l", str(device.root)], check=False)


def test_a_cancel_of_a_queued_run_cut_short_midway_never_runs_it(device):
    """`action cancel` killed after it rewrote the queued record as cancelled, before its
    rename into failed/: the executor moves it there, and it never runs."""
    device.apply({"t": {"command": sh("echo ran >> $SPOS_OUTPUT_DIR/ran")}})
    run_id = device.enqueue("t")
    [queued] = list((device.agent_dir() / "queue").iterdir())
    record = json.loads(queued.read_text())
    record.update(state="cancelled", reason="cancelled by request before it started",
                  endedAt="2026-11-27T00:00:00.000+00:00")
    queued.write_text(json.dumps(record))

    device.once()

    assert device.record(run_id)["state"] == "cancelled"
    assert (device.agent_dir() / "failed" / queued.name).exists()
    assert not device.lines("ran") and not list(queued.parent.iterdir())


def test_cancel_of_a_run_waiting_to_retry_says_so(device):
    device.apply({"t": {"command": sh("exit 3"), "retries": {"limit": 2, "backoff": {"initial": "1h"}}}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.record(run_id)["attempt"] == 2 and device.record(run_id)["state"] == "queued",
             "the retry to be queued")
    result = device.spos("action", "cancel", run_id, "--root", device.root)
    assert daemon.stop() == 0
    assert result.code == 0 and f"run {run_id} cancelled while waiting to retry (attempt 2)" in result.out
    record = device.record(run_id)
    assert record["state"] == "cancelled"
    assert record["reason"] == "cancelled by request while waiting to retry (attempt 2)"
    assert [a["state"] for a in record["attempts"]] == ["failed"]


def test_cancel_a_running_run_terms_then_kills_its_cgroup(device):
    device.apply({"t": {"command": sh("trap '' TERM; echo up > $SPOS_OUTPUT_DIR/up; sleep 86404"),
                        "timeout": "30s"}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.output("up").exists(), "the run to start")
    pids = cgroup_pids(device.agent, run_id)

    asked = time.time()
    result = device.spos("action", "cancel", run_id, "--root", device.root)
    assert result.code == 0 and "SIGTERM" in result.out
    record = device.wait_state(run_id, "cancelled", "failed", "completed", timeout=6)
    assert record["state"] == "cancelled" and "cancel" in record["reason"], record
    assert 1.0 <= when(record["endedAt"]) - asked < 3.0  # the grace, then the cgroup kill
    assert not survivors(pids, "86404")
    assert "SIGTERM" in device.log(run_id)
    assert daemon.stop() == 0


def test_cancel_of_an_unknown_run_fails(device):
    result = device.spos("action", "cancel", "no-such-run", "--root", device.root)
    assert result.code == 1 and "no run 'no-such-run'" in result.err


def test_cancel_of_a_run_whose_record_is_damaged_names_the_file_and_changes_nothing(device):
    device.apply({"t": {"command": sh("true")}})
    run_id = device.enqueue("t")
    [queued] = list((device.agent_dir() / "queue").iterdir())
    record = json.loads(queued.read_text())
    queued.write_text(json.dumps({**record, "attempt": 0}))
    before = queued.read_bytes()

    result = device.spos("action", "cancel", run_id, "--root", device.root)

    assert result.code == 1
    assert f"queue/{queued.name}" in result.err and "`attempt`" in result.err, result.err
    assert [p.name for p in queued.parent.iterdir()] == [queued.name] and queued.read_bytes() == before


def test_a_cancel_request_outliving_its_executor_is_honoured_at_recovery(device):
    device.apply({"t": {"command": sh("echo $SPOS_ATTEMPT >> $SPOS_OUTPUT_DIR/attempts; "
                                      "trap '' TERM; sleep 86409"), "timeout": "30s"}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.lines("attempts") == ["1"], "the run to start")
    pids = wait_for(lambda: cgroup_pids(device.agent, run_id), "its processes")
    daemon.process.kill()
    daemon.process.wait(5)

    result = device.spos("action", "cancel", run_id, "--root", device.root)
    assert result.code == 0 and "executor is gone" in result.out, result.out
    active = device.agent_dir() / "active"
    assert [p.name for p in active.glob("*.cancel")]

    device.once()

    record = device.record(run_id)
    assert record["state"] == "cancelled", record  # what was asked for, not a rerun
    assert "cancelled by request" in record["reason"] and "died" in record["reason"]
    assert [a["state"] for a in record["attempts"]] == ["cancelled"]
    assert device.lines("attempts") == ["1"]
    assert not survivors(pids, "86409")
    assert not list(active.iterdir())  # the request went with the run
    assert "run cancelled" in device.log(run_id)


def test_a_cancel_request_nested_too_deeply_to_parse_counts_and_the_executor_goes_on(device):
    """A request file written by hand counts whatever it holds, one nested past what the JSON
    reader can take too: the run is cancelled, and the executor serves the next run."""
    device.apply({"t": {"command": sh("trap '' TERM; sleep 86407"), "timeout": "30s",
                        "concurrency": "Allow"},
                  "after": {"command": sh("true")}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s", "--grace", "1s")
    pids = wait_for(lambda: cgroup_pids(device.agent, run_id), "the run to start")
    active = device.agent_dir() / "active"
    record_file = next(p for p in active.glob(f"*-{run_id}.json"))
    (active / f"{record_file.name}.cancel").write_text("[" * 100_000 + "]" * 100_000)  # seen within a second

    wait_for(lambda: device.record(run_id).get("state") == "cancelled", "the run to be cancelled")
    after = device.enqueue("after")
    wait_for(lambda: device.record(after).get("state") == "completed", "the next run to complete")
    assert daemon.process.poll() is None
    assert not survivors(pids, "86407")
    daemon.stop()


def test_a_record_left_half_written_by_a_killed_enqueuer_is_removed(device):
    """`spos action run` killed between writing its record and renaming it into queue/ leaves
    a temporary file: the run was never queued (nothing said it was); the executor removes
    the file, and one whose writer is alive is left to it."""
    device.apply({"t": {"command": sh("true"), "concurrency": "Allow"}})
    queue = device.agent_dir() / "queue"
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = "050-00000000000000000100-20261127T000000-deadbeef.json"
    dead = queue / f".{name}.spos-tmp-{gone.pid}"
    dead.write_text('{"format": 1, "id": "20261127T000000-de')  # cut short
    alive = queue / f".{name}.spos-tmp-{os.getpid()}"
    alive.write_text("{}")
    queued = device.enqueue("t")

    device.once()

    assert device.record(queued)["state"] == "completed"
    assert not dead.exists()
    assert alive.exists()
    assert not list((device.agent_dir() / "failed").iterdir())  # nothing set aside as corrupt


def test_stale_cancel_requests_are_removed_and_stop_no_later_run(device):
    device.apply({
        "t": {"command": sh("true"), "concurrency": "Allow"},
        "flaky": {"command": sh('echo $SPOS_ATTEMPT >> $SPOS_OUTPUT_DIR/attempts; '
                                '[ "$SPOS_ATTEMPT" != 1 ] || exit 1; sleep 2'),
                  "retries": {"limit": 1, "backoff": {"initial": "1s"}}, "timeout": "30s"},
    })
    ended = device.enqueue("t")
    device.once()
    assert device.record(ended)["state"] == "completed"
    # a request (and a reserve) left behind for a run that already ended, as when the process
    # writing it died half-way: the next executor removes them, and a later run is not touched
    active = device.agent_dir() / "active"
    name = next((device.agent_dir() / "completed").glob(f"*-{ended}.json")).name
    stray_request = active / f"{name}.cancel"
    stray_request.write_text(json.dumps({"runId": ended, "attempt": 1, "reason": "too late"}))
    (active / f"{name}.reserve").write_bytes(b"\0" * 4096)
    later = device.enqueue("t")
    flaky = device.enqueue("flaky")
    daemon = device.daemon("--rescan", "60s")
    assert device.wait_state(later, "completed", "failed", "cancelled")["state"] == "completed"
    assert not stray_request.exists() and not (active / f"{name}.reserve").exists()

    # a request made for attempt 1 that lingered does not cancel attempt 2
    wait_for(lambda: device.lines("attempts") == ["1", "2"], "the retry to start")
    flaky_name = next(active.glob(f"*-{flaky}.json")).name
    lingering = active / f"{flaky_name}.cancel"
    lingering.write_text(json.dumps({"runId": flaky, "attempt": 1, "reason": "for attempt 1"}))
    record = device.wait_state(flaky, "completed", "failed", "cancelled")
    assert record["state"] == "completed" and record["attempt"] == 2, record
    assert not lingering.exists()  # removed when the run's end was recorded
    assert daemon.stop() == 0


# -- heartbeats and progress ----------------------------------------------------------------------


def test_a_silent_run_past_its_heartbeat_timeout_is_killed_as_hung(device):
    device.apply({"quiet": {"command": sh("sleep 86405"), "timeout": "30s", "heartbeat": {"timeout": "1s"}}})
    run_id = device.enqueue("quiet")
    device.once(timeout=15)
    record = device.record(run_id)
    assert record["state"] in ("timeout", "failed"), record
    assert "heartbeat" in record["reason"], record
    assert record["durationSeconds"] < 1.0 + 1.0 + 1.5
    assert not survivors({}, "86405")


def test_heartbeats_keep_a_run_alive_and_progress_is_shown(device):
    script = (
        'echo "progress 50 halfway there" >&$SPOS_PROGRESS_FD\n'
        "for i in 1 2 3 4 5 6 7; do echo heartbeat >&$SPOS_PROGRESS_FD; sleep 0.3; done\n"
    )
    device.apply({"chatty": {"command": bash(script), "timeout": "30s", "heartbeat": {"timeout": "1s"}}})
    run_id = device.enqueue("chatty")
    daemon = device.daemon("--rescan", "60s")

    running = wait_for(lambda: (r := device.record(run_id)).get("progress") and r, "progress to show")
    assert running["state"] == "active"
    assert running["progress"] == {"percent": 50.0, "message": "halfway there"}
    assert running["heartbeatAt"]
    shown = device.spos("action", "show", run_id, "--root", device.root)
    assert "progress:" in shown.out and "halfway there" in shown.out

    record = device.wait_state(run_id, "completed", "failed", "timeout", timeout=8)
    assert record["state"] == "completed", record
    assert record["durationSeconds"] >= 2.0  # well past the 1 s heartbeat timeout
    assert record["progress"]["percent"] == 50.0
    assert daemon.stop() == 0


# -- bad inputs -----------------------------------------------------------------------------------


def test_a_corrupt_queue_file_is_set_aside_and_other_work_goes_on(device):
    other = device.other()
    device.apply({"t": {"command": sh("true")}}, others={other: {"t": {"command": sh("true")}}})
    queue = device.agent_dir() / "queue"
    (queue / "000-00000000000000000001-garbage.json").write_text("{not json")
    (queue / "000-00000000000000000002-notarecord.json").write_text("[1, 2]")
    mine, theirs = device.enqueue("t"), device.enqueue("t", agent=other)

    device.once()

    failed = device.agent_dir() / "failed"
    for name in ("000-00000000000000000001-garbage.json", "000-00000000000000000002-notarecord.json"):
        assert (failed / f"{name}.corrupt").exists()
        assert (failed / f"{name}.corrupt.reason").read_text().strip()
    assert "not valid JSON" in (failed / "000-00000000000000000001-garbage.json.corrupt.reason").read_text()
    assert not [p for p in queue.iterdir()]
    assert device.record(mine)["state"] == "completed"
    assert device.record(theirs)["state"] == "completed"


def test_a_link_or_a_directory_among_the_runs_is_set_aside_and_every_agent_is_served(device, tmp_path):
    other, linked = device.other(), device.other()
    device.apply({"t": {"command": sh("true")}}, others={other: {"t": {"command": sh("true")}}})
    queue, failed = device.agent_dir() / "queue", device.agent_dir() / "failed"
    outside = tmp_path / "outside.json"
    outside.write_text('{"id": "20260101T000000-0000000a", "task": "t"}')
    (queue / "000-00000000000000000001-20260101T000000-0000000a.json").symlink_to(outside)
    (queue / "000-00000000000000000002-20260101T000000-0000000b.json").mkdir()
    (device.agent_dir() / "active" / "000-00000000000000000003-20260101T000000-0000000c.json").symlink_to(outside)
    device.agent_dir(linked).symlink_to(device.agent_dir(other))  # a whole agent's directory
    mine, theirs = device.enqueue("t"), device.enqueue("t", agent=other)

    listed = device.spos("action", "list", "--root", device.root, "--json")
    assert listed.code == 0, listed.err
    assert {mine, theirs} <= {run["id"] for run in json.loads(listed.out)}

    result = device.once()

    for bucket, name in (("queue", "000-00000000000000000001-20260101T000000-0000000a.json"),
                         ("queue", "000-00000000000000000002-20260101T000000-0000000b.json"),
                         ("active", "000-00000000000000000003-20260101T000000-0000000c.json")):
        assert (failed / f"{name}.corrupt").is_symlink() or (failed / f"{name}.corrupt").is_dir(), name
        assert "not a run record" in (failed / f"{name}.corrupt.reason").read_text(), name
        assert not (device.agent_dir() / bucket / name).exists()
    assert outside.read_text() == '{"id": "20260101T000000-0000000a", "task": "t"}'  # never followed
    assert device.record(mine)["state"] == "completed"
    assert device.record(theirs)["state"] == "completed"
    assert f"passing over /var/lib/systemprompt-os/agents/{linked}" in result.stderr
    assert "symlink" in result.stderr


def test_an_agent_config_of_the_wrong_shape_fails_its_runs_and_others_go_on(device):
    other = device.other()
    device.apply({"t": {"command": sh("true")}, "u": {"command": sh("true")}},
                 others={other: {"t": {"command": sh("true")}}})
    first, theirs = device.enqueue("t"), device.enqueue("t", agent=other)
    config_path = device.agent_dir() / "agent.json"
    config = json.loads(config_path.read_text())
    config["tasks"]["t"]["timeoutSeconds"] = "1h"
    config_path.write_text(json.dumps(config))
    sibling = device.enqueue("u")  # a task of the wrong shape fails its own runs only

    device.once()

    record = device.record(first)
    assert record["state"] == "failed", record
    assert "`tasks.t.timeoutSeconds` must be a number from 0, got '1h'" in record["reason"]
    assert "agent.json" in record["reason"]
    assert "tasks.t.timeoutSeconds" in device.log(first)
    assert device.record(sibling)["state"] == "completed"
    assert device.record(theirs)["state"] == "completed"

    # enqueueing says the same, and queues nothing
    for tasks, field in (({"t": {"command": ["true"], "timeoutSeconds": "1h"}}, "tasks.t.timeoutSeconds"),
                         ("ok quiet", "tasks"), ({"t": None}, "tasks.t"), ({"t": 5}, "tasks.t"),
                         ({"t": {"command": ["true"], "priority": "high"}}, "tasks.t.priority"),
                         ({"t": {"command": ["true"], "retries": []}}, "tasks.t.retries"),
                         ({"t": {"command": "true"}}, "tasks.t.command"),
                         ({"t": {"steps": [{"name": "a"}]}}, "tasks.t.steps[0].command")):
        config["tasks"] = tasks
        config_path.write_text(json.dumps(config))
        result = device.spos("action", "run", "--root", device.root, "--agent", device.agent, "--task", "t")
        assert result.code == 1 and f"`{field}`" in result.err, (tasks, result.err)
        assert "run spos apply to repair it" in result.err
    assert not list((device.agent_dir() / "queue").iterdir())


def test_what_apply_writes_at_the_edges_of_the_schema_runs(device):
    """Durations of 0 (none) and whole numbers written as 2.0 are what apply writes for valid
    manifests: the executor's own check of agent.json takes them."""
    device.apply({"edge": {"steps": [{"name": "a", "command": sh("true"), "timeout": "0ms"}],
                           "timeout": "0s", "priority": 60.0,
                           "retries": {"limit": 2.0, "nonRetryableExitCodes": [2.0]}}},
                 quota={"tasksMax": 64.0, "nice": 5.0}, cgroups=True)
    run_id = device.enqueue("edge")
    device.once()
    assert device.record(run_id)["state"] == "completed"


def test_a_run_of_a_removed_agent_or_task_fails_with_a_clear_reason(device):
    gone = device.other()
    device.apply({"t": {"command": sh("true")}, "doomed": {"command": sh("true")}},
                 others={gone: {"t": {"command": sh("true")}}})
    orphan = device.enqueue("t", agent=gone)
    unknown = device.enqueue("doomed")
    (device.agent_dir(gone) / "agent.json").unlink()
    device.apply({"t": {"command": sh("true")}}, others={})  # `doomed` is no more
    fine = device.enqueue("t")

    device.once()

    record = device.record(orphan)
    assert record["state"] == "failed" and "not applied" in record["reason"], record
    assert "not applied" in device.log(orphan, gone)
    record = device.record(unknown)
    assert record["state"] == "failed" and "has no task 'doomed'" in record["reason"], record
    assert "has no task" in device.log(unknown)
    assert device.record(fine)["state"] == "completed"


def test_a_run_whose_sandbox_cannot_start_fails_and_others_go_on(device):
    device.apply({"broken": {"command": ["/usr/bin/no-such-program-here"]}, "fine": {"command": sh("true")}})
    broken, fine = device.enqueue("broken"), device.enqueue("fine")
    device.once()
    record = device.record(broken)
    assert record["state"] == "failed" and "could not start" in record["reason"], record
    assert record["reason"] in device.log(broken)
    assert device.record(fine)["state"] == "completed"


def test_a_queue_file_of_the_wrong_shape_is_set_aside_with_its_reason(device):
    device.apply({"t": {"command": sh("true")}})
    queue, failed = device.agent_dir() / "queue", device.agent_dir() / "failed"
    wrong = {  # file name -> (content, the field its reason names)
        "000-00000000000000000001-20260101T000000-0000000a.json":
            ({"id": "20260101T000000-0000000a", "task": "t", "notBefore": "soon"}, "notBefore"),
        "000-00000000000000000002-20260101T000000-0000000b.json":
            ({"id": "20260101T000000-0000000b", "task": ["t"]}, "task"),
        "000-00000000000000000003-20260101T000000-0000000c.json":
            ({"id": "20260101T000000-0000000c", "task": "t", "attempt": "one"}, "attempt"),
        "000-00000000000000000004-20260101T000000-0000000d.json":
            ({"id": "../../../../../../tmp/escape", "task": "t"}, "id"),
        "000-00000000000000000005-20260101T000000-0000000e.json":
            ({"id": "20260101T000000-0000000e", "task": "t",
              "attachments": {"../../escape": "eA=="}}, "attachments"),
        "000-00000000000000000006-20260101T000000-0000000f.json":
            ({"id": "20260101T000000-0000000f", "task": "t",
              "attachments": {"payload": "not base64!"}}, "attachments.payload"),
        "000-00000000000000000007-20260101T000000-0000000g.json":
            ({"id": "20260101T000000-0000000g", "task": "t",
              "attachments": {"a\u0000b": "eA=="}}, "attachments"),
        "000-00000000000000000010-20260101T000000-0000000j.json":
            ({"id": "20260101T000000-0000000j", "task": "t", "attempts": [1, "a"]}, "attempts"),
        "000-00000000000000000011-20260101T000000-0000000k.json":
            ({"id": "20260101T000000-0000000k", "task": "t", "concurrency": "Bogus"}, "concurrency"),
        "000-00000000000000000012-20260101T000000-0000000l.json":
            ({"id": "20260101T000000-0000000l", "task": "t", "source": "x"}, "source"),
    }
    for name, (content, _) in wrong.items():
        (queue / name).write_text(json.dumps(content))
    fine = device.enqueue("t")
    for command in (("list", "--json"), ("list",), ("history", "--json")):
        result = device.spos("action", *command, "--root", device.root)
        assert result.code == 0 and (fine in result.out or command[0] == "history"), (command, result.err)

    device.once()

    for name, (_, field) in wrong.items():
        assert (failed / f"{name}.corrupt").exists(), name
        assert f"`{field}`" in (failed / f"{name}.corrupt.reason").read_text(), name
        run_id = name[25:-5]
        assert "set aside" in device.log(run_id) and f"`{field}`" in device.log(run_id)
    run_id = "20260101T000000-0000000j"  # what the commands say of one
    shown = device.spos("action", "show", run_id, "--root", device.root)
    assert shown.code == 1 and f"run {run_id!r} of {device.agent} was set aside" in shown.err
    assert "`attempts` must be a list of objects" in shown.err
    logs = device.spos("action", "logs", run_id, "--root", device.root)
    assert logs.code == 0 and "set aside" in logs.out and "`attempts`" in logs.out
    assert not list(queue.iterdir())
    assert device.record(fine)["state"] == "completed"


def test_fields_only_shown_may_hold_anything_and_the_read_commands_show_it(device):
    """Records written by hand: what the executor does not rely on is shown as it is, and
    `--json` stays strict JSON (no NaN)."""
    device.apply({"t": {"command": sh("true")}})
    completed = device.agent_dir() / "completed"
    completed.mkdir(exist_ok=True)
    odd = {"20260101T000000-0000000a": {"reason": {"a": 1}, "endedAt": 5, "priority": float("nan"),
                                        "exitCode": "3", "usage": [1], "stepsDone": ["one"]},
           "20260101T000000-0000000b": {"reason": "fine", "endedAt": "2026-01-01T00:00:01.000+00:00"}}
    for number, (run_id, fields) in enumerate(odd.items()):
        (completed / f"050-{number:020d}-{run_id}.json").write_text(
            json.dumps({"id": run_id, "task": "t", "state": "completed", **fields}))
    for command in (("list", "--json"), ("history", "--json"), ("show", "20260101T000000-0000000a", "--json")):
        result = device.spos("action", *command, "--root", device.root)
        assert result.code == 0, (command, result.err)
        json.loads(result.out, parse_constant=lambda name: pytest.fail(f"{name} in {command}"))
    listed = device.spos("action", "list", "--root", device.root)
    assert listed.code == 0 and '{"a": 1}' in listed.out
    history = json.loads(device.spos("action", "history", "--json", "--root", device.root).out)
    assert [row["id"] for row in history] == ["20260101T000000-0000000b", "20260101T000000-0000000a"]
    shown = device.spos("action", "show", "20260101T000000-0000000a", "--root", device.root)
    assert shown.code == 0 and "steps done: one" in shown.out


def test_a_full_disk_fails_the_run_and_other_work_goes_on(device):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "spos-test-full", str(device.root)], check=True)
    try:
        other = device.other()
        device.apply({"flood": {"command": sh("head -c 8000000 /dev/zero | tr '\\0' x")}},
                     others={other: {"t": {"command": sh("echo fine")}}})
        flood = device.enqueue("flood", "--priority", "90")
        fine = device.enqueue("t", "--priority", "10", agent=other)
        device.once()  # exits 0: the executor went on
        record = device.record(flood)
        assert record["state"] == "failed", record
        assert record["reason"] == "its log could not be written: No space left on device", record
        assert device.record(fine)["state"] == "completed"
        assert "fine" in device.log(fine, other)
        assert not run_cgroup_dirs(device.agent, flood)  # its processes were stopped
        assert not list((device.agent_dir() / "active").iterdir())  # its reserve was given back

        # with room to enqueue but not to set aside what recording a run's end needs, a run
        # waits in the queue; it starts once the operator made room
        filler = device.root / "filler"
        space = os.statvfs(device.root)
        filler.write_bytes(b"\0" * max(0, space.f_bavail * space.f_frsize - 16 * 1024))
        waiting = device.enqueue("t", agent=other)
        daemon = device.daemon("--rescan", "60s")
        time.sleep(1)
        assert device.record(waiting)["state"] == "queued"
        filler.unlink()
        (device.agent_dir() / "logs" / f"{flood}.log").unlink()
        assert device.wait_state(waiting, "completed", "failed", timeout=8)["state"] == "completed"
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(device.root)], check=False)


def test_an_end_the_file_system_refuses_is_written_once_it_can_be(device):
    other = device.other()
    device.apply({"t": {"command": sh("echo up > $SPOS_OUTPUT_DIR/up; sleep 2; exit 3")}},
                 others={other: {"t": {"command": sh("echo fine")}}})
    run_id = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.output("up").exists(), "the run to start")
    failed = device.agent_dir() / "failed"
    failed.mkdir(mode=0o750, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "spos-test-ro", str(failed)], check=True)
    try:
        # the end cannot be written to failed/: the run stays in active/, its processes stopped
        wait_for(lambda: "run failed: step main exited with 3" in device.log(run_id), "the run to end")
        assert device.record(run_id)["state"] == "active"
        assert not run_cgroup_dirs(device.agent, run_id)
        # and the executor goes on with other work
        fine = device.enqueue("t", agent=other)
        assert device.wait_state(fine, "completed", "failed")["state"] == "completed"
        assert device.record(run_id)["state"] == "active"
    finally:
        subprocess.run(["umount", "-l", str(failed)], check=False)
    record = device.wait_state(run_id, "failed", timeout=8)
    assert record["exitCode"] == 3 and record["reason"] == "step main exited with 3", record
    assert not list((device.agent_dir() / "active").iterdir())
    assert daemon.stop() == 0


def test_enqueueing_an_unknown_agent_or_task_is_refused(device, spos):
    device.apply({"t": {"command": sh("true")}})
    result = spos("action", "run", "--root", device.root, "--agent", device.agent, "--task", "nope")
    assert result.code == 1 and "no task 'nope'" in result.err
    result = spos("action", "run", "--root", device.root, "--agent", "nobody", "--task", "t")
    assert result.code == 1 and "'nobody' is not applied" in result.err


def test_a_long_lived_enqueuer_sees_every_change_to_agent_json(device):
    """The trigger daemon and the executor keep what an unchanged agent.json parsed to; a
    changed one is read afresh however it changed (here to the same length, with its
    modification time put back): a task broken by hand is refused from the next enqueue on,
    and accepted again once repaired."""
    from reconciler.device import Device
    from reconciler.executor.config import ConfigError
    from reconciler.executor.enqueue import enqueue

    device.apply({"t": {"command": sh("true"), "priority": 60}})
    host = Device(device.root)
    config = device.agent_dir() / "agent.json"
    good, times = config.read_bytes(), os.stat(config)
    bad = good.replace(b'"priority": 60', b'"priority": ""')
    assert len(bad) == len(good) and bad != good

    assert enqueue(host, device.agent, "t")["priority"] == 60
    config.write_bytes(bad)
    os.utime(config, ns=(times.st_atime_ns, times.st_mtime_ns))
    with pytest.raises(ConfigError, match="priority"):
        enqueue(host, device.agent, "t")
    config.write_bytes(good)
    assert enqueue(host, device.agent, "t")["priority"] == 60


def test_an_agent_config_nested_too_deeply_to_parse_is_not_valid_json(device, spos):
    """agent.json damaged into JSON nested deeper than the parser goes reads as any config that
    is not JSON: enqueueing is refused, and the executor fails the agent's queued run and goes
    on, instead of stopping at a RecursionError."""
    device.apply({"t": {"command": sh("true")}})
    run_id = device.enqueue("t")
    config = device.agent_dir() / "agent.json"
    config.write_text('{"tasks": ' * 100000)

    result = spos("action", "run", "--root", device.root, "--agent", device.agent, "--task", "t")
    assert result.code == 1 and f"{device.agent}/agent.json is not valid JSON" in result.err, result.err

    device.once()
    record = device.record(run_id)
    assert record["state"] == "failed" and "agent.json is not valid JSON" in record["reason"], record

    result = spos("action", "cleanup", "--root", device.root, "--agent", device.agent)
    assert result.code == 1 and "agent.json is not valid JSON" in result.err, result.err


@pytest.mark.parametrize("now", [0.0, 1.0005, 1795746584.4834995, 1795746584.4835005,
                                 1795746599.9999996, 1795746584.0009999, 4102444799.999])
@pytest.mark.parametrize("deadline", [None, 0.0, 600.0, 0.0004, 86399.9996])
def test_queue_times_are_what_datetime_writes(now, deadline):
    """enqueuedAt and notAfter are written without importing datetime (cron's start-up), and
    read back by everything that parses them with it: the same text, to the millisecond."""
    from datetime import datetime, timedelta, timezone

    from reconciler.executor.enqueue import _microseconds, utc_timestamp

    enqueued = datetime.fromtimestamp(now, timezone.utc)
    assert utc_timestamp(_microseconds(now)) == enqueued.isoformat(timespec="milliseconds")
    if deadline is not None:
        expected = (enqueued + timedelta(seconds=deadline)).isoformat(timespec="milliseconds")
        assert utc_timestamp(_microseconds(now) + _microseconds(deadline)) == expected


def test_action_execute_exits_with_the_actions_exit_code(device):
    device.apply({"ok": {"command": sh("echo fine")}, "bad": {"command": sh("exit 7")}})

    def execute(task):
        return subprocess.run(
            [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
             "--agent", device.agent, "--task", task, "--grace", "1s"],
            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )

    assert execute("ok").returncode == 0
    result = execute("bad")
    assert result.returncode == 7, result.stderr
    run_id = result.stderr.split()[1]
    record = device.record(run_id)
    assert record["state"] == "failed" and record["exitCode"] == 7
    assert record["source"] == {"kind": "execute"}


def test_show_of_an_unknown_run_fails_clearly(device):
    result = device.spos("action", "show", "20990101T000000-deadbeef", "--root", device.root)
    assert result.code == 1 and "no run '20990101T000000-deadbeef'" in result.err
    result = device.spos("action", "logs", "20990101T000000-deadbeef", "--root", device.root)
    assert result.code == 1 and "no run" in result.err


def test_logs_follow_streams_until_the_run_ends(device):
    device.apply({"t": {"command": sh("echo first-line; sleep 1; echo second-line")}})
    run_id = device.enqueue("t")
    follower = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "logs", run_id, "-f", "--root", str(device.root)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: dict[str, float] = {}

    def read():
        for line in follower.stdout:
            for word in ("first-line", "second-line"):
                if line.strip() == word:
                    seen[word] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    daemon = device.daemon("--rescan", "60s")
    try:
        device.wait_state(run_id, "completed")
        assert follower.wait(5) == 0  # it stops by itself once the run ended
    finally:
        if follower.poll() is None:
            follower.kill()
    reader.join(5)
    assert set(seen) == {"first-line", "second-line"}
    assert seen["second-line"] - seen["first-line"] > 0.5  # streamed as written, not at the end
    assert daemon.stop() == 0


# -- the daemon -----------------------------------------------------------------------------------


def test_sigterm_drains_active_runs_and_starts_no_new_one(device):
    device.apply({
        "long": {"command": sh("echo begin > $SPOS_OUTPUT_DIR/begin; sleep 1.5; echo end > $SPOS_OUTPUT_DIR/end")},
        "quick": {"command": sh("echo ran > $SPOS_OUTPUT_DIR/quick")},
    })
    first = device.enqueue("long")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.output("begin").exists(), "the run to start")

    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    second = device.enqueue("quick")
    assert daemon.process.wait(8) == 0, daemon.stderr()

    assert device.record(first)["state"] == "completed"
    assert device.output("end").exists()
    later = device.record(second)
    assert later["state"] == "queued" and "startedAt" not in later
    assert not device.output("quick").exists()


def test_an_idle_executor_uses_no_cpu_and_stops_at_once_on_sigterm(device):
    device.apply({"t": {"command": sh("true")}})
    daemon = device.daemon("--rescan", "60s")
    device.wait_ready(daemon)
    process = psutil.Process(daemon.pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(3)
    used = sum(process.cpu_times()[:2]) - before
    assert used < 0.05, f"idle executor used {used:.3f}s of CPU in 3s"

    stopped = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - stopped < 2.0


def test_what_is_written_to_a_log_before_it_is_opened_comes_first_in_it(tmp_path):
    """A run's first step is worked out before its log is made when a prepared sandbox takes
    it (what the network rules could not resolve is said then): those lines are kept and
    come first in the log, before the run's output."""
    from reconciler.device import Device as Root
    from reconciler.executor.supervise import LogWriter

    (tmp_path / "logs").mkdir()
    log = LogWriter(Root(str(tmp_path)), "/logs/r.log", 4096)
    log.write(b"--- spos: denied host bad.example did not resolve\n")
    assert not (tmp_path / "logs" / "r.log").exists()
    log.open()
    log.write(b"output\n")
    log.close()
    assert (tmp_path / "logs" / "r.log").read_bytes() == (
        b"--- spos: denied host bad.example did not resolve\noutput\n")


def test_the_log_is_rotated_at_the_quota_log_size_and_followed_across(device):
    script = (
        "i=0; while [ $i -lt 96 ]; do echo \"line $i of a chatty task ..........................\"; "
        "i=$((i+1)); if [ $((i % 12)) = 0 ]; then sleep 0.15; fi; done\n"
        "head -c 6000 /dev/zero | tr '\\0' x; echo\n"            # one write bigger than the limit
        "echo last-line\n"
    )
    device.apply({"chatty": {"command": sh(script)}}, quota={"storage": {"log": "2K"}})
    run_id = device.enqueue("chatty")
    follower = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "logs", run_id, "-f", "--root", str(device.root)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    daemon = device.daemon("--rescan", "60s")
    try:
        assert device.wait_state(run_id, "completed", "failed")["state"] == "completed"
        followed, _ = follower.communicate(timeout=5)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert daemon.stop() == 0

    log = device.agent_dir() / "logs" / f"{run_id}.log"
    rotated = log.with_name(log.name + ".1")
    assert rotated.exists()
    assert log.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
    assert "last-line" in rotated.read_text() + log.read_text()
    assert "run completed" in log.read_text()
    # `logs -f` went on with each new log file: every line written at a human pace was seen, in order
    numbered = [line.split()[1] for line in followed.splitlines() if line.startswith("line ")]
    assert numbered == [str(i) for i in range(96)]
    assert "last-line" in followed and "run completed" in followed


# Storage quotas

def test_a_run_writing_past_the_output_quota_is_stopped_and_fails(device):
    device.apply({"fill": {"command": ["/bin/sh", "-c",
                                       'while true; do head -c 200000 /dev/zero >> "$SPOS_OUTPUT_DIR/fill"; '
                                       "sleep 0.2; done"],
                           "timeout": "60s"}},
                 quota={"storage": {"output": "1M"}})
    run_id = device.enqueue("fill")
    started = time.monotonic()
    device.once(timeout=40)
    record = device.wait_state(run_id, "failed")
    assert record["reason"].startswith("output storage quota exceeded: output/ uses ")
    assert record["reason"].endswith("of 1M")
    assert time.monotonic() - started < 30  # stopped on a measure, not by its timeout
    assert not run_cgroup_dirs(device.agent, run_id)


def test_an_agent_over_its_output_quota_gets_no_new_run(device):
    device.apply({"ok": {"command": ["/bin/true"]}}, quota={"storage": {"output": "100K"}})
    output = device.agent_dir() / "output"
    output.mkdir(parents=True, exist_ok=True)
    (output / "left-over").write_bytes(os.urandom(300_000))
    run_id = device.enqueue("ok")
    device.once()
    record = device.wait_state(run_id, "failed")
    assert record["reason"].startswith("could not start: output storage quota exceeded")
    assert "could not start: output storage quota exceeded" in device.log(run_id)


def test_concurrency_queue_runs_one_after_the_other(device):
    device.apply({"t": {"command": sh("echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/started; sleep 1"),
                        "concurrency": "Queue"}})
    first, second = device.enqueue("t"), device.enqueue("t")
    device.once()
    (first_start, first_end), (second_start, _) = _intervals(device, [first, second])
    assert second_start >= first_end
    assert device.lines("started") == [first, second]


def test_a_run_can_carry_its_own_concurrency(device):
    # The task allows overlap; runs queued with --concurrency Queue (a trigger's or a
    # schedule's choice) wait for each other all the same.
    device.apply({"t": {"command": sh("sleep 1"), "concurrency": "Allow"}})
    first = device.enqueue("t", "--concurrency", "Queue")
    second = device.enqueue("t", "--concurrency", "Queue")
    assert device.record(second)["concurrency"] == "Queue"
    device.once()
    (_, first_end), (second_start, _) = _intervals(device, [first, second])
    assert second_start >= first_end


def _execute(device, task: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device.root),
         "--agent", device.agent, "--task", task, "--grace", "1s"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("policy", ["Forbid", "Queue", "Replace"])
def test_action_execute_honours_concurrency(device, policy):
    # What a systemd service runs meets a run of the executor as the task's concurrency says.
    script = "trap 'exit 143' TERM; echo $SPOS_RUN_ID >> $SPOS_OUTPUT_DIR/started; sleep 1.5 & wait"
    device.apply({"t": {"command": sh(script), "concurrency": policy, "timeout": "30s"}})
    first = device.enqueue("t")
    daemon = device.daemon("--rescan", "60s")
    wait_for(lambda: device.lines("started") == [first], "the executor's run to start")
    foreground = _execute(device, "t")
    try:
        _, err = foreground.communicate(timeout=WAIT)
    finally:
        if foreground.poll() is None:
            foreground.kill()
    executed = err.split()[1]
    ours, theirs = device.record(executed), device.wait_state(first, "completed", "failed", "cancelled")
    if policy == "Forbid":
        assert foreground.returncode == 1 and ours["state"] == "skipped", ours
        assert first in ours["reason"] and device.lines("started") == [first]
        assert theirs["state"] == "completed"
    elif policy == "Queue":
        assert foreground.returncode == 0 and ours["state"] == "completed", ours
        assert theirs["state"] == "completed"
        assert when(ours["startedAt"]) >= when(theirs["endedAt"])
    else:
        assert foreground.returncode == 0 and ours["state"] == "completed", ours
        assert theirs["state"] == "cancelled" and f"replaced by run {executed}" in theirs["reason"]
        assert when(ours["startedAt"]) >= when(theirs["endedAt"])
    assert device.lines("started") == ([first] if policy == "Forbid" else [first, executed])
    assert daemon.stop() == 0
