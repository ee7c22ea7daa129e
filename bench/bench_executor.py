#!/usr/bin/env python3
"""Latency, throughput and idle cost of the spos executor, measured as whole processes.

    python3 bench/bench_executor.py [--runs 100] [--gap 0.05] [--queued 200] [--repeat 3]
                                    [--idle 300] [--json FILE] [--keep] [--workdir DIR]
                                    [--live | --rev REV] [--spos CMD]

It applies a generated manifest to a temporary device root (a Quota, a Capability that may
execute one program, and five agents whose task runs it), starts the real `spos executor` on
that root, and measures:

- latency     from enqueueing a run to the first instruction of the action. The action is a
              tiny program (static C when a compiler is available, else bash) whose first act
              is to print CLOCK_REALTIME; the executor copies that line into the run's log.
              The enqueue side is timed on the same clock: in-process calls of
              `reconciler.executor.enqueue.enqueue` (given `now=`, which is also the time in
              the queue file's name), `spos action run`, and the lean crontab entry point, both
              from spawning the process and from the enqueue inside it. For comparison, in the
              same run and interleaved with those: `Executor.execute` in-process (the same
              sandbox, without the queue and the wake-up) and the floor, spawning the same
              program directly with subprocess.
- throughput  N trivial runs queued on four agents while the executor is stopped (SIGSTOP), then
              released (SIGCONT): runs completed per second with the default --max-parallel 4
              and --max-per-agent 2, and the CPU per run of the executor and of the run's
              cgroup; against two floors, four at a time: the same sandboxes alone (the spec
              the executor builds for the task, spawned by a plain loop: no queue, records or
              wake-ups) and the same program spawned directly.
- idle        the executor with an empty queue: CPU time and context switches over a window,
              once right after it started and once after the runs above, with its resident
              memory, open fds and child processes at the end of each (what a leak grows).

Times of the executor's own steps come from its `--- spos` log lines (millisecond resolution).
Like bench_reconcile.py (whose spawner and code snapshot this reuses), children run without
PYTHONDONTWRITEBYTECODE, and unless --live is given they import a copy of reconciler/ taken at
start (with --rev, the copy comes from that commit instead of the working tree). Needs root,
bubblewrap and cgroups (what the executor needs), and an installed spos.

See bench/README.md for the targets and the latest numbers.

Standard library only. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench_reconcile import (
    REPO, Failed, Runner, code_line, cpu_pressure, create_cost, default_spos, describe_code,
    file_system, file_system_note, load_line, log, memory_cgroups, package_parent, save_results,
    snapshot_code,
)

STATE = "var/lib/systemprompt-os"
AGENTS = f"{STATE}/agents"
TASK = "stamp"
LATENCY_AGENT = "bench-executor-latency"
THROUGHPUT_AGENTS = tuple(f"bench-executor-{index}" for index in range(1, 5))
"""Four agents, so that --max-per-agent 2 (the default) does not hold back --max-parallel 4."""
STAMP = "/opt/spos-bench/stamp"
"""The action, as a device path: the program is placed under the temporary root, and the
Capability allows executing its directory."""

# Targets from DESIGN.md section 4 and the issue.
LATENCY_TARGET = 0.005
"""'A few milliseconds' from enqueue to process start: read as a median of at most 5 ms."""
THROUGHPUT_TARGET = 200.0
"""'Hundreds of trivial sandboxed actions per second on 2 cores': at least 200 runs/s."""
IDLE_TARGET = 0.01
"""'Idle, it uses no CPU': at most 10 ms of CPU per minute (the 5-minute rescan is allowed)."""

STAMP_C = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    char line[64];
    int size = snprintf(line, sizeof line, "stamp %lld.%09ld\n",
                        (long long)now.tv_sec, now.tv_nsec);
    return write(1, line, size) == size ? 0 : 1;
}
"""

HELPER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from reconciler.device import Device
from reconciler.executor.enqueue import enqueue

device = Device(sys.argv[2])
executor = None

def in_process_executor():
    from reconciler.executor.dispatch import Executor
    from reconciler.executor.sandbox import Sandbox
    sandbox = Sandbox(root=sys.argv[2])
    ready, why = sandbox.available()
    if not ready:
        raise SystemExit(f"cannot sandbox here: {why}")
    return Executor(device, sandbox)


