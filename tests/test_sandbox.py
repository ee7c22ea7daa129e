"""The sandbox keeps its promises, checked from inside it with real namespaces and cgroups.

Every test starts a real sandboxed process (bubblewrap, Landlock, the run's own cgroup under
the real /sys/fs/cgroup) against a temporary device root, and asserts on what the action could
and could not do, and on what changed on the host. The run cgroups live under a per-session
parent `spos-test-<pid>` and are removed; each wait is bounded.

Needs root, bubblewrap and cgroups: otherwise every test is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from sandboxes import reap_cgroups
from waiting import wait_for

from reconciler.executor.prepared import PreparedPool
from reconciler.executor.sandbox import Limits, Sandbox, SandboxError, SandboxSpec

pytestmark = pytest.mark.root

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = f"spos-test-{os.getpid()}"
AGENT_DIR = "/var/lib/systemprompt-os/agents/probe"
OUTPUT = f"{AGENT_DIR}/output"
PYTHON = "/usr/bin/python3"
SH = "/bin/sh"
WAIT_SECONDS = 20


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox needs root (namespaces, cgroups)"
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    if not Path(PYTHON).exists():
        return f"{PYTHON} is needed to write probe actions"
    ready, why = Sandbox(cgroup_root=str(CGROUP_ROOT)).available()
    return None if ready else why


_SKIP = _why_not()
if _SKIP:
    pytestmark = [pytest.mark.root, pytest.mark.skip(reason=_SKIP)]


@pytest.fixture(scope="module", autouse=True)
def _parent_cgroup():
    """Remove the session's cgroups, runs a failed test left behind included."""
    yield
    reap_cgroups(PARENT, str(CGROUP_ROOT))


@pytest.fixture
def device_root(tmp_path) -> Path:
    root = tmp_path / "device"
    for sub in ("output", "tmp/run", "checkpoints/run"):
        (root / AGENT_DIR.lstrip("/") / sub).mkdir(parents=True)
    return root


@pytest.fixture
def launcher(request) -> str:
    """Which launcher the sandbox uses: the installation's (the compiled one where it was
    built), or, for the tests marked BOTH_LAUNCHERS, each one in turn."""
    return getattr(request, "param", "installed")


def sandbox_with(root: Path, launcher: str) -> Sandbox:
    """A sandbox for the device at `root` using `launcher` (the `launcher` fixture's value)."""
    sandbox = Sandbox(root=str(root), cgroup_root=str(CGROUP_ROOT))
    if launcher == "python":
        sandbox.launcher = None
    elif launcher == "compiled" and not sandbox.launcher:
        pytest.skip("this installation has no compiled launcher (no C compiler when installed)")
    return sandbox


@pytest.fixture
def sandbox(device_root, launcher) -> Sandbox:
    return sandbox_with(device_root, launcher)


# The launcher's contract (Landlock, user, fds, signals, environment, exec errors), checked
# against launch.c and _launch.py alike: either may start any installation's actions.
BOTH_LAUNCHERS = pytest.mark.parametrize("launcher", ["compiled", "python"], indirect=True)


class Runner:
    """Start a spec, wait (bounded), collect the output, always clean the run up."""

    def __init__(self, sandbox: Sandbox, tmp_path: Path):
        self.sandbox = sandbox
        self.tmp_path = tmp_path
        self.runs = []

    def spec(self, argv, **fields) -> SandboxSpec:
        defaults = dict(
            env={"PATH": "/usr/bin:/bin", "HOME": f"{AGENT_DIR}/tmp/run"},
            cwd=f"{AGENT_DIR}/tmp/run",
            write=(OUTPUT, f"{AGENT_DIR}/tmp/run", f"{AGENT_DIR}/checkpoints/run"),
            execute=(SH, PYTHON, "/usr/bin/ls", "/usr/bin/cat", "/usr/bin/grep", "/usr/bin/id",
                     "/usr/bin/env", "/usr/bin/sleep", "/usr/bin/touch", "/usr/bin/mount"),
            cgroup_name=f"{PARENT}/{uuid.uuid4().hex[:12]}",
        )
        defaults.update(fields)
        return SandboxSpec(argv=list(argv), **defaults)

    def start(self, spec: SandboxSpec, **kwargs):
        output = open(self.tmp_path / f"out-{uuid.uuid4().hex[:8]}", "w+b")
        run = self.sandbox.spawn(spec, stdout=output.fileno(), stderr=output.fileno(), **kwargs)
        self.runs.append(run)
        return run, output

    def __call__(self, argv, **fields) -> tuple[int, str, object]:
        run, output = self.start(self.spec(argv, **fields))
        code = run.wait(timeout=WAIT_SECONDS)
        output.seek(0)
        return code, output.read().decode(errors="replace"), run

    def close(self):
        for run in self.runs:
            run.cleanup()


@pytest.fixture
def sandboxed(sandbox, tmp_path):
    runner = Runner(sandbox, tmp_path)
    yield runner
    runner.close()


def sh(script: str) -> list[str]:
    return [SH, "-c", script]


