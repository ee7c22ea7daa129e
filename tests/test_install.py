"""`spos install` writes a unit or a cron fallback that starts `spos daemon`, and nothing else.

The unit is checked with `systemd-analyze verify` (any warning fails); the cron file with the
same parser spos uses for its own crontab lines. Activation (systemctl) only happens with
--root /, which these tests never use.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from waiting import wait_for

from reconciler.cronexpr import parse

REPO = "https://git.example.net/fleet/manifests.git"


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "device"
    root.mkdir()
    return root


def test_the_unit_runs_the_daemon_and_passes_systemd_analyze_verify(spos, root, monkeypatch):
    monkeypatch.setenv("SPOS_COMMAND", f"{sys.executable} -m reconciler")  # verify wants it to exist
    result = spos("install", "--root", root, "--repo", REPO, "--systemd", "--interval", "5m",
                  "--verify-signatures", "/etc/spos/trusted.gpg")
    assert result.code == 0, result.err
    unit = root / "etc/systemd/system/spos.service"
    text = unit.read_text()
    assert text.startswith("# spos:file install\n")
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"{sys.executable} -m reconciler --root {root} daemon --repo {REPO} --branch main "
                               "--path agents.d --policies policies --verify-signatures /etc/spos/trusted.gpg "
                               "--interval 5m --jitter 10s")
    assert "KillMode=mixed" in text and "Restart=on-failure" in text
    assert "Not activated" in result.out
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_the_cron_fallback_starts_the_daemon_at_boot_and_syncs_every_15_minutes(spos, root):
    assert spos("install", "--root", root, "--repo", REPO, "--cron").code == 0
    lines = [line for line in (root / "etc/cron.d/spos").read_text().splitlines()
             if line and not line.startswith("#") and "=" not in line.split()[0]]
    reboot, sync = lines
    assert reboot.startswith(f"@reboot root /usr/local/bin/spos --root {root} daemon --repo {REPO}")
    assert sync.startswith(f"*/15 * * * * root /usr/local/bin/spos --root {root} sync --repo {REPO}")
    parse(" ".join(sync.split()[:5]))  # a schedule cron reads
    assert not (root / "etc/systemd/system/spos.service").exists()


def test_install_is_idempotent_and_remove_takes_back_only_its_own_files(spos, root):
    assert spos("install", "--root", root, "--repo", REPO, "--cron").code == 0
    again = spos("install", "--root", root, "--repo", REPO, "--cron")
    assert again.code == 0 and "Nothing to do" in again.out
    operator = root / "etc/cron.d/backup"
    operator.write_text("0 3 * * * root /usr/local/bin/backup\n")
    removed = spos("install", "--root", root, "--repo", REPO, "--cron", "--remove")
    assert removed.code == 0 and "Removing /etc/cron.d/spos" in removed.out
    assert not (root / "etc/cron.d/spos").exists() and operator.exists()


def test_a_file_spos_did_not_write_is_never_overwritten(spos, root):
    unit = root / "etc/systemd/system/spos.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/opt/own/spos-wrapper\n")
    result = spos("install", "--root", root, "--repo", REPO, "--systemd")
    assert result.code == 1 and "is not spos's" in result.err
    assert unit.read_text() == "[Service]\nExecStart=/opt/own/spos-wrapper\n"


def test_dry_run_shows_the_files_and_writes_nothing(spos, root):
    result = spos("install", "--root", root, "--repo", REPO, "--systemd", "--dry-run")
    assert result.code == 0 and "Would write /etc/systemd/system/spos.service:" in result.out
    assert not (root / "etc").exists()


def test_a_bad_repository_url_is_refused_before_anything_is_written(spos, root):
    result = spos("install", "--root", root, "--repo", "ext::sh -c touch% /tmp/x", "--cron")
    assert result.code == 1 and not (root / "etc").exists()


def test_what_the_service_could_not_use_is_refused_before_anything_is_written(spos, root):
    for args, said in ((("--interval", "0s"), "--interval: give at least 1s"),
                       (("--verify-signatures", "keys.gpg"), "give the keyring's absolute path"),
                       (("--cgroup-root", "cg"), "--cgroup-root: give an absolute path")):
        result = spos("install", "--root", root, "--repo", REPO, "--cron", *args)
        assert result.code == 1 and said in result.err, (args, result.err)
    assert not (root / "etc").exists()


@pytest.mark.parametrize("way, path", [("--cron", "etc/cron.d/spos"),
                                       ("--systemd", "etc/systemd/system/spos.service")])
def test_a_secret_in_the_repository_url_goes_into_a_root_only_file_and_no_command_line(
        spos, root, way, path):
    """The unit's ExecStart and the crontab lines become command lines any local user can
    read (/proc/PID/cmdline; `systemctl show` gives the unit's to anyone): they name the
    root-only repository file instead of the URL, and the screen shows the URL redacted."""
    secret = "https://user:s3cret-token@git.example.net/fleet/manifests.git"
    result = spos("install", "--root", root, "--repo", secret, way)
    assert result.code == 0 and "s3cret-token" not in result.out + result.err
    assert "https://***@git.example.net/fleet/manifests.git" in result.out
    repository = root / "etc/spos/repository"
    assert repository.stat().st_mode & 0o777 == 0o600
    assert [line for line in repository.read_text().splitlines()
            if not line.startswith("#")] == [secret]
    written = (root / path).read_text()
    assert "s3cret-token" not in written and (root / path).stat().st_mode & 0o777 == 0o644
    commands = [line for line in written.splitlines() if not line.startswith("#")
                and (" daemon " in line or " sync " in line)]
    assert commands and all(f"--repo-file {repository} " in line for line in commands), commands

    assert spos("install", "--root", root, "--repo", REPO, way).code == 0
    assert not repository.exists()  # a URL without a secret goes back into the command line
    assert spos("install", "--root", root, "--repo", secret, way).code == 0
    assert spos("install", "--root", root, "--remove").code == 0
    assert not repository.exists() and not (root / path).exists()


def test_install_leaves_a_repository_file_the_operator_wrote_in_its_place(spos, root):
    """An operator who put the URL into /etc/spos/repository themselves (no marker) gives
    install that file: install names it and leaves it as it is."""
    own = root / "etc/spos/repository"
    own.parent.mkdir(parents=True)
    own.write_text("https://user:s3cret-token@git.example.net/fleet.git\n")
    own.chmod(0o600)
    result = spos("install", "--root", root, "--repo-file", own, "--cron")
    assert result.code == 0, result.err
    assert own.read_text() == "https://user:s3cret-token@git.example.net/fleet.git\n"
    assert f"--repo-file {own} " in (root / "etc/cron.d/spos").read_text()
    assert spos("install", "--root", root, "--remove").code == 0
    assert own.exists()  # not spos's: --remove leaves it


def test_install_again_from_the_repository_file_it_wrote_keeps_it(spos, root):
    secret = "https://user:s3cret-token@git.example.net/fleet.git"
    assert spos("install", "--root", root, "--repo", secret, "--cron").code == 0
    written = root / "etc/spos/repository"
    before = written.read_text()
    again = spos("install", "--root", root, "--repo-file", written, "--cron", "--interval", "5m")
    assert again.code == 0, again.err
    assert written.read_text() == before and written.stat().st_mode & 0o777 == 0o600
    assert f"--repo-file {written} " in (root / "etc/cron.d/spos").read_text()


def test_install_takes_the_url_from_a_repository_file_too(spos, root, tmp_path):
    given = tmp_path / "repository"
    given.write_text("# the fleet's manifests\nhttps://user:s3cret-token@git.example.net/fleet.git\n")
    given.chmod(0o600)
    result = spos("install", "--root", root, "--repo-file", given, "--cron")
    assert result.code == 0, result.err
    assert "s3cret-token" in (root / "etc/spos/repository").read_text()
    assert "s3cret-token" not in (root / "etc/cron.d/spos").read_text() + result.out


def _start_daemon(argv: list[str], root) -> subprocess.Popen:
    daemon = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    lock = root / "var/lib/systemprompt-os/daemon.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(daemon.pid),
             "the daemon to take its lock", 30)
    return daemon


def _ended(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait()


@pytest.mark.root
def test_remove_in_cron_mode_stops_the_daemon_the_crontab_started(spos, root, tmp_path, monkeypatch):
    """systemd's `disable --now` stops the service; without systemd, the daemon `@reboot`
    started would run on until the next boot. --remove stops that one (SIGTERM)."""
    monkeypatch.setenv("SPOS_COMMAND", f"{sys.executable} -m reconciler")
    assert spos("install", "--root", root, "--repo", tmp_path / "fleet.git", "--cron").code == 0
    reboot = next(line for line in (root / "etc/cron.d/spos").read_text().splitlines()
                  if line.startswith("@reboot "))
    argv = shlex.split(reboot.removeprefix("@reboot root ").removesuffix(
        " >>/var/log/spos-daemon.log 2>&1"))
    daemon = _start_daemon(argv, root)
    try:
        removed = spos("install", "--root", root, "--remove")
        assert removed.code == 0 and f"Stopped spos daemon (pid {daemon.pid})." in removed.out, removed
        assert daemon.wait(timeout=30) == 0
        assert not (root / "etc/cron.d/spos").exists()
    finally:
        _ended(daemon)


@pytest.mark.root
def test_remove_in_cron_mode_leaves_a_daemon_started_another_way_and_says_so(spos, root, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("SPOS_COMMAND", f"{sys.executable} -m reconciler")
    assert spos("install", "--root", root, "--repo", tmp_path / "fleet.git", "--cron").code == 0
    daemon = _start_daemon([sys.executable, "-m", "reconciler", "--root", str(root), "daemon",
                            "--repo", str(tmp_path / "fleet.git"), "--no-executor",
                            "--no-triggers"], root)
    try:
        removed = spos("install", "--root", root, "--remove")
        assert removed.code == 0, removed
        assert f"spos daemon (pid {daemon.pid}) still runs: the crontab did not start it" in removed.out
        time.sleep(0.3)
        assert daemon.poll() is None
    finally:
        _ended(daemon)


def test_remove_needs_no_repository_and_leaves_a_file_that_is_not_spos_s(spos, root):
    assert spos("install", "--root", root, "--repo", REPO, "--cron").code == 0
    admin_unit = root / "etc/systemd/system/spos.service"
    admin_unit.parent.mkdir(parents=True)
    admin_unit.write_text("[Service]\nExecStart=/usr/local/bin/our-own-spos\n")
    removed = spos("install", "--root", root, "--remove")
    assert removed.code == 0 and "Removing /etc/cron.d/spos" in removed.out, removed.err
    assert not (root / "etc/cron.d/spos").exists()
    assert admin_unit.read_text() == "[Service]\nExecStart=/usr/local/bin/our-own-spos\n"
    again = spos("install", "--root", root, "--remove")
    assert again.code == 0 and "Nothing to remove" in again.out
    missing = spos("install", "--root", root, "--cron")
    assert missing.code == 1 and "--repo: give the manifests repository" in missing.err


def test_remove_leaves_no_directory_install_made_and_keeps_one_the_operator_uses(spos, root):
    """Installing with a password in the URL makes /etc/spos for the repository file;
    --remove deleted the file and left the directory. It goes too when nothing else is in
    it; one that holds a file of the operator's stays."""
    secret = "https://user:s3cret-token@git.example.net/fleet.git"
    assert spos("install", "--root", root, "--repo", secret, "--cron").code == 0
    assert spos("install", "--root", root, "--remove").code == 0
    assert not (root / "etc/spos").exists()

    assert spos("install", "--root", root, "--repo", secret, "--cron").code == 0
    own = root / "etc/spos/fleet.url"
    own.write_text(secret + "\n")
    assert spos("install", "--root", root, "--remove").code == 0
    assert own.read_text() == secret + "\n" and not (root / "etc/spos/repository").exists()


def _lock_holder(root) -> int | None:
    text = (root / "var/lib/systemprompt-os/daemon.lock").read_text().strip()
    return int(text) if text.isdigit() else None


@pytest.mark.root
def test_install_again_with_other_options_in_cron_mode_restarts_the_daemon_with_them(spos, root, tmp_path,
                                                                                    monkeypatch):
    """systemd restarts the service when install changes the unit. In cron mode the daemon
    the old `@reboot` line started ran on with the old options (another repository, say)
    until the next boot, while the sync every 15 minutes used the new ones: install stops it
    and starts the new line's daemon."""
    monkeypatch.setenv("SPOS_COMMAND", f"{sys.executable} -m reconciler")
    assert spos("install", "--root", root, "--repo", tmp_path / "old.git", "--cron").code == 0
    reboot = next(line for line in (root / "etc/cron.d/spos").read_text().splitlines()
                  if line.startswith("@reboot "))
    old = _start_daemon(shlex.split(reboot.removeprefix("@reboot root ").removesuffix(
        " >>/var/log/spos-daemon.log 2>&1")), root)
    new = None
    try:
        again = spos("install", "--root", root, "--repo", tmp_path / "new.git", "--cron")
        assert again.code == 0, again.err
        assert old.wait(timeout=30) == 0
        new = wait_for(lambda: _lock_holder(root) not in (None, old.pid) and _lock_holder(root),
                       "a new daemon holding the lock", 30)
        with open(f"/proc/{new}/cmdline", "rb") as handle:
            command = handle.read().split(b"\0")
        assert os.fsencode(tmp_path / "new.git") in command, command
        assert f"(pid {new})" in again.out, again.out
    finally:
        _ended(old)
        if new:  # SIGTERM: it stops its executor and trigger daemon too
            os.kill(new, signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{new}/cmdline")
                     or not open(f"/proc/{new}/cmdline", "rb").read(), "the new daemon's end", 60)
