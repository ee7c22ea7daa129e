"""`spos plan` / `spos apply` end to end, through the CLI, on a temporary device root.

Each test states one promise from docs/promises.md (what spos changes, what it leaves alone,
how it fails) and checks it on the files under the root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from reconciler.device import Device
from reconciler.resource import ACTIONS, SYMBOLS
from reconciler.state import ApplyLock

STATE = "var/lib/systemprompt-os"
INVENTORY = f"{STATE}/inventory.json"
MANIFEST_CACHE = f"{STATE}/cache/manifests.marshal"
MANIFEST_DATA = f"{STATE}/cache/manifests.data"
LOCK = f"{STATE}/apply.lock"
HEADER = ("# spos:file entries for agent {}. Lines below a '# spos:managed' marker belong to spos; "
          "all other lines are left as they are.")


def files_under(root: Path) -> dict[str, tuple]:
    """Every file -> (inode, mtime_ns, mode) and directory -> (inode, mode) under `root`. A
    rewrite, even to the same bytes, gives a file a new inode (rename) or mtime."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            st = os.lstat(Path(directory, name))
            found[str(Path(directory, name).relative_to(root))] = (st.st_ino, st.st_mode)
        for name in files:
            st = os.lstat(Path(directory, name))
            found[str(Path(directory, name).relative_to(root))] = (
                st.st_ino, st.st_mtime_ns, st.st_mode)
    return found


def without(found: dict, *paths: str) -> dict:
    return {path: entry for path, entry in found.items() if not path.startswith(paths)}


def inventory(root: Path) -> dict:
    return json.loads((root / INVENTORY).read_text())


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} no longer holds the text this test edits"
    path.write_text(text.replace(old, new))


@pytest.fixture
def applied(spos, manifests, device_root):
    """The examples applied to the device root."""
    result = spos("apply", manifests, "--root", device_root, "--auto-approve")
    assert result.code == 0, result.err
    return device_root


# Converging, and then leaving the device alone

def test_a_second_apply_changes_nothing_and_rewrites_no_file(spos, manifests, device_root):
    assert spos("plan", manifests, "--root", device_root, "--detailed-exitcode").code == 2
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    before = files_under(device_root)

    second = spos("apply", manifests, "--root", device_root, "--auto-approve")
    plan = spos("plan", manifests, "--root", device_root, "--detailed-exitcode")

    assert second.code == 0
    assert "No changes. The device matches the manifests (23 resources)." in second.out
    assert plan.code == 0
    assert "No changes." in plan.out
    # The apply lock records its holder on every apply; it is spos's bookkeeping, not a resource.
    before, after = without(before, LOCK), without(files_under(device_root), LOCK)
    assert {path: after[path] for path in before} == before, "a file or directory was rewritten"
    # The one thing allowed to appear: spos's own manifest cache, once spos has state here.
    assert set(after) - set(before) <= {f"{STATE}/cache", MANIFEST_CACHE, MANIFEST_DATA}


def test_apply_rewrites_only_the_changed_resources(spos, manifests, applied):
    assert spos("plan", manifests, "--root", applied).code == 0  # settles the manifest cache
    before = files_under(applied)
    edit(manifests / "monitor-001.yaml", "priority: 90", "priority: 95")
    edit(manifests / "backup-001.yaml", "cron: \"0 2 * * *\"", "cron: \"0 3 * * *\"")

    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0

    after = files_under(applied)
    assert set(after) == set(before)
    assert sorted(path for path in before if after[path] != before[path]) == sorted([
        "etc/cron.d/spos-backup-001",
        f"{STATE}/agents/monitor-001/agent.json",
        f"{STATE}/cache/manifests.data",
        f"{STATE}/cache/manifests.marshal",
        f"{STATE}/cache/plan.marshal",
        INVENTORY,
        LOCK,
    ])