def py(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def cgroup_dirs(name: str) -> list[Path]:
    return [CGROUP_ROOT / c / name for c in ("memory", "pids", "cpu", "cpuacct", "freezer",
                                               "devices", "blkio") if (CGROUP_ROOT / c).is_dir()]


# -- the file system ------------------------------------------------------------------------

def test_the_root_file_system_is_read_only(sandboxed):
    code, out, _ = sandboxed(sh("touch /etc/spos-probe; echo touch=$?"))
    assert "Read-only file system" in out and "touch=1" in out
    assert not Path("/etc/spos-probe").exists()


def test_a_writable_path_is_written_on_the_host_under_the_root(sandboxed, device_root):
    code, out, _ = sandboxed(sh(f"echo from-inside > {OUTPUT}/report.txt && echo ok"))
    assert (code, out.strip()) == (0, "ok")
    assert (device_root / OUTPUT.lstrip("/") / "report.txt").read_text() == "from-inside\n"


def test_a_denied_path_under_a_writable_dir_is_hidden_and_unwritable(sandboxed, device_root):
    output = device_root / OUTPUT.lstrip("/")
    (output / "secret").mkdir()
    (output / "secret" / "key").write_text("s3cret")
    (output / "token.txt").write_text("t0ken")
    script = f"""
        ls -A {OUTPUT}/secret; echo ls=$?
        cat {OUTPUT}/secret/key; echo catdir=$?
        echo x > {OUTPUT}/secret/new; echo writedir=$?
        cat {OUTPUT}/token.txt; echo catfile=$?
        echo x > {OUTPUT}/token.txt; echo writefile=$?
        echo fine > {OUTPUT}/allowed.txt; echo allowed=$?
    """
    code, out, _ = sandboxed(sh(script), denied=(f"{OUTPUT}/secret", f"{OUTPUT}/token.txt"))
    assert "s3cret" not in out and "t0ken" not in out
    for probe in ("ls", "catdir", "writedir", "catfile", "writefile"):
        assert f"{probe}=0" not in out, out
    assert "allowed=0" in out
    assert (output / "token.txt").read_text() == "t0ken"
    assert sorted(p.name for p in (output / "secret").iterdir()) == ["key"]


def test_a_denied_path_cannot_be_moved_out_of_hiding_for_the_next_run(sandboxed, device_root):
    """A run may not rename a directory on the way to a denied path (inside a writable one), so
    that the next run, which hides the denied path by its name, sees it under another name."""
    output = device_root / OUTPUT.lstrip("/")
    (output / "a" / "b").mkdir(parents=True)
    (output / "a" / "b" / "key").write_text("s3cret")
    (output / "a" / "b" / "dir").mkdir()
    (output / "a" / "b" / "dir" / "inner").write_text("s3cret")
    denied = (f"{OUTPUT}/a/b/key", f"{OUTPUT}/a/b/dir")
    script = f"""
        mv {OUTPUT}/a {OUTPUT}/moved-a; echo mv-a=$?
        mv {OUTPUT}/a/b {OUTPUT}/moved-b; echo mv-b=$?
        mv {OUTPUT}/a/b {OUTPUT}/a/c; echo mv-c=$?
        echo fine > {OUTPUT}/a/b/other; echo write=$?
    """
    code, out, _ = sandboxed(sh(script), denied=denied, execute=(SH, "/usr/bin/mv"))
    assert "write=0" in out, out
    for probe in ("mv-a", "mv-b", "mv-c"):
        assert f"{probe}=0" not in out, out
    code, out, _ = sandboxed(sh(f"cat {OUTPUT}/*/key {OUTPUT}/*/*/key {OUTPUT}/*/*/dir/inner"),
                             denied=denied)
    assert "s3cret" not in out
    assert (output / "a" / "b" / "key").read_text() == "s3cret"


def test_a_writable_path_through_a_symlink_is_refused(sandboxed, device_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (device_root / "data").symlink_to(elsewhere)
    with pytest.raises(SandboxError, match="symbolic link|symlink"):
        sandboxed(["/bin/true"], write=("/data",))


@BOTH_LAUNCHERS
def test_reads_outside_the_capability_are_refused(sandboxed, device_root):
    opt = device_root / "opt/agents/probe"
    opt.mkdir(parents=True)
    (opt / "config").write_text("readable")
    script = ("cat /opt/agents/probe/config; ls /root; echo root=$?; "
              "ls /var/lib/dpkg >/dev/null; echo dpkg=$?")
    code, out, _ = sandboxed(sh(script), read=("/opt/agents/probe",))
    assert "readable" in out
    assert "root=0" not in out and "dpkg=0" not in out


@BOTH_LAUNCHERS
@pytest.mark.parametrize("kind", ["read", "execute"])
def test_a_link_planted_at_a_rule_path_on_a_writable_mount_is_refused(sandbox, launcher, tmp_path,
                                                                       kind):
    """With the device's own root, read and execute paths are not bound: the launcher opens
    them in the view. A run that may write where such a path lies can leave a link there for
    the agent's next run, pointing the rule at "/"; that rule must not widen to everything."""
    data = Path(tempfile.mkdtemp(prefix="spos-test-", dir="/var/tmp"))
    runner = Runner(sandbox_with(Path("/"), launcher), tmp_path)
    try:
        (data / "real").mkdir()
        (data / "sub").symlink_to("/")           # a link as the last component
        (data / "via").symlink_to(data / "sub")  # and one on the way to it
        script = "head -c 5 /etc/shadow; echo shadow=$?; /usr/bin/id -u; echo id=$?"
        for path in (f"{data}/sub", f"{data}/via/etc"):
            rule = {"read": (path,), "execute": (SH, "/usr/bin/head", path)}[kind]
            fields = dict(cwd="/", write=(str(data),), execute=(SH, "/usr/bin/head"))
            code, out, run = runner(sh(script), **{**fields, kind: rule})
            assert "shadow=0" not in out and "id=0" not in out, out
            assert code == 126 and "symbolic link on a writable mount" in run.setup_error()
        # A link on the read-only host tree is followed as before (/etc/localtime, /lib64...).
        host_link = next(p for p in ("/etc/localtime", "/lib64", "/bin") if os.path.islink(p))
        code, out, run = runner(sh(f"ls {host_link} >/dev/null; echo ls=$?"), cwd="/",
                                write=(str(data),), read=(host_link,),
                                execute=(SH, "/usr/bin/ls"))
        assert run.setup_error() is None and "ls=0" in out, out
    finally:
        runner.close()
        shutil.rmtree(data)


# -- processes, network, privileges ------------------------------------------------------------

def test_host_processes_are_invisible(sandboxed):
    code, out, _ = sandboxed(sh("ls /proc; cat /proc/1/comm"))
    pids = {int(word) for word in out.split() if word.isdigit()}
    assert pids and max(pids) < 20, out
    assert os.getpid() not in pids or os.getpid() < 20
    assert "bwrap" in out  # the namespace's init is bubblewrap's reaper, not the host's


class LoopbackListener:
    """A real listener on the host's 127.0.0.1 that greets whoever connects (bounded)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(WAIT_SECONDS)
        self.port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            while True:
                connection, _ = self.socket.accept()
                with connection:
                    connection.sendall(b"hello-from-host")
        except OSError:
            return

    def close(self):
        self.socket.close()


@pytest.fixture
def listener():
    server = LoopbackListener()
    yield server
    server.close()


def _connect(port: int) -> list[str]:
    return py(
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        "    print('got', s.recv(100).decode())\n"
        "except OSError as e:\n"
        "    print('failed', type(e).__name__, e.errno)\n"
    )


def test_the_hosts_loopback_is_unreachable_without_network(sandboxed, listener):
    code, out, _ = sandboxed(_connect(listener.port))
    assert "failed ConnectionRefusedError" in out, out


def test_the_hosts_loopback_is_reachable_with_network(sandboxed, listener):
    code, out, _ = sandboxed(_connect(listener.port), network=True)
    assert "got hello-from-host" in out, out


# What a run without network prints: its network namespace, whether its own loopback carries
# a connection from itself to itself, and what came of trying to take the loopback down (for
# the next run in the same namespace).
_OWN_LOOPBACK = py(
    "import fcntl, os, socket, struct, time\n"
    "print('netns', os.readlink('/proc/self/ns/net'))\n"
    "server = socket.create_server(('127.0.0.1', 0))\n"
    "client = socket.create_connection(server.getsockname(), timeout=5)\n"
    "peer, _ = server.accept(); peer.sendall(b'own'); print('loopback', client.recv(3).decode())\n"
    "try:\n"
    "    fcntl.ioctl(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), 0x8914,\n"
    "                struct.pack('16sH22x', b'lo', 0))\n"  # SIOCSIFFLAGS: every flag off
    "    print('down done')\n"
    "except OSError as e:\n"
    "    print('down', e.errno)\n"
    "time.sleep(0.3)\n"  # long enough for two runs started together to overlap
)


def _lines(output) -> dict[str, str]:
    output.seek(0)
    return dict(line.split(" ", 1) for line in output.read().decode().splitlines())


def _netns_and_loopback(output) -> tuple[str, str]:
    lines = _lines(output)
    return lines.get("netns", ""), lines.get("loopback", "")


@BOTH_LAUNCHERS
def test_runs_without_network_take_turns_on_a_namespace_never_two_at_once(sandboxed):
    """Runs of one agent (cgroups under one parent) without network reuse the namespace of a
    run that ended, one run at a time: two runs at once have two; the next run, once one has
    ended and been cleaned up, gets that one back, its loopback still working; the host's is
    never handed out."""
    host = os.readlink("/proc/self/ns/net")
    first, first_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    second, second_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    assert first.wait(timeout=WAIT_SECONDS) == 0 and second.wait(timeout=WAIT_SECONDS) == 0
    first_ns, first_loop = _netns_and_loopback(first_out)
    second_ns, second_loop = _netns_and_loopback(second_out)
    assert first_loop == second_loop == "own"
    assert _lines(first_out)["down"] == str(errno.EPERM)  # no capability to change it
    assert first_ns.startswith("net:[") and second_ns.startswith("net:[")
    assert first_ns != second_ns, "two runs at once shared a network namespace"
    assert host not in (first_ns, second_ns)

    first.cleanup()
    second.cleanup()
    assert sandboxed.sandbox.networks.kept() == 2
    third, third_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    assert third.wait(timeout=WAIT_SECONDS) == 0
    third_ns, third_loop = _netns_and_loopback(third_out)
    assert third_ns in (first_ns, second_ns) and third_loop == "own"


def test_a_run_whose_cgroup_cannot_be_removed_never_hands_its_namespace_on(sandboxed, monkeypatch):
    """A process of such a run may still be in its namespace: it is closed, never kept."""
    from reconciler.executor.cgroup import CgroupError

    run, _ = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    assert run.wait(timeout=WAIT_SECONDS) == 0
    kind = type(run._cgroup)
    remove = kind.remove

    def refused(self):
        raise CgroupError("the cgroup is busy")

    monkeypatch.setattr(kind, "remove", refused)
    with pytest.raises(SandboxError, match="busy"):
        run.cleanup()
    monkeypatch.setattr(kind, "remove", remove)
    run.cleanup()  # it goes now; its namespace went with the failure
    assert sandboxed.sandbox.networks.kept() == 0


def test_runs_of_another_agent_never_get_an_agents_namespace(sandboxed):
    """The namespaces kept for one agent's runs go to that agent's runs alone."""
    first, first_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    assert first.wait(timeout=WAIT_SECONDS) == 0
    first.cleanup()
    other, other_out = sandboxed.start(sandboxed.spec(
        _OWN_LOOPBACK, cgroup_name=f"{PARENT}/other-agent/{uuid.uuid4().hex[:12]}"))
    try:
        assert other.wait(timeout=WAIT_SECONDS) == 0
        assert _netns_and_loopback(other_out)[0] != _netns_and_loopback(first_out)[0]
        assert _netns_and_loopback(other_out)[1] == "own"
    finally:
        other.cleanup()
        reap_cgroups(f"{PARENT}/other-agent", str(CGROUP_ROOT))


def test_a_run_with_network_is_never_given_a_kept_namespace(sandboxed):
    first, first_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK))
    assert first.wait(timeout=WAIT_SECONDS) == 0
    first.cleanup()
    host, host_out = sandboxed.start(sandboxed.spec(_OWN_LOOPBACK, network=True))
    assert host.wait(timeout=WAIT_SECONDS) == 0
    assert _netns_and_loopback(host_out)[0] == os.readlink("/proc/self/ns/net")
    assert sandboxed.sandbox.networks.kept() == 1


@BOTH_LAUNCHERS
def test_tcp_connect_is_limited_to_the_listed_ports(sandboxed, listener):
    allowed_code, allowed, _ = sandboxed(_connect(listener.port), network=True,
                                         connect_ports=(listener.port,))
    other_code, other, _ = sandboxed(_connect(listener.port), network=True,
                                     connect_ports=(listener.port + 1,))
    assert "got hello-from-host" in allowed, allowed
    assert "failed PermissionError 13" in other, other


def test_mount_fails(sandboxed):
    code, out, _ = sandboxed(sh("mount -t tmpfs none /mnt; echo mount=$?"))
    assert "mount=0" not in out and "mount=" in out, out


@BOTH_LAUNCHERS
def test_no_new_privileges_no_capabilities_default_signals(sandboxed):
    wanted = "NoNewPrivs|CapEff|CapPrm|CapAmb|SigIgn|SigBlk"
    code, out, _ = sandboxed(sh(f"grep -E '^({wanted}):' /proc/self/status"))
    fields = dict(line.split(":\t") for line in out.strip().splitlines())
    assert fields["NoNewPrivs"] == "1"
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == int(fields["CapAmb"], 16) == 0
    assert int(fields["SigIgn"], 16) == 0 and int(fields["SigBlk"], 16) == 0


@pytest.mark.parametrize("landlock", ["landlock", "mounts only"])
def test_sysctls_cannot_be_written(sandboxed, landlock):
    if landlock == "mounts only":
        sandboxed.sandbox.landlock_abi = 0  # what a kernel without Landlock gets
    code, out, _ = sandboxed(sh(
        "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern; echo sysctl=$?"))
    assert "sysctl=2" in out, out  # the same value written back: harmless if it ever passed


def test_without_landlock_the_sandbox_says_what_it_cannot_enforce(device_root):
    sandbox = Sandbox(root=str(device_root), cgroup_root=str(CGROUP_ROOT))
    sandbox.landlock_abi = 0
    ready, why = sandbox.available()
    assert ready and "Landlock unavailable: executables and reads are NOT limited" in why


@BOTH_LAUNCHERS
def test_runs_as_the_configured_user(sandboxed, device_root):
    (device_root / OUTPUT.lstrip("/")).chmod(0o777)
    code, out, _ = sandboxed(sh(f"id -u; grep CapEff /proc/self/status; touch {OUTPUT}/mine"),
                             user="nobody")
    assert out.split()[0] == "65534", out
    assert "0000000000000000" in out
    assert (device_root / OUTPUT.lstrip("/") / "mine").stat().st_uid == 65534


@BOTH_LAUNCHERS
def test_the_environment_is_exactly_the_specs(sandboxed):
    env = {"PATH": "/usr/bin:/bin", "SPOS_RUN_ID": "r-1", "WITH_EQUALS": "a=b"}
    code, out, _ = sandboxed(["/usr/bin/env"], env=env)
    assert sorted(out.strip().splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


@BOTH_LAUNCHERS
def test_the_environment_is_in_no_command_line(sandboxed):
    spec = sandboxed.spec(["/usr/bin/sleep", "5"], env={"API_TOKEN": "tok-5ecret-value"})
    run, _ = sandboxed.start(spec)
    procs = CGROUP_ROOT / "pids" / spec.cgroup_name / "cgroup.procs"
    deadline = time.monotonic() + WAIT_SECONDS
    command_lines = {}
    while time.monotonic() < deadline:
        command_lines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()
                         for pid in procs.read_text().split()}
        if any(line.startswith(b"/usr/bin/sleep") for line in command_lines.values()):
            break
        time.sleep(0.01)
    run.kill_all()
    assert any(line.startswith(b"/usr/bin/sleep") for line in command_lines.values())
    assert not [line for line in command_lines.values() if b"5ecret" in line]


# -- executables --------------------------------------------------------------------------------

@BOTH_LAUNCHERS
def test_only_listed_programs_may_be_executed(sandboxed):
    script = "/usr/bin/ls /usr >/dev/null; echo ls=$?; /usr/bin/id -u; echo id=$?"
    code, out, _ = sandboxed(sh(script), execute=(SH, "/usr/bin/id"))
    assert "ls=126" in out and "Permission denied" in out, out
    assert "id=0" in out
    code, out, _ = sandboxed(sh(script), execute=(SH, "/usr/bin/ls", "/usr/bin/id"))
    assert "ls=0" in out and "id=0" in out, out


@BOTH_LAUNCHERS
def test_argv0_and_its_script_interpreter_are_executable_without_listing(sandboxed, device_root):
    script = device_root / OUTPUT.lstrip("/") / "job.sh"
    script.write_text("#!/bin/sh\necho script-ran\n/usr/bin/id -u; echo id=$?\n")
    script.chmod(0o755)
    code, out, _ = sandboxed([f"{OUTPUT}/job.sh"], execute=())
    assert "script-ran" in out and "id=126" in out, out


def test_a_fifo_in_place_of_the_program_is_never_opened_by_the_executor(sandboxed, device_root):
    """The executor reads a program's first line (a script's interpreter is executable too) as
    root, outside the sandbox. Something a run left where a task's program lies, a FIFO here (a
    device could rewind a tape on opening), is not opened: a writer waiting for a reader stays
    waiting, and the run fails to execute it."""
    program = device_root / OUTPUT.lstrip("/") / "job"
    os.mkfifo(program)
    opened = threading.Event()

    def writer():
        fd = os.open(program, os.O_WRONLY)  # returns once something opens the FIFO to read
        opened.set()
        os.close(fd)

    waiting = threading.Thread(target=writer, daemon=True)
    waiting.start()
    try:
        code, _, _ = sandboxed([f"{OUTPUT}/job"], execute=())
        assert code != 0
        assert not opened.wait(0.5)
    finally:
        os.close(os.open(program, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        waiting.join(5)


@BOTH_LAUNCHERS
def test_a_missing_program_is_a_setup_error(sandboxed):
    code, out, run = sandboxed(["/usr/bin/no-such-program"])
    assert code == 127
    assert "cannot execute /usr/bin/no-such-program" in run.setup_error()


@BOTH_LAUNCHERS
def test_a_run_that_started_has_no_setup_error(sandboxed):
    code, out, run = sandboxed(["/bin/true"], execute=())
    assert code == 0 and run.setup_error() is None


def test_a_missing_working_directory_is_refused_before_anything_starts(sandboxed):
    with pytest.raises(SandboxError, match="working directory"):
        sandboxed(["/bin/true"], cwd="/no/such/dir")


@pytest.mark.parametrize("launcher", ["python"], indirect=True)
def test_a_denied_path_may_not_hide_the_python_launcher(sandboxed, sandbox):
    with pytest.raises(SandboxError, match="hides"):
        sandboxed(["/bin/true"], denied=(os.path.dirname(sandbox.python),))


@pytest.mark.parametrize("launcher", ["compiled"], indirect=True)
def test_the_compiled_launcher_starts_where_spos_itself_is_hidden(sandboxed, sandbox):
    hidden = os.path.dirname(sandbox.launcher)
    code, out, run = sandboxed(sh(f"ls {hidden}; echo ls=$?"), denied=(hidden,))
    assert run.setup_error() is None and "ls=0" not in out, out


def test_the_installation_has_the_compiled_launcher_where_a_compiler_exists(sandbox):
    """setup.py builds it at install time (pip install -e . included); without it every run
    starts about 15 ms slower, through Python."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the Python launcher is the expected one")
    assert sandbox.launcher, ("no compiled launcher matches reconciler/executor/launch.c: "
                              "install spos again (pip install -e .)")
    assert "launcher " + sandbox.launcher in sandbox.available()[1]


