"""Adversarial tests of `spos sync`, `spos daemon`, `spos status` and `spos install`.

Each test drives real parts: a bare repository as the remote (tests/test_gitsync.py's
Upstream), `spos` in-process or as a subprocess, real gpg, real signals, `systemd-analyze
verify` and /bin/sh. Faults are made the way a device meets them: a file-size limit
(RLIMIT_FSIZE) stands for a full disk, a TCP listener that never answers for a stalled remote,
and a process that exits at a chosen point (os._exit, no clean-up) for a crash or power loss.

Some tests pin behaviour that holds and matters (a crash at any step of the checkout update
converges at the next sync); the others show defects and fail until they are fixed. Every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_gitsync import Upstream, isolated_env, needs_gpg, run, run_raw
from test_sync import REPO, STATE, SYNC, Device, agent, alive, cron_line, hand_edit, site
from waiting import wait_for

from reconciler import install
from reconciler.device import Device as Root
from reconciler.gitsync import Mirror
from reconciler.state import ApplyLock
from reconciler.sync import SyncOptions, repair_drift

WAIT = 10


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    return Upstream(tmp_path)


@pytest.fixture
def device(device_root, upstream, spos) -> Device:
    return Device(device_root, upstream, spos)


def synced(device: Device, *flags: str) -> dict:
    """`spos sync --json` in-process, as Device.sync, but an exception or a missing result is
    returned as the outcome instead of failing inside the helper."""
    try:
        done = device.spos("sync", "--root", device.root, "--repo", device.upstream.bare, "--json", *flags)
    except Exception as exc:  # noqa: BLE001 - what escaped spos is the finding
        return {"outcome": f"crashed with {type(exc).__name__}: {exc}", "code": None}
    if not done.out:
        return {"outcome": f"no result; stderr: {done.err.strip()}", "code": done.code}
    return {**json.loads(done.out), "code": done.code}


def sync_process(device: Device, *flags: str, repo: str | None = None, fsize: int | None = None,
                 crash: tuple[str, str] | None = None, wait: bool = True):
    """`spos sync --json` as a subprocess: with `fsize`, under RLIMIT_FSIZE (a write past it
    fails with EFBIG, as a full disk fails with ENOSPC); with `crash` = (point, arg), the
    process exits at that point without any clean-up (see CRASHER)."""
    argv = ["sync", "--root", str(device.root), "--repo", repo or str(device.upstream.bare), "--json", *flags]
    command = [sys.executable, "-c", CRASHER, *crash, *argv] if crash else [sys.executable, "-m", "reconciler", *argv]

    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=limit, start_new_session=True, env=direct())
    if not wait:
        return process
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def direct() -> dict[str, str]:
    """This environment without proxies: the stalled remote on 127.0.0.1 must be reached."""
    return {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}


CRASHER = r'''
import os, sys
point, arg, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import reconciler.apply as apply_module
import reconciler.gitsync as gitsync
import reconciler.sync as sync_module

def die(*_, **__):
    os._exit(137)

if point == "update":  # after the first file an update from revision `arg` wrote
    update, replace, armed = gitsync.Mirror.update, gitsync._replace_file, []
    def watched(self, sha, dest, base, **options):
        armed.append(base == arg)
        return update(self, sha, dest, base, **options)
    def replaced(*args):
        replace(*args)
        if armed[-1]:
            die()
    gitsync.Mirror.update, gitsync._replace_file = watched, replaced
elif point == "checked-out":  # the checkout and its marker written; nothing validated yet
    sync_module._converge = die
elif point == "applied":  # every change made; the inventory not yet written
    apply_module.write_inventory = die
from reconciler.cli import main
sys.exit(main(argv))
'''


def commit(upstream: Upstream, files: dict, remove: tuple[str, ...] = ()) -> str:
    """Upstream.commit after deleting `remove` from the work tree (a file may become a
    directory, or the other way round)."""
    for name in remove:
        path = upstream.work / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return upstream.commit(files)


def crafted(upstream: Upstream, files: dict[bytes, bytes]) -> str:
    """A commit on top of main with entries no work tree could hold (names too long, trees
    too deep), written to the index directly."""
    for name, content in files.items():
        oid = upstream.git("hash-object", "-w", "--stdin", stdin=content)
        upstream.git("update-index", "--add", "--cacheinfo", f"100644,{oid},{os.fsdecode(name)}")
    upstream.git("commit", "-q", "-m", "crafted")
    return upstream.push(upstream.git("rev-parse", "HEAD"))


def tree(top: Path) -> dict[bytes, bytes | None]:
    """Every file (with its content) and directory (None) below `top`, by relative path."""
    found, base = {}, os.fsencode(top)
    for directory, dirs, files in os.walk(base):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), base) + b"/"] = None
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                found[os.path.relpath(os.path.join(directory, name), base)] = handle.read()
    return found


def revision_tree(upstream: Upstream, sha: str, scratch: Path) -> dict[bytes, bytes | None]:
    """What a fresh export of `sha` holds, from a mirror of its own."""
    place = scratch / f"fresh-{sha[:12]}"
    mirror = Mirror(place, str(upstream.bare))
    mirror.fetch("main")
    return tree(mirror.export(sha, place / "export").dest)


def checkout(device: Device) -> Path:
    return device.path(f"{SYNC}/checkout")


def marker(device: Device) -> str | None:
    """The revision the checkout holds (its marker also names the boot that wrote it)."""
    path = device.path(f"{SYNC}/checkout.revision")
    return path.read_text().split()[0] if path.exists() else None


@contextmanager
def stalled_remote(credentials: str = ""):
    """An https remote that accepts the connection and never answers: a fetch from it hangs
    until git's own timeout. Closing it resets the connection, so git then fails at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"https://{credentials}127.0.0.1:{listener.getsockname()[1]}/fleet.git"
    finally:
        listener.close()


