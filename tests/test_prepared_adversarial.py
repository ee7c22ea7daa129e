"""Prepared sandboxes and the compiled launcher under pressure: what a run in a prepared sandbox
may do to its siblings, what is left behind when a prepared sandbox is closed, refused or its
run's arguments do not fit, and where launch.c and _launch.py must agree.

Apart from the pool's own bookkeeping (checked with a stand-in sandbox), every test uses the
real parts (bubblewrap, Landlock, cgroups under /sys/fs/cgroup, the real executor as a
subprocess); cgroups live under a per-session parent `spos-adv-<pid>` (sandbox tests) or the
executor's own (executor tests) and are removed; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from sandboxes import reap_cgroups, sandbox_missing
from test_executor import Device, device, run_cgroup_dirs, sh, wait_for  # noqa: F401 (device: a fixture)
from test_sandbox import BOTH_LAUNCHERS, CGROUP_ROOT, PYTHON, SH, launcher, sandbox_with  # noqa: F401 (launcher: a fixture)

from reconciler.executor import prepared as prepared_module
from reconciler.executor.prepared import PreparedPool
from reconciler.executor.sandbox import Sandbox, SandboxError, SandboxSpec

pytestmark = [pytest.mark.slow, pytest.mark.root]
_SKIP = sandbox_missing()
if _SKIP:
    pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.skip(reason=_SKIP)]

PARENT = f"spos-adv-{os.getpid()}"
AGENT_DIR = "/var/lib/systemprompt-os/agents/probe"
OUTPUT = f"{AGENT_DIR}/output"
WAIT_SECONDS = 20
EXECUTABLES = (SH, PYTHON, "/usr/bin/touch", "/usr/bin/id", "/usr/bin/env", "/usr/bin/sleep",
               "/usr/bin/cat", "/usr/bin/grep")


@pytest.fixture(scope="module", autouse=True)
def _parent_cgroup():
    """Remove the session's cgroups, those a failed test left behind included."""
    yield
    reap_cgroups(PARENT, str(CGROUP_ROOT))


@pytest.fixture
def box_root(tmp_path) -> Path:
    root = tmp_path / "device"
    (root / OUTPUT.lstrip("/")).mkdir(parents=True)
    return root


@pytest.fixture
def box(box_root, launcher) -> Sandbox:
    return sandbox_with(box_root, launcher)


class Runs:
    """Specs of an agent's runs (per-run tmp and checkpoint directories, as the executor makes
    them), prepared sandboxes and runs; everything is closed and cleaned up at the end."""

    def __init__(self, sandbox: Sandbox, root: Path, tmp_path: Path):
        self.sandbox = sandbox
        self.root = root
        self.tmp_path = tmp_path
        self.slots = []
        self.runs = []

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def spec(self, run_id: str, argv, **fields) -> SandboxSpec:
        tmp, checkpoint = f"{AGENT_DIR}/tmp/{run_id}", f"{AGENT_DIR}/checkpoints/{run_id}"
        for path in (tmp, checkpoint):
            self.host(path).mkdir(parents=True, exist_ok=True)
        values = dict(env={"PATH": "/usr/bin:/bin", "SPOS_RUN_ID": run_id}, cwd=tmp,
                      write=(OUTPUT, checkpoint, tmp), per_run=(checkpoint, tmp),
                      execute=EXECUTABLES, cgroup_name=f"{PARENT}/{run_id}")
        values.update(fields)
        return SandboxSpec(argv=list(argv), **values)

    def output(self):
        return open(self.tmp_path / f"out-{uuid.uuid4().hex[:8]}", "w+b")

    def prepare(self, earlier: str = "r-first", **fields):
        if not self.sandbox.launcher:
            pytest.skip("only the compiled launcher mounts a run's directories into a prepared "
                        "sandbox; with _launch.py every run gets a sandbox of its own")
        output = self.output()
        slot = self.sandbox.prepare(self.spec(earlier, ["/bin/true"], **fields),
                                    f"{PARENT}/warm-{uuid.uuid4().hex[:8]}",
                                    stdout=output.fileno(), stderr=output.fileno())
        self.slots.append(slot)
        return slot, output

    def wait_waiting(self, slot) -> None:
        """Until bubblewrap, its init and the launcher are in the prepared sandbox's cgroup."""
        procs = CGROUP_ROOT / "pids" / slot._cgroup.name / "cgroup.procs"
        deadline = time.monotonic() + WAIT_SECONDS
        while len(procs.read_text().split()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)

    def spawn(self, spec: SandboxSpec):
        output = self.output()
        run = self.sandbox.spawn(spec, stdout=output.fileno(), stderr=output.fileno())
        self.runs.append(run)
        return run, output

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
        for run in self.runs:
            run.cleanup()