def test_apply_writes_the_planned_files(applied):
    crontab = (applied / "etc/cron.d/spos-monitor-001").read_text()
    config = json.loads((applied / STATE / "agents/monitor-001/agent.json").read_text())

    assert crontab.splitlines()[1:] == [
        "# spos:managed cron/monitor-001-health",
        f"*/5 * * * * root /usr/local/bin/spos --root {applied} action run --quiet --agent monitor-001 "
        "--task health_check --schedule monitor-001-health --deadline 4m",
    ]
    assert oct((applied / "etc/cron.d/spos-monitor-001").stat().st_mode & 0o777) == "0o644"
    assert config["tasks"]["health_check"]["priority"] == 90
    assert sorted(inventory(applied)["resources"]) == sorted(
        [f"agent/{a}" for a in ("backup-001", "file-drop-001", "iot-sensor-001", "maintenance-001",
                                "monitor-001", "ops-001", "research-001", "webhook-001")]
        + [f"cron/{s}" for s in ("backup-001-nightly", "file-drop-001-sweep",
                                 "maintenance-001-weekly", "monitor-001-health",
                                 "research-001-daily", "research-001-hourly")]
        + [f"timer/{s}" for s in ("iot-sensor-001-upload", "maintenance-001-logrotate",
                                  "monitor-001-boot")]
        + [f"trigger/{t}" for t in ("disk_space_low", "file-drop-001-incoming", "high_cpu_temp",
                                    "iot-sensor-001-serial", "network_available",
                                    "webhook-001-github")]
    )


def test_apply_creates_a_missing_root(spos, manifests, tmp_path):
    root = tmp_path / "not-yet"

    result = spos("apply", manifests, "--root", root, "--auto-approve")

    assert result.code == 0, result.err
    assert (root / "etc/cron.d/spos-research-001").is_file()


# Owning only what it owns

OPERATOR_CRONTAB = """\
MAILTO=research@example.org
# research team: refresh the mirror before the hourly check
55 * * * * root /usr/local/bin/refresh-mirror
"""
OTHER_PACKAGE_CRONTAB = "30 3 * * 0 root test -e /run/systemd/system || /usr/sbin/e2scrub_all\n"


def test_unmanaged_cron_lines_and_files_survive_apply_and_prune(spos, manifests, device_root):
    cron_dir = device_root / "etc/cron.d"
    cron_dir.mkdir(parents=True)
    (cron_dir / "spos-research-001").write_text(OPERATOR_CRONTAB)
    (cron_dir / "e2scrub_all").write_text(OTHER_PACKAGE_CRONTAB)
    other = files_under(device_root)["etc/cron.d/e2scrub_all"]

    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    applied = (cron_dir / "spos-research-001").read_text()
    assert applied.startswith(OPERATOR_CRONTAB), "operator lines must stay first, unchanged"
    assert "# spos:managed cron/research-001-hourly" in applied

    (manifests / "research-001.yaml").unlink()
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0

    assert (cron_dir / "spos-research-001").read_bytes() == OPERATOR_CRONTAB.encode()
    assert (cron_dir / "e2scrub_all").read_bytes() == OTHER_PACKAGE_CRONTAB.encode()
    assert files_under(device_root)["etc/cron.d/e2scrub_all"] == other


def test_hand_edited_cron_line_is_drift_and_apply_repairs_it(spos, manifests, applied):
    crontab = applied / "etc/cron.d/spos-monitor-001"
    original = crontab.read_text()
    crontab.write_text(original.replace("*/5 * * * *", "*/30 * * * *"))

    plan = spos("plan", manifests, "--root", applied, "--detailed-exitcode")

    assert plan.code == 2
    assert "  ~   cron/monitor-001-health  (changed on the device (drift))" in plan.out
    assert "Plan: 0 to create, 1 to update, 0 to replace, 0 to delete, 22 unchanged." in plan.out
    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0
    assert crontab.read_text() == original


def test_deleted_agent_config_is_created_again(spos, manifests, applied):
    config = applied / STATE / "agents/backup-001/agent.json"
    original = config.read_text()
    config.unlink()

    plan = spos("plan", manifests, "--root", applied)

    assert "  +   agent/backup-001  (deleted on the device (drift))" in plan.out
    assert "Plan: 1 to create, 0 to update" in plan.out
    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0
    assert config.read_text() == original


