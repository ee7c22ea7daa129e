"""Finished runs are removed by their agent's retention, and nothing else is (docs/executor.md).

Most tests lay out an agent's run directories by hand, as the executor leaves them, with end
times in the past, and run `spos action cleanup` in-process. The last ones run the real
executor (a subprocess, with its sandbox) to show that it cleans at start and then
periodically, and that a run it really ran is removed once its retention has passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sandboxes import sandbox_missing

from reconciler.device import Device
from reconciler.executor.retention import PeriodicCleanup, clean

REPO = Path(__file__).resolve().parent.parent
STATE = "var/lib/systemprompt-os"
DAY = 86400.0
RETENTION = {"temp": 1 * DAY, "completed": 7 * DAY, "failed": 30 * DAY}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


class Runs:
    """Run directories of agents under a device root, written the way the executor writes them."""

    def __init__(self, root: Path):
        self.root = root
        self.now = time.time()

    def agent_dir(self, agent: str) -> Path:
        return self.root / STATE / "agents" / agent

    def agent(self, agent: str, retention: dict | None = RETENTION, applied: bool = True) -> Path:
        directory = self.agent_dir(agent)
        for name in ("queue", "active", "completed", "failed", "checkpoints", "logs", "tmp", "output"):
            (directory / name).mkdir(parents=True, exist_ok=True)
        if applied:
            quota = None if retention is None else {"name": "q", "retentionSeconds": retention}
            config = {"format": 1, "agent": agent, "tasks": {}, "capability": None, "quota": quota}
            (directory / "agent.json").write_text(json.dumps(config))
        return directory

    def run(self, agent: str, state: str, ended_days_ago: float, *, bucket: str | None = None,
            mtime_days_ago: float | None = None, ended_at: bool = True, rotated: bool = False,
            checkpoint: bool = False, tmp: bool = False, body: str | None = None) -> str:
        """A run record with its log; `bucket` defaults to where the state belongs."""
        run_id = f"20260101T000000-{uuid.uuid4().hex[:8]}"
        ended = self.now - ended_days_ago * DAY
        home = {"completed": "completed", "queued": "queue", "active": "active"}
        bucket = bucket or home.get(state, "failed")
        name = f"050-{int(ended * 1e9):020d}-{run_id}.json"
        record = {"format": 1, "id": run_id, "agent": agent, "task": "t", "state": state, "attempt": 1}
        if ended_at:
            record["endedAt"] = _iso(ended)
        directory = self.agent_dir(agent)
        path = directory / bucket / name
        path.write_text(body if body is not None else json.dumps(record, indent=2))
        (directory / "logs" / f"{run_id}.log").write_text("--- spos ...\n")
        if rotated:
            (directory / "logs" / f"{run_id}.log.1").write_text("older output\n")
        if checkpoint:
            (directory / "checkpoints" / run_id / "state").mkdir(parents=True)
            (directory / "checkpoints" / run_id / "state" / "step").write_text("2")
        if tmp:
            (directory / "tmp" / run_id / "cache").mkdir(parents=True)
            (directory / "tmp" / run_id / "cache" / "blob").write_text("x" * 100)
        self.age(path, mtime_days_ago if mtime_days_ago is not None else ended_days_ago)
        return run_id

    def age(self, path: Path, days_ago: float) -> None:
        moment = self.now - days_ago * DAY
        os.utime(path, (moment, moment), follow_symlinks=False)

    def files(self, agent: str, run_id: str) -> list[str]:
        """What is left of a run, relative to its agent's directory."""
        directory = self.agent_dir(agent)
        return sorted(str(p.relative_to(directory)) for p in directory.rglob(f"*{run_id}*"))


@pytest.fixture
def runs(device_root) -> Runs:
    return Runs(device_root)


def cleanup(spos, runs: Runs, *args) -> tuple[int, dict, str]:
    result = spos("action", "cleanup", "--root", runs.root, "--json", *args)
    return result.code, json.loads(result.out), result.err


def removed_ids(report: dict, what: str = "run") -> set[str]:
    return {r["runId"] for r in report["removed"] if r["what"] == what}


# -- what goes and what stays ---------------------------------------------------------------------


