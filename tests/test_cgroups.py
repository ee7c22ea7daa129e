"""Agents' cgroups on a real cgroup file system (kinds/cgroup.py), as root.

Each test applies manifests to a temporary device root with `--cgroup-root /sys/fs/cgroup`, so
the agents' cgroups are real (below this root's own parent, `spos-<hash>`), and checks what the
kernel holds and enforces: limits written, read back, repaired after a hand edit; a memory hog
in an agent's cgroup killed alone; forks capped; a cgroup with a live process kept until it
ends; nothing outside spos's parent touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from textwrap import dedent

import pytest

from reconciler.device import Device

CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_SECONDS = 20


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "cgroups need root"
    if not all((CGROUP_ROOT / c / "cgroup.procs").exists() for c in ("memory", "cpu", "pids")):
        return "these tests read cgroup v1 files (memory, cpu, pids hierarchies)"
    return None


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "")

MANIFESTS = """\
apiVersion: spos/v1
kind: Quota
metadata: {name: small}
spec: {cpu: "50%", memory: 64M, tasksMax: 16}
---
apiVersion: spos/v1
kind: Agent
metadata: {name: alpha}
spec:
  quota: small
  tasks:
    ping:
      command: ["/bin/true"]
---
apiVersion: spos/v1
kind: Agent
metadata: {name: beta}
spec:
  tasks:
    ping:
      command: ["/bin/true"]
