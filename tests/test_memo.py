"""What a plan remembers between runs (reconciler/memo.py) makes it faster, never different.

A no-op plan over an unchanged repository and device neither parses manifests nor reads agent
configs; every change that a full plan would see is still seen: edits that keep a file's size
and modification time, a lost or damaged memo, a different spos command, drift found while the
desired state comes from the memo.
"""

from __future__ import annotations

import json
import marshal
import os
import time
from pathlib import Path

import pytest

from reconciler import memo as memo_module
from reconciler.memo import PlanMemo

STATE = "var/lib/systemprompt-os"
MEMO = f"{STATE}/cache/plan.marshal"


@pytest.fixture
def later(monkeypatch):
    """Plans run a minute from now, so every file written so far has settled (memo.py)."""
    real = time.time_ns
    monkeypatch.setattr(memo_module.time, "time_ns", lambda: real() + 60 * 1_000_000_000)


@pytest.fixture
def applied(spos, manifests, device_root, later):
    """The examples applied, then planned once so the memo knows the device and manifests."""
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    assert spos("plan", manifests, "--root", device_root, "--detailed-exitcode").code == 0
    assert (device_root / MEMO).is_file()
    time.sleep(0.05)  # later edits get a change time the clock can tell apart
    return device_root


def plan_json(spos, manifests, root) -> dict:
    result = spos("plan", manifests, "--root", root, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def rewrite_keeping_stat_times(path: Path, old: str, new: str) -> None:
    """Edit in place to the same size and put the modification time back, as `cp -p` or
    `rsync -t` would leave it."""
    assert len(old) == len(new)
    before = os.stat(path)
    text = path.read_text()
    assert old in text
    with open(path, "r+") as handle:
        handle.write(text.replace(old, new, 1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)


def test_a_no_op_plan_from_the_memo_parses_no_manifest(spos, manifests, applied, monkeypatch):
    import reconciler.validate

    def refuse(*args, **kwargs):
        raise AssertionError("a no-op plan over unchanged manifests loaded them")

    monkeypatch.setattr(reconciler.validate, "load", refuse)
    result = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert result.code == 0, result.err
    assert "No changes." in result.out


def test_the_memo_gives_the_same_plan_json_as_a_full_plan(spos, manifests, applied):
    remembered = plan_json(spos, manifests, applied)
    (applied / MEMO).unlink()
    assert plan_json(spos, manifests, applied) == remembered


def test_a_hand_edit_keeping_size_and_mtime_is_still_drift(spos, manifests, applied):
    config = applied / STATE / "agents/monitor-001/agent.json"
    rewrite_keeping_stat_times(config, '"priority": 90', '"priority": 10')

    result = spos("plan", manifests, "--root", applied)
    assert result.code == 0, result.err
    assert "agent/monitor-001  (changed on the device (drift))" in result.out
    assert "config.tasks.health_check.priority: 10 -> 90" in result.out
    assert "monitor-001.yaml:" in result.out  # the source, from the render done on demand


def test_a_manifest_edit_keeping_size_and_mtime_is_seen(spos, manifests, applied):
    rewrite_keeping_stat_times(manifests / "monitor-001.yaml", "priority: 90", "priority: 10")

    result = spos("plan", manifests, "--root", applied)
    assert "agent/monitor-001  (manifest changed)" in result.out
    assert "config.tasks.health_check.priority: 90 -> 10" in result.out


def test_a_cron_line_edited_by_hand_is_drift(spos, manifests, applied):
    cron = applied / "etc/cron.d/spos-backup-001"
    rewrite_keeping_stat_times(cron, "0 2 * * *", "0 3 * * *")

    result = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert result.code == 2
    assert "~   cron/backup-001-nightly  (changed on the device (drift))" in result.out


def test_a_unit_file_edited_by_hand_is_drift(spos, manifests, applied):
    unit = applied / "etc/systemd/system/spos-schedule-monitor-001-boot.timer"
    rewrite_keeping_stat_times(unit, "OnBootSec=2m", "OnBootSec=9m")

    result = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert result.code == 2
    assert "~   timer/monitor-001-boot  (changed on the device (drift))" in result.out
    assert 'timer.sections.Timer.OnBootSec: "9m" -> "2m"' in result.out


def test_a_device_where_spos_activates_units_is_another_desired_state(
        spos, manifests, applied, monkeypatch, recording_systemctl):
    from reconciler import systemctl

    monkeypatch.setattr(systemctl, "detect", lambda root: recording_systemctl(applied))
    changes = plan_json(spos, manifests, applied)["changes"]
    assert [(c["id"], [f["path"] for f in c["fields"]]) for c in changes] == [
        (f"timer/{name}", ["enabled"])
        for name in ("iot-sensor-001-upload", "maintenance-001-logrotate", "monitor-001-boot")]


def test_a_damaged_memo_only_costs_time(spos, manifests, applied):
    expected = plan_json(spos, manifests, applied)
    good = marshal.loads((applied / MEMO).read_bytes())

    def altered(**changes) -> bytes:
        return marshal.dumps({**good, **changes})

    first = next(iter(good["desired"]["resources"]))
    for damage in (
        b"", b"{not marshal", marshal.dumps({"format": 1, "key": "x"}), marshal.dumps([]),
        marshal.dumps(good)[:-7], b"\xff" * 64,
        altered(key="stale"), altered(values=[]), altered(values={"agent:x": 3}),
        altered(desired={**good["desired"], "resources": {first: ["agent", "sha256:x"]}}),
        altered(desired={**good["desired"], "resources": {first: "agent"}}),
        altered(desired={**good["desired"], "notices": None}),
    ):
        (applied / MEMO).write_bytes(damage)
        assert plan_json(spos, manifests, applied) == expected


def test_another_spos_command_is_another_desired_state(spos, manifests, applied, monkeypatch):
    monkeypatch.setenv("SPOS_COMMAND", "/opt/spos/bin/spos")
    result = spos("plan", manifests, "--root", applied, "--detailed-exitcode")
    assert result.code == 2
    assert "/opt/spos/bin/spos" in result.out


def test_a_deleted_agent_directory_is_seen(spos, manifests, applied):
    import shutil

    shutil.rmtree(applied / STATE / "agents/backup-001")
    result = spos("plan", manifests, "--root", applied)
    assert "+   agent/backup-001  (deleted on the device (drift))" in result.out


def _stat(mtime_s: float, ctime_s: float, ino: int = 7, size: int = 10) -> os.stat_result:
    times = {"st_mtime_ns": int(mtime_s * 1e9), "st_ctime_ns": int(ctime_s * 1e9)}
    return os.stat_result((0o100644, ino, 0, 1, 0, 0, size, 0, int(mtime_s), int(ctime_s)), times)


def test_a_file_changed_within_the_settle_time_is_not_remembered(tmp_path):
    memo = PlanMemo(str(tmp_path / "plan.json"), "k")
    now = time.time()
    fresh, old = _stat(now - 30, now - 0.5), _stat(now - 30, now - 30)
    memo.remember("fresh", (fresh,), "a")
    memo.remember("old", (old,), "b")
    assert memo.lookup("fresh", (fresh,)) is None
    assert memo.lookup("old", (old,)) == "b"
    assert memo.lookup("old", (_stat(now - 30, now - 29),)) is None  # ctime moved
    assert memo.lookup("old", (_stat(now - 30, now - 30, ino=8),)) is None  # replaced
    memo.save()
    again = PlanMemo(str(tmp_path / "plan.json"), "k")
    assert again.lookup("old", (old,)) == "b"
    assert PlanMemo(str(tmp_path / "plan.json"), "other key").lookup("old", (old,)) is None


@pytest.mark.parametrize("file, old, new", [
    ("monitor-001.yaml", "priority: 90", "priority: 95"),            # one agent's task
    ("profiles.yaml", "memory: 1G", "memory: 3G"),                   # a Quota several agents use
    ("profiles.yaml", "      - /opt/agents/research\n", "      - /opt/agents/research\n      - /srv/papers\n"),
    ("backup-001.yaml", "user: root", "user: nobody"),               # an Agent a cron line reads
    ("backup-001.yaml", 'cron: "0 2 * * *"', 'cron: "0 3 * * *"'),   # a Schedule
])
def test_rendering_only_what_changed_plans_what_a_full_render_plans(
        spos, manifests, applied, file, old, new):
    path = manifests / file
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))

    incremental = plan_json(spos, manifests, applied)
    assert incremental["changes"], "the edit changes something"
    (applied / MEMO).unlink()
    assert plan_json(spos, manifests, applied) == incremental


