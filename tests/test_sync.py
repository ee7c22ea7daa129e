"""`spos sync`, `spos daemon` and `spos status` against a real bare repository as the remote.

A device root under tmp_path follows the `main` branch of a bare repository that a working
repository pushes to (tests/test_gitsync.py's Upstream). `spos sync` and `spos status` run
in-process through the `spos` fixture, `spos daemon` as a real subprocess; signatures are made
and checked with real gpg keys. The manifests are small: one Agent with a task, a cron Schedule
for it, and a Policy in `policies/` that bounds both. What is asserted is what a device owner
relies on: the files spos manages, `sync/state.json`, `daemon.json` and what `spos status`
says. Every wait is bounded.
"""

from __future__ import annotations

import json
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sandboxes import sandbox_missing
from test_gitsync import Keys, Upstream, every_path, needs_gpg, run_raw
from waiting import wait_for

from reconciler.agentd import BACKOFF_FIRST, Child, Daemon, DaemonSettings
from reconciler.sync import SyncOptions

REPO = Path(__file__).resolve().parent.parent
STATE = "var/lib/systemprompt-os"
SYNC = f"{STATE}/sync"
WAIT = 10

SENSOR = """\
apiVersion: spos/v1
kind: Agent
metadata:
  name: {name}
spec:
{selector}  tasks:
    sample:
      command: ["/bin/true"]
      timeout: {timeout}
---
apiVersion: spos/v1
kind: Schedule
metadata:
  name: {name}-sample
spec:
  agent: {name}
  task: sample
  cron: "{cron}"
"""

POLICY = """\
apiVersion: spos/v1
kind: Policy
metadata:
  name: site
spec:
  description: Sensors sample at most every ten minutes and never run for more than an hour.
  ceilings:
    timeout: 1h
  schedules:
    minInterval: 10m
"""


def agent(name: str = "sensor", *, cron: str = "*/15 * * * *", timeout: str = "5m",
          role: str | None = None) -> dict[str, str]:
    """The file of one Agent and its cron Schedule, for Upstream.commit."""
    selector = f"  selector:\n    matchLabels:\n      role: {role}\n" if role else ""
    text = SENSOR.format(name=name, cron=cron, timeout=timeout, selector=selector)
    return {f"agents.d/{name}.yaml": text}


def site(**sensor) -> dict[str, str]:
    """The whole repository: the sensor agent and the site policy."""
    return {**agent(**sensor), "policies/site.yaml": POLICY}


class Device:
    """A device root that syncs from `upstream`, and what spos left on it."""

    def __init__(self, root: Path, upstream: Upstream, spos):
        self.root, self.upstream, self.spos = root, upstream, spos

    def sync(self, *flags: str) -> dict:
        """`spos sync --json`; the result, with the exit code as "code"."""
        done = self.spos("sync", "--root", self.root, "--repo", self.upstream.bare, "--json", *flags)
        assert done.out, done.err
        return {**json.loads(done.out), "code": done.code}

    def path(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    def state(self) -> dict:
        return json.loads(self.path(f"{SYNC}/state.json").read_text())

    def applied(self) -> str | None:
        """The applied revision per state.json (None before the first sync)."""
        if not self.path(f"{SYNC}/state.json").exists():
            return None
        return (self.state()["applied"] or {}).get("revision")

    def cron(self, name: str = "sensor") -> str:
        """The spos-managed line of the agent's cron.d file."""
        lines = self.path(f"/etc/cron.d/spos-{name}").read_text().splitlines()
        return lines[lines.index(f"# spos:managed cron/{name}-sample") + 1]

    def agent_config(self, name: str = "sensor") -> dict:
        return json.loads(self.path(f"{STATE}/agents/{name}/agent.json").read_text())

    def managed(self) -> dict[str, bytes]:
        """Every file on the device but spos's sync state, caches and lock, with its content;
        of the inventory, what it records (not when)."""
        skip = tuple(str(self.path(p)) for p in (SYNC, f"{STATE}/cache", f"{STATE}/apply.lock",
                                                 f"{STATE}/inventory.json"))
        files = {str(Path(d, n).relative_to(self.root)): Path(d, n).read_bytes()
                 for d, _, names in os.walk(self.root) for n in names
                 if not str(Path(d, n)).startswith(skip)}
        inventory = self.path(f"{STATE}/inventory.json")
        if inventory.exists():
            recorded = json.loads(inventory.read_text())
            files["inventory"] = json.dumps([recorded["revision"], recorded["resources"]]).encode()
        return files

    def checkout_revision(self) -> str:
        """The revision the checkout holds (the marker also names the boot that wrote it)."""
        return self.path(f"{SYNC}/checkout.revision").read_text().split()[0]


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path)


@pytest.fixture
def device(device_root, upstream, spos) -> Device:
    return Device(device_root, upstream, spos)


def cron_line(cron: str, root: Path, name: str = "sensor") -> str:
    """The crontab line spos writes for the agent's Schedule (SPOS_COMMAND is pinned)."""
    return (f"{cron} root /usr/local/bin/spos --root {root} action run --quiet --agent {name} "
            f"--task sample --schedule {name}-sample")


# -- spos sync -------------------------------------------------------------------------------------

def test_a_new_commit_is_fetched_and_applied(device, upstream):
    first = upstream.commit(site())

    applied = device.sync()

    assert (applied["code"], applied["outcome"], applied["revision"]) == (0, "applied", first)
    assert sorted(applied["changed"]) == ["agent/sensor", "cron/sensor-sample"]
    assert device.cron() == cron_line("*/15 * * * *", device.root)
    assert device.agent_config()["tasks"]["sample"]["timeoutSeconds"] == 300
    second = upstream.commit(site(cron="*/30 * * * *", timeout="10m"))

    updated = device.sync()
    again = device.sync()

    assert (updated["code"], updated["outcome"], updated["revision"]) == (0, "applied", second)
    assert sorted(updated["changed"]) == ["agent/sensor", "cron/sensor-sample"]
    assert device.cron() == cron_line("*/30 * * * *", device.root)
    assert device.agent_config()["tasks"]["sample"]["timeoutSeconds"] == 600
    assert (again["code"], again["outcome"], again["changed"]) == (0, "unchanged", [])
    state = device.state()
    assert state["applied"]["revision"] == second and state["quarantined"] == {}
    assert state["repo"] == {"url": str(upstream.bare), "branch": "main", "path": "agents.d"}
    assert device.checkout_revision() == second