@pytest.mark.parametrize("damage", ["{not json", "[" * 100_000 + "]" * 100_000],
                         ids=["not-json", "nested-too-deeply"])
def test_a_damaged_agent_config_is_planned_to_be_rewritten(spos, manifests, applied, damage):
    config = applied / STATE / "agents/backup-001/agent.json"
    original = config.read_text()
    config.write_text(damage)

    plan = spos("plan", manifests, "--root", applied)

    assert plan.code == 0 and "Traceback" not in plan.err, plan.err
    assert "agent/backup-001" in plan.out and "Plan: 0 to create, 1 to update" in plan.out, plan.out
    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0
    assert config.read_text() == original


HEALTH_SCHEDULE = """apiVersion: spos/v1
kind: Schedule
metadata:
  name: monitor-001-health
  labels:
    team: ops
spec:
  agent: monitor-001
  task: health_check
  cron: "*/5 * * * *"
  # Five minutes late is the next run's job.
  startingDeadline: 4m
---
"""


def test_removed_schedule_and_agent_are_pruned_keeping_run_history(spos, manifests, applied):
    agent_dir = applied / STATE / "agents/backup-001"
    (agent_dir / "completed/20261126T020000-5e6f7a8b.json").write_text('{"exit": 0}\n')
    (agent_dir / "logs/20261126T020000-5e6f7a8b.log").write_text("backup done\n")
    (manifests / "backup-001.yaml").unlink()
    edit(manifests / "monitor-001.yaml", HEALTH_SCHEDULE, "")

    plan = spos("plan", manifests, "--root", applied)
    result = spos("apply", manifests, "--root", applied, "--auto-approve")

    assert "  -   agent/backup-001  (no longer in the manifests)" in plan.out
    assert "  -   cron/backup-001-nightly  (no longer in the manifests)" in plan.out
    assert "  -   cron/monitor-001-health  (no longer in the manifests)" in plan.out
    assert result.code == 0
    assert not (applied / "etc/cron.d/spos-backup-001").exists()
    assert not (applied / "etc/cron.d/spos-monitor-001").exists()
    assert not (agent_dir / "agent.json").exists()
    assert sorted(p.name for p in agent_dir.iterdir()) == ["completed", "logs"]
    assert (agent_dir / "completed/20261126T020000-5e6f7a8b.json").read_text() == '{"exit": 0}\n'
    resources = inventory(applied)["resources"]
    pruned = {"agent/backup-001", "cron/backup-001-nightly", "cron/monitor-001-health"}
    assert not pruned & set(resources)
    assert "agent/monitor-001" in resources


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: "[]",
    lambda text: '{"format": 1, "resources": []}',
    lambda text: text.replace('"format": 1', '"format": 99'),
    lambda text: "[" * 100_000 + "]" * 100_000,
], ids=["truncated", "a-list", "resources-a-list", "another-format", "nested-too-deeply"])
def test_a_damaged_inventory_is_said_and_repaired_and_pruning_still_works(
        spos, manifests, applied, damage):
    """An inventory edited by hand (or by a spos of another format) is read as empty, said
    in the plan naming the file, and written afresh by the next apply; spos still knows its
    resources by where and how it writes them, so what left the manifests is still pruned."""
    path = applied / INVENTORY
    path.write_text(damage(path.read_text()))
    (manifests / "backup-001.yaml").unlink()

    plan = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert plan.code == 2, plan.err
    assert f"/{INVENTORY} cannot be read (" in plan.out + plan.err
    assert "  -   agent/backup-001  (no longer in the manifests)" in plan.out
    assert "  -   cron/backup-001-nightly  (no longer in the manifests)" in plan.out

    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0
    assert "agent/monitor-001" in inventory(applied)["resources"]
    again = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert again.code == 0 and "cannot be read" not in again.out + again.err