def test_an_edit_to_one_agent_renders_that_agent_alone(spos, manifests, applied, monkeypatch):
    import reconciler.kinds.agent as agent_kind

    compiled = []
    real = agent_kind.compile_agent
    monkeypatch.setattr(agent_kind, "compile_agent",
                        lambda name, *rest: compiled.append(name) or real(name, *rest))
    path = manifests / "monitor-001.yaml"
    path.write_text(path.read_text().replace("priority: 90", "priority: 95"))

    result = spos("plan", manifests, "--root", applied)
    assert "~   agent/monitor-001  (manifest changed)" in result.out
    assert compiled == ["monitor-001"]


CACHE_INDEX = f"{STATE}/cache/manifests.marshal"
CACHE_DATA = f"{STATE}/cache/manifests.data"


def _edit_monitor(manifests: Path) -> None:
    path = manifests / "monitor-001.yaml"
    path.write_text(path.read_text().replace("priority: 90", "priority: 95", 1))


def test_a_damaged_document_cache_gives_the_same_plan_and_is_rebuilt(spos, manifests, applied):
    _edit_monitor(manifests)
    data = applied / CACHE_DATA
    expected = plan_json(spos, manifests, applied)  # the cache now holds the edited file too
    # Damage every entry in place, same size and inode: only the entries' CRCs can tell.
    damaged = bytes(b ^ 0x5A for b in data.read_bytes())
    data.write_bytes(damaged)

    # The edited agent is rendered from the shared Capability and Quota, whose documents
    # are read from the data file: they come from profiles.yaml itself instead.
    assert plan_json(spos, manifests, applied) == expected
    assert not data.exists() or data.read_bytes() != damaged
    assert plan_json(spos, manifests, applied) == expected
    assert data.is_file() and (applied / CACHE_INDEX).is_file()


