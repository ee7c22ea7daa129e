"""`spos plan` says what a task it reschedules or re-limits usually takes, from its history on
the device: the estimate beside the memory quota and timeout the task will run under."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

STATE = "var/lib/systemprompt-os"
START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def finished(root, agent: str, task: str, count: int, *, seconds: float, memory: int | None,
             state: str = "completed", first: int = 0) -> None:
    """`count` finished runs of agent/task, as the executor leaves them in completed/ or failed/."""
    bucket = root / STATE / "agents" / agent / ("completed" if state == "completed" else "failed")
    bucket.mkdir(parents=True, exist_ok=True)
    for n in range(first, first + count):
        ended = START + timedelta(hours=n)
        run_id = f"{ended:%Y%m%dT%H%M%S}-{n:08x}"
        usage = {"peakMemoryBytes": memory, "cpuSeconds": seconds / 2}
        record = {"format": 1, "id": run_id, "agent": agent, "task": task, "state": state, "attempt": 1,
                  "priority": 50, "enqueuedAt": ended.isoformat(), "endedAt": ended.isoformat(),
                  "durationSeconds": seconds,
                  "attempts": [{"attempt": 1, "state": state, "endedAt": ended.isoformat(),
                                "durationSeconds": seconds, "usage": usage}]}
        name = f"050-{int(ended.timestamp() * 1e9):020d}-{run_id}.json"
        (bucket / name).write_text(json.dumps(record))


@pytest.fixture
def applied(spos, manifests, device_root):
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    return manifests


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def plan_json(spos, manifests, root) -> dict:
    result = spos("plan", manifests, "--root", root, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_a_moved_schedule_shows_the_task_estimate_against_its_quota(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 20, seconds=252.0, memory=610_000_000)
    edit(applied / "backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "30 1 * * *"')

    plan = plan_json(spos, applied, device_root)
    text = spos("plan", applied, "--root", device_root).out

    assert plan["estimates"] == [{
        "change": "cron/backup-001-nightly", "agent": "backup-001", "task": "nightly_backup",
        "finishedRuns": 20, "completedRuns": 20,
        "estimate": {"runs": 20, "p50Seconds": 252.0, "p95Seconds": 252.0,
                     "p95PeakMemoryBytes": 610_000_000, "p50CpuSeconds": 126.0, "flags": []},
        "flags": [],
        "timeoutSeconds": 21600, "memoryLimitBytes": 4_000_000_000, "quota": "heavy",
    }]
    block = text.split("cron/backup-001-nightly", 1)[1].split("\n\n", 1)[0]
    assert "# backup-001/nightly_backup expected 4m12s (p95 4m12s), peak 610M: fits the 4G memory quota" in block


def test_a_shrunk_quota_warns_of_the_tasks_that_would_not_fit(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 5, seconds=600.0, memory=3_000_000_000)
    edit(applied / "profiles.yaml", "memory: 4G", "memory: 2G")

    plan = plan_json(spos, applied, device_root)
    text = spos("plan", applied, "--root", device_root).out

    [entry] = plan["estimates"]
    assert (entry["change"], entry["memoryLimitBytes"]) == ("agent/backup-001", 2_000_000_000)
    assert "peak 3G: over the 2G memory quota, it would be OOM-killed" in text


def test_a_timeout_shorter_than_the_usual_runtime_is_called_out(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 5, seconds=7 * 3600.0, memory=None)
    edit(applied / "backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "0 1 * * *"')

    text = spos("plan", applied, "--root", device_root).out

    assert "backup-001/nightly_backup expected 7h00m (p95 7h00m); p95 exceeds the 6h00m timeout" in text


def test_too_little_history_is_said_and_no_history_says_nothing(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 2, seconds=60.0, memory=None)
    edit(applied / "backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "0 1 * * *"')
    edit(applied / "research-001.yaml", 'cron: "0 9 * * *"', 'cron: "0 8 * * *"')

    plan = plan_json(spos, applied, device_root)
    text = spos("plan", applied, "--root", device_root).out

    assert [(e["agent"], e["estimate"]) for e in plan["estimates"]] == [("backup-001", None)]
    assert "backup-001/nightly_backup: 2 completed runs of 2 finished, too few for an estimate" in text
    assert "research-001/" not in text.split("cron/research-001", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]


def test_a_plan_without_schedule_or_quota_changes_has_no_estimates(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 5, seconds=60.0, memory=None)
    assert plan_json(spos, applied, device_root)["estimates"] == []
    (device_root / "etc/cron.d/spos-backup-001").unlink()  # drift: the line comes back as it was

    plan = plan_json(spos, applied, device_root)

    assert [c["id"] for c in plan["changes"]] == ["cron/backup-001-nightly"]
    assert [e["change"] for e in plan["estimates"]] == ["cron/backup-001-nightly"]


def test_a_saved_plan_keeps_its_estimates(spos, applied, device_root, tmp_path):
    finished(device_root, "backup-001", "nightly_backup", 5, seconds=60.0, memory=None)
    edit(applied / "backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "0 1 * * *"')
    saved = tmp_path / "plan.json"

    assert spos("plan", applied, "--root", device_root, "-out", saved).code == 0
    result = spos("apply", saved, "--root", device_root)

    assert result.code == 0, result.err
    assert json.loads(saved.read_text())["estimates"][0]["estimate"]["p50Seconds"] == 60.0


def test_a_task_whose_runs_all_failed_is_named_with_its_flag(spos, applied, device_root):
    finished(device_root, "backup-001", "nightly_backup", 4, seconds=30.0, memory=None, state="failed")
    edit(applied / "backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "0 1 * * *"')

    [entry] = plan_json(spos, applied, device_root)["estimates"]
    text = spos("plan", applied, "--root", device_root).out

    assert (entry["finishedRuns"], entry["completedRuns"], entry["estimate"]) == (4, 0, None)
    assert entry["flags"] == ["failing often"]
    assert ("backup-001/nightly_backup: 0 completed runs of 4 finished, too few for an estimate; "
            "failing often") in text
