"""What scripts and people read, locked with syrupy snapshots on one fixed device state
(tests/fixed_state.py): each listing's text and its `--json` form. A change to any of them shows
up here as a diff to review; the JSON shapes are documented (docs/cli.md, docs/queue.md,
docs/sync.md) and must only grow.

Machine-dependent values are pinned before the snapshot: the device root is shown as `/`, and
storage sizes (which depend on the file system's block size) as fixed numbers.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone

import pytest
from fixed_state import AGENT, NOW, build

from reconciler import forecast, metrics, resources, status
from reconciler.device import Device
from reconciler.validate import load


@pytest.fixture
def device(device_root):
    build(device_root)
    return device_root


def pinned(text: str, root) -> str:
    """The root as /ROOT, and this process (the trigger daemon's stand-in) as pid 1000."""
    return re.sub(rf"\bpid(\"?:? ){os.getpid()}\b", r"pid\g<1>1000", text.replace(str(root), "/ROOT"))


def test_action_list_history_and_show(spos, device, snapshot):
    outputs = {}
    for name, words in {"list": ("action", "list"), "history": ("action", "history"),
                        "show": ("action", "show", "20261126T090000-00000002")}.items():
        text, as_json = spos(*words, "--root", device), spos(*words, "--root", device, "--json")
        assert text.code == as_json.code == 0, text.err + as_json.err
        outputs[name] = (text.out, json.loads(as_json.out))
    assert outputs == snapshot


def test_status(device, snapshot):
    found = status.collect(Device(device))
    assert json.loads(pinned(json.dumps(found), device)) == snapshot
    assert pinned(status.text(found), device) == snapshot


def test_metrics_exposition(device, snapshot):
    text = metrics.exposition(Device(device))
    assert "".join(line for line in text.splitlines(keepends=True)
                   if not line.startswith("spos_scrape_duration_seconds ")) == snapshot


def test_action_resources(device, snapshot):
    report = resources.collect(Device(device, cgroup_root=str(device / "sys/fs/cgroup")))
    for agent in report["agents"]:
        for used in agent["storage"].values():
            used["bytes"] = 4096 if used["bytes"] is not None else None
    assert report == snapshot
    assert resources.text(report) == snapshot


def test_schedule_next(manifests, snapshot):
    now = datetime.fromtimestamp(NOW, timezone.utc)
    found = forecast.next_fires(load(str(manifests), None), count=3, now=now, zone="UTC")
    found = json.loads(json.dumps(found).replace(str(manifests.parent), "/project"))
    assert found == snapshot
    assert forecast.text(found) == snapshot
    assert [s["agent"] for s in forecast.next_fires(load(str(manifests), None), agent=AGENT,
                                                    now=now, zone="UTC")["schedules"]] == [AGENT, AGENT]


@pytest.mark.parametrize("words, says", [
    (("action", "list", "--agent", "research-01"), "no agent 'research-01' on this device (its agents: "),
    (("action", "history", "--agent", "research-01"), "no agent 'research-01' on this device (its agents: "),
    (("action", "history", "--limit", "-5"), "--limit: give at least 1, not -5"),
    (("action", "history", "--limit", "0"), "--limit: give at least 1, not 0"),
])
def test_a_mistyped_agent_or_a_limit_below_one_is_said_not_answered_with_no_runs(spos, device, words, says):
    result = spos(*words, "--root", device)
    assert result.code == 1 and says in result.err and "No runs" not in result.out, result
