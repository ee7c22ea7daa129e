#!/usr/bin/env python3
"""Whole-process timings and peak memory of spos over generated repositories of N agents.

    python3 bench/bench_reconcile.py [--sizes 10,100,1000,10000] [--repeat 5] [--json FILE]
                                     [--profile] [--budget S] [--keep] [--live] [--spos CMD]

For each size N it writes, in a fresh temporary directory, a git repository with `agents.d/`
(N files, each one Agent with two tasks and one cron Schedule, sharing a few Quota and
Capability profiles in `profiles.yaml`) and `policies/` (the repository's own policies, or a
generated baseline), applies it once to a temporary device root (creating spos's state) and
runs one no-op plan (which writes the manifest cache). Then it measures, each as a separate
process of the real `spos` executable, exactly as a user or cron starts it:

- validate            `spos validate agents.d`: full parse and schema check (validate never
                      uses the cache).
- plan, no-op         `spos plan --detailed-exitcode`: nothing changed (warm manifest cache).
- apply, 1 changed    `spos apply --auto-approve` after editing one agent's file (a task
                      priority and its schedule's minute). Each repeat edits a different agent,
                      and the file is restored and re-applied (unmeasured) afterwards. The
                      files under the root that the apply created, changed or removed are
                      counted: only that agent's config and cron file may change, besides
                      spos's own bookkeeping (inventory, manifest cache, apply lock).
- action run          `spos action run --agent A --task T --schedule S`, what a crontab line
                      runs every minute; the same with `--cron/--cron-tz`, what the line of a
                      Schedule with a timeZone runs (both through the `spos` script); and the
                      command a rendered crontab line really runs: the lean entry point under
                      `python3 -I -S`.

Wall time is measured from spawning the process to reaping it; CPU time and peak RSS come from
the rusage of that one child (os.wait4 in a small spawner process, see SPAWNER).
PYTHONDONTWRITEBYTECODE is removed from the children's environment so they use (and write)
.pyc files as an installed spos would, and SPOS_COMMAND is fixed so the rendered crontab lines
do not depend on how spos was started. Unless --live is given, reconciler/ and schemas/ are
copied at start and the children import the copy, so a long run measures one version of the
code even while the working tree changes.

See bench/README.md for the targets and the latest numbers.

Standard library only. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import pstats
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPOS_COMMAND = "/usr/local/bin/spos"
"""What the generated crontab lines call; fixed so that rendering is the same in every run."""
STATE = "var/lib/systemprompt-os"
BOOKKEEPING = (
    f"{STATE}/inventory.json",
    f"{STATE}/apply.lock",
    f"{STATE}/cache/manifests.marshal",
    f"{STATE}/cache/manifests.data",
    f"{STATE}/cache/plan.marshal",
)
"""Files every apply may rewrite besides the changed resources."""

# Targets from the issue / DESIGN.md section 4, in seconds; None: reported, no target.
ACTION_RUN_TARGET = 0.040


def plan_target(agents: int) -> float:
    return 0.3 if agents <= 1000 else 3.0


TARGETS = {
    "validate": lambda n: None,
    "plan no-op": plan_target,
    "apply 1 changed": plan_target,  # "costing about the same" as the no-op plan
    "action run": lambda n: ACTION_RUN_TARGET,
    "action run --cron-tz": lambda n: ACTION_RUN_TARGET,
    "action run, cron line": lambda n: ACTION_RUN_TARGET,
}

QUOTAS = {
    "small": ("25%", "256M", 64, "256M", "512M", "64M"),
    "standard": ("100%", "1G", 256, "1G", "5G", "256M"),
    "heavy": ("200%", "4G", 1024, "20G", "2G", "1G"),
}
CAPABILITIES = ("fetcher", "collector", "offline", "sensor")
TEAMS = ("research", "ops", "data", "facilities", "web", "edge", "lab", "field")


# ------------------------------------------------------------------------------ generation


def agent_name(index: int) -> str:
    return f"agent-{index:05d}"


def agent_file(index: int, variant: int = 0) -> str:
    """The manifest file of agent `index`. `variant` 1 is the one-agent change the apply
    benchmark makes: one task's priority and the schedule's minute."""
    name = agent_name(index)
    team = TEAMS[index % len(TEAMS)]
    capability = CAPABILITIES[index % len(CAPABILITIES)]
    quota = tuple(QUOTAS)[index % len(QUOTAS)]
    priority = 60 + variant
    minute = (index * 7 + variant * 30) % 60
    out = f"/var/lib/systemprompt-os/agents/{name}/output"
    if index % 10 == 0:
        # Every tenth agent reports daily in a named time zone: its crontab line carries
        # --cron/--cron-tz, the slower `action run` path.
        schedule = (
            f"  task: report\n"
            f'  cron: "{minute} 9 * * 1-5"\n'
            f"  timeZone: Europe/Berlin\n"
            f"  startingDeadline: 30m\n"
        )
        schedule_name = f"{name}-daily"
    else:
        schedule = (
            f"  task: collect\n"
            f'  cron: "{minute} * * * *"\n'
            f"  startingDeadline: 10m\n"
        )
        schedule_name = f"{name}-hourly"
    return f"""\