def lock_holder(device: Device) -> str:
    path = device.path(f"{STATE}/apply.lock")
    return path.read_text() if path.exists() else ""


# -- the checkout: crashes, odd trees, write errors ---------------------------------------------------

A_FILES = {**site(), "notes": "a file in A\n", "docs/old.txt": "only in A\n"}
B_REMOVED = ("notes", "docs/old.txt")
B_FILES = {"notes/now-a-directory.txt": "a directory in B\n"}


@pytest.mark.parametrize("point, valid", [
    ("update", True), ("checked-out", True), ("applied", True), ("update", False),
], ids=["mid-update", "after-marker-before-validate", "applied-before-inventory", "mid-restore"])
def test_a_crash_at_any_step_of_a_sync_converges_at_the_next_one(tmp_path, device, upstream, point, valid):
    """A sync killed (no clean-up at all) while it updates the checkout in place, right after
    the checkout's marker is written, after apply made its changes but before the inventory
    is written, or while it puts the applied revision's files back after refusing the new
    one: the next sync leaves exactly the right revision's files in the checkout and the
    device converged to it."""
    good = upstream.commit(A_FILES)
    assert synced(device)["outcome"] == "applied"
    cron = "*/30 * * * *" if valid else "* * * * *"  # every minute breaks the site policy
    new = commit(upstream, {**site(cron=cron), **B_FILES}, remove=B_REMOVED)
    base = good if valid else new

    code, out, err = sync_process(device, crash=(point, base))

    assert code == 137, (code, out, err)
    after = synced(device)
    final = new if valid else good
    if valid:
        assert (after["code"], after["outcome"], after["revision"]) in ((0, "applied", new), (0, "unchanged", new)), after
    else:
        assert (after["outcome"], after["revision"]) == ("quarantined", new), after
    assert device.applied() == final and marker(device) == final
    assert tree(checkout(device)) == revision_tree(upstream, final, tmp_path)
    assert device.cron() == cron_line("*/30 * * * *" if valid else "*/15 * * * *", device.root)
    check = repair_drift(str(device.root), SyncOptions(repo=str(upstream.bare)))
    assert check is not None and check["revision"] == final and check["failed"] == []


def test_odd_names_and_files_turned_into_directories_update_to_exactly_the_revision(tmp_path, device, upstream):
    """Names with a newline or bytes that are not UTF-8, and a file that becomes a directory
    (and back) across updates in place: the checkout holds exactly each revision's files,
    and nothing is written beside it."""
    upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    odd = crafted(upstream, {b"docs/new\nline.txt": b"newline\n", b"docs/\xff\xfe.bin": b"latin\n",
                             b"x": b"x is a file\n", b"y/z": b"y is a directory\n"})
    assert synced(device)["revision"] == odd
    assert tree(checkout(device)) == revision_tree(upstream, odd, tmp_path)
    for name in ("x", "y", "docs/new\nline.txt"):
        upstream.git("rm", "-q", "--cached", "-r", "--", name)
    swapped = crafted(upstream, {b"x/inner": b"x is a directory\n", b"y": b"y is a file\n"})

    result = synced(device)

    assert (result["code"], result["revision"]) == (0, swapped), result
    assert tree(checkout(device)) == revision_tree(upstream, swapped, tmp_path)
    assert sorted(os.listdir(device.path(SYNC))) == [
        "checkout", "checkout.revision", "home", "mirror.git", "state.json"]


def test_a_tree_a_thousand_directories_deep_does_not_wedge_every_later_sync(device, upstream):
    """A revision with one file 1,100 directories deep (a 2.2 kB path: under PATH_MAX, one
    entry, a few bytes) passes every check and is exported. The next update walks the
    checkout recursively (os.walk, shutil.rmtree) and raises RecursionError, which nothing
    catches: spos sync dies with a traceback after removing the checkout's marker, and so
    does every sync after it, even once the branch no longer holds the deep tree, because
    each starts by removing the deep checkout the same way."""
    upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    deep = crafted(upstream, {b"d/" * 1100 + b"leaf.txt": b"deep\n"})
    try:
        assert synced(device)["revision"] == deep

        upstream.git("rm", "-q", "--cached", "-r", "d")
        fixed = crafted(upstream, {b"agents.d/sensor.yaml": site(cron="*/30 * * * *")["agents.d/sensor.yaml"].encode()})
        first, second = synced(device), synced(device)
    finally:  # rm walks deep trees without recursion; shutil.rmtree (and pytest's clean-up) cannot
        subprocess.run(["rm", "-rf", "--", str(device.path(SYNC))], check=True, timeout=60)

    assert (first["outcome"], first.get("revision")) == ("applied", fixed), first
    assert (second["outcome"], second.get("revision")) == ("unchanged", fixed), second
    assert device.cron() == cron_line("*/30 * * * *", device.root)


def test_a_name_the_file_system_cannot_hold_keeps_the_applied_checkout(device, upstream):
    """A file name of 300 bytes (git allows it; ext4 and most file systems stop at 255) would
    make an update fail half-way. It is refused with the tree's other checks, before anything
    changes, so the applied revision's checkout stays, and drift repair still has it."""
    good = upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    crafted(upstream, {b"x" * 300 + b".yaml": b"kind: Note\n"})

    refused = synced(device)

    # no file system here holds the name: the revision is refused before anything changes
    assert (refused["code"], refused["outcome"]) == (1, "quarantined"), refused
    assert "longer than 255 bytes" in refused["reasons"][0]
    assert device.applied() == good
    assert marker(device) == good, "the applied revision's checkout is gone"
    cron_file = device.path("/etc/cron.d/spos-sensor")
    hand_edit(cron_file, "*/15 * * * *", "* * * * *")
    check = repair_drift(str(device.root), SyncOptions(repo=str(upstream.bare)))
    assert check is not None and check["repaired"] == ["cron/sensor-sample"], check


