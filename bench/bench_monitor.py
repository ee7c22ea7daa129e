#!/usr/bin/env python3
"""How long `spos action monitor` and `spos action watch` take to look at a busy device.

    python3 bench/bench_monitor.py [--agents 50] [--finished 10000] [--active 200] [--queued 1000]
                                   [--repeat 50] [--rate 500] [--seconds 5] [--json FILE]
                                   [--keep] [--workdir DIR]

It builds a device root of N agents holding F finished runs (nine in ten completed, the rest
failed), A active runs (each with progress, owned by this process, and with its own cgroup in
a v1 tree of plain files giving its CPU time and memory) and Q queued runs, spread evenly over
the agents. Then, in this process, with the code of this checkout:

- snapshot      `monitor.snapshot()` of the whole device: what `action monitor --json` and
                every refresh of `--live` compute.
- text          `monitor.text()` of that snapshot: the one-shot table.
- live refresh  a snapshot and its live view drawn by rich into a 160x50 terminal (a buffer,
                with colour): one refresh of `action monitor --live`.
- watch look    one look of `action watch` at one agent (`Follower.poll`) with nothing new.
- command       `python -m reconciler action monitor --json` as a whole process (start-up,
                imports, snapshot, printing), from spawning to its exit.

Then again for --seconds while loader processes enqueue runs at --rate a second in all with
the real `enqueue()` (round robin over their share of the agents; each enqueue fsyncs, so one
loader does at most LOADER_RATE a second) and finish as many (a rename of the oldest of their
queued runs of that agent into completed/, as an executor would end it): a watch look of one
agent every 0.2 s, as `action watch` looks, and a live refresh every second, the default
`--interval`. It reports how long those took, the rates the loaders reached, and whether watch
told every run of its agent that was queued and ended meanwhile.

Median, 95th percentile (nearest rank) and maximum in milliseconds. Benchmarks print numbers
and assert nothing. Standard library, rich, and this checkout's reconciler. Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_reconcile import REPO, cpu_pressure, describe_code, load_line, log, save_results

sys.path.insert(0, str(REPO))

from reconciler import monitor  # noqa: E402  (this checkout's, not an installed one)
from reconciler.cgroupfs import parent_for  # noqa: E402
from reconciler.executor.owner import identity  # noqa: E402

STATE = "var/lib/systemprompt-os"
AGENTS = f"{STATE}/agents"
TASK = "scan"
WATCH_SECONDS = 0.2
"""How often watch looks (monitor.POLL_SECONDS)."""
REFRESH_SECONDS = 1.0
"""How often `--live` refreshes by default."""
LOADER_RATE = 250
"""Runs a second one loader enqueues at most: each enqueue fsyncs the file and its directory."""

LOADER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from reconciler.device import Device
from reconciler.executor.enqueue import enqueue

device, agents, rate, seconds = Device(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
base = f"{sys.argv[2]}/var/lib/systemprompt-os/agents"
queued = {agent: [] for agent in agents}
told = {agent: [] for agent in agents}
done = turn = 0
print("ready", flush=True)
sys.stdin.readline()
began = time.monotonic()
while time.monotonic() - began < seconds:
    due = began + done / rate
    if time.monotonic() < due:
        time.sleep(due - time.monotonic())
    agent = agents[turn % len(agents)]
    turn += 1
    record = enqueue(device, agent, "scan")
    queued[agent].append(record["id"])
    if len(queued[agent]) > 1:  # the executor ends the oldest of the agent's new runs
        run_id = queued[agent].pop(0)
        name = next(n for n in os.listdir(f"{base}/{agent}/queue") if n.endswith(f"-{run_id}.json"))
        os.rename(f"{base}/{agent}/queue/{name}", f"{base}/{agent}/completed/{name}")
        told[agent].append(run_id)
    done += 1
elapsed = time.monotonic() - began
print(json.dumps({"enqueued": done, "finished": sum(map(len, told.values())), "seconds": elapsed,
                  "ended": told}), flush=True)
"""
"""One loader: real enqueues, and ends by rename, paced to `rate` a second; it prints what it did."""