def test_a_force_push_is_refused_and_the_applied_revision_stays(device, upstream):
    first = upstream.commit(site())
    second = upstream.commit(site(cron="*/30 * * * *"))
    assert device.sync()["revision"] == second
    before = device.managed()
    upstream.push(first)  # history rewritten: main goes back to the first commit

    refused = device.sync()
    again = device.sync()

    assert (refused["code"], refused["outcome"], refused["revision"]) == (1, "refused", first)
    assert "force-pushed" in refused["message"] and "rewritten" in refused["reasons"][0]
    assert (again["code"], again["outcome"], again["revision"]) == (1, "refused", first)
    assert device.managed() == before
    assert device.applied() == second and device.checkout_revision() == second
    # refused before any work, so not quarantined: allowing force-pushes takes it (below)
    assert first not in device.state()["quarantined"]


def test_a_force_push_is_taken_when_allowed_as_the_refusal_advises(device, upstream):
    """The refusal says: "If the new history is intended, sync once with force-pushes allowed".
    Doing just that must take the rewritten branch, even though the plain sync before it
    refused the commit."""
    first = upstream.commit(site())
    second = upstream.commit(site(cron="*/30 * * * *"))
    assert device.sync()["revision"] == second
    upstream.push(first)
    refused = device.sync()
    assert refused["outcome"] == "refused"
    assert "sync once with force-pushes allowed" in refused["reasons"][0]

    allowed = device.sync("--allow-force-push")

    assert (allowed["code"], allowed["outcome"], allowed["revision"]) == (0, "applied", first), allowed
    assert device.applied() == first
    assert device.cron() == cron_line("*/15 * * * *", device.root)


def test_a_force_push_allowed_from_the_start_is_applied(device, upstream):
    first = upstream.commit(site())
    second = upstream.commit(site(cron="*/30 * * * *"))
    assert device.sync()["revision"] == second
    upstream.push(first)

    allowed = device.sync("--allow-force-push")

    assert (allowed["code"], allowed["outcome"], allowed["revision"]) == (0, "applied", first)
    assert device.cron() == cron_line("*/15 * * * *", device.root)


# -- signatures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    made = Keys(tmp_path_factory.mktemp("keys"))
    yield made
    made.stop()


@needs_gpg
def test_with_verification_only_commits_signed_by_a_trusted_key_are_applied(device, upstream, keys):
    def signed(who: str | None, **sensor) -> str:
        key = getattr(keys, who) if who else None
        return upstream.commit(site(**sensor), sign=key, gnupghome=keys.home if key else None)

    verify = ("--verify-signatures", str(keys.keyring))
    trusted = signed("trusted")
    assert device.sync(*verify)["outcome"] == "applied"
    before = device.managed()

    unsigned = signed(None, cron="*/20 * * * *")
    refused_unsigned = device.sync(*verify)
    stranger = signed("stranger", cron="*/30 * * * *")
    refused_stranger = device.sync(*verify)

    for refused, sha, words in ((refused_unsigned, unsigned, "is not signed"),
                                (refused_stranger, stranger, "not in the keyring")):
        assert (refused["code"], refused["outcome"], refused["revision"]) == (1, "quarantined", sha)
        assert words in refused["reasons"][0] and "not applied" in refused["reasons"][0]
        assert device.state()["quarantined"][sha]["stage"] == "verify"
    assert device.managed() == before
    assert device.applied() == trusted and device.checkout_revision() == trusted

    fixed = signed("trusted", cron="*/45 * * * *")
    accepted = device.sync(*verify)

    assert (accepted["code"], accepted["outcome"], accepted["revision"]) == (0, "applied", fixed)
    assert device.cron() == cron_line("*/45 * * * *", device.root)
    # Without verification the same device takes what the branch holds, signed or not.
    unsigned_again = signed(None, cron="0 * * * *")
    assert device.sync()["revision"] == unsigned_again


@needs_gpg
def test_a_commit_refused_for_an_unknown_key_is_taken_once_the_key_is_trusted(tmp_path, device, upstream, keys):
    """The refusal says "the key is not in the keyring. Add it if you trust it": doing so must
    let the same commit through, without waiting for another one."""
    upstream.commit(site(), sign=keys.trusted, gnupghome=keys.home)
    assert device.sync("--verify-signatures", str(keys.keyring))["outcome"] == "applied"
    by_stranger = upstream.commit(site(cron="*/30 * * * *"), sign=keys.stranger, gnupghome=keys.home)
    refused = device.sync("--verify-signatures", str(keys.keyring))
    assert refused["outcome"] == "quarantined" and "Add it if you trust it" in refused["reasons"][0]
    widened = tmp_path / "keyring-with-stranger.gpg"
    widened.write_bytes(run_raw("gpg", "--batch", "--export", keys.trusted, keys.stranger,
                                env=keys.env, cwd=keys.top))

    accepted = device.sync("--verify-signatures", str(widened))

    assert (accepted["code"], accepted["outcome"], accepted["revision"]) == (0, "applied", by_stranger), accepted
    assert device.cron() == cron_line("*/30 * * * *", device.root)


# -- quarantine --------------------------------------------------------------------------------------