def test_finished_runs_past_their_retention_go_with_their_logs_checkpoints_and_tmp(spos, runs):
    directory = runs.agent("ret-a")
    old_ok = runs.run("ret-a", "completed", 8, rotated=True, tmp=True)
    young_ok = runs.run("ret-a", "completed", 6)
    young_failure = runs.run("ret-a", "failed", 8, checkpoint=True)
    old_ends = {state: runs.run("ret-a", state, 31, checkpoint=True, tmp=True)
                for state in ("failed", "timeout", "cancelled", "skipped", "expired")}
    (directory / "output" / "report.csv").write_text("the operator's\n")
    (directory / "output" / "old").mkdir()
    runs.age(directory / "output" / "old", 400)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {old_ok, *old_ends.values()}
    for run_id in (old_ok, *old_ends.values()):
        assert runs.files("ret-a", run_id) == [], run_id
    assert len(runs.files("ret-a", young_ok)) == 2  # record and log
    assert len(runs.files("ret-a", young_failure)) == 3  # record, log, checkpoint
    assert (directory / "output" / "report.csv").exists() and (directory / "output" / "old").is_dir()
    assert (directory / "agent.json").exists()
    by_id = {r["runId"]: r for r in report["removed"]}
    assert by_id[old_ok]["state"] == "completed"
    base = f"/{STATE}/agents/ret-a"
    record, *rest = by_id[old_ok]["paths"]
    assert record.startswith(f"{base}/completed/") and record.endswith(f"-{old_ok}.json")
    assert rest == [f"{base}/logs/{old_ok}.log", f"{base}/logs/{old_ok}.log.1", f"{base}/tmp/{old_ok}"]
    assert {r["state"] for r in report["removed"]} == {"completed", *old_ends}
    assert 7.9 * DAY < by_id[old_ok]["ageSeconds"] < 8.1 * DAY


def test_the_quota_retention_decides_and_defaults_apply_without_one(spos, runs):
    runs.agent("ret-short", retention={"temp": 60, "completed": 3600, "failed": 7200})
    runs.agent("ret-default", retention=None)  # no Quota: 24h, 7d, 30d
    short_done = runs.run("ret-short", "completed", 2 / 24)
    short_failed = runs.run("ret-short", "failed", 1.5 / 24)
    short_kept = runs.run("ret-short", "failed", 1 / 24)
    default_done = runs.run("ret-default", "completed", 8)
    default_kept = runs.run("ret-default", "failed", 8)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {short_done, default_done}
    assert runs.files("ret-short", short_kept) and runs.files("ret-default", default_kept)
    assert short_failed not in removed_ids(report)  # 1.5 h < 2 h


def test_a_retention_too_long_for_a_float_keeps_the_runs_and_the_pass_goes_on(spos, runs):
    """A duration of hundreds of digits passes the schema and apply compiles it to a whole
    number of seconds beyond any float: such runs are kept, and the pass (the executor's at its
    start too) still cleans the other agents."""
    forever = 10 ** 400
    runs.agent("ret-forever", retention={"temp": forever, "completed": forever, "failed": forever})
    runs.agent("ret-normal")
    kept = runs.run("ret-forever", "completed", 4000, tmp=True)
    gone = runs.run("ret-normal", "completed", 8)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {gone} and report["errors"] == []
    assert runs.files("ret-forever", kept)
    assert PeriodicCleanup(Device(runs.root), 3600).run_if_due().errors == []


def test_age_counts_from_ended_at_and_falls_back_to_the_file_time(spos, runs):
    runs.agent("ret-age")
    by_end = runs.run("ret-age", "completed", 8, mtime_days_ago=9)
    ended_recently = runs.run("ret-age", "completed", 2, mtime_days_ago=9)  # file touched back in time
    no_end = runs.run("ret-age", "completed", 8, ended_at=False)
    no_end_young = runs.run("ret-age", "completed", 3, ended_at=False)
    unreadable = runs.run("ret-age", "failed", 31, body="{not json")
    rewritten = runs.run("ret-age", "completed", 8, mtime_days_ago=1)  # copied back: file is new

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {by_end, no_end, unreadable}
    for kept in (ended_recently, no_end_young, rewritten):
        assert runs.files("ret-age", kept), kept
    since = {r["runId"]: r["since"] for r in report["removed"]}
    assert since[by_end] == _iso(runs.now - 8 * DAY)[:19] + "+00:00"


