#!/usr/bin/env python3
"""Whole-process timings of `spos sync` against a remote holding N agents, beside `spos plan`
and `spos apply` on the same repository.

    python3 bench/bench_sync.py [--sizes 100,1000] [--repeat 5] [--json FILE] [--no-baseline]
                                [--no-phases] [--budget S] [--keep] [--live] [--spos CMD]

For each size N (default 1,000) it generates bench_reconcile.py's repository of N agents
(`generate`: agents.d/ with one Agent and one Schedule per file, shared profiles, policies/),
commits it, and pushes it to a bare repository in the same temporary directory: the remote,
given to spos as a local path. Then, each a separate process of the real `spos` executable:

- Baseline (skipped with --no-baseline): bench_reconcile.py's own steps on the working
  repository and a root of their own: `spos plan --detailed-exitcode` with nothing to do and
  `spos apply --auto-approve` after editing one agent, so the overhead of sync is visible.
- First sync   `spos sync --root R --repo REMOTE` on an empty root: fetches everything,
               exports, applies every resource. Setup, reported, not a target.
- sync, no change
               the remote has nothing new: one fetch, then a no-op plan of the checkout.
               Checked: outcome "unchanged".
- sync, 1 agent changed
               before each run one agent's file is edited (a task's priority and its
               Schedule's minute, bench_reconcile.py's edit), committed and pushed (then a
               pause of 0.5 s: the remote shares the disk, a real one would not). Checked:
               outcome "applied" with exactly that agent's two resources changed, and only that
               agent's files (plus spos's bookkeeping and sync/) changed under the root.
- sync, no change after a new revision
               the next sync after each of those, once the exported files are older than the
               plan memo's settle time (as the daemon's next sync, a minute later, finds them):
               the export gave every file a new inode and times, so this sync reads and hashes
               them all again. Checked: outcome "unchanged".

Where the time goes: unless --no-phases, each kind of sync is also run `--repeat` times by a
probe process (a small script, same interpreter and code) that calls `reconciler.sync.sync()`
with the functions of each phase wrapped in timers: fetch (git fetch and the other git runs),
export (git ls-tree, git cat-file and writing the files, swapping the checkout), plan (set-up,
hashing the manifest files, checking and rendering, observing the device, diffing), apply and
saving sync/state.json; its process wall time gives start-up and imports.

Wall time, CPU time and peak RSS come from bench_reconcile.py's spawner (os.wait4 on exactly
that child). Unless --live is given, reconciler/ and schemas/ are copied at start and every
child imports the copy (bench_reconcile.py's snapshot).

See bench/README.md (section Sync) for the latest numbers.

Standard library only. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_reconcile import (
    BOOKKEEPING, STATE, Failed, Runner, SizeBench, agent_file, agent_name, code_line,
    default_spos, describe_code, environment, generate, load_line, log,
    package_parent, plan_target, save_results, snapshot_code, startup_floor, summarise,
    tree_state,
)
from bench_reconcile import _fmt_time as fmt_time

BRANCH = "main"
PUSH_PAUSE = 0.5
"""Seconds between pushing an edit and the sync that fetches it."""
SYNC_STATE = f"{STATE}/sync/"
GIT_IDENTITY = ("-c", "user.name=bench", "-c", "user.email=bench@localhost",
                "-c", "commit.gpgsign=false")

NO_CHANGE = "sync, no change"
CHANGED = "sync, 1 agent changed"
AFTER = "sync, no change after a new revision"
BASE_PLAN = "spos plan, no-op"
BASE_APPLY = "spos apply, 1 changed"
STEPS = (NO_CHANGE, CHANGED, AFTER, BASE_PLAN, BASE_APPLY)
BASELINE_OF = {NO_CHANGE: BASE_PLAN, CHANGED: BASE_APPLY}

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import reconciler.cli
import reconciler.apply as apply_module
import reconciler.gitsync as gitsync
import reconciler.memo as memo_module
import reconciler.pipeline as pipeline
import reconciler.sync as sync_module
t_imports = time.perf_counter()

spans, gits, marks = {}, [], {}

def timed(owner, name, key=None):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        label = key(args) if key else name
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spans.setdefault(label, []).append((start, time.perf_counter()))
    setattr(owner, name, wrapper)

Mirror = gitsync.Mirror
timed(Mirror, "fetch")
timed(Mirror, "_git", key=lambda args: "git " + args[1])
timed(Mirror, "_list_tree")
timed(Mirror, "_write_blobs")
start_git = Mirror._start
def counting_start(self, args, **kwargs):
    gits.append(args[0])
    return start_git(self, args, **kwargs)
Mirror._start = counting_start
timed(sync_module, "_checkout")
timed(sync_module.SyncState, "save")
timed(pipeline, "make_plan")
timed(memo_module, "fingerprint")
timed(apply_module, "apply_locked")

def mark(text):
    marks.setdefault(text.split()[0].rstrip("."), time.perf_counter())

t_sync = time.perf_counter()
result = sync_module.sync(sys.argv[1], sync_module.SyncOptions(repo=sys.argv[2]), progress=mark)
t_end = time.perf_counter()

def total(key):
    return sum(end - start for start, end in spans.get(key, ()))

plan_start, plan_end = spans["make_plan"][0]
loading, observing, planning = marks["Loading"], marks["Observing"], marks["Planning"]
phases = {
    "lock, state": marks.get("Fetching", t_sync) - t_sync,
    "fetch: git fetch": total("git fetch"),
    "fetch: other": total("fetch") - total("git fetch"),
    "export: git ls-tree": total("_list_tree"),
    "export: git cat-file, write": total("_write_blobs"),
    "export: swap, other": total("_checkout") - total("_list_tree") - total("_write_blobs"),
    "plan: set-up": loading - plan_start,
    "plan: hash files": total("fingerprint"),
    "plan: check, render": observing - loading - total("fingerprint"),
    "plan: observe": planning - observing,
    "plan: diff": plan_end - planning,
    "apply": total("apply_locked"),
    "save state": total("save"),
}
phases["other"] = (t_end - t_sync) - sum(phases.values())
phases = {"imports": t_imports - t0, **phases}
print(json.dumps({"phases": phases, "script_s": t_end - t0, "sync_s": t_end - t_sync,
                  "gits": gits, "result": result.to_json()}))
"""
"""Runs one sync in-process with each phase timed (written to a file in the work dir and run
as `python probe.py ROOT REMOTE`). Imports what `spos sync` imports up front
(the CLI, sync, gitsync, pipeline, apply) so that "imports" is one row; what those import
lazily (the YAML loader, jsonschema) stays in the phase that needs it."""