def test_a_short_or_replaced_data_file_is_not_used(spos, manifests, applied):
    _edit_monitor(manifests)
    expected = plan_json(spos, manifests, applied)
    data = applied / CACHE_DATA
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])  # cut short: the index names the longer length
    assert plan_json(spos, manifests, applied) == expected
    data.unlink()
    data.write_bytes(whole)  # the same bytes in another inode: not the file the index names
    assert plan_json(spos, manifests, applied) == expected


def test_a_one_file_edit_decodes_only_the_documents_it_needs(spos, manifests, applied, monkeypatch):
    """Documents of unchanged files stay in the data file unless rendering reads them."""
    import marshal

    import reconciler.validate

    decoded = []
    real = marshal.loads

    class Counting:
        def __getattr__(self, name):
            return getattr(marshal, name)

        @staticmethod
        def loads(blob):
            decoded.append(len(blob))
            return real(blob)

    monkeypatch.setattr(reconciler.validate, "marshal", Counting())
    _edit_monitor(manifests)
    result = spos("plan", manifests, "--root", applied, "--json")
    assert result.code == 0, result.err
    policies = len(list((manifests.parent / "policies").glob("*.yaml")))
    files = len(list(manifests.glob("*.yaml"))) + policies
    # The index, the policies (which judge the edited file) and profiles.yaml (the edited
    # agent's Capability and Quota); the edited file itself is parsed, or, when a child
    # parsed and cached it while the device was observed (pipeline._CachePrimer), decoded,
    # and the index read twice: before the child is done (validate.ReadAhead) and after
    # (the edited file parsed here after all when the child could not cache it).
    assert len(decoded) in (1 + policies + 1, 2 + policies + 1, 2 + policies + 2), decoded
    assert len(decoded) < files, decoded


PARSERS_LOADED = """
import atexit, os, sys, threading
from reconciler.cli import main

def loaded():
    names = [m for m in ("ruamel.yaml", "jsonschema_rs") if m in sys.modules]
    print("parsers in this process:", ", ".join(names) or "none", file=sys.stderr)

if os.environ.get("ONE_PROCESS"):  # a second thread: no child is forked (pipeline._CachePrimer)
    threading.Thread(target=threading.Event().wait, daemon=True).start()
atexit.register(loaded)
sys.exit(main(sys.argv[1:]))
"""
"""`spos` with a note, as it exits, of whether the YAML parser and the schema validator were
imported in the process itself (a forked child exits without running atexit)."""


def _plan_noting_parsers(manifests: Path, root: Path, *options: str, one_process: bool = False):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", PARSERS_LOADED, "plan", str(manifests), "--root", str(root), *options],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SPOS_COMMAND": "/usr/local/bin/spos", "ONE_PROCESS": "1" if one_process else ""},
    )