def build(root: Path, cgroups: Path, agents: list[str], finished: int, active: int, queued: int) -> None:
    """The device: agent configs, run records in every bucket, and the active runs' cgroups."""
    for controller in ("memory", "cpu", "cpuacct", "pids"):
        (cgroups / controller).mkdir(parents=True, exist_ok=True)
        (cgroups / controller / "cgroup.procs").write_text("")
    for agent in agents:
        directory = root / AGENTS / agent
        for bucket in ("queue", "active", "completed", "failed", "logs"):
            (directory / bucket).mkdir(parents=True, exist_ok=True)
        config = {"format": 1, "agent": agent, "user": "root",
                  "tasks": {TASK: {"command": ["/bin/true"], "priority": 50}}}
        (directory / "agent.json").write_text(json.dumps(config))
    owner = identity()
    serial = 0
    for count, bucket, fields in ((finished, "finished", {}), (active, "active", {"state": "active"}),
                                  (queued, "queue", {})):
        for index in range(count):
            serial += 1
            agent = agents[index % len(agents)]
            where = ("failed" if index % 10 == 9 else "completed") if bucket == "finished" else bucket
            record = _record(agent, serial, where, owner, fields)
            (root / AGENTS / agent / where / f"050-{serial:020d}-{record['id']}.json").write_text(
                json.dumps(record, indent=2, sort_keys=True))
            if where == "active":
                _cgroup(cgroups, root, agent, record["id"], serial)


def _record(agent: str, serial: int, bucket: str, owner: dict, fields: dict) -> dict:
    record = {"format": 1, "id": f"20261126T090000-{serial:08x}", "agent": agent, "task": TASK,
              "priority": 50, "enqueuedAt": "2026-11-26T09:00:00.000+00:00", "notAfter": None,
              "source": {"kind": "schedule", "name": f"{agent}-hourly"}, "attempt": 1, **fields}
    if bucket == "active":
        record.update(startedAt=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                      executor=owner, progress={"percent": serial % 100, "message": f"item {serial}"})
    elif bucket != "queue":
        state = "completed" if bucket == "completed" else "failed"
        record.update(state=state, startedAt="2026-11-26T09:00:01.000+00:00",
                      endedAt="2026-11-26T09:00:03.000+00:00", exitCode=0 if state == "completed" else 1,
                      durationSeconds=2.0, reason="",
                      attempts=[{"attempt": 1, "state": state, "durationSeconds": 2.0,
                                 "usage": {"cpuSeconds": 0.5, "peakMemoryBytes": 10_000_000}}])
    return record


def _cgroup(cgroups: Path, root: Path, agent: str, run_id: str, serial: int) -> None:
    run = f"{parent_for(str(root))}/{agent}/{run_id}"
    for file, value in (("cpuacct/cpuacct.usage", serial * 10_000_000),
                        ("memory/memory.usage_in_bytes", serial * 1_000_000)):
        controller, _, name = file.partition("/")
        (cgroups / controller / run).mkdir(parents=True, exist_ok=True)
        (cgroups / controller / run / name).write_text(f"{value}\n")


# ------------------------------------------------------------------------------ measuring