PHASES = ("python start-up, exit", "imports", "lock, state", "fetch: git fetch", "fetch: other",
          "export: git ls-tree", "export: git cat-file, write", "export: swap, other",
          "plan: set-up", "plan: hash files", "plan: check, render", "plan: observe",
          "plan: diff", "apply", "save state", "other")


def settle_seconds(code_root: str) -> float:
    """The plan memo's SETTLE_SECONDS (reconciler/memo.py of the code measured): a file is
    remembered by its stat only once it is this old."""
    try:
        text = Path(code_root, "reconciler", "memo.py").read_text()
        return float(re.search(r"^SETTLE_SECONDS = ([\d.]+)", text, re.M).group(1))
    except (OSError, AttributeError, ValueError):
        return 2.0


def schedule_name(index: int) -> str:
    return re.search(r"kind: Schedule\nmetadata:\n  name: (\S+)", agent_file(index)).group(1)


class SyncBench:
    """Everything measured for one repository size."""

    def __init__(self, agents: int, args, runner: Runner, settle: float):
        self.agents, self.args, self.runner = agents, args, runner
        self.base = SizeBench(agents, args, runner)  # its work dir, working repo and plan/apply root
        self.work, self.repo = self.base.work, self.base.repo
        self.remote = self.work / "remote.git"
        self.root = self.work / "sync-root"
        self.settle_wait = settle + 0.25
        self.sync_cmd = [*runner.spos, "--root", str(self.root), "sync", "--repo", str(self.remote),
                         "--json"]
        self.probe_file = self.work / "probe.py"
        self.probe_cmd = [sys.executable, str(self.probe_file), str(self.root), str(self.remote)]
        self.edits = 0
        self.variant: dict[int, int] = {}
        self.result: dict = {"agents": agents, "workdir": str(self.work), "steps": {},
                             "setup": {}, "sync_changes": [], "phases": {}}

    # --------------------------------------------------------------------------- steps

    def run(self) -> dict:
        try:
            self.setup()
            if not self.args.no_baseline:
                self.baseline()
            self.measure_no_change()
            self.measure_changed()
            if not self.args.no_phases:
                self.probe()
            self.expect(self.runner.run(self.sync_cmd, self.repo), "unchanged")
        except Failed as exc:
            self.result["error"] = str(exc)
            log(f"[{self.agents}] FAILED: {exc}")
        finally:
            self.runner.remove_cgroups(self.root)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        return self.result

    def setup(self) -> None:
        setup = self.result["setup"]
        if self.args.no_baseline:
            started = time.perf_counter()
            generate(self.repo, self.agents, use_git=True)
            setup["generate_s"] = time.perf_counter() - started
        else:
            self.base.setup()  # generates, first apply and first plan on the baseline's root
            setup.update(self.base.result["setup"])
            self.result["resources"] = self.base.result.get("resources")
        self.root.mkdir()
        subprocess.run(["git", "init", "-q", "--bare", str(self.remote)], check=True)
        started = time.perf_counter()
        self.git("push", "-q", str(self.remote), f"HEAD:refs/heads/{BRANCH}")
        setup["push_s"] = time.perf_counter() - started
        log(f"[{self.agents}] pushed {self.agents} agents to {self.remote}")

        first = self.runner.run(self.sync_cmd, self.repo)
        changed = self.expect(first, "applied")["changed"]
        setup.update(first_sync_s=first["wall"], first_sync_cpu_s=first["cpu"],
                     first_sync_rss_mb=first["maxrss_kb"] / 1024, first_sync_changed=len(changed))
        resources = self.result.get("resources")
        if resources is not None and resources != len(changed):
            log(f"[{self.agents}] warning: the first sync changed {len(changed)} resources, the "
                f"plan of the working repository has {resources}")
        self.result.setdefault("resources", len(changed))
        log(f"[{self.agents}] first sync (fetch everything, export, apply {len(changed)} "
            f"resources): {first['wall']:.2f} s, {first['maxrss_kb'] / 1024:.0f} MB")
        # The first sync read files it had just exported: too fresh for the memo to remember
        # (memo.py, SETTLE_SECONDS). The next one, once they are older, reads them all again.
        self.settle()
        second = self.runner.run(self.sync_cmd, self.repo)
        self.expect(second, "unchanged")
        setup["first_no_change_sync_s"] = second["wall"]
        log(f"[{self.agents}] first no-change sync (reads every file once more): "
            f"{second['wall']:.2f} s")

    def baseline(self) -> None:
        self.base.measure("plan no-op", self.base.plan_cmd, check=self.base.no_op)
        self.base.measure_apply_one()
        steps = self.base.result["steps"]
        self.result["steps"][BASE_PLAN] = steps["plan no-op"]
        self.result["steps"][BASE_APPLY] = steps["apply 1 changed"]
        self.result["baseline_apply_changes"] = self.base.result["apply_changes"]

    def measure_no_change(self) -> None:
        samples = self.repeated(lambda: self.expect_sample(self.sync_cmd, "unchanged"))
        self.store(NO_CHANGE, samples)

    def measure_changed(self) -> None:
        changed, after, pushes = [], [], []

        def one() -> dict:
            index, push_s = self.publish_edit()
            pushes.append(push_s)
            before = tree_state(self.root)
            sample = self.runner.run(self.sync_cmd, self.repo)
            ended = time.monotonic()
            self.expect(sample, "applied", self.expected_ids(index))
            self.record_files(index, before, tree_state(self.root))
            changed.append(sample)
            self.settle(since=ended)
            after.append(self.expect_sample(self.sync_cmd, "unchanged"))
            return sample

        self.repeated(one)
        self.result["setup"]["commit_push_median_s"] = statistics.median(pushes)
        self.store(CHANGED, changed)
        self.store(AFTER, after)

    def probe(self) -> None:
        """The same three syncs, run by PROBE, for the split by phase."""
        runs = {NO_CHANGE: [], CHANGED: [], AFTER: []}
        self.probe_file.write_text(PROBE)
        for _ in range(self.args.repeat):
            runs[NO_CHANGE].append(self.probe_one("unchanged"))
        for _ in range(self.args.repeat):
            index, _ = self.publish_edit()
            runs[CHANGED].append(self.probe_one("applied", self.expected_ids(index)))
            self.settle()
            runs[AFTER].append(self.probe_one("unchanged"))
        for step, probes in runs.items():
            self.result["phases"][step] = {
                "median_ms": {name: 1000 * statistics.median(p["phases"][name] for p in probes)
                              for name in PHASES},
                "process_median_ms": 1000 * statistics.median(p["wall"] for p in probes),
                "sync_median_ms": 1000 * statistics.median(p["sync_s"] for p in probes),
                "git_processes": probes[0]["gits"],
                "runs": probes,
            }
        log(f"[{self.agents}] probed {self.args.repeat} syncs of each kind")

    # --------------------------------------------------------------------------- helpers

    def repeated(self, once) -> list[dict]:
        """`once()` `--repeat` times, at least 3 once the runs have used up --budget."""
        samples, spent = [], 0.0
        while len(samples) < self.args.repeat and not (len(samples) >= 3 and spent > self.args.budget):
            sample = once()
            samples.append(sample)
            spent += sample["wall"]
        return samples

    def store(self, step: str, samples: list[dict]) -> None:
        self.result["steps"][step] = data = summarise(samples)
        log(f"[{self.agents}] {step}: median {fmt_time(data['median_s'])}, min "
            f"{fmt_time(data['min_s'])} ({data['runs']} runs)")

    def git(self, *words: str) -> None:
        done = subprocess.run(["git", "-C", str(self.repo), *GIT_IDENTITY, *words],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise Failed(f"git {' '.join(words)} in {self.repo}: {done.stderr.strip()}")

    def publish_edit(self) -> tuple[int, float]:
        """Edit the next agent's file (bench_reconcile.py's change, or back), commit and push
        it. Agents are spread over the repository; each edit flips that agent's variant, so
        every edit changes exactly its two resources."""
        stride = max(self.agents // (2 * self.args.repeat), 1)
        index = 1 + (self.edits * stride) % self.agents
        self.edits += 1
        variant = 1 - self.variant.get(index, 0)
        self.variant[index] = variant
        started = time.perf_counter()
        (self.repo / "agents.d" / f"{agent_name(index)}.yaml").write_text(agent_file(index, variant))
        self.git("commit", "-q", "-a", "-m", f"{agent_name(index)}: variant {variant}")
        self.git("push", "-q", str(self.remote), f"HEAD:refs/heads/{BRANCH}")
        pushed = time.perf_counter() - started
        # The remote shares this machine's disk; a real one does not. Let the push's fsyncs
        # (its pack, its ref) be committed before the sync starts writing files.
        time.sleep(PUSH_PAUSE)
        return index, pushed

    @staticmethod
    def expected_ids(index: int) -> set[str]:
        return {f"agent/{agent_name(index)}", f"cron/{schedule_name(index)}"}

    def settle(self, since: float | None = None) -> None:
        """Wait until the files the last sync exported are old enough for the plan memo."""
        if since is None:
            time.sleep(self.settle_wait)
        else:
            time.sleep(max(0.0, since + self.settle_wait - time.monotonic()))

    def expect_sample(self, argv, outcome: str) -> dict:
        sample = self.runner.run(argv, self.repo)
        self.expect(sample, outcome)
        return sample

    @staticmethod
    def expect(sample: dict, outcome: str, changed: set[str] | None = None) -> dict:
        """The sync's JSON result, checked: `outcome`, and exactly `changed` when given."""
        try:
            answer = json.loads(sample["stdout"])
        except ValueError:
            raise Failed(f"sync did not print JSON:\n{sample['stdout'][:2000]}"
                         f"{sample['stderr'][-2000:]}") from None
        answer = answer.get("result", answer)  # the probe wraps it
        if answer.get("outcome") != outcome:
            raise Failed(f"expected outcome {outcome!r}: {json.dumps(answer)[:3000]}")
        if changed is not None and set(answer.get("changed") or ()) != changed:
            raise Failed(f"expected exactly {sorted(changed)} to change: {answer.get('changed')}")
        return answer

    def probe_one(self, outcome: str, changed: set[str] | None = None) -> dict:
        sample = self.runner.run(self.probe_cmd, self.repo)
        self.expect(sample, outcome, changed)
        data = json.loads(sample["stdout"])
        data["phases"] = {"python start-up, exit": sample["wall"] - data["script_s"],
                          **data["phases"]}
        data["wall"] = sample["wall"]
        del data["result"]["changed"]
        return data

    def record_files(self, index: int, before: dict, after: dict) -> None:
        name = agent_name(index)
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        outside = [p for p in changed if not p.startswith(SYNC_STATE)]
        resources = [p for p in outside if p not in BOOKKEEPING]
        self.result["sync_changes"].append({
            "agent": name,
            "changed_files": len(outside),
            "resource_files": resources,
            "bookkeeping_files": [p for p in outside if p in BOOKKEEPING],
            "sync_dir_files": len(changed) - len(outside),
            "only_that_agent": set(resources) == {
                f"{STATE}/agents/{name}/agent.json", f"etc/cron.d/spos-{name}"},
        })


# ------------------------------------------------------------------------------ reporting


def table(results: list[dict], floor: dict) -> str:
    lines = []
    header = (f"{'agents':>6}  {'step':<38} {'median':>8} {'min':>8} {'cpu':>8} "
              f"{'peak RSS':>8} {'runs':>4}  {'plan target':<11}")
    lines += [header, "-" * len(header)]
    for res in results:
        n = res["agents"]
        for step in STEPS:
            data = res["steps"].get(step)
            if data is None:
                continue
            target, ok = "", ""
            if step in (NO_CHANGE, CHANGED, BASE_PLAN, BASE_APPLY):
                target = f"<= {fmt_time(plan_target(n))}"
                ok = "ok" if data["median_s"] <= plan_target(n) else "over"
            lines.append(
                f"{n:>6}  {step:<38} {fmt_time(data['median_s']):>8} {fmt_time(data['min_s']):>8} "
                f"{fmt_time(data['cpu_median_s']):>8} {data['peak_rss_mb']:>5.0f} MB "
                f"{data['runs']:>4}  {target} {ok}".rstrip())
        for step, base in BASELINE_OF.items():
            if step in res["steps"] and base in res["steps"]:
                s, b = res["steps"][step], res["steps"][base]
                lines.append(
                    f"{'':>6}  {step} minus {base}: {_signed(s['median_s'] - b['median_s'])} "
                    f"median, {_signed(s['min_s'] - b['min_s'])} min, "
                    f"{_signed(s['cpu_median_s'] - b['cpu_median_s'])} cpu")
        if "error" in res:
            lines.append(f"{n:>6}  FAILED: {res['error'].splitlines()[0]}")
        lines.append("")

    lines.append("Setup, once per size (not targets):")
    for res in results:
        s = res["setup"]
        if "first_sync_s" not in s:
            continue
        parts = [f"generate {fmt_time(s['generate_s'])}"]
        if "first_apply_s" in s:
            parts.append(f"first apply (baseline root) {fmt_time(s['first_apply_s'])}")
        parts += [f"push {fmt_time(s['push_s'])}",
                  f"first sync {fmt_time(s['first_sync_s'])} ({s['first_sync_rss_mb']:.0f} MB, "
                  f"{s['first_sync_changed']} resources)",
                  f"next no-change sync {fmt_time(s['first_no_change_sync_s'])}"]
        if "commit_push_median_s" in s:
            parts.append(f"commit+push of an edit {fmt_time(s['commit_push_median_s'])}")
        lines.append(f"  {res['agents']:>6} agents: " + "; ".join(parts))

    lines.append("")
    lines.append("Files under the root changed by each one-agent sync (sync/ counted apart):")
    for res in results:
        changes = res["sync_changes"]
        if not changes:
            continue
        counts = sorted({c["changed_files"] for c in changes})
        in_sync = sorted({c["sync_dir_files"] for c in changes})
        all_ok = all(c["only_that_agent"] for c in changes)
        example = changes[0]
        lines.append(
            f"  {res['agents']:>6} agents: {'/'.join(map(str, counts))} files; "
            f"{'only' if all_ok else 'NOT ONLY'} the edited agent's "
            f"{' and '.join(Path(p).name for p in example['resource_files'])}, plus "
            f"{', '.join(Path(p).name for p in example['bookkeeping_files']) or 'nothing'}; "
            f"{'/'.join(map(str, in_sync))} under sync/ (the checkout, its revision markers, the mirror, the state)")

    for res in results:
        phases = res.get("phases")
        if not phases:
            continue
        steps = [s for s in (NO_CHANGE, CHANGED, AFTER) if s in phases]
        short = {NO_CHANGE: "no change", CHANGED: "1 changed", AFTER: "after new rev"}
        runs = len(phases[steps[0]]["runs"])
        lines.append("")
        lines.append(f"Where the time goes, {res['agents']} agents: in-process probe of the same "
                     f"syncs, median of {runs} runs each, ms")
        head = f"  {'phase':<30}" + "".join(f"{short[s]:>15}" for s in steps)
        lines += [head, "  " + "-" * (len(head) - 2)]
        for name in PHASES:
            values = [phases[s]["median_ms"][name] for s in steps]
            if max(abs(v) for v in values) < 0.05:
                continue
            lines.append(f"  {name:<30}" + "".join(f"{v:>15.1f}" for v in values))
        lines.append(f"  {'in sync() (median)':<30}"
                     + "".join(f"{phases[s]['sync_median_ms']:>15.1f}" for s in steps))
        lines.append(f"  {'whole process (median)':<30}"
                     + "".join(f"{phases[s]['process_median_ms']:>15.1f}" for s in steps))
        for s in steps:
            gits = phases[s]["git_processes"]
            lines.append(f"  git processes, {short[s]}: {len(gits)} ({', '.join(gits)})")

    lines.append("")
    lines.append("Python start-up on this machine, for scale:")
    for label, data in floor.items():
        lines.append(f"  {label:<28} median {fmt_time(data['median_s'])}, min "
                     f"{fmt_time(data['min_s'])}")
    return "\n".join(lines)


def _signed(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + fmt_time(abs(seconds))


def report(args, env_info: dict, floor: dict, results: list[dict], final: bool) -> None:
    payload = save_results(args, env_info, {"startup": floor, "results": results})
    if not final:
        return
    out = sys.stderr if args.json == "-" else sys.stdout
    lines = [
        f"spos sync benchmark, {env_info['date']}: {env_info['cpus']} CPUs, Python "
        f"{env_info['python']}, {env_info['git_version']}, ruamel C loader "
        f"{'yes' if env_info['ruamel_c_loader'] else 'NO'}",
        code_line(env_info),
        f"repeats {args.repeat}; work dir {env_info['workdir']} ({env_info['workdir_fs']}); remote: "
        f"a bare repository in the work dir, by local path; branch {BRANCH}",
        load_line(env_info),
        "",
        table(results, floor),
    ]
    print("\n".join(lines), file=out)
    if args.json == "-":
        print(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000", help="comma-separated agent counts (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per step (default 5)")
    parser.add_argument("--budget", type=float, default=60, metavar="SECONDS",
                        help="stop repeating a step after 3 runs once it has taken this long")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON, after every size ('-': stdout)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not measure spos plan and spos apply for comparison")
    parser.add_argument("--no-phases", action="store_true",
                        help="do not run the in-process probe that splits a sync by phase")
    parser.add_argument("--spos", metavar="CMD",
                        help="how to start spos (default: the spos script beside this python)")
    parser.add_argument("--live", action="store_true",
                        help="run the working tree's code, not a snapshot taken at start")
    parser.add_argument("--workdir", metavar="DIR", help="where to create the temporary repos and roots")
    parser.add_argument("--nice", type=int, default=0, metavar="N", help="run at this nice value")
    parser.add_argument("--keep", action="store_true", help="keep the generated repos and roots")
    args = parser.parse_args()
    args.no_git, args.profile = False, False  # what bench_reconcile's SizeBench reads
    try:
        sizes = [int(s.strip().replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: comma-separated whole numbers, e.g. 100,1000")
    if args.repeat < 1 or not sizes or min(sizes) < 1:
        parser.error("--repeat and every size must be at least 1")
    if shutil.which("git") is None:
        parser.error("git is not installed")
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    spos = shlex.split(args.spos) if args.spos else default_spos()

    code_dir = None if args.live else Path(tempfile.mkdtemp(prefix="spos-bench-code-", dir=args.workdir))
    results: list[dict] = []
    try:
        code = snapshot_code(code_dir) if code_dir else describe_code()
        code["snapshot"] = code_dir is not None
        if code_dir:
            os.environ["SPOS_BENCH_CODE"] = str(code_dir)
        runner = Runner(spos, str(code_dir) if code_dir else None)
        env_info = environment(args, spos, code)
        env_info["git_version"] = subprocess.run(["git", "--version"], capture_output=True,
                                                 text=True).stdout.strip()
        settle = settle_seconds(str(code_dir) if code_dir else package_parent())
        env_info["memo_settle_seconds"] = settle
        floor = startup_floor(runner, args.repeat)
        for agents in sizes:
            results.append(SyncBench(agents, args, runner, settle).run())
            report(args, env_info, floor, results, final=False)
        runner.close()
        report(args, env_info, floor, results, final=True)
    finally:
        if code_dir:
            shutil.rmtree(code_dir, ignore_errors=True)
    return 1 if any("error" in res for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
