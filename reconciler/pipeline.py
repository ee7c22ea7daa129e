"""From a manifests directory to a Plan for one device: load, render, observe, diff.

What `spos plan` and `spos apply DIR` do before they print or apply, and what `spos sync` does
with a revision it fetched: one request in, the device and its Plan out. The plan memo (memo.py)
makes a plan of unchanged manifests on an unchanged device cheap; everything else is the pure
core (render, plan) and the kinds' observe().
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from reconciler.device import Device
from reconciler.errors import UsageError
from reconciler.resource import Facts, Plan


@dataclass
class PlanRequest:
    """What to plan, for which device.

    `policies` is the policy directory, or None for `policies/` beside `path` when it exists.
    `cgroup_root` defaults to ROOT/sys/fs/cgroup. `device_labels` is the `--device-labels` text
    (a complete label set) or None for the device's own labels. `creating_state` says the state
    directory may be created (apply is about to write). `revision` names the commit the
    manifests come from when the caller knows it (sync); otherwise git is asked. `stage` is
    told each step as it starts (the CLI prints them); `detail(text, total)` the steps within
    validation and `advance()` each file checked, for a live display of a long load."""

    path: str
    root: str = "/"
    policies: str | None = None
    cgroup_root: str | None = None
    device_labels: str | None = None
    allow_empty: bool = False
    creating_state: bool = False
    revision: str | None = None
    stage: Callable[[str], None] = field(default=lambda text: None, repr=False)
    detail: Callable[..., None] = field(default=lambda text, total=None: None, repr=False)
    advance: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def policy_dir(self) -> str | None:
        if self.policies:
            return self.policies
        beside = os.path.join(os.path.dirname(os.path.abspath(self.path)), "policies")
        return beside if os.path.isdir(beside) else None

    @property
    def device_cgroup_root(self) -> str:
        """--cgroup-root, or where the device's own cgroups are: /sys/fs/cgroup below the root."""
        return self.cgroup_root or os.path.join(os.path.abspath(self.root), "sys/fs/cgroup")


def make_plan(request: PlanRequest) -> tuple[Device, Plan]:
    from reconciler import __version__
    from reconciler.labels import device_labels
    from reconciler.memo import PlanMemo, fingerprint
    from reconciler.state import INVENTORY, memo_file, read_inventory
    from reconciler.systemctl import detect

    device = Device(request.root, cgroup_root=request.device_cgroup_root, systemd=detect(request.root))
    if not os.path.isdir(request.path):
        raise UsageError(f"{request.path}: no such manifests directory")
    facts = Facts(spos_command=spos_command(), root=str(device.root),
                  cgroup_version=device.cgroups.version, cgroup_parent=device.cgroups.parent,
                  cgroup_weight_file=device.cgroups.weight_file(),
                  activate_units=device.systemd is not None,
                  labels=device_labels(device, request.device_labels))
    memo = PlanMemo(memo_file(device, create=request.creating_state), _memo_key(request, facts))
    with GitRevision(request.path, known=request.revision) as revision:
        request.stage(f"Loading manifests from {request.path}...")
        digest, files, listed = fingerprint(request.path, request.policy_dir, memo)
        remembered = memo.desired_for(digest) if digest else None
        # The child starts before the planner is imported: that import is off its path.
        primer = _CachePrimer(request, device, files if digest and remembered is None else {},
                              listed)
        with primer:
            from reconciler.observe import observe
            from reconciler.plan import plan

            read = read_inventory(device)
            inventory = read["resources"]
            notices = [f"{INVENTORY} cannot be read ({read['unreadable']}): spos knows its "
                       "resources by where and how it writes them until apply writes it afresh"
                       ] if "unreadable" in read else []
            actual = None
            if remembered is not None:
                desired, found, declared = _recalled(request, device, facts, remembered, files,
                                                     listed)
                notices = [*found, *notices]
            else:
                ahead = None
                if primer.running:  # the device is observed, and cached files read, meanwhile
                    actual = _observe_ahead(device, set(inventory), memo)
                    ahead = _read_ahead(device, files)
                primer.wait()
                desired, found, declared, digest = _rendered(request, device, facts, memo,
                                                             files, listed, ahead)
                notices = [*found, *notices]
        if not declared and inventory and not request.allow_empty:
            raise UsageError(
                f"{request.path} holds no manifests: applying it would delete all {len(inventory)} "
                "resources spos manages here. Pass --allow-empty if that is what you want."
            )
        request.stage("Observing the device...")
        if actual is None:
            actual = observe(device, set(desired) | set(inventory), memo=memo)
        elif set(desired) - set(actual):  # new resources: read what is there of them too
            actual.update(observe(device, set(desired) - set(actual), discover=False, memo=memo))
        request.stage("Planning...")
        result = plan(
            desired, actual, inventory,
            root=str(device.root),
            manifests={"path": request.path, "revision": revision.result(), "digest": digest},
            version=__version__,
        )
    result.notices = notices + _cgroup_notices(device)
    if result.changes:
        from reconciler.expect import expectations

        result.estimates = expectations(device, result)
    memo.save()
    return device, result