def timed(action, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def refresh(device) -> None:
    """One refresh of `--live`: a snapshot, and its view drawn for a 160x50 terminal."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, height=50, force_terminal=True,
                      color_system="truecolor")
    console.print(monitor.live_view(monitor.snapshot(device), 50))


def command(root: Path, cgroups: Path) -> None:
    subprocess.run([sys.executable, "-m", "reconciler", "action", "monitor", "--json", "--root", str(root),
                    "--cgroup-root", str(cgroups)], cwd=REPO, stdout=subprocess.DEVNULL, check=True)


def idle(device, root: Path, cgroups: Path, watched: str, repeat: int) -> dict:
    snap = monitor.snapshot(device)
    follower = monitor.Follower(device, watched)
    follower.start()
    try:
        return {
            "snapshot": timed(lambda: monitor.snapshot(device), repeat),
            "text": timed(lambda: monitor.text(snap), repeat),
            "live refresh": timed(lambda: refresh(device), repeat),
            "watch look": timed(follower.poll, repeat),
            "command": timed(lambda: command(root, cgroups), max(3, repeat // 10)),
        }
    finally:
        follower.close()


def loaded(device, root: Path, agents: list[str], watched: str, rate: float, seconds: float) -> dict:
    """A watch look of `watched` every WATCH_SECONDS and a live refresh every REFRESH_SECONDS,
    while loaders enqueue and finish runs: as many loaders as it takes at LOADER_RATE each,
    each with its own share of the agents (the first has `watched`)."""
    count = max(1, math.ceil(rate / LOADER_RATE))
    loaders = [subprocess.Popen([sys.executable, "-c", LOADER, str(REPO), str(root), json.dumps(agents[index::count]),
                                 str(rate / count), str(seconds)], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for index in range(count)]
    for loader in loaders:
        assert loader.stdout.readline().strip() == "ready"
    follower = monitor.Follower(device, watched)
    follower.start()
    refreshes, looks, events = [], [], []
    for loader in loaders:
        loader.stdin.write("go\n")
        loader.stdin.flush()
    next_refresh = time.monotonic()
    try:
        while any(loader.poll() is None for loader in loaders):
            began = time.perf_counter()
            events += follower.poll()
            looks.append(time.perf_counter() - began)
            if time.monotonic() >= next_refresh:
                began, next_refresh = time.perf_counter(), next_refresh + REFRESH_SECONDS
                refresh(device)
                refreshes.append(time.perf_counter() - began)
            time.sleep(WATCH_SECONDS)
        events += follower.poll()
    finally:
        follower.close()
    done = [json.loads(loader.stdout.read()) for loader in loaders]
    told = {event["run"] for event in events if event["event"] == "ended"}
    expected = set(done[0]["ended"][watched])
    return {"live refresh": refreshes, "watch look": looks, "loaders": done,
            "enqueued": sum(each["enqueued"] for each in done),
            "finished": sum(each["finished"] for each in done),
            "seconds": max(each["seconds"] for each in done),
            "watch": {"expected": len(expected), "told": len(expected & told),
                      "queued events": sum(event["event"] == "queued" for event in events)}}


# ------------------------------------------------------------------------------ report


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def row(name: str, samples: list[float]) -> str:
    ms = [sample * 1000 for sample in samples]
    return (f"  {name:<44} {statistics.median(ms):9.2f} {percentile(ms, 95):9.2f} {max(ms):9.2f} "
            f"{len(ms):6d}")


def report(args, env_info: dict, quiet: dict, busy: dict) -> None:
    watch = busy["watch"]
    per_agent = args.finished // args.agents
    header = f"  {'':<44} {'median':>9} {'p95':>9} {'max':>9} {'runs':>6}"
    lines = [
        f"bench_monitor: {args.agents} agents, {args.finished:,} finished runs, {args.active} active, "
        f"{args.queued:,} queued",
        f"code: {env_info['code']['commit']}"
        + (f" + {env_info['code']['dirty_files']} changed files" if env_info["code"]["dirty_files"] else ""),
        load_line(env_info, "the medians are the steadier figures"),
        "",
        "idle, milliseconds:",
        header,
        row("snapshot()", quiet["snapshot"]),
        row("text() of it", quiet["text"]),
        row("live refresh: snapshot + 160x50 frame", quiet["live refresh"]),
        row(f"watch look: one agent, {per_agent:,} finished runs", quiet["watch look"]),
        row("spos action monitor --json (whole process)", quiet["command"]),
        "",
        f"while {busy['enqueued'] / busy['seconds']:.0f} runs/s are enqueued and "
        f"{busy['finished'] / busy['seconds']:.0f}/s finished ({len(busy['loaders'])} processes asked for "
        f"{args.rate:g}/s, {busy['seconds']:.1f} s), milliseconds:",
        header,
        row("live refresh, every second", busy["live refresh"]),
        row("watch look, every 0.2 s", busy["watch look"]),
        f"  watch told {watch['told']} of the {watch['expected']} runs of its agent that were queued and "
        f"ended meanwhile ({watch['queued events']} queued events)",
    ]
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=200)
    parser.add_argument("--queued", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=50, help="samples per idle measurement")
    parser.add_argument("--rate", type=float, default=500, help="runs a second the loader enqueues")
    parser.add_argument("--seconds", type=float, default=5, help="how long the load lasts")
    parser.add_argument("--json", metavar="FILE", help="all samples as JSON ('-': stdout)")
    parser.add_argument("--keep", action="store_true", help="keep the generated device root")
    parser.add_argument("--workdir", metavar="DIR", help="where to build it (default: a temporary directory)")
    args = parser.parse_args()

    from reconciler.device import Device

    env_info = {"code": describe_code(), "loadavg_start": os.getloadavg(),
                "cpu_pressure_start": cpu_pressure(), "cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="spos-bench-monitor-", dir=args.workdir))
    try:
        root, cgroups = work / "device", work / "cgroup"
        agents = [f"bench-{index:03d}" for index in range(args.agents)]
        log(f"building {work}: {args.agents} agents, {args.finished} finished, {args.active} active, "
            f"{args.queued} queued runs")
        build(root, cgroups, agents, args.finished, args.active, args.queued)
        device = Device(root, cgroup_root=str(cgroups))
        log("measuring idle")
        quiet = idle(device, root, cgroups, agents[0], args.repeat)
        log(f"measuring under load: {args.rate:g} runs/s for {args.seconds:g} s")
        busy = loaded(device, root, agents, agents[0], args.rate, args.seconds)
        save_results(args, env_info, {"idle": quiet, "loaded": busy})
        report(args, env_info, quiet, busy)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