BIG = b"\0" * 300_000  # compresses to almost nothing in git; 300 kB on disk
FSIZE = 100_000


def test_a_full_disk_during_the_checkout_is_a_failed_sync_not_a_crash(device, upstream):
    """docs/sync.md: `failed` is "something other than the revision failed (... the disk
    full)". A write that fails while the checkout is updated raises a bare OSError (_guarded
    wraps open, mkdir and rename in ExportError, not the write itself), which sync() lets
    through, as it catches SposError only: `spos sync --json` prints no result and state.json
    does not record the sync."""
    good = upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    upstream.commit({**site(cron="*/30 * * * *"), "data/big.bin": BIG})

    code, out, err = sync_process(device, fsize=FSIZE)

    assert code == 1 and out, f"no result printed; stderr: {err.strip()}"
    assert json.loads(out)["outcome"] == "failed"
    assert device.state()["last"]["outcome"] == "failed"
    assert device.applied() == good


def test_a_full_disk_while_putting_the_applied_revision_back_is_reported_and_b_quarantined(device, upstream):
    """Apply of B fails part-way (agent/beta is blocked on the device) after B's cron line was
    written; sync then checks the applied revision A out again to re-apply it, and that write
    fails (the disk is full). _restore catches SposError only, so the OSError escapes sync():
    no result, B not quarantined, state.json still says A is applied and in force while the
    device keeps B's cron line, and the next sync applies B part-way again."""
    good = upstream.commit({**site(), "data/big.bin": BIG})
    assert synced(device)["outcome"] == "applied"
    device.path(f"{STATE}/agents/beta").write_text("in the way\n")
    broken = commit(upstream, {**site(cron="*/30 * * * *"), **agent("beta", cron="0 * * * *")},
                    remove=("data/big.bin",))

    code, out, err = sync_process(device, fsize=FSIZE)

    assert out, (f"no result printed; stderr: {err.strip()}; the device's cron line is B's "
                 f"({device.cron().split(' root ')[0]}) and state.json says {device.applied()[:12]} is applied")
    result = json.loads(out)
    assert (result["outcome"], result["revision"]) == ("quarantined", broken), result
    assert f"putting {good[:12]} back failed" in result["message"], result["message"]
    assert broken in device.state()["quarantined"]
    again = sync_process(device, fsize=FSIZE)[1]
    assert json.loads(again)["outcome"] == "skipped"


def test_an_apply_failure_is_undone_even_when_previous_revision_is_stale(device, upstream):
    """_restore re-applies the applied revision only when `previous.revision` names it. That
    file names whatever the checkout held before, which is not the applied revision once a
    sync stopped after checking a revision out (here: the labels file was invalid, so B was
    checked out and not applied). The next revision C then fails part-way and nothing is
    undone: the device keeps C's cron line while sync says A "stays in force", the checkout
    holds C, drift repair is off (repair_drift returns None) and every later sync skips C,
    so the device stays like this until a new commit."""
    good = upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    before = device.cron()
    labels = device.path(f"{STATE}/device-labels.yaml")
    labels.write_text("spos.dev/arch: arm64\n")  # the reserved prefix: the labels file is invalid
    upstream.commit(site(cron="*/30 * * * *"))
    assert synced(device)["outcome"] == "failed"
    labels.unlink()
    device.path(f"{STATE}/agents/beta").write_text("in the way\n")
    broken = upstream.commit({**site(cron="*/45 * * * *"), **agent("beta", cron="0 * * * *")})

    refused = synced(device)

    assert (refused["outcome"], refused["revision"]) == ("quarantined", broken), refused
    assert f"revision {good[:12]} stays in force" in refused["message"]
    assert device.cron() == before, "the failed revision's cron line was not undone"
    assert marker(device) == good
    assert repair_drift(str(device.root), SyncOptions(repo=str(upstream.bare))) is not None


# -- quarantine ------------------------------------------------------------------------------------

def test_a_revision_refused_because_the_host_name_is_no_label_value_is_tried_again_once_fixed(device, upstream):
    """A host name longer than 63 characters (a long FQDN) is not a valid spos.dev/hostname
    value. That is the device's configuration, like a bad labels file (`failed`, tried
    again), but it raises UsageError inside planning, so the revision is quarantined; the
    settings digest does not cover the host name, so fixing it changes nothing: the revision
    is skipped until someone commits again."""
    sha = upstream.commit(site())
    hostname = device.path("/etc/hostname")
    hostname.parent.mkdir(parents=True)
    hostname.write_text("edge-" + "x" * 70 + ".example.org\n")
    assert synced(device)["code"] == 1

    hostname.write_text("edge-1\n")
    again = synced(device)

    assert (again["code"], again["outcome"], again["revision"]) == (0, "applied", sha), again