@BOTH_LAUNCHERS
@pytest.mark.parametrize("arguments", [b"", b"x\0", b"5\0", b"5\00\00\0\0\0" + b"0\0" * 6,
                                       b"5\00\00\0\0\0" + b"0\0" * 7 + b"0\0/bin/true\0"])
def test_malformed_launcher_arguments_fail_cleanly(sandbox, arguments):
    """What only a bug could send: refused with exit 126 and a message, never run half-read."""
    import tempfile

    with tempfile.TemporaryFile() as args:
        args.write(arguments)
        args.seek(0)
        command = ([sandbox.launcher] if sandbox.launcher else
                   [sandbox.python, "-I", "-S", "-c", sandbox._launcher_source])
        done = subprocess.run([*command, str(args.fileno())], pass_fds=(args.fileno(),),
                              capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert done.returncode == 126, done
    assert done.stderr.startswith("spos sandbox: launcher arguments are malformed"), done.stderr


@pytest.mark.parametrize("launcher", ["compiled"], indirect=True)
@pytest.mark.parametrize("step, said", [
    ("join", "cannot join the run's cgroup"),
    ("netns", "cannot enter the run's network namespace"),
])
def test_a_child_that_cannot_enter_the_run_never_starts_bubblewrap(sandbox, tmp_path, step, said):
    """The compiled launcher's `--enter` mode stands between the executor and bubblewrap:
    when it cannot put itself into the run's cgroup, or into the network namespace the run is
    handed (netns.py), nothing of the run may start outside them. It says why on the setup
    pipe, exits 126 and executes nothing."""
    marker = tmp_path / "ran"
    read_end, setup = os.pipe()
    not_it = os.open("/dev/null", os.O_RDONLY)  # stands in for a cgroup.procs fd or a namespace
    join, netns = (str(not_it), "-") if step == "join" else ("", str(not_it))
    try:
        done = subprocess.run(
            [sandbox.launcher, "--enter", str(setup), "-", str(setup), join, netns,
             "--", "/usr/bin/touch", str(marker)],
            pass_fds=(setup, not_it), capture_output=True, text=True, timeout=WAIT_SECONDS)
        os.close(setup)
        reported = os.read(read_end, 4096).decode()
    finally:
        os.close(read_end)
        os.close(not_it)
    assert done.returncode == 126, done
    assert reported.startswith(f"spos sandbox: cannot start bubblewrap: {said}"), reported
    assert not marker.exists()


# -- fds, devices -------------------------------------------------------------------------------

@BOTH_LAUNCHERS
def test_only_fds_0_to_2_are_open(sandboxed):
    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable, not passed: must not leak
    try:
        code, out, _ = sandboxed(sh("ls /proc/$$/fd"))
    finally:
        os.close(stray)
    assert sorted(int(x) for x in out.split()) == [0, 1, 2], out


@BOTH_LAUNCHERS
def test_passed_fds_stay_open_under_their_numbers(sandboxed):
    read_end, write_end = os.pipe()
    try:
        run, output = sandboxed.start(sandboxed.spec(py(
            "import os\n"
            "def is_open(fd):\n"
            "    try:\n"
            "        return os.fstat(fd) is not None\n"
            "    except OSError:\n"
            "        return False\n"
            "print(*[fd for fd in range(1024) if is_open(fd)])\n"
            f"os.write({write_end}, b'progress 50\\n')\n"
        )), pass_fds=(write_end,))
        os.close(write_end)
        assert run.wait(timeout=WAIT_SECONDS) == 0
        output.seek(0)
        assert sorted(int(x) for x in output.read().split()) == sorted([0, 1, 2, write_end])
        assert os.read(read_end, 100) == b"progress 50\n"
    finally:
        os.close(read_end)


def test_only_allowed_device_nodes_exist_and_the_devices_cgroup_says_so(sandboxed, device_root):
    master, slave = os.openpty()  # the pty's slave stands in for a USB serial adapter
    try:
        node = device_root / "dev/ttyUSB0"
        node.parent.mkdir()
        node.symlink_to(os.ttyname(slave))
        rdev = os.fstat(slave).st_rdev
        spec = sandboxed.spec(sh("ls /dev; echo reading > /dev/ttyUSB0; echo tty=$?; sleep 5"),
                              devices=("/dev/ttyUSB0",))
        run, output = sandboxed.start(spec)
        deadline = time.monotonic() + WAIT_SECONDS
        data = b""
        while b"reading" not in data and time.monotonic() < deadline:
            data += os.read(master, 100) if _readable(master) else b""
        rules = (CGROUP_ROOT / "devices" / spec.cgroup_name / "devices.list").read_text().split("\n")
        run.kill_all()
        run.wait(timeout=WAIT_SECONDS)
        output.seek(0)
        listing = output.read().decode().split()
    finally:
        os.close(master)
        os.close(slave)
    assert b"reading" in data
    assert "ttyUSB0" in listing and not {"sda", "vda", "mem", "kmsg"} & set(listing)
    assert f"c {os.major(rdev)}:{os.minor(rdev)} rwm" in rules and "a *:* rwm" not in rules
    assert "c 1:3 rwm" in rules  # /dev/null


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0.1)[0])


