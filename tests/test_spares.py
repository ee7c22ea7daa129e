"""An ended run's cgroup is kept for its agent's next run, which is limited and counted exactly
as in a new one; spares never outlive their executor.

Real sandboxed runs (bubblewrap, the real /sys/fs/cgroup v1 hierarchies) under a per-session
parent `spos-test-spares-<pid>/<agent>`, removed at the end. Needs root, bubblewrap and cgroup
v1 (spares are kept on v1 only): otherwise every test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from sandboxes import reap_cgroups, remove_cgroup_tree, sandbox_missing

from reconciler.executor import owner, spares
from reconciler.executor.cgroup import Cgroups, DeviceRule, Limits
from reconciler.executor.sandbox import Sandbox, SandboxSpec
from reconciler.executor.spares import SpareCgroups

pytestmark = pytest.mark.root

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT = f"spos-test-spares-{os.getpid()}"
AGENT = f"{PARENT}/probe"
PYTHON = "/usr/bin/python3"
WAIT_SECONDS = 20


def _why_not() -> str | None:
    missing = sandbox_missing()
    if missing:
        return missing
    if Cgroups(CGROUP_ROOT).version != 1:
        return "spare cgroups are kept on cgroup v1 only"
    if not Path(PYTHON).exists():
        return f"{PYTHON} is needed to write probe actions"
    return None


_SKIP = _why_not()
if _SKIP:
    pytestmark = [pytest.mark.root, pytest.mark.skip(reason=_SKIP)]


@pytest.fixture(scope="module", autouse=True)
def _parent_cgroup():
    yield
    reap_cgroups(AGENT, CGROUP_ROOT)
    remove_cgroup_tree(PARENT, CGROUP_ROOT)


@pytest.fixture
def sandbox():
    sandbox = Sandbox(cgroup_root=CGROUP_ROOT)
    sandbox.spares = SpareCgroups(sandbox.cgroups, per_agent=2, total=4)
    yield sandbox
    sandbox.spares.close()


def run(sandbox: Sandbox, tmp_path: Path, script: str, limits: Limits = Limits(),
        devices: tuple[str, ...] = ()):
    """Run a Python script to its end in a sandbox of the probe agent; returns (exit code,
    usage, OOM killed?, inode of the run's memory cgroup while it ran)."""
    name = f"{AGENT}/{uuid.uuid4().hex[:12]}"
    spec = SandboxSpec(argv=[PYTHON, "-S", "-c", script], env={}, execute=(PYTHON,),
                       limits=limits, devices=devices, cgroup_name=name)
    with open(tmp_path / f"out-{uuid.uuid4().hex[:8]}", "w+b") as output:
        process = sandbox.spawn(spec, stdout=output.fileno(), stderr=output.fileno())
        inode = os.stat(f"{CGROUP_ROOT}/memory/{name}").st_ino
        code = process.wait(timeout=WAIT_SECONDS)
        process.settle()
        usage, oom = process.usage(), process.oom_killed()
        devices_list = Path(f"{CGROUP_ROOT}/devices/{name}/devices.list").read_text()
        limit = int(Path(f"{CGROUP_ROOT}/memory/{name}/memory.limit_in_bytes").read_text())
        process.cleanup()
    assert not Path(f"{CGROUP_ROOT}/memory/{name}").exists()  # kept under another name
    return code, usage, oom, inode, devices_list, limit


def spare_names() -> list[str]:
    return sorted(d.name for d in Path(f"{CGROUP_ROOT}/memory/{AGENT}").iterdir() if d.is_dir())


BUSY = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n" \
       "block = bytearray(48 << 20)\nfor i in range(0, len(block), 4096): block[i] = 1\n"
IDLE = "pass"
HOG = "blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))\n    blocks[-1][::4096] = b'x' * (len(blocks[-1]) // 4096)\n"


def test_the_next_run_of_the_agent_gets_the_emptied_cgroup_of_the_last(sandbox, tmp_path):
    first = run(sandbox, tmp_path, IDLE)
    assert [name.startswith(spares.PREFIX) for name in spare_names()] == [True]
    second = run(sandbox, tmp_path, IDLE)
    assert (first[0], second[0]) == (0, 0)
    assert second[3] == first[3]  # the same cgroup, renamed: no new one made, none removed


def test_a_run_in_a_reused_cgroup_is_counted_from_its_own_start(sandbox, tmp_path):
    code, heavy, *_ = run(sandbox, tmp_path, BUSY)
    assert code == 0 and heavy["cpuSeconds"] >= 0.4 and heavy["peakMemoryBytes"] >= 48 << 20
    code, light, _, _, _, _ = run(sandbox, tmp_path, IDLE)
    assert code == 0
    assert light["cpuSeconds"] < 0.3
    assert light["peakMemoryBytes"] < 40 << 20  # the first run's 48 MiB are not counted again


def test_an_oom_kill_of_one_run_is_not_the_next_ones(sandbox, tmp_path):
    code, _, oom, *_ = run(sandbox, tmp_path, HOG, Limits(memory_bytes=64 << 20))
    assert code != 0 and oom
    code, _, oom, *_ = run(sandbox, tmp_path, IDLE, Limits(memory_bytes=64 << 20))
    assert code == 0 and not oom


def test_a_reused_cgroup_gets_the_limits_and_devices_of_its_new_run(sandbox, tmp_path):
    *_, first_inode, first_devices, first_limit = run(sandbox, tmp_path, IDLE, Limits(memory_bytes=96 << 20))
    assert first_limit == 96 << 20 and "c 1:3 rwm" in first_devices and "c 4:1" not in first_devices
    code, _, oom, inode, devices, limit = run(
        sandbox, tmp_path, "bytearray(60 << 20)", Limits(memory_bytes=48 << 20), devices=("/dev/tty1",))
    assert inode == first_inode
    assert limit == 48 << 20 and "c 4:1 rwm" in devices
    assert code != 0 and oom  # 60 MiB under the new 48 MiB limit


def test_at_most_per_agent_spares_are_kept_and_the_rest_removed(sandbox, tmp_path):
    processes = []
    for _ in range(3):  # three runs of the agent at once: three cgroups
        name = f"{AGENT}/{uuid.uuid4().hex[:12]}"
        spec = SandboxSpec(argv=[PYTHON, "-S", "-c", IDLE], env={}, execute=(PYTHON,), cgroup_name=name)
        processes.append(sandbox.spawn(spec, stdout=2, stderr=2))
    for process in processes:
        process.wait(timeout=WAIT_SECONDS)
        process.cleanup()
    assert len(spare_names()) == 2
    sandbox.spares.close()
    assert spare_names() == []


def test_a_spare_that_was_removed_meanwhile_is_replaced_by_a_new_cgroup(sandbox, tmp_path):
    run(sandbox, tmp_path, IDLE)
    [spare] = spare_names()
    sandbox.cgroups.existing(f"{AGENT}/{spare}").remove()  # the agent's removal, say
    code, *_ = run(sandbox, tmp_path, IDLE)
    assert code == 0


def test_a_cgroup_with_a_process_left_is_not_kept(sandbox):
    name = f"{AGENT}/{uuid.uuid4().hex[:12]}"
    cgroup = sandbox.cgroups.create(name, Limits(), ())
    sleeper = __import__("subprocess").Popen(["sleep", "30"])
    try:
        Path(f"{CGROUP_ROOT}/memory/{name}/cgroup.procs").write_text(str(sleeper.pid))
        assert not sandbox.spares.keep(cgroup)
        assert Path(f"{CGROUP_ROOT}/memory/{name}").is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
        cgroup.remove()


def test_the_spares_of_an_executor_that_died_are_removed_by_the_next(tmp_path):
    cgroups = Cgroups(CGROUP_ROOT)
    dead = f"{AGENT}/{spares.PREFIX}999999999-12345-abcd0123"
    alive = f"{AGENT}/{spares.PREFIX}{owner.tag()}-abcd0123"
    for name in (dead, alive):
        cgroups.create(name, Limits(), (DeviceRule("c", 1, 3),))
    try:
        spares.sweep(cgroups, PARENT, "probe")
        assert not cgroups.existing(dead).exists()
        assert cgroups.existing(alive).exists()  # this process still lives
    finally:
        for name in (dead, alive):
            cgroups.existing(name).remove()


def test_no_memory_cgroup_is_left_dying_by_runs_that_keep_files(sandbox, tmp_path):
    """What the spares are for: each run here leaves a file whose page cache is charged to its
    cgroup. A removed cgroup would linger in the kernel as long as that cache lives."""
    kept = tmp_path / "kept"
    kept.mkdir()
    write = f"open({str(kept / '{}')!r}.format(__import__('uuid').uuid4().hex), 'wb').write(b'x' * (256 << 10))"
    before = _memory_cgroups()
    for _ in range(20):
        name = f"{AGENT}/{uuid.uuid4().hex[:12]}"
        spec = SandboxSpec(argv=[PYTHON, "-S", "-c", write], env={}, execute=(PYTHON,),
                           write=(str(kept),), cgroup_name=name)
        process = sandbox.spawn(spec, stdout=2, stderr=2)
        assert process.wait(timeout=WAIT_SECONDS) == 0
        process.cleanup()
    assert len(list(kept.iterdir())) == 20
    assert _memory_cgroups() - before <= 3  # the agent's spare (and the parents), not 20
    shutil.rmtree(kept)


def _memory_cgroups() -> int:
    for line in Path("/proc/cgroups").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "memory":
            return int(fields[2])
    raise AssertionError("no memory controller in /proc/cgroups")
