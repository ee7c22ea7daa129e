"""What a task is likely to take, from its finished runs on the device. Pure: the caller reads
the records (one agent's completed/ and failed/ buckets) and hands over those of one task.

Runtime comes from completed runs (the record's `durationSeconds`, the attempt that
completed); peak memory and CPU from every finished attempt that recorded its `usage`.
Percentiles are nearest-rank: p of n sorted values is the ceil(p/100 * n)-th, a value that was
actually seen."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from reconciler.numbers import amount
from reconciler.views import clock, human_size

MIN_RUNS = 3
"""Completed runs needed before an estimate is given."""

TREND_RUNS, TREND_RECENT, TREND_FACTOR = 10, 5, 1.5
"""`trending slower`: at least TREND_RUNS completed runs, and the median runtime of the last
TREND_RECENT is more than TREND_FACTOR times the median of those before them."""

FAILING_WINDOW = 10
"""`failing often`: more than half of the last FAILING_WINDOW runs that ran to an outcome
(completed, failed or timed out) failed. Cancelled, skipped and expired runs do not count."""

FLAGS = ("trending slower", "failing often")

FAILED = frozenset({"failed", "timeout"})
OUTCOMES = FAILED | {"completed"}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def completed_runs(records: Iterable[dict]) -> list[dict]:
    """The completed runs with a runtime, oldest end first."""
    return _by_end(r for r in records if r.get("state") == "completed" and amount(r.get("durationSeconds")) is not None)


def estimate(records: Iterable[dict]) -> dict | None:
    """{"runs", "p50Seconds", "p95Seconds", "p95PeakMemoryBytes", "p50CpuSeconds", "flags"} from
    one task's finished run records, or None with fewer than MIN_RUNS completed runs."""
    records = [r for r in records if isinstance(r, dict)]
    completed = completed_runs(records)
    if len(completed) < MIN_RUNS:
        return None
    runtimes = [amount(r["durationSeconds"]) for r in completed]
    memory, cpu = [], []
    for record in records:
        for attempt in record.get("attempts") or ():
            usage = attempt.get("usage") if isinstance(attempt, dict) else None
            if isinstance(usage, dict):
                if amount(usage.get("peakMemoryBytes")) is not None:
                    memory.append(amount(usage["peakMemoryBytes"]))
                if amount(usage.get("cpuSeconds")) is not None:
                    cpu.append(amount(usage["cpuSeconds"]))
    return {
        "runs": len(completed),
        "p50Seconds": percentile(runtimes, 50),
        "p95Seconds": percentile(runtimes, 95),
        "p95PeakMemoryBytes": int(percentile(memory, 95)) if memory else None,
        "p50CpuSeconds": percentile(cpu, 50) if cpu else None,
        "flags": trend(outcome(r) for r in records)["flags"],
    }


@dataclass(frozen=True)
class Outcome:
    """What trend() needs of a finished run: when it ended, how, and its runtime."""

    ended: float
    state: str
    seconds: float | None


def outcome(record: dict) -> Outcome:
    return Outcome(_epoch(record.get("endedAt")), str(record.get("state")), amount(record.get("durationSeconds")))


def trend(outcomes: Iterable[Outcome]) -> dict:
    """{"slowdown", "failedShare", "flags"} of one task's finished runs, in any order.

    `slowdown`: the median runtime of the last TREND_RECENT completed runs over the median of
    those before them, given TREND_RUNS completed runs and a median before above zero (else
    None, as for a ratio too large to believe); above TREND_FACTOR it flags
    `trending slower`. `failedShare`: the part of the last FAILING_WINDOW runs that ran to an
    outcome that failed (None without any); above one half it flags `failing often`."""
    ordered = sorted(outcomes, key=lambda o: o.ended)
    runtimes = [o.seconds for o in ordered if o.state == "completed" and o.seconds is not None]
    slowdown, slower = None, False
    if len(runtimes) >= TREND_RUNS:
        import statistics  # here, not at the top: only a long enough history needs it

        before = statistics.median(runtimes[:-TREND_RECENT])
        recent = statistics.median(runtimes[-TREND_RECENT:])
        slowdown = amount(recent / before) if before > 0 else None  # None past what is believable
        slower = recent > TREND_FACTOR * before
    window = [o for o in ordered if o.state in OUTCOMES][-FAILING_WINDOW:]
    failed_share = sum(o.state in FAILED for o in window) / len(window) if window else None
    flags = []
    if slower:
        flags.append(FLAGS[0])
    if failed_share is not None and failed_share > 0.5:
        flags.append(FLAGS[1])
    return {"slowdown": slowdown, "failedShare": failed_share, "flags": flags}


def line(found: dict | None, completed: int) -> str:
    """`estimate: p50 4m12s, p95 6m01s, peak memory 610M (p95), cpu 2m03s (p50), from 24 runs`,
    then `; flag` for each flag; or the history being too short."""
    if found is None:
        return f"estimate: not enough history ({completed} run{'' if completed == 1 else 's'})"
    parts = [f"p50 {clock(found['p50Seconds'])}", f"p95 {clock(found['p95Seconds'])}"]
    if found["p95PeakMemoryBytes"] is not None:
        parts.append(f"peak memory {human_size(found['p95PeakMemoryBytes'])} (p95)")
    if found["p50CpuSeconds"] is not None:
        parts.append(f"cpu {clock(found['p50CpuSeconds'])} (p50)")
    parts.append(f"from {found['runs']} runs")
    return "estimate: " + ", ".join(parts) + "".join(f"; {flag}" for flag in found["flags"])


def _by_end(records: Iterable[dict]) -> list[dict]:
    return sorted(records, key=lambda r: _epoch(r.get("endedAt")))


def _epoch(text) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return float("-inf")