def sandboxes_alone(agent, task, count, parallel):
    # The spec the executor gives the sandbox for one run of `task` (captured from a real
    # `Executor.execute`), then `count` sandboxes of that spec, `parallel` at once, each in a
    # cgroup of its own: what the sandbox costs without the queue, the records and the loop.
    import dataclasses, os, select
    global executor
    executor = executor or in_process_executor()
    sandbox, captured = executor.sandbox, []
    spawn = sandbox.spawn
    sandbox.spawn = lambda spec, **fds: captured.append(spec) or spawn(spec, **fds)
    try:
        record = enqueue(device, agent, task, source={"kind": "execute"}, claim=True)
        executor.execute(record["id"], agent)
    finally:
        sandbox.spawn = spawn
    spec = captured[0]
    for path in (spec.cwd, *spec.write):  # the run's own directories went with its end
        device.makedirs(path, mode=0o750)
    null = os.open(os.devnull, os.O_WRONLY)
    running, started, in_runs, own = {}, 0, 0.0, os.times()
    began = time.perf_counter()
    while started < count or running:
        while started < count and len(running) < parallel:
            name = f"{spec.cgroup_name}-alone-{started}"
            run = sandbox.spawn(dataclasses.replace(spec, cgroup_name=name), stdout=null, stderr=null)
            running[run.pidfd] = run
            started += 1
        ready, _, _ = select.select(list(running), [], [])
        for pidfd in ready:
            run = running.pop(pidfd)
            code = run.wait()
            run.settle()
            in_runs += run.usage()["cpuSeconds"] or 0.0
            run.cleanup()
            if code != 0:
                raise SystemExit(f"a sandbox alone exited {code}: {run.setup_error()}")
    elapsed = time.perf_counter() - began
    after = os.times()
    os.close(null)
    return {"runs": count, "elapsed_s": elapsed, "runs_per_s": count / elapsed,
            "spawner_cpu_per_run_s": (after.user + after.system - own.user - own.system) / count,
            "run_cpu_per_run_s": in_runs / count}


for line in sys.stdin:
    job = json.loads(line)
    if job["do"] == "enqueue":
        began = time.time()
        record = enqueue(device, job["agent"], job["task"], now=began)
        print(json.dumps({"t0": began, "returned": time.time(), "id": record["id"]}), flush=True)
    elif job["do"] == "fill":
        agents = job["agents"]
        for index in range(job["count"]):
            enqueue(device, agents[index % len(agents)], job["task"])
        print(json.dumps({"queued": job["count"]}), flush=True)
    elif job["do"] == "execute":
        executor = executor or in_process_executor()
        began = time.time()
        record = enqueue(device, job["agent"], job["task"], source={"kind": "execute"},
                         now=began, claim=True)
        final = executor.execute(record["id"], job["agent"])
        print(json.dumps({"t0": began, "returned": time.time(), "id": record["id"],
                          "state": final.get("state")}), flush=True)
    elif job["do"] == "sandboxes":
        print(json.dumps(sandboxes_alone(job["agent"], job["task"], job["count"], job["parallel"])),
              flush=True)

"""
"""A long-lived Python process that calls the enqueue function (and `Executor.execute`, what
`spos action execute` does) of the code under test, so those paths are timed without the
interpreter's start-up. Runs with -I -S like the crontab entry point."""


# ------------------------------------------------------------------------------ set-up