@pytest.fixture
def runs(box, box_root, tmp_path):
    made = Runs(box, box_root, tmp_path)
    yield made
    made.close()


def _text(output) -> str:
    output.seek(0)
    return output.read().decode(errors="replace")


def _cgroup_children() -> set[str]:
    return {d.name for d in CGROUP_ROOT.glob(f"*/{PARENT}/*") if d.is_dir()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- what a run in a prepared sandbox may do to its siblings -------------------------------------

SPOIL = """
import os, sys
agent = sys.argv[1]
for name, change in (
        ("chmod_sibling_tmp", lambda: os.chmod(f"{agent}/tmp/r-first", 0)),
        ("chmod_all_tmp", lambda: os.chmod(f"{agent}/tmp", 0)),
        ("chmod_sibling_checkpoint", lambda: os.chmod(f"{agent}/checkpoints/r-first", 0o777)),
        ("utime_sibling_checkpoint", lambda: os.utime(f"{agent}/checkpoints/r-first", (0, 0)))):
    try:
        change()
        print(name, "changed")
    except OSError as exc:
        print(name, "refused", exc.errno)
"""


@BOTH_LAUNCHERS
@pytest.mark.parametrize("how", ["fresh", "prepared"])
def test_a_run_cannot_change_the_mode_or_times_of_its_siblings_directories(runs, how):
    """What a run may do is the same in a prepared sandbox as in a fresh one (docs/sandbox.md):
    neither may chmod or touch another run's tmp or checkpoint directory, or the agent's tmp
    directory that holds them all (a mode of 0 there keeps every later run out of its cwd)."""
    runs.spec("r-first", ["/bin/true"])  # the sibling's directories exist, as they would
    spec = runs.spec("r-second", [PYTHON, "-c", SPOIL, AGENT_DIR])
    tmp_parent = runs.host(f"{AGENT_DIR}/tmp")
    sibling_tmp = runs.host(f"{AGENT_DIR}/tmp/r-first")
    sibling_checkpoint = runs.host(f"{AGENT_DIR}/checkpoints/r-first")
    before = {p: (p.stat().st_mode, p.stat().st_mtime) for p in (tmp_parent, sibling_tmp,
                                                                  sibling_checkpoint)}
    try:
        if how == "prepared":
            slot, output = runs.prepare()
            runs.wait_waiting(slot)
            run = slot.start(spec)
            runs.runs.append(run)
        else:
            run, output = runs.spawn(spec)
        assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
        out = _text(output)
        after = {p: (p.stat().st_mode, p.stat().st_mtime) for p in before}
    finally:
        for path, (mode, _) in before.items():
            os.chmod(path, mode & 0o7777)  # whatever happened, leave the tree removable
    assert "changed" not in out, out
    assert after == before


# -- a run's arguments bigger than the pipe -------------------------------------------------------

@BOTH_LAUNCHERS
def test_a_run_whose_arguments_do_not_fit_is_refused_and_nothing_of_it_runs(runs):
    """start() either hands the whole run over or refuses it (SandboxError: the executor then
    closes the prepared sandbox and starts the run afresh). A refused run must not execute,
    let alone with part of its argv: the executor would run it a second time, in full."""
    marker = runs.host(f"{OUTPUT}/ran")
    argv = [SH, "-c", f'echo "args=$#" > {OUTPUT}/ran', "sh", *["x" * 99] * 800]  # ~80 KiB
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    try:
        run = slot.start(runs.spec("r-big", argv))
    except SandboxError:
        deadline = time.monotonic() + 2
        while slot._process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the launcher read what it was given, then ran it or gave up
        assert not marker.exists(), (f"a refused run executed: {marker.read_text().strip()} "
                                     f"of 804 arguments")
    else:
        runs.runs.append(run)
        assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
        assert marker.read_text() == "args=800\n"


# -- a run held until its executor lets it start -------------------------------------------------

def test_a_held_run_starts_only_when_released_and_sees_what_was_made_meanwhile(runs):
    """start(hold=True): the launcher sets the run up and waits before its action, while the
    executor writes the run's log and attachments; the action starts at release(), and
    finds the files made in its own directories in between."""
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    spec = runs.spec("r-held", [SH, "-c", f"cat attachment > {OUTPUT}/seen"])
    run = slot.start(spec, hold=True)
    runs.runs.append(run)
    assert (CGROUP_ROOT / "pids" / spec.cgroup_name).is_dir()  # under the run's name already
    time.sleep(0.3)
    assert run.poll() is None and not runs.host(f"{OUTPUT}/seen").exists()
    runs.host(f"{AGENT_DIR}/tmp/r-held/attachment").write_text("made meanwhile\n")
    run.release()
    assert run.wait(timeout=WAIT_SECONDS) == 0 and run.setup_error() is None, _text(output)
    assert runs.host(f"{OUTPUT}/seen").read_text() == "made meanwhile\n"


@pytest.mark.parametrize("how", ["withdraw", "cleanup"])
def test_a_held_run_withdrawn_never_starts_and_leaves_nothing(runs, how):
    """A held run the executor gives up on (its log or attachments could not be written)
    ends without its action ever running, quietly, and its cleanup leaves no process and
    no cgroup."""
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    spec = runs.spec(f"r-{how}", [SH, "-c", f"touch {OUTPUT}/started"])
    run = slot.start(spec, hold=True)
    runs.runs.append(run)
    if how == "withdraw":
        run.withdraw()
        assert run.wait(timeout=WAIT_SECONDS) == 126
    run.cleanup()
    assert not runs.host(f"{OUTPUT}/started").exists()
    assert not (CGROUP_ROOT / "pids" / spec.cgroup_name).exists()
    assert not _alive(run.pid)
    assert _text(output) == ""


def test_the_go_of_a_run_that_is_not_held_comes_with_its_arguments(runs):
    """Without hold, start() sends the go with the arguments: the run needs nothing more."""
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    run = slot.start(runs.spec("r-go", [SH, "-c", f"touch {OUTPUT}/started"]))
    runs.runs.append(run)
    assert not run.held
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    assert runs.host(f"{OUTPUT}/started").exists()


# -- a prepared sandbox whose run directories' parents were replaced ------------------------------

def test_a_prepared_sandbox_whose_run_directories_were_made_again_starts_the_run_or_refuses(runs):
    """When the agent's tmp and checkpoints directories were removed and made again after the
    sandbox was prepared (the agent pruned and applied again, say), its binds show the old,
    deleted directories. start() must then refuse (the executor starts the run afresh), not
    hand over a run that cannot even enter its working directory."""
    slot, _ = runs.prepare()
    runs.wait_waiting(slot)
    for name in ("tmp", "checkpoints"):
        directory = runs.host(f"{AGENT_DIR}/{name}")
        subprocess.run(["rm", "-rf", str(directory)], check=True)
        directory.mkdir()
    spec = runs.spec("r-after", [SH, "-c", f"pwd > {OUTPUT}/pwd"])
    try:
        run = slot.start(spec)
    except SandboxError:
        return  # refused: the executor closes it and starts the run in a new sandbox
    runs.runs.append(run)
    assert run.wait(timeout=WAIT_SECONDS) == 0 and run.setup_error() is None, run.setup_error()
    assert runs.host(f"{OUTPUT}/pwd").read_text() == f"{AGENT_DIR}/tmp/r-after\n"


# -- nothing of a prepared sandbox is left behind ------------------------------------------------

def test_closing_right_after_prepare_leaves_no_process_or_cgroup(runs):
    """close() may come before the forked child even joined its cgroup: it still ends every
    process of the prepared sandbox and removes its cgroup, promptly."""
    for _ in range(10):
        slot, _ = runs.prepare()
        pid = slot.pid
        started = time.monotonic()
        slot.close()
        assert time.monotonic() - started < 5
        assert not _alive(pid)
    assert not _cgroup_children()


def test_a_run_handed_over_right_after_prepare_runs(runs):
    """start() may come before bubblewrap has even been executed: the run's arguments wait in
    the pipe, the cgroup renamed under the child's feet still holds every process of the run."""
    for index in range(5):
        slot, output = runs.prepare()
        run_id = f"r-quick-{index}"
        run = slot.start(runs.spec(run_id, ["/usr/bin/sleep", "0.5"]))
        runs.runs.append(run)
        procs = CGROUP_ROOT / "pids" / PARENT / run_id / "cgroup.procs"
        deadline = time.monotonic() + WAIT_SECONDS
        while len(procs.read_text().split()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # bubblewrap, its init and the action, all under the run's name
        assert len(procs.read_text().split()) == 3
        assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
        run.cleanup()
    assert not _cgroup_children()


def test_a_retry_of_the_same_run_takes_a_prepared_sandbox_over_its_empty_leftover_cgroup(runs):
    """A retry has its run's id, so its cgroup's name: an empty cgroup of that name left by the
    earlier attempt is replaced when the prepared sandbox's cgroup is renamed to it."""
    first, _ = runs.spawn(runs.spec("r-again", ["/bin/true"]))
    assert first.wait(timeout=WAIT_SECONDS) == 0
    first.settle()
    for directory in CGROUP_ROOT.glob(f"*/{PARENT}/r-again"):
        assert not (directory / "cgroup.procs").read_text().split()
    slot, output = runs.prepare()
    run = slot.start(runs.spec("r-again", [SH, "-c", "echo attempt 2"]))
    runs.runs.append(run)
    assert run.wait(timeout=WAIT_SECONDS) == 0 and "attempt 2" in _text(output)
    run.cleanup()
    first.cleanup()
    assert not _cgroup_children()


def test_a_prepared_sandbox_is_not_renamed_onto_a_cgroup_that_holds_processes(runs):
    """Two runs never share a cgroup: start() refuses while a cgroup of the run's name holds
    processes, and the refused prepared sandbox still closes cleanly."""
    busy, _ = runs.spawn(runs.spec("r-busy", ["/usr/bin/sleep", "30"]))
    deadline = time.monotonic() + WAIT_SECONDS
    procs = CGROUP_ROOT / "pids" / PARENT / "r-busy" / "cgroup.procs"
    while not procs.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.01)
    slot, _ = runs.prepare()
    with pytest.raises(SandboxError):
        slot.start(runs.spec("r-busy", ["/bin/true"]))
    pid = slot.pid
    slot.close()
    assert not _alive(pid)
    assert procs.read_text().split()  # the running one is untouched
    busy.kill_all()
    busy.cleanup()
    assert not _cgroup_children()


# -- the launcher's contract: launch.c and _launch.py alike ---------------------------------------

def _launch(sandbox: Sandbox, *, uid="0", gid="0", groups="", env=None,
            argv=("/usr/bin/id", "-u")) -> subprocess.CompletedProcess:
    """Run the launcher directly with hand-made arguments (no Landlock: ABI 0)."""
    env = ["PATH=/usr/bin:/bin"] if env is None else env
    setup_read, setup_write = os.pipe()
    items = [str(setup_write), uid, gid, groups, "", "/", "0", *["0"] * 7, str(len(env)), *env,
             "--", *argv]
    items = [str(len(items)), *items]  # the count in front, as Sandbox._launcher_args writes
    try:
        with tempfile.TemporaryFile() as args:
            args.write(b"".join(item.encode() + b"\0" for item in items))
            args.seek(0)
            command = ([sandbox.launcher] if sandbox.launcher else
                       [sandbox.python, "-I", "-S", "-c", sandbox._launcher_source])
            return subprocess.run([*command, str(args.fileno())],
                                  pass_fds=(args.fileno(), setup_write), capture_output=True,
                                  text=True, timeout=WAIT_SECONDS)
    finally:
        os.close(setup_read)
        os.close(setup_write)


@BOTH_LAUNCHERS
def test_an_environment_item_without_an_equals_sign_is_refused(box):
    """`KEY=VALUE` items only: anything else is malformed (refused with 126), as _launch.py does,
    never handed to the action as a broken environment."""
    done = _launch(box, env=["PATH=/usr/bin:/bin", "NOT-AN-ASSIGNMENT"], argv=["/usr/bin/env"])
    assert done.returncode == 126, done
    assert "malformed" in done.stderr and "NOT-AN-ASSIGNMENT" not in done.stdout, done


@BOTH_LAUNCHERS
def test_a_uid_beyond_the_range_of_uids_never_runs_the_action_as_root(box):
    """A uid that does not fit uid_t is an error, not uid 0 (2**32 truncated)."""
    done = _launch(box, uid=str(1 << 32), gid=str(65534))
    assert done.returncode == 126, done
    assert done.stdout.strip() != "0", f"the action ran as root: {done}"


@BOTH_LAUNCHERS
def test_a_user_in_many_groups_can_run(box):
    """getgrouplist may give hundreds of groups (NGROUPS_MAX is 65536): the run starts with all
    of them, whichever launcher the installation has."""
    groups = ",".join(str(g) for g in [65534, *range(20000, 20300)])
    done = _launch(box, uid="65534", gid="65534", groups=groups, argv=["/usr/bin/id", "-G"])
    assert done.returncode == 0, done
    assert len(done.stdout.split()) == 301, done


@BOTH_LAUNCHERS
def test_a_signal_the_executor_ignores_is_not_ignored_in_the_action(runs):
    """An executor started under nohup (SIGHUP ignored), or in the background of a script
    (SIGINT and SIGQUIT ignored), passes ignored dispositions through fork and exec: the action
    must still start with default handling of every signal."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGQUIT)}
    try:
        run, output = runs.spawn(runs.spec("r-sig", [SH, "-c", "grep SigIgn /proc/self/status"]))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert run.wait(timeout=WAIT_SECONDS) == 0
    ignored = int(_text(output).split()[-1], 16)
    assert ignored == 0, f"ignored signals in the action: {ignored:#x}"


# -- the executor's pool of prepared sandboxes ---------------------------------------------------

class _StubPrepared:
    def __init__(self, name):
        self.name = name
        self.closed = False

    def matches(self, spec):
        return not self.closed

    def close(self):
        self.closed = True


class _StubSandbox:
    """Stands in for Sandbox in the pool's own bookkeeping."""

    def __init__(self):
        self.prepared = []

    def unpreparable(self, spec):
        return None

    def prepare(self, spec, name, **_):
        self.prepared.append(_StubPrepared(name))
        return self.prepared[-1]


def test_the_pool_keeps_its_sandboxes_for_the_agents_that_ran_most_recently():
    """`--prepared N` keeps a sandbox for each of the N agents that ran most recently
    (docs/executor.md, docs/sandbox.md): when another agent runs, its next run gets the
    sandbox, not an agent that last ran long ago."""
    pool = PreparedPool(_StubSandbox(), "spos", limit=1, idle=600)
    spec = object()
    try:
        pool.want("old", spec)
        assert pool.fill(lambda agent: True).agent == "old"
        pool.want("recent", spec)  # a run of "recent" started and ended since
        while pool.pending(lambda agent: True):
            pool.fill(lambda agent: True)
        assert set(pool.slots) == {"recent"}
    finally:
        pool.close()


def test_sweep_leaves_the_prepared_sandboxes_of_a_live_executor_alone(runs, monkeypatch):
    """The next executor removes only cgroups of prepared sandboxes whose executor is gone."""
    slot, _ = runs.prepare()
    runs.wait_waiting(slot)
    owner = prepared_module.identity()
    mine = f"{PARENT}/agent/{prepared_module.PREFIX}{owner['pid']}-{owner['startTicks']}-abcd"
    gone = f"{PARENT}/agent/{prepared_module.PREFIX}1-1-abcd"
    from reconciler.executor.cgroup import Limits
    for name in (mine, gone):
        runs.sandbox.cgroups.create(name, Limits(), ())
    try:
        prepared_module.sweep(runs.sandbox, PARENT, "agent")
        remaining = set(runs.sandbox.cgroups.children(f"{PARENT}/agent"))
        assert remaining == {mine.rsplit("/", 1)[1]}
    finally:
        for name in (mine, gone):
            runs.sandbox.reap(name)
        for directory in CGROUP_ROOT.glob(f"*/{PARENT}/agent"):
            directory.rmdir()


# -- the executor ----------------------------------------------------------------------------------

REPORT = 'echo "$SPOS_RUN_ID" >> $SPOS_OUTPUT_DIR/seen; touch $TMPDIR/mark $SPOS_CHECKPOINT_DIR/mark'


def prepared_cgroups(device: Device) -> list:
    return [p for d in run_cgroup_dirs(device.agent) for p in d.glob("warm-*")]


def prepared_names(device: Device) -> set[str]:
    return {p.name for p in prepared_cgroups(device)}


def run_and_wait(device: Device, task: str = "report") -> tuple[str, dict]:
    run_id = device.enqueue(task)
    return run_id, device.wait_state(run_id, "completed", "failed", "timeout", "cancelled", "skipped")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_one_run_in_a_prepared_sandbox_cannot_keep_the_agents_later_runs_out(device):
    """A run may not change the directories the executor makes for the agent's other runs:
    after one that tried to make the agent's tmp and checkpoints directories unreachable (it
    found a prepared sandbox), the agent's next run still completes."""
    spoil = 'chmod 0 "$TMPDIR/.." "$SPOS_CHECKPOINT_DIR/.."; echo "chmod=$?" >> $SPOS_OUTPUT_DIR/spoil'
    device.apply({"report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"},
                  "spoil": {"command": sh(spoil), "timeout": "30s", "concurrency": "Allow"}})
    agent_dir = device.agent_dir()
    daemon = device.daemon()

    def modes() -> dict:
        return {name: (agent_dir / name).stat().st_mode & 0o7777 for name in ("tmp", "checkpoints")}

    try:
        device.wait_ready(daemon)
        first, record = run_and_wait(device)
        assert record["state"] == "completed", device.log(first)
        made = modes()
        wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")
        spoiler, _ = run_and_wait(device, "spoil")
        assert "(prepared sandbox)" in device.log(spoiler)
        spoiled = modes()
        third, record = run_and_wait(device)
        assert record["state"] == "completed", device.log(third)
        assert device.output("spoil").read_text().strip() != "chmod=0"
        assert spoiled == made
        assert daemon.stop() == 0
    finally:
        for name in ("tmp", "checkpoints"):
            os.chmod(agent_dir / name, 0o750)