@needs_gpg
def test_a_revision_refused_because_gpg_is_missing_is_verified_once_gpg_is_there(tmp_path, device, upstream, monkeypatch):
    """Without gpg on the device the signature cannot be checked: SignatureError("gpg is not
    installed"), and the revision is quarantined at `verify` as if its signature were bad.
    Installing gpg changes none of the settings the quarantine is keyed on, so the signed,
    good revision is skipped until a new commit."""
    home = tmp_path / "signer"
    home.mkdir(mode=0o700)
    env = isolated_env(tmp_path, GNUPGHOME=str(home))
    run("gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key",
        "Operator <ops@example.org>", "future-default", "default", "never", env=env, cwd=tmp_path)
    try:
        listing = run("gpg", "--with-colons", "--list-keys", env=env, cwd=tmp_path)
        key = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        keyring = tmp_path / "trusted.gpg"
        keyring.write_bytes(run_raw("gpg", "--batch", "--export", key, env=env, cwd=tmp_path))
        signed = upstream.commit(site(), sign=key, gnupghome=home)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30)
    without_gpg = tmp_path / "bin"
    without_gpg.mkdir()
    (without_gpg / "git").symlink_to(shutil.which("git"))
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(without_gpg))
    refused = synced(device, "--verify-signatures", str(keyring))
    assert refused["code"] == 1 and "gpg is not installed" in " ".join(refused.get("reasons", [])), refused

    monkeypatch.setenv("PATH", path)
    again = synced(device, "--verify-signatures", str(keyring))

    assert (again["code"], again["outcome"], again["revision"]) == (0, "applied", signed), again