def build_stamp(work: Path, target: Path) -> dict:
    """Compile the stamp program into `target` (static, so the dynamic loader adds nothing);
    without a C compiler, a bash script reading $EPOCHREALTIME stands in. musl comes first
    where `musl-gcc` is installed: a static program on glibc asks the CPU about its caches
    before main() (cpuid, which traps to the hypervisor in a virtual machine: ~0.5 ms here),
    time that would count as the executor's although every program pays it, the floor's too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = work / "stamp.c"
    source.write_text(STAMP_C)
    compilers = [(path, label) for path, label in (
        (shutil.which("musl-gcc"), "musl"),
        (shutil.which("cc") or shutil.which("gcc"), "glibc"),
    ) if path]
    for compiler, libc in compilers:
        for extra in (["-static"], []):
            done = subprocess.run([compiler, "-O2", *extra, "-o", str(target), str(source)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return {"argv": [STAMP],
                        "kind": f"C, {'static' if extra else 'dynamic'}, {libc}"}
    bash = shutil.which("bash") or "/bin/bash"
    return {"argv": [bash, "-c", 'echo "stamp $EPOCHREALTIME"'], "kind": "bash $EPOCHREALTIME"}


def idle_agents(count: int) -> tuple[str, ...]:
    return tuple(f"bench-executor-idle-{index:05d}" for index in range(1, count + 1))


def manifests(argv: list[str], idle: int = 0) -> str:
    """One Quota, one Capability (execute the stamp's directory, no network) and an agent per
    name, each with the task `stamp` (concurrency Allow: queued runs are not skipped); then
    `idle` agents with the same task that nothing enqueues (a device with many agents)."""
    command = json.dumps(argv)
    docs = ["""\
apiVersion: spos/v1
kind: Quota
metadata:
  name: bench
spec:
  cpu: "100%"
  memory: 256M
  tasksMax: 16
""", f"""\
apiVersion: spos/v1
kind: Capability
metadata:
  name: bench
spec:
  description: Run the benchmark's time stamp program, nothing else.
  allowed:
    execute: [{os.path.dirname(STAMP)}]
    network: [none]
"""]
    for agent in (LATENCY_AGENT, *THROUGHPUT_AGENTS, *idle_agents(idle)):
        docs.append(f"""\
apiVersion: spos/v1
kind: Agent
metadata:
  name: {agent}
spec:
  description: Runs a program that prints the time it started, for bench/bench_executor.py.
  capability: bench
  quota: bench
  tasks:
    {TASK}:
      command: {command}
      timeout: 1m
      concurrency: Allow
""")
    return "# Generated by bench/bench_executor.py.\n" + "---\n".join(docs)


# ------------------------------------------------------------------------------ processes


class Helper:
    """The in-process enqueuer (see HELPER), one JSON job per line."""

    def __init__(self, code_path: str, root: Path, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HELPER, code_path, str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )

    def ask(self, **job) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise Failed(f"the enqueue helper died on {job}")
        return json.loads(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class Daemon:
    """`spos executor --root R`, started from here and reaped with os.wait4."""

    def __init__(self, argv: list[str], env: dict, root: Path, stderr_path: Path):
        self.root = root
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        self.pid = self.process.pid
        self.stderr_path = stderr_path

    def wait_ready(self, timeout: float = 30) -> float:
        """Seconds until the executor holds its wake pipe open (it then recovers, scans the
        empty queue and sleeps; a short pause covers that)."""
        began = time.perf_counter()
        wake = str(self.root / STATE / "executor.wake")
        while time.perf_counter() - began < timeout:
            if self.process.poll() is not None:
                raise Failed(f"the executor exited: {self.stderr_path.read_text()[-2000:]}")
            try:
                fds = os.listdir(f"/proc/{self.pid}/fd")
                if any(os.readlink(f"/proc/{self.pid}/fd/{fd}") == wake for fd in fds):
                    ready = time.perf_counter() - began
                    time.sleep(0.5)
                    return ready
            except OSError:
                pass
            time.sleep(0.01)
        raise Failed("the executor did not open its wake pipe")

    def counters(self) -> dict:
        """CPU time (schedstat: ns, per thread, summed), context switches, peak RSS."""
        cpu_ns = voluntary = involuntary = 0
        tasks = os.listdir(f"/proc/{self.pid}/task")
        for tid in tasks:
            with open(f"/proc/{self.pid}/task/{tid}/schedstat") as handle:
                cpu_ns += int(handle.read().split()[0])
            with open(f"/proc/{self.pid}/task/{tid}/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        involuntary += int(line.split()[1])
        with open(f"/proc/{self.pid}/status") as handle:
            status = {line.split(":")[0]: line.split()[1:] for line in handle if ":" in line}
        children = [pid for tid in tasks
                    for pid in Path(f"/proc/{self.pid}/task/{tid}/children").read_text().split()]
        return {"cpu_s": cpu_ns / 1e9, "voluntary": voluntary, "involuntary": involuntary,
                "threads": len(tasks), "peak_rss_mb": int(status["VmHWM"][0]) / 1024,
                "rss_mb": int(status["VmRSS"][0]) / 1024,
                "fds": len(os.listdir(f"/proc/{self.pid}/fd")), "children": len(children),
                "at": time.monotonic()}

    def stop(self, timeout: float = 60) -> dict:
        """SIGTERM (drain), then the rusage of the whole life: the executor and every process
        it reaped (its sandboxes)."""
        if self.process.returncode is not None:
            return {}
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return {"exit": self.process.returncode, "cpu_s": usage.ru_utime + usage.ru_stime,
                "maxrss_mb": usage.ru_maxrss / 1024}


# ------------------------------------------------------------------------------ measuring


class ExecutorBench:
    def __init__(self, args, runner: Runner, spos: list[str], code_path: str):
        self.args = args
        self.runner = runner
        self.spos = spos
        self.code_path = code_path
        self.work = Path(tempfile.mkdtemp(prefix="spos-bench-executor-", dir=args.workdir))
        self.root = self.work / "root"
        self.repo = self.work / "repo"
        self.result: dict = {"workdir": str(self.work), "latency": {}, "breakdown": {},
                             "throughput": {}, "idle": {}}
        self.daemon: Daemon | None = None
        self.helper: Helper | None = None

    def run(self) -> dict:
        try:
            self.setup()
            self.daemon = Daemon([*self.spos, "--root", str(self.root), "executor"], self.runner.env,
                                 self.root, self.work / "executor.stderr")
            self.result["executor_ready_s"] = self.daemon.wait_ready()
            log(f"executor started (pid {self.daemon.pid}), ready in "
                f"{self.result['executor_ready_s'] * 1000:.0f} ms")
            self.result["idle"]["fresh"] = self.idle("right after start")
            self.measure_latency()
            self.measure_throughput()
            self.result["idle"]["after work"] = self.idle("after the runs above")
            self.result["executor_peak_rss_mb"] = self.daemon.counters()["peak_rss_mb"]
            self.result["executor_life"] = self.daemon.stop()
        except Failed as exc:
            self.result["error"] = str(exc)
            log(f"FAILED: {exc}")
        finally:
            if self.daemon is not None:
                self.daemon.stop()
            if self.helper is not None:
                self.helper.close()
            self.runner.remove_cgroups(self.root)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        return self.result

    def setup(self) -> None:
        self.stamp = build_stamp(self.work, self.root / STAMP.lstrip("/"))
        (self.repo / "agents.d").mkdir(parents=True)
        (self.repo / "agents.d" / "bench.yaml").write_text(
            manifests(self.stamp["argv"], self.args.agents))
        applied = self.runner.run([*self.spos, "--root", str(self.root), "apply", "--auto-approve",
                                   "agents.d"], self.repo)
        expected = 5 + self.args.agents
        if f"Apply complete: {expected} changed, 0 failed." not in applied["stdout"]:
            raise Failed(f"the first apply did not create the {expected} agents:\n"
                         f"{applied['stdout'][-2000:]}")
        self.result["stamp"] = self.stamp
        self.helper = Helper(self.code_path, self.root, self.runner.lean_env)
        log(f"device root {self.root}: five agents applied; action {shlex.join(self.stamp['argv'])} "
            f"({self.stamp['kind']})")

    # -- latency ----------------------------------------------------------------------------

    def latency_paths(self) -> dict:
        r = ["--root", str(self.root)]
        action = ["action", "run", "--agent", LATENCY_AGENT, "--task", TASK, "-q"]
        cron_line = [sys.executable, "-I", "-S",
                     os.path.join(self.code_path, "reconciler", "_cron.py"), *r, *action]
        return {
            "executor, enqueue() in-process": self.trial_in_process,
            "executor, spos action run": lambda: self.trial_command([*self.spos, *r, *action]),
            "executor, cron line": lambda: self.trial_command(cron_line, lean=True),
            "action execute in-process": self.trial_execute,
            "floor: subprocess, no sandbox": self.trial_direct,
        }

    def measure_latency(self) -> None:
        """Every path once per round, so all of them see the same load; the first round is a
        warm-up (page cache, .pyc files, the first cgroups)."""
        paths = self.latency_paths()
        samples: dict[str, list[dict]] = {name: [] for name in paths}
        before = self.daemon.counters()
        rounds = self.args.runs + 1
        log(f"latency: {self.args.runs} runs of each of {len(paths)} paths, interleaved, "
            f"{self.args.gap:g} s apart")
        for round_index in range(rounds):
            for name, trial in paths.items():
                sample = trial()
                if round_index:
                    samples[name].append(sample)
                time.sleep(self.args.gap)
            if round_index and round_index % 20 == 0:
                log(f"  {round_index}/{self.args.runs} rounds")
        daemon_runs = rounds * sum(1 for name in paths if name.startswith("executor"))
        self.result["executor_cpu_per_single_run_s"] = (
            self.daemon.counters()["cpu_s"] - before["cpu_s"]) / daemon_runs
        for name, got in samples.items():
            self.result["latency"][name] = latency_summary(got)
        self.result["breakdown"] = {
            name: breakdown(got) for name, got in samples.items() if got and "notes" in got[0]}
        for name, data in self.result["latency"].items():
            log(f"  {name}: median {fmt_ms(data['median_s'])}, p99 {fmt_ms(data['p99_s'])}")

    def trial_in_process(self) -> dict:
        answer = self.helper.ask(do="enqueue", agent=LATENCY_AGENT, task=TASK)
        sample = self.finished(LATENCY_AGENT, answer["id"], answer["t0"])
        sample["enqueue_call_s"] = answer["returned"] - answer["t0"]
        return sample

    def trial_command(self, argv: list[str], lean: bool = False) -> dict:
        """From spawning the command (what a shell or cron waits for); the enqueue time inside
        the process is the one in the queue file's name."""
        spawned = time.time()
        done = self.runner.run(argv, self.repo, lean=lean)
        run_id = self.newest_run_id(LATENCY_AGENT, after=spawned)
        sample = self.finished(LATENCY_AGENT, run_id, spawned)
        sample["enqueued_to_start_s"] = sample["stamp"] - sample["enqueued_at"]
        sample["process_wall_s"] = done["wall"]
        return sample

    def trial_execute(self) -> dict:
        answer = self.helper.ask(do="execute", agent=LATENCY_AGENT, task=TASK)
        if answer["state"] != "completed":
            raise Failed(f"in-process execute ended {answer['state']}")
        return self.finished(LATENCY_AGENT, answer["id"], answer["t0"])

    def trial_direct(self) -> dict:
        began = time.time()
        process = subprocess.Popen(self.direct_argv(), stdout=subprocess.PIPE)
        out, _ = process.communicate()
        stamp = parse_stamp(out.decode())
        return {"t0": began, "stamp": stamp, "latency_s": stamp - began}

    def direct_argv(self) -> list[str]:
        """The action as the host sees it (the compiled stamp lives under the device root)."""
        if self.stamp["argv"] == [STAMP]:
            return [str(self.root / STAMP.lstrip("/"))]
        return self.stamp["argv"]

    def newest_run_id(self, agent: str, after: float) -> str:
        """The run a command just enqueued: the newest run file in any bucket, by the enqueue
        time in its name (`<priority>-<ns>-<run id>.json`), if that is later than `after`."""
        base = self.root / AGENTS / agent
        newest = (0, "")
        for bucket in ("queue", "active", "completed", "failed"):
            for name in os.listdir(base / bucket):
                if name.startswith(".") or not name.endswith(".json"):
                    continue  # a record being written
                _, enqueued_ns, rest = name.split("-", 2)
                newest = max(newest, (int(enqueued_ns), rest.removesuffix(".json")))
        if newest[0] / 1e9 < after:
            raise Failed(f"no run of {agent} was enqueued")
        return newest[1]

    def finished(self, agent: str, run_id: str, t0: float, timeout: float = 60) -> dict:
        """Wait for the run's record to reach completed/ (or failed/); read its log."""
        base = self.root / AGENTS / agent
        deadline = time.monotonic() + timeout
        suffix = f"-{run_id}.json"
        while time.monotonic() < deadline:
            for bucket in ("completed", "failed"):
                for name in os.listdir(base / bucket):
                    if name.endswith(suffix):
                        record = json.loads((base / bucket / name).read_text())
                        if bucket != "completed":
                            raise Failed(f"run {run_id} {record.get('state')}: {record.get('reason')}")
                        text = (base / "logs" / f"{run_id}.log").read_text()
                        stamp = parse_stamp(text)
                        return {"t0": t0, "stamp": stamp, "latency_s": stamp - t0,
                                "enqueued_at": int(name.split("-", 2)[1]) / 1e9,
                                "notes": log_notes(text), "ended_at": iso_epoch(record.get("endedAt"))}
            time.sleep(0.01)
        raise Failed(f"run {run_id} did not finish within {timeout:g} s")

    # -- throughput -------------------------------------------------------------------------

    def measure_throughput(self) -> None:
        executor, alone, direct = [], [], []
        for repeat in range(self.args.repeat):
            executor.append(self.throughput_executor())
            alone.append(self.throughput_sandboxes())
            direct.append(self.throughput_direct())
            log(f"throughput {repeat + 1}/{self.args.repeat}: executor "
                f"{executor[-1]['runs_per_s']:.1f} runs/s, sandboxes alone "
                f"{alone[-1]['runs_per_s']:.1f} runs/s, direct {direct[-1]['runs_per_s']:.0f} runs/s")
        self.result["throughput"] = {
            f"executor, {self.args.queued} queued, max-parallel 4": throughput_summary(executor),
            "floor: the same sandboxes alone, 4 at once": throughput_summary(alone),
            "floor: subprocess, no sandbox, 4 at once": throughput_summary(direct),
        }

    def throughput_sandboxes(self) -> dict:
        """The executor's sandbox for the same task, without the executor: the spec it builds,
        spawned by the helper process four at a time (each in a new cgroup, cleaned up)."""
        machine_before = machine_cpu()
        result = self.helper.ask(do="sandboxes", agent=THROUGHPUT_AGENTS[0], task=TASK,
                                 count=self.args.queued, parallel=4)
        result["machine_busy"] = machine_busy(machine_before, machine_cpu())
        return result

    def throughput_executor(self) -> dict:
        """Queue N runs while the executor is stopped, release it, and time until the last run
        is recorded. The wake bytes wait in the pipe; the executor drains them at once."""
        count = self.args.queued
        done_before = {agent: self.ended_runs(agent) for agent in THROUGHPUT_AGENTS}
        os.kill(self.daemon.pid, signal.SIGSTOP)
        try:
            self.helper.ask(do="fill", count=count, agents=list(THROUGHPUT_AGENTS), task=TASK)
        finally:
            before = self.daemon.counters()
            machine_before = machine_cpu()
            released = time.time()
            os.kill(self.daemon.pid, signal.SIGCONT)
        deadline = time.monotonic() + max(120.0, count * 0.5)
        while True:
            new = {agent: self.ended_runs(agent) - done_before[agent] for agent in THROUGHPUT_AGENTS}
            if sum(map(len, new.values())) >= count:
                break
            if time.monotonic() > deadline:
                raise Failed(f"only {sum(map(len, new.values()))} of {count} runs finished")
            time.sleep(0.05)
        after = self.daemon.counters()
        machine_after = machine_cpu()
        records = [json.loads((self.root / AGENTS / agent / path).read_text())
                   for agent, paths in new.items() for path in paths]
        failed = [r for r in records if r.get("state") != "completed"]
        if failed:
            raise Failed(f"{len(failed)} of {count} runs did not complete, e.g. "
                         f"{failed[0].get('state')}: {failed[0].get('reason')}")
        ended = max(iso_epoch(r["endedAt"]) for r in records)
        first_start = min(iso_epoch(r["startedAt"]) for r in records if r.get("startedAt"))
        cgroup_cpu = [(r.get("usage") or {}).get("cpuSeconds") for r in records]
        elapsed = ended - released
        return {
            "runs": count,
            "elapsed_s": elapsed,
            "runs_per_s": count / elapsed,
            "first_start_s": first_start - released,
            "spawner_cpu_per_run_s": (after["cpu_s"] - before["cpu_s"]) / count,
            "run_cpu_per_run_s": (statistics.mean(c for c in cgroup_cpu if c is not None)
                                  if any(c is not None for c in cgroup_cpu) else None),
            "machine_busy": machine_busy(machine_before, machine_after),
        }

    def throughput_direct(self) -> dict:
        """The same program spawned directly, as many at once as the executor's --max-parallel."""
        argv = self.direct_argv()
        count, parallel = self.args.queued, 4
        running: dict[int, subprocess.Popen] = {}  # by pidfd
        cpu = 0.0
        machine_before = machine_cpu()
        own_before = os.times()
        began = time.perf_counter()
        started = finished = 0
        while finished < count:
            while started < count and len(running) < parallel:
                process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
                running[os.pidfd_open(process.pid)] = process
                started += 1
            ready, _, _ = select.select(list(running), [], [])
            for pidfd in ready:
                process = running.pop(pidfd)
                os.close(pidfd)
                _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
                process.returncode = os.waitstatus_to_exitcode(status)
                if process.returncode != 0:
                    raise Failed(f"{argv[0]} exited {process.returncode}")
                cpu += usage.ru_utime + usage.ru_stime
                finished += 1
        elapsed = time.perf_counter() - began
        own_after = os.times()
        own = own_after.user + own_after.system - own_before.user - own_before.system
        return {"runs": count, "elapsed_s": elapsed, "runs_per_s": count / elapsed,
                "spawner_cpu_per_run_s": own / count, "run_cpu_per_run_s": cpu / count,
                "machine_busy": machine_busy(machine_before, machine_cpu())}

    def ended_runs(self, agent: str) -> set[str]:
        """`completed/<name>` and `failed/<name>` of every run of `agent` that has ended."""
        return {f"{bucket}/{name}" for bucket in ("completed", "failed")
                for name in os.listdir(self.root / AGENTS / agent / bucket) if name.endswith(".json")}

    # -- idle -------------------------------------------------------------------------------

    def idle(self, label: str) -> dict:
        before = self.daemon.counters()
        time.sleep(self.args.idle)
        after = self.daemon.counters()
        seconds = after["at"] - before["at"]
        cpu = after["cpu_s"] - before["cpu_s"]
        result = {
            "window_s": seconds,
            "cpu_s": cpu,
            "cpu_s_per_min": cpu / seconds * 60,
            "wakeups": after["voluntary"] - before["voluntary"],
            "involuntary_switches": after["involuntary"] - before["involuntary"],
            "threads": after["threads"],
            "rss_mb": after["rss_mb"], "fds": after["fds"], "children": after["children"],
        }
        log(f"idle {label}: {result['cpu_s_per_min'] * 1000:.2f} ms CPU per minute, "
            f"{result['wakeups']} wake-ups in {seconds:.0f} s")
        return result


# ------------------------------------------------------------------------------ numbers


def parse_stamp(text: str) -> float:
    match = re.search(r"^stamp (\d+\.\d+)$", text, re.MULTILINE)
    if not match:
        raise Failed(f"the action printed no time stamp:\n{text[-1000:]}")
    return float(match.group(1))


NOTE_STAGES = (
    ("started", re.compile(r"attempt \d+ of run .* started$")),
    ("spawned", re.compile(r"step \S+ started: ")),
    ("exited", re.compile(r"step \S+ exited with ")),
    ("recorded", re.compile(r"run \w+")),
)


def log_notes(text: str) -> dict[str, float]:
    """Epoch times of the executor's `--- spos <time> <what>` lines in a run's log."""
    notes = {}
    for line in text.splitlines():
        match = re.match(r"--- spos (\S+) (.*)", line)
        if not match:
            continue
        for stage, pattern in NOTE_STAGES:
            if stage not in notes and pattern.match(match.group(2)):
                notes[stage] = iso_epoch(match.group(1))
                break
    return notes


def iso_epoch(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: with fewer than 100 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_summary(samples: list[dict]) -> dict:
    values = [s["latency_s"] for s in samples]
    summary = {
        "median_s": statistics.median(values),
        "p99_s": percentile(values, 0.99),
        "min_s": min(values),
        "max_s": max(values),
        "runs": len(values),
        "samples_s": [round(v, 6) for v in values],
    }
    inner = [s["enqueued_to_start_s"] for s in samples if "enqueued_to_start_s" in s]
    if inner:
        summary["enqueue_to_start"] = {"median_s": statistics.median(inner),
                                       "p99_s": percentile(inner, 0.99), "min_s": min(inner),
                                       "max_s": max(inner)}
        summary["process_wall_median_s"] = statistics.median(s["process_wall_s"] for s in samples)
    calls = [s["enqueue_call_s"] for s in samples if "enqueue_call_s" in s]
    if calls:
        summary["enqueue_call_median_s"] = statistics.median(calls)
    return summary


def breakdown(samples: list[dict]) -> dict:
    """Median time from the enqueue to each of the executor's steps, and to the action's start.
    The executor's log lines have 1 ms resolution."""
    stages: dict[str, list[float]] = {}
    for sample in samples:
        origin = sample["enqueued_at"]
        points = {}
        if "enqueue_call_s" in sample:
            points["enqueue() returned"] = origin + sample["enqueue_call_s"]
        points.update({
            "attempt started": sample["notes"].get("started"),
            "spawned": sample["notes"].get("spawned"),
            "action running": sample["stamp"],
            "exit seen": sample["notes"].get("exited"),
            "run recorded": sample["ended_at"],
        })
        for stage, at in points.items():
            if at is not None:
                stages.setdefault(stage, []).append(at - origin)
    return {stage: statistics.median(values) for stage, values in stages.items()}


def throughput_summary(samples: list[dict]) -> dict:
    rates = [s["runs_per_s"] for s in samples]
    summary = {"median_runs_per_s": statistics.median(rates), "best_runs_per_s": max(rates),
               "repeats": len(rates), "samples": samples}
    for key in ("spawner_cpu_per_run_s", "run_cpu_per_run_s", "first_start_s", "machine_busy"):
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            summary[key] = statistics.median(values)
    return summary


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


@contextlib.contextmanager
def state_mount_point():
    """Mount points a device has and a temporary root's runs need on the host. Every device has
    /var/lib/systemprompt-os, where a sandbox binds a run's directories, and the directory of
    the programs its agents run (here /opt/spos-bench). A machine without them makes each run
    under a temporary root rebuild the directory above in a tmpfs (one read-only bind per entry
    of /var/lib or /opt, each bind also costing bubblewrap a read of the mount table: about 10
    ms per run for /var/lib here) to get a mount point, a cost no device pays. So the empty
    directories are made for the benchmark's duration, when missing, and removed after if
    they are still empty. Yields the ones it made."""
    made = []
    try:
        for path in (Path("/", STATE), Path(os.path.dirname(STAMP))):
            if not os.path.lexists(path):
                path.mkdir(mode=0o755)
                made.append(path)
        yield [str(path) for path in made]
    finally:
        for path in reversed(made):
            try:
                path.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------------ reporting


BREAKDOWN_SHOWN = ("executor, enqueue() in-process", "action execute in-process")
"""The command-line paths go through the same steps once enqueued; their breakdowns are in the
JSON."""


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    return "ok" if (value >= target if higher_is_better else value <= target) else "MISS"


def table(result: dict) -> str:
    lines = []
    latency = result["latency"]
    if latency:
        header = (f"{'latency: enqueue -> the action running':<44} {'median':>9} {'p99':>9} "
                  f"{'min':>9} {'max':>9} {'runs':>4}  target")
        lines += [header, "-" * len(header)]
        for name, data in latency.items():
            target = ""
            if name == "executor, enqueue() in-process":
                target = f"<= {fmt_ms(LATENCY_TARGET)} {verdict(data['median_s'], LATENCY_TARGET)}"
            inner = data.get("enqueue_to_start")
            label = f"{name}, from spawn" if inner else name
            lines.append(f"{label:<44} {fmt_ms(data['median_s']):>9} {fmt_ms(data['p99_s']):>9} "
                         f"{fmt_ms(data['min_s']):>9} {fmt_ms(data['max_s']):>9} {data['runs']:>4}  "
                         f"{target}".rstrip())
            if inner:
                label = f"{name}, from its enqueue"
                lines.append(
                    f"{label:<44} {fmt_ms(inner['median_s']):>9} {fmt_ms(inner['p99_s']):>9} "
                    f"{fmt_ms(inner['min_s']):>9} {fmt_ms(inner['max_s']):>9} {data['runs']:>4}  "
                    f"<= {fmt_ms(LATENCY_TARGET)} {verdict(inner['median_s'], LATENCY_TARGET)}")
        if min(data["runs"] for data in latency.values()) < 100:
            lines.append("  (p99 is the nearest rank: with fewer than 100 runs it is the maximum)")
        lines.append("")
        for name, stages in result["breakdown"].items():
            if name not in BREAKDOWN_SHOWN:
                continue
            lines.append(f"where the time goes, {name} (median ms after the enqueue):")
            lines.append("  " + " | ".join(f"{stage} {value * 1000:.1f}"
                                            for stage, value in stages.items()))
        if "executor_cpu_per_single_run_s" in result:
            lines.append("CPU of the executor process per run, one run at a time: "
                         f"{fmt_ms(result['executor_cpu_per_single_run_s'])}")
        lines.append("")
    throughput = result["throughput"]
    if throughput:
        header = (f"{'throughput: trivial runs':<44} {'median':>9} {'best':>9} "
                  f"{'spawner':>9} {'the run':>9} {'busy':>5}  target")
        lines += [header, "-" * len(header)]
        for name, data in throughput.items():
            target = ""
            if name.startswith("executor"):
                target = (f">= {THROUGHPUT_TARGET:.0f}/s "
                          f"{verdict(data['median_runs_per_s'], THROUGHPUT_TARGET, True)}")
            lines.append(
                f"{name:<44} {data['median_runs_per_s']:>7.1f}/s {data['best_runs_per_s']:>7.1f}/s "
                f"{fmt_ms(data.get('spawner_cpu_per_run_s')):>9} "
                f"{fmt_ms(data.get('run_cpu_per_run_s')):>9} "
                f"{data.get('machine_busy', 0) * 100:>4.0f}%  {target}".rstrip())
        lines.append("  (CPU per run of the spawner, the executor process or this benchmark, and of "
                     "the run itself, its cgroup under the executor; busy: all CPUs of the machine)")
        lines.append("")
    idle = result["idle"]
    if idle:
        header = (f"{'idle executor, empty queue':<44} {'window':>9} {'cpu/min':>9} "
                  f"{'wake-ups':>9} {'RSS':>8} {'fds':>4} {'kids':>4}  target")
        lines += [header, "-" * len(header)]
        lines.append("  (wake-ups: voluntary context switches; the executor rescans every 5 minutes. "
                     "RSS, open fds and child processes at the window's end: a prepared sandbox "
                     "holds a child and five fds; a leak grows them between the rows)")
        for name, data in idle.items():
            lines.append(
                f"{name:<44} {data['window_s']:>7.1f} s {data['cpu_s_per_min'] * 1000:>6.2f} ms "
                f"{data['wakeups']:>9} {data.get('rss_mb', 0):>5.1f} MB {data.get('fds', 0):>4} "
                f"{data.get('children', 0):>4}  <= {IDLE_TARGET * 1000:.0f} ms/min "
                f"{verdict(data['cpu_s_per_min'], IDLE_TARGET)}")
    if "error" in result:
        lines.append(f"FAILED: {result['error'].splitlines()[0]}")
    return "\n".join(lines)


def snapshot_revision(rev: str, into: Path) -> dict:
    """Extract reconciler/ and schemas/ of commit `rev` into `into` (git archive: read-only)."""
    done = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "reconciler",
                           "schemas"], capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"--rev {rev}: {done.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    build_script = into / "reconciler" / "executor" / "_build.py"
    if build_script.exists():  # what installing that commit would compile: its launcher
        subprocess.run([sys.executable, str(build_script)], stdout=subprocess.DEVNULL)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                            capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "dirty_files": 0, "revision": rev}


