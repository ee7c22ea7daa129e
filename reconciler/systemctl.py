"""The systemd programs spos runs: `systemctl`, to activate the units it writes, and
`systemd-analyze calendar`, to check calendar events when manifests are validated.

Activation is only for a device whose init system is systemd, and only when spos manages that
device itself (`--root /`): `detect` says whether that is so, the way systemd's own tools do
(`/run/systemd/system` exists). A unit written under any other root, or on a machine without a
running systemd (a container, a build host), is written and not activated.

Everything here runs processes; the pure core never imports it, and resource kinds reach
`Systemctl` only through the `Device` they are handed.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from reconciler.errors import SposError

RUNNING_MARKER = "/run/systemd/system"
"""Exists exactly when systemd is the running init system (sd_booted(3))."""

SYSTEMCTL_TIMEOUT_SECONDS = 120.0
CALENDAR_TIMEOUT_SECONDS = 30.0


class SystemctlError(SposError):
    """A systemctl command failed; the next apply tries again."""

    retryable = True


class CalendarsUnchecked(SposError):
    """Calendar events could not be checked here (systemd-analyze is missing or misbehaved)."""


class Systemctl:
    """Runs `systemctl` against the system manager. Commands fail loudly: activation that did
    not happen is reported, so the change is not recorded as applied."""

    def __init__(self, command: tuple[str, ...] = ("systemctl",),
                 timeout: float = SYSTEMCTL_TIMEOUT_SECONDS):
        self.command, self.timeout = command, timeout

    def __repr__(self) -> str:
        return f"Systemctl({' '.join(self.command)!r})"

    def run(self, *arguments: str) -> None:
        argv = [*self.command, *arguments]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self.timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SystemctlError(f"{' '.join(argv)}: {exc}") from None
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
            raise SystemctlError(f"{' '.join(argv)}: {why}")


def detect(root: str | os.PathLike) -> Systemctl | None:
    """The systemd of the device at `root`, when spos may activate units there: root is `/` and
    systemd is the running init system. None otherwise."""
    if os.path.realpath(root) != "/" or not os.path.isdir(RUNNING_MARKER):
        return None
    return Systemctl()


def check_calendars(expressions: list[str]) -> dict[str, str]:
    """Each of `expressions` (systemd.time(7) calendar events) that systemd cannot use -> why,
    from one `systemd-analyze calendar` run. Raises CalendarsUnchecked when that cannot run.

    An event that parses but matches no date at all (`*-02-30`) is refused too. It is judged
    from the Unix epoch, so the answer does not depend on today's date: a date that has passed
    is accepted, as it was when first validated.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise CalendarsUnchecked("systemd-analyze is not installed")
    unique = list(dict.fromkeys(expressions))
    if not unique:
        return {}
    try:
        done = subprocess.run(
            [analyze, "calendar", "--base-time=@0", "--", *unique],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=CALENDAR_TIMEOUT_SECONDS, env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CalendarsUnchecked(f"systemd-analyze calendar failed: {exc}") from None
    refused = {expression: "systemd cannot parse it" for expression in unique
               if f"specification '{expression}':" in done.stderr}
    parsed = [expression for expression in unique if expression not in refused]
    elapses = [line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
               if line.strip().startswith("Next elapse:")]
    if len(elapses) != len(parsed):  # do not guess which event a line describes
        raise CalendarsUnchecked(
            f"systemd-analyze calendar answered in an unexpected form: {done.stderr.strip()!r}")
    for expression, elapse in zip(parsed, elapses):
        if elapse == "never":
            refused[expression] = "it never elapses: no date matches it"
    return refused