@pytest.mark.parametrize("ended", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-14:00"])
def test_an_end_time_past_what_utc_holds_counts_from_the_file_time(spos, runs, ended):
    """A hand-edited `endedAt` whose time zone takes it before year 1 or past year 9999 in UTC
    is no time the pass can count from, nor show in its report: the file's time stands."""
    runs.agent("ret-far")
    record = {"format": 1, "id": "20260101T000000-0000f0f0", "task": "t", "state": "failed",
              "endedAt": ended}
    run_id = runs.run("ret-far", "failed", 40, body=json.dumps(record))

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert {r["runId"]: r["since"] for r in report["removed"]} == {
        run_id: _iso(runs.now - 40 * DAY)[:19] + "+00:00"}


def test_queue_and_active_are_never_touched(spos, runs):
    directory = runs.agent("ret-live", retention={"temp": 0, "completed": 0, "failed": 0})
    retry = runs.run("ret-live", "queued", 40, checkpoint=True, tmp=True)
    running = runs.run("ret-live", "active", 40, checkpoint=True, tmp=True)
    (directory / "active" / next(p.name for p in (directory / "active").iterdir())).with_suffix(
        ".json.cancel").write_text("cancel\n")
    # a crash between writing the final record and removing the active one leaves both
    twin = runs.run("ret-live", "active", 40, tmp=True)
    [twin_name] = [p.name for p in (directory / "active").glob(f"*-{twin}.json")]
    shutil.copy(directory / "active" / twin_name, directory / "failed" / twin_name)
    runs.age(directory / "failed" / twin_name, 40)
    before = {p: p.lstat().st_mtime for p in directory.rglob("*")}

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert report["removed"] == []
    assert {p: p.lstat().st_mtime for p in directory.rglob("*")} == before
    for run_id in (retry, running, twin):
        assert (directory / "tmp" / run_id).is_dir()


def test_leftover_temporary_directories_go_after_the_temp_retention(spos, runs):
    directory = runs.agent("ret-tmp")
    finished = runs.run("ret-tmp", "completed", 2, tmp=True)        # record kept (7d), tmp gone (1d)
    fresh = runs.run("ret-tmp", "completed", 0.5, tmp=True)          # both kept
    orphan_old = directory / "tmp" / "20250101T000000-00000000"
    orphan_new = directory / "tmp" / "20250101T000000-11111111"
    for orphan in (orphan_old, orphan_new):
        (orphan / "d").mkdir(parents=True)
        (orphan / "d" / "f").write_text("x")
    runs.age(orphan_old, 3)
    runs.age(orphan_new, 0.1)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report, "tmp") == {finished, orphan_old.name}
    assert removed_ids(report, "run") == set()
    assert not (directory / "tmp" / finished).exists() and (directory / "tmp" / fresh).is_dir()
    assert not orphan_old.exists() and orphan_new.is_dir()
    [record] = (directory / "completed").glob(f"*-{finished}.json")
    assert runs.files("ret-tmp", finished) == [f"completed/{record.name}", f"logs/{finished}.log"]
    states = {r["runId"]: r["state"] for r in report["removed"]}
    assert states == {finished: "finished", orphan_old.name: "no run record"}


def test_a_temporary_directory_an_enqueue_is_writing_survives_a_temp_retention_of_0(spos, runs):
    """A trigger's large attachments are written into tmp/<run id>/spos-trigger/ before the
    queue file (docs/queue.md): until then the directory has no record. A retention of `temp`
    0 must not take it from the run about to be queued."""
    directory = runs.agent("ret-enqueue", retention={"temp": 0, "completed": 0, "failed": 0})
    being_queued = directory / "tmp" / "20260101T000000-5b6c7d8e" / "spos-trigger"
    being_queued.mkdir(parents=True)
    (being_queued / "payload").write_bytes(b"x" * 20000)
    forgotten = directory / "tmp" / "20260101T000000-00f00f00"
    forgotten.mkdir()
    runs.age(forgotten, 2 / 1440)  # two minutes: no enqueue takes that long

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report, "tmp") == {forgotten.name}
    assert (being_queued / "payload").read_bytes() == b"x" * 20000