@pytest.mark.parametrize("state", [
    {"applied": "4db0c13a5c69"},                       # a revision where an object belongs
    {"last": "unchanged"},
    {"quarantined": {"9c41" + "1" * 36: {"stage": "held by hand"}}},  # no "at"
], ids=["applied-string", "last-string", "quarantined-without-at"])
def test_a_state_file_of_the_wrong_shape_is_read_as_unreadable(device, upstream, spos, state):
    """SyncState.load: "Unreadable: start afresh". JSON that parses but has the wrong shape
    (typically a hand edit) is taken as it is instead: a string where `applied` belongs makes
    every `spos sync` raise AttributeError (and the daemon die at each start), and `spos
    status` raises TypeError, AttributeError or KeyError with a traceback."""
    sha = upstream.commit(site())
    device.path(SYNC).mkdir(parents=True)
    device.path(f"{SYNC}/state.json").write_text(json.dumps(state))
    problems = []
    for words in (("status",), ("status", "--json")):
        try:
            shown = spos(*words, "--root", device.root)
            if shown.code != 0:
                problems.append(f"spos {' '.join(words)}: exit {shown.code}: {shown.err.strip()}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"spos {' '.join(words)}: {type(exc).__name__}: {exc}")
    result = synced(device)
    if (result["outcome"], result.get("revision")) != ("applied", sha):
        problems.append(f"spos sync: {result['outcome']}")
    assert not problems, "\n".join(problems)


# -- the apply lock and what it shows ---------------------------------------------------------------

@contextmanager
def sync_holding_the_lock(device: Device, credentials: str = ""):
    """A `spos sync` subprocess stuck fetching from a stalled remote, holding the apply lock."""
    with stalled_remote(credentials) as url:
        process = sync_process(device, repo=url, wait=False)
        wait_for(lambda: "pid" in lock_holder(device), "the sync holding the apply lock", WAIT)
        yield process
    try:  # the remote is closed: the fetch fails and the sync ends
        process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def test_spos_apply_and_drift_repair_never_interleave_with_a_sync(device, upstream, manifests, spos):
    """While a sync holds the apply lock (here for as long as its fetch hangs), `spos apply`
    is refused at once, naming the holder, and changes nothing; a drift check skips without
    waiting. Once the sync ends the lock is free again."""
    upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    before = device.managed()
    with sync_holding_the_lock(device) as holder:
        applied = spos("apply", manifests, "--root", device.root, "--auto-approve")
        started = time.monotonic()
        drift = repair_drift(str(device.root), SyncOptions(repo=str(upstream.bare)))
        waited = time.monotonic() - started

        assert applied.code == 1 and f"pid {holder.pid}" in applied.err, applied.err
        assert drift is None and waited < 2
        assert device.managed() == before
    with ApplyLock(Root(str(device.root)), timeout=WAIT):
        pass


@pytest.mark.parametrize("credentials", ["deploy:s3cret@", "deploy:p@ss-s3cret@"],
                         ids=["password", "password-with-an-at"])
def test_the_apply_lock_does_not_show_the_repositorys_password(device, spos, manifests, credentials):
    """The sync redacts the URL's password everywhere it reports (messages, state.json,
    status). The apply lock records the holder's whole command line, `--repo` with its
    password included, in a file every user may read (0644), and `spos apply` (or the
    daemon's lastSync in daemon.json) repeats it in its error."""
    with sync_holding_the_lock(device, credentials=credentials):
        holder = lock_holder(device)
        refused = spos("apply", manifests, "--root", device.root, "--auto-approve")
        mode = device.path(f"{STATE}/apply.lock").stat().st_mode & 0o777

    assert refused.code == 1
    assert "s3cret" not in holder, f"apply.lock (mode {mode:o}) holds: {holder.strip()}"
    assert "s3cret" not in refused.err, refused.err


def test_a_token_given_as_the_user_name_is_redacted_like_a_password(device, spos):
    """`https://TOKEN@host/repo.git` is how access tokens are commonly given (GitHub
    documents it). redacted() only replaces what follows `user:`, so the token is written into
    state.json and shown by spos sync and spos status."""
    token = "ghp_" + "T0k3n" * 6
    done = spos("sync", "--root", device.root, "--repo", f"https://{token}@127.0.0.1:1/fleet.git")
    shown = spos("status", "--root", device.root)

    assert done.code == 1
    leaked = {name: token in text for name, text in (
        ("sync output", done.out + done.err), ("state.json", device.path(f"{SYNC}/state.json").read_text()),
        ("status", shown.out))}
    assert leaked == {"sync output": False, "state.json": False, "status": False}


# -- the daemon ------------------------------------------------------------------------------------

DAEMON = r'''
import json, sys
from reconciler.agentd import Daemon, DaemonSettings
from reconciler.sync import SyncOptions
root, repo, stop, children = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
daemon = Daemon(root, SyncOptions(repo=repo), DaemonSettings(
    interval=60, jitter=0, drift_interval=60, stop_timeout=stop, children=tuple(children)))
for child in daemon.children:
    child.argv = children[child.name]
daemon.run()
'''


class DaemonUnderTest:
    """reconciler.agentd.Daemon in a process of its own, with children given as argv."""

    def __init__(self, device: Device, repo: str, children: dict[str, list[str]], stop: float = 2.0,
                 fsize: int | None = None, cli_flags: tuple[str, ...] | None = None):
        def limit():
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        if cli_flags is not None:
            command = [sys.executable, "-m", "reconciler", "daemon", "--root", str(device.root), "--repo", repo,
                       *cli_flags]
        else:
            command = [sys.executable, "-c", DAEMON, str(device.root), repo, str(stop), json.dumps(children)]
        self.device, self.log = device, device.root.parent / "daemon-under-test.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=limit, env=direct())
        self.status_path = device.path(f"{STATE}/daemon.json")

    def status(self) -> dict:
        try:
            status = json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return {}
        return status if status.get("pid") == self.process.pid else {}

    def output(self) -> str:
        return self.log.read_text()

    def children(self) -> dict:
        return self.status().get("children") or {}

    def kill(self) -> None:
        pids = [child.get("pid") for child in self.children().values() if child.get("pid")]
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        for pid in pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def daemons():
    started = []
    yield lambda *args, **kwargs: started.append(DaemonUnderTest(*args, **kwargs)) or started[-1]
    for daemon in started:
        daemon.kill()


def test_a_full_disk_during_a_sync_does_not_kill_the_daemon(device, upstream, daemons):
    """The daemon catches SposError around a sync; the OSError of a full disk (above) goes
    through, the daemon exits, and a device installed with the cron fallback has no daemon
    (and no executor) until it reboots."""
    upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    upstream.commit({**site(cron="*/30 * * * *"), "data/big.bin": BIG})

    daemon = daemons(device, str(upstream.bare), {}, fsize=FSIZE, cli_flags=(
        "--no-executor", "--no-triggers", "--interval", "60s", "--jitter", "0s"))
    wait_for(lambda: daemon.process.poll() is not None or (daemon.status().get("lastSync") or {}).get("outcome"),
             "the first sync's end", WAIT)

    assert daemon.process.poll() is None, f"the daemon exited: {daemon.output()[-300:]}"
    assert daemon.status()["lastSync"]["outcome"] == "failed"


def test_a_child_that_fails_at_once_is_restarted_with_growing_delays_and_reported(tmp_path, device, upstream, daemons):
    """A child that exits with an error as soon as it starts is never restarted in a tight
    loop: the delays between starts grow, the daemon keeps syncing, and daemon.json counts
    the restarts and gives the last exit code."""
    upstream.commit(site())
    starts = tmp_path / "starts"
    daemon = daemons(device, str(upstream.bare), {"worker": ["sh", "-c", f"date +%s.%N >> {starts}; exit 3"]})
    wait_for(lambda: starts.exists() and len(starts.read_text().split()) >= 3, "three starts", WAIT)

    times = [float(value) for value in starts.read_text().split()]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    worker = daemon.children()["worker"]

    assert daemon.process.poll() is None and device.applied() is not None
    assert all(gap >= 1.0 for gap in gaps) and gaps[1] > gaps[0], gaps
    assert worker["restarts"] >= 2 and worker["lastExit"]["code"] == 3, worker


STUBBORN = 'trap "" TERM; sleep 60 & echo $! >> {pids}; wait; wait'


def test_sigterm_stops_children_that_ignore_it_within_the_stop_timeout_and_with_their_own_children(tmp_path, device, upstream, daemons):
    """docs: children "are killed after --stop-timeout". Two children that ignore SIGTERM are
    waited for one after the other, so the daemon takes twice the timeout (n times for n
    children; with --stop-timeout 60s and both children that is past the unit's
    TimeoutStopSec=90s). And only the child's own pid is killed: it runs in a session of its
    own, and what it started (the executor's runs, here a `sleep`) lives on; under systemd
    KillMode=mixed reaps it, under the cron fallback nothing does."""
    upstream.commit(site())
    pids = tmp_path / "grandchildren"
    stubborn = ["sh", "-c", STUBBORN.format(pids=pids)]
    daemon = daemons(device, str(upstream.bare), {"one": stubborn, "two": stubborn}, stop=2.0)
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2
             and all(child["running"] for child in daemon.children().values()) and len(daemon.children()) == 2,
             "both children and their own children running", WAIT)

    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(WAIT)
    took = time.monotonic() - started
    # SIGKILLed, a process still has to be scheduled to die: wait (bounded) for that.
    grandchildren, deadline = [int(pid) for pid in pids.read_text().split()], time.monotonic() + WAIT
    while [pid for pid in grandchildren if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.02)
    survivors = [pid for pid in grandchildren if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)

    assert code == 0
    final = json.loads(daemon.status_path.read_text())
    assert final["stoppedAt"] and not any(child["running"] for child in final["children"].values())
    assert (round(took, 1) < 3.4, survivors) == (True, []), f"stopping took {took:.1f}s with --stop-timeout 2s"


