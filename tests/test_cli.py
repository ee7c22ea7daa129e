"""The command line's own habits: --root anywhere, usage errors, closed pipes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

from reconciler.cli import _parser


def test_root_is_kept_wherever_it_is_given():
    parse = _parser().parse_args
    run = ["action", "run", "--agent", "a", "--task", "t"]
    assert parse(["--root", "/r", *run]).root == "/r"
    assert parse(["action", "--root", "/r", *run[1:]]).root == "/r"
    assert parse([*run, "--root", "/r"]).root == "/r"
    assert parse(["plan", "--root", "/r"]).root == "/r"


def test_no_command_prints_usage_and_fails(spos):
    result = spos()
    assert result.code == 1
    assert "usage: spos" in result.err


def test_a_closed_pipe_ends_quietly(manifests, device_root):
    """`spos plan --json | head -1` must not end in a traceback."""
    for number in range(60):  # enough plan to overflow the pipe's buffer
        (manifests / f"extra-{number}.yaml").write_text(
            f"apiVersion: spos/v1\nkind: Agent\nmetadata: {{name: extra-{number}}}\n"
            "spec: {capability: monitor, quota: small, tasks: {ping: {command: [/bin/true]}}}\n"
        )
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "plan", str(manifests), "--root", str(device_root), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=30)
    assert "Traceback" not in stderr
    assert "Broken pipe" not in stderr


def test_a_bad_lock_timeout_is_a_usage_error(spos, manifests, device_root):
    result = spos("apply", manifests, "--root", device_root, "--auto-approve", "--lock-timeout", "soon")
    assert result.code == 1
    assert "--lock-timeout" in result.err and "not a duration" in result.err


def test_permission_problems_are_one_line_not_a_traceback(spos, manifests, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = spos("apply", manifests, "--root", blocker / "root", "--auto-approve")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1].startswith("spos: error:")


def test_the_lean_cron_entry_point_enqueues_and_falls_back_for_anything_else(spos, manifests, device_root):
    """Crontab lines run reconciler/_cron.py with -I -S: it must enqueue exactly like
    `spos action run`, and hand any other command to the full command line."""
    from pathlib import Path

    import reconciler

    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    entry = str(Path(reconciler.__file__).parent / "_cron.py")

    def lean(*args):
        return subprocess.run([sys.executable, "-I", "-S", entry, *args],
                              capture_output=True, text=True, timeout=30)

    queued = lean("--root", str(device_root), "action", "run", "--quiet", "--agent", "monitor-001",
                  "--task", "health_check", "--schedule", "monitor-001-health", "--deadline", "4m")
    assert (queued.returncode, queued.stdout, queued.stderr) == (0, "", "")
    queue = device_root / "var/lib/systemprompt-os/agents/monitor-001/queue"
    [record] = [path.read_text() for path in queue.iterdir()]
    assert '"name": "monitor-001-health"' in record and '"notAfter": "' in record

    unknown = lean("--root", str(device_root), "action", "run", "--agent", "nope", "--task", "x")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("spos: error: agent 'nope' is not applied")

    listed = lean("--root", str(device_root), "action", "list", "--json")
    assert listed.returncode == 0 and '"task": "health_check"' in listed.stdout