# -- cgroup limits, killing, usage ----------------------------------------------------------------

def test_a_memory_hog_is_oom_killed_alone(sandboxed):
    script = f"""
        sleep 30 & sibling=$!
        {PYTHON} -c "x = b'x' * (300 << 20); print('survived')"
        echo hog=$?
        kill -0 $sibling && echo sibling-alive
        kill $sibling
    """
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        code, out, run = sandboxed(sh(script), limits=Limits(memory_bytes=64 << 20))
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert "survived" not in out and "hog=137" in out and "sibling-alive" in out, out
    assert code == 0
    assert run.oom_killed()


def test_quota_limits_are_applied(sandboxed):
    limits = Limits(cpu_percent=20, memory_bytes=96 << 20, tasks_max=16, nice=7)
    spec = sandboxed.spec(py(
        "import os, time\n"
        "print('nice', os.getpriority(os.PRIO_PROCESS, 0), flush=True)\n"
        "end = time.monotonic() + 1.0\n"
        "while time.monotonic() < end: pass\n"
    ), limits=limits)
    run, output = sandboxed.start(spec)
    files = {f: (CGROUP_ROOT / f.split(".")[0] / spec.cgroup_name / f).read_text().strip()
             for f in ("memory.limit_in_bytes", "cpu.cfs_quota_us", "cpu.cfs_period_us", "pids.max")}
    assert run.wait(timeout=WAIT_SECONDS) == 0
    output.seek(0)
    assert "nice 7" in output.read().decode()
    assert files == {"memory.limit_in_bytes": str(96 << 20), "cpu.cfs_quota_us": "20000",
                     "cpu.cfs_period_us": "100000", "pids.max": "18"}
    assert run.usage()["cpuSeconds"] < 0.5  # 1 s of spinning at 20 % of one CPU