@pytest.mark.parametrize("policies_beside", [
    True,
    False,
], ids=["with-policies", "without-policies"])
def test_empty_manifests_are_refused_unless_allow_empty(
        spos, manifests, applied, policies_beside):
    for path in manifests.iterdir():
        path.unlink()
    if not policies_beside:
        shutil.rmtree(manifests.parent / "policies")
    before = files_under(applied)

    refused = spos("apply", manifests, "--root", applied, "--auto-approve")

    assert refused.code == 1
    assert "holds no manifests" in refused.err
    assert "would delete all 23 resources" in refused.err
    assert "--allow-empty" in refused.err
    cache = "var/lib/systemprompt-os/cache"  # spos's own parse cache, not the device's state
    assert without(files_under(applied), cache, LOCK) == without(before, cache, LOCK)

    allowed = spos("apply", manifests, "--root", applied, "--auto-approve", "--allow-empty")

    assert allowed.code == 0, allowed.err
    assert "23 to delete" in allowed.out
    assert os.listdir(applied / "etc/cron.d") == []
    assert inventory(applied)["resources"] == {}


# Saved plans

def test_saved_plan_applies_exactly_what_it_shows(spos, manifests, device_root, tmp_path):
    saved = tmp_path / "plan.json"
    plan = spos("plan", manifests, "--root", device_root, "-out", saved)
    assert plan.code == 0
    assert f"spos apply {saved}" in plan.out
    # The manifests move on after planning; the saved plan still applies what was planned.
    edit(manifests / "monitor-001.yaml", "cron: \"*/5 * * * *\"", "cron: \"*/10 * * * *\"")

    result = spos("apply", saved, "--root", device_root)

    assert result.code == 0, result.err
    assert "Apply complete: 23 changed, 0 failed." in result.out
    assert "*/5 * * * * root" in (device_root / "etc/cron.d/spos-monitor-001").read_text()
    after = spos("plan", manifests, "--root", device_root, "--json")
    assert [(c["id"], c["action"]) for c in json.loads(after.out)["changes"]] == [
        ("cron/monitor-001-health", "update")
    ]


def test_saved_plan_is_refused_when_the_device_changed(spos, manifests, applied, tmp_path):
    saved = tmp_path / "plan.json"
    edit(manifests / "backup-001.yaml", "cron: \"0 2 * * *\"", "cron: \"0 3 * * *\"")
    assert spos("plan", manifests, "--root", applied, "-out", saved).code == 0
    crontab = applied / "etc/cron.d/spos-monitor-001"
    crontab.write_text(crontab.read_text().replace("*/5 * * * *", "*/30 * * * *"))
    before = files_under(applied)

    result = spos("apply", saved, "--root", applied)

    assert result.code == 1
    assert "stale plan" in result.err
    assert "cron/monitor-001-health changed on the device" in result.err
    # The refusal happens under the apply lock, whose file names the holder while it is held.
    assert without(files_under(applied), LOCK) == without(before, LOCK)


def test_saved_plan_is_refused_after_another_apply(spos, manifests, applied, tmp_path):
    saved = tmp_path / "plan.json"
    edit(manifests / "backup-001.yaml", "cron: \"0 2 * * *\"", "cron: \"0 3 * * *\"")
    assert spos("plan", manifests, "--root", applied, "-out", saved).code == 0
    assert spos("apply", manifests, "--root", applied, "--auto-approve").code == 0

    result = spos("apply", saved, "--root", applied)

    assert result.code == 1
    assert "stale plan" in result.err
    assert "the inventory changed" in result.err


def test_saved_plan_for_another_root_is_refused(spos, manifests, device_root, tmp_path):
    saved = tmp_path / "plan.json"
    other = tmp_path / "other-device"
    other.mkdir()
    assert spos("plan", manifests, "--root", device_root, "-out", saved).code == 0

    result = spos("apply", saved, "--root", other)

    assert result.code == 1
    assert f"planned for root {device_root}, not {other}" in result.err
    assert os.listdir(other) == []