# {name}: generated by bench/bench_reconcile.py. Collects items every hour and
# writes a ranked report; shaped like agents.d/research-001.yaml.

apiVersion: spos/v1
kind: Agent
metadata:
  name: {name}
  labels:
    team: {team}
    role: worker
  annotations:
    owner: {team}-team@example.org
spec:
  description: Benchmark agent {index}, collecting and reporting for team {team}.
  capability: {capability}
  quota: {quota}
  env:
    OUTPUT_DIR: {out}
    PYTHONUNBUFFERED: "1"
  tasks:
    collect:
      description: Look for items published in the last hour and record new ones.
      command: ["/usr/bin/python3", "/opt/agents/bench/collect.py", "--since", "1h",
                "--agent", "{name}", "--out", "{out}/raw"]
      workdir: /opt/agents/bench
      timeout: 10m
      retries:
        limit: 2
        backoff:
          initial: 30s
          factor: 2
          max: 5m
      concurrency: Forbid
      priority: {priority}
    report:
      description: Rank and summarise what was collected.
      workdir: /opt/agents/bench
      timeout: 2h
      steps:
        - name: rank
          command: ["/usr/bin/python3", "/opt/agents/bench/rank.py", "--in", "{out}/raw",
                    "--top", "25"]
          timeout: 30m
        - name: summarize
          command: ["/usr/bin/python3", "/opt/agents/bench/summarize.py",
                    "--format", "markdown", "--out", "{out}/daily.md"]
          timeout: 30m
          continueOnError: true
      checkpoint:
        enabled: true
        interval: 5m
      concurrency: Forbid
      priority: 40
      env:
        SUMMARY_LANGUAGE: en
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: {schedule_name}
  labels:
    team: {team}
spec:
  agent: {name}
{schedule}"""


def profiles_file() -> str:
    docs = []
    for name, (cpu, memory, tasks_max, temp, output, log) in QUOTAS.items():
        docs.append(f"""\
apiVersion: spos/v1
kind: Quota
metadata:
  name: {name}
  labels:
    profile: quota
spec:
  cpu: "{cpu}"
  memory: {memory}
  ioWeight: 100
  tasksMax: {tasks_max}
  nice: 5
  storage:
    temp: {temp}
    output: {output}
    log: {log}
  retention:
    temp: 24h
    completed: 14d
    failed: 30d
""")
    network = {
        "fetcher": "      - any\n  denied:\n    network:\n      - 10.0.0.0/8\n      - 192.168.0.0/16\n",
        "collector": "      - loopback\n      - 10.20.0.5/32:443\n",
        "offline": "      - none\n",
        "sensor": "      - 10.20.0.20/32:8883\n",
    }
    for name in CAPABILITIES:
        docs.append(f"""\
apiVersion: spos/v1
kind: Capability
metadata:
  name: {name}
  labels:
    profile: capability
spec:
  description: Shared sandbox profile {name} of the generated agents.
  allowed:
    read:
      - /opt/agents/bench
      - /usr/lib/python3
      - /etc/ssl
    write:
      - /var/lib/systemprompt-os/agents
    execute:
      - /usr/bin/python3
    network:
{network[name]}""")
    return "# Shared profiles of the generated agents.\n" + "---\n".join(docs)


GENERATED_POLICY = """\
apiVersion: spos/v1
kind: Policy
metadata:
  name: baseline
spec:
  description: Generated baseline for the benchmark.
  deny:
    write: [/etc/shadow, /etc/sudoers, /boot, /usr/bin, /usr/sbin]
    execute: [/usr/bin/sudo, /bin/su]
  ceilings:
    cpu: "200%"
    memory: 8G
    tasksMax: 4096
    timeout: 12h
  schedules:
    minInterval: 1m
  require:
    capability: true
    quota: true
"""


def generate(repo: Path, agents: int, use_git: bool) -> None:
    manifests = repo / "agents.d"
    policies = repo / "policies"
    manifests.mkdir(parents=True)
    (manifests / "profiles.yaml").write_text(profiles_file())
    for index in range(1, agents + 1):
        (manifests / f"{agent_name(index)}.yaml").write_text(agent_file(index))
    own = sorted((REPO / "policies").glob("*.y*ml")) if (REPO / "policies").is_dir() else []
    policies.mkdir()
    if own:
        for path in own:
            shutil.copy(path, policies / path.name)
    else:
        (policies / "baseline.yaml").write_text(GENERATED_POLICY)
    if use_git:
        git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost",
               "-c", "commit.gpgsign=false"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"{agents} generated agents"], check=True)


# ------------------------------------------------------------------------------ running


class Failed(Exception):
    pass


SPAWNER = r"""
import json, os, signal, sys, time

