"""Shared fixtures: a fresh device root per test, the example manifests, `spos` run in-process,
and a stand-in for systemctl."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxes import remove_cgroups_of

from reconciler.cli import main
from reconciler.systemctl import SystemctlError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "agents.d"
POLICIES = REPO / "policies"
SPOS_COMMAND = "/usr/local/bin/spos"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _pinned_spos_command(monkeypatch):
    """Rendered crontab lines name the spos executable; pin it so output does not depend on
    where this checkout is installed."""
    monkeypatch.setenv("SPOS_COMMAND", SPOS_COMMAND)


@pytest.fixture
def device_root(tmp_path):
    """A fresh device root. Afterwards, the cgroups spos made for it (its own parent, as for
    any root but `/`, with the agents' and runs' below) are removed, so that tests leave no
    cgroups on the machine; one that still holds a process stays."""
    root = tmp_path / "device"
    root.mkdir()
    yield root
    remove_cgroups_of(root)


@pytest.fixture
def manifests(tmp_path) -> Path:
    """A writable copy of the example manifests and policies (agents.d/ and policies/ side by side)."""
    project = tmp_path / "project"
    shutil.copytree(EXAMPLES, project / "agents.d")
    shutil.copytree(POLICIES, project / "policies")
    return project / "agents.d"


@pytest.fixture
def spos(capsys):
    """Run the CLI in-process: `spos("plan", dir, "--root", root)` -> Result(code, out, err)."""

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


class RecordingSystemctl:
    """Stands in for systemctl on a device root: records each command; `enable --now` and
    `disable --now` link and unlink the timer in timers.target.wants as systemctl does. A
    command naming a unit whose file is gone fails, as systemctl would: spos must stop a timer
    before it deletes the file."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def run(self, *arguments: str) -> None:
        self.calls.append(list(arguments))
        if arguments[0] == "daemon-reload":
            return
        unit = arguments[-1]
        units = self.root / "etc/systemd/system"
        if not (units / unit).is_file():
            raise SystemctlError(f"systemctl {' '.join(arguments)}: Unit file {unit} does not exist.")
        link = units / "timers.target.wants" / unit
        if arguments[0] == "enable" and not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f"../{unit}")  # systemctl links by absolute path; this root is not /
        elif arguments[0] == "disable" and os.path.lexists(link):
            link.unlink()


@pytest.fixture
def recording_systemctl():
    """`recording_systemctl(root)`: a RecordingSystemctl for the device at `root`, to hand to a
    Device as its systemd."""
    return RecordingSystemctl