def launcher_of(code_root: str) -> str:
    """Which launcher the sandbox of the code under `code_root` starts actions with."""
    import importlib.util

    build = Path(code_root, "reconciler", "executor", "_build.py")
    if not build.exists():
        return "Python launcher"
    spec = importlib.util.spec_from_file_location("bench_launcher_build", build)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = module.compiled_launcher()
    return f"compiled launcher {Path(found).name}" if found else "Python launcher (none compiled)"


def environment(args, spos: list[str], code: dict, code_root: str) -> dict:
    bwrap = shutil.which("bwrap")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() \
        if bwrap else "no bubblewrap"
    where = os.path.realpath(args.workdir or tempfile.gettempdir())
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "bubblewrap": version,
        "launcher": launcher_of(code_root),
        "spos_command": shlex.join(spos),
        "code": code,
        "workdir": where,
        "workdir_fs": file_system(where),
        "file_create_start_s": create_cost(where),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": cpu_pressure(),
        "memory_cgroups_start": memory_cgroups(),
    }


def made_note(env_info: dict) -> str:
    made = env_info.get("made_mount_points")
    return (f" (and empty {' and '.join(made)} on the host for the duration, as on a device)"
            if made else "")


def report(args, env_info: dict, result: dict) -> None:
    payload = save_results(args, env_info, {"result": result})
    out = sys.stderr if args.json == "-" else sys.stdout
    stamp = result.get("stamp", {})
    lines = [
        f"spos executor benchmark, {env_info['date']}: {env_info['cpus']} CPUs, Python "
        f"{env_info['python']}, kernel {env_info['kernel']}, {env_info['bubblewrap']}, "
        f"{env_info.get('launcher', 'Python launcher')}",
        code_line(env_info),
        f"action: {shlex.join(stamp.get('argv', []))} ({stamp.get('kind', '?')}), prints "
        "CLOCK_REALTIME first; temporary device root in "
        f"{env_info['workdir']}{made_note(env_info)}{file_system_note(env_info)}; "
        "executor defaults (--max-parallel 4, "
        "--max-per-agent 2)" + (f"; {args.agents} more agents applied that never run"
                                if args.agents else ""),
        f"latency: {args.runs} runs per path after a warm-up, paths interleaved, {args.gap:g} s "
        f"apart; throughput: {args.queued} queued x {args.repeat}; idle windows {args.idle:g} s",
        load_line(env_info, "min is the steadier figure"),
        "",
        table(result),
    ]
    print("\n".join(lines), file=out)
    if args.json == "-":
        print(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100,
                        help="measured latency runs per path (default 100; with fewer, p99 is the "
                             "maximum)")
    parser.add_argument("--gap", type=float, default=0.05, metavar="SECONDS",
                        help="pause between latency runs, so each finds the executor asleep "
                             "(default 0.05)")
    parser.add_argument("--queued", type=int, default=200, metavar="N",
                        help="runs queued for the throughput measurement (default 200)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput measurements (default 3)")
    parser.add_argument("--idle", type=float, default=300, metavar="SECONDS",
                        help="length of each idle window (default 300, the executor's rescan "
                             "interval, so that each window holds one rescan)")
    parser.add_argument("--agents", type=int, default=0, metavar="N",
                        help="also apply N agents that nothing enqueues (a device with many agents)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    parser.add_argument("--spos", metavar="CMD",
                        help="how to start spos (default: the spos script beside this python)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--live", action="store_true",
                        help="run the working tree's code, not a snapshot taken at start")
    source.add_argument("--rev", metavar="REV",
                        help="run the code of this commit (e.g. HEAD), not the working tree's: "
                             "for a checkout that others are editing")
    parser.add_argument("--workdir", metavar="DIR", help="where to create the temporary root")
    parser.add_argument("--keep", action="store_true", help="keep the device root, its runs and logs")
    args = parser.parse_args()
    if min(args.runs, args.queued, args.repeat) < 1 or args.idle <= 0 or args.gap < 0:
        parser.error("--runs, --queued and --repeat must be at least 1, --idle positive")
    if os.geteuid() != 0:
        parser.error("the executor's sandbox needs root")
    spos = shlex.split(args.spos) if args.spos else default_spos()

    code_dir = None if args.live else Path(tempfile.mkdtemp(prefix="spos-bench-code-", dir=args.workdir))
    try:
        if args.rev:
            code = snapshot_revision(args.rev, code_dir)
        else:
            code = snapshot_code(code_dir) if code_dir else describe_code()
        code["snapshot"] = code_dir is not None
        runner = Runner(spos, str(code_dir) if code_dir else None)
        code_root = str(code_dir) if code_dir else package_parent()
        env_info = environment(args, spos, code, code_root)
        with state_mount_point() as made:
            env_info["made_mount_points"] = made
            result = ExecutorBench(args, runner, spos, code_root).run()
        runner.close()
        report(args, env_info, result)
    finally:
        if code_dir:
            shutil.rmtree(code_dir, ignore_errors=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
