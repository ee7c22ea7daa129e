"""Shared fixtures: a fresh device root per test, the example manifests, and `spos` run in-process."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.cli import main

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
def device_root(tmp_path) -> Path:
    root = tmp_path / "device"
    root.mkdir()
    return root


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