def test_an_invalid_revision_is_quarantined_and_the_previous_one_stays_in_force(device, upstream, spos):
    good = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    before = device.managed()
    good_files = device.path(f"{SYNC}/checkout/agents.d/sensor.yaml").read_text()
    invalid = upstream.commit({"agents.d/sensor.yaml": good_files.replace("timeout:", "timout:")})

    refused = device.sync()

    assert (refused["code"], refused["outcome"], refused["revision"]) == (1, "quarantined", invalid)
    assert f"revision {good[:12]} stays in force" in refused["message"]
    assert any(reason.startswith("agents.d/sensor.yaml:") and "timout" in reason
               for reason in refused["reasons"]), refused["reasons"]
    assert device.managed() == before
    assert device.applied() == good and device.checkout_revision() == good
    assert device.path(f"{SYNC}/checkout/agents.d/sensor.yaml").read_text() == good_files
    held = device.state()["quarantined"][invalid]
    assert held["stage"] == "validate" and held["reasons"] == refused["reasons"]

    # Not tried again: each later sync skips it without exporting or planning, and the
    # quarantine is read back from state.json by every new process.
    for _ in range(2):
        skipped = spos("sync", "--root", device.root, "--repo", upstream.bare)
        assert skipped.code == 1
        assert skipped.out.startswith(f"skipped: revision {invalid[:12]} was quarantined at {held['at']}")
        assert "waiting for a new commit" in skipped.out
        assert "Exporting" not in skipped.err and "Planning" not in skipped.err
    assert device.state()["quarantined"][invalid] == held
    assert device.managed() == before

    status = spos("status", "--root", device.root)
    assert f"Applied:    {good[:12]}" in status.out
    assert f"Pending:    {invalid[:12]} skipped:" in status.out
    assert f"Quarantined: {invalid[:12]} (validate)" in status.out

    fixed = upstream.commit(site(cron="*/30 * * * *"))
    lifted = device.sync()

    assert (lifted["code"], lifted["outcome"], lifted["revision"]) == (0, "applied", fixed)
    assert device.applied() == fixed
    assert device.cron() == cron_line("*/30 * * * *", device.root)
    assert "Pending" not in spos("status", "--root", device.root).out


def test_a_revision_violating_the_repositorys_policies_is_quarantined(device, upstream):
    good = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    before = device.managed()
    too_often = upstream.commit(site(cron="*/5 * * * *"))

    refused = device.sync()

    assert (refused["code"], refused["outcome"], refused["revision"]) == (1, "quarantined", too_often)
    assert device.state()["quarantined"][too_often]["stage"] == "validate"
    [reason] = refused["reasons"]
    assert reason.startswith("agents.d/sensor.yaml:18:3: fires every 5m, more often than the minimum "
                             "interval 10m of policy 'site'"), reason
    assert device.managed() == before and device.applied() == good
    too_long = upstream.commit(site(timeout="2h"))

    refused = device.sync()

    assert (refused["outcome"], refused["revision"]) == ("quarantined", too_long)
    [reason] = refused["reasons"]
    assert reason.startswith("agents.d/sensor.yaml:9:7: timeout 2h is above the ceiling 1h of policy 'site'"), reason
    assert device.managed() == before and device.applied() == good


def test_an_apply_that_fails_part_way_puts_the_previous_revision_back(device, upstream):
    good = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    before = device.managed()
    blocker = device.path(f"{STATE}/agents/beta")
    blocker.write_text("not a directory\n")  # agent/beta cannot be created
    before[str(blocker.relative_to(device.root))] = blocker.read_bytes()
    broken = upstream.commit({**site(cron="*/30 * * * *"), **agent("beta", cron="0 * * * *")})

    refused = device.sync()

    assert (refused["code"], refused["outcome"], refused["revision"]) == (1, "quarantined", broken)
    assert [failure["id"] for failure in refused["failed"]] == ["agent/beta"]
    assert "cron/sensor-sample" in refused["changed"]  # it had been applied before the failure
    assert f"re-applied {good[:12]}" in refused["message"]
    assert device.state()["quarantined"][broken]["stage"] == "apply"
    assert device.managed() == before
    assert device.cron() == cron_line("*/15 * * * *", device.root)
    assert not device.path("/etc/cron.d/spos-beta").exists()
    assert device.applied() == good and device.checkout_revision() == good

    blocker.unlink()
    fixed = upstream.commit({"README": "beta can be created now\n"})
    applied = device.sync()

    assert (applied["code"], applied["outcome"], applied["revision"]) == (0, "applied", fixed)
    assert device.agent_config("beta")["agent"] == "beta"
    assert device.cron() == cron_line("*/30 * * * *", device.root)


def test_a_mistake_in_the_devices_own_labels_does_not_quarantine_the_revision(device, upstream):
    """Like a bad labels file (reported as failed, tried again), a bad --device-labels says
    nothing about the revision: once the operator corrects it, the same commit is applied."""
    sha = upstream.commit(site())

    wrong = device.sync("--device-labels", "bad key=edge")

    assert wrong["code"] == 1 and "not a valid label key" in "\n".join(wrong["reasons"])
    fixed = device.sync("--device-labels", "role=edge,spos.dev/hostname=edge-1,spos.dev/arch=amd64")
    assert (fixed["code"], fixed["outcome"], fixed["revision"]) == (0, "applied", sha), fixed
    assert sha not in device.state()["quarantined"]


def test_the_repository_url_can_come_from_a_file(device, upstream, spos, tmp_path):
    """--repo-file: the URL on the file's one line that is not empty or a comment."""
    sha = upstream.commit(site())
    given = tmp_path / "repository"
    given.write_text(f"\ufeff# the fleet's manifests\r\n\r\n  {upstream.bare}  \r\n")  # as Notepad saves
    done = spos("sync", "--root", device.root, "--repo-file", given, "--json")
    assert done.code == 0, done.err
    assert (json.loads(done.out)["outcome"], device.applied()) == ("applied", sha)