def test_records_set_aside_as_corrupt_go_by_the_failed_retention(spos, runs):
    directory = runs.agent("ret-corrupt")
    old = directory / "failed" / "050-00000000000000000001-20250101T000000-0badc0de.json.corrupt"
    new = directory / "failed" / "050-00000000000000000002-20250101T000000-0badbeef.json.corrupt"
    for path in (old, new):
        path.write_text("{garbage")
        Path(f"{path}.reason").write_text("not valid JSON\n")
    runs.age(old, 31)
    runs.age(new, 29)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {"20250101T000000-0badc0de"}
    assert not old.exists() and not Path(f"{old}.reason").exists()
    assert new.exists() and Path(f"{new}.reason").exists()


def test_a_record_nested_too_deeply_to_parse_counts_as_unreadable(spos, runs):
    """A record damaged into JSON nested deeper than the parser goes: its end time and the
    config it names cannot be read, as for a record that is not JSON, and the pass goes on."""
    directory = runs.agent("ret-nested")
    old = runs.run("ret-nested", "failed", 31, body="[" * 200000)
    young = runs.run("ret-nested", "completed", 1, body="{\"a\": " * 200000)
    copy = directory / "configs" / f"sha256-{'0' * 64}.json"
    copy.parent.mkdir()
    copy.write_text("{}\n")
    runs.age(copy, 1)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {old} and report["errors"] == []
    assert [r["paths"] for r in report["removed"] if r["what"] == "config"] == [
        [f"/{STATE}/agents/ret-nested/configs/{copy.name}"]]
    assert runs.files("ret-nested", young)


def test_an_agent_that_is_not_applied_keeps_its_history(spos, runs):
    runs.agent("ret-removed", applied=False)
    kept = runs.run("ret-removed", "completed", 365)

    result = spos("action", "cleanup", "--root", runs.root)

    assert result.code == 0, result.err
    assert runs.files("ret-removed", kept)
    assert "kept ret-removed: not applied on this device" in result.out
    assert "Nothing to clean up." in result.out


def test_dry_run_removes_nothing_and_reports_what_would_go(spos, runs):
    directory = runs.agent("ret-dry")
    gone = [runs.run("ret-dry", "completed", 10, tmp=True, rotated=True) for _ in range(3)]
    runs.run("ret-dry", "completed", 1)
    before = sorted(str(p) for p in directory.rglob("*"))

    result = spos("action", "cleanup", "--root", runs.root, "--dry-run")
    assert result.code == 0, result.err
    assert sorted(str(p) for p in directory.rglob("*")) == before
    for run_id in gone:
        line = f"would remove ret-dry run {run_id} (completed, ended 10.0d ago): record, log, log.1, tmp"
        assert line in result.out
    assert "Would remove 3 finished runs and 0 leftover temporary directories (dry run" in result.out

    code, dry, _ = cleanup(spos, runs, "--dry-run")
    code, real, _ = cleanup(spos, runs)
    assert dry["dryRun"] and not real["dryRun"]
    def without_age(removals):
        return [{k: v for k, v in r.items() if k != "ageSeconds"} for r in removals]

    assert without_age(dry["removed"]) == without_age(real["removed"])
    assert sorted(str(p) for p in directory.rglob("*")) != before


def test_agent_option_limits_the_pass_and_names_must_exist(spos, runs):
    runs.agent("ret-one")
    runs.agent("ret-two")
    one = runs.run("ret-one", "completed", 10)
    two = runs.run("ret-two", "completed", 10)

    code, report, err = cleanup(spos, runs, "--agent", "ret-one")
    assert code == 0, err
    assert removed_ids(report) == {one} and runs.files("ret-two", two)

    result = spos("action", "cleanup", "--root", runs.root, "--agent", "nobody")
    assert result.code == 1 and "nobody: no such agent on this device" in result.err
    result = spos("action", "cleanup", "--root", runs.root, "--agent", "../etc")
    assert result.code == 1 and "is not an agent name" in result.err


