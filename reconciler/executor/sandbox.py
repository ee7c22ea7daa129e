"""The sandbox one action runs in: namespaces, a read-only device, Landlock rules and a cgroup.

`Sandbox.spawn(spec)` starts `spec.argv` and returns a `SandboxedRun` at once (it does not wait
for the sandbox to be set up). The layers, outermost first (docs/sandbox.md has the whole story):

1. A forked child joins the run's own cgroup (every v1 hierarchy, or the v2 leaf) and takes the
   quota's nice level *before* it executes anything, so no process of the run is ever outside it.
2. It executes bubblewrap, which makes new pid, ipc, uts, cgroup and (unless `network`) network
   namespaces, a new session, drops every capability and sets no_new_privs, and builds the
   view: the host's `/` read-only, the spec's writable paths bound read-write, denied paths
   hidden behind empty mode-0000 mounts, a private `/tmp` and `/run`, its own `/proc`, and a
   minimal `/dev` plus the allowed device nodes.
3. Inside, the launcher (`_launch.py`) applies the Landlock ruleset (`landlock.py`): what may be
   read, written, executed, and which TCP ports connected to; then it executes the action with
   exactly `spec.env` and only fds 0-2 plus `pass_fds`.

Device paths: every path in a spec is a path on the device (`--root`). A writable path is the
host path `<root>/<path>`, bound at `<path>`; read and execute paths and device nodes that exist
under the root are bound from there too, otherwise the host's own file at that path is seen (a
temporary root has no `/usr`). With root `/` these binds are identities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import posixpath
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.device import Device, write_all
from reconciler.errors import SposError
from reconciler.executor import landlock, network
from reconciler.executor._build import compiled_launcher
from reconciler.executor.netns import Lease, NetworkPool, enter as enter_netns
from reconciler.executor.netns import ready as netns_ready
from reconciler.executor.network import Egress
from reconciler.executor.cgroup import (
    CgroupError, Cgroups, DeviceRule, Limits, RunCgroup, check_name,
)

__all__ = ["Limits", "Sandbox", "SandboxError", "SandboxSpec", "SandboxedRun"]

# bubblewrap's own processes in the run's cgroup: the outer monitor and the pid namespace's init.
# pids.max is raised by this much, so `tasks_max` counts the action's processes only.
BWRAP_HELPERS = 2
NAMESPACE_OPTIONS = ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try")
PRIVATE_TMPFS = ("/tmp", "/run")
_SIGNAL_EXIT_BASE = 128  # bubblewrap reports a death by signal N as exit 128+N, like a shell
_MAX_SIGNAL = 64
_MAX_FD = 1 << 20
_SETTLE_SECONDS = 0.05  # after a normal exit, how long the cgroup may take to empty by itself
_LAUNCHER = Path(__file__).with_name("_launch.py")
# Where the compiled launcher is bound: in the private, read-only /run, seen by no other process.
LAUNCHER_IN_SANDBOX = "/run/spos-launch"
# What a prepared sandbox's launcher accepts as the name of a run's directory (a run id).
_RUN_NAME = re.compile(r"[0-9A-Za-z_-]{1,255}")
# Where a prepared sandbox's launcher finds the parents of the run's own directories, until it
# has mounted those and detached these (launch.c, mount_run_directories).
STAGE_DIR = "/run/spos-stage"
# After a prepared sandbox's run arguments, the byte that lets its action start (launch.c,
# wait_for_go): with them, or later (`PreparedSandbox.start(hold=True)`).
GO_BYTE = b"g"
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class SandboxError(SposError):
    """The sandbox cannot run this spec on this machine (permanent unless `retryable`)."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SandboxSpec:
    """What one sandboxed process may do. Paths are device paths (see the module docstring)."""

    argv: list[str]                  # argv[0] absolute; always executable (unless denied)
    env: dict[str, str]              # the complete environment: nothing is inherited
    cwd: str = "/"
    read: tuple[str, ...] = ()       # readable besides the system files (landlock.SYSTEM_READ)
    write: tuple[str, ...] = ()      # writable (and readable); missing paths are skipped
    execute: tuple[str, ...] = ()    # files or directories whose programs may be executed
    denied: tuple[str, ...] = ()     # hidden: empty and inaccessible; denied wins over allowed
    devices: tuple[str, ...] = ()    # device nodes besides /dev/null, zero, full, random, urandom, tty
    network: bool = False            # False: own network namespace with only loopback
    # With network False: reach the host through a veth pair, filtered by these rules
    # (network.py). None: loopback only.
    egress: Egress | None = None
    limits: Limits = field(default_factory=Limits)
    cgroup_name: str = ""            # required, e.g. "spos/research-001/<run-id>"
    user: str = "root"
    # TCP ports the run may connect to (None: any). Landlock ABI 4; only with network=True.
    connect_ports: tuple[int, ...] | None = None
    # Writable paths of this run alone (its tmp and checkpoint directories). A prepared sandbox
    # (`Sandbox.prepare`) binds their parent directories instead, and Landlock keeps the run
    # to its own: runs that differ only in these, argv, env, cwd and cgroup_name share a shape.
    per_run: tuple[str, ...] = ()