def test_a_run_after_its_agent_was_pruned_and_applied_again_completes(device):
    """Pruning an agent removes its empty tmp and checkpoints directories, and applying it again
    makes new ones. A sandbox prepared before that binds the old, deleted ones: the agent's
    next run must not fail for it (it starts in a new sandbox, or in one that sees its
    directories)."""
    device.apply({"report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"}})
    manifests = device.tmp_path / "agents.d" / "agents.yaml"
    applied = manifests.read_text()
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(first)
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")

    manifests.write_text("\n".join(line for line in applied.splitlines()
                                   if '"kind": "Agent"' not in line) + "\n")
    device.spos("apply", manifests.parent, "--root", device.root, "--auto-approve")
    assert not (device.agent_dir() / "tmp").exists()  # pruned (its cgroup may wait for the runs)
    manifests.write_text(applied)
    result = device.spos("apply", manifests.parent, "--root", device.root, "--auto-approve")
    assert (device.agent_dir() / "tmp").is_dir(), result.err + result.out

    second, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(second)
    assert daemon.stop() == 0


def test_the_executor_holds_no_more_fds_after_many_runs_of_every_ending(device):
    """Runs that complete, fail to start, time out or are cancelled, in prepared sandboxes or
    new ones (another shape), leave no fd behind in the executor: counted in /proc at the same
    point (the agent idle, one sandbox prepared) before and after."""
    tasks = {
        "report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"},
        "missing": {"command": ["/usr/bin/no-such-program"], "timeout": "30s", "concurrency": "Allow"},
        "slow": {"command": sh("sleep 86411"), "timeout": "1s", "concurrency": "Allow"},
        "long": {"command": sh("echo up > $SPOS_OUTPUT_DIR/up; sleep 86412"), "timeout": "30s",
                 "concurrency": "Allow"},
    }
    device.apply(tasks)
    daemon = device.daemon()
    device.wait_ready(daemon)

    def settled_count() -> int:
        wait_for(lambda: len(prepared_names(device)) == 1, "one sandbox prepared")
        time.sleep(0.3)
        return open_fds(daemon.pid)

    run_id, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(run_id)
    before = settled_count()
    for _ in range(3):
        for task in ("report", "missing", "slow"):
            run_and_wait(device, task)
        output_up = device.output("up")
        output_up.unlink(missing_ok=True)
        long_run = device.enqueue("long")
        wait_for(output_up.exists, "the long run to start")
        assert device.spos("action", "cancel", long_run, "--root", device.root).code == 0
        device.wait_state(long_run, "cancelled", "failed", "completed")
    for memory in ("200M", "256M"):  # another shape: the prepared sandbox is closed, not used
        device.apply(tasks, quota={"memory": memory})
        run_id, record = run_and_wait(device)
        assert record["state"] == "completed" and "(prepared" not in device.log(run_id)
    after = settled_count()
    assert after == before, f"{after - before} more fds in the executor"
    assert daemon.stop() == 0
    assert not prepared_cgroups(device)