def test_sigterm_reaches_the_children_while_a_fetch_hangs(tmp_path, device, daemons):
    """SIGTERM only sets a flag that the main loop reads between syncs. While a fetch hangs
    (FETCH_TIMEOUT_SECONDS = 300) the children get no SIGTERM and the daemon does not exit,
    so under systemd (TimeoutStopSec=90s) everything is SIGKILLed: the executor never drains
    its runs and no final status is written."""
    started, told = tmp_path / "child-pid", tmp_path / "child-got-sigterm"
    child = ["sh", "-c", f'echo $$ > {started}; trap "echo term > {told}; exit 0" TERM; '
                         'while :; do sleep 0.1; done']
    try:
        with stalled_remote() as url:
            daemon = daemons(device, url, {"worker": child}, stop=2.0)
            wait_for(lambda: started.exists() and "pid" in lock_holder(device),
                     "the child running and the first sync fetching", WAIT)

            daemon.process.send_signal(signal.SIGTERM)
            deadline, stopped = time.monotonic() + 6, False
            while time.monotonic() < deadline and not stopped:
                stopped = told.exists() and daemon.process.poll() is not None
                time.sleep(0.05)
            seen = (told.exists(), daemon.process.poll())
        daemon.process.wait(WAIT)  # the remote closed: the fetch fails, then the daemon stops
    finally:
        pid = int(started.read_text()) if started.exists() else None
        if pid and alive(pid):
            os.killpg(pid, signal.SIGKILL)

    assert stopped, f"6 s after SIGTERM: (child got SIGTERM, daemon exit code) = {seen}"


def test_a_child_that_exits_while_a_fetch_hangs_is_restarted_on_time(tmp_path, device, daemons):
    """docs: a child that exits "is started again after 1 s". The children were looked at
    between syncs only, so an executor that crashed while a fetch hung (up to
    FETCH_TIMEOUT_SECONDS = 300) stayed down until the fetch gave up, and every restart came
    up to a second late. Its restarts now follow its exits by the backoff, 1 s then 2 s,
    while the first sync is still fetching; daemon.json says so meanwhile."""
    starts = tmp_path / "starts"
    worker = ["sh", "-c", f"date +%s.%N >> {starts}; exit 3"]
    with stalled_remote() as url:
        daemon = daemons(device, url, {"worker": worker})
        wait_for(lambda: starts.exists() and len(starts.read_text().split()) >= 3, "three starts", WAIT)
        status = daemon.status()

    times = [float(value) for value in starts.read_text().split()]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert status["lastSync"] is None, "the first sync ended"
    assert 1.0 <= gaps[0] < 1.5 and 2.0 <= gaps[1] < 2.5, gaps
    assert status["children"]["worker"]["restarts"] >= 2
    assert status["children"]["worker"]["lastExit"]["code"] == 3


FIRST_SYNC = r'''
import json, sys, threading
from reconciler.agentd import Daemon, DaemonSettings
from reconciler.sync import SyncOptions
root, repo, worker = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
daemon = Daemon(root, SyncOptions(repo=repo), DaemonSettings(
    interval=60, jitter=0, drift_interval=60, stop_timeout=2, children=("worker",)))
daemon.children[0].argv = worker

def first_sync(sync=daemon._sync):
    sync()
    print(json.dumps({"outcome": daemon.last_sync["outcome"], "threads": threading.active_count(),
                      "parsed here": "ruamel.yaml" in sys.modules}), flush=True)
    daemon.stop()

daemon._sync = first_sync
daemon.run()
'''


def test_the_daemons_sync_parses_new_manifests_in_a_child_beside_the_supervisor(device, upstream):
    """The manifests a sync finds new are parsed in a forked child, off the daemon's path
    (pipeline._CachePrimer), which refuses to fork beside a thread that could hold a lock
    the child needs. The thread that watches the children runs throughout and declares that
    it holds none; without that, every daemon sync parsed in the daemon itself."""
    upstream.commit(site())
    done = subprocess.run([sys.executable, "-c", FIRST_SYNC, str(device.root), str(upstream.bare),
                           json.dumps(["sleep", "30"])],
                          cwd=REPO, env=direct(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"outcome": "applied", "threads": 2, "parsed here": False}, done.stderr


def test_a_failure_while_supervising_is_reported_and_the_children_are_still_started(device, upstream):
    """An error the supervisor thread does not expect (a bug) would end that thread alone:
    the daemon would go on syncing with nobody starting its children ever again. It is
    logged, and the children are looked at again a second later."""
    from reconciler.agentd import Daemon, DaemonSettings

    upstream.commit(site())
    logged = []
    daemon = Daemon(str(device.root), SyncOptions(repo=str(upstream.bare)), DaemonSettings(
        interval=60, jitter=0, drift_interval=60, stop_timeout=2, children=("worker",)), log=logged.append)
    worker, looks = daemon.children[0], []
    worker.argv = ["sleep", "30"]

    def check(now, real=worker.check):
        looks.append(now)
        if len(looks) == 1:
            raise RuntimeError("a bug")
        real(now)
        if worker.process is not None:  # started: the daemon stops (stop() would end this
            daemon.stopping.set()       # process's every git and lock wait, the tests' too)

    worker.check = check
    running = threading.Thread(target=daemon.run)  # not the main thread: no signal handlers
    running.start()
    running.join(WAIT)

    assert not running.is_alive(), "the daemon did not stop"
    assert "spos daemon: supervising the children failed: RuntimeError: a bug" in logged
    assert len(looks) == 2 and looks[1] - looks[0] >= 1.0, looks
    assert worker.started and worker.process.returncode == -signal.SIGTERM


def test_a_child_that_cannot_be_started_does_not_kill_the_daemon(device, upstream, daemons):
    """Starting a child opens its log file; when that fails (here the logs directory was
    removed; fork failing with EAGAIN or ENOMEM does the same) the OSError leaves the main
    loop and the daemon exits, taking its sync and drift repair with it."""
    upstream.commit(site())
    daemon = daemons(device, str(upstream.bare), {"worker": ["sh", "-c", "sleep 1; exit 3"]})
    wait_for(lambda: daemon.children().get("worker"), "the first cycle", WAIT)
    shutil.rmtree(device.path(f"{STATE}/logs"))

    wait_for(lambda: daemon.process.poll() is not None or daemon.children().get("worker", {}).get("restarts"),
             "the child's exit noticed", WAIT)
    time.sleep(2.5)  # the restart is due 1 s after the exit is noticed

    assert daemon.process.poll() is None, f"the daemon exited: {daemon.output()[-300:]}"
    assert daemon.children()["worker"]["restarts"] >= 1


# -- spos install ----------------------------------------------------------------------------------

@pytest.fixture
def root_dir(tmp_path) -> Path:
    root = tmp_path / "device"
    root.mkdir()
    return root


ODD_REPO = "/srv/git/fleet 100% $HOME \"main\" 'x';\\n/repo.git"
ODD = ("--repo", ODD_REPO, "--path", "agents 50%.d", "--policies", "$POLICIES %h",
       "--verify-signatures", "/etc/spos/k$ey ring's.gpg")


def systemd_words(line: str) -> list[str]:
    """ExecStart's command line as systemd splits it (systemd.syntax(7), systemd.service(5)):
    `%%` is `%` (any other specifier is refused here); words are split at unquoted
    whitespace; double and single quotes group; a backslash escapes C-style; then, in every
    word but the executable's path, `$$` is `$` (other `$` references are refused here)."""
    assert "%" not in line.replace("%%", ""), f"an unescaped specifier: {line}"
    line = line.replace("%%", "%")
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "s": " "}
    words, word, quote, index, started = [], "", None, 0, False
    while index < len(line):
        char = line[index]
        if char == "\\":
            word, index, started = word + escapes[line[index + 1]], index + 2, True
            continue
        if quote:
            if char == quote:
                quote = None
            else:
                word += char
        elif char in "\"'":
            quote, started = char, True
        elif char in " \t":
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + char, True
        index += 1
    assert quote is None, f"unbalanced quotes: {line}"
    if started:
        words.append(word)
    for position, text in enumerate(words[1:], 1):
        assert "$" not in text.replace("$$", ""), f"a variable reference in {text!r}"
        words[position] = text.replace("$$", "$")
    return words