def test_tasks_max_limits_forks(sandboxed):
    code, out, _ = sandboxed(py(
        "import os, time\n"
        "children = []\n"
        "try:\n"
        "    for _ in range(50):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(10); os._exit(0)\n"
        "        children.append(pid)\n"
        "except OSError as e:\n"
        "    print('fork failed', e.errno)\n"
        "print('forked', len(children))\n"
        "for pid in children: os.kill(pid, 9)\n"
    ), limits=Limits(tasks_max=8))
    assert "fork failed 11" in out and "forked 7" in out, out  # 8 tasks: the action + 7


def test_kill_all_kills_double_forked_sigterm_ignoring_children(sandboxed):
    spec = sandboxed.spec(py(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        print('grandchild', flush=True)\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    ))
    run, output = sandboxed.start(spec)
    procs = CGROUP_ROOT / "pids" / spec.cgroup_name / "cgroup.procs"
    deadline = time.monotonic() + WAIT_SECONDS
    while b"grandchild" not in (output.seek(0) or output.read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = {int(p) for p in procs.read_text().split()}
    assert len(pids) >= 4  # bwrap, its init, the action, the double-forked grandchild

    run.terminate()
    time.sleep(0.3)
    assert run.poll() is None  # SIGTERM is ignored

    run.kill_all()
    assert run.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
    assert procs.read_text().split() == []
    assert not _still_running(pids)


def _still_running(pids: set[int]) -> list[int]:
    """Those of pids still running after a bounded wait: a process leaves its cgroup just before
    the end of exit(2), so an empty cgroup can briefly outlive the processes' last instructions."""
    deadline = time.monotonic() + 2
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.01)
    return [pid for pid in pids if _alive(pid)]


def _running(spec: SandboxSpec, program: bytes, hierarchy: Path = CGROUP_ROOT / "pids") -> int:
    """How many processes of the run's cgroup run `program` (their command line's first word):
    until then, the launcher is still setting the sandbox up."""
    count = 0
    for pid in (hierarchy / spec.cgroup_name / "cgroup.procs").read_text().split():
        try:
            count += Path(f"/proc/{pid}/cmdline").read_bytes().startswith(program + b"\0")
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            pass
    return count


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or dead and waiting for the host's init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_terminate_ends_a_cooperative_action(sandboxed):
    """Once the action runs: before, the SIGTERM would find only bubblewrap and its init,
    which it spares, and nothing would end."""
    spec = sandboxed.spec(["/usr/bin/sleep", "60"])
    run, _ = sandboxed.start(spec)
    wait_for(lambda: _running(spec, b"/usr/bin/sleep") == 1, "the action to run", WAIT_SECONDS)
    run.terminate()
    assert run.wait(timeout=WAIT_SECONDS) == -signal.SIGTERM


def test_usage_reports_cpu_and_memory(sandboxed):
    code, out, run = sandboxed(py(
        "import time\n"
        "block = bytearray(80 << 20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
    ))
    usage = run.usage()
    assert code == 0
    assert 0.3 <= usage["cpuSeconds"] < 5
    assert 80 << 20 <= usage["peakMemoryBytes"] < 400 << 20
    assert all(usage[k] is None or usage[k] >= 0 for k in ("readBytes", "writeBytes"))


