"""What a run in a prepared sandbox can reach, compared with one in a sandbox set up for it.

A prepared sandbox binds the parents of a run's own directories at /run/spos-stage/<n>, with
CAP_SYS_ADMIN and CAP_SETPCAP left to the compiled launcher, which mounts the run's tmp and
checkpoint directories from there, detaches the stage, makes the empty tmpfs that stand for the
parents read-only and drops every capability (docs/sandbox.md, "Prepared sandboxes"). The run
must end up with the view and the privileges of a run in a fresh sandbox: its own directories,
nothing of its siblings, nothing of the stage, no capability, and nothing of the host made
writable or read-only on the way.

Every test uses the real parts (bubblewrap, the compiled launcher, Landlock, cgroups under
/sys/fs/cgroup). The device root is a tmpfs mounted for the test, so that whatever a launcher
does to the file system holding the agent's directories stays on it; cgroups live under the
session's parent and are removed; every wait is bounded.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_prepared_adversarial import (  # noqa: F401 (_parent_cgroup, box, runs: fixtures)
    AGENT_DIR, EXECUTABLES, OUTPUT, WAIT_SECONDS, _parent_cgroup, _text, box, runs,
)
from test_sandbox import PYTHON, SH, launcher  # noqa: F401 (launcher: a fixture)

from reconciler.executor.sandbox import GO_BYTE, STAGE_DIR, SandboxError

pytestmark = [pytest.mark.slow, pytest.mark.root]

CAP_SETGID, CAP_SETUID = 6, 7
CAP_SETPCAP, CAP_SYS_ADMIN = 8, 21


@pytest.fixture
def box_root(tmp_path) -> Path:
    """The device root: a tmpfs of its own, unmounted afterwards (lazily, so a read-only or
    busy one goes too)."""
    root = tmp_path / "device"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "spos-test-device",
                    str(root)], check=True, timeout=WAIT_SECONDS)
    try:
        (root / OUTPUT.lstrip("/")).mkdir(parents=True)
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, timeout=WAIT_SECONDS)


def _writable(directory: Path) -> bool:
    probe = directory / f".probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("")
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return False
        raise
    probe.unlink()
    return True


def _start_prepared(runs, spec, **fields):
    slot, output = runs.prepare(**fields)
    runs.wait_waiting(slot)
    run = slot.start(spec)
    runs.runs.append(run)
    return run, output


def _start_either(runs, how: str, spec, slot, output):
    """Start `spec` in the prepared `slot` ("prepared", its output the slot's) or in a sandbox
    set up for it ("fresh"); returns the run and its output."""
    if how == "prepared":
        run = slot.start(spec)
        runs.runs.append(run)
        return run, output
    return runs.spawn(spec)


def _hand_over(runs, slot, spec, mounts) -> None:
    """Give the waiting launcher `spec` with exactly these (stage, name, target) mounts, as
    start() would after its checks, and wait until the sandbox has ended."""
    sandbox = runs.sandbox
    items = sandbox._launcher_args(spec, sandbox._ruleset(spec, slot._plan), slot._identity,
                                   slot._setup_fd_in_child, slot.pass_fds, mounts=mounts)
    os.write(slot._args_fd, "".join(f"{item}\0" for item in items).encode() + GO_BYTE)
    os.close(slot._args_fd)
    slot._args_fd = -1
    slot._process.wait(timeout=WAIT_SECONDS)


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


# -- the run's own directories are what the executor checked, and nothing else -------------------

def test_a_run_directory_replaced_by_a_link_is_not_mounted_in_a_prepared_sandbox(runs):
    """A fresh sandbox opens every writable path without following links, so what is mounted
    is what was checked (docs/sandbox.md, "The view of the file system"). A prepared one must
    do no less with the run's own directories, which the launcher mounts late: a run whose tmp
    directory was replaced by a link (by anything that may write the agent's tmp directory,
    between the executor making it and the launcher mounting it) is refused, and never given
    write access to where the link leads, let alone a read-only part of the host made
    writable."""
    outside = Path("/var/tmp") / f"spos-outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    try:
        spec = runs.spec("r-link", [SH, "-c", f"touch {AGENT_DIR}/tmp/r-link/escaped"])
        own = runs.host(f"{AGENT_DIR}/tmp/r-link")
        slot, output = runs.prepare()
        runs.wait_waiting(slot)
        own.rmdir()
        own.symlink_to(outside)  # /var/tmp is part of the read-only host in the run's view
        try:
            run = slot.start(spec)
        except SandboxError:
            return  # refused before anything of the run started: what a fresh sandbox does
        runs.runs.append(run)
        code = run.wait(timeout=WAIT_SECONDS)
        assert not (outside / "escaped").exists(), (
            f"the run wrote through a link into {outside} on the host: {_text(output)}")
        assert code != 0 and run.setup_error(), _text(output)
    finally:
        subprocess.run(["rm", "-rf", str(outside)], check=False, timeout=WAIT_SECONDS)


def test_the_launcher_does_not_follow_a_link_where_a_run_directory_should_be(runs):
    """start() checks that the run's directories are directories, then hands them to the
    launcher, which mounts them later: whatever replaces one in between (a link, made by
    anything that may write the agent's tmp directory) must not be followed. The launcher
    refuses to start the run, and its action never gets write access to where the link
    leads, a read-only part of the host made writable by the mount."""
    outside = Path("/var/tmp") / f"spos-outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    try:
        tmp, checkpoint = f"{AGENT_DIR}/tmp/r-swap", f"{AGENT_DIR}/checkpoints/r-swap"
        spec = runs.spec("r-swap", [SH, "-c", f"touch {tmp}/escaped"])
        slot, output = runs.prepare()
        runs.wait_waiting(slot)
        runs.host(tmp).rmdir()
        runs.host(tmp).symlink_to(outside)  # swapped after start() looked
        mounts = [(f"{STAGE_DIR}/{slot.shape.per_run.index(os.path.dirname(path))}", "r-swap",
                   path) for path in (checkpoint, tmp)]
        _hand_over(runs, slot, spec, mounts)
        assert not (outside / "escaped").exists(), (
            f"the action wrote through a link into {outside} on the host: {_text(output)}")
        assert "spos sandbox:" in _text(output), _text(output)
    finally:
        subprocess.run(["rm", "-rf", str(outside)], check=False, timeout=WAIT_SECONDS)


def test_a_run_directory_named_by_its_parent_is_refused(runs, box_root):
    """start() mounts the run's own directories, each one level below a parent the sandbox
    staged. A per-run path that names the parent itself ("…/tmp/", whose name is empty) must
    not bring the whole parent, every sibling's directory included, into the run's view, nor
    make the file system that holds it read-only for the whole machine."""
    runs.spec("r-first", ["/bin/true"])
    tmp, checkpoint = f"{AGENT_DIR}/tmp", f"{AGENT_DIR}/checkpoints/r-parent"
    probe = f"test -e {tmp}/r-first && echo sibling=seen; echo done"
    spec = runs.spec("r-parent", [SH, "-c", probe], cwd=checkpoint, per_run=(checkpoint, tmp + "/"),
                     write=(OUTPUT, checkpoint))
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    try:
        run = slot.start(spec)
    except SandboxError:
        run = None
    if run is not None:
        runs.runs.append(run)
        run.wait(timeout=WAIT_SECONDS)
        assert "sibling=seen" not in _text(output), _text(output)
    assert _writable(box_root), "the device's file system was made read-only"


# -- nothing of the host changes -----------------------------------------------------------------

def test_a_writable_parent_of_the_run_directories_stays_writable(runs, box_root):
    """An agent's capability may let its runs write the agent's whole tmp directory (a scratch
    area they share). A prepared sandbox, which stands a tmpfs in for that directory, cannot
    give them that: such a shape is never prepared (the executor then starts each run in a
    sandbox of its own), the run works there, and the file system that holds the agent's
    directories stays writable for everyone else."""
    shared = f"{AGENT_DIR}/tmp"
    script = f"touch {shared}/r-shared/mine {shared}/shared && echo wrote"

    def write(run_id: str) -> tuple[str, ...]:
        return OUTPUT, f"{AGENT_DIR}/checkpoints/{run_id}", shared, f"{shared}/{run_id}"

    if not runs.sandbox.launcher:
        pytest.skip("only the compiled launcher prepares sandboxes")
    earlier = runs.spec("r-first", ["/bin/true"], write=write("r-first"))
    assert "overlaps" in runs.sandbox.unpreparable(earlier)
    with pytest.raises(SandboxError, match="overlaps"):
        runs.sandbox.prepare(earlier, f"spos-sec-{uuid.uuid4().hex[:8]}/warm", stdout=1, stderr=2)
    run_id = "r-shared-fresh"
    run, output = runs.spawn(runs.spec(run_id, [SH, "-c", script.replace("r-shared", run_id)],
                                       write=write(run_id)))
    code = run.wait(timeout=WAIT_SECONDS)
    assert _writable(box_root), "the device's file system was made read-only"
    assert code == 0 and run.setup_error() is None, (run.setup_error(), _text(output))
    assert "wrote" in _text(output), _text(output)


# -- no capability left ------------------------------------------------------------------------

def test_the_launcher_of_a_prepared_sandbox_drops_its_capabilities_even_with_nothing_to_mount(
        runs):
    """The capabilities bubblewrap leaves a prepared sandbox's launcher are for mounting the
    run's directories, and go before the action starts whatever the launcher was asked to
    mount: given no directory at all, the action still has no capability in any set."""
    spec = runs.spec("r-none", [SH, "-c", "grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status"],
                     cwd="/")
    slot, output = runs.prepare()
    runs.wait_waiting(slot)
    _hand_over(runs, slot, spec, mounts=())
    fields = _status(_text(output))
    assert fields, _text(output)
    for name in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[name], 16) == 0, f"{name} {fields[name]} in the action: {fields}"


INHERITABLE = "import sys; print(open('/proc/self/status').read())"


@pytest.mark.parametrize("how", ["fresh", "prepared"])
def test_a_run_as_another_user_has_no_capability_in_any_set(runs, how):
    """A run's `user` other than root is switched to inside; afterwards it holds no capability
    in its effective, permitted, inheritable or ambient set, nor securebits that would keep
    one, and its bounding set holds at most CAP_SETUID and CAP_SETGID (what bubblewrap keeps
    for the switch), prepared or not."""
    spec = runs.spec(f"r-user-{how}", [PYTHON, "-c", INHERITABLE], user="nobody")
    if how == "prepared":
        run, output = _start_prepared(runs, spec, user="nobody")
    else:
        run, output = runs.spawn(spec)
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    fields = _status(_text(output))
    assert fields["Uid"].split()[0] == "65534"
    for name in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(fields[name], 16) == 0, f"{how}: {name} {fields[name]}"
    assert int(fields["CapBnd"], 16) & ~((1 << CAP_SETUID) | (1 << CAP_SETGID)) == 0 \
        or how == "fresh", fields["CapBnd"]
    assert fields["NoNewPrivs"] == "1"


SECUREBITS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("securebits", libc.prctl(27, 0, 0, 0, 0))  # PR_GET_SECUREBITS
print(open("/proc/self/status").read())
"""


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_a_prepared_run_keeps_no_capability_and_no_securebits(runs, user):
    """In a prepared sandbox, CAP_SYS_ADMIN and CAP_SETPCAP never reach the action, as root or
    as another user: no capability in the effective, permitted, ambient or inheritable set,
    none in the bounding set beyond what the user switch needs, no securebits."""
    spec = runs.spec(f"r-bits-{user}", [PYTHON, "-c", SECUREBITS], user=user)
    run, output = _start_prepared(runs, spec, user=user)
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    text = _text(output)
    fields = _status(text)
    assert "securebits 0" in text, text
    for name in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
        assert int(fields[name], 16) == 0, f"{name} {fields[name]}"
    allowed = 0 if user == "root" else (1 << CAP_SETUID) | (1 << CAP_SETGID)
    assert int(fields["CapBnd"], 16) & ~allowed == 0, fields["CapBnd"]
    assert int(fields["CapBnd"], 16) & ((1 << CAP_SYS_ADMIN) | (1 << CAP_SETPCAP)) == 0


# -- nothing of the stage is left in reach ---------------------------------------------------------

REACH = r"""
import os, sys
agent, run = sys.argv[1], sys.argv[2]
mountinfo = open("/proc/self/mountinfo").read()
print("stage_mounted", "spos-stage" in mountinfo)
print("sibling_in_mountinfo", "/r-first" in mountinfo)
for path in ("/run/spos-stage/0", "/run/spos-stage/1", "/proc/1/root/run/spos-stage/0",
             "/proc/1/root/run/spos-stage/1", f"{agent}/tmp", f"{agent}/checkpoints"):
    try:
        print("entries", path, sorted(os.listdir(path)))
    except OSError as exc:
        print("refused", path, exc.errno)
for path in (f"{agent}/tmp/r-first", f"{agent}/checkpoints/r-first",
             f"{agent}/tmp/{run}/../r-first", "/proc/1/root" + f"{agent}/tmp/r-first",
             "/proc/1/cwd/r-first"):
    print("exists", path, os.path.lexists(path))
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
print("fds", fds)
"""


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_nothing_of_the_stage_or_of_a_sibling_is_in_reach_of_a_prepared_run(runs, user):
    """Once the launcher has mounted the run's directories, the stage is detached: no mount of
    it is listed, its mount points are empty (seen directly or through bubblewrap's init,
    pid 1), the tmpfs standing for the parents holds only the run's own directory, no path
    (`..` from the run's directory, /proc/1/root, /proc/1/cwd) leads to a sibling, and the
    action holds no fd but 0-2 (the one it lists its fds with aside)."""
    runs.spec("r-first", ["/bin/true"])
    (runs.host(f"{AGENT_DIR}/tmp/r-first") / "secret").write_text("first run's")
    run_id = f"r-reach-{user}"
    spec = runs.spec(run_id, [PYTHON, "-c", REACH, AGENT_DIR, run_id], user=user)
    run, output = _start_prepared(runs, spec, user=user)
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    text = _text(output)
    assert "stage_mounted False" in text and "sibling_in_mountinfo False" in text, text
    for line in text.splitlines():
        words = line.split(" ", 2)
        if words[0] == "entries" and "spos-stage" in words[1]:
            assert words[2] == "[]", line
        if words[0] == "entries" and words[1] in (f"{AGENT_DIR}/tmp", f"{AGENT_DIR}/checkpoints"):
            assert words[2] == f"['{run_id}']", line
        if words[0] == "exists":
            assert words[2] == "False", line
    fds = next(line for line in text.splitlines() if line.startswith("fds"))
    assert fds == "fds [0, 1, 2, 3]", fds


# -- a run cannot prepare anything for a later run of its agent ----------------------------------

PLANT = r"""
import os, sys
agent, run = sys.argv[1], sys.argv[2]
for bucket in ("tmp", "checkpoints"):
    parent = f"{agent}/{bucket}"
    for name, plant in (
            ("symlink", lambda: os.symlink("/", f"{parent}/20990101T000000-00000000")),
            ("mkdir", lambda: os.mkdir(f"{parent}/20990101T000000-00000000")),
            ("rename_own", lambda: os.rename(f"{parent}/{run}", f"{parent}/{run}-moved")),
            ("symlink_via_dotdot", lambda: os.symlink("/", f"{parent}/{run}/../planted")),
            ("chmod_parent", lambda: os.chmod(parent, 0o777))):
        try:
            plant()
            print(bucket, name, "done")
        except OSError as exc:
            print(bucket, name, "refused", exc.errno)
"""


@pytest.mark.parametrize("how", ["fresh", "prepared"])
def test_a_run_cannot_plant_anything_where_a_later_run_of_its_agent_is_mounted_from(runs, how):
    """A prepared sandbox's launcher mounts a later run's directory by its name in the agent's
    tmp and checkpoints directories. No run may put anything there (a link or a directory
    named like a later run, its own directory moved away, a looser mode), prepared or not:
    the host's directories keep exactly what the executor made."""
    runs.spec("r-first", ["/bin/true"])
    run_id = f"r-plant-{how}"
    spec = runs.spec(run_id, [PYTHON, "-c", PLANT, AGENT_DIR, run_id])
    before = {bucket: (sorted(os.listdir(runs.host(f"{AGENT_DIR}/{bucket}"))),
                       runs.host(f"{AGENT_DIR}/{bucket}").stat().st_mode)
              for bucket in ("tmp", "checkpoints")}
    if how == "prepared":
        run, output = _start_prepared(runs, spec)
    else:
        run, output = runs.spawn(spec)
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    assert " done" not in _text(output), _text(output)
    after = {bucket: (sorted(os.listdir(runs.host(f"{AGENT_DIR}/{bucket}"))),
                      runs.host(f"{AGENT_DIR}/{bucket}").stat().st_mode)
             for bucket in ("tmp", "checkpoints")}
    assert after == before


def test_the_tmpfs_standing_for_the_parents_is_read_only_for_the_run(runs):
    """The empty tmpfs seen where the agent's tmp and checkpoints directories are is remounted
    read-only before the run starts: listed read-only in the run's mountinfo (that mount,
    which is the only one of that tmpfs)."""
    spec = runs.spec("r-ro", [SH, "-c", "cat /proc/self/mountinfo"])
    run, output = _start_prepared(runs, spec)
    assert run.wait(timeout=WAIT_SECONDS) == 0, _text(output)
    for bucket in ("tmp", "checkpoints"):
        line = next(line for line in _text(output).splitlines()
                    if line.split()[4] == f"{AGENT_DIR}/{bucket}")
        assert " - tmpfs " in line and line.split()[5].startswith("ro"), line


# -- the Landlock rules a prepared sandbox's launcher adds while it waits -------------------------

def _wait_rules_held(slot) -> None:
    """Until the prepared sandbox's launcher holds its Landlock ruleset, has added the shape's
    rules to it and waits in read() for its run (a pipe)."""
    procs = Path("/sys/fs/cgroup/pids") / slot._cgroup.name / "cgroup.procs"
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        for pid in procs.read_text().split():
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                waiting = "pipe" in Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                continue
            if waiting and any("landlock-ruleset" in link for link in links):
                return
        time.sleep(0.01)
    pytest.fail("the prepared sandbox's launcher never waited with its rules held")


def test_a_rule_path_replaced_after_prepare_gives_the_run_what_a_fresh_sandbox_would(runs):
    """A prepared sandbox's launcher adds its shape's rules long before its run (up to the
    pool's idle time). Landlock ties a rule to the file its path named then; the run must
    get the rules of the paths as they are when it comes. Here a program the capability
    allows to execute, in the writable output directory (seen live by the run, as the host's
    /etc and /usr are), is replaced by a rename after the sandbox was prepared (an upgrade,
    a new resolv.conf or ld.so.cache are written so): the run may execute the new program,
    as in a sandbox set up for it, and not the old one, which was moved aside."""
    tool, old = f"{OUTPUT}/tool", f"{OUTPUT}/tool-old"
    execute = (*EXECUTABLES, tool)

    def write(path: str, text: str) -> None:
        host = runs.host(path)
        host.write_text(f"#!/bin/sh\necho {text}\n")
        host.chmod(0o755)

    write(tool, "old")
    slot, output = runs.prepare(execute=execute)
    _wait_rules_held(slot)
    os.rename(runs.host(tool), runs.host(old))
    write(f"{tool}.new", "new")
    os.rename(runs.host(f"{tool}.new"), runs.host(tool))
    script = f"{tool}; echo tool=$?; {old}; echo old=$?"
    results = {}
    for how in ("prepared", "fresh"):
        spec = runs.spec(f"r-{how}", [SH, "-c", script], execute=execute)
        run, out = _start_either(runs, how, spec, slot, output)
        assert run.wait(timeout=WAIT_SECONDS) == 0 and run.setup_error() is None, _text(out)
        results[how] = _text(out)
    assert "new\ntool=0\n" in results["fresh"] and "old=126" in results["fresh"], results
    assert "new\ntool=0\n" in results["prepared"] and "old=126" in results["prepared"], results


def test_a_rule_path_turned_into_a_link_after_prepare_is_refused_as_in_a_fresh_sandbox(runs):
    """A link on a writable mount on the way to a rule's path is refused, whatever it leads
    to (docs/sandbox.md): an earlier run may have left it to point a rule elsewhere. A
    prepared sandbox's launcher opened its shape's rule paths long before its run; a path
    made a link since, even one leading to the very file the rule was added for, refuses the
    run, as a sandbox set up for it would, and nothing of the run's action runs."""
    tool, real = f"{OUTPUT}/tool", f"{OUTPUT}/tool-real"
    execute = (*EXECUTABLES, tool)
    runs.host(tool).write_text("#!/bin/sh\necho ran\n")
    runs.host(tool).chmod(0o755)
    slot, output = runs.prepare(execute=execute)
    _wait_rules_held(slot)
    os.rename(runs.host(tool), runs.host(real))
    runs.host(tool).symlink_to("tool-real")
    for how in ("prepared", "fresh"):
        spec = runs.spec(f"r-{how}", [SH, "-c", f"touch {OUTPUT}/{how}-started; {tool}"],
                         execute=execute)
        try:
            run, out = _start_either(runs, how, spec, slot, output)
        except SandboxError:
            continue  # refused before anything of the run started
        assert run.wait(timeout=WAIT_SECONDS) == 126, (how, _text(out))
        assert "refusing the rule" in (run.setup_error() or ""), (how, _text(out))
        assert not runs.host(f"{OUTPUT}/{how}-started").exists(), how