@pytest.mark.parametrize("text, mode, said", [
    (None, 0o600, "--repo-file: cannot read {file}: No such file or directory"),
    ("# nothing but a comment\n\n", 0o600, "--repo-file: {file} holds no URL"),
    ("/srv/one.git\n# and\n/srv/two.git\n", 0o600, "--repo-file: {file}:3: a second URL"),
    ("https://deploy:s3cret@git.example.net/fleet.git\n", 0o644,
     "--repo-file: {file}:1: the URL carries a password or token, and others may read the file "
     "(mode 644): chmod 600 {file}"),
    ("/srv/fleet.git\n", 0o664, "--repo-file: {file} may be changed by another user"),
    ("https://deploy:s3cret@[::1/fleet.git\n", 0o600, "is refused: it cannot be parsed"),
    ("fifo", 0o600, "--repo-file: {file} is not a regular file"),
])
def test_a_repository_file_spos_cannot_use_is_refused_naming_it(device, spos, tmp_path, text, mode, said):
    given = tmp_path / "repository"
    if text == "fifo":
        os.mkfifo(given, mode)  # nothing writes to it: reading must not wait
    elif text is not None:
        given.write_text(text)
        given.chmod(mode)
    done = spos("sync", "--root", device.root, "--repo-file", given)
    assert done.code == 1 and said.format(file=given) in done.err, done.err
    assert "s3cret" not in done.out + done.err
    assert not device.path(SYNC).exists()


def test_repo_and_repo_file_together_are_refused(device, spos, tmp_path):
    done = spos("sync", "--root", device.root, "--repo", "/srv/a.git", "--repo-file", tmp_path / "f")
    assert done.code == 1 and "not allowed with argument" in done.err, done.err


def test_an_unreachable_remote_is_tried_again_and_its_password_never_shown(device, upstream, spos):
    sha = upstream.commit(site())
    hidden = upstream.bare.with_name("remote-away.git")
    upstream.bare.rename(hidden)

    missing = device.sync()
    upstream_down = spos("sync", "--root", device.root, "--repo", "https://deploy:s3cret@127.0.0.1:1/fleet.git")

    assert (missing["code"], missing["outcome"], missing["revision"]) == (1, "failed", None)
    assert "could not fetch" in missing["message"]
    assert upstream_down.code == 1 and "failed: could not fetch" in upstream_down.out
    state_text = device.path(f"{SYNC}/state.json").read_text()
    shown = spos("status", "--root", device.root)
    assert "s3cret" not in upstream_down.out + upstream_down.err + state_text + shown.out
    assert "https://***@127.0.0.1:1/fleet.git" in shown.out
    assert json.loads(state_text)["quarantined"] == {} and device.applied() is None

    hidden.rename(upstream.bare)
    back = device.sync()
    assert (back["code"], back["outcome"], back["revision"]) == (0, "applied", sha)


def test_a_failed_reapply_of_the_applied_revision_does_not_quarantine_it(device, upstream):
    """Something on the device (not in the revision) stops a sync from putting a managed path
    back: that says nothing about the revision, so the next sync, once the obstacle is gone,
    converges the device again instead of skipping the revision it runs."""
    good = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    agent_dir = device.path(f"{STATE}/agents/sensor")
    shutil.rmtree(agent_dir)
    agent_dir.write_text("in the way\n")

    blocked = device.sync()

    assert blocked["code"] == 1 and blocked["failed"][0]["id"] == "agent/sensor"
    agent_dir.unlink()
    again = device.sync()

    assert (again["code"], again["outcome"], again["revision"]) == (0, "applied", good), again
    assert good not in device.state()["quarantined"]
    assert device.agent_config()["agent"] == "sensor"


# -- what the repository holds ---------------------------------------------------------------------

def test_hostile_repository_content_never_runs_or_leaks_and_the_rest_applies(tmp_path, device, upstream):
    """A nested bare repository whose config runs a command as fsmonitor and whose hooks
    would, a submodule whose URL is an `ext::` command, hooks served by the remote, symbolic
    links out of the repository and one that would make a second copy of the agent: the sync
    applies the plain manifests (docs of gitsync.export: links and submodules are never
    created) and nothing else runs, is created, or is read from outside the repository."""
    markers = tmp_path / "markers"
    markers.mkdir()
    base = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    trap = f"touch {markers}/nested"
    hostile = upstream.commit({
        **site(cron="*/30 * * * *"),
        "nested.git/HEAD": "ref: refs/heads/main\n",
        "nested.git/config": f"[core]\n\tbare = false\n\tworktree = ..\n\tfsmonitor = {trap}-fsmonitor\n",
        "nested.git/hooks/post-checkout": f"#!/bin/sh\n{trap}-post-checkout\n",
        "nested.git/objects/.keep": "", "nested.git/refs/.keep": "",
        "agents.d/nested.git/config": f"[core]\n\tfsmonitor = {trap}-agents\n",
        "agents.d/nested.git/HEAD": "ref: refs/heads/main\n",
        ".githooks/post-merge": f"#!/bin/sh\n{trap}-githooks\n",
        ".gitmodules": f'[submodule "evil"]\n\tpath = evil\n\turl = ext::sh -c touch% {markers}/ext\n',
        "elsewhere/other.yaml": agent("linked")["agents.d/linked.yaml"],
    }, executable=("nested.git/hooks/post-checkout", ".githooks/post-merge"), links={
        "passwd": "/etc/passwd",
        "agents.d/passwd.yaml": "/etc/passwd",
        "agents.d/escape": "../../../../..",
        "agents.d/linked.yaml": "../elsewhere/other.yaml",
        "agents.d/alias.yaml": "sensor.yaml",
    }, gitlinks={"evil": base})
    upstream.arm_remote(markers / "remote")
    before = every_path(tmp_path)

    synced = device.sync()

    assert (synced["code"], synced["outcome"], synced["revision"]) == (0, "applied", hostile), synced
    assert synced["changed"] == ["cron/sensor-sample"]
    assert device.cron() == cron_line("*/30 * * * *", device.root)
    assert list(markers.iterdir()) == []
    created = every_path(tmp_path) - before
    assert created and {path for path in created if not path.startswith(str(device.path(STATE)))} == set()
    checkout = device.path(f"{SYNC}/checkout")
    inside = every_path(checkout)
    assert not [path for path in inside if os.path.islink(path)]
    for absent in ("evil", "passwd", "agents.d/passwd.yaml", "agents.d/escape", "agents.d/linked.yaml",
                   "agents.d/alias.yaml"):
        assert not os.path.lexists(checkout / absent), absent
    assert (checkout / "nested.git/config").is_file() and (checkout / ".gitmodules").is_file()
    assert not device.path(f"{STATE}/agents/linked").exists()
    passwd = Path("/etc/passwd").read_bytes()
    assert not any(passwd in Path(path).read_bytes() for path in every_path(device.root)
                   if os.path.isfile(path) and not os.path.islink(path))
    assert device.applied() == hostile

    # The remote's traps were armed: a push runs its hooks.
    upstream.commit({"README": "after\n"})
    assert (markers / "remote-post-update").exists()