def _cgroup_notices(device: Device) -> list[str]:
    tree = device.cgroups
    if tree.version is None:
        return [f"No cgroup file system at {tree.root}: agents' cgroups are not managed "
                "(give --cgroup-root /sys/fs/cgroup to manage real ones under another --root)."]
    return []


def _rendered(request: PlanRequest, device: Device, facts: Facts, memo, known=None, listed=None,
              ahead=None):
    """Load and check the manifests in full; render what their contents did not render to
    before (by input_keys); remember the result."""
    from reconciler.render import input_keys, kind_inputs, notices, render
    from reconciler.state import cache_file
    from reconciler.validate import load

    manifests = load(request.path, request.policy_dir,
                     cache_file(device, create=request.creating_state), known=known, listed=listed,
                     stage=request.detail, advance=request.advance, ahead=ahead)
    inputs = kind_inputs(manifests)
    keys = input_keys(manifests, inputs)
    before = memo.rendered()
    reuse = {rid: before[rid][1] for rid, key in keys.items() if rid in before and before[rid][2] == key}
    desired = render(manifests, facts, reuse, inputs)
    said = notices(manifests, facts)
    declared = sum(1 for m in manifests.manifests if m.kind != "Policy")
    memo.remember_desired(manifests.digest, desired, keys, said, declared)
    return desired, said, declared, manifests.digest


def _observe_ahead(device: Device, ids: set[str], memo) -> dict | None:
    """The device as observed before the manifests are loaded: the resources of the inventory
    (and what discovery finds). None when that fails: the observing after loading then fails
    (or not) as it always did, after the manifests' own problems are reported."""
    from reconciler.observe import observe

    try:
        return observe(device, ids, memo=memo)
    except Exception:  # noqa: BLE001 - observed again, in order, after loading
        return None


def _read_ahead(device: Device, files: dict):
    """The manifests of the files the cache holds already (validate.ReadAhead)."""
    from reconciler.state import cache_file
    from reconciler.validate import ReadAhead

    return ReadAhead(cache_file(device), files)


def _forkable() -> bool:
    """Whether a child forked here may run Python. A fork copies only the thread that calls
    it: a lock another thread held then stays locked in the child. So every other thread must
    have declared, with a `fork_safe` attribute set to True, that it never holds a lock such a
    child takes: an import's, the standard streams', the logging module's (the supervisor of
    `spos daemon`'s children, reconciler/agentd.py)."""
    import threading

    current = threading.current_thread()
    return all(thread is current or getattr(thread, "fork_safe", False) for thread in threading.enumerate())