def test_every_process_of_a_run_is_in_its_cgroup_in_every_hierarchy(sandboxed):
    """The forked child joins by moving its one thread (v1 `tasks`), which moves the whole
    process: bubblewrap, its init, the action and the action's children are all inside."""
    spec = sandboxed.spec(sh("sleep 60 & exec sleep 61"))
    run, _ = sandboxed.start(spec)
    procs = CGROUP_ROOT / "pids" / spec.cgroup_name / "cgroup.procs"
    deadline = time.monotonic() + WAIT_SECONDS
    while len(procs.read_text().split()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = set(procs.read_text().split())
    try:
        assert len(pids) == 4, pids  # bwrap, its init, sleep 61 (the action), sleep 60
        for directory in cgroup_dirs(spec.cgroup_name):
            assert set((directory / "cgroup.procs").read_text().split()) == pids, directory
            assert set((directory / "tasks").read_text().split()) == pids, directory
        for pid in pids:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            for line in lines:
                _, controllers, path = line.split(":", 2)
                if set(controllers.split(",")) & {"memory", "pids", "cpu", "cpuacct", "freezer",
                                                   "devices", "blkio"}:
                    assert path == f"/{spec.cgroup_name}", (pid, line)
    finally:
        run.kill_all()


def test_after_a_normal_exit_the_cgroup_empties_without_killing(sandboxed, monkeypatch):
    """bubblewrap reports the exit while its namespace's init is still on its way out:
    `settle` waits for it on pidfds (here with a generous bound) instead of killing."""
    from reconciler.executor import sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_SETTLE_SECONDS", 10.0)
    for _ in range(5):
        spec = sandboxed.spec(["/bin/true"])
        run, _ = sandboxed.start(spec)
        killed = []
        run.kill_all = lambda: killed.append(True)
        assert run.wait(timeout=WAIT_SECONDS) == 0
        began = time.monotonic()
        run.settle()
        assert time.monotonic() - began < 2
        assert not killed
        for directory in cgroup_dirs(spec.cgroup_name):
            assert (directory / "cgroup.procs").read_text().split() == [], directory
        run.cleanup()
        assert not [d for d in cgroup_dirs(spec.cgroup_name) if d.exists()]


def test_a_process_moved_out_of_a_runs_first_hierarchy_is_still_killed_at_removal():
    """Waiting for a run's processes to leave looks at one v1 hierarchy (they leave all at once
    when they exit, and none in a sandbox can move itself). Something outside the sandbox that
    moves one of them (an operator, systemd re-applying its unit's settings) may hide it from
    that look: the cgroup's removal still finds it, in another hierarchy, and kills it."""
    from reconciler.executor.cgroup import Cgroups

    cgroups = Cgroups(str(CGROUP_ROOT))
    run = cgroups.create(f"{PARENT}/moved-{uuid.uuid4().hex[:8]}", Limits(), ())
    if len(run.directories) < 2:
        pytest.skip("one hierarchy only (cgroup v2): nothing to move between")
    joins = run.open_join_fds()
    process = subprocess.Popen(["/usr/bin/sleep", "60"], pass_fds=joins,
                               preexec_fn=lambda: [os.write(fd, b"0") for fd in joins])
    for fd in joins:
        os.close(fd)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while process.pid not in run.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        first = run.directories[0]
        Path(first).parent.joinpath("cgroup.procs").write_text(str(process.pid))
        assert run.exiting() == set() and run.pids() == {process.pid}
        run.remove()
        assert process.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
        assert not run.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bind_sources_are_the_directories_at_their_paths_and_no_fd_is_left(tmp_path):
    """A run's bind sources are opened component by component without following links,
    sharing the directories paths have in common: each fd is the directory at its path, a
    link anywhere on the way is refused, and nothing else stays open."""
    from reconciler.executor.sandbox import _open_without_links

    agent = tmp_path / AGENT_DIR.lstrip("/")
    for sub in ("tmp/r1", "checkpoints/r1", "output"):
        (agent / sub).mkdir(parents=True)
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    (agent / "link").symlink_to(tmp_path / "elsewhere")

    def opened(paths: list[str]) -> list[int] | SandboxError:
        walked: dict[str, int] = {}
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(_open_without_links(str(tmp_path), path, walked))
            return fds
        except SandboxError as exc:
            for fd in fds:
                os.close(fd)
            return exc
        finally:
            for fd in walked.values():
                os.close(fd)

    before = set(os.listdir("/proc/self/fd"))
    good = [f"{AGENT_DIR}/tmp/r1", f"{AGENT_DIR}/checkpoints/r1", f"{AGENT_DIR}/output",
            AGENT_DIR, f"{AGENT_DIR}/tmp", f"{AGENT_DIR}/output", "/"]
    fds = opened(good)
    try:
        for path, fd in zip(good, fds):
            assert os.fstat(fd).st_ino == os.stat(tmp_path / path.lstrip("/")).st_ino, path
        assert len(set(os.listdir("/proc/self/fd")) - before) == len(good)
    finally:
        for fd in fds:
            os.close(fd)
    for bad in ([f"{AGENT_DIR}/output", f"{AGENT_DIR}/link/x"], [f"{AGENT_DIR}/link"],
                [f"{AGENT_DIR}/output", f"{AGENT_DIR}/missing/x"]):
        assert isinstance(opened(bad), SandboxError), bad
    assert set(os.listdir("/proc/self/fd")) == before


def test_waiting_for_a_cgroup_to_empty_is_bounded_and_does_not_spin(sandboxed):
    spec = sandboxed.spec(["/usr/bin/sleep", "60"])
    run, _ = sandboxed.start(spec)
    cgroup = run._cgroup
    deadline = time.monotonic() + WAIT_SECONDS
    while len(cgroup.pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu, began = time.thread_time(), time.monotonic()
    assert not cgroup.empties_within(0.5)
    assert 0.5 <= time.monotonic() - began < 2
    assert time.thread_time() - cpu < 0.1  # slept on pidfds, not polling
    fds = run.leftovers()
    try:
        assert len(fds) == 3  # bwrap, its init, the action
    finally:
        for fd in fds:
            os.close(fd)
    run.kill_all()
    assert run.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
    assert cgroup.empties_within(0) and run.leftovers() == []


def test_cleanup_removes_the_runs_cgroup(sandboxed):
    spec = sandboxed.spec(["/bin/true"])
    run, _ = sandboxed.start(spec)
    assert all(d.is_dir() for d in cgroup_dirs(spec.cgroup_name))
    run.wait(timeout=WAIT_SECONDS)
    run.cleanup()
    assert not [d for d in cgroup_dirs(spec.cgroup_name) if d.exists()]


REAP_HELPER = """
import subprocess, sys, time
from reconciler.executor.sandbox import Sandbox, SandboxSpec
root, name, cwd = sys.argv[1:]
Sandbox(root=root).spawn(SandboxSpec(argv=["/usr/bin/sleep", "60"], env={}, cwd=cwd, write=(cwd,),
                                     cgroup_name=name), stdout=2, stderr=2)
print("started", flush=True)
time.sleep(60)
"""


def test_reap_cleans_up_after_an_executor_that_died(sandbox, device_root):
    name = f"{PARENT}/{uuid.uuid4().hex[:12]}"
    executor = subprocess.Popen(
        [sys.executable, "-c", REAP_HELPER, str(device_root), name, f"{AGENT_DIR}/tmp/run"],
        stdout=subprocess.PIPE)
    try:
        assert executor.stdout.readline() == b"started\n"
        procs = CGROUP_ROOT / "pids" / name / "cgroup.procs"
        deadline = time.monotonic() + WAIT_SECONDS
        while len(procs.read_text().split()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = {int(p) for p in procs.read_text().split()}
    finally:
        executor.kill()
        executor.wait()
    assert sandbox.reap(name)
    assert not [d for d in cgroup_dirs(name) if d.exists()]
    assert not _still_running(pids)
    assert sandbox.reap(name)  # nothing left: nothing to do


ORPHANS_HELPER = """
import os, shutil, subprocess, sys, time
from reconciler.executor import sandbox as module
from reconciler.executor.sandbox import Sandbox, SandboxSpec
root, parent = sys.argv[1:]
sandbox = Sandbox(root=root)
assert module.adopt_orphans() is None
others = [subprocess.Popen(["/bin/sh", "-c", "exit 3"]),  # children of its own, not sandboxes'
          subprocess.Popen([shutil.which("bwrap"), "--no-such-option"], stderr=subprocess.DEVNULL)]
left = []
for index, argv in enumerate([["/bin/true"]] * 3 + [["/bin/sh", "-c", "sleep 100 & exit 0"]] * 40):
    run = sandbox.spawn(SandboxSpec(argv=argv, env={}, execute=("/bin/sh", "/bin/sleep", "/usr/bin"),
                                    cgroup_name=f"{parent}/{index}"), stdout=2, stderr=2)
    run.wait(timeout=20)
    run.cleanup()
    left.append(open(f"/sys/fs/cgroup/pids/{parent}/pids.current").read().strip())
print(" ".join(sorted(set(left))), flush=True)
assert sorted(module._children()) == sorted(module._children_by_parent()) == sorted(o.pid for o in others)
print(*(other.wait() for other in others), flush=True)
subprocess.run(["/bin/sh", "-c", "(sleep 0.1 &)"])  # leaves an orphan that exits soon after
time.sleep(0.5)
module.reap_orphans(wait=0)
print(sum(module._adopted_kind(pid) == "exited" for pid in module._children()), flush=True)
module.reap_orphans(wait=0, adopted=True)
print(sum(module._adopted_kind(pid) == "exited" for pid in module._children()), flush=True)
"""


def test_an_executor_reaps_the_init_bubblewrap_leaves_and_nothing_else(device_root):
    """bubblewrap's monitor exits without reaping the sandbox's init. Left to the system's init,
    it would count against the agent's tasks limit until reaped (here, for about 2 s). The
    init may still be on its way out when the run's cgroup is empty (an action that left a
    process behind): it is waited for. A child of the caller's own keeps its exit status, even
    one named bwrap; other orphans are reaped only when asked (the executor's rescan)."""
    parent = f"{PARENT}/orphans-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-c", ORPHANS_HELPER, str(device_root), parent],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    for directory in cgroup_dirs(parent):
        if directory.exists():
            directory.rmdir()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0", "3 1", "1", "0"]


def test_a_death_by_signal_is_reported_negative(sandboxed):
    code, out, _ = sandboxed(sh("kill -KILL $$"))
    assert code == -signal.SIGKILL


def test_cgroup_v2_tree_kills_and_counts(tmp_path, device_root):
    unified = CGROUP_ROOT / "unified"
    if not (unified / "cgroup.controllers").exists():
        pytest.skip("no cgroup v2 mount at /sys/fs/cgroup/unified")
    runner = Runner(Sandbox(root=str(device_root), cgroup_root=str(unified)), tmp_path)
    try:
        spec = runner.spec(sh("sleep 60 & exec sleep 60"))
        run, _ = runner.start(spec)
        wait_for(lambda: _running(spec, b"sleep", unified) == 2, "the action and its child to run",
                 WAIT_SECONDS)
        assert len((unified / spec.cgroup_name / "cgroup.procs").read_text().split()) >= 3
        run.kill_all()
        assert run.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
        assert run.usage()["cpuSeconds"] > 0
        run.cleanup()
        assert not (unified / spec.cgroup_name).exists()
    finally:
        runner.close()
        if (unified / PARENT).is_dir():
            (unified / PARENT).rmdir()


def test_no_sandbox_is_prepared_on_cgroup_v2(tmp_path, device_root):
    """cgroup v2 refuses to rename a cgroup, and a prepared sandbox's cgroup takes its run's name
    by a rename: on v2 runs start in sandboxes set up for them, and the executor's pool never
    prepares one (it would be refused at every run, after costing a sandbox's set-up)."""
    unified = CGROUP_ROOT / "unified"
    if not (unified / "cgroup.controllers").exists():
        pytest.skip("no cgroup v2 mount at /sys/fs/cgroup/unified")
    probe = unified / f"{PARENT}-rename"
    probe.mkdir()
    try:
        with pytest.raises(PermissionError):
            os.rename(probe, unified / f"{PARENT}-renamed")
    finally:
        probe.rmdir()
    runner = Runner(Sandbox(root=str(device_root), cgroup_root=str(unified)), tmp_path)
    v1 = Runner(Sandbox(root=str(device_root), cgroup_root=str(CGROUP_ROOT)), tmp_path)
    if not runner.sandbox.launcher:
        pytest.skip("this installation has no compiled launcher: it prepares no sandbox anyway")
    try:
        spec = _run_spec(runner, device_root, "r-v2", ["/bin/true"])
        if v1.sandbox.cgroups.version == 1:  # the same spec gets one where renaming works
            assert v1.sandbox.unpreparable(spec) is None
        why = runner.sandbox.unpreparable(spec)
        assert why and "cgroup v2" in why
        with pytest.raises(SandboxError, match="cgroup v2"):
            runner.sandbox.prepare(spec, f"{PARENT}/warm-v2", stdout=1, stderr=2)
        assert not (unified / PARENT / "warm-v2").exists()
        pool = PreparedPool(runner.sandbox, PARENT, limit=4, idle=600)
        pool.want("r-v2-agent", spec)
        assert not pool.pending(lambda agent: True)
        available, described = runner.sandbox.available()  # what the executor says at start
        assert available and "no prepared sandboxes: cgroup v2" in described
    finally:
        runner.close()
        v1.close()
        if (unified / PARENT).is_dir():
            (unified / PARENT).rmdir()


def test_spawn_cost_is_measured(sandboxed, capsys):
    """Not a timing assertion: prints the median spawn-to-exit of /bin/true in the full sandbox
    (quota limits set) next to a plain subprocess, and the clean-up after it (docs/sandbox.md)."""
    to_exit, to_clean, plain = [], [], []
    for _ in range(50):
        began = time.perf_counter()
        run, _ = sandboxed.start(sandboxed.spec(["/bin/true"], limits=Limits(
            cpu_percent=100, memory_bytes=256 << 20, tasks_max=64, nice=0)))
        assert run.wait(timeout=WAIT_SECONDS) == 0
        exited = time.perf_counter()
        run.cleanup()
        to_exit.append(exited - began)
        to_clean.append(time.perf_counter() - exited)
    for _ in range(50):
        began = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        plain.append(time.perf_counter() - began)
    with capsys.disabled():
        print(f"\nmedian of 50 /bin/true: sandbox spawn-to-exit {_ms(to_exit)}, its clean-up "
              f"{_ms(to_clean)}; plain subprocess {_ms(plain)}")


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms"


# -- prepared sandboxes -------------------------------------------------------------------------

def _run_spec(sandboxed, device_root, run_id: str, argv, **fields) -> SandboxSpec:
    """A spec like the executor's: the run's own tmp and checkpoint directories are per-run."""
    tmp, checkpoint = f"{AGENT_DIR}/tmp/{run_id}", f"{AGENT_DIR}/checkpoints/{run_id}"
    for path in (tmp, checkpoint):
        (device_root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return sandboxed.spec(argv, env={"PATH": "/usr/bin:/bin", "SPOS_RUN_ID": run_id}, cwd=tmp,
                          write=(OUTPUT, checkpoint, tmp), per_run=(checkpoint, tmp),
                          cgroup_name=f"{PARENT}/{run_id}", **fields)


@pytest.fixture
def prepared(sandbox, sandboxed, device_root, tmp_path):
    """Prepare a sandbox from the spec of an earlier run `r-first`; closed at the end."""
    made = []

    def prepare(**fields):
        output = open(tmp_path / f"prepared-{len(made)}", "w+b")
        earlier = _run_spec(sandboxed, device_root, "r-first", ["/bin/true"], **fields)
        slot = sandbox.prepare(earlier, f"{PARENT}/warm-{uuid.uuid4().hex[:8]}",
                               stdout=output.fileno(), stderr=output.fileno())
        made.append(slot)
        return slot, output

    yield prepare
    for slot in made:
        slot.close()


def test_a_prepared_sandbox_runs_a_later_run_confined_to_its_own_directories(
        prepared, sandboxed, device_root):
    slot, output = prepared()
    (device_root / AGENT_DIR.lstrip("/") / "tmp/r-first/secret").write_text("first run's")
    script = ("pwd; echo id=$SPOS_RUN_ID; echo mine > mine && echo wrote=$?; "
              f"cat {AGENT_DIR}/tmp/r-first/secret; echo read_sibling=$?; "
              f"touch {AGENT_DIR}/tmp/r-first/x; echo write_sibling=$?; "
              f"ls {AGENT_DIR}/tmp; echo list_parent=$?; cat /proc/self/cgroup | grep pids")
    spec = _run_spec(sandboxed, device_root, "r-second", sh(script))
    time.sleep(0.2)  # let the prepared sandbox reach its launcher's read()
    run = slot.start(spec)
    sandboxed.runs.append(run)
    assert run.wait(timeout=WAIT_SECONDS) == 0 and run.setup_error() is None
    output.seek(0)
    out = output.read().decode()
    assert f"{AGENT_DIR}/tmp/r-second\nid=r-second\nwrote=0" in out, out
    # Its siblings are not even there, as in a sandbox set up for the run: the parent is a
    # read-only tmpfs holding only the run's own directory (and Landlock refuses listing it).
    assert "read_sibling=1" in out and "write_sibling=1" in out and "list_parent=2" in out, out
    assert out.count("No such file or directory") == 2, out
    assert (device_root / AGENT_DIR.lstrip("/") / "tmp/r-second/mine").read_text() == "mine\n"
    assert not (device_root / AGENT_DIR.lstrip("/") / "tmp/r-first/x").exists()
    assert (CGROUP_ROOT / "pids" / PARENT / "r-second").is_dir()  # the run's name now
    assert not list((CGROUP_ROOT / "pids" / PARENT).glob("warm-*"))
    run.cleanup()
    assert not (CGROUP_ROOT / "pids" / PARENT / "r-second").exists()


def test_a_prepared_sandbox_looks_again_for_rule_paths_missing_when_it_was_prepared(
        prepared, sandboxed, device_root):
    """The launcher of a prepared sandbox adds its shape's Landlock rules while it waits for
    its run. A rule whose path did not exist then is looked for again when the run comes, as
    a sandbox set up for the run looks for it: here a program the capability allows to
    execute, written into the output directory after the sandbox was prepared. A program
    beside it that no rule names stays refused."""
    tool, other = f"{OUTPUT}/tool", f"{OUTPUT}/other"
    execute = (SH, tool)
    slot, output = prepared(execute=execute)
    time.sleep(0.2)  # the launcher has added its rules and waits in read()
    for path in (tool, other):
        host = device_root / path.lstrip("/")
        host.write_text("#!/bin/sh\necho ran $0\n")
        host.chmod(0o755)
    script = f"{tool}; echo tool=$?; {other}; echo other=$?"
    spec = _run_spec(sandboxed, device_root, "r-second", sh(script), execute=execute)
    run = slot.start(spec)
    sandboxed.runs.append(run)
    assert run.wait(timeout=WAIT_SECONDS) == 0 and run.setup_error() is None
    output.seek(0)
    prepared_out = output.read().decode()
    code, fresh_out, _ = sandboxed(sh(script), execute=execute)
    assert code == 0
    for out in (prepared_out, fresh_out):
        assert f"ran {tool}\ntool=0\n" in out and "other=126" in out, out


def test_a_prepared_sandbox_hands_its_launcher_only_the_rules_it_does_not_hold(
        sandbox, sandboxed, device_root):
    """The rules a prepared sandbox's launcher gets with its run are the run's own (its
    directories and its program): with those it held already, they are exactly the rules of
    a sandbox set up for the run. Rules that do not include the held ones (another header, a
    rule missing) are refused, and the run starts afresh."""
    from reconciler.executor import landlock
    from reconciler.executor.sandbox import MountPlan, _beyond, _shape_of

    if not sandbox.landlock_abi:
        pytest.skip("this kernel has no Landlock")
    spec = _run_spec(sandboxed, device_root, "r-second", ["/usr/bin/true"])
    shape = _shape_of(spec)
    plan = MountPlan(sandbox.device, shape, staged=shape.per_run)
    held = sandbox._ruleset(shape, plan)
    whole = sandbox._ruleset(spec, plan)
    beyond = _beyond(whole, held)
    assert sorted(path for _, path in beyond.paths) == sorted(
        [f"{AGENT_DIR}/checkpoints/r-second", f"{AGENT_DIR}/tmp/r-second", "/usr/bin/true"])
    assert set(held.paths) | set(beyond.paths) == set(whole.paths)
    assert (beyond.abi, beyond.handled_fs, beyond.handled_net, beyond.scoped) == \
        (whole.abi, whole.handled_fs, whole.handled_net, whole.scoped)
    assert _beyond(whole, landlock.NO_RULESET) == whole
    for unfit in (dataclasses.replace(held, paths=(*held.paths, (landlock.READ, "/srv"))),
                  dataclasses.replace(held, handled_fs=held.handled_fs >> 1)):
        with pytest.raises(SandboxError) as refused:
            _beyond(whole, unfit)
        assert refused.value.retryable


def test_a_prepared_sandbox_refuses_a_run_of_another_shape(prepared, sandboxed, device_root):
    slot, _ = prepared()
    other = _run_spec(sandboxed, device_root, "r-other", ["/bin/true"], execute=(SH,))
    assert not slot.matches(other)
    with pytest.raises(SandboxError, match="differs"):
        slot.start(other)
    pids = {int(p) for p in (CGROUP_ROOT / "pids" / slot._cgroup.name / "cgroup.procs")
            .read_text().split()}
    slot.close()
    assert not list((CGROUP_ROOT / "pids" / PARENT).glob("warm-*"))
    assert not _still_running(pids)


def test_a_prepared_sandbox_that_ended_is_refused_and_closes_cleanly(prepared, sandboxed,
                                                                     device_root):
    slot, _ = prepared()
    procs = CGROUP_ROOT / "pids" / slot._cgroup.name / "cgroup.procs"
    deadline = time.monotonic() + WAIT_SECONDS
    while len(procs.read_text().split()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # bubblewrap, its init and the waiting launcher
    slot._cgroup.kill_all()
    spec = _run_spec(sandboxed, device_root, "r-late", ["/bin/true"])
    with pytest.raises(SandboxError) as refused:
        slot.start(spec)
    assert refused.value.retryable
    slot.close()
    assert not [d for d in (CGROUP_ROOT / "pids" / PARENT).iterdir() if d.is_dir()]


def test_what_cannot_be_prepared_says_why(sandbox, sandboxed, device_root):
    spec = _run_spec(sandboxed, device_root, "r-x", ["/bin/true"])
    if sandbox.launcher:
        assert sandbox.unpreparable(spec) is None
    assert "per-run" in sandbox.unpreparable(dataclasses.replace(spec, per_run=()))
    sandbox.launcher = None  # _launch.py cannot mount the run's directories
    assert "compiled launcher" in sandbox.unpreparable(spec)
    with pytest.raises(SandboxError, match="compiled launcher"):
        sandbox.prepare(spec, f"{PARENT}/warm-x", stdout=1, stderr=2)


def test_a_run_in_a_prepared_sandbox_has_no_capability_left(prepared, sandboxed, device_root):
    """The launcher mounted the run's directories with capabilities bubblewrap left it for
    that; the run itself has none, in any set, exactly as in a sandbox set up for it."""
    wanted = "NoNewPrivs|CapInh|CapEff|CapPrm|CapBnd|CapAmb"
    script = f"grep -E '^({wanted}):' /proc/self/status; grep -c spos-stage /proc/self/mountinfo"
    code, fresh_out, _ = sandboxed(sh(script))
    slot, output = prepared()
    run = slot.start(_run_spec(sandboxed, device_root, "r-caps", sh(script)))
    sandboxed.runs.append(run)
    assert run.wait(timeout=WAIT_SECONDS) == 1  # grep -c found no stage: exit 1
    output.seek(0)
    prepared_out = output.read().decode()
    fields = dict(line.split(":\t") for line in prepared_out.strip().splitlines()[:-1])
    fresh = dict(line.split(":\t") for line in fresh_out.strip().splitlines()[:-1])
    assert all(int(fields[cap], 16) == 0 for cap in ("CapInh", "CapEff", "CapPrm", "CapAmb"))
    assert {k: v for k, v in fields.items() if k != "CapBnd"} == \
        {k: v for k, v in fresh.items() if k != "CapBnd"}
    # The bounding set is emptied too (bubblewrap leaves it to no_new_privs in a fresh one).
    assert int(fields["CapBnd"], 16) == 0 and fields["NoNewPrivs"] == "1"
    assert prepared_out.strip().endswith("\n0")