def test_a_fleet_repository_renders_differently_for_two_label_sets(tmp_path, upstream, spos):
    sha = upstream.commit({
        **agent("camera", role="edge"), **agent("relay", role="gateway", cron="0 * * * *"),
        **agent("sensor", cron="*/30 * * * *"), "policies/site.yaml": POLICY,
    })
    edge, gateway = Device(tmp_path / "edge", upstream, spos), Device(tmp_path / "gateway", upstream, spos)
    edge.path(STATE).mkdir(parents=True)
    edge.path(f"{STATE}/device-labels.yaml").write_text("role: edge\n")
    gateway.root.mkdir()

    on_edge = edge.sync()
    on_gateway = gateway.sync("--device-labels", "role=gateway,spos.dev/hostname=gw-1,spos.dev/arch=arm64")

    assert (on_edge["outcome"], on_edge["revision"]) == ("applied", sha)
    assert (on_gateway["outcome"], on_gateway["revision"]) == ("applied", sha)
    assert sorted(on_edge["changed"]) == ["agent/camera", "agent/sensor", "cron/camera-sample",
                                          "cron/sensor-sample"]
    assert sorted(on_gateway["changed"]) == ["agent/relay", "agent/sensor", "cron/relay-sample",
                                             "cron/sensor-sample"]
    assert edge.cron("camera") == cron_line("*/15 * * * *", edge.root, "camera")
    assert gateway.cron("relay") == cron_line("0 * * * *", gateway.root, "relay")
    for device, absent in ((edge, "relay"), (gateway, "camera")):
        assert device.cron("sensor") == cron_line("*/30 * * * *", device.root)
        assert not device.path(f"/etc/cron.d/spos-{absent}").exists()
        assert not device.path(f"{STATE}/agents/{absent}").exists()


# -- spos daemon -----------------------------------------------------------------------------------