# One apply at a time

def test_a_second_apply_fails_naming_the_lock_holder(spos, manifests, device_root):
    with ApplyLock(Device(device_root)):
        result = spos("apply", manifests, "--root", device_root, "--auto-approve")

    assert result.code == 1
    assert "another spos apply holds" in result.err
    assert f"pid {os.getpid()} (" in result.err
    assert "--lock-timeout" in result.err
    assert not (device_root / "etc").exists()


def test_lock_timeout_waits_for_the_holder(spos, manifests, device_root):
    lock = ApplyLock(Device(device_root)).__enter__()
    release = threading.Timer(0.2, lock.__exit__, args=(None, None, None))
    release.start()
    try:
        result = spos("apply", manifests, "--root", device_root, "--auto-approve",
                      "--lock-timeout", "5s")
    finally:
        release.join()

    assert result.code == 0, result.err
    assert (device_root / "etc/cron.d/spos-monitor-001").is_file()


# Confinement to the root

def test_a_directory_replaced_by_a_link_after_spos_removed_it_is_refused(tmp_path):
    """Device remembers directories it found real; one it removes is forgotten, so a link
    planted in its place is refused like any other."""
    from reconciler.errors import UnsafePathError

    root, outside = tmp_path / "device", tmp_path / "outside"
    (root / "srv/agent").mkdir(parents=True)
    outside.mkdir()
    device = Device(root)
    assert device.stat("/srv/agent/config") is None  # /srv/agent is now known to be real
    assert device.rmdir_if_empty("/srv/agent")
    os.symlink(outside, root / "srv/agent")

    with pytest.raises(UnsafePathError, match="symlink"):
        device.write_atomic("/srv/agent/config", b"x")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("link", [
    "etc/cron.d",
    "etc/cron.d/spos-monitor-001",
    f"{STATE}/agents/monitor-001",
])
def test_symlinks_under_the_root_are_refused(spos, manifests, applied, tmp_path, link):
    outside = tmp_path / "outside"
    planted = applied / link
    if planted.is_dir():
        os.rename(planted, outside)
    else:
        outside.mkdir()
        os.rename(planted, outside / planted.name)
        outside = outside / planted.name
    os.symlink(outside, planted)
    edit(manifests / "monitor-001.yaml", "priority: 90", "priority: 95")
    edit(manifests / "monitor-001.yaml", "cron: \"*/5 * * * *\"", "cron: \"*/10 * * * *\"")
    before = files_under(tmp_path)

    result = spos("apply", manifests, "--root", applied, "--auto-approve")

    assert result.code == 1
    assert "symlink" in result.err
    # Loading the manifests may refresh spos's own cache (docs/promises.md); nothing else.
    cache, lock = f"device/{STATE}/cache", f"device/{LOCK}"
    assert without(files_under(tmp_path), cache, lock) == without(before, cache, lock), \
        "nothing may be written, inside the root or out"


# Failures

def test_one_failed_resource_leaves_the_others_applied_and_a_rerun_converges(
        spos, manifests, device_root):
    blocker = device_root / STATE / "agents/backup-001"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory\n")

    result = spos("apply", manifests, "--root", device_root, "--auto-approve")

    assert result.code == 1
    assert "  +   agent/backup-001: FAILED:" in result.out
    assert "  +   agent/research-001: done" in result.out
    assert "Apply complete: 22 changed, 1 failed." in result.out
    resources = inventory(device_root)["resources"]
    assert "agent/backup-001" not in resources
    assert len(resources) == 22

    blocker.unlink()
    rerun = spos("apply", manifests, "--root", device_root, "--auto-approve")

    assert rerun.code == 0, rerun.out + rerun.err
    assert "Plan: 1 to create, 0 to update, 0 to replace, 0 to delete, 22 unchanged." in rerun.out
    assert spos("plan", manifests, "--root", device_root, "--detailed-exitcode").code == 0


