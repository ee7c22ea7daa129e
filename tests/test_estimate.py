"""Estimates per task from its finished runs: the pure computation, and `spos action show`."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

from reconciler.executor.estimate import estimate, line, outcome, percentile, trend

STATE = "var/lib/systemprompt-os"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _record(n: int, state: str = "completed", seconds: float | None = 60.0, *, memory=None, cpu=None,
            task: str = "t") -> dict:
    """The n-th finished run of `task` (ended n minutes after START), with one attempt."""
    ended = (START + timedelta(minutes=n)).isoformat(timespec="milliseconds")
    usage = None if memory is None and cpu is None else {"peakMemoryBytes": memory, "cpuSeconds": cpu}
    return {"format": 1, "id": f"20260101T000000-{n:08x}", "task": task, "state": state, "attempt": 1,
            "endedAt": ended, "durationSeconds": seconds,
            "attempts": [{"attempt": 1, "state": state, "endedAt": ended, "durationSeconds": seconds,
                          "usage": usage}]}


def test_percentiles_are_nearest_rank():
    values = list(range(1, 21))  # 1..20
    assert percentile(values, 50) == 10
    assert percentile(values, 95) == 19
    assert percentile([7.0], 95) == 7.0
    assert percentile([3, 1, 2], 50) == 2


def test_runtime_memory_and_cpu_percentiles_from_the_records():
    values = [n * 7 % 20 + 1 for n in range(20)]  # 1..20 in an order that trends neither way
    records = [_record(n, seconds=float(v), memory=v * 10**6, cpu=v / 10) for n, v in enumerate(values)]
    records.append(_record(20, "failed", seconds=500.0, memory=900 * 10**6, cpu=9.0))  # usage counts, runtime not
    records.append(_record(21, "completed", seconds=None))  # no runtime: not a run to base it on

    found = estimate(records)

    assert found == {"runs": 20, "p50Seconds": 10.0, "p95Seconds": 19.0, "p95PeakMemoryBytes": 20 * 10**6,
                     "p50CpuSeconds": 1.1, "flags": []}
    assert line(found, 20) == ("estimate: p50 10s, p95 19s, peak memory 20M (p95), cpu 1.1s (p50), "
                               "from 20 runs")


def test_fewer_than_three_completed_runs_give_no_estimate():
    records = [_record(1), _record(2), _record(3, "failed"), _record(4, "timeout")]
    assert estimate(records) is None
    assert line(None, 2) == "estimate: not enough history (2 runs)"
    assert line(None, 1) == "estimate: not enough history (1 run)"
    assert estimate(records + [_record(5)])["runs"] == 3


def test_without_usage_memory_and_cpu_are_left_out():
    found = estimate([_record(n, seconds=252.0 + n) for n in range(3)])
    assert found["p95PeakMemoryBytes"] is None and found["p50CpuSeconds"] is None
    assert line(found, 3) == "estimate: p50 4m13s, p95 4m14s, from 3 runs"


def test_trending_slower_when_the_last_five_take_more_than_one_and_a_half_times_as_long():
    earlier = [_record(n, seconds=100.0) for n in range(5)]
    slower = [_record(5 + n, seconds=151.0) for n in range(5)]
    assert estimate(earlier + slower)["flags"] == ["trending slower"]
    # exactly 1.5x is not more than 1.5x
    assert estimate(earlier + [_record(5 + n, seconds=150.0) for n in range(5)])["flags"] == []
    # nine runs are too few to say
    assert estimate(earlier[1:] + slower)["flags"] == []
    # the order is by end time, not by the order handed over
    assert estimate(slower + earlier)["flags"] == ["trending slower"]
    assert estimate([_record(n, seconds=151.0) for n in range(5)]
                    + [_record(5 + n, seconds=100.0) for n in range(5)])["flags"] == []


def test_failing_often_when_more_than_half_of_the_last_ten_failed():
    old_successes = [_record(n) for n in range(10)]
    last_ten = [_record(10 + n, "failed" if n < 6 else "completed") for n in range(10)]
    assert estimate(old_successes + last_ten)["flags"] == ["failing often"]
    # five of ten is not more than half
    half = [_record(10 + n, "timeout" if n < 5 else "completed") for n in range(10)]
    assert estimate(old_successes + half)["flags"] == []
    # cancelled, skipped and expired runs are not failures and take no place in the window
    not_run = [_record(30 + n, state, seconds=None) for n, state in enumerate(("cancelled", "skipped", "expired"))]
    assert estimate(old_successes + last_ten + not_run)["flags"] == ["failing often"]
    # with a shorter history, more than half of what there is
    assert estimate([_record(n) for n in range(3)] + [_record(3 + n, "failed") for n in range(4)])["flags"] == [
        "failing often"]


def _apply(spos, tmp_path, root, agent: str) -> None:
    docs = [
        {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "est-cap"},
         "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}},
        {"apiVersion": "spos/v1", "kind": "Quota", "metadata": {"name": "est-quota"},
         "spec": {"cpu": "100%", "memory": "256M", "tasksMax": 64}},
        {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": agent},
         "spec": {"capability": "est-cap", "quota": "est-quota",
                  "tasks": {"t": {"command": ["/bin/true"]}, "other": {"command": ["/bin/true"]}}}},
    ]
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    (manifests / "agents.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    result = spos("apply", manifests, "--root", root, "--auto-approve")
    assert result.code == 0, result.err + result.out


def _write(root, agent: str, record: dict) -> None:
    bucket = "completed" if record["state"] == "completed" else "failed"
    directory = root / STATE / "agents" / agent / bucket
    directory.mkdir(parents=True, exist_ok=True)
    ended = datetime.fromisoformat(record["endedAt"]).timestamp()
    (directory / f"050-{int(ended * 1e9):020d}-{record['id']}.json").write_text(
        json.dumps({**record, "agent": agent}, indent=2))


def test_action_show_gives_the_estimate_of_the_runs_task(spos, tmp_path, device_root):
    agent = f"est-{uuid.uuid4().hex[:8]}"
    _apply(spos, tmp_path, device_root, agent)
    for n in range(5):
        _write(device_root, agent, _record(n, seconds=240.0, memory=500 * 10**6, cpu=100.0))
    for n in range(5, 10):
        _write(device_root, agent, _record(n, seconds=400.0, memory=610 * 10**6, cpu=123.0))
    _write(device_root, agent, _record(10, seconds=1.0, task="other"))  # another task's: not counted
    shown_id = _record(9)["id"]

    result = spos("action", "show", shown_id, "--root", device_root, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["estimate"] == {
        "runs": 10, "p50Seconds": 240.0, "p95Seconds": 400.0, "p95PeakMemoryBytes": 610 * 10**6,
        "p50CpuSeconds": 100.0, "flags": ["trending slower"]}

    text = spos("action", "show", shown_id, "--root", device_root)
    assert text.code == 0, text.err
    assert ("estimate: p50 4m00s, p95 6m40s, peak memory 610M (p95), cpu 1m40s (p50), from 10 runs; "
            "trending slower") in text.out

    other = spos("action", "show", _record(10)["id"], "--root", device_root, "--json")
    assert json.loads(other.out)["estimate"] is None
    assert "estimate: not enough history (1 run)" in spos(
        "action", "show", _record(10)["id"], "--root", device_root).out


def test_the_trend_needs_no_estimate_a_task_that_always_fails_is_flagged():
    failures = [_record(n, "failed", seconds=1.0) for n in range(4)]

    assert estimate(failures) is None
    assert trend(outcome(r) for r in failures) == {"slowdown": None, "failedShare": 1.0,
                                                   "flags": ["failing often"]}
    assert trend([]) == {"slowdown": None, "failedShare": None, "flags": []}


def test_the_slowdown_is_the_recent_median_over_the_earlier_one():
    records = [_record(n, seconds=20.0 if n < 6 else 25.0) for n in range(11)]
    assert trend(outcome(r) for r in records) == {"slowdown": 1.25, "failedShare": 0.0, "flags": []}
    zero = [_record(n, seconds=0.0) for n in range(10)]
    assert trend(outcome(r) for r in zero)["slowdown"] is None  # no ratio to a median of nothing
