"""`spos action resources` shows each agent's usage next to its Quota (reconciler/resources.py).

Two agents are applied to a temporary root whose cgroup file system is made of plain files
(as in tests/cases/cgroup/): `alpha`, with a Quota, gets usage written into its cgroup's files,
files in its tmp/ and output/ and run records in every bucket; `beta`, without a Quota, gets
nothing. What cannot be measured is null in JSON and "-" in the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconciler.cgroupfs import parent_for

AGENTS = "var/lib/systemprompt-os/agents"
MANIFESTS = """\
apiVersion: spos/v1
kind: Quota
metadata: {name: small}
spec: {cpu: "50%", memory: 1G, tasksMax: 64, storage: {temp: 1M, output: 2M}}
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
NOTHING = {
    "agent": "beta",
    "cpu": {"seconds": None, "limitPercent": None},
    "memory": {"bytes": None, "peakBytes": None, "limitBytes": None, "percent": None},
    "tasks": {"count": None, "limit": None, "percent": None},
    "io": {"readBytes": None, "writeBytes": None},
    "storage": {"temp": {"bytes": 0, "limitBytes": None, "percent": None},
                "output": {"bytes": 0, "limitBytes": None, "percent": None}},
    "runs": {"queued": 0, "active": 0, "completed": 0, "failed": 0},
    "byTask": [],
}


@pytest.fixture
def applied(spos, tmp_path) -> tuple[Path, Path]:
    """(device root, cgroup root): both agents applied to a v1 tree of plain files."""
    root, cgroups, manifests = tmp_path / "device", tmp_path / "cgroup", tmp_path / "agents.d"
    root.mkdir()
    manifests.mkdir()
    (manifests / "agents.yaml").write_text(MANIFESTS)
    for controller in ("memory", "cpu", "cpuacct", "pids", "blkio"):
        (cgroups / controller).mkdir(parents=True)
        (cgroups / controller / "cgroup.procs").write_text("")
    result = spos("apply", manifests, "--root", root, "--auto-approve", "--cgroup-root", cgroups)
    assert result.code == 0, result.err
    return root, cgroups


def _used(root: Path, cgroups: Path) -> None:
    """alpha's usage: its cgroup's counters, its storage and one run in each state."""
    cgroup = f"{parent_for(str(root))}/alpha"
    for file, value in {"cpuacct/cpuacct.usage": "1500000000", "memory/memory.usage_in_bytes": "250000000",
                        "memory/memory.max_usage_in_bytes": "400000000", "pids/pids.current": "16",
                        "blkio/blkio.throttle.io_service_bytes_recursive":
                            "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\nTotal 12288\n"}.items():
        controller, _, name = file.partition("/")
        (cgroups / controller / cgroup).mkdir(parents=True, exist_ok=True)
        (cgroups / controller / cgroup / name).write_text(value + "\n")
    agent = root / AGENTS / "alpha"
    for directory, size in (("tmp", 300_000), ("output", 50_000)):
        (agent / directory).mkdir(parents=True, exist_ok=True)
        (agent / directory / "data.bin").write_bytes(b"x" * size)
    for serial, (bucket, state) in enumerate([("queue", None), ("queue", None), ("active", "active"),
                                              ("completed", "completed"), ("failed", "failed"),
                                              ("failed", "timeout")]):
        _run(agent, serial, bucket, state)


def _run(agent: Path, serial: int, bucket: str, state: str | None) -> None:
    run_id = f"20261126T090000-{serial:08x}"
    record = {"format": 1, "id": run_id, "agent": agent.name, "task": "ping", "priority": 50,
              "enqueuedAt": "2026-11-26T09:00:00.000+00:00", "notAfter": None,
              "source": {"kind": "schedule", "name": "daily"}, "attempt": 1}
    if state is not None:
        record["state"] = state
    (agent / bucket).mkdir(parents=True, exist_ok=True)
    (agent / bucket / f"050-{serial:020d}-{run_id}.json").write_text(json.dumps(record))


def _allocated(directory: Path) -> int:
    """What `du` counts: the blocks of the directory's entries (they depend on the file system)."""
    return sum(os.lstat(Path(top, name)).st_blocks * 512
               for top, directories, files in os.walk(directory) for name in directories + files)