def test_an_unwritable_cron_dir_fails_only_the_cron_entries(spos, manifests, device_root):
    (device_root / "etc").mkdir()
    (device_root / "etc/cron.d").write_text("a file where the directory should be\n")

    result = spos("apply", manifests, "--root", device_root, "--auto-approve")

    assert result.code == 1
    assert ("  +   cron/monitor-001-health: FAILED: /etc/cron.d/spos-monitor-001: "
            "/etc/cron.d exists and is not a directory") in result.out
    assert "Apply complete: 17 changed, 6 failed." in result.out
    resources = inventory(device_root)["resources"]
    assert len(resources) == 17
    assert all(rid.startswith(("agent/", "timer/", "trigger/")) for rid in resources)
    (device_root / "etc/cron.d").unlink()
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    assert spos("plan", manifests, "--root", device_root, "--detailed-exitcode").code == 0


@pytest.fixture
def immutable():
    """chattr +i on a path (unlink fails even for root); cleared again after the test."""
    marked = []

    def mark(path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")
        marked.append(path)

    yield mark
    for path in marked:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_a_failed_delete_stays_in_the_inventory_for_the_next_run(
        spos, manifests, applied, immutable):
    config = applied / STATE / "agents/backup-001/agent.json"
    (manifests / "backup-001.yaml").unlink()
    immutable(config)

    result = spos("apply", manifests, "--root", applied, "--auto-approve")

    assert result.code == 1
    assert "  -   agent/backup-001: FAILED:" in result.out
    assert "  -   cron/backup-001-nightly: done" in result.out
    resources = inventory(applied)["resources"]
    assert "agent/backup-001" in resources
    assert "cron/backup-001-nightly" not in resources

    subprocess.run(["chattr", "-i", str(config)], check=True)
    rerun = spos("apply", manifests, "--root", applied, "--auto-approve")

    assert rerun.code == 0
    assert "  -   agent/backup-001: done" in rerun.out
    assert not config.exists()
    assert "agent/backup-001" not in inventory(applied)["resources"]


# What the inventory and the JSON plan record

def test_inventory_records_the_git_revision_of_the_manifests(spos, manifests, device_root):
    project = manifests.parent
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "manifests"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()

    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    assert inventory(device_root)["revision"] == head

    edit(manifests / "monitor-001.yaml", "priority: 90", "priority: 95")
    plan = json.loads(spos("plan", manifests, "--root", device_root, "--json").out)
    assert plan["manifests"]["revision"] == f"{head}-dirty"
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    assert inventory(device_root)["revision"] == f"{head}-dirty"


def test_inventory_revision_is_null_outside_git(applied):
    assert inventory(applied)["revision"] is None


def test_json_plan_has_the_documented_fields(spos, manifests, applied):
    edit(manifests / "monitor-001.yaml", "priority: 90", "priority: 95")
    (manifests / "backup-001.yaml").unlink()

    plan = json.loads(spos("plan", manifests, "--root", applied, "--json").out)

    documented = _documented_plan_example()
    assert list(plan) == list(documented)
    assert plan["formatVersion"] == 1
    assert plan["root"] == str(applied)
    assert set(plan["summary"]) == {*ACTIONS, "unchanged"}
    assert plan["summary"] == {"create": 0, "update": 1, "replace": 0, "delete": 2, "unchanged": 20}
    for change in plan["changes"]:
        assert list(change) == list(documented["changes"][0])
        assert change["symbol"] == SYMBOLS[change["action"]]
        assert isinstance(change["reason"], str) and change["reason"]
        assert all(set(f) == {"path", "before", "after"} for f in change["fields"])
    update = next(c for c in plan["changes"] if c["action"] == "update")
    assert update["fields"] == [
        {"path": "config.tasks.health_check.priority", "before": 90, "after": 95}]
    deleted = {"agent/backup-001", "cron/backup-001-nightly"}
    assert set(plan["desired"]) == set(plan["observed"]) - deleted


def _documented_plan_example() -> dict:
    text = (Path(__file__).resolve().parent.parent / "docs/plan-format.md").read_text()
    return json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])