def cron_command(line: str, fields: int) -> str:
    """The command of a /etc/cron.d line as cron hands it to the shell: after `fields`
    schedule fields and the user, up to the first unescaped `%` (the rest is its stdin), with
    `\\%` turned into `%`."""
    command = line.split(None, fields + 1)[fields + 1]
    out, index = "", 0
    while index < len(command):
        if command[index] == "\\" and command[index + 1:index + 2] == "%":
            out, index = out + "%", index + 2
        elif command[index] == "%":
            break
        else:
            out, index = out + command[index], index + 1
    return out


def test_odd_repository_urls_and_paths_reach_systemd_as_the_exact_argv(root_dir, spos, monkeypatch):
    """Spaces, `%`, `$`, quotes, `;` and a backslash in --repo, --path, --policies and the
    keyring: ExecStart splits back into exactly the daemon's argv, and the unit passes
    `systemd-analyze verify`."""
    monkeypatch.setenv("SPOS_COMMAND", f"{sys.executable} -m reconciler")
    done = spos("install", "--root", root_dir, "--systemd", *ODD)
    assert done.code == 0, done.err
    unit = root_dir / "etc/systemd/system/spos.service"
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    options = SyncOptions(repo=ODD_REPO, path="agents 50%.d", policies="$POLICIES %h",
                          keyring="/etc/spos/k$ey ring's.gpg")
    expected = install.daemon_argv((sys.executable, "-m", "reconciler"), str(root_dir), options, "60s", "10s")

    assert systemd_words(exec_start[len("ExecStart="):]) == expected
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_a_spos_installed_under_a_path_with_a_dollar_sign_is_found_by_systemd(tmp_path, root_dir, spos, monkeypatch):
    """_unit_word doubles every `$`, but systemd substitutes variables in the arguments only,
    never in the executable's path: for spos under `/opt/spos $1/`, the unit names
    `/opt/spos $$1/bin/spos`, which does not exist (verify: "is not executable")."""
    program = tmp_path / "opt/spos $1/bin/spos"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    monkeypatch.setenv("SPOS_COMMAND", shlex.join([str(program)]))
    assert spos("install", "--root", root_dir, "--systemd", "--repo", "https://git.example.net/fleet.git").code == 0
    unit = root_dir / "etc/systemd/system/spos.service"

    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60)

    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_odd_repository_urls_and_paths_reach_the_shell_as_the_exact_argv_from_cron(tmp_path, root_dir, spos, monkeypatch):
    """Each /etc/cron.d/spos entry, as cron hands it to /bin/sh (`\\%` is `%`, an unescaped
    `%` would end the command), runs exactly the daemon's and the sync's argv."""
    dump = tmp_path / "argv-dump"
    dump.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$ARGV_OUT"\n')
    dump.chmod(0o755)
    monkeypatch.setenv("SPOS_COMMAND", str(dump))
    assert spos("install", "--root", root_dir, "--cron", *ODD).code == 0
    entries = [line for line in (root_dir / "etc/cron.d/spos").read_text().splitlines()
               if line and not line.startswith("#") and "=" not in line.split()[0]]
    options = SyncOptions(repo=ODD_REPO, path="agents 50%.d", policies="$POLICIES %h",
                          keyring="/etc/spos/k$ey ring's.gpg")
    daemon = install.daemon_argv((str(dump),), str(root_dir), options, "60s", "10s")
    sync = [str(dump), "--root", str(root_dir), "sync", *daemon[4:daemon.index("--interval")],
            *daemon[daemon.index("--jitter") + 2:]]
    ran = []
    for entry, fields in zip(entries, (1, 5)):
        command = cron_command(entry, fields)
        command = command.rsplit(" >", 1)[0]  # the output goes to a log: not this test's business
        out = tmp_path / f"argv-{fields}"
        subprocess.run(["/bin/sh", "-c", command], env={"ARGV_OUT": str(out), "PATH": os.defpath},
                       check=True, timeout=30)
        ran.append([str(dump), *out.read_bytes().decode().split("\0")[:-1]])

    assert ran == [daemon, sync]