def kill(pid):
    def handler(signum, frame):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return handler

for line in sys.stdin:
    job = json.loads(line)
    out = os.open(job["stdout"], os.O_WRONLY | os.O_TRUNC)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_TRUNC)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(job["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.execve(job["argv"][0], job["argv"], job["env"])
        except BaseException as exc:
            os.write(2, f"spawner: cannot start {job['argv'][0]}: {exc}\n".encode())
        os._exit(127)
    os.close(out)
    os.close(err)
    signal.signal(signal.SIGALRM, kill(pid))
    signal.alarm(max(1, int(job["timeout"])))
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    signal.alarm(0)
    print(json.dumps({"wall": wall, "status": status, "utime": usage.ru_utime,
                      "stime": usage.ru_stime, "maxrss_kb": usage.ru_maxrss}), flush=True)
"""
"""Starts every measured process. A separate small process, because a child's ru_maxrss
counts the memory of the process it was forked from (Linux records the old address space's
high-water mark at exec): forked from this benchmark, which holds large snapshots of the
root, `action run` would seem to take 80 MB at 10,000 agents. Forked from this ~10 MB
spawner, the floor is below any Python process."""


class Runner:
    """Starts spos processes with a fixed environment and measures each one."""

    CGROUPS = Path("/sys/fs/cgroup")

    def __init__(self, spos: list[str], code_path: str | None):
        env = dict(os.environ)
        for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME", "PYTHONTRACEMALLOC",
                     "PYTHONDEVMODE", "PYTHONMALLOC", "PYTHONWARNINGS", "PYTHONPATH"):
            env.pop(name, None)
        env["SPOS_COMMAND"] = SPOS_COMMAND
        env["GIT_OPTIONAL_LOCKS"] = "0"
        if code_path:
            # A snapshot of reconciler/ and schemas/: found on PYTHONPATH before the editable
            # install's finder, so edits to the working tree during a long run change nothing.
            env["PYTHONPATH"] = code_path
        self.env = env
        self.lean_env = {**env, "PYTHONPATH": code_path or package_parent()}
        self.spos = spos
        self.spawner = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SPAWNER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )


    def remove_cgroups(self, root: Path) -> None:
        """Remove the cgroups spos made for the device at `root` (a parent of its own, as for
        every root but `/`, with the agents' and runs' below), deepest first, in every
        hierarchy: a benchmark leaves none behind on the machine (one still holding a process
        stays). The parent's name comes from the code under test."""
        named = subprocess.run(
            [sys.executable, "-S", "-c", "import sys; from reconciler.cgroupfs import parent_for; "
             "print(parent_for(sys.argv[1]))", str(root)],
            env=self.lean_env, capture_output=True, text=True)
        parent = named.stdout.strip()
        if named.returncode != 0 or not parent.startswith("spos-"):
            return
        for top in [self.CGROUPS / parent, *self.CGROUPS.glob(f"*/{parent}")]:
            for directory, _, _ in os.walk(top, topdown=False):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
    def close(self) -> None:
        self.spawner.stdin.close()
        self.spawner.wait(timeout=30)

    def run(self, argv: list[str], cwd: Path, ok=(0,), timeout: float = 1800, lean=False) -> dict:
        """Run one process to completion: wall time, CPU time and peak RSS of exactly that
        child, measured by the spawner (fork, exec, wait4 with the child's own rusage)."""
        program = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
        if program is None:
            raise Failed(f"{argv[0]}: not found")
        with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
            job = {"argv": [program, *argv[1:]], "cwd": str(cwd), "timeout": timeout,
                   "env": self.lean_env if lean else self.env,
                   "stdout": out.name, "stderr": err.name}
            self.spawner.stdin.write(json.dumps(job) + "\n")
            self.spawner.stdin.flush()
            answer = self.spawner.stdout.readline()
            if not answer:
                raise Failed("the spawner process died")
            done = json.loads(answer)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        code = os.waitstatus_to_exitcode(done["status"])
        if code not in ok:
            raise Failed(f"exit {code}: {shlex.join(argv)}\n{stderr[-2000:]}{stdout[:2000]}")
        return {
            "wall": done["wall"],
            "cpu": done["utime"] + done["stime"],
            "maxrss_kb": done["maxrss_kb"],
            "rc": code,
            "stdout": stdout,
            "stderr": stderr,
        }


def summarise(samples: list[dict]) -> dict:
    walls = [s["wall"] for s in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "cpu_median_s": statistics.median(s["cpu"] for s in samples),
        "peak_rss_mb": max(s["maxrss_kb"] for s in samples) / 1024,
        "runs": len(walls),
        "samples_s": [round(w, 5) for w in walls],
    }


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file and symlink under `root`: path -> (inode, mtime_ns, size). An atomic write
    replaces the inode, an in-place write changes mtime."""
    files = {}
    for current, _, names in os.walk(root):
        for name in names:
            path = os.path.join(current, name)
            st = os.lstat(path)
            files[os.path.relpath(path, root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return files


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ one size


class SizeBench:
    """Everything measured for one repository size."""

    def __init__(self, agents: int, args, runner: Runner):
        self.agents = agents
        self.args = args
        self.runner = runner
        self.work = Path(tempfile.mkdtemp(prefix=f"spos-bench-{agents}-", dir=args.workdir))
        self.repo = self.work / "repo"
        self.root = self.work / "root"
        self.result: dict = {"agents": agents, "workdir": str(self.work), "steps": {},
                             "setup": {}, "apply_changes": []}
        spos = runner.spos
        r = ["--root", str(self.root)]
        self.apply_cmd = [*spos, *r, "apply", "--auto-approve", "agents.d"]
        self.plan_cmd = [*spos, *r, "plan", "--detailed-exitcode", "agents.d"]
        self.validate_cmd = [*spos, *r, "validate", "agents.d"]
        first = agent_name(1)
        self.action_cmd = [*spos, *r, "action", "run", "--agent", first, "--task", "collect",
                           "--schedule", f"{first}-hourly", "--deadline", "10m"]
        tz_agent = agent_name(10)  # every tenth agent's Schedule has a timeZone
        self.action_tz_cmd = [*spos, *r, "action", "run", "--agent", tz_agent, "--task", "report",
                              "--schedule", f"{tz_agent}-daily", "--deadline", "30m",
                              "--cron", "* * * * *", "--cron-tz", "Europe/Berlin"]
        # What a rendered crontab line really runs: the lean entry point under `python3 -I -S`
        # (no site-packages processing; enqueueing needs only the standard library). It finds
        # the package beside itself, so the snapshot's copy is measured when there is one.
        code_root = os.environ.get("SPOS_BENCH_CODE") or package_parent()
        self.action_lean_cmd = [sys.executable, "-I", "-S", os.path.join(code_root, "reconciler", "_cron.py"),
                                *self.action_cmd[len(spos):]]

    def run(self) -> dict:
        try:
            self.setup()
            self.measure("validate", self.validate_cmd, check=self.valid)
            self.result["manifests"] = self.result["steps"]["validate"]["manifests"] = self.manifests
            self.measure("plan no-op", self.plan_cmd, check=self.no_op)
            self.measure_apply_one()
            self.measure("action run", self.action_cmd, warm=True)
            if self.agents >= 10:
                self.measure("action run --cron-tz", self.action_tz_cmd, warm=True)
            self.measure("action run, cron line", self.action_lean_cmd, warm=True, lean=True)
            self.clear_queues()
            self.no_op(self.runner.run(self.plan_cmd, self.repo))
            if self.args.profile:
                self.result["profile"] = self.profile()
        except Failed as exc:
            self.result["error"] = str(exc)
            log(f"[{self.agents}] FAILED: {exc}")
        finally:
            self.runner.remove_cgroups(self.root)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        return self.result

    def setup(self) -> None:
        started = time.perf_counter()
        generate(self.repo, self.agents, use_git=not self.args.no_git)
        self.root.mkdir()
        setup = self.result["setup"]
        setup["generate_s"] = time.perf_counter() - started
        log(f"[{self.agents}] generated {self.agents} agents in {setup['generate_s']:.1f} s: "
            f"{self.repo}")
        first = self.runner.run(self.apply_cmd, self.repo)
        setup["first_apply_s"] = first["wall"]
        setup["first_apply_rss_mb"] = first["maxrss_kb"] / 1024
        log(f"[{self.agents}] first apply (creates everything; no cache before the state dir "
            f"exists): {first['wall']:.2f} s, {first['maxrss_kb'] / 1024:.0f} MB")
        warm = self.runner.run(self.plan_cmd, self.repo)
        self.no_op(warm)
        setup["cache_filling_plan_s"] = warm["wall"]
        setup["cache_bytes"] = sum(path.stat().st_size for path in (self.root / STATE / "cache").glob("manifests.*"))
        match = re.search(r"\((\d+) resources\)", warm["stdout"])
        self.result["resources"] = int(match.group(1)) if match else None
        log(f"[{self.agents}] first plan (fills the manifest cache): {warm['wall']:.2f} s; cache "
            f"{setup['cache_bytes'] / 1e6:.1f} MB")

    def measure(self, step: str, argv, check=None, warm=False, lean=False) -> None:
        """Run `argv` `--repeat` times (at least 3 once a step has used up --budget)."""
        if warm:  # let the first run of a new code path write its .pyc files
            self.runner.run(argv, self.repo, lean=lean)
        samples, spent = [], 0.0
        while len(samples) < self.args.repeat and not (len(samples) >= 3 and spent > self.args.budget):
            sample = self.runner.run(argv, self.repo, lean=lean)
            if check:
                check(sample)
            samples.append(sample)
            spent += sample["wall"]
        self.result["steps"][step] = summarise(samples)
        data = self.result["steps"][step]
        log(f"[{self.agents}] {step}: median {_fmt_time(data['median_s'])}, min "
            f"{_fmt_time(data['min_s'])} ({data['runs']} runs)")

    def valid(self, sample: dict) -> None:
        match = re.search(r"(\d+) manifests valid", sample["stdout"])
        if not match:
            raise Failed(f"validate said: {sample['stdout'][:2000]}{sample['stderr'][-2000:]}")
        self.manifests = int(match.group(1))

    @staticmethod
    def no_op(sample: dict) -> None:
        if sample["rc"] != 0 or "No changes." not in sample["stdout"]:
            raise Failed(f"plan is not a no-op:\n{sample['stdout'][:3000]}")

    def measure_apply_one(self) -> None:
        """Each repeat edits a different agent, applies (measured), checks which files under
        the root changed, then restores the file and applies again (not measured)."""
        samples, spent = [], 0.0
        for attempt in range(self.args.repeat):
            if attempt >= 3 and spent > self.args.budget:
                break
            index = 1 + (attempt * max(self.agents // self.args.repeat, 1)) % self.agents
            name = agent_name(index)
            path = self.repo / "agents.d" / f"{name}.yaml"
            path.write_text(agent_file(index, variant=1))
            before = tree_state(self.root)
            sample = self.runner.run(self.apply_cmd, self.repo)
            after = tree_state(self.root)
            if "Apply complete: 2 changed, 0 failed." not in sample["stdout"]:
                raise Failed(f"expected 2 changes for {name}:\n{sample['stdout'][-3000:]}")
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            resources = [p for p in changed if p not in BOOKKEEPING]
            self.result["apply_changes"].append({
                "agent": name,
                "changed_files": len(changed),
                "resource_files": resources,
                "bookkeeping_files": [p for p in changed if p in BOOKKEEPING],
                "only_that_agent": set(resources) == {
                    f"{STATE}/agents/{name}/agent.json", f"etc/cron.d/spos-{name}"},
            })
            samples.append(sample)
            spent += sample["wall"]
            path.write_text(agent_file(index))
            self.runner.run(self.apply_cmd, self.repo)
        self.result["steps"]["apply 1 changed"] = data = summarise(samples)
        log(f"[{self.agents}] apply 1 changed: median {_fmt_time(data['median_s'])}, min "
            f"{_fmt_time(data['min_s'])} ({data['runs']} runs)")

    def clear_queues(self) -> None:
        for name in (agent_name(1), agent_name(10)):
            for path in (self.root / STATE / "agents" / name / "queue").glob("*.json"):
                path.unlink()

    def profile(self) -> dict:
        """cProfile and -X importtime of one no-op plan, -X importtime of one action run."""
        out = {}
        r = ["--root", str(self.root)]
        module = [sys.executable, "-m", "reconciler"]
        with tempfile.TemporaryDirectory() as tmp:
            stats_file = Path(tmp, "plan.prof")
            self.runner.run([sys.executable, "-m", "cProfile", "-o", str(stats_file),
                             "-m", "reconciler", *r, "plan", "agents.d"], self.repo)
            for order in ("cumulative", "tottime"):
                text = io.StringIO()
                pstats.Stats(str(stats_file), stream=text).strip_dirs().sort_stats(order).print_stats(25)
                out[f"plan_cprofile_{order}"] = _trim_pstats(text.getvalue())
        sample = self.runner.run([sys.executable, "-X", "importtime", *module[1:], *r, "plan",
                                  "agents.d"], self.repo)
        out["plan_importtime"] = _top_imports(sample["stderr"])
        sample = self.runner.run([sys.executable, "-X", "importtime", *module[1:],
                                  *self.action_cmd[len(self.runner.spos):]], self.repo)
        out["action_run_importtime"] = _top_imports(sample["stderr"])
        self.clear_queues()
        return out


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            head = [l.strip() for l in lines[:index] if "function calls" in l]
            return "\n".join(head + lines[index:]).rstrip()
    return text


def _top_imports(stderr: str, count: int = 15) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, module) of the top-level imports, by cumulative time."""
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match and not match.group(3).strip(" ") and len(match.group(3)) == 1:
            rows.append((int(match.group(1)), int(match.group(2)), match.group(4)))
    return sorted(rows, key=lambda r: -r[1])[:count]


# ------------------------------------------------------------------------------ reporting


def startup_floor(runner: Runner, repeat: int) -> dict:
    """What starting Python at all costs on this machine, for scale."""
    result = {}
    for label, argv in (
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("python -S -c pass (no site)", [sys.executable, "-S", "-c", "pass"]),
    ):
        runner.run(argv, REPO)
        result[label] = summarise([runner.run(argv, REPO) for _ in range(max(repeat, 5))])
    return result


def verdict(step: str, agents: int, median: float) -> tuple[str, str]:
    target = TARGETS[step](agents)
    if target is None:
        return "-", ""
    return f"<= {_fmt_time(target)}", "ok" if median <= target else "MISS"


def _fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def table(results: list[dict], floor: dict) -> str:
    lines = []
    header = (f"{'agents':>6}  {'step':<22} {'median':>8} {'min':>8} {'cpu':>8} "
              f"{'peak RSS':>8} {'runs':>4}  {'target':<9} {'':4}")
    lines.append(header)
    lines.append("-" * len(header))
    for res in results:
        for step, data in res["steps"].items():
            target, ok = verdict(step, res["agents"], data["median_s"])
            lines.append(
                f"{res['agents']:>6}  {step:<22} {_fmt_time(data['median_s']):>8} "
                f"{_fmt_time(data['min_s']):>8} {_fmt_time(data['cpu_median_s']):>8} "
                f"{data['peak_rss_mb']:>5.0f} MB {data['runs']:>4}  {target:<9} {ok}".rstrip())
        if "error" in res:
            lines.append(f"{res['agents']:>6}  FAILED: {res['error'].splitlines()[0]}")
        lines.append("")
    lines.append("Setup, once per size (not targets):")
    for res in results:
        s = res["setup"]
        if "cache_filling_plan_s" not in s:
            continue
        lines.append(
            f"  {res['agents']:>6} agents, {res.get('manifests', '?')} manifests, "
            f"{res.get('resources', '?')} resources: generate {_fmt_time(s['generate_s'])}; "
            f"first apply {_fmt_time(s['first_apply_s'])} ({s['first_apply_rss_mb']:.0f} MB); "
            f"first plan {_fmt_time(s['cache_filling_plan_s'])}; cache {s['cache_bytes'] / 1e6:.1f} MB")
    lines.append("")
    lines.append("Files under the root changed by each measured one-agent apply:")
    for res in results:
        if not res["apply_changes"]:
            continue
        counts = sorted({c["changed_files"] for c in res["apply_changes"]})
        all_ok = all(c["only_that_agent"] for c in res["apply_changes"])
        example = res["apply_changes"][0]
        lines.append(
            f"  {res['agents']:>6} agents: {'/'.join(map(str, counts))} files; "
            f"{'only' if all_ok else 'NOT ONLY'} the edited agent's "
            f"{' and '.join(Path(p).name for p in example['resource_files'])}, "
            f"plus {', '.join(Path(p).name for p in example['bookkeeping_files'])}")
    lines.append("")
    lines.append("Python start-up on this machine, for scale:")
    for label, data in floor.items():
        lines.append(f"  {label:<28} median {_fmt_time(data['median_s'])}, min "
                     f"{_fmt_time(data['min_s'])}")
    return "\n".join(lines)


def print_profiles(results: list[dict], out=sys.stdout) -> None:
    for res in results:
        prof = res.get("profile")
        if not prof:
            continue
        n = res["agents"]
        print(f"\n=== {n} agents: cProfile of a no-op `plan`, by cumulative time", file=out)
        print(prof["plan_cprofile_cumulative"], file=out)
        print(f"\n=== {n} agents: cProfile of a no-op `plan`, by own time", file=out)
        print(prof["plan_cprofile_tottime"], file=out)
        for key, title in (("plan_importtime", "plan"), ("action_run_importtime", "action run")):
            print(f"\n=== {n} agents: -X importtime of `{title}`: top-level imports, "
                  "cumulative and self µs", file=out)
            for self_us, cumulative_us, module in prof[key]:
                print(f"  {cumulative_us:>8} {self_us:>8}  {module}", file=out)


def environment(args, spos: list[str], code: dict) -> dict:
    try:
        import _ruamel_yaml  # noqa: F401
        clib = True
    except ImportError:
        clib = False
    where = os.path.realpath(args.workdir or tempfile.gettempdir())
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "ruamel_c_loader": clib,
        "spos_command": shlex.join(spos),
        "code": code,
        "workdir": where,
        "workdir_fs": file_system(where),
        "git": not args.no_git,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": cpu_pressure(),
        "memory_cgroups_start": memory_cgroups(),
    }


def file_system(path: str) -> str:
    """The type of the file system holding `path`, and for ext4 whether it keeps a journal
    ("ext4 without a journal"). Without one, ext4 allocating an inode passes over every inode
    of the group freed in the last minute (the last six minutes while their table block is not
    yet written back), so minutes of file churn make creating a file slower: see `create_cost`."""
    where = os.path.realpath(path)
    kind, best, device = "?", "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount = fields[4].replace("\\040", " ")
            inside = where == mount or where.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, device = mount, fields[2]
                kind = fields[fields.index("-") + 1]
    if kind in ("ext4", "ext3"):
        try:
            name = os.path.basename(os.path.realpath(f"/sys/dev/block/{device}"))
            with open(f"/sys/fs/ext4/{name}/journal_task") as handle:
                journal = handle.read().strip() != "<none>"
            kind += " with a journal" if journal else " without a journal"
        except OSError:
            pass
    return kind


def create_cost(where: str, count: int = 200) -> float:
    """Median seconds to create an empty file in a new directory under `where`. Every run the
    executor starts creates a few files and directories there and removes most of them; on
    ext4 without a journal that churn makes the next creations slower for minutes after
    (file_system), which this shows before and after a benchmark."""
    directory = tempfile.mkdtemp(prefix="spos-bench-create-", dir=where)
    times = []
    try:
        for index in range(count):
            started = time.perf_counter()
            os.close(os.open(f"{directory}/{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            times.append(time.perf_counter() - started)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(times)


def memory_cgroups() -> int | None:
    """How many memory cgroups the kernel has (/proc/cgroups). Each run's cgroup is removed
    when the run ends, but one whose page cache is still charged to it lives on, dying, until
    that is reclaimed; hundreds of them make every cgroup operation slower, and the runs'
    start with it (`echo 3 > /proc/sys/vm/drop_caches` lets them go)."""
    try:
        with open("/proc/cgroups") as handle:
            for line in handle:
                fields = line.split()
                if fields and fields[0] == "memory":
                    return int(fields[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_pressure() -> str:
    """/proc/pressure/cpu "some avg60": the share of the last minute in which a runnable task
    waited for a CPU, i.e. how much other work competed with the benchmark."""
    try:
        with open("/proc/pressure/cpu") as handle:
            match = re.search(r"some avg10=([\d.]+) avg60=([\d.]+)", handle.read())
    except OSError:
        return "n/a"
    return f"{match.group(2)}%" if match else "n/a"


def package_parent() -> str:
    """The directory holding the `reconciler` package (the checkout, or site-packages)."""
    import importlib.util

    spec = importlib.util.find_spec("reconciler")
    if spec is None or not spec.origin:
        raise SystemExit("reconciler is not importable: pip install -e . first")
    return str(Path(spec.origin).resolve().parent.parent)


def snapshot_code(into: Path) -> dict:
    """Copy reconciler/ and schemas/ of the checkout to `into`; describe what was copied."""
    for name in ("reconciler", "schemas"):
        shutil.copytree(REPO / name, into / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return describe_code()


def describe_code() -> dict:
    def git(*words):
        done = subprocess.run(["git", "-C", str(REPO), *words], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "reconciler", "schemas")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty_files": len(dirty.splitlines()) if dirty else 0}


def default_spos() -> list[str]:
    """The installed console script beside this interpreter (not a pyenv shim, whose bash
    wrapper adds tens of milliseconds), else `python -m reconciler`."""
    script = Path(sys.executable).parent / "spos"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "reconciler"]


def save_results(args, env_info: dict, data: dict) -> str:
    """Note the load at the end, write the environment and `data` as JSON to `--json FILE`
    (every benchmark's file has this shape), and return that JSON."""
    env_info["loadavg_end"] = os.getloadavg()
    env_info["cpu_pressure_end"] = cpu_pressure()
    env_info["memory_cgroups_end"] = memory_cgroups()
    if "file_create_start_s" in env_info:
        env_info["file_create_end_s"] = create_cost(env_info["workdir"])
    payload = json.dumps({"environment": env_info, **data}, indent=2, default=str)
    if args.json and args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(payload + "\n")
    return payload


def file_system_note(env_info: dict) -> str:
    """The temporary root's file system and what creating a file there cost before and after,
    for a report's header ("" when not measured)."""
    if "file_create_start_s" not in env_info:
        return ""
    end = env_info.get("file_create_end_s")
    return (f"; its file system: {env_info['workdir_fs']}, where creating a file took "
            f"{env_info['file_create_start_s'] * 1e6:.0f} us at start"
            + (f" and {end * 1e6:.0f} us at end" if end is not None else ""))


def code_line(env_info: dict) -> str:
    """Which code ran, for a report's header."""
    code = env_info["code"]
    dirty = f" + {code['dirty_files']} changed files" if code["dirty_files"] else ""
    if code.get("revision"):
        where = f"--rev {code['revision']}, extracted from git"
    else:
        where = "snapshot taken at start" if code.get("snapshot") else "live working tree"
    return f"code: {code['commit']}{dirty} ({where}); started as {env_info['spos_command']}"


def load_line(env_info: dict, steadier: str = "min and cpu are the steadier figures") -> str:
    """How busy the machine was, for a report's header."""
    cgroups = ""
    if env_info.get("memory_cgroups_start") is not None:
        cgroups = (f"; memory cgroups {env_info['memory_cgroups_start']} -> "
                   f"{env_info.get('memory_cgroups_end')} (dying ones included)")
    return (f"load average {env_info['loadavg_start'][0]:.2f} at start, "
            f"{env_info['loadavg_end'][0]:.2f} at end; CPU pressure (some, avg60) "
            f"{env_info['cpu_pressure_start']} -> {env_info['cpu_pressure_end']}{cgroups}. "
            f"Competing work inflates wall times; {steadier}.")


def report(args, env_info: dict, floor: dict, results: list[dict], final: bool) -> None:
    """Write the JSON (after every size) and, at the end, the table: to stdout, or to stderr
    when the JSON goes to stdout (`--json -`)."""
    payload = save_results(args, env_info, {"startup": floor, "results": results})
    if not final:
        return
    out = sys.stderr if args.json == "-" else sys.stdout
    lines = [
        f"spos reconcile benchmark, {env_info['date']}: {env_info['cpus']} CPUs, Python "
        f"{env_info['python']}, ruamel C loader {'yes' if env_info['ruamel_c_loader'] else 'NO'}",
        code_line(env_info),
        f"repeats {args.repeat} (a step stops after 3 once it has used {args.budget:g} s); nice "
        f"{env_info['nice']}; work dir {env_info['workdir']} ({env_info['workdir_fs']}); "
        f"manifests in git: {'yes' if env_info['git'] else 'no'}",
        load_line(env_info),
        "",
        table(results, floor),
    ]
    print("\n".join(lines), file=out)
    if args.profile:
        print_profiles(results, out)
    if args.json == "-":
        print(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000",
                        help="comma-separated agent counts (default 10,100,1000,10000)")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per step (default 5)")
    parser.add_argument("--budget", type=float, default=60, metavar="SECONDS",
                        help="stop repeating a step after 3 runs once it has taken this long "
                             "(keeps 10,000 agents bounded; default 60)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON, after every size ('-': stdout)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a no-op plan per size (cProfile, -X importtime)")
    parser.add_argument("--spos", metavar="CMD",
                        help="how to start spos (default: the spos script beside this python)")
    parser.add_argument("--live", action="store_true",
                        help="run the working tree's code, not a snapshot taken at start")
    parser.add_argument("--workdir", metavar="DIR", help="where to create the temporary repos and roots")
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="run at this nice value (e.g. -5 to shield the numbers from other "
                             "work; negative needs root)")
    parser.add_argument("--keep", action="store_true", help="keep the generated repos and roots")
    parser.add_argument("--no-git", action="store_true",
                        help="do not make the generated manifests a git repository")
    args = parser.parse_args()
    try:
        sizes = [int(s.strip().replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: comma-separated whole numbers, e.g. 10,100,1000")
    if args.repeat < 1 or not sizes or min(sizes) < 1:
        parser.error("--repeat and every size must be at least 1")
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    spos = shlex.split(args.spos) if args.spos else default_spos()

    code_dir = None if args.live else Path(tempfile.mkdtemp(prefix="spos-bench-code-", dir=args.workdir))
    try:
        code = snapshot_code(code_dir) if code_dir else describe_code()
        code["snapshot"] = code_dir is not None
        if code_dir:
            os.environ["SPOS_BENCH_CODE"] = str(code_dir)
        runner = Runner(spos, str(code_dir) if code_dir else None)
        env_info = environment(args, spos, code)
        if not env_info["ruamel_c_loader"]:
            log("warning: ruamel.yaml.clib is missing: the safe loader falls back to pure Python")
        floor = startup_floor(runner, args.repeat)
        results = []
        for agents in sizes:
            results.append(SizeBench(agents, args, runner).run())
            report(args, env_info, floor, results, final=False)
        runner.close()
        report(args, env_info, floor, results, final=True)
    finally:
        if code_dir:
            shutil.rmtree(code_dir, ignore_errors=True)
    return 1 if any("error" in res for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
