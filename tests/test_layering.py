"""The layering written down in .importlinter holds, and the command cron runs stays light.

`lint-imports` checks the contracts on this checkout. Each contract is also shown to bite: a
copy of the package gets one forbidden import and `lint-imports --contract <id>` must fail, so
a contract that silently stopped matching anything (a renamed module, an optional layer that
never appears, a lost `include_external_packages`) is noticed here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = REPO / ".importlinter"

PROBE_MANIFEST = """\
apiVersion: spos/v1
kind: Agent
metadata:
  name: light-probe
spec:
  tasks:
    tick:
      command: ["/bin/true"]
"""
# Every third-party package spos depends on: `spos action run` runs every minute from cron
# and must start on the standard library and the device layer alone.
HEAVY_PACKAGES = {
    "jsonschema", "referencing", "ruamel", "deepdiff", "croniter", "crontab", "git", "psutil",
    "cgroupspy", "serial", "paho", "prometheus_client",
}


def _lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    installed = Path(sys.executable).parent / "lint-imports"
    command = str(installed) if installed.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is not installed (pip install -e '.[test]')"
    return subprocess.run(
        [command, "--no-cache", "--no-logo", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_import_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"\n{line}\n")


BITES = {
    "the pure core imports the standard library's I/O": (
        "pure-core", {"render.py": "import subprocess"}),
    "the pure core reaches the device through a kind": (
        "pure-core", {"kinds/cron.py": "from reconciler.state import read_inventory"}),
    "a kind imports Device at run time": (
        "kinds-are-handed-the-device", {"kinds/agent.py": "from reconciler.device import Device"}),
    "a lower module imports the CLI": (
        "cli-on-top", {"executor/enqueue.py": "from reconciler.cli import main"}),
    "the device layer imports a process above it": (
        "one-direction-of-flow", {"device.py": "from reconciler import observe"}),
    "an executor module imports the planner through a helper": (
        "executor-apart", {"executor.py": "from reconciler import shortcut",
                           "shortcut.py": "from reconciler.plan import plan"}),
    "an executor package imports the applier": (
        "executor-apart", {"executor/__init__.py": "", "executor/runner.py": "import reconciler.apply"}),
}


@pytest.mark.parametrize("contract, edits", BITES.values(), ids=BITES.keys())
def test_each_contract_bites(tmp_path, contract, edits):
    shutil.copytree(REPO / "reconciler", tmp_path / "reconciler",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CONTRACTS, tmp_path / ".importlinter")
    for relative, line in edits.items():
        _append(tmp_path / "reconciler" / relative, line)
    result = _lint_imports(tmp_path, "--contract", contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout


def _applied_probe(tmp_path: Path, spos) -> Path:
    """A device root with the light probe agent applied."""
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    (manifests / "light-probe.yaml").write_text(PROBE_MANIFEST)
    root = tmp_path / "device"
    assert spos("apply", manifests, "--root", root, "--auto-approve").code == 0
    return root


@pytest.mark.parametrize("extra", [
    [],
    ["--deadline", "4m", "--cron", "*/1 * * * *", "--cron-tz", "Europe/Berlin", "--priority", "70"],
], ids=["plain", "deadline-and-time-zone"])
def test_action_run_imports_no_third_party_package(tmp_path, spos, extra):
    """What cron runs every minute, run the way cron runs it (`python -m reconciler`)."""
    root = _applied_probe(tmp_path, spos)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reconciler", "--root", str(root),
         "action", "run", "--agent", "light-probe", "--task", "tick", *extra],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert list((root / "var/lib/systemprompt-os/agents/light-probe/queue").glob("*.json"))
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "reconciler" in imported
    assert imported & HEAVY_PACKAGES == set()


# What a rendered crontab line's enqueue leaves out of the standard library: `json` imports
# `re`, which imports `enum`, `functools` and `collections`; with `datetime` they would take
# the start-up of `python3 -I -S _cron.py action run` from about 30 ms to about 55 ms.
SLOW_STDLIB = {"json", "re", "enum", "datetime", "functools", "collections", "typing"}


def test_the_crontab_line_enqueues_without_the_slow_standard_library(tmp_path, spos):
    """The line cron runs every minute, exactly as spos renders it (lean entry point, -I -S, a
    deadline): it parses, reads the agent config and writes the queue record without them."""
    root = _applied_probe(tmp_path, spos)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(REPO / "reconciler" / "_cron.py"),
         "--root", str(root), "action", "run", "--agent", "light-probe", "--task", "tick",
         "--schedule", "light-probe-every-minute", "--deadline", "10m"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    queued = list((root / "var/lib/systemprompt-os/agents/light-probe/queue").glob("*.json"))
    assert len(queued) == 1
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "reconciler.executor.enqueue" in imported
    assert imported & SLOW_STDLIB == set()