def test_install_keeps_the_device_labels_and_cgroup_root_it_was_given(root_dir, spos):
    """`spos install` takes the sync options, --device-labels and --cgroup-root among them,
    and drops those two: the daemon (and the cron fallback's sync) it installs plans with the
    device's labels file and facts instead of the labels the operator gave, and manages the
    agents' cgroups under ROOT/sys/fs/cgroup instead of where it was told."""
    labels = "role=edge,spos.dev/hostname=edge-1,spos.dev/arch=arm64"
    commands = []
    for way, path in (("--systemd", "etc/systemd/system/spos.service"), ("--cron", "etc/cron.d/spos")):
        done = spos("install", "--root", root_dir, way, "--repo", "https://git.example.net/fleet.git",
                    "--device-labels", labels, "--cgroup-root", "/sys/fs/cgroup/devices")
        assert done.code == 0, done.err
        commands += [line for line in (root_dir / path).read_text().splitlines() if "--repo" in line]

    assert len(commands) == 3
    missing = [line for line in commands
               if f"--device-labels {labels}" not in line or "--cgroup-root /sys/fs/cgroup/devices" not in line]
    assert missing == []


@pytest.mark.parametrize("way, path", [("--systemd", "etc/systemd/system/spos.service"), ("--cron", "etc/cron.d/spos")])
def test_a_repository_password_is_not_written_where_every_user_can_read_it(root_dir, spos, way, path):
    """The sync never shows the URL's password; install writes it into the unit or the cron
    file with mode 0644."""
    assert spos("install", "--root", root_dir, way, "--repo", "https://deploy:s3cret@git.example.net/fleet.git").code == 0
    written = root_dir / path
    mode = written.stat().st_mode & 0o777

    assert "s3cret" not in written.read_text() or mode & 0o077 == 0, f"{path} holds the password, mode {mode:o}"


@pytest.mark.parametrize("way, path", [("--systemd", "etc/systemd/system/spos.service"), ("--cron", "etc/cron.d/spos")])
def test_a_newline_in_an_install_option_cannot_add_lines_to_the_unit_or_crontab(root_dir, spos, way, path):
    """check_url refuses control characters in --repo, but --path, --policies, --root and the
    keyring reach the unit and the cron file unchecked: a newline there ends the ExecStart
    line or the cron entry and starts a new one (here a job running as root every minute)."""
    injected = "policies\n* * * * * root touch /tmp/spos-injected #"
    done = spos("install", "--root", root_dir, way, "--repo", "https://git.example.net/fleet.git",
                "--policies", injected)

    if done.code == 0:
        lines = (root_dir / path).read_text().splitlines()
        assert not any(line.startswith("* * * * * root touch") for line in lines), lines



# -- the locks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("lock", ["apply.lock", "daemon.lock"])
def test_a_lock_file_replaced_by_a_hard_link_is_refused_and_its_target_left_alone(tmp_path, device, upstream, lock):
    """The locks are opened with O_NOFOLLOW, which stops a symbolic link but not a hard link:
    taking the lock truncates the file and writes the holder into it, so a lock file that is
    a second name of another file (here one outside the state directory) would have that
    file's content replaced. The lock is refused, naming the path, and the file is kept."""
    upstream.commit(site())
    assert synced(device)["outcome"] == "applied"
    victim = tmp_path / "operator-file"
    victim.write_text("the operator's content\n")
    path = device.path(f"{STATE}/{lock}")
    path.unlink(missing_ok=True)
    os.link(victim, path)

    command = ["sync"] if lock == "apply.lock" else ["daemon", "--no-executor", "--no-triggers"]
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", *command, "--root", str(device.root), "--repo", str(upstream.bare)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:  # a daemon that took the lock runs on
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()

    assert victim.read_text() == "the operator's content\n"
    assert process.returncode == 1 and str(path) in err and "link" in err, err


def test_sighup_stops_the_daemon_as_sigterm_does_and_leaves_no_child_behind(tmp_path, device, upstream, daemons):
    """A hangup (the terminal the daemon was started from closing, `kill -HUP` meant as a
    reload) took the default action: the daemon died at once, its children, each in a
    session of its own, ran on without it, no final status was written, and a daemon
    started again found its executor's and trigger daemon's locks taken. SIGHUP stops it as
    SIGTERM does."""
    upstream.commit(site())
    started = tmp_path / "child-pid"
    child = ["sh", "-c", f'echo $$ > {started}; trap "exit 0" TERM; while :; do sleep 0.1; done']
    daemon = daemons(device, str(upstream.bare), {"worker": child}, stop=2.0)
    wait_for(lambda: started.exists() and daemon.children().get("worker", {}).get("running"),
             "the child running", WAIT)
    pid = int(started.read_text())

    daemon.process.send_signal(signal.SIGHUP)
    try:
        code = daemon.process.wait(WAIT)
        wait_for(lambda: not alive(pid), "the child's end", WAIT)
    finally:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)

    final = json.loads(daemon.status_path.read_text())
    assert code == 0 and final.get("stoppedAt"), (code, final)