# -- safety -------------------------------------------------------------------------------------


def _tree_digest(path: Path) -> str:
    """Names, types and sizes of everything under `path` (not following links)."""
    digest = hashlib.sha256()
    for current, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            try:
                st = os.lstat(os.path.join(current, name))
            except FileNotFoundError:
                continue
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            digest.update(f"{current}/{name} {st.st_mode} {size}\n".encode())
    return digest.hexdigest()


def test_a_symlink_planted_in_a_run_directory_never_leads_outside(spos, runs, tmp_path):
    outside = tmp_path / "outside"
    (outside / "nested").mkdir(parents=True)
    (outside / "canary").write_text("must survive\n")
    (outside / "nested" / "canary").write_text("must survive\n")
    etc_before = sorted(os.listdir("/etc"))
    etc_digest = _tree_digest(Path("/etc"))
    directory = runs.agent("ret-links")

    inside_tmp = runs.run("ret-links", "completed", 10, tmp=True, checkpoint=True)
    for target, place in ((Path("/etc"), "tmp"), (outside, "tmp"), (Path("/etc"), "checkpoints"),
                          (outside, "checkpoints")):
        (directory / place / inside_tmp / f"link-{target.name}").symlink_to(target, target_is_directory=True)
    (directory / "checkpoints" / inside_tmp / "state" / "passwd").symlink_to("/etc/passwd")
    (directory / "tmp" / inside_tmp / "cache" / "deep").mkdir()
    (directory / "tmp" / inside_tmp / "cache" / "deep" / "etc").symlink_to("/etc")

    linked_tmp = runs.run("ret-links", "failed", 40)  # tmp/<id> itself is a link to /etc
    (directory / "tmp" / linked_tmp).symlink_to("/etc", target_is_directory=True)
    runs.age(directory / "tmp" / linked_tmp, 40)
    linked_checkpoint = runs.run("ret-links", "failed", 40)
    (directory / "checkpoints" / linked_checkpoint).symlink_to(outside, target_is_directory=True)
    linked_log = runs.run("ret-links", "failed", 40)
    (directory / "logs" / f"{linked_log}.log").unlink()
    (directory / "logs" / f"{linked_log}.log").symlink_to(outside / "canary")
    orphan = directory / "tmp" / "20250101T000000-0e7c0e7c"
    orphan.symlink_to("/etc", target_is_directory=True)
    runs.age(orphan, 40)
    record_link = directory / "completed" / "050-00000000000000000009-20250101T000000-11nk11nk.json"
    record_link.symlink_to("/etc/hostname")
    runs.age(record_link, 40)

    code, report, err = cleanup(spos, runs)

    assert sorted(os.listdir("/etc")) == etc_before
    assert _tree_digest(Path("/etc")) == etc_digest
    assert (outside / "canary").read_text() == "must survive\n"
    assert (outside / "nested" / "canary").read_text() == "must survive\n"
    assert removed_ids(report) == {inside_tmp, linked_tmp, linked_checkpoint, linked_log}
    assert removed_ids(report, "tmp") == {orphan.name}
    for run_id in (inside_tmp, linked_tmp, linked_checkpoint, linked_log):
        assert runs.files("ret-links", run_id) == [], run_id
    assert not os.path.lexists(orphan)
    # a record that is a link is not spos's: left alone, and said so
    assert os.path.islink(record_link)
    assert code == 1 and any("11nk11nk" in e and "left alone" in e for e in report["errors"])