"""


@pytest.fixture
def device(tmp_path):
    """A device root whose agents' cgroups are real; its cgroup parent is removed afterwards,
    processes left in it killed."""
    root = tmp_path / "device"
    root.mkdir()
    parent = Device(root).cgroups.parent
    yield root
    for top in [CGROUP_ROOT / parent, *CGROUP_ROOT.glob(f"*/{parent}")]:  # every hierarchy:
        if not top.is_dir():  # the executor's runs also make freezer and devices cgroups
            continue
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
            for pid in Path(directory, "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            for _ in range(100):
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    time.sleep(0.05)


@pytest.fixture
def manifests(tmp_path):
    directory = tmp_path / "agents.d"
    directory.mkdir()
    (directory / "agents.yaml").write_text(MANIFESTS)
    return directory


def spos_apply(spos, manifests, root, *extra):
    return spos("apply", manifests, "--root", root, "--cgroup-root", CGROUP_ROOT, "--auto-approve", *extra)


def cgroup(root: Path, controller: str, *below: str) -> Path:
    return CGROUP_ROOT / controller / Device(root).cgroups.parent / Path(*below)


def test_apply_writes_each_agents_quota_into_its_cgroup(spos, manifests, device):
    result = spos_apply(spos, manifests, device)
    assert result.code == 0, result.err
    assert (cgroup(device, "memory", "alpha") / "memory.limit_in_bytes").read_text().strip() == "64000000"
    assert (cgroup(device, "cpu", "alpha") / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cgroup(device, "pids", "alpha") / "pids.max").read_text().strip() == "16"
    # an agent without a Quota is grouped too, without limits
    assert (cgroup(device, "pids", "beta") / "pids.max").read_text().strip() == "max"
    plan = spos("plan", manifests, "--root", device, "--cgroup-root", CGROUP_ROOT, "--detailed-exitcode")
    assert plan.code == 0, plan.out


def test_a_limit_changed_by_hand_is_drift_and_apply_repairs_it(spos, manifests, device):
    assert spos_apply(spos, manifests, device).code == 0
    (cgroup(device, "memory", "alpha") / "memory.limit_in_bytes").write_text("1073741824")

    plan = spos("plan", manifests, "--root", device, "--cgroup-root", CGROUP_ROOT)
    assert "~   cgroup/alpha  (changed on the device (drift))" in plan.out
    assert 'memory: "1073741824" -> "64000000"' in plan.out
    assert spos_apply(spos, manifests, device).code == 0
    assert (cgroup(device, "memory", "alpha") / "memory.limit_in_bytes").read_text().strip() == "64000000"


def _run_in(root: Path, agent: str, code: str) -> subprocess.Popen:
    """A process placed (before it runs `code`) in a run cgroup below the agent's, as the
    executor places its runs."""
    paths = [cgroup(root, c, agent, "run-1") for c in ("memory", "cpu", "pids")]
    for path in paths:
        path.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for path in paths:
        (path / "cgroup.procs").write_text(str(process.pid))
    process.stdin.write(b"go\n")
    process.stdin.flush()
    return process


def test_a_memory_hog_in_an_agents_cgroup_is_killed_alone(spos, manifests, device):
    assert spos_apply(spos, manifests, device).code == 0
    hog = _run_in(device, "alpha", "blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))")
    hog.wait(WAIT_SECONDS)
    assert hog.returncode == -signal.SIGKILL
    assert int((cgroup(device, "memory", "alpha") / "memory.failcnt").read_text()) > 0


def test_the_agents_tasks_limit_caps_forks(spos, manifests, device):
    assert spos_apply(spos, manifests, device).code == 0
    forker = _run_in(device, "alpha", dedent("""\
        import os, time
        children, refused = [], 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            children.append(pid)
        print(len(children), refused)
        for pid in children:
            os.waitpid(pid, 0)
    """))
    out, err = forker.communicate(timeout=WAIT_SECONDS)
    started, refused = map(int, out.split())
    assert started <= 15 and refused >= 25, (out, err)


def test_a_cgroup_with_a_live_process_is_kept_until_it_ends(spos, manifests, device, tmp_path):
    assert spos_apply(spos, manifests, device).code == 0
    sleeper = _run_in(device, "alpha", "import time; time.sleep(60)")
    (manifests / "agents.yaml").write_text(MANIFESTS.split("---\napiVersion: spos/v1\nkind: Agent\nmetadata: {name: alpha}")[0]
                                           + "---\n" + MANIFESTS.rsplit("---\n", 1)[1])
    try:
        plan = spos("plan", manifests, "--root", device, "--cgroup-root", CGROUP_ROOT)
        assert "-   cgroup/alpha  (no longer in the manifests; 1 live process in it: apply keeps it " \
               "until that ends)" in plan.out
        result = spos_apply(spos, manifests, device)
        assert result.code == 1
        assert "still has processes (a run going on); it is kept" in result.out + result.err
        assert cgroup(device, "memory", "alpha").is_dir()
        assert sleeper.poll() is None, "apply must not kill the run"
    finally:
        sleeper.kill()
        sleeper.wait()
    os.rmdir(cgroup(device, "memory", "alpha", "run-1"))  # what the executor does at a run's end
    for controller in ("cpu", "pids"):
        os.rmdir(cgroup(device, controller, "alpha", "run-1"))
    assert spos_apply(spos, manifests, device).code == 0
    assert not cgroup(device, "memory", "alpha").exists()


def test_nothing_outside_spos_parent_is_touched(spos, manifests, device, tmp_path):
    foreign = CGROUP_ROOT / "memory" / f"not-spos-{os.getpid()}"
    foreign.mkdir()
    try:
        assert spos_apply(spos, manifests, device).code == 0
        empty = tmp_path / "empty"
        empty.mkdir()
        assert spos_apply(spos, empty, device, "--allow-empty").code == 0
        assert foreign.is_dir()
        assert not cgroup(device, "memory").exists(), "the root's own parent goes with its last agent"
    finally:
        foreign.rmdir()


def test_the_executor_runs_an_agents_actions_inside_its_cgroup(spos, tmp_path, device):
    manifests = tmp_path / "sleepy.d"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(dedent("""\
        apiVersion: spos/v1
        kind: Quota
        metadata: {name: small}
        spec: {memory: 96M}
        ---
        apiVersion: spos/v1
        kind: Capability
        metadata: {name: sleeper}
        spec:
          allowed:
            execute: [/bin/sleep]
        ---
        apiVersion: spos/v1
        kind: Agent
        metadata: {name: alpha}
        spec:
          quota: small
          capability: sleeper
          tasks:
            nap:
              command: ["/bin/sleep", "3"]
    """))
    assert spos_apply(spos, manifests, device).code == 0
    agent = cgroup(device, "memory", "alpha")
    execute = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "action", "execute", "--root", str(device),
         "--agent", "alpha", "--task", "nap"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        runs: list[Path] = []
        while time.monotonic() < deadline and not runs:
            runs = [d for d in agent.iterdir() if d.is_dir() and (d / "cgroup.procs").read_text().split()]
            time.sleep(0.05)
        assert runs, "the run's processes were never seen below the agent's cgroup"
        assert (agent / "memory.limit_in_bytes").read_text().strip() == "95997952"  # 96M in pages
    finally:
        execute.wait(WAIT_SECONDS)
    assert execute.returncode == 0, execute.stderr.decode()
    assert not [d for d in agent.iterdir() if d.is_dir()], "the run's cgroup is removed at its end"
