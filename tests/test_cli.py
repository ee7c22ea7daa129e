"""The command line's own habits: --root anywhere, usage errors, closed pipes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reconciler.cli import _parser


def test_root_is_kept_wherever_it_is_given():
    parse = _parser().parse_args
    run = ["action", "run", "--agent", "a", "--task", "t"]
    assert parse(["--root", "/r", *run]).root == "/r"
    assert parse(["action", "--root", "/r", *run[1:]]).root == "/r"
    assert parse([*run, "--root", "/r"]).root == "/r"
    assert parse(["plan", "--root", "/r"]).root == "/r"


def test_the_parser_built_for_one_command_reads_it_as_the_whole_parser_does():
    """Only the named command's parser is built; what it parses must not depend on that."""
    from reconciler.cli import _COMMANDS

    samples = [
        ["validate", "agents.d", "--json"], ["--root", "/r", "plan", "d", "--detailed-exitcode"],
        ["apply", "plan.json", "--auto-approve"], ["--root=/r", "action", "run", "--agent", "a",
                                                   "--task", "t", "--priority", "5"],
        ["action", "list", "--state", "failed"], ["executor", "--once"], ["triggers"],
        ["sync", "--repo", "r"], ["daemon", "--repo", "r"], ["install", "--repo", "r", "--dry-run"],
        ["status"],
        ["metrics"], ["schedule", "next", "d"], ["why", "r1"], ["trigger", "list", "--json"],
    ]
    assert {words[0] if not words[0].startswith("--root") else words[2 - ("=" in words[0])]
            for words in samples} == set(_COMMANDS)
    whole = _parser([])
    for argv in samples:
        lazy = vars(_parser(argv).parse_args(argv))
        assert lazy == vars(whole.parse_args(argv)), argv


def test_no_command_prints_usage_and_fails(spos):
    result = spos()
    assert result.code == 1
    assert "usage: spos" in result.err


def test_a_usage_error_exits_1_never_2_which_detailed_exitcode_means_changes(spos, manifests, device_root):
    result = spos("plan", manifests, "--root", device_root, "--detailed-exitcode", "--no-such-option")
    assert result.code == 1
    assert "unrecognized arguments: --no-such-option" in result.err
    assert spos("plan", "--help").code == 0


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


def test_executor_options_that_would_spin_or_never_run_are_usage_errors(spos, device_root):
    for option, value, said in (("--rescan", "0s", "--rescan: give at least 100ms"),
                                ("--max-parallel", "0", "--max-parallel: give at least 1")):
        result = spos("executor", "--root", device_root, "--once", option, value)
        assert result.code == 1, (option, result.err)
        assert said in result.err, result.err


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


def _in_a_terminal(*args: str, columns: int = 100) -> tuple[int, str]:
    """Run spos with a pseudo-terminal as stdin, stdout and stderr, as a person at a terminal
    would: (exit code, everything written to the terminal)."""
    import fcntl
    import os
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "reconciler", *args], stdin=slave, stdout=slave,
                               stderr=slave, env={**os.environ, "TERM": "xterm-256color"}, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            output += chunk
        return process.wait(timeout=max(deadline - time.monotonic(), 1)), output.decode(errors="replace")
    finally:
        process.kill()
        os.close(master)


def test_apply_at_a_terminal_shows_a_status_line_and_leaves_the_terminal_as_it_was(manifests, device_root):
    import re

    code, output = _in_a_terminal("apply", str(manifests), "--root", str(device_root), "--auto-approve")

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert code == 0, plain
    total = int(re.search(r"Apply complete: (\d+) changed, 0 failed\.", plain).group(1))
    assert "Applying" in plain and f"{total}/{total}" in plain  # the status line counted them all
    assert "+   agent/backup-001: done" in plain  # the change lines are there, as without a terminal
    assert output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l")  # the cursor is shown again
    assert plain.rstrip().endswith(f"Apply complete: {total} changed, 0 failed.")


def test_apply_into_a_pipe_prints_plain_lines_only(manifests, device_root):
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "apply", str(manifests), "--root", str(device_root), "--auto-approve"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    assert "Applying..." in result.stderr and "Apply complete:" in result.stdout


def test_an_error_at_a_terminal_takes_the_status_line_down_first(manifests, device_root):
    import re

    (manifests / "broken.yaml").write_text("apiVersion: spos/v1\nkind: Agent\nmetadata: {name: x}\nspec: {tasks: 1}\n")

    code, output = _in_a_terminal("apply", str(manifests), "--root", str(device_root), "--auto-approve")

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert code == 1
    assert re.search(r"broken\.yaml:4:\d+: .*tasks", plain), plain
    assert output.rindex("\x1b[?25h") < output.index("broken.yaml")  # the cursor came back before the error


def test_an_interrupt_handled_inside_generated_code_keeps_the_exit_code(tmp_path):
    """CPython kills a `python -m` process with SIGINT at exit when a KeyboardInterrupt was
    raised inside code run from a string (as dataclasses generate methods), even if it was
    handled; spos's own Ctrl-C must not: `action run --wait` promises exit 130."""
    package = tmp_path / "interrupted"
    package.mkdir()
    (package / "__main__.py").write_text(
        "import os, signal\n"
        "from reconciler import cli\n"
        "def command():\n"
        "    try:\n"
        "        exec('os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10000): pass')\n"
        "    except KeyboardInterrupt:\n"
        "        return 130\n"
        "    return 0\n"
        "with cli._interruptible():\n"
        "    code = command()\n"
        "raise SystemExit(code)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), *sys.path]))}
    assert subprocess.run([sys.executable, "-m", "interrupted"], env=env, timeout=30).returncode == 130


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_arriving_in_a_finalizer_still_interrupts_the_command(tmp_path, signal_name, code):
    """Python only prints an exception raised in a finalizer or a weakref callback (an import's
    module lock has one), so a Ctrl-C (or SIGTERM) that lands there would be lost and `action
    run --wait` would wait on: spos raises it again in the code that follows, silently."""
    script = tmp_path / "finalizer.py"
    script.write_text(
        "import signal, time\n"
        "from reconciler import cli\n"
        "class Collected:\n"
        "    def __del__(self):\n"
        f"        signal.raise_signal(signal.{signal_name})  # the handler runs here, in __del__\n"
        "def command():\n"
        "    try:\n"
        "        Collected()\n"
        "        time.sleep(5)\n"
        "    except cli.Terminated:\n"
        "        return 143\n"
        "    except cli.Interrupted:\n"
        "        return 130\n"
        "    return 0\n"
        "with cli._interruptible():\n"
        "    code = command()\n"
        "raise SystemExit(code)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stderr) == (code, "")


def test_validate_at_a_terminal_counts_the_files_it_checks_then_gives_only_its_verdict(manifests):
    import re

    code, output = _in_a_terminal("validate", str(manifests))

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    files = len(list(manifests.rglob("*.yaml")))
    assert code == 0, plain
    assert f"Checking {files} manifest files" in plain and f"/{files}" in plain
    assert output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l")
    assert plain.rstrip().endswith("manifests valid.")


def test_validate_into_a_pipe_prints_its_verdict_alone(manifests):
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(manifests)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.endswith("manifests valid.\n")


def test_a_daemon_that_would_fetch_without_pause_is_a_usage_error(spos, device_root):
    for option, least in (("--interval", "1s"), ("--drift-interval", "100ms")):
        result = spos("daemon", "--root", device_root, "--repo", "https://git.example.net/m.git",
                      option, "0s")
        assert result.code == 1 and f"{option}: give at least {least}" in result.err, result.err