class Sandbox:
    """Runs actions in sandboxes for one device root and one cgroup root."""

    def __init__(self, root: str = "/", cgroup_root: str = "/sys/fs/cgroup"):
        self.device = Device(root)
        self.cgroups = Cgroups(cgroup_root)
        self.bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
        self.python = _launcher_python()
        # The compiled launcher when this installation has one (_build.py), else _launch.py.
        self.launcher = compiled_launcher()
        self.landlock_abi = landlock.supported_abi()
        # Network namespaces of ended runs, for the next run of the same agent (netns.py).
        self.networks = NetworkPool()
        self._launcher_source = _LAUNCHER.read_text()
        self._availability: tuple[bool, str] | None = None

    def available(self) -> tuple[bool, str]:
        """Whether this machine can sandbox, and what is (and is not) enforced, in words."""
        if self._availability is None:
            self._availability = self._check_availability()
        return self._availability

    def spawn(self, spec: SandboxSpec, *, stdin=subprocess.DEVNULL, stdout: int, stderr: int,
              pass_fds: tuple[int, ...] = ()) -> SandboxedRun:
        """Start `spec.argv` in a new sandbox. `pass_fds` stay open in the action under their
        own numbers (as with subprocess.Popen); every other fd but 0-2 is closed."""
        _check_spec(spec)
        self._check_launcher_visible(spec.denied)
        identity = _identity(spec.user)
        plan = MountPlan(self.device, spec)
        ruleset = self._ruleset(spec, plan)
        cgroup = self._cgroup(spec, plan)
        process, setup_read, link, _, _, lease = self._start(
            spec, plan, cgroup, identity, dict(stdin=stdin, stdout=stdout, stderr=stderr),
            tuple(pass_fds), ruleset)
        return SandboxedRun(process, cgroup, setup_read, link=link, own_network=not spec.network,
                            lease=lease)

    def unpreparable(self, spec: SandboxSpec) -> str | None:
        """Why runs of `spec`'s shape cannot get a prepared sandbox; None when they can."""
        if not spec.per_run:
            return "the spec names no per-run paths"
        if not self.launcher:
            return "only the compiled launcher mounts a run's directories into a prepared sandbox"
        if self.cgroups.version is not None and not self.cgroups.renames:
            return ("a prepared sandbox's cgroup takes its run's name by a rename, which cgroup v2 "
                    "refuses (EPERM)")
        if spec.egress is not None:
            return "a filtered network is linked to one run's sandbox"
        why = _per_run_problem(spec)
        if why:
            return why
        parents = {posixpath.dirname(path) for path in spec.per_run}
        others = [p for p in (*spec.write, *spec.read, *spec.execute, *spec.denied, *spec.devices)
                  if p not in spec.per_run]
        for parent in parents:
            for path in others:
                if _is_within(parent, path) or _is_within(path, parent):
                    return (f"{path} overlaps {parent}, which a prepared sandbox replaces "
                            "until the run's directories are mounted")
        return None

    def prepare(self, spec: SandboxSpec, cgroup_name: str, *, stdin=subprocess.DEVNULL,
                stdout: int, stderr: int, pass_fds: tuple[int, ...] = ()) -> PreparedSandbox:
        """Set up, ahead of time, a sandbox for a later run of `spec`'s shape: its cgroup (named
        `cgroup_name` until the run takes it), bubblewrap's view, and the launcher waiting for
        the run's arguments. The parents of `spec.per_run` are seen as empty tmpfs; the launcher
        alone reaches the real ones (at STAGE_DIR), to mount the run's own directories there
        when the run comes and detach the rest. `spec` is any run of that shape (the last one,
        say); its argv, env, cwd and per-run paths are not used. The fds are the later run's,
        as with `spawn`. Refused (SandboxError) for the cases `unpreparable` names."""
        why = self.unpreparable(spec)
        if why:
            raise SandboxError(f"cannot prepare a sandbox: {why}")
        _check_spec(dataclasses.replace(spec, cgroup_name=cgroup_name))
        self._check_launcher_visible(spec.denied)
        shape = _shape_of(spec)
        identity = _identity(shape.user)
        plan = MountPlan(self.device, shape, staged=shape.per_run)
        parents = tuple(_identity_of(self.device, parent) for parent in shape.per_run)
        prepared = dataclasses.replace(shape, cgroup_name=cgroup_name)
        # The shape has no program: its rules are all but the run's own. Only the compiled
        # launcher builds them ahead (and only it serves a prepared sandbox: `unpreparable`).
        base = self._ruleset(shape, plan) if self.launcher else landlock.NO_RULESET
        cgroup = self._cgroup(prepared, plan)
        process, setup_read, _, args_write, setup_write, lease = self._start(
            prepared, plan, cgroup, identity, dict(stdin=stdin, stdout=stdout, stderr=stderr),
            tuple(pass_fds), None, base)
        return PreparedSandbox(self, shape, plan, identity, process, cgroup, setup_read,
                               args_write, tuple(pass_fds), setup_write, parents, lease, base)

    def _cgroup(self, spec: SandboxSpec, plan: MountPlan) -> RunCgroup:
        limits = spec.limits
        if limits.tasks_max is not None:
            limits = dataclasses.replace(limits, tasks_max=limits.tasks_max + BWRAP_HELPERS)
        try:
            return self.cgroups.create(spec.cgroup_name, limits, plan.device_rules)
        except CgroupError as exc:
            raise SandboxError(str(exc)) from exc

    def reap(self, cgroup_name: str) -> bool:
        """After an executor died: kill whatever is left in one of its runs' cgroups and remove
        the cgroup. True when it is gone (or never existed); False when a dead process of it
        is still waiting for its parent to reap it: the empty cgroup is then left, and reused
        or removed by the next run of that name."""
        run = self.cgroups.existing(cgroup_name)
        if not run.exists():
            return True
        try:
            run.remove()
        except CgroupError:
            if run.pids():
                raise
            return False
        return True

    def _check_launcher_visible(self, denied: tuple[str, ...]) -> None:
        """The launcher's interpreter runs inside the sandbox: a denied path must not hide it.
        (The compiled launcher is bound at LAUNCHER_IN_SANDBOX, which nothing hides.)"""
        if self.launcher:
            return
        prefix = posixpath.dirname(posixpath.dirname(self.python))
        for path in denied:
            if _is_within(self.python, path) or _is_within(posixpath.join(prefix, "lib"), path):
                raise SandboxError(f"denied path {path} hides {self.python}, which the sandbox "
                                   "uses to start the action")

    def _start(self, spec, plan, cgroup, identity, stdio, pass_fds, ruleset,
               base: landlock.Ruleset = landlock.NO_RULESET):
        """Fork bubblewrap into `cgroup`. With a `ruleset` the launcher's arguments go with it
        (a memfd); without (a prepared sandbox) the launcher waits on a pipe, whose write end
        is returned, having added the `base` rules (a second memfd) to a Landlock ruleset of
        its own meanwhile. Returns (process, the setup pipe's read end, the network link, the
        args pipe's write end or -1, the number the setup pipe's write end had in the child,
        the lease of the network namespace it entered or None)."""
        opened: list[int] = []
        setup_read = args_write = -1
        gate = lease = None
        try:
            stdio_fds = _stdio_fds(stdio, opened)
            join_fds = cgroup.open_join_fds()
            opened += join_fds
            setup_read, setup_write = os.pipe2(os.O_CLOEXEC)
            opened.append(setup_write)
            hide_fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in plan.hidden_files]
            opened += hide_fds
            source_fds = plan.open_sources(opened)
            if ruleset is not None:
                launcher_fd = _args_fd(self._launcher_args(spec, ruleset, identity, setup_write,
                                                           pass_fds))
            else:
                launcher_fd, args_write = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(args_write, False)  # start() writes once; never wait on it
            opened.append(launcher_fd)
            rules_fd = []
            if base.abi > 0:
                body = base.launcher_args()
                rules_fd.append(_args_fd([str(len(body)), *body]))
                opened += rules_fd
            gate = _NetworkGate() if spec.egress is not None else None
            if not spec.network and gate is None:
                lease = self.networks.take(posixpath.dirname(spec.cgroup_name))
            bwrap_fd = _args_fd([
                *self._bwrap_args(spec, plan, identity, hide_fds, source_fds, self.launcher,
                                  network_entered=lease is not None),
                *(gate.bwrap_args() if gate else [])])
            opened.append(bwrap_fd)
            launcher = ([LAUNCHER_IN_SANDBOX] if self.launcher else
                        [self.python, "-I", "-S", "-c", self._launcher_source])
            process = _Child.start(
                [self.bwrap, "--args", str(bwrap_fd), "--", *launcher, str(launcher_fd),
                 *map(str, rules_fd)],
                stdio=stdio_fds,
                keep=(*pass_fds, setup_write, *hide_fds, *source_fds, launcher_fd, *rules_fd,
                      bwrap_fd, *(gate.child_fds() if gate else ())),
                join_fds=join_fds, nice=spec.limits.nice, error_fd=setup_write,
                netns=lease.fd if lease is not None else None,
                helper=self.launcher if _SPAWN_KEEPS_FDS else None,
            )
            link = gate.open_after_linking(process, spec.egress) if gate is not None else None
        except BaseException as exc:
            for fd in (setup_read, args_write):
                if fd >= 0:
                    os.close(fd)
            if gate is not None:
                gate.close()
            if lease is not None:
                lease.close()  # the child may have entered it: never handed on
            cgroup.remove()
            if isinstance(exc, OSError):
                raise SandboxError(f"cannot start the sandbox: {exc}", retryable=True) from exc
            raise
        finally:
            for fd in opened:
                os.close(fd)
        return process, setup_read, link, args_write, setup_write, lease

    @staticmethod
    def _bwrap_args(spec, plan, identity, hide_fds, source_fds, launcher, *,
                    network_entered: bool = False) -> list[str]:
        """bubblewrap's options; they reach it through an fd (`--args`), like the launcher's
        arguments, so no command line that every local user can read shows the spec.
        `network_entered`: bubblewrap starts in the run's network namespace already (netns.py)
        and makes none of its own."""
        uid = identity[0]
        # A prepared sandbox's launcher mounts the run's directories, then drops these too.
        mounting = ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP"] if plan.staged else []
        return [
            "--die-with-parent", "--new-session", *NAMESPACE_OPTIONS,
            *([] if spec.network or network_entered else ["--unshare-net"]),
            "--cap-drop", "ALL",
            *(["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if uid != 0 else []),
            *mounting,
            *plan.arguments(hide_fds, source_fds, network=spec.network or spec.egress is not None,
                            launcher=launcher),
        ]  # no --chdir: the launcher enters spec.cwd (which a prepared sandbox learns late)

    @staticmethod
    def _launcher_args(spec, ruleset, identity, setup_fd, pass_fds, mounts=()) -> list[str]:
        """The launcher's arguments (layout in _launch.py), also handed over through an fd.
        `mounts`: a prepared sandbox's (stage, name, target) run directories."""
        uid, gid, groups = identity
        env_items = [f"{key}={value}" for key, value in spec.env.items()]
        body = [
            str(setup_fd), str(uid), str(gid), ",".join(map(str, groups)),
            ",".join(map(str, pass_fds)), spec.cwd,
            str(len(mounts)), *(part for mount in mounts for part in mount),
            *ruleset.launcher_args(), str(len(env_items)), *env_items, "--", *spec.argv,
        ]
        return [str(len(body)), *body]

    def _ruleset(self, spec: SandboxSpec, plan: MountPlan) -> landlock.Ruleset:
        connect_ports = spec.connect_ports if spec.network else None
        if connect_ports is not None and self.landlock_abi < 4:
            raise SandboxError(
                f"TCP port rules need Landlock ABI 4 or later; this kernel has "
                f"{self.landlock_abi or 'no Landlock'}"
            )
        program = plan.implicit_executables(spec.argv[0]) if spec.argv else ()  # a shape has none
        return landlock.ruleset_for(
            self.landlock_abi, read=spec.read, write=spec.write, execute=(*spec.execute, *program),
            devices=tuple(bind.dest for bind in plan.device_binds), connect_ports=connect_ports,
        )

    def _check_availability(self) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "the sandbox needs root (namespaces, cgroups, bubblewrap as root)"
        if not os.access(self.bwrap, os.X_OK):
            return False, "bubblewrap (bwrap) is not installed"
        if self.cgroups.version is None:
            return False, self.cgroups.describe()
        probe = subprocess.run(
            [self.bwrap, "--die-with-parent", *NAMESPACE_OPTIONS, "--unshare-net",
             "--cap-drop", "ALL", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
             "--", self.python, "-I", "-S", "-c", "pass"],
            capture_output=True, text=True, timeout=30, env={},
        )
        if probe.returncode != 0:
            return False, f"bubblewrap cannot create namespaces here: {probe.stderr.strip()}"
        notes = [_bwrap_version(self.bwrap), self.cgroups.describe(),
                 f"launcher {self.launcher}" if self.launcher else
                 f"launcher _launch.py under {self.python} (no compiled launcher in this "
                 "installation: reinstall spos where a C compiler is present, ~15 ms faster per run)"]
        missing = self.cgroups.missing_controllers()
        if missing:
            notes.append(f"missing cgroup controllers: {' '.join(missing)}")
        if self.launcher and not self.cgroups.renames:
            notes.append("no prepared sandboxes: cgroup v2 cannot rename a cgroup")
        if self.landlock_abi:
            notes.append(f"Landlock ABI {self.landlock_abi}: reads, writes, executables"
                         + (" and TCP ports" if self.landlock_abi >= 4 else "") + " limited")
        else:
            notes.append("Landlock unavailable: executables and reads are NOT limited (only the "
                         "read-only root, writable binds and hidden denied paths apply)")
        return True, "; ".join(notes)


class SandboxedRun:
    """A running (or finished) sandboxed action. Select on `pidfd` to learn that it exited.

    A run handed to a prepared sandbox with `hold` is set up there but waits before its
    action: `release()` lets it start, `withdraw()` (or `cleanup()`) ends it unstarted."""

    def __init__(self, process: _Child, cgroup: RunCgroup, setup_fd: int,
                 link: network.Link | None = None, own_network: bool = True,
                 lease: Lease | None = None, go_fd: int = -1):
        self._go_fd = go_fd
        self._process = process
        self._cgroup = cgroup
        self._setup_fd = setup_fd
        self._link = link
        self._lease = lease
        self._own_network = own_network
        self._setup_text = b""
        self.pid = process.pid
        self.pidfd = process.pidfd
        self.unenforced: tuple[str, ...] = cgroup.unenforced
        self._settled = False
        self._cleaned = False

    @property
    def held(self) -> bool:
        return self._go_fd >= 0

    def release(self) -> None:
        """Let a held run's action start. A launcher that failed while it set the run up has
        exited already: that exit and its message report the failure, as for any run."""
        fd, self._go_fd = self._go_fd, -1
        if fd < 0:
            return
        try:
            os.write(fd, GO_BYTE)  # the pipe has room for it: start() made sure
        except BrokenPipeError:
            pass
        finally:
            os.close(fd)

    def withdraw(self) -> None:
        """End a held run before its action started: the launcher finds its pipe closed
        without the go and exits (126). Nothing of the run is executed. `cleanup()` after."""
        fd, self._go_fd = self._go_fd, -1
        if fd >= 0:
            os.close(fd)

    def poll(self) -> int | None:
        """The exit status like Popen.returncode (negative: killed by that signal), or None."""
        return _exit_status(self._process.poll())

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the action's main process; raises subprocess.TimeoutExpired on timeout."""
        return _exit_status(self._process.wait(timeout))

    def terminate(self) -> None:
        """SIGTERM to every process of the run (like systemd's KillMode=control-group): the
        action, its process group and any child that left it. bubblewrap's own processes are
        spared so they can report the action's exit."""
        spare = {self.pid} | {pid for pid in self._cgroup.pids() if _is_namespace_init(pid)}
        self._cgroup.signal_all(signal.SIGTERM, spare=spare)

    def kill_all(self) -> None:
        """SIGKILL every process in the run's cgroup (double-forked, SIGTERM-ignoring and
        bubblewrap's own included) and wait until the cgroup is empty."""
        try:
            self._cgroup.kill_all()
        except CgroupError as exc:
            raise SandboxError(str(exc), retryable=True) from exc

    def settle(self) -> None:
        """Once the main process exited: wait until the run's cgroup is empty, killing what
        is left. bubblewrap reports the action's exit while its pid namespace's init is still
        exiting (tearing down the namespace's mounts takes a few milliseconds), and everything
        else in the namespace dies with that init; so the cgroup is given _SETTLE_SECONDS to
        empty by itself, watched on pidfds, before every process in it is killed
        (`kill_all`). Idempotent; `cleanup()` does it too."""
        if self._settled:
            return
        if self._process.poll() is None or not self._cgroup.empties_within(_SETTLE_SECONDS):
            self.kill_all()
        self._settled = True

    def leftovers(self) -> list[int]:
        """Once the main process was reaped: pidfds of the processes still in the run's cgroup
        (bubblewrap's init on its way out), for a caller that waits for them in its own event
        loop (each becomes readable as its process exits) and calls `settle()` after, which then
        finds the cgroup empty. The caller closes them. Empty when nothing is left, or when
        pidfds are not available (then `settle()` waits itself)."""
        return self._cgroup.pidfds()

    def usage(self) -> dict:
        """{"cpuSeconds", "peakMemoryBytes", "readBytes", "writeBytes", "networkSentBytes",
        "networkReceivedBytes"} of the whole run so far (bubblewrap and the launcher included);
        None where it is not counted. Network bytes are those of the run's own link (a
        filtered network); 0 with loopback only; None on the host's network, which the run
        shares with everything else."""
        if self._link is not None:
            traffic = self._link.traffic()
        elif self._own_network:
            traffic = {"networkSentBytes": 0, "networkReceivedBytes": 0}
        else:
            traffic = {"networkSentBytes": None, "networkReceivedBytes": None}
        return {**self._cgroup.usage(), **traffic}

    def oom_killed(self) -> bool:
        return self._cgroup.oom_killed()

    def setup_error(self) -> str | None:
        """Why the run ended before the action was executed (bubblewrap or the launcher
        failed, or it was killed during set-up); None when the action ran or is running."""
        if self._process.returncode is None:
            return None
        if self._setup_fd >= 0:
            self._setup_text += _read_all(self._setup_fd)
        marker = b"exec\n"
        if self._setup_text == marker:
            return None
        if self._setup_text:
            return self._setup_text.removeprefix(marker).decode(errors="replace").strip()
        if self._process.returncode < 0:
            return f"killed by signal {-self._process.returncode} before the action started"
        return "bubblewrap could not set up the sandbox (its message is on the run's stderr)"

    def cleanup(self) -> None:
        """Kill anything left, reap, remove the run's cgroup, close the fds. Idempotent."""
        if self._cleaned:
            return
        self.withdraw()
        self.settle()
        self._process.wait()
        reap_orphans()  # the sandbox's init, handed here as bubblewrap's monitor exited
        self.setup_error()
        try:
            self._cgroup.remove()
        except CgroupError as exc:
            if self._lease is not None:
                self._lease.close()  # a process of the run may be left in it: never handed on
            raise SandboxError(str(exc), retryable=True) from exc
        if self._lease is not None:
            self._lease.give_back()  # no process of the run is left in it
        if self._link is not None:
            self._link.release()
        os.close(self.pidfd)
        if self._setup_fd >= 0:
            os.close(self._setup_fd)
            self._setup_fd = -1
        self._cleaned = True


class PreparedSandbox:
    """A sandbox set up before its run is known (`Sandbox.prepare`): bubblewrap has built the
    view, and the launcher waits in read() for its arguments. `start(spec)` gives it a run of
    the same shape and returns that run's SandboxedRun, which then owns everything; `close()`
    ends an unused one. A prepared sandbox is used once."""

    def __init__(self, sandbox: Sandbox, shape: SandboxSpec, plan: MountPlan, identity,
                 process: _Child, cgroup: RunCgroup, setup_fd: int, args_fd: int,
                 pass_fds: tuple[int, ...], setup_fd_in_child: int,
                 parents: tuple[tuple[int, int] | None, ...], lease: Lease | None = None,
                 base: landlock.Ruleset = landlock.NO_RULESET):
        self._sandbox = sandbox
        self._lease = lease
        self._base = base  # the Landlock rules the launcher added while it waited
        self.shape = shape
        self._plan = plan
        self._identity = identity
        self._process = process
        self._cgroup = cgroup
        self._setup_fd = setup_fd
        self._args_fd = args_fd
        self.pass_fds = pass_fds
        # The setup pipe's write end as the launcher knows it: its number in the executor when
        # bubblewrap was forked (closed here since; the child kept it).
        self._setup_fd_in_child = setup_fd_in_child
        self._parents = parents  # (device, inode) of each staged parent when it was bound
        self.pid = process.pid
        self.pidfd = process.pidfd
        self._done = False

    def matches(self, spec: SandboxSpec) -> bool:
        return not self._done and _shape_of(spec) == self.shape

    def start(self, spec: SandboxSpec, hold: bool = False) -> SandboxedRun:
        """Run `spec` here: the cgroup takes the run's name, the launcher gets the run's
        arguments (its own directories to mount, Landlock rules for exactly its paths, its
        environment, cwd and argv). SandboxError when it cannot (another shape, the sandbox
        ended, a parent directory replaced since, arguments too large for the pipe), before
        anything of the run started: the caller then closes this one and spawns the run
        afresh. `pass_fds` are those given to prepare.

        With `hold`, the launcher sets the run up (mounts, Landlock, user) and then waits
        before the action until `release()` of the returned run: what the caller still has
        to do before the action may start (its log, its attachments) is done meanwhile.
        The run's own directories must exist now; files made in them later are seen."""
        if not self.matches(spec):
            raise SandboxError("the run's sandbox differs from the prepared one")
        _check_spec(spec)
        # The rest of `unpreparable` is the shape's, which `prepare` checked and `matches` held.
        why = _per_run_problem(spec)
        if why:
            raise SandboxError(f"cannot run in a prepared sandbox: {why}")
        device = self._sandbox.device
        mounts = []
        for path in spec.per_run:
            index = self.shape.per_run.index(posixpath.dirname(path))
            if _identity_of(device, posixpath.dirname(path)) != self._parents[index]:
                raise SandboxError(f"{posixpath.dirname(path)} was replaced since the sandbox "
                                   "was prepared", retryable=True)
            if _identity_of(device, path) is None:
                raise SandboxError(f"{path} does not exist")
            mounts.append((f"{STAGE_DIR}/{index}", posixpath.basename(path), path))
        if not any(_is_within(spec.cwd, path) for path in spec.per_run) \
                and self._plan.kind_in_view(spec.cwd) != "dir":
            raise SandboxError(f"working directory {spec.cwd} does not exist in the sandbox")
        if self._process.poll() is not None:
            raise SandboxError("the prepared sandbox has ended", retryable=True)
        ruleset = _beyond(self._sandbox._ruleset(spec, self._plan), self._base)
        data = "".join(f"{arg}\0" for arg in self._sandbox._launcher_args(
            spec, ruleset, self._identity, self._setup_fd_in_child, self.pass_fds, mounts))
        data = data.encode(_FS_ENCODING, _FS_ERRORS)
        room = len(data) + len(GO_BYTE)  # the go, with the arguments or after them
        if room > _pipe_capacity(self._args_fd, room):
            raise SandboxError("the run's arguments are too large for a prepared sandbox",
                               retryable=True)
        if not hold:
            data += GO_BYTE
        if not hold:
            self._take_name(spec)  # the action starts in the run's cgroup
        try:
            written = os.write(self._args_fd, data)  # into an empty pipe that holds it all
        except OSError as exc:  # EPIPE: the launcher is gone
            written, failure = 0, exc
        else:
            failure = None
        if written != len(data):
            # The count in front makes a cut copy malformed anyway; no part of it may run.
            with contextlib.suppress(CgroupError):
                self._cgroup.kill_all()
            os.close(self._args_fd)
            self._args_fd = -1
            raise SandboxError(f"cannot hand the run to the prepared sandbox: {failure or 'short write'}",
                               retryable=True)
        if hold:  # while the launcher sets the run up; a failure leaves this to close()
            self._take_name(spec)
        go_fd, self._args_fd = self._args_fd, -1
        if not hold:
            os.close(go_fd)
            go_fd = -1
        self._done = True
        return SandboxedRun(self._process, self._cgroup, self._setup_fd,
                            own_network=not spec.network, lease=self._lease, go_fd=go_fd)

    def _take_name(self, spec: SandboxSpec) -> None:
        try:
            self._cgroup = self._sandbox.cgroups.rename(self._cgroup, spec.cgroup_name)
        except CgroupError as exc:
            raise SandboxError(str(exc), retryable=True) from exc

    def close(self) -> None:
        """End an unused prepared sandbox: kill it, remove its cgroup, close its fds. A no-op
        once `start` handed it to a run. Idempotent."""
        if self._done:
            return
        self._done = True
        # The forked child may not even have joined the cgroup yet (it does so itself): kill
        # and reap it first, so nothing can join after the cgroup was emptied. What bubblewrap
        # started is in the cgroup already; cleanup() kills that.
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            self._process.wait()
        if self._args_fd >= 0:
            os.close(self._args_fd)
            self._args_fd = -1
        SandboxedRun(self._process, self._cgroup, self._setup_fd, lease=self._lease).cleanup()


def _pipe_capacity(fd: int, wanted: int) -> int:
    """The pipe's capacity, raised towards `wanted` when that is more (up to the system's
    pipe-max-size)."""
    capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if wanted > capacity:
        with contextlib.suppress(OSError):
            capacity = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, wanted)
    return capacity


@dataclass(frozen=True)
class _Bind:
    option: str   # --ro-bind, --bind or --dev-bind
    source: str   # host path
    dest: str     # device path inside the sandbox


class MountPlan:
    """The bubblewrap mount arguments that build one run's view of the device.

    It only looks at the host (lstat, scandir); it changes nothing. A mount point that does not
    exist in the read-only host tree (a temporary root's `/var/lib/systemprompt-os/...`) is
    made by replacing the deepest existing directory above it with a tmpfs holding read-only
    binds of that directory's entries, then remounting that tmpfs read-only."""

    def __init__(self, device: Device, spec: SandboxSpec, staged: tuple[str, ...] = ()):
        self.device = device
        self.host_root = device.root == Path("/")
        self.binds = self._path_binds(spec)
        self.device_binds, self.device_rules = self._device_binds(spec.devices)
        # A prepared sandbox's per-run parents: each bound read-write at STAGE_DIR/<i> for the
        # launcher, and seen as an empty tmpfs where it mounts the run's own directory.
        self.staged = staged
        self.synthesized = self._synthesize(
            [*PRIVATE_TMPFS, *staged, *(b.dest for b in (*self.binds, *self.device_binds))])
        self.hidden_dirs, self.hidden_files = self._hidden(spec.denied)
        self.pinned = self._pinned()
        if self.kind_in_view(spec.cwd) != "dir":
            raise SandboxError(f"working directory {spec.cwd} does not exist in the sandbox")

    def open_sources(self, opened: list[int]) -> list[int]:
        """An O_PATH fd per path bind, opened component by component below the root without
        following any link: what gets mounted is what was checked, even if someone swaps a
        directory for a symlink meanwhile. Each fd is appended to `opened` (the caller closes)."""
        fds = []
        walked: dict[str, int] = {}  # directories opened on the way, shared by the paths below them
        try:
            for path in (*(bind.dest for bind in self.binds), *self.staged, *self.pinned):
                fds.append(_open_without_links(str(self.device.root), path, walked))
                opened.append(fds[-1])
        finally:
            for fd in walked.values():
                os.close(fd)
        return fds

    def arguments(self, hide_fds: list[int], source_fds: list[int], *, network: bool,
                  launcher: str | None = None) -> list[str]:
        args: list[str] = []
        if "/" in self.synthesized:
            args += self._entries_of("/")
        else:
            args += ["--ro-bind", "/", "/"]
        for directory in sorted(self.synthesized - {"/"}):
            args += ["--tmpfs", directory, *self._entries_of(directory)]
        # Read-only: uid 0 without capabilities may still write many sysctls (core_pattern!).
        args += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        for directory in PRIVATE_TMPFS:
            args += ["--tmpfs", directory]
        if launcher:
            args += ["--ro-bind", launcher, LAUNCHER_IN_SANDBOX]
        if network:
            args += _resolver_binds()
        for directory in self.created_dirs:  # bubblewrap would make them 0700
            args += ["--perms", "0755", "--dir", directory]
        for directory in self.staged:
            args += ["--perms", "0755", "--tmpfs", directory]
        staged_fds = source_fds[len(self.binds):len(self.binds) + len(self.staged)]
        for index, fd in enumerate(staged_fds):
            args += ["--bind-fd", str(fd), f"{STAGE_DIR}/{index}"]
        for bind, fd in zip(self.binds, source_fds):
            args += [f"{bind.option}-fd", str(fd), bind.dest]
        for directory, fd in zip(self.pinned, source_fds[len(self.binds) + len(self.staged):]):
            args += ["--bind-fd", str(fd), directory]  # onto itself: a mount cannot be renamed
        for bind in self.device_binds:
            args += [bind.option, bind.source, bind.dest]
        for directory in self.hidden_dirs:
            args += ["--perms", "0000", "--tmpfs", directory, "--remount-ro", directory]
        for path, fd in zip(self.hidden_files, hide_fds):
            args += ["--perms", "0000", "--ro-bind-data", str(fd), path]
        for directory in (*sorted(self.synthesized), "/run"):
            args += ["--remount-ro", directory]
        return args

    def kind_in_view(self, path: str) -> str | None:
        """"dir", "file" or None (missing) for a path as the run will see it (symlinks followed)."""
        backing = self._backing(path)
        if backing is None:
            return "dir" if path in (*PRIVATE_TMPFS, "/dev") else None
        try:
            mode = os.stat(backing).st_mode
        except OSError:
            return None
        return "dir" if stat.S_ISDIR(mode) else "file"

    def _path_binds(self, spec: SandboxSpec) -> list[_Bind]:
        wanted: dict[str, _Bind] = {}
        if not self.host_root:
            for path in (*spec.read, *spec.execute):
                source = self._under_root(path)
                if os.path.lexists(source):
                    wanted[path] = _Bind("--ro-bind", source, path)
        for path in spec.write:
            source = self._under_root(path)
            if os.path.lexists(source):
                wanted[path] = _Bind("--bind", source, path)
        binds: list[_Bind] = []
        for dest in sorted(wanted):
            bind = wanted[dest]
            if not any(_covers(outer, bind) for outer in binds):
                binds.append(bind)
        return binds

    def _device_binds(self, devices: tuple[str, ...]) -> tuple[list[_Bind], tuple[DeviceRule, ...]]:
        binds, rules = [], []
        for path in sorted(set(devices)):
            # Device paths are often links (/dev/serial/by-id/...): the node they lead to is bound.
            source = path
            if not self.host_root and os.path.lexists(str(self.device.root) + path):
                source = str(self.device.root) + path
            try:
                st = os.stat(source)
            except FileNotFoundError:
                continue  # unplugged: the action finds no node and fails visibly
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise SandboxError(f"device {path} is not a device node")
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            rules.append(DeviceRule(kind, os.major(st.st_rdev), os.minor(st.st_rdev)))
            binds.append(_Bind("--dev-bind", os.path.realpath(source), path))
        return binds, tuple(rules)

    def _under_root(self, path: str) -> str:
        try:
            return self.device.host(path)
        except SposError as exc:
            raise SandboxError(f"refusing sandbox path {path}: {exc}") from exc

    def _synthesize(self, mount_points: list[str]) -> set[str]:
        """Directories of the host tree to replace by a tmpfs so that every mount point exists,
        and (in `self.created_dirs`) the directories to create in a tmpfs on the way to one."""
        synthesized: set[str] = set()
        created: set[str] = set()
        for mount_point in sorted(set(mount_points)):
            missing = self._make_room(mount_point, synthesized)
            if missing is not None:
                created.update(_ancestors_between(missing, mount_point))
        self.created_dirs = sorted(created)
        return synthesized

    def _make_room(self, mount_point: str, synthesized: set[str]) -> str | None:
        """Walk down to `mount_point`; returns the first component that will live in a tmpfs
        (None when the whole path exists on the host or in a bind)."""
        path = "/"
        for part in mount_point.strip("/").split("/"):
            parent, path = path, posixpath.join(path, part)
            if self._in_private_tmpfs(parent):
                return path  # created inside the private tmpfs
            outer = self._bind_above(path)
            if outer is not None:
                if not os.path.lexists(outer.source + mount_point[len(outer.dest):]):
                    raise SandboxError(f"cannot mount {mount_point} in the sandbox: it would "
                                       f"have to be created inside {outer.source}")
                return None
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                synthesized.add(parent)
                return path
            if stat.S_ISLNK(mode):
                raise SandboxError(f"cannot mount {mount_point} in the sandbox: {path} is a "
                                   "symbolic link on this host")
        return None

    def _hidden(self, denied: tuple[str, ...]) -> tuple[list[str], list[str]]:
        dirs, files = [], []
        for path in sorted(set(denied)):
            kind = self.kind_in_view(path)
            if kind == "dir":
                dirs.append(path)
            elif kind == "file":
                files.append(path)
        return dirs, files

    def _pinned(self) -> list[str]:
        """The directories between a writable bind and a denied path hidden inside it, each to
        be bound onto itself. The hiding mount is found by the denied path's name when the
        sandbox is set up; a run that renamed a directory on the way (`mv a moved`) would
        leave the next run the denied path under a name nobody hides. A mount point cannot
        be renamed or removed (EBUSY), nor anything moved across it (EXDEV)."""
        pinned: set[str] = set()
        for path in (*self.hidden_dirs, *self.hidden_files):
            bind = max((b for b in self.binds if _is_within(path, b.dest) and path != b.dest),
                       key=lambda b: len(b.dest), default=None)
            if bind is None or bind.option != "--bind":
                continue
            directory = posixpath.dirname(path)
            while directory != bind.dest:
                pinned.add(directory)
                directory = posixpath.dirname(directory)
        return sorted(pinned)

    def implicit_executables(self, program: str) -> tuple[str, ...]:
        """argv[0], and the interpreter on its `#!` line when it is a script."""
        head = _head_of_regular_file(self._backing(program) or program)
        words = head[2:].split() if head.startswith(b"#!") else []
        if words and words[0].startswith(b"/"):
            return (program, os.fsdecode(words[0]))
        return (program,)

    def _backing(self, path: str) -> str | None:
        """The host path behind `path` in the run's view, None inside an empty private tmpfs."""
        for bind in sorted((*self.binds, *self.device_binds), key=lambda b: -len(b.dest)):
            if _is_within(path, bind.dest):
                return bind.source + path[len(bind.dest):]
        if any(_is_within(path, d) for d in (*PRIVATE_TMPFS, "/dev")):
            return None
        return path

    def _bind_above(self, path: str) -> _Bind | None:
        return next((b for b in self.binds if _is_within(path, b.dest) and path != b.dest), None)

    @staticmethod
    def _in_private_tmpfs(path: str) -> bool:
        return any(_is_within(path, d) for d in (*PRIVATE_TMPFS, "/dev"))

    def _entries_of(self, directory: str) -> list[str]:
        """Read-only binds (symlinks recreated) of a host directory's entries, for its tmpfs."""
        args: list[str] = []
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = posixpath.join(directory, entry.name)
                if path in self.synthesized:
                    continue
                if entry.is_symlink():
                    args += ["--symlink", os.readlink(path), path]
                else:
                    args += ["--ro-bind", path, path]
        return args


def _covers(outer: _Bind, inner: _Bind) -> bool:
    """An earlier bind of the same tree makes `inner` redundant (a writable one covers all)."""
    writable_outer = outer.option == "--bind"
    return _is_within(inner.dest, outer.dest) and (writable_outer or inner.option == "--ro-bind")


def _ancestors_between(first: str, mount_point: str) -> list[str]:
    """`first` and its descendants on the way to `mount_point`, the mount point excluded."""
    found, path = [], mount_point
    while path != first and path != "/":
        path = posixpath.dirname(path)
        found.append(path)
    return [p for p in found if _is_within(p, first)]


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _resolver_binds() -> list[str]:
    """/etc/resolv.conf often points into /run, which is a private tmpfs: bring its target."""
    target = os.path.realpath("/etc/resolv.conf")
    return ["--ro-bind-try", target, target] if _is_within(target, "/run") else []


def _per_run_problem(spec: SandboxSpec) -> str | None:
    """What keeps `spec`'s per-run paths from being mounted into a prepared sandbox (the part
    of `Sandbox.unpreparable` that is the run's own), or None."""
    if not spec.per_run:
        return "the spec names no per-run paths"
    if any(path not in spec.write for path in spec.per_run):
        return "a per-run path is not writable"
    if any(not _RUN_NAME.fullmatch(posixpath.basename(path)) for path in spec.per_run):
        return "a per-run path is not a run's directory"
    return None


def _beyond(ruleset: landlock.Ruleset, base: landlock.Ruleset) -> landlock.Ruleset:
    """The rules of `ruleset` that a prepared sandbox's launcher does not hold yet: those beyond
    `base`, the rules of the sandbox's shape it added while it waited (with no Landlock, none:
    then `ruleset` itself). SandboxError (the run starts afresh) when `base` is not part of
    `ruleset`."""
    if base.abi == 0:
        return ruleset
    held_paths, held_ports = set(base.paths), set(base.ports)
    if (ruleset.abi, ruleset.handled_fs, ruleset.handled_net, ruleset.scoped) != \
            (base.abi, base.handled_fs, base.handled_net, base.scoped) \
            or not held_paths.issubset(ruleset.paths) or not held_ports.issubset(ruleset.ports):
        raise SandboxError("the run's Landlock rules differ from its prepared sandbox's",
                           retryable=True)
    return dataclasses.replace(
        ruleset, paths=tuple(rule for rule in ruleset.paths if rule not in held_paths),
        ports=tuple(rule for rule in ruleset.ports if rule not in held_ports))


def _shape_of(spec: SandboxSpec) -> SandboxSpec:
    """What a prepared sandbox is built from: the spec without what is the run's own; its
    `per_run` holds the parents of the run's own directories instead."""
    per_run = set(spec.per_run)
    return dataclasses.replace(
        spec, argv=[], env={}, cwd="/", cgroup_name="",
        write=tuple(p for p in spec.write if p not in per_run),
        per_run=tuple(dict.fromkeys(posixpath.dirname(p) for p in spec.per_run)))


def _identity_of(device: Device, path: str) -> tuple[int, int] | None:
    """(device, inode) of a directory under the root, None when it is missing. From the lstat
    that resolving the path makes anyway: a link on the way is refused there, so it is the
    directory itself."""
    try:
        st = device.locate(path)[1]
    except (OSError, SposError):
        return None
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISDIR(st.st_mode) else None


def _check_spec(spec: SandboxSpec) -> None:
    if not spec.argv or not spec.argv[0].startswith("/"):
        raise SandboxError(f"argv[0] must be an absolute path: {spec.argv!r}")
    for path in (spec.cwd, spec.argv[0], *spec.read, *spec.write, *spec.execute, *spec.denied,
                 *spec.devices, *spec.per_run):
        if not path.startswith("/") or path.startswith("//") or posixpath.normpath(path) != path \
                or "\0" in path:
            raise SandboxError(f"sandbox paths must be absolute and normalised: {path!r}")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"invalid environment variable {key!r}")
    if spec.network and spec.egress is not None:
        raise SandboxError("egress rules apply to a run's own network, not to the host's")
    if not spec.cgroup_name:
        raise SandboxError("a sandboxed run needs its own cgroup_name")
    try:
        check_name(spec.cgroup_name)
    except CgroupError as exc:
        raise SandboxError(str(exc)) from exc