def _resources(spos, root: Path, cgroups: Path | None = None) -> dict:
    result = spos("action", "resources", "--root", root, "--json",
                  *(["--cgroup-root", cgroups] if cgroups else []))
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_an_agent_with_everything_measured_shows_usage_against_its_quota(spos, applied):
    root, cgroups = applied
    _used(root, cgroups)
    temp, output = _allocated(root / AGENTS / "alpha/tmp"), _allocated(root / AGENTS / "alpha/output")

    report = _resources(spos, root, cgroups)

    assert report["cgroupVersion"] == 1
    assert report["agents"][0] == {
        "agent": "alpha",
        "cgroup": f"{parent_for(str(root))}/alpha",
        "cpu": {"seconds": 1.5, "limitPercent": 50.0},
        "memory": {"bytes": 250_000_000, "peakBytes": 400_000_000, "limitBytes": 1_000_000_000,
                   "percent": 25.0},
        "tasks": {"count": 16, "limit": 64, "percent": 25.0},
        "io": {"readBytes": 4096, "writeBytes": 8192},
        "storage": {"temp": {"bytes": temp, "limitBytes": 1_000_000,
                             "percent": round(temp * 100 / 1_000_000, 1)},
                    "output": {"bytes": output, "limitBytes": 2_000_000,
                               "percent": round(output * 100 / 2_000_000, 1)}},
        "runs": {"queued": 2, "active": 1, "completed": 1, "failed": 2},
        "byTask": [{"task": "ping", "completed": 1, "failed": 2, "slowdown": None,
                    "failedShare": 2 / 3, "flags": ["failing often"]}],
    }


def test_an_agent_with_nothing_measurable_shows_nulls(spos, applied):
    root, cgroups = applied

    report = _resources(spos, root, cgroups)

    assert report["agents"][1] == {**NOTHING, "cgroup": f"{parent_for(str(root))}/beta"}


def test_without_a_cgroup_file_system_the_cgroup_values_are_null(spos, applied):
    root, _ = applied

    report = _resources(spos, root)  # the default, ROOT/sys/fs/cgroup, does not exist

    assert report["cgroupVersion"] is None
    assert report["agents"][1] == {**NOTHING, "cgroup": None}
    assert report["agents"][0]["cpu"] == {"seconds": None, "limitPercent": 50.0}
    assert report["agents"][0]["tasks"] == {"count": None, "limit": 64, "percent": None}


def test_cgroup_v2_counters_are_read_from_the_unified_tree(spos, tmp_path):
    root, cgroups, manifests = tmp_path / "device", tmp_path / "cgroup", tmp_path / "agents.d"
    root.mkdir()
    manifests.mkdir()
    (manifests / "agents.yaml").write_text(MANIFESTS)
    cgroups.mkdir()
    (cgroups / "cgroup.controllers").write_text("cpu memory pids io\n")
    (cgroups / "cgroup.procs").write_text("")
    assert spos("apply", manifests, "--root", root, "--auto-approve", "--cgroup-root", cgroups).code == 0
    alpha = cgroups / parent_for(str(root)) / "alpha"
    for name, value in {"cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n", "memory.current": "500000000",
                        "memory.peak": "600000000", "pids.current": "3",
                        "io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2\n"}.items():
        (alpha / name).write_text(value + "\n")

    agent = _resources(spos, root, cgroups)["agents"][0]

    assert (agent["cpu"], agent["memory"], agent["tasks"], agent["io"]) == (
        {"seconds": 2.5, "limitPercent": 50.0},
        {"bytes": 500_000_000, "peakBytes": 600_000_000, "limitBytes": 1_000_000_000, "percent": 50.0},
        {"count": 3, "limit": 64, "percent": 4.7},
        {"readBytes": 100, "writeBytes": 200},
    )


def test_the_table_has_a_row_per_agent_with_dashes_for_what_is_unknown(spos, applied):
    root, cgroups = applied
    _used(root, cgroups)

    result = spos("action", "resources", "--root", root, "--cgroup-root", cgroups)

    assert result.code == 0, result.err
    header, alpha, beta = result.out.splitlines()
    assert header.split() == ["AGENT", "CPU", "MEMORY", "PEAK", "TASKS", "IO", "READ/WRITE", "TEMP",
                              "OUTPUT", "RUNS", "Q/A/C/F", "FLAGGED"]
    assert alpha.startswith("alpha")
    assert "1.5s / 50%" in alpha and "250M / 1G (25%)" in alpha and "16 / 64 (25%)" in alpha
    assert alpha.split()[-4:] == ["2/1/1/2", "ping:", "failing", "often"]
    assert beta.split() == ["beta", "-", "/", "-", "-", "/", "-", "-", "-", "/", "-", "-", "/", "-",
                            "0B", "/", "-", "0B", "/", "-", "0/0/0/0"]