def test_an_edited_file_is_parsed_beside_the_observing_and_the_plan_is_the_same(manifests, applied, tmp_path):
    """The file the cache does not hold is parsed and checked in a child while the device is
    observed; the plan itself does neither, and says, to the byte, what a plan that does it
    all in one process says from the same state."""
    import shutil

    _edit_monitor(manifests)
    state = applied / STATE
    shutil.copytree(state, tmp_path / "state", symlinks=True)
    with_child = _plan_noting_parsers(manifests, applied, "--json")
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "state", state, symlinks=True)
    in_one = _plan_noting_parsers(manifests, applied, "--json", one_process=True)

    assert with_child.returncode == in_one.returncode == 0, with_child.stderr + in_one.stderr
    assert "parsers in this process: none" in with_child.stderr
    assert "parsers in this process: ruamel.yaml, jsonschema_rs" in in_one.stderr
    assert {c["id"] for c in json.loads(with_child.stdout)["changes"]} == {"agent/monitor-001"}
    assert with_child.stdout == in_one.stdout


def test_a_broken_manifest_is_reported_before_what_the_device_refuses(manifests, applied):
    """The device is observed while the manifests are parsed; what observing refuses (here an
    agent's directory replaced by a link) is still said only after the manifests' problems."""
    (applied / STATE / "agents" / "monitor-001").rename(applied / "elsewhere")
    (applied / STATE / "agents" / "monitor-001").symlink_to(applied / "elsewhere")
    path = manifests / "backup-001.yaml"
    path.write_text(path.read_text().replace("priority:", "priority: [", 1))

    result = _plan_noting_parsers(manifests, applied)

    assert result.returncode == 1, result.stdout
    assert "backup-001.yaml:" in result.stderr, result.stderr
    assert "symlink" not in result.stderr, result.stderr


def test_a_plan_with_its_output_closed_still_plans(manifests, applied):
    """A daemon started with stdout and stderr closed plans as ever (nothing to flush before
    the child is forked)."""
    import subprocess
    import sys

    _edit_monitor(manifests)
    program = (
        "import sys\n"
        "from reconciler.pipeline import PlanRequest, make_plan\n"
        "sys.stdout = sys.stderr = None\n"
        "_, plan = make_plan(PlanRequest(path=sys.argv[1], root=sys.argv[2]))\n"
        "open(sys.argv[3], 'w').write(' '.join(sorted(c.id for c in plan.changes)))\n"
    )
    out = applied.parent / "changes.txt"
    done = subprocess.run([sys.executable, "-c", program, str(manifests), str(applied), str(out)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60,
                          env={**os.environ, "SPOS_COMMAND": "/usr/local/bin/spos"})
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "agent/monitor-001"


def test_an_edit_that_breaks_a_file_is_reported_with_its_line_as_ever(manifests, applied):
    """A file with problems is not cached by the child: the plan parses it and says what is
    wrong, where."""
    path = manifests / "monitor-001.yaml"
    path.write_text(path.read_text().replace("priority: 90", "priority: ninety", 1))
    result = _plan_noting_parsers(manifests, applied)

    assert result.returncode == 1, result.stdout
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "ninety" in text)
    assert f"monitor-001.yaml:{line}:" in result.stderr, result.stderr
    assert "parsers in this process: ruamel.yaml" in result.stderr


def test_the_parsing_child_is_waited_for_when_a_signal_handler_raises_after_the_fork(
        manifests, applied, monkeypatch):
    """Signals are blocked across the fork; one that arrived meanwhile is handled as they are
    unblocked, and a handler that raises then (Ctrl-C) leaves no child unwaited."""
    import signal
    import threading

    from reconciler import pipeline

    assert threading.active_count() == 1, "a fork needs a process with one thread"
    parent, forks = os.getpid(), []
    real_fork, real_mask = os.fork, signal.pthread_sigmask

    def fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    def mask(how, signals):
        previous = real_mask(how, signals)
        if how == signal.SIG_SETMASK and forks and os.getpid() == parent:
            raise KeyboardInterrupt  # what a SIGINT handler raises as the signal is delivered
        return previous

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(signal, "pthread_sigmask", mask)
    _edit_monitor(manifests)
    with pytest.raises(KeyboardInterrupt):
        pipeline.make_plan(pipeline.PlanRequest(path=str(manifests), root=str(applied)))

    assert len(forks) == 1
    with pytest.raises(ChildProcessError):  # waited for already: nothing left to reap
        os.waitpid(forks[0], os.WNOHANG)