@pytest.mark.parametrize("place", ["agent", "tmp", "logs", "completed"])
def test_a_linked_run_directory_is_refused_and_other_agents_go_on(spos, runs, tmp_path, place):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "050-00000000000000000001-20250101T000000-c0ffee00.json").write_text(
        json.dumps({"id": "20250101T000000-c0ffee00", "state": "completed",
                    "endedAt": "2020-01-01T00:00:00+00:00"}))
    (outside / "20250101T000000-c0ffee00.log").write_text("x")
    (outside / "20250101T000000-c0ffee00").mkdir()
    for path in outside.iterdir():
        runs.age(path, 400)
    snapshot = _tree_digest(outside)
    runs.agent("ret-fine")
    fine = runs.run("ret-fine", "completed", 10)
    if place == "agent":
        runs.agent_dir("ret-linked").symlink_to(outside, target_is_directory=True)
    else:
        directory = runs.agent("ret-linked")
        shutil.rmtree(directory / place)
        (directory / place).symlink_to(outside, target_is_directory=True)

    code, report, err = cleanup(spos, runs)

    assert code == 1
    assert removed_ids(report) == {fine}
    assert [e for e in report["errors"] if e.startswith("ret-linked: ")], report["errors"]
    assert "symlink" in " ".join(report["errors"])
    assert _tree_digest(outside) == snapshot


def test_a_broken_agent_is_reported_and_the_others_are_cleaned(spos, runs):
    runs.agent("ret-good")
    good = runs.run("ret-good", "completed", 10)
    bad_json = runs.agent("ret-badjson")
    (bad_json / "agent.json").write_text("{")
    kept = runs.run("ret-badjson", "completed", 10)
    not_a_dir = runs.agent_dir("ret-file")
    not_a_dir.parent.mkdir(parents=True, exist_ok=True)
    not_a_dir.write_text("a file where an agent's directory should be")
    logs_file = runs.agent("ret-logsfile")
    shutil.rmtree(logs_file / "logs")
    (logs_file / "logs").write_text("not a directory")

    result = spos("action", "cleanup", "--root", runs.root)

    assert result.code == 1
    assert f"removed ret-good run {good}" in result.out
    errors = result.err.splitlines()
    assert any(line.startswith("spos: cleanup: ret-badjson: agent.json is not valid JSON") for line in errors)
    assert any(line.startswith("spos: cleanup: ret-file: ") for line in errors)
    assert "spos: cleanup: ret-logsfile: logs is a symlink or not a directory; left alone" in errors
    assert runs.files("ret-badjson", kept)


@pytest.mark.parametrize("quota, field", [
    ("7d", "`quota` must be an object or null, got '7d'"),
    ({"name": "q", "retentionSeconds": [604800]}, "`quota.retentionSeconds` must be an object or null"),
    ({"name": "q", "retentionSeconds": {"completed": "1d"}},
     "`quota.retentionSeconds.completed` must be a number from 0, got '1d'"),
])
def test_an_agent_config_with_a_damaged_quota_is_named_and_left_alone(spos, runs, quota, field):
    """agent.json edited by hand: the pass says which field is wrong, removes nothing of that
    agent, and goes on with the others; the executor's pass does not stop the executor."""
    damaged = runs.agent("ret-damaged")
    config = json.loads((damaged / "agent.json").read_text())
    (damaged / "agent.json").write_text(json.dumps({**config, "quota": quota}))
    kept = runs.run("ret-damaged", "completed", 400)
    runs.agent("ret-fine")
    gone = runs.run("ret-fine", "completed", 8)
    before = {p: p.lstat().st_mtime for p in damaged.rglob("*")}

    result = spos("action", "cleanup", "--root", runs.root)

    assert result.code == 1
    assert f"removed ret-fine run {gone}" in result.out
    assert (f"spos: cleanup: ret-damaged: agent.json: {field}" in result.err
            and "the agent is left alone" in result.err), result.err
    assert runs.files("ret-damaged", kept)
    assert {p: p.lstat().st_mtime for p in damaged.rglob("*")} == before
    periodic = PeriodicCleanup(Device(runs.root), 3600).run_if_due()
    assert [e for e in periodic.errors if e.startswith("ret-damaged: agent.json: ")], periodic.errors


def test_a_mount_inside_a_run_directory_is_left_in_place(spos, runs, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    outside = tmp_path / "mounted"
    outside.mkdir()
    (outside / "canary").write_text("must survive\n")
    directory = runs.agent("ret-mount")
    run_id = runs.run("ret-mount", "completed", 10, tmp=True)
    target = directory / "tmp" / run_id / "cache" / "bound"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(outside), str(target)], check=True)
    try:
        code, report, err = cleanup(spos, runs)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (outside / "canary").read_text() == "must survive\n"
    assert code == 1 and any("is a mount point" in e for e in report["errors"]), report
    assert runs.files("ret-mount", run_id)  # the record stays, so the next pass tries again


