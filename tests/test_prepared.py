"""The executor's prepared sandboxes, end to end: an agent's next run starts in a sandbox set
up ahead, behaves exactly as in a fresh one, and nothing of a prepared sandbox outlives the
executor (stopped, or killed and followed by another)."""

from __future__ import annotations

import os

import pytest
from sandboxes import sandbox_missing
from test_executor import Device, device, run_cgroup_dirs, sh, wait_for  # noqa: F401 (device: a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.root]
_SKIP = sandbox_missing()
if _SKIP:
    pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.skip(reason=_SKIP)]

REPORT = ('echo "run=$SPOS_RUN_ID cwd=$(pwd) checkpoint=$SPOS_CHECKPOINT_DIR" '
          '>> $SPOS_OUTPUT_DIR/seen; touch $SPOS_CHECKPOINT_DIR/mark $TMPDIR/mark')


def prepared_cgroups(device: Device) -> list:
    return [p for d in run_cgroup_dirs(device.agent) for p in d.glob("warm-*")]


def run_and_wait(device: Device, task: str = "report") -> tuple[str, dict]:
    run_id = device.enqueue(task)
    return run_id, device.wait_state(run_id, "completed", "failed")


def test_an_agents_next_run_starts_in_a_prepared_sandbox_like_in_a_fresh_one(device):
    device.apply({"report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(first)
    assert "(prepared sandbox)" not in device.log(first)
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")

    second, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(second)  # its touches worked too
    assert "(prepared sandbox)" in device.log(second)
    agent_dir = f"/var/lib/systemprompt-os/agents/{device.agent}"
    assert device.output("seen").read_text().splitlines() == [
        f"run={run} cwd={agent_dir}/tmp/{run} checkpoint={agent_dir}/checkpoints/{run}"
        for run in (first, second)]
    assert record["usage"]["cpuSeconds"] > 0  # counted in the run's cgroup, as ever
    assert not run_cgroup_dirs(device.agent, second)  # removed at the end, under the run's name

    assert daemon.stop() == 0
    assert not prepared_cgroups(device)  # the executor closed the one prepared meanwhile


def test_an_agents_runs_without_network_have_only_a_loopback_fresh_or_prepared(device):
    """The prepared sandbox's network namespace, like a fresh one's, has only a loopback and is
    not the host's; it is the one the agent's run before gave back (netns.py)."""
    device.apply({"report": {"command": sh(
        "echo $(readlink /proc/self/ns/net) $(tail -n +3 /proc/net/dev | cut -d: -f1) "
        ">> $SPOS_OUTPUT_DIR/netns"), "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(first)
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")
    second, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(second)
    assert "(prepared sandbox)" in device.log(second)
    assert daemon.stop() == 0

    seen = [line.split() for line in device.output("netns").read_text().splitlines()]
    host = os.readlink("/proc/self/ns/net")
    assert [interfaces for _, *interfaces in seen] == [["lo"], ["lo"]]
    assert seen[0][0] == seen[1][0] != host


def test_a_run_whose_capability_changed_does_not_use_the_old_prepared_sandbox(device):
    task = {"report": {"command": sh("touch /srv/shared/$SPOS_RUN_ID"), "timeout": "30s",
                       "concurrency": "Allow"}}
    device.apply(task)
    (device.root / "srv/shared").mkdir(parents=True)
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device)
    assert record["state"] == "failed"  # /srv/shared is not writable under the first capability
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")

    manifests = device.tmp_path / "agents.d" / "agents.yaml"
    manifests.write_text(manifests.read_text().replace(
        '"execute": ["/bin", "/usr/bin"]', '"execute": ["/bin", "/usr/bin"], "write": ["/srv/shared"]'))
    assert device.spos("apply", manifests.parent, "--root", device.root, "--auto-approve").code == 0

    second, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(second)
    assert "(prepared sandbox)" not in device.log(second)
    assert (device.root / "srv/shared" / second).exists()
    assert daemon.stop() == 0


def test_prepared_sandboxes_of_a_killed_executor_are_removed_by_the_next(device):
    device.apply({"report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    run_and_wait(device)
    left = wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the next run")
    daemon.process.kill()
    daemon.process.wait(5)
    assert all(p.exists() for p in left)  # its processes died with the executor; not its cgroup

    device.once()
    assert not prepared_cgroups(device)


def test_no_sandbox_is_prepared_with_prepared_0(device):
    device.apply({"report": {"command": sh(REPORT), "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon("--prepared", "0")
    device.wait_ready(daemon)
    for _ in range(2):
        run_id, record = run_and_wait(device)
        assert record["state"] == "completed" and "(prepared" not in device.log(run_id)
    assert not prepared_cgroups(device)
    assert daemon.stop() == 0


def test_a_triggered_run_in_a_prepared_sandbox_finds_its_payload(device):
    """A run is handed to its agent's prepared sandbox before its attachments are written
    (the sandbox sets the run up meanwhile); its action still starts with them in place."""
    from test_executor import enqueue_with_payload

    device.apply({"report": {"command": sh('cat "$SPOS_PAYLOAD" > $SPOS_OUTPUT_DIR/$SPOS_RUN_ID'),
                             "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first = enqueue_with_payload(device, "report")["id"]
    assert device.wait_state(first, "completed", "failed")["state"] == "completed", device.log(first)
    wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the agent's next run")
    second = enqueue_with_payload(device, "report")["id"]
    assert device.wait_state(second, "completed", "failed")["state"] == "completed", device.log(second)
    assert "(prepared sandbox)" in device.log(second)
    assert device.output(second).read_bytes() == device.output(first).read_bytes() == b"x"
    assert daemon.stop() == 0


def test_a_run_that_cannot_be_prepared_after_its_hand_over_never_starts(device):
    """When what is written after the hand-over cannot be (here a file stands where the
    agent's logs directory belongs), the run fails "could not start", its action never runs,
    nothing of its sandbox is left, and the agent's next run starts as ever."""
    device.apply({"report": {"command": sh("touch $SPOS_OUTPUT_DIR/$SPOS_RUN_ID"),
                             "timeout": "30s", "concurrency": "Allow"}})
    daemon = device.daemon()
    device.wait_ready(daemon)
    first, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(first)
    waiting = wait_for(lambda: prepared_cgroups(device), "a sandbox prepared for the next run")
    logs = device.agent_dir() / "logs"
    logs.rename(logs.with_name("logs-aside"))
    logs.write_text("not a directory")

    blocked, record = run_and_wait(device)
    assert record["state"] == "failed" and record["reason"].startswith("could not start"), record
    assert not device.output(blocked).exists()  # its action never ran
    assert not run_cgroup_dirs(device.agent, blocked)
    assert not any(p.exists() for p in waiting)  # the sandbox it was handed to is gone

    logs.unlink()
    logs.with_name("logs-aside").rename(logs)
    after, record = run_and_wait(device)
    assert record["state"] == "completed", device.log(after)
    assert device.output(after).exists()
    assert daemon.stop() == 0