def test_a_multi_step_run_finds_each_step_in_a_sandbox_of_its_own(device):
    """A prepared sandbox is used once: the first step of a run may take it, every later step
    starts in a new one, and each step sees the run's own directories."""
    step = 'echo "$SPOS_STEP $(pwd)" >> $SPOS_OUTPUT_DIR/steps; touch $SPOS_CHECKPOINT_DIR/$SPOS_STEP'
    device.apply({"t": {"timeout": "30s", "concurrency": "Allow", "steps": [
        {"name": "one", "command": sh(step)}, {"name": "two", "command": sh(step)},
        {"name": "three", "command": sh(step)}]}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device, "t")
    assert record["state"] == "completed", device.log(first)
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")
    second, record = run_and_wait(device, "t")
    assert record["state"] == "completed", device.log(second)
    assert device.log(second).count("(prepared sandbox)") == 1
    tmp = f"/var/lib/systemprompt-os/agents/{device.agent}/tmp/{second}"
    assert device.output("steps").read_text().splitlines()[3:] == [
        f"{name} {tmp}" for name in ("one", "two", "three")]
    assert daemon.stop() == 0
    assert not prepared_cgroups(device)


def test_forbid_skips_a_second_run_while_the_first_runs_in_the_prepared_sandbox(device):
    """Concurrency Forbid is the same whether the active run found a prepared sandbox or not;
    the skipped run never takes the sandbox prepared for the agent."""
    device.apply({"t": {"command": sh("echo up >> $SPOS_OUTPUT_DIR/up; sleep 2"), "timeout": "30s",
                        "concurrency": "Forbid"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device, "t")
    assert record["state"] == "completed"
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")
    second = device.enqueue("t")
    wait_for(lambda: len(device.lines("up")) == 2, "the second run to start")
    third, record = run_and_wait(device, "t")
    assert record["state"] == "skipped", record
    assert device.wait_state(second, "completed")["state"] == "completed"
    assert "(prepared sandbox)" in device.log(second)
    assert daemon.stop() == 0
    assert not prepared_cgroups(device)