class DaemonProcess:
    """`python -m reconciler daemon` serving `device`, as a subprocess logging to a file."""

    def __init__(self, device: Device, log: Path):
        self.device, self.log_path = device, log
        self.process: subprocess.Popen | None = None
        self.status_path = device.path(f"{STATE}/daemon.json")

    def start(self, *flags: str, interval: str = "1s", drift: str = "500ms") -> None:
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "daemon", "--root", str(self.device.root),
             "--repo", str(self.device.upstream.bare), "--interval", interval, "--jitter", "0s",
             "--drift-interval", drift, "--stop-timeout", "5s", *flags],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict:
        """daemon.json when this process wrote it, else {}. A read must never see a partial
        file: it is replaced atomically."""
        try:
            raw = self.status_path.read_bytes()
        except FileNotFoundError:
            return {}
        status = json.loads(raw)
        return status if status.get("pid") == self.process.pid else {}

    def output(self) -> str:
        return self.log_path.read_text()

    def syncs(self) -> list[str]:
        return re.findall(r"^spos daemon: sync (\w+):", self.output(), re.MULTILINE)

    def wait_synced(self, count: int) -> list[str]:
        return wait_for(lambda: len(self.syncs()) >= count and self.syncs(), f"{count} sync(s)", WAIT)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(WAIT)
        finally:
            self.log.close()

    def kill(self) -> None:
        """After the test: the daemon and the children it last reported, whatever state they
        are in."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        for child in (self.status().get("children") or {}).values():
            if child.get("pid") and alive(child["pid"]):
                os.kill(child["pid"], signal.SIGKILL)
        self.log.close()


@pytest.fixture
def daemon(tmp_path, device):
    started = DaemonProcess(device, tmp_path / "daemon.log")
    yield started
    started.kill()


def hand_edit(path: Path, old: str, new: str) -> None:
    """Replace `old` by `new` in the file as an editor saving it would: a new file renamed
    over the old one, so a drift check never sees it half-written."""
    text = path.read_text()
    assert old in text
    temporary = path.with_name(f".{path.name}.edit")
    temporary.write_text(text.replace(old, new))
    os.replace(temporary, path)


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for a parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_second_daemon_on_the_same_device_refuses_to_start(device, upstream, daemon):
    upstream.commit(site())
    daemon.start("--no-executor", "--no-triggers", interval="60s")
    wait_for(lambda: daemon.status(), "the first daemon's status", WAIT)
    second = subprocess.run(
        [sys.executable, "-m", "reconciler", "daemon", "--root", str(device.root),
         "--repo", str(upstream.bare), "--no-executor", "--no-triggers"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
    assert second.returncode == 1
    assert f"another spos daemon (pid {daemon.process.pid}) already serves" in second.stderr
    assert daemon.status()["pid"] == daemon.process.pid
    assert daemon.terminate() == 0


def test_the_daemon_syncs_every_interval_and_replaces_its_status_atomically(device, upstream, daemon):
    first = upstream.commit(site())
    daemon.start("--no-executor", "--no-triggers", interval="1s")
    wait_for(lambda: device.applied() == first, "the first revision applied", WAIT)
    status = wait_for(lambda: (daemon.status().get("lastSync") or {}).get("revision") == first
                      and daemon.status(), "daemon.json after the first sync", WAIT)
    assert (status["intervalSeconds"], status["jitterSeconds"], status["driftIntervalSeconds"]) == (1, 0, 0.5)
    assert status["lastSync"]["outcome"] == "applied" and status["children"] == {}
    second = upstream.commit(site(cron="*/30 * * * *"))
    pushed = time.monotonic()

    # Every read of daemon.json while the daemon works is a whole JSON document (json.loads in
    # status() raises otherwise), and each write is a new file renamed over the old one.
    inodes, last_syncs = set(), set()

    def second_applied_and_three_syncs_later():
        status = daemon.status()
        inodes.add(daemon.status_path.stat().st_ino)
        last_syncs.add((status.get("lastSync") or {}).get("at"))
        return device.applied() == second and len(last_syncs - {None}) >= 4

    wait_for(second_applied_and_three_syncs_later, "the second revision and three more syncs", WAIT)
    elapsed = time.monotonic() - pushed

    assert device.cron() == cron_line("*/30 * * * *", device.root)
    assert 2.0 <= elapsed <= 8.0, f"three syncs 1 s apart took {elapsed:.1f} s"
    assert len(inodes) >= 3
    syncs = daemon.syncs()
    assert syncs.count("applied") == 2 and syncs[0] == "applied" and syncs[-1] == "unchanged", syncs
    assert set(syncs) == {"applied", "unchanged"}, syncs
    assert daemon.terminate() == 0
    final = json.loads(daemon.status_path.read_text())
    assert final["stoppedAt"] == final["updatedAt"] and final["lastSync"]["revision"] == second
    assert [p.name for p in daemon.status_path.parent.iterdir() if "spos-tmp" in p.name] == []


def test_the_daemon_repairs_managed_files_changed_by_hand_between_syncs(device, upstream, daemon, spos):
    sha = upstream.commit(site())
    daemon.start("--no-executor", "--no-triggers", interval="60s", drift="500ms")
    wait_for(lambda: daemon.status().get("lastSync"), "the first sync", WAIT)
    assert device.applied() == sha
    cron_file = device.path("/etc/cron.d/spos-sensor")
    good_cron, good_config = cron_file.read_text(), device.agent_config()

    hand_edit(cron_file, "*/15 * * * *", "* * * * *")
    wait_for(lambda: cron_file.read_text() == good_cron, "the crontab line put back", WAIT)
    check = wait_for(lambda: (daemon.status().get("lastDriftCheck") or {}).get("repaired"),
                     "the repair in daemon.json", WAIT)
    assert check == ["cron/sensor-sample"]

    config = device.path(f"{STATE}/agents/sensor/agent.json")
    hand_edit(config, '"timeoutSeconds": 300', '"timeoutSeconds": 86400')
    wait_for(lambda: device.agent_config() == good_config, "agent.json put back", WAIT)
    drift = wait_for(lambda: (device.state().get("drift") or {}).get("repairs") == 2 and device.state()["drift"],
                     "two repairs recorded in state.json", WAIT)
    assert drift["revision"] == sha and drift["lastRepair"]["repaired"] == ["agent/sensor"]
    assert daemon.syncs() == ["applied"], "the repairs were made by drift checks, not by a sync"

    # A line added by hand beside spos's own is the owner's, not drift.
    hand_edit(cron_file, good_cron, good_cron + "# checked by hand\n")
    checked = device.state()["drift"]["checkedAt"]
    # The first check to end may have read the file before the edit; the one after it did not.
    first = wait_for(lambda: device.state()["drift"]["checkedAt"] != checked
                     and device.state()["drift"]["checkedAt"], "a drift check", WAIT)
    wait_for(lambda: device.state()["drift"]["checkedAt"] not in (checked, first),
             "a drift check begun after the edit", WAIT)
    assert cron_file.read_text() == good_cron + "# checked by hand\n"
    assert device.state()["drift"]["repairs"] == 2

    status = spos("status", "--root", device.root)
    assert re.search(r"^Drift: +checked \S+, 2 repair\(s\) so far; last at \S+: agent/sensor$",
                     status.out, re.MULTILINE), status.out
    assert "Daemon:     running" in status.out
    log = daemon.output()
    assert "drift repaired: cron/sensor-sample" in log and "drift repaired: agent/sensor" in log
    assert daemon.terminate() == 0


def test_a_quarantine_survives_a_restart_and_is_not_retried_until_a_new_commit(device, upstream, daemon):
    good = upstream.commit(site())
    assert device.sync()["outcome"] == "applied"
    invalid = upstream.commit(site(cron="* * * * *"))
    assert device.sync()["outcome"] == "quarantined"
    held = device.state()["quarantined"][invalid]
    checkout = device.path(f"{SYNC}/checkout")
    exported = checkout.stat().st_ino

    daemon.start("--no-executor", "--no-triggers", interval="1s")
    daemon.wait_synced(3)

    assert daemon.syncs()[:3] == ["skipped"] * 3
    assert device.state()["quarantined"][invalid] == held
    assert checkout.stat().st_ino == exported, "the quarantined revision was exported again"
    assert device.applied() == good and device.checkout_revision() == good
    assert daemon.status()["lastSync"]["revision"] == invalid

    fixed = upstream.commit(site(cron="*/30 * * * *"))
    wait_for(lambda: device.applied() == fixed, "the new commit applied", WAIT)
    assert device.cron() == cron_line("*/30 * * * *", device.root)
    assert daemon.terminate() == 0


def test_the_daemon_stops_promptly_while_its_sync_waits_for_the_apply_lock(device, upstream, daemon):
    upstream.commit(site())
    lock_path = device.path(f"{STATE}/apply.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as held:  # another apply (a cron sync, an operator) holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        daemon.start("--no-executor", "--no-triggers", interval="60s")
        serving = device.path(f"{STATE}/daemon.lock")
        wait_for(lambda: serving.exists() and serving.read_text().strip() == str(daemon.process.pid),
                 "the daemon to start", WAIT)
        time.sleep(1)  # its first sync is waiting for the lock (60 s by default)
        assert daemon.terminate() == 0  # within WAIT, not after the lock's timeout
    assert "stopped waiting: spos is shutting down" in daemon.output()


def test_the_daemon_restarts_a_killed_child_and_stops_its_children_on_sigterm(device, upstream, daemon, spos):
    upstream.commit(site())
    daemon.start("--no-executor", interval="60s")
    child = wait_for(lambda: ((daemon.status().get("children") or {}).get("triggers") or {}).get("pid")
                     and daemon.status()["children"]["triggers"], "the trigger daemon started", WAIT)
    assert child["running"] and child["restarts"] == 0
    triggerd = device.path(f"{STATE}/triggerd/status.json")
    wait_for(lambda: triggerd.exists() and json.loads(triggerd.read_text()).get("pid") == child["pid"],
             "the trigger daemon's own status", WAIT)

    os.kill(child["pid"], signal.SIGKILL)
    restarted = wait_for(lambda: (daemon.status()["children"]["triggers"]["pid"] or 0) not in (0, child["pid"])
                         and daemon.status()["children"]["triggers"], "the trigger daemon restarted", WAIT)

    assert restarted["running"] and restarted["restarts"] == 1
    assert restarted["lastExit"]["code"] == -signal.SIGKILL
    assert "restarted 1 time(s)" in spos("status", "--root", device.root).out
    new_pid = restarted["pid"]
    wait_for(lambda: json.loads(triggerd.read_text()).get("pid") == new_pid,
             "the restarted trigger daemon serving", WAIT)

    assert daemon.terminate() == 0
    final = json.loads(daemon.status_path.read_text())
    assert final["stoppedAt"] and final["children"]["triggers"]["running"] is False
    assert not alive(new_pid)
    assert json.loads(triggerd.read_text()).get("stoppedAt"), "the trigger daemon was not stopped cleanly"
    status = spos("status", "--root", device.root)
    assert f"Daemon:     not running (stopped at {final['stoppedAt']})" in status.out
    assert "Triggers:   not running" in status.out


def test_a_child_that_exits_is_restarted_after_the_first_backoff(tmp_path):
    """docs: a child that exits "is started again after BACKOFF_FIRST seconds, doubling up to
    BACKOFF_MAX"."""
    child = Child("worker", [sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "worker.log"))
    delays = []
    for _ in range(3):
        child.start()
        child.process.kill()
        child.process.wait(5)
        now = time.monotonic()
        child.check(now)
        delays.append(child.due - now)

    assert child.restarts == 3 and child.last_exit["code"] == -signal.SIGKILL
    assert delays == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]