class _CachePrimer:
    """While the device is observed (and the cached files' manifests read), a forked child
    parses and checks the manifest files the manifest cache does not hold
    (validate.prime_cache), on the other CPU: the YAML parser and
    the schema validator it imports for them (~45 ms) and the parsing itself are off this
    process's path, and `load` finds every file cached. Only in a process whose other threads
    are fork-safe (`_forkable`: not under the progress bar of a command at a terminal), on a
    device with a manifest cache, for a complete fingerprint; a child that fails only costs
    `load` the work it would have done anyway. `wait()`, and leaving the `with` block, wait for the child, which does no more
    than `load` would (it is not killed: a cache half saved would be thrown away)."""

    def __init__(self, request: PlanRequest, device: Device, files: dict, listed: dict):
        from reconciler.state import cache_file

        self.pid = 0
        cache = cache_file(device)
        if cache is None or not files or not hasattr(os, "fork"):
            return
        import signal

        if not _forkable():
            return
        policies = set(listed.get(request.policy_dir, ())) if request.policy_dir else set()
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        # Until the child has its own signal handling, a signal must not reach a Python handler
        # in it: one that raised there would unwind the caller's `with` blocks (the apply lock).
        stopping = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            return
        if pid == 0:  # the child: never returns into the caller
            code = 1
            try:
                for signum in stopping:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                from reconciler.validate import prime_cache

                prime_cache(cache, files, policies)
                code = 0
            finally:
                os._exit(code)
        self.pid = pid
        try:  # a signal that arrived meanwhile is handled now; its handler may raise
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        except BaseException:
            self.wait()  # nobody else will: the caller never gets this object
            raise

    @property
    def running(self) -> bool:
        return self.pid > 0

    def __enter__(self) -> _CachePrimer:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()

    def wait(self) -> None:
        """Wait for the child to end (at once when there is none or it was waited for)."""
        if self.pid > 0:
            pid, self.pid = self.pid, 0
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _recalled(request: PlanRequest, device: Device, facts: Facts, known, files, listed):
    """The desired state remembered for these exact manifest contents: each resource by its
    digest, rendered on its own only if the plan needs its attributes (the manifests are then
    loaded once, their specs read only where rendering needs them)."""
    from reconciler.resource import Resource

    loaded = []

    def whole(rid, kind_name):
        from reconciler.kinds import BY_NAME
        from reconciler.render import for_device, render_one
        from reconciler.state import cache_file
        from reconciler.validate import load

        if not loaded:
            manifests = load(request.path, request.policy_dir, cache_file(device), known=files,
                             listed=listed)
            loaded.append(for_device(manifests, facts))
        return render_one(loaded[0], facts, BY_NAME[kind_name], rid)

    desired = {
        rid: Resource(rid, kind, digest=digest, load=lambda rid=rid, kind=kind: whole(rid, kind))
        for rid, (kind, digest, _) in known["resources"].items()
    }
    return desired, known["notices"], known["declared"]


def _memo_key(request: PlanRequest, facts: Facts) -> str:
    """What, besides the manifests' contents, decides the desired state and how it is found."""
    import hashlib
    import json
    import shutil

    from reconciler import __version__
    from reconciler.memo import code_fingerprint

    policies = request.policy_dir
    inputs = [
        __version__, code_fingerprint(), repr(facts),
        shutil.which("systemd-analyze") is not None,  # whether calendar events were checked
        os.path.realpath(request.path), policies and os.path.realpath(policies),
        os.path.realpath(os.getcwd()),  # manifest names in the digest are relative to it
    ]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def spos_command() -> tuple[str, ...]:
    """How crontab lines reach spos: $SPOS_COMMAND, else this interpreter running the lean entry
    point with -I -S (reconciler/_cron.py): cron starts it every minute, and skipping
    site-packages processing halves its start-up."""
    override = os.environ.get("SPOS_COMMAND")
    if override:
        import shlex

        return tuple(shlex.split(override))
    entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cron.py")
    return (sys.executable, "-I", "-S", entry)


class GitRevision:
    """The commit the manifests come from, with `-dirty` when they differ from it, asked of git
    as soon as planning starts: its two processes run beside the loading and observing, and
    `result()` waits for them. `known`: the caller knows it (sync), git is not asked. Leaving
    the `with` block stops processes whose result nobody asked for."""

    def __init__(self, path: str, known: str | None = None):
        import subprocess

        self.known = known
        self.processes = []
        if known is not None:
            return
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        try:
            for words in (("rev-parse", "--verify", "-q", "HEAD"),
                          ("status", "--porcelain", "--untracked-files=normal", "--", ".")):
                self.processes.append(subprocess.Popen(
                    ["git", "-C", path, *words], stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))
        except OSError:
            self.stop()

    def __enter__(self) -> "GitRevision":
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def result(self) -> str | None:
        import subprocess

        if self.known is not None:
            return self.known
        if len(self.processes) != 2:
            return None
        try:
            (head, _), (dirty, _) = (p.communicate(timeout=30) for p in self.processes)
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        codes = [p.returncode for p in self.processes]
        self.processes = []
        if codes != [0, 0]:
            return None
        return head.strip() + ("-dirty" if dirty.strip() else "")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.communicate()
        self.processes = []

