"""`spos install`: run `spos daemon` at boot, as a systemd service or from cron.

- systemd (the default where systemd is the init system): `/etc/systemd/system/spos.service`
  runs `spos daemon` with the given repository and intervals, restarts it when it fails, and
  stops it with SIGTERM first (the daemon stops its executor, which drains its runs).
- cron (`--cron`, for devices without systemd): `/etc/cron.d/spos` starts the daemon at boot
  (`@reboot`) and runs `spos sync` every 15 minutes, so a device whose daemon died still
  converges; the apply lock keeps the two from applying at once.

A repository URL that carries a password or token goes into `/etc/spos/repository`, readable
by root alone, and the unit or crontab line reads it from there (`--repo-file`): no command line,
which every local user can see in /proc, and no unit property, which `systemctl show` gives to
anyone, holds it.

These files carry spos's marker and are spos's own: install rewrites them (and, for cron,
restarts with the new options the daemon the old crontab started: `restart_cron_daemon`),
`--remove` deletes them (and stops the daemon they started: `stop_cron_daemon` for cron), and
neither touches a file without the marker. Where systemd runs and the root is `/`,
the service is enabled and started (or restarted) after a daemon-reload.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass

from reconciler.device import Device
from reconciler.errors import SposError
from reconciler.gitsync import carries_credentials
from reconciler.sync import SyncOptions

UNIT_PATH = "/etc/systemd/system/spos.service"
CRON_PATH = "/etc/cron.d/spos"
REPO_PATH = "/etc/spos/repository"
MARKER = "# spos:file install"
DAEMON_LOG = "/var/log/spos-daemon.log"
STOP_SECONDS = 90.0
"""How long `--remove` waits for the daemon cron started to stop (systemd's TimeoutStopSec)."""
PATHS = (UNIT_PATH, CRON_PATH, REPO_PATH)


class InstallError(SposError):
    """The files cannot be installed as asked; nothing was changed."""


@dataclass
class Installation:
    """What `install` would write (path -> content) and delete."""

    write: dict[str, str]
    delete: list[str]


def daemon_argv(command: tuple[str, ...], root: str, options: SyncOptions, interval: str,
                jitter: str) -> list[str]:
    return [*_spos(command, root, "daemon", options), "--interval", interval, "--jitter", jitter]


def repository_file(options: SyncOptions) -> str | None:
    """The text of REPO_PATH when the URL carries a password or token, else None."""
    if not carries_credentials(options.repo):
        return None
    return (f"{MARKER}\n# The manifests repository of spos daemon and spos sync; it holds a "
            f"password or token, so root alone may read this file.\n{options.repo}\n")


def _spos(command: tuple[str, ...], root: str, subcommand: str, options: SyncOptions) -> list[str]:
    """`spos [--root R] SUBCOMMAND` with the sync options (the URL from REPO_PATH when it
    carries a password or token)."""
    rooted = root not in ("", "/")
    source = (["--repo-file", posixpath.join(root if rooted else "/", REPO_PATH.lstrip("/"))]
              if carries_credentials(options.repo) else ["--repo", options.repo])
    argv = [*command, *(["--root", root] if rooted else []), subcommand, *source,
            "--branch", options.branch, "--path", options.path, "--policies", options.policies]
    if options.keyring:
        argv += ["--verify-signatures", options.keyring]
    if options.allow_force:
        argv.append("--allow-force-push")
    if options.device_labels is not None:
        argv += ["--device-labels", options.device_labels]
    if options.cgroup_root:
        argv += ["--cgroup-root", options.cgroup_root]
    for word in argv:
        if any(ord(c) < 32 or ord(c) == 127 for c in word):
            raise InstallError(f"{word!r} holds a control character: it cannot go into a unit "
                               "or a crontab line")
    return argv


def unit(argv: list[str]) -> str:
    """The service unit. ExecStart is quoted per systemd.syntax(7); `%` and `$` are escaped."""
    # systemd expands no variables in the program's path, so its `$` stays as it is
    command = " ".join([_unit_word(argv[0], program=True), *(_unit_word(word) for word in argv[1:])])
    return "\n".join([
        MARKER,
        "[Unit]",
        "Description=spos: keep this device converged to its manifests repository",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={command}",
        "Restart=on-failure",
        "RestartSec=10s",
        "KillMode=mixed",
        "TimeoutStopSec=90s",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def crontab(argv: list[str], command: tuple[str, ...], root: str, options: SyncOptions) -> str:
    """The cron fallback: the daemon at boot, and a sync every 15 minutes in case it died."""
    sync = _spos(command, root, "sync", options)
    log = DAEMON_LOG
    return "\n".join([
        MARKER,
        "# spos daemon at boot; a sync every 15 minutes in case the daemon is not running.",
        "SHELL=/bin/sh",
        f"@reboot root {_cron_words(argv)} >>{log} 2>&1",
        f"*/15 * * * * root {_cron_words(sync)} >/dev/null 2>&1",
        "",
    ])


def plan_install(device: Device, argv: list[str], cron_text: str | None, unit_text: str | None,
                 remove: bool, repo_text: str | None = None) -> Installation:
    """What to write and delete; refuses to touch a file without the marker."""
    wanted = {} if remove else {path: text for path, text in (
        (UNIT_PATH, unit_text), (CRON_PATH, cron_text), (REPO_PATH, repo_text)) if text}
    for path in PATHS:
        current = device.read_text(path)
        if current is not None and not current.startswith(MARKER) and path in wanted:
            raise InstallError(f"{path} exists and is not spos's (no '{MARKER}' first line): "
                               "move it away first")  # removing, it is simply not spos's to remove
    delete = [path for path in PATHS
              if path not in wanted and (device.read_text(path) or "").startswith(MARKER)]
    write = {path: text for path, text in wanted.items() if device.read_text(path) != text}
    return Installation(write, delete)


def carry_out(device: Device, installation: Installation) -> None:
    """Write and delete as planned: REPO_PATH readable by root alone, the others by all; with
    REPO_PATH goes its directory when nothing else is in it."""
    for path, text in installation.write.items():
        device.makedirs(path.rsplit("/", 1)[0], mode=0o755)
        device.write_atomic(path, text.encode(), mode=0o600 if path == REPO_PATH else 0o644)
    for path in installation.delete:
        device.remove(path)
        if path == REPO_PATH:  # the directory install made for it, unless something else is in it
            device.rmdir_if_empty(posixpath.dirname(REPO_PATH))


def _unit_word(word: str, program: bool = False) -> str:
    escaped = word.replace("%", "%%")
    if not program:
        escaped = escaped.replace("$", "$$")
    if escaped and all(c.isalnum() or c in "/._-:=,+@" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stop_cron_daemon(device: Device, crontab_text: str, lock_path: str,
                     wait: float = STOP_SECONDS) -> str | None:
    """After the crontab was removed: stop the `spos daemon` its `@reboot` line started, which
    would otherwise run until the next boot. Only that one: the process holding the device's
    daemon lock whose command line is the line's (a daemon started some other way is named,
    and left alone). SIGTERM, as systemd stops the service, then wait for it to let go of the
    lock. Returns what happened, for the screen; None when no daemon runs."""
    wanted = _reboot_argv(crontab_text)
    try:
        fd = os.open(device.host(lock_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _lock_is_free(fd):
            return None
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if not holder.isdigit():
            return f"A spos daemon still serves {device.root}, its pid unknown: stop it yourself."
        pid = int(holder)
        running = _command_line(pid)
        if wanted is None or running is None or not _same_command(running, wanted):
            return (f"spos daemon (pid {pid}) still runs: the crontab did not start it as it is "
                    "(another command line); stop it yourself.")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _lock_is_free(fd):
                return f"Stopped spos daemon (pid {pid})."
            time.sleep(0.1)
        return f"spos daemon (pid {pid}) was told to stop and has not within {wait:.0f} s."
    except ProcessLookupError:
        return None  # it ended meanwhile
    finally:
        os.close(fd)


def restart_cron_daemon(device: Device, before: str, after: str, lock_path: str,
                        wait: float = STOP_SECONDS) -> str | None:
    """After the crontab was rewritten with other options: the daemon the old `@reboot` line
    started would run on with the old ones (another repository, say) until the next boot,
    while the sync every 15 minutes uses the new ones. Stop it (as `stop_cron_daemon`) and
    start the new line's daemon, as cron would at boot. Returns what happened, for the
    screen; None when no daemon runs (the new line starts one at boot)."""
    wanted = _reboot_argv(after)
    if wanted is None or _reboot_argv(before) == wanted:
        return None
    stopped = stop_cron_daemon(device, before, lock_path, wait)
    if stopped is None or not stopped.startswith("Stopped"):
        return stopped
    device.makedirs(posixpath.dirname(DAEMON_LOG), mode=0o755)
    try:
        with open(device.host(DAEMON_LOG), "ab") as log:
            started = subprocess.Popen(wanted, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
    except OSError as exc:
        return f"{stopped} Could not start it with the new options ({exc.strerror or exc}): " \
               "the next boot does, and the sync every 15 minutes converges meanwhile."
    return f"{stopped} Started it with the new options (pid {started.pid})."


def _reboot_argv(crontab_text: str) -> list[str] | None:
    for line in crontab_text.splitlines():
        if line.startswith("@reboot root ") and line.endswith(f" >>{DAEMON_LOG} 2>&1"):
            command = line.removeprefix("@reboot root ").removesuffix(f" >>{DAEMON_LOG} 2>&1")
            try:
                return shlex.split(command.replace("\\%", "%"))
            except ValueError:
                return None
    return None


def _lock_is_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _command_line(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return None
    return [os.fsdecode(word) for word in raw.split(b"\0")[:-1]]


def _same_command(running: list[str], wanted: list[str]) -> bool:
    """`running` is `wanted` as started: exactly, or with the interpreter in front that a
    script's `#!` line puts there."""
    return running == wanted or (len(running) == len(wanted) + 1 and running[1:] == wanted)


def _cron_words(argv: list[str]) -> str:
    return shlex.join(argv).replace("%", "\\%")