def test_the_next_sync_is_the_interval_plus_a_random_share_of_the_jitter(device, upstream):
    upstream.commit(site())
    options = SyncOptions(repo=str(upstream.bare))

    def waits(jitter: float) -> list[float]:
        agent_daemon = Daemon(str(device.root), options,
                              DaemonSettings(interval=30, jitter=jitter, drift_interval=5, children=()),
                              log=lambda text: None)
        found = []
        for _ in range(4):
            agent_daemon.next_sync = 0.0
            agent_daemon.cycle()
            found.append(agent_daemon.next_sync - time.monotonic())
            assert 4 < agent_daemon.next_drift - time.monotonic() <= 5, "drift is checked between syncs"
        return found

    jittered, steady = waits(20.0), waits(0.0)

    assert all(29 < wait <= 50 for wait in jittered) and len({round(w, 2) for w in jittered}) > 1, jittered
    assert all(29 < wait <= 30 for wait in steady), steady
    status = json.loads(device.path(f"{STATE}/daemon.json").read_text())
    assert (status["intervalSeconds"], status["jitterSeconds"]) == (30, 0)
    assert device.applied() is not None


# -- spos status -----------------------------------------------------------------------------------

APPLIED, HELD, UNSIGNED = "3f2a" + "0" * 36, "9c41" + "1" * 36, "b7e0" + "2" * 36
REASON = "agents.d/sensor.yaml:17:13: unknown field 'timout' (at spec.tasks.sample)"
SKIPPED = {
    "at": "2026-03-01T10:05:00+00:00", "outcome": "skipped", "revision": HELD,
    "message": f"revision {HELD[:12]} was quarantined at 2026-03-01T10:04:00+00:00 (validate); "
               "waiting for a new commit",
    "reasons": [REASON], "changed": [], "failed": [],
}
FIXED_STATE = {
    "format": 1,
    "repo": {"url": "https://deploy:***@git.example.org/fleet.git", "branch": "main", "path": "agents.d"},
    "applied": {"revision": APPLIED, "at": "2026-03-01T10:00:00+00:00", "changed": 2,
                "checkedAt": "2026-03-01T10:05:00+00:00"},
    "quarantined": {
        UNSIGNED: {"stage": "verify", "at": "2026-03-01T10:02:00+00:00", "count": 1,
                   "reasons": [f"commit {UNSIGNED[:12]} is not signed"]},
        HELD: {"stage": "validate", "at": "2026-03-01T10:04:00+00:00", "count": 1, "reasons": [REASON]},
    },
    "last": SKIPPED,
    "lastFailure": SKIPPED,
    "drift": {"checkedAt": "2026-03-01T10:06:00+00:00", "revision": APPLIED, "repairs": 3,
              "lastRepair": {"at": "2026-03-01T10:05:30+00:00", "revision": APPLIED,
                             "repaired": ["cron/sensor-sample"], "failed": []}},
}


def fixed_daemon(pid: int, **changes) -> dict:
    return {
        "format": 1, "pid": pid, "startedAt": "2026-03-01T09:00:00+00:00",
        "repo": {"branch": "main", "path": "agents.d"}, "intervalSeconds": 60, "jitterSeconds": 10,
        "driftIntervalSeconds": 60, "nextSyncAt": "2026-03-01T10:06:10+00:00",
        "lastSync": SKIPPED, "lastDriftCheck": FIXED_STATE["drift"]["lastRepair"],
        "children": {
            "executor": {"running": True, "pid": 4242, "restarts": 2, "log": "/x/executor.log",
                         "lastExit": {"at": "2026-03-01T09:30:00+00:00", "code": 1, "ranSeconds": 0.4}},
            "triggers": {"running": False, "pid": None, "restarts": 0, "lastExit": None, "log": "/x/triggers.log"},
        },
        "updatedAt": "2026-03-01T10:07:00+00:00", "stoppedAt": "2026-03-01T10:07:00+00:00", **changes,
    }