# -- concurrency and bounded work ---------------------------------------------------------------


def test_files_vanishing_during_a_pass_are_skipped(runs):
    """Two passes over the same runs at once: neither fails, and each run is reported removed
    by exactly one of them."""
    runs.agent("ret-race")
    ids = {runs.run("ret-race", "completed", 10, tmp=True, rotated=True) for _ in range(1500)}
    program = (
        "import json, sys; from reconciler.device import Device; "
        "from reconciler.executor.retention import clean; "
        "r = clean(Device(sys.argv[1])); "
        "print(json.dumps({'ids': [x.run_id for x in r.removed], 'errors': r.errors}))"
    )
    passes = [subprocess.Popen([sys.executable, "-c", program, str(runs.root)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for process in passes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    assert [r["errors"] for r in results] == [[], []]
    first, second = (set(r["ids"]) for r in results)
    assert first | second == ids and not first & second
    assert [p for p in runs.agent_dir("ret-race").rglob("*") if "20260101T" in p.name] == []


def test_a_time_budget_slices_the_work_and_every_slice_makes_progress(runs):
    runs.agent("ret-slices")
    by_age = [runs.run("ret-slices", "completed", days) for days in (10, 14, 12, 11, 13)]
    device = Device(runs.root)
    seen = []
    for left in (4, 3, 2, 1, 0):
        report = clean(device, time_budget=0)
        assert report.errors == []
        assert len(report.removed) == 1
        assert report.complete is (left == 0)  # it stops with more to do, never with nothing done
        seen.append(report.removed[0].run_id)
    assert seen == [by_age[i] for i in (1, 4, 2, 3, 0)]  # oldest first
    final = clean(device, time_budget=0)
    assert final.removed == [] and final.complete is True


def test_a_slow_listing_does_not_use_up_a_slice(runs, monkeypatch):
    """Listing an agent's runs is done again by every slice; with tens of thousands of runs it
    alone takes longer than the executor's 0.25 s. It is not counted against the budget, so a
    slice still removes as much as the budget allows instead of one run, and a backlog is
    worked off in a few slices, not one slice a run."""
    from reconciler.executor import retention

    runs.agent("ret-slow")
    ids = {runs.run("ret-slow", "completed", 10) for _ in range(40)}
    listing = retention._AgentPass._finished

    def slow_listing(self):
        time.sleep(0.3)  # what listing 50,000 records takes
        return listing(self)

    monkeypatch.setattr(retention._AgentPass, "_finished", slow_listing)
    report = clean(Device(runs.root), time_budget=0.25)
    assert report.errors == []
    assert {removal.run_id for removal in report.removed} == ids and report.complete


# -- the executor ---------------------------------------------------------------------------------




needs_executor = pytest.mark.skipif(bool(sandbox_missing()), reason=sandbox_missing() or "")


def _apply(spos, tmp_path: Path, root: Path, agent: str, tasks: dict, retention: dict) -> None:
    docs = [
        {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "ret-cap"},
         "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}},
        {"apiVersion": "spos/v1", "kind": "Quota", "metadata": {"name": "ret-quota"},
         "spec": {"cpu": "100%", "memory": "256M", "tasksMax": 64, "retention": retention}},
        {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": agent},
         "spec": {"capability": "ret-cap", "quota": "ret-quota", "tasks": tasks}},
    ]
    manifests = tmp_path / "agents.d"
    manifests.mkdir(exist_ok=True)
    (manifests / "agents.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    result = spos("apply", manifests, "--root", root, "--auto-approve")
    assert result.code == 0, result.err + result.out


def _wait_for(predicate, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.05)


@needs_executor
def test_a_run_the_executor_ran_is_removed_once_its_retention_passed(spos, runs, tmp_path):
    agent = f"ret-{uuid.uuid4().hex[:8]}"
    _apply(spos, tmp_path, runs.root, agent,
           {"t": {"command": ["/bin/sh", "-c", "echo out > $SPOS_OUTPUT_DIR/result; echo logged"]}},
           {"completed": "1s", "failed": "1h", "temp": "1s"})
    result = spos("action", "run", "--root", runs.root, "--agent", agent, "--task", "t")
    run_id = result.out.strip()
    subprocess.run([sys.executable, "-m", "reconciler", "executor", "--root", str(runs.root), "--once",
                    "--grace", "1s", "--cleanup-interval", "0s"],
                   cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
    assert "logged" in (runs.agent_dir(agent) / "logs" / f"{run_id}.log").read_text()
    assert runs.files(agent, run_id), "the run finished and is kept until its retention passed"
    time.sleep(1.1)

    code, report, err = cleanup(spos, runs)

    assert code == 0, err
    assert removed_ids(report) == {run_id}
    assert runs.files(agent, run_id) == []
    assert (runs.agent_dir(agent) / "output" / "result").read_text() == "out\n"
    shown = spos("action", "show", run_id, "--root", runs.root)
    assert shown.code == 1 and "no run" in shown.err


@needs_executor
def test_the_executor_cleans_at_start_and_then_every_interval(spos, runs, tmp_path):
    agent = f"ret-{uuid.uuid4().hex[:8]}"
    _apply(spos, tmp_path, runs.root, agent, {"t": {"command": ["/bin/true"]}},
           {"completed": "1d", "failed": "1d", "temp": "1d"})
    before = runs.run(agent, "completed", 2, tmp=True)
    status = runs.root / STATE / "cleanup.json"
    with open(tmp_path / "executor.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "executor", "--root", str(runs.root), "--grace", "1s",
             "--rescan", "1s", "--cleanup-interval", "2s"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        _wait_for(status.exists, "the executor's first cleanup pass")
        first = json.loads(status.read_text())
        assert first["removed"] == {"runs": 1, "tmp": 0} and first["errors"] == [], first
        assert first["complete"] is True
        assert runs.files(agent, before) == []

        later = runs.run(agent, "failed", 3, checkpoint=True)
        _wait_for(lambda: json.loads(status.read_text())["removed"]["runs"] == 1
                  and json.loads(status.read_text())["at"] > first["at"],
                  "a periodic pass to remove a run that aged", timeout=10)
        assert runs.files(agent, later) == []

        queued = spos("action", "run", "--root", runs.root, "--agent", agent, "--task", "t").out.strip()
        _wait_for(lambda: any((runs.agent_dir(agent) / "completed").glob(f"*-{queued}.json")),
                  "the executor to go on running actions")
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0, (tmp_path / "executor.log").read_text()


@needs_executor
def test_the_executor_works_off_a_backlog_in_slices_and_goes_on_dispatching(spos, runs, tmp_path):
    """Far more is due than one 0.25 s slice removes; the slices follow one another without
    waiting for the rescan (60 s here), and a run enqueued meanwhile still runs."""
    agent = f"ret-{uuid.uuid4().hex[:8]}"
    _apply(spos, tmp_path, runs.root, agent, {"t": {"command": ["/bin/true"]}},
           {"completed": "1d", "failed": "1d", "temp": "1d"})
    backlog = [runs.run(agent, "completed", 2, tmp=True, rotated=True) for _ in range(3000)]
    status = runs.root / STATE / "cleanup.json"
    with open(tmp_path / "executor.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "executor", "--root", str(runs.root), "--grace", "1s",
             "--rescan", "60s"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        _wait_for(status.exists, "the executor's first cleanup pass")
        queued = spos("action", "run", "--root", runs.root, "--agent", agent, "--task", "t").out.strip()
        _wait_for(lambda: any((runs.agent_dir(agent) / "completed").glob(f"*-{queued}.json")),
                  "the executor to run an action while it cleans")
        _wait_for(lambda: json.loads(status.read_text())["complete"], "the backlog to be worked off", timeout=40)
        left = [p.name for p in (runs.agent_dir(agent) / "completed").iterdir() if queued not in p.name]
        assert left == [] and not any((runs.agent_dir(agent) / "tmp").iterdir())
        assert not list((runs.agent_dir(agent) / "logs").glob(f"{backlog[0]}*"))
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0, (tmp_path / "executor.log").read_text()