def _launcher_python() -> str:
    """The interpreter that runs the launcher inside the sandbox: the system's python3 (outside
    /root, /home, /opt and /tmp, which capabilities like to deny and the sandbox hides), else
    the one running spos. The launcher needs only built-in modules of Python 3.6+."""
    for candidate in ("/usr/bin/python3", sys.executable):
        real = os.path.realpath(candidate or "/nonexistent")
        if os.access(real, os.X_OK) and not any(_is_within(real, d) for d in PRIVATE_TMPFS):
            return real
    raise SandboxError("no python3 interpreter to run the sandbox launcher")


def _identity(user: str) -> tuple[int, int, list[int]]:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError) as exc:
        raise SandboxError(f"unknown user {user!r}") from exc
    if entry.pw_uid == 0:
        return 0, 0, []
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


class _NetworkGate:
    """Holds a filtered run before its action starts until its network is linked: bubblewrap
    reports the namespace's first process on `--info-fd` and waits on `--block-fd`."""

    def __init__(self):
        self.info_read, self.info_write = os.pipe2(os.O_CLOEXEC)
        self.block_read, self.block_write = os.pipe2(os.O_CLOEXEC)

    def bwrap_args(self) -> list[str]:
        return ["--info-fd", str(self.info_write), "--block-fd", str(self.block_read)]

    def child_fds(self) -> tuple[int, int]:
        return self.info_write, self.block_read

    def open_after_linking(self, process: _Child, egress: Egress) -> network.Link:
        """Link the namespace and let the run go on; on failure, end it and raise."""
        # Only bubblewrap may hold the write end: the read below must see it exit early.
        self._close("info_write", "block_read")
        try:
            pid = network.info_pid(self.info_read)
            link = network.Link.attach(pid, egress, first_slot=process.pid)
            try:
                os.write(self.block_write, b"1")
            except OSError:
                link.release()
                raise
            return link
        except (network.NetworkError, OSError) as exc:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            raise SandboxError(f"cannot set up the run's network: {exc}", retryable=True) from exc
        finally:
            self.close()

    def close(self) -> None:
        self._close("info_read", "info_write", "block_read", "block_write")

    def _close(self, *names: str) -> None:
        for name in names:
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class _Child:
    """bubblewrap's process, placed in the run's cgroup before it executes bubblewrap, with the
    caller going on as soon as it exists. Where joining is slow, through v2's `cgroup.procs` or
    on a kernel before 6.0 (the wait for an RCU grace period, ~10-15 ms here), the wait is the
    child's, never the caller's: RunCgroup.open_join_fds.

    With the compiled launcher, the child is that program's `--enter` mode, started with
    posix_spawn (a vfork: nothing of the caller is copied); it joins, takes the nice level,
    closes the other fds and executes bubblewrap. Without it (or on a C library whose
    posix_spawn cannot hand over fds by number, `_spawn_keeps_fds`), the caller forks and the
    copy does the same in Python, which costs a few milliseconds more per run (the copy's page
    faults, and tearing its address space down at the exec). Either way, a failure before
    bubblewrap runs is written to `error_fd` and the child exits 126."""

    def __init__(self, pid: int):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        _UNREAPED.add(pid)

    @classmethod
    def start(cls, argv: list[str], *, stdio: list[int | None], keep: tuple[int, ...],
              join_fds: list[int], nice: int | None, error_fd: int,
              netns: int | None = None, helper: str | None = None) -> _Child:
        # Ignored signals survive exec (Python ignores SIGPIPE and SIGXFSZ, nohup SIGHUP...):
        # listed here, set back to default in the child.
        ignored = _ignored_signals()
        if helper is not None:
            return cls(_spawn_entering(helper, argv, stdio, keep, join_fds, nice, error_fd,
                                       ignored, netns))
        if netns is not None:
            netns_ready()  # what the child calls is loaded before the fork
        pid = os.fork()
        if pid == 0:
            try:
                _enter_child(stdio, keep, join_fds, nice, ignored, netns)
                os.execve(argv[0], argv, {})
            except BaseException as exc:  # in the child: report, never return into the caller
                _report_and_exit(error_fd, f"cannot start bubblewrap: {exc}")
            finally:
                os._exit(126)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and timeout is not None:
            ready, _, _ = select.select([self.pidfd], [], [], max(0.0, timeout))
            if not ready:
                raise subprocess.TimeoutExpired("bwrap", timeout)
        if self.returncode is None:
            self._reap(0)
        return self.returncode

    def _reap(self, options: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError as exc:
            _UNREAPED.discard(self.pid)
            raise SandboxError(f"process {self.pid} was reaped by someone else") from exc
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            _UNREAPED.discard(self.pid)


_UNREAPED: set[int] = set()  # bubblewrap processes this process started and has not reaped
_adopting = False  # this process reaps its sandboxes' orphans (adopt_orphans)
_PR_SET_CHILD_SUBREAPER = 36
_INIT_EXIT_SECONDS = 0.5  # how long a clean-up waits for an orphaned init still on its way out


def adopt_orphans() -> str | None:
    """Make this process the one that reaps what its sandboxes leave behind, not the system's
    init. bubblewrap's monitor (the process `spawn` starts) exits as soon as it learns the
    action's exit status, without reaping the sandbox's init, its child; that one goes to the
    nearest "child subreaper" above it, else to pid 1, and until it is reaped it still counts
    against the tasks limit of the run's cgroup and of every cgroup above it (the agent's
    Quota). Some inits reap late (every 2 s on the machines spos is tested on); one that runs
    as pid 1 in a container may never. With this (PR_SET_CHILD_SUBREAPER), such processes come
    here, and `reap_orphans` reaps them as each run is cleaned up. Returns why it could not,
    or None."""
    global _adopting
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(_PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}"
    _adopting = True
    return None


def reap_orphans(*, wait: float = _INIT_EXIT_SECONDS, adopted: bool = False) -> None:
    """Reap the sandbox inits handed to this process (`adopt_orphans`): its children that it
    did not start itself (those are reaped by their `_Child`) and that are the init of a pid
    namespace of their own, named bwrap. One still on its way out (its namespace's other
    processes are being killed; it has left its cgroup already) is waited for, on a pidfd, for
    at most `wait` seconds. With `adopted`, every other child that exited and that this
    process did not start as a sandbox is reaped too: only for a caller whose own children are
    all sandboxes or waited for at once (the executor, on its rescan: an orphan of one of its
    helpers). Does nothing unless this process adopts orphans."""
    if not _adopting:
        return
    deadline = time.monotonic() + wait
    for pid in _children():
        if pid in _UNREAPED:
            continue
        kind = _adopted_kind(pid)
        if kind == "init":
            _reap_by_pidfd(pid, deadline)
        elif kind == "exited" and adopted:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _children() -> list[int]:
    """This process's children: from /proc/<pid>/task/<tid>/children, or, on a kernel that has
    no such file, every process whose parent it is."""
    found: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", "rb") as listing:
                found += map(int, listing.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/self/task/{task}"):  # not a thread that just ended
                return _children_by_parent()
        except OSError:
            continue
    return found


def _children_by_parent() -> list[int]:
    me = str(os.getpid())
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and (_proc_status(int(entry)) or {}).get("PPid") == me]


def _adopted_kind(pid: int) -> str | None:
    """"init": bubblewrap's init of a pid namespace of its own (pid 1 in its innermost
    namespace), exited or not; "exited": any other process that exited; None otherwise (or
    when it is gone)."""
    status = _proc_status(pid)
    if status is None:
        return None
    if status.get("Name") == "bwrap" and _is_namespace_init(pid, status):
        return "init"
    return "exited" if status.get("State", "").startswith("Z") else None


def _reap_by_pidfd(pid: int, deadline: float) -> None:
    """Reap exactly this child once it exited, waiting on its pidfd until `deadline`; left for
    a later call when it has not exited by then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    finally:
        os.close(fd)


def _ignored_signals() -> list[int]:
    """The signals this process ignores (never SIGKILL or SIGSTOP), as plain numbers: asked of
    `_signal` directly, since `signal`'s wrappers make an enum of every number, which cost a
    spawn more than the asking (the executor spawns for every run)."""
    import _signal

    return [number for number in _signal.valid_signals()
            if number not in (_signal.SIGKILL, _signal.SIGSTOP)
            and _signal.getsignal(number) == _signal.SIG_IGN]


def _spawn_keeps_fds() -> bool:
    """Whether posix_spawn's dup2 of an fd onto itself clears its close-on-exec flag, which is
    how `_spawn_entering` hands the child its fds: glibc does from 2.29 on. With another C
    library, or an older glibc, the child is forked instead."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(part) for part in version.split(".")[:2])
    except (ValueError, OSError, AttributeError, TypeError):
        return False
    return name == "glibc" and (major, minor) >= (2, 29)


_SPAWN_KEEPS_FDS = _spawn_keeps_fds()


def _spawn_entering(helper: str, argv: list[str], stdio: list[int | None], keep: tuple[int, ...],
                    join_fds: list[int], nice: int | None, error_fd: int,
                    ignored: list[int], netns: int | None = None) -> int:
    """posix_spawn `helper --enter` (launch.c), which joins the cgroup through `join_fds`, enters
    the network namespace `netns`, takes the nice level, keeps only fds 0-2 and `keep`, and
    executes `argv`. Returns its pid."""
    copies: list[int] = []
    try:
        # A stdio fd below 3 could be overwritten by an earlier dup2: give it a higher number.
        sources = []
        for fd in stdio:
            if fd is not None and fd < 3:
                copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
                fd = copies[-1]
            sources.append(fd)
        actions = [(os.POSIX_SPAWN_DUP2, fd, number)
                   for number, fd in enumerate(sources) if fd is not None]
        # dup2 of an fd onto itself clears its close-on-exec flag in the child alone.
        entered = [netns] if netns is not None else []
        actions += [(os.POSIX_SPAWN_DUP2, fd, fd)
                    for fd in sorted({*keep, *join_fds, *entered}) if fd >= 3]
        return os.posix_spawn(
            helper,
            [helper, "--enter", str(error_fd), "-" if nice is None else str(nice),
             ",".join(map(str, keep)), ",".join(map(str, join_fds)),
             "-" if netns is None else str(netns), "--", *argv],
            {}, file_actions=actions, setsigmask=(), setsigdef=ignored)
    finally:
        for fd in copies:
            os.close(fd)


def _enter_child(stdio: list[int | None], keep: tuple[int, ...], join_fds: list[int],
                 nice: int | None, ignored: list[int], netns: int | None = None) -> None:
    """In the forked child, before bubblewrap is executed: join the run's cgroup (so nothing of
    the run is ever outside it), enter the network namespace `netns`, take the nice level, set
    up fds 0-2, keep only `keep` open, default signal handling. Only system calls on values
    prepared by the parent."""
    for fd in join_fds:
        os.write(fd, b"0")
    if netns is not None:
        enter_netns(netns)
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    moved = [None if fd is None else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
    for number, fd in enumerate(moved):
        if fd is not None:
            os.dup2(fd, number)  # the copy at 0-2 is inheritable
    for fd in keep:
        os.set_inheritable(fd, True)
    low = 3
    for fd in sorted(f for f in set(keep) if f >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in ignored:
        signal.signal(signum, signal.SIG_DFL)


def _report_and_exit(error_fd: int, message: str) -> None:
    text = f"spos sandbox: {message}\n".encode(errors="replace")
    for fd in (error_fd, 2):
        try:
            os.write(fd, text)
        except OSError:
            pass
    os._exit(126)


def _stdio_fds(stdio: dict, opened: list[int]) -> list[int | None]:
    """fds for 0-2: an fd as given, DEVNULL opened here (and listed in `opened` to close),
    None to share the caller's."""
    fds: list[int | None] = []
    for name in ("stdin", "stdout", "stderr"):
        value = stdio[name]
        if value == subprocess.DEVNULL:
            value = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(value)
        elif value is not None and (not isinstance(value, int) or value < 0):
            raise SandboxError(f"{name} must be an fd, subprocess.DEVNULL or None")
        fds.append(value)
    return fds


def _exit_status(code: int | None) -> int | None:
    """bubblewrap exits 128+N when the action died of signal N; report it as -N like Popen."""
    if code is not None and _SIGNAL_EXIT_BASE < code <= _SIGNAL_EXIT_BASE + _MAX_SIGNAL:
        return _SIGNAL_EXIT_BASE - code
    return code


def _head_of_regular_file(path: str) -> bytes:
    """The first bytes of a regular file; b"" for anything else. What `path` names is looked at
    through an O_PATH descriptor first, which opens nothing: a FIFO, or a device whose opening
    does something (a tape rewinds), put where a task's program was, is never opened; only the
    regular file that descriptor found is then opened, through /proc, for reading."""
    try:
        found = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(found).st_mode):
            return b""
        fd = os.open(f"/proc/self/fd/{found}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    finally:
        os.close(found)
    try:
        return os.read(fd, 256)
    finally:
        os.close(fd)


def _open_without_links(root: str, device_path: str, walked: dict[str, int]) -> int:
    """An O_PATH fd of `device_path` below `root`, each component opened from its parent's fd
    and refused when it is a symbolic link. `walked` keeps the directories opened on the way
    (the caller closes them), so paths that share a parent open it once."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = [p for p in device_path.split("/") if p]
    prefix = ""
    if "" not in walked:
        walked[""] = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = walked[""]
    for index, part in enumerate(parts):
        prefix += "/" + part
        last = index == len(parts) - 1
        if not last and prefix in walked:
            fd = walked[prefix]
            continue
        try:
            child = os.open(part, flags, dir_fd=fd)
        except OSError as exc:
            raise SandboxError(f"cannot open {device_path} under {root}: {exc.strerror}",
                               retryable=True) from exc
        try:
            is_link = stat.S_ISLNK(os.fstat(child).st_mode)
        except BaseException:
            os.close(child)
            raise
        if is_link:
            os.close(child)
            raise SandboxError(f"refusing {device_path}: {part} is a symbolic link")
        if last:
            return child
        walked[prefix] = fd = child
    return os.dup(fd)  # the root itself


def _args_fd(args: list[str]) -> int:
    """A sealed-off memory file holding `args`, NUL-terminated, read from the start."""
    fd = os.memfd_create("spos-sandbox-args", os.MFD_CLOEXEC)
    data = "".join(f"{arg}\0" for arg in args).encode(_FS_ENCODING, _FS_ERRORS)  # os.fsencode each
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _is_namespace_init(pid: int, status: dict[str, str] | None = None) -> bool:
    """Whether the process is pid 1 of a pid namespace below this one (a sandbox's init);
    `status`: its `_proc_status`, when read already."""
    ids = ((_proc_status(pid) if status is None else status) or {}).get("NSpid", "").split()
    return len(ids) > 1 and ids[-1] == "1"


def _proc_status(pid: int) -> dict[str, str] | None:
    """The fields of /proc/<pid>/status; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            return {name: value.strip() for name, _, value in
                    (line.partition(":") for line in handle) if value}
    except OSError:
        return None


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                break
            raise
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _bwrap_version(bwrap: str) -> str:
    result = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip() or "bubblewrap"