def test_status_reports_a_fixed_state_as_text_and_json_and_changes_nothing(device_root, spos):
    state_dir = device_root / STATE
    (state_dir / "sync").mkdir(parents=True)
    (state_dir / "sync/state.json").write_text(json.dumps(FIXED_STATE))
    (state_dir / "daemon.json").write_text(json.dumps(fixed_daemon(123456)))
    before = {path: Path(path).read_bytes() for path in every_path(device_root) if os.path.isfile(path)}

    text, as_json = spos("status", "--root", device_root), spos("status", "--root", device_root, "--json")

    assert (text.code, as_json.code) == (0, 0)
    assert text.out == (
        f"Applied:    {APPLIED[:12]} at 2026-03-01T10:00:00+00:00 (2 changed) from "
        "https://deploy:***@git.example.org/fleet.git main:agents.d\n"
        f"Last sync:  2026-03-01T10:05:00+00:00 skipped: {SKIPPED['message']}\n"
        f"Pending:    {HELD[:12]} skipped: {SKIPPED['message']}\n"
        f"              {REASON}\n"
        f"Quarantined: {HELD[:12]} (validate), {UNSIGNED[:12]} (verify)\n"
        "Drift:      checked 2026-03-01T10:06:00+00:00, 3 repair(s) so far; "
        "last at 2026-03-01T10:05:30+00:00: cron/sensor-sample\n"
        "Daemon:     not running (stopped at 2026-03-01T10:07:00+00:00)\n"
        "Executor:   not running (no executor is running: queued runs wait)\n"
        "Triggers:   not running (the trigger daemon is not running)\n"
    )
    assert json.loads(as_json.out) == {
        "root": str(device_root),
        "repo": FIXED_STATE["repo"],
        "applied": FIXED_STATE["applied"],
        "lastSync": SKIPPED,
        "pending": {key: SKIPPED[key] for key in ("revision", "outcome", "message", "reasons", "at")},
        "lastFailure": SKIPPED,
        "quarantined": [{"revision": HELD, **FIXED_STATE["quarantined"][HELD]},
                        {"revision": UNSIGNED, **FIXED_STATE["quarantined"][UNSIGNED]}],
        "drift": FIXED_STATE["drift"],
        "daemon": {"running": False, "pid": 123456, "detail": "stopped at 2026-03-01T10:07:00+00:00"},
        "executor": {"running": False, "detail": "no executor is running: queued runs wait"},
        "triggers": {"running": False, "detail": "the trigger daemon is not running", "states": {}},
    }
    after = {path: Path(path).read_bytes() for path in every_path(device_root) if os.path.isfile(path)}
    assert after == before, "spos status wrote to the device"


def test_status_tells_a_running_daemon_from_a_dead_or_a_stuck_one(device_root, spos):
    state_dir = device_root / STATE
    state_dir.mkdir(parents=True)
    daemon_file = state_dir / "daemon.json"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    running = fixed_daemon(os.getpid(), updatedAt=now, stoppedAt=None)
    daemon_file.write_text(json.dumps(running))

    live = spos("status", "--root", device_root)

    assert live.out.splitlines()[0] == "Applied:    nothing synced yet (spos sync or spos daemon)"
    assert (f"Daemon:     running (pid {os.getpid()} since 2026-03-01T09:00:00+00:00, next sync at "
            "2026-03-01T10:06:10+00:00)\n"
            "  executor: running, pid 4242, restarted 2 time(s)\n"
            "  triggers: not running\n") in live.out
    daemon_file.write_text(json.dumps({**running, "updatedAt": "2026-03-01T10:07:00+00:00"}))
    assert re.search(r"no status written for \d+s: it may be stuck\)",
                     spos("status", "--root", device_root).out)
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    daemon_file.write_text(json.dumps({**running, "pid": gone.pid}))
    dead = json.loads(spos("status", "--root", device_root, "--json").out)["daemon"]
    assert dead == {"running": False, "pid": gone.pid,
                    "detail": f"pid {gone.pid} died; its last status is from {now}"}




@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(sandbox_missing() is not None, reason=str(sandbox_missing()))
def test_the_daemons_executor_serves_the_synced_agent_and_stops_with_it(device, upstream, daemon, spos):
    upstream.commit(site())
    daemon.start("--no-triggers", interval="60s")
    executor = wait_for(lambda: ((daemon.status().get("children") or {}).get("executor") or {}).get("pid")
                        and daemon.status()["children"]["executor"], "the executor started", WAIT)
    wait_for(lambda: device.applied(), "the first sync", WAIT)
    wait_for(lambda: json.loads(spos("status", "--root", device.root, "--json").out)["executor"]["running"],
             "the executor serving the queue", WAIT)

    run = spos("action", "run", "--root", device.root, "--agent", "sensor", "--task", "sample",
               "--wait", "--wait-timeout", "15s")

    assert run.code == 0, run.out + run.err
    shown = json.loads(spos("action", "show", run.out.strip(), "--root", device.root, "--json").out)
    assert (shown["agent"], shown["task"], shown["state"], shown["exitCode"]) == ("sensor", "sample", "completed", 0)
    assert daemon.terminate() == 0
    assert not alive(executor["pid"])
    final = json.loads(daemon.status_path.read_text())
    assert final["children"]["executor"]["running"] is False and final["children"]["executor"]["restarts"] == 0
    assert "Executor:   not running" in spos("status", "--root", device.root).out


def test_sync_terminated_while_fetching_stops_its_git_too(device, tmp_path):
    """SIGTERM (a supervisor, `timeout`) unwinds `spos sync` as Ctrl-C does: the fetch that
    hangs on a silent remote is killed with it, not left running on its own."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    url = f"https://127.0.0.1:{silent.getsockname()[1]}/fleet.git"
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "sync", "--root", str(device.root), "--repo", url],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def fetching() -> list[int]:
            return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, url)
                    and int(pid) != process.pid]

        wait_for(fetching, "git to start fetching", WAIT)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=WAIT)
        assert process.returncode == 143 and "spos: terminated" in err, err
        wait_for(lambda: not fetching(), "the fetch to be gone", 5)
    finally:
        silent.close()


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return text.encode() in handle.read()
    except OSError:
        return False