# The queue that crontab lines feed

def queued(root: Path, agent: str) -> list[str]:
    return sorted(os.listdir(root / STATE / "agents" / agent / "queue"))


def test_action_run_enqueues_one_json_file(spos, applied):
    result = spos("action", "run", "--agent", "monitor-001", "--task", "health_check",
                  "--root", applied)

    assert result.code == 0, result.err
    run_id = result.out.strip()
    [name] = queued(applied, "monitor-001")
    assert name.startswith("010-") and name.endswith(f"-{run_id}.json")
    record = json.loads((applied / STATE / "agents/monitor-001/queue" / name).read_text())
    assert record | {"enqueuedAt": None} == {
        "format": 1, "id": run_id, "agent": "monitor-001", "task": "health_check",
        "priority": 90, "enqueuedAt": None, "notAfter": None,
        "source": {"kind": "manual"}, "attempt": 1,
    }


def test_queue_names_sort_by_priority_then_time(spos, applied):
    ids = []
    for priority in ("20", "80", "20", "80"):
        result = spos("action", "run", "--agent", "research-001", "--task", "check_arxiv_papers",
                      "--priority", priority, "--root", applied)
        ids.append(result.out.strip())

    names = queued(applied, "research-001")

    assert [name.split("-", 2)[2].removesuffix(".json") for name in names] == [
        ids[1], ids[3], ids[0], ids[2]]
    assert not [n for n in names if n.startswith(".")], "no temporary file is left behind"


def test_the_rendered_crontab_line_enqueues_into_its_root(applied):
    """Run the command of an applied crontab line (as cron would, minus the shell) in-process."""
    from reconciler.cli import main

    line = (applied / "etc/cron.d/spos-monitor-001").read_text().splitlines()[2]
    argv = shlex.split(line.replace("\\%", "%"))[7:]
    assert argv[:3] == ["--root", str(applied), "action"]

    assert main(argv) == 0

    [name] = queued(applied, "monitor-001")
    record = json.loads((applied / STATE / "agents/monitor-001/queue" / name).read_text())
    assert record["source"] == {"kind": "schedule", "name": "monitor-001-health"}
    assert record["notAfter"] is not None


@pytest.mark.parametrize("agent, task, message", [
    ("nobody-001", "health_check", "agent 'nobody-001' is not applied on this device"),
    ("monitor-001", "no_such_task", "agent 'monitor-001' has no task 'no_such_task' "
                                    "(its tasks: boot_report, health_check)"),
])
def test_action_run_refuses_unknown_agent_or_task(spos, applied, agent, task, message):
    result = spos("action", "run", "--agent", agent, "--task", task, "--root", applied)

    assert result.code == 1
    assert message in result.err
    assert queued(applied, "monitor-001") == []


def test_the_inventory_is_one_resource_per_line_as_the_json_encoder_writes_it(device_root):
    """Usual entries are put together by hand; they read back, and look, exactly as the
    encoder would write them (sorted keys, ASCII), whatever the strings hold."""
    from reconciler.state import read_inventory, write_inventory

    resources = {
        "agent/a": {"kind": "agent", "digest": "sha256:00"},
        'cron/quo"te\\': {"digest": "sha256:é\u2028\n", "kind": "cron"},
        "agent/other": {"kind": "agent", "digest": "sha256:01", "extra": [1, None]},
        "agent/odd": {"kind": "agent", "digest": 5},
    }
    device = Device(str(device_root))
    write_inventory(device, resources, None, "sha256:ab")

    text = (device_root / "var/lib/systemprompt-os/inventory.json").read_text()
    lines = {line.split(": ", 1)[0].strip(): line for line in text.splitlines()}
    for rid, entry in resources.items():
        key = json.dumps(rid)
        assert lines[key].rstrip(",") == f"    {key}: {json.dumps(entry, sort_keys=True)}"
    assert read_inventory(device)["resources"] == resources
