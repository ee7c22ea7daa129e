"""`spos why RUN_ID` says where a run came from and what it ran under (docs/why.md).

Runs that matter end to end go through the real executor, as tests/test_executor.py runs them
(its Device: manifests applied to a temporary root, `spos action run`, `spos executor --once`
with the real sandbox and cgroups), and are read back with `explain`, the data `spos why --json`
prints (one test runs the command itself). A synced device pulls its manifests from a bare
repository (tests/test_gitsync.py's Upstream). The views locked with syrupy snapshots, and the
retention of config copies, are shown on a device whose state is laid out by hand as the
executor writes it, so that nothing in them depends on the clock or the temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from sandboxes import sandbox_missing
from test_executor import Device, device, sh, wait_for, when  # noqa: F401 (device: a fixture)
from test_gitsync import Upstream

from reconciler.device import Device as Root
from reconciler.errors import UsageError
from reconciler.executor.provenance import Provenance, read_applied
from reconciler.state import INVENTORY, write_inventory
from reconciler.why import explain, text

STATE = "var/lib/systemprompt-os"

needs_executor = pytest.mark.skipif(bool(sandbox_missing()), reason=sandbox_missing() or "")
"""On tests that run the real executor (also marked slow and root)."""


def digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def why(root: Path, run_id: str) -> dict:
    """What `spos why RUN_ID --json` prints (`explain`, as the CLI calls it), through JSON."""
    return json.loads(json.dumps(explain(Root(root), run_id)))


def why_text(root: Path, run_id: str) -> str:
    """What `spos why RUN_ID` prints."""
    return text(explain(Root(root), run_id))


def copies(device: Device) -> list[str]:
    directory = device.agent_dir() / "configs"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# -- what the executor records ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
@needs_executor
def test_each_attempt_records_the_config_and_revision_it_ran_under(device):
    device.apply({"t": {"command": sh("true"), "concurrency": "Allow"}})
    first, second = device.enqueue("t"), device.enqueue("t")
    device.once()

    config = (device.agent_dir() / "agent.json").read_bytes()
    inventory = json.loads((device.root / STATE / "inventory.json").read_text())
    for run_id in (first, second):
        attempt = device.record(run_id)["attempts"][0]
        assert attempt["configDigest"] == digest(config), attempt
        assert attempt["revision"] is None  # applied from tmp_path, which is no git checkout
        assert attempt["manifestDigest"] == inventory["manifestDigest"]
    # one copy per distinct config, holding the very bytes the runs loaded
    assert copies(device) == [f"sha256-{hashlib.sha256(config).hexdigest()}.json"]
    assert (device.agent_dir() / "configs" / copies(device)[0]).read_bytes() == config

    shown = why(device.root, first)
    assert shown["run"]["id"] == first and shown["run"]["state"] == "completed"
    assert shown["source"] == {"kind": "manual"}
    assert shown["config"]["digest"] == shown["config"]["current"] == digest(config)
    assert shown["config"]["changed"] is False and shown["config"]["from"] == "run"
    assert shown["attempts"][0]["configChanged"] is False
    assert shown["config"]["capability"]["allowed"]["execute"] == ["/bin", "/usr/bin"]
    assert shown["config"]["limits"]["memoryBytes"] == 256_000_000
    said = why_text(device.root, first)
    assert "no git revision (applied by hand from a directory that is not a git checkout)" in said
    assert "the agent's config is the same now" in said


@pytest.mark.slow
@pytest.mark.root
@needs_executor
def test_a_changed_config_shows_the_limits_the_run_ran_under(device):
    device.apply({"t": {"command": sh("true"), "timeout": "30s"}})
    run_id = device.enqueue("t")
    device.once()
    old = (device.agent_dir() / "agent.json").read_bytes()

    device.apply({"t": {"command": sh("true"), "timeout": "20s"}}, quota={"memory": "128M"})

    shown = why(device.root, run_id)
    config = shown["config"]
    assert config["digest"] == digest(old) and config["current"] != digest(old)
    assert config["changed"] is True and config["from"] == "run"
    assert shown["attempts"][0]["configChanged"] is True
    assert config["limits"]["memoryBytes"] == 256_000_000 and config["limits"]["timeoutSeconds"] == 30
    assert {(c["field"], c["then"], c["now"]) for c in config["changes"]} == {
        ("limits.memoryBytes", 256_000_000, 128_000_000), ("limits.timeoutSeconds", 30, 20)}
    said = why_text(device.root, run_id)
    assert f"the agent's config has changed since: now sha256:{config['current'][7:19]}" in said
    assert "limits.memoryBytes: 256M -> 128M" in said and "limits.timeoutSeconds: 30s -> 20s" in said
    assert "memory 256M" in said and "Capabilities (from the config the run ran under)" in said

    # without its copy, the current config stands in, and the view says so
    (device.agent_dir() / "configs" / f"sha256-{digest(old)[7:]}.json").unlink()
    shown = why(device.root, run_id)
    assert shown["config"]["from"] == "current" and shown["config"]["limits"]["memoryBytes"] == 128_000_000
    assert f"no copy of sha256:{digest(old)[7:19]} is kept" in why_text(device.root, run_id)


@pytest.mark.slow
@pytest.mark.root
@needs_executor
def test_a_synced_device_shows_the_revision_the_run_ran_under(device, spos, tmp_path):
    (tmp_path / "upstream").mkdir()
    upstream = Upstream(tmp_path / "upstream")
    docs = [
        {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "exec-test"},
         "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}},
        {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": device.agent},
         "spec": {"capability": "exec-test", "tasks": {"t": {"command": sh("true")}}}},
    ]
    sha = upstream.commit({"agents.d/agent.yaml": "\n---\n".join(json.dumps(d) for d in docs) + "\n"})
    synced = spos("sync", "--root", device.root, "--repo", upstream.bare, "--json")
    assert json.loads(synced.out)["outcome"] == "applied", synced.out + synced.err

    run_id = device.enqueue("t")
    device.once()

    shown = why(device.root, run_id)
    assert shown["attempts"][0]["revision"] == sha
    assert shown["device"]["revision"] == sha and shown["device"]["sync"]["revision"] == sha
    said = why_text(device.root, run_id)
    assert f"revision {sha[:12]} (synced from {upstream.bare} main:agents.d)" in said


@pytest.mark.slow
@pytest.mark.root
@needs_executor
def test_a_hook_run_and_a_retried_run_show_their_lineage(device):
    device.apply({
        "flaky": {"command": sh("exit 3"), "onFailure": ["after"],
                  "retries": {"limit": 2, "backoff": {"initial": "1s", "factor": 2}}},
        "after": {"command": sh("true")},
    })
    run_id = device.enqueue("flaky")
    device.once()

    shown = why(device.root, run_id)
    attempts = shown["attempts"]
    assert [(a["attempt"], a["state"], a["exitCode"]) for a in attempts] == [
        (1, "failed", 3), (2, "failed", 3), (3, "failed", 3)]
    assert len({a["configDigest"] for a in attempts}) == 1 and attempts[0]["configDigest"]
    for before, after, expected in ((attempts[0], attempts[1], 1.0), (attempts[1], attempts[2], 2.0)):
        assert before["nextAt"] == after["startedAt"]
        assert before["nextAfterSeconds"] == pytest.approx(
            when(after["startedAt"]) - when(before["endedAt"]), abs=0.002)
        assert expected * 0.9 - 0.01 <= before["nextAfterSeconds"] <= expected * 1.1 + 0.5
    assert attempts[2]["nextAt"] is None and attempts[2]["nextAfterSeconds"] is None
    [hook] = shown["hooks"]
    assert hook["on"] == "onFailure" and hook["task"] == "after" and hook["state"] == "completed"

    child = why(device.root, hook["id"])
    assert child["source"]["kind"] == "hook" and child["source"]["run"] == run_id
    assert child["source"]["on"] == "onFailure"
    assert child["source"]["parent"]["id"] == run_id and child["source"]["parent"]["state"] == "failed"
    said = why_text(device.root, hook["id"])
    assert f"the onFailure hook of run {run_id} (spos why {run_id})" in said
    assert f"{device.agent}/flaky: failed, exit 3" in said
    lineage = why_text(device.root, run_id)
    assert "#1 failed, exit 3" in lineage and "#3 failed, exit 3" in lineage
    assert lineage.count("next attempt") == 2 and f"onFailure: run {hook['id']}" in lineage


@pytest.mark.slow
@pytest.mark.root
@needs_executor
def test_an_interrupted_attempt_keeps_its_config_and_the_rerun_records_its_own(device):
    script = 'if [ "$SPOS_ATTEMPT" = 1 ]; then sleep 86402; fi'
    device.apply({"long": {"command": sh(script), "timeout": "30s"}})
    old = digest((device.agent_dir() / "agent.json").read_bytes())
    run_id = device.enqueue("long")
    daemon = device.daemon("--rescan", "60s")
    device.wait_state(run_id, "active")
    running = wait_for(lambda: (shown := why(device.root, run_id))["attempts"][0]["configDigest"] and shown,
                       "the running attempt to record what it runs under")
    assert [(a["attempt"], a["state"], a["configDigest"]) for a in running["attempts"]] == [(1, "active", old)]

    daemon.process.kill()
    daemon.process.wait(5)
    device.apply({"long": {"command": sh(script), "timeout": "20s"}})
    new = digest((device.agent_dir() / "agent.json").read_bytes())
    device.once()

    shown = why(device.root, run_id)
    assert [(a["attempt"], a["state"], a["configDigest"], a["configChanged"]) for a in shown["attempts"]] == [
        (1, "interrupted", old, True), (2, "completed", new, False)]
    assert shown["config"]["digest"] == new and shown["config"]["changed"] is False
    assert shown["config"]["limits"]["timeoutSeconds"] == 20
    assert copies(device) == sorted(f"sha256-{d[7:]}.json" for d in (old, new))
    said = why_text(device.root, run_id)
    assert f"attempt 1: config sha256:{old[7:19]}" in said and f"attempt 2: config sha256:{new[7:19]}" in said


def test_a_trigger_run_shows_its_trigger_and_event(spos, device_root, tmp_path):
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    trigger = {"apiVersion": "spos/v1", "kind": "Trigger", "metadata": {"name": "drop-csv"},
               "spec": {"agent": "drop-001", "task": "load",
                        "filesystem": {"path": "/srv/drop", "events": ["close_write"]}}}
    agent = {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": "drop-001"},
             "spec": {"tasks": {"load": {"command": ["/bin/true"]}}}}
    (manifests / "a.yaml").write_text(f"{json.dumps(agent)}\n---\n{json.dumps(trigger)}\n")
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    fired = spos("trigger", "test", "drop-csv", "--root", device_root, "--json")
    assert fired.code == 0, fired.err
    run_id = json.loads(fired.out)["run"]

    source = why(device_root, run_id)["source"]
    assert source["kind"] == "trigger" and source["trigger"] == "drop-csv"
    assert source["type"] == "filesystem" and source["event"] == {"test": "1"}
    assert source["registered"] is True
    said = why_text(device_root, run_id)
    assert "Trigger drop-csv (filesystem), 1 event" in said and "event: test=1" in said
    assert "no attempt has started" in said

    (manifests / "a.yaml").write_text(json.dumps(agent) + "\n")
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    assert why(device_root, run_id)["source"]["registered"] is False


def test_an_unknown_run_fails_clearly(spos, device_root):
    with pytest.raises(UsageError, match="no run '20260101T000000-00000000' on this device"):
        explain(Root(device_root), "20260101T000000-00000000")
    result = spos("why", "20260101T000000-00000000", "--root", device_root)
    assert result.code == 1 and result.out == ""
    assert "no run '20260101T000000-00000000' on this device" in result.err


def test_the_command_prints_the_view_and_its_json(spos, laid):
    shown = spos("why", PARENT, "--root", laid.root)
    as_json = spos("why", PARENT, "--root", laid.root, "--json")
    assert shown.code == as_json.code == 0, shown.err + as_json.err
    assert shown.out == text(explain(Root(laid.root), PARENT))
    assert json.loads(as_json.out) == json.loads(json.dumps(explain(Root(laid.root), PARENT)))


# -- reading what was applied, cheaply -------------------------------------------------------


def test_the_applied_revision_is_read_from_the_inventory_head_and_only_when_it_changed(device_root):
    root = Root(device_root)
    provenance = Provenance(root)
    assert provenance.applied() == {"revision": None, "manifestDigest": None}  # never applied

    resources = {f"agent/a-{n:05d}": {"digest": f"sha256:{n:064x}", "kind": "agent"} for n in range(5000)}
    write_inventory(root, resources, "a" * 40, "sha256:" + "1" * 64)
    assert provenance.applied() == {"revision": "a" * 40, "manifestDigest": "sha256:" + "1" * 64}
    assert read_applied(root) == provenance.applied()

    write_inventory(root, resources, None, "sha256:" + "2" * 64)  # applied from a plain directory
    assert provenance.applied() == {"revision": None, "manifestDigest": "sha256:" + "2" * 64}

    # an inventory laid out otherwise (rewritten by hand) is read whole
    compact = {"resources": {}, "format": 1, "revision": "b" * 40, "manifestDigest": "sha256:" + "3" * 64}
    root.write_atomic(INVENTORY, json.dumps(compact).encode())
    assert provenance.applied() == {"revision": "b" * 40, "manifestDigest": "sha256:" + "3" * 64}


# -- a device laid out by hand -----------------------------------------------------------------


V1 = {
    "format": 1, "agent": "research-001", "user": "root",
    "tasks": {
        "daily_arxiv_scan": {
            "command": None,
            "steps": [{"name": "fetch", "command": ["/usr/bin/python3", "fetch.py"], "timeoutSeconds": None,
                       "continueOnError": False}],
            "timeoutSeconds": 1800, "concurrency": "Forbid", "priority": 40, "env": {},
            "retries": {"limit": 2, "backoff": {"initialSeconds": 30, "factor": 2, "maxSeconds": 300},
                        "nonRetryableExitCodes": [3]},
            "workdir": None, "checkpoint": {"intervalSeconds": None}, "flexible": False,
            "heartbeatTimeoutSeconds": 300, "onSuccess": [], "onFailure": ["notify"],
        },
        "notify": {"command": ["/usr/bin/python3", "notify.py"], "steps": None, "timeoutSeconds": 60,
                   "concurrency": "Allow", "priority": 50, "env": {}, "workdir": None,
                   "retries": {"limit": 0, "backoff": {"initialSeconds": 10, "factor": 2, "maxSeconds": 300},
                               "nonRetryableExitCodes": []},
                   "checkpoint": None, "flexible": False, "heartbeatTimeoutSeconds": None,
                   "onSuccess": [], "onFailure": []},
    },
    "capability": {
        "name": "research",
        "allowed": {"read": ["/opt/agents/research"], "write": ["/srv/research"],
                    "execute": ["/usr/bin/python3"], "devices": [], "network": ["export.arxiv.org:443"]},
        "denied": {"read": ["/opt/agents/research/secrets"], "write": [], "execute": [], "devices": [],
                   "network": []},
    },
    "quota": {"name": "standard", "cpuPercent": 100, "memoryBytes": 2_000_000_000, "ioWeight": 100,
              "tasksMax": 256, "nice": 0,
              "storageBytes": {"log": 500_000_000, "output": 5_000_000_000, "temp": 2_000_000_000},
              "retentionSeconds": {"completed": 604800, "failed": 2592000, "temp": 86400}},
}
V2 = json.loads(json.dumps(V1))
V2["quota"]["memoryBytes"] = 1_000_000_000
V2["capability"]["allowed"]["network"].append("api.semanticscholar.org:443")
V2["tasks"]["daily_arxiv_scan"]["retries"]["limit"] = 1

REVISION_A, REVISION_B = "4db0c13a5c69" + "0" * 28, "ff1a8ca0a41c" + "1" * 28
MANIFESTS_A, MANIFESTS_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
PARENT, CHILD, WEBHOOK = "20261126T090000-9f1c2a7b", "20261126T090412-1c2d3e4f", "20261126T091204-5b6c7d8e"
CRON_FILE = """\
# spos:file entries for agent research-001. Lines below a '# spos:managed' marker belong to spos; all other lines are left as they are.
# spos:managed cron/research-001-daily
0 9 * * * root /usr/local/bin/spos action run --quiet --agent research-001 --task daily_arxiv_scan --schedule research-001-daily --deadline 30m
"""


def config_bytes(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


class Laid:
    """A device's state written as spos writes it: agent configs and their copies, run
    records, the inventory, the sync state, a crontab file."""

    def __init__(self, root: Path):
        self.root = root

    def agent_dir(self, agent: str) -> Path:
        return self.root / STATE / "agents" / agent

    def config(self, agent: str, config: dict | bytes, *, current: bool = False, age: float = 3600) -> str:
        raw = config if isinstance(config, bytes) else config_bytes(config)
        path = self.agent_dir(agent) / "configs" / f"sha256-{hashlib.sha256(raw).hexdigest()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        os.utime(path, (time.time() - age, time.time() - age))
        if current:
            (self.agent_dir(agent) / "agent.json").write_bytes(raw)
        return digest(raw)

    def record(self, agent: str, bucket: str, record: dict, *, priority: int = 50,
               queued_ns: int | None = None) -> Path:
        ns = queued_ns if queued_ns is not None else time.time_ns()
        path = self.agent_dir(agent) / bucket / f"{100 - priority:03d}-{ns:020d}-{record['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": 1, "agent": agent, "priority": priority, **record}, indent=2))
        return path

    def file(self, device_path: str, content: str) -> None:
        path = self.root / device_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def _ns(iso: str) -> int:
    return int(when(iso) * 1e9)


def _attempt(n: int, state: str, started: str, ended: str, code, reason: str, config: str,
             revision: str, manifests: str, seconds: float) -> dict:
    return {"attempt": n, "state": state, "startedAt": started, "endedAt": ended, "exitCode": code,
            "reason": reason, "durationSeconds": seconds, "usage": {"cpuSeconds": 1.5},
            "configDigest": config, "revision": revision, "manifestDigest": manifests}


@pytest.fixture
def laid(device_root) -> Laid:
    """research-001 ran its daily scan three times under config V1 at revision A; a sync then
    applied revision B, with config V2. Its onFailure hook ran under V2; a webhook run from
    before attempts recorded their config completed."""
    laid = Laid(device_root)
    v1 = laid.config("research-001", V1)
    v2 = laid.config("research-001", V2, current=True)
    laid.file("/etc/cron.d/spos-research-001", CRON_FILE)
    laid.file(f"/{STATE}/sync/state.json", json.dumps({
        "format": 1, "repo": {"url": "https://git.example.net/fleet", "branch": "main", "path": "agents.d"},
        "applied": {"revision": REVISION_B, "at": "2026-11-26T09:03:00+00:00", "changed": 2,
                    "checkedAt": "2026-11-26T09:03:00+00:00"}}))
    write_inventory(Root(device_root), {}, REVISION_B, MANIFESTS_B)
    reason = "step fetch exited with 1"
    attempts = [
        _attempt(1, "failed", "2026-11-26T09:00:00.512+00:00", "2026-11-26T09:00:03.204+00:00", 1, reason,
                 v1, REVISION_A, MANIFESTS_A, 2.692),
        _attempt(2, "timeout", "2026-11-26T09:00:33.180+00:00", "2026-11-26T09:01:05.002+00:00", -15,
                 "hung: no heartbeat for 300s", v1, REVISION_A, MANIFESTS_A, 31.822),
        _attempt(3, "failed", "2026-11-26T09:02:05.941+00:00", "2026-11-26T09:04:11.870+00:00", 1, reason,
                 v1, REVISION_A, MANIFESTS_A, 125.929),
    ]
    laid.record("research-001", "failed", {
        "id": PARENT, "task": "daily_arxiv_scan", "state": "failed", "attempt": 3, "reason": reason,
        "enqueuedAt": "2026-11-26T09:00:00.123+00:00", "notAfter": "2026-11-26T09:30:00.123+00:00",
        "notBefore": "2026-11-26T09:02:05.900+00:00", "source": {"kind": "schedule", "name": "research-001-daily"},
        "startedAt": attempts[-1]["startedAt"], "endedAt": attempts[-1]["endedAt"], "exitCode": 1,
        "attempts": attempts, "configDigest": v1, "revision": REVISION_A, "manifestDigest": MANIFESTS_A,
        "followUpErrors": ["agent 'research-001' has no task 'page_oncall' (its tasks: daily_arxiv_scan, notify)"],
    }, priority=40, queued_ns=_ns("2026-11-26T09:00:00.123+00:00"))
    laid.record("research-001", "completed", {
        "id": CHILD, "task": "notify", "state": "completed", "attempt": 1, "reason": "",
        "enqueuedAt": "2026-11-26T09:04:11.874+00:00", "notAfter": None,
        "source": {"kind": "hook", "run": PARENT, "on": "onFailure"},
        "startedAt": "2026-11-26T09:04:11.901+00:00", "endedAt": "2026-11-26T09:04:12.377+00:00", "exitCode": 0,
        "attempts": [_attempt(1, "completed", "2026-11-26T09:04:11.901+00:00", "2026-11-26T09:04:12.377+00:00",
                              0, "", v2, REVISION_B, MANIFESTS_B, 0.476)],
        "configDigest": v2, "revision": REVISION_B, "manifestDigest": MANIFESTS_B,
    }, queued_ns=_ns("2026-11-26T09:04:11.874+00:00"))
    laid.record("research-001", "completed", {
        "id": WEBHOOK, "task": "notify", "state": "completed", "attempt": 1, "reason": "",
        "enqueuedAt": "2026-11-26T09:12:04.311+00:00", "notAfter": None,
        "source": {"kind": "trigger", "trigger": "research-001-github", "type": "webhook",
                   "event": {"path": "/hooks/github", "delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
                             "event": "push", "contentType": "application/json"},
                   "events": 1, "delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"},
        "startedAt": "2026-11-26T09:12:04.350+00:00", "endedAt": "2026-11-26T09:12:04.901+00:00", "exitCode": 0,
        "attempts": [{"attempt": 1, "state": "completed", "startedAt": "2026-11-26T09:12:04.350+00:00",
                      "endedAt": "2026-11-26T09:12:04.901+00:00", "exitCode": 0, "reason": "",
                      "durationSeconds": 0.551}],
    }, queued_ns=_ns("2026-11-26T09:12:04.311+00:00"))
    return laid


def test_the_view_of_a_retried_scheduled_run_whose_config_changed(laid, snapshot):
    explained = explain(Root(laid.root), PARENT)

    assert explained["config"]["limits"]["memoryBytes"] == V1["quota"]["memoryBytes"]
    assert explained["config"]["changed"] is True
    assert [hook["id"] for hook in explained["hooks"]] == [CHILD]
    assert text(explained) == snapshot(name="text")
    assert json.dumps(explained, indent=2) + "\n" == snapshot(name="json")


def test_the_view_of_a_hook_run_and_of_a_run_that_did_not_record_its_config(laid, snapshot):
    hook = explain(Root(laid.root), CHILD)
    webhook = explain(Root(laid.root), WEBHOOK)

    assert hook["source"]["parent"]["id"] == PARENT
    assert webhook["config"]["from"] == "current" and webhook["config"]["digest"] is None
    assert text(hook) == snapshot(name="hook")
    assert text(webhook) == snapshot(name="webhook")
    assert json.dumps(webhook, indent=2) + "\n" == snapshot(name="webhook-json")


def test_a_retry_waiting_and_an_attempt_running_are_part_of_the_lineage(laid):
    v1 = digest(config_bytes(V1))
    first = _attempt(1, "failed", "2026-11-26T10:00:00.000+00:00", "2026-11-26T10:00:01.000+00:00", 1,
                     "step fetch exited with 1", v1, REVISION_B, MANIFESTS_B, 1.0)
    laid.record("research-001", "queue", {
        "id": "20261126T100000-0000000a", "task": "daily_arxiv_scan", "state": "queued", "attempt": 2,
        "enqueuedAt": "2026-11-26T10:00:00.000+00:00", "notBefore": "2026-11-26T10:00:31.500+00:00",
        "source": {"kind": "manual"}, "attempts": [first], **provenance_of(first)})
    laid.record("research-001", "active", {
        "id": "20261126T100000-0000000b", "task": "daily_arxiv_scan", "state": "active", "attempt": 2,
        "enqueuedAt": "2026-11-26T10:00:00.000+00:00", "startedAt": "2026-11-26T10:00:40.000+00:00",
        "source": {"kind": "manual"}, "attempts": [first], "configDigest": v1, "revision": REVISION_B,
        "manifestDigest": MANIFESTS_B})
    device = Root(laid.root)

    waiting = explain(device, "20261126T100000-0000000a")
    assert [a["state"] for a in waiting["attempts"]] == ["failed"]
    assert waiting["attempts"][0]["nextAt"] == "2026-11-26T10:00:31.500+00:00"
    assert waiting["attempts"][0]["nextAfterSeconds"] == 30.5
    assert "waiting:   attempt 2 is due at 2026-11-26T10:00:31.500+00:00" in text(waiting)

    running = explain(device, "20261126T100000-0000000b")
    assert [(a["attempt"], a["state"], a["endedAt"]) for a in running["attempts"]] == [
        (1, "failed", "2026-11-26T10:00:01.000+00:00"), (2, "active", None)]
    assert running["attempts"][1]["configDigest"] == v1 and running["attempts"][1]["revision"] == REVISION_B
    assert running["attempts"][0]["nextAfterSeconds"] == 39.0
    assert "#2 active: 2026-11-26T10:00:40.000+00:00 -> running" in text(running)


def test_the_schedules_that_started_a_run_are_shown_as_they_are_on_the_device(laid):
    laid.file("/etc/cron.d/spos-research-001", CRON_FILE + (
        "# spos:managed cron/research-001-hourly\n"
        "#suspended# 0,15,30,45 * * * * root /usr/local/bin/spos action run --quiet --agent research-001 "
        "--task notify --schedule research-001-hourly --cron '0 * * * *' --cron-tz Europe/Berlin\n"))
    marker = "# spos:managed timer/research-001-weekly\n# Written by spos apply\n"
    laid.file("/etc/systemd/system/spos-schedule-research-001-weekly.timer", marker + (
        "[Unit]\nDescription=spos schedule research-001-weekly\n\n"
        "[Timer]\nOnCalendar=Sun *-*-* 04:00:00\nPersistent=true\n"))
    laid.file("/etc/systemd/system/spos-schedule-research-001-weekly.service", marker + (
        "[Service]\nType=oneshot\n"
        "ExecStart=/usr/local/bin/spos action execute --agent research-001 --task notify\n"))
    for run_id, source in (("20261126T110000-0000000c", {"kind": "schedule", "name": "research-001-hourly"}),
                           ("20261126T110000-0000000d", {"kind": "execute"}),
                           ("20261126T110000-0000000e", {"kind": "schedule", "name": "research-001-gone"})):
        laid.record("research-001", "queue", {"id": run_id, "task": "notify", "attempt": 1,
                                                "enqueuedAt": "2026-11-26T11:00:00.000+00:00", "source": source})
    device = Root(laid.root)

    hourly = explain(device, "20261126T110000-0000000c")["source"]["onDevice"]
    assert hourly["kind"] == "cron" and hourly["suspended"] is True
    assert (hourly["when"], hourly["timeZone"], hourly["user"]) == ("0 * * * *", "Europe/Berlin", "root")
    assert "cron 0 * * * * in Europe/Berlin as root (suspended: commented out)" in text(
        explain(device, "20261126T110000-0000000c"))

    executed = explain(device, "20261126T110000-0000000d")
    [timer] = executed["source"]["timers"]
    assert timer["name"] == "research-001-weekly" and timer["kind"] == "timer"
    assert timer["timer"] == {"OnCalendar": "Sun *-*-* 04:00:00", "Persistent": "true"}
    said = text(executed)
    assert "spos action execute: a timer Schedule's service, or by hand" in said
    assert "timer OnCalendar=Sun *-*-* 04:00:00, Persistent=true, in " \
           "/etc/systemd/system/spos-schedule-research-001-weekly.timer" in said

    gone = explain(device, "20261126T110000-0000000e")
    assert gone["source"]["onDevice"] is None
    assert "not on this device now (no cron line or timer of that name)" in text(gone)


def provenance_of(attempt: dict) -> dict:
    return {key: attempt[key] for key in ("configDigest", "revision", "manifestDigest")}


# -- retention of config copies ------------------------------------------------------------------


def test_cleanup_removes_config_copies_no_run_names_and_keeps_the_rest(spos, device_root):
    laid = Laid(device_root)
    old = {**V1, "user": "nobody"}
    current = laid.config("research-001", V2, current=True)
    named_by_a_retry = laid.config("research-001", V1)
    named_by_an_old_run = laid.config("research-001", {**V1, "user": "old"})
    unnamed = laid.config("research-001", old)
    fresh = laid.config("research-001", {**V1, "user": "fresh"}, age=5)  # a run may be starting with it
    day = 86400
    laid.record("research-001", "queue", {
        "id": "20260101T000000-00000001", "task": "notify", "attempt": 2, "notBefore": None,
        "attempts": [{"attempt": 1, "state": "failed", "configDigest": named_by_a_retry}]})
    stale = laid.record("research-001", "completed", {
        "id": "20260101T000000-00000002", "task": "notify", "state": "completed",
        "endedAt": "2026-01-01T00:00:00+00:00", "configDigest": named_by_an_old_run,
        "attempts": [{"attempt": 1, "state": "completed", "configDigest": named_by_an_old_run}]})
    os.utime(stale, (time.time() - 30 * day, time.time() - 30 * day))
    name = lambda d: f"sha256-{d[7:]}.json"  # noqa: E731

    dry = spos("action", "cleanup", "--root", device_root, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    would = [r for r in json.loads(dry.out)["removed"] if r["what"] == "config"]
    assert sorted(r["paths"][0].rsplit("/", 1)[1] for r in would) == sorted(
        [name(unnamed), name(named_by_an_old_run)])  # the old run goes in this pass, its copy with it
    assert all(r["runId"] is None and r["state"] == "no run names it" for r in would)
    assert len(list((laid.agent_dir("research-001") / "configs").iterdir())) == 5

    done = spos("action", "cleanup", "--root", device_root)
    assert done.code == 0, done.err
    assert f"removed research-001 configs/{name(unnamed)} (no run names it" in done.out
    assert "Removed 1 finished run, 0 leftover temporary directories and 2 unused config copies." in done.out
    left = sorted(p.name for p in (laid.agent_dir("research-001") / "configs").iterdir())
    assert left == sorted([name(current), name(named_by_a_retry), name(fresh)])

    again = spos("action", "cleanup", "--root", device_root)
    assert "Nothing to clean up." in again.out
