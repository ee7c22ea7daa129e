#!/usr/bin/env python3
"""Latency of the spos trigger daemon: from a file being created, or a webhook being posted, to
the run being queued and to the action's process starting, beside the floor of inotify itself.

    python3 bench/bench_triggers.py [--samples 200] [--gap 0.05] [--idle 30] [--json FILE]
                                    [--keep] [--workdir DIR] [--live] [--spos CMD]

It applies a generated manifest to a temporary device root (a Quota, a Capability that may
execute one program, an agent whose task runs it with concurrency Allow, a filesystem Trigger on
a directory under the root with `events: [close_write]` and no debounce or settle, and a webhook
Trigger with a secret file), starts the real `spos triggers` and `spos executor` on that root,
waits until `spos trigger list --json` shows both triggers armed and the daemon's status file
gives the listen address, and then measures, one sample of each path per round (the first round
a warm-up), each sample that starts a run waiting for it to end, then --gap:

- floor         the time from just before creating a file to the inotify event for it
                (IN_CLOSE_WRITE), on a sibling directory of the watched one (same file system):
                read by a separate process blocked in read() on its inotify fd (what a daemon
                waiting for events pays: the kernel queueing the event and the wake-up), and read
                by this process right after close() (the kernel's part alone).
- file          from just before creating a file in the watched directory (open, write 11 bytes,
                close) to: enqueue() called (the time in the queue file's name,
                `NNN-<ns>-<run id>.json`), the record appearing in queue/ (its rename, seen by
                the watcher process: the run is queued and the executor is woken right after),
                and the action's first instruction (the stamp program of bench_executor.py prints
                CLOCK_REALTIME first; the executor copies it into the run's log).
- webhook       the same from just before a signed POST is sent: connect(), then the whole
                request, built beforehand (HMAC-SHA256 in X-Hub-Signature-256, a fresh
                X-GitHub-Delivery each time), in one sendall(); plus the HTTP round trip (202
                received). Its breakdown also says when this client had connected and written
                the whole request (request sent). Runs before 2026-11-29 06:00 started the
                clock before http.client built and sent the request, 0.5 ms earlier.
- for scale     one atomic write as the device layer does it (write, fsync, rename, fsync of the
                directory) on the root's file system: every enqueue here does one, the record
                (a trigger's events file and a webhook's payload travel in it, being under
                16 KiB; docs/queue.md, "Attachments").
                And bench_executor.py's path, enqueue() called in a long-lived process with no
                trigger, through the same executor: its executor part is what a trigger run's
                should be.

Why close_write and not create: a file-drop trigger must fire when the writer has finished
(IN_CREATE comes at open(), before a byte is written, so the action could read an empty file);
close_write is what docs/triggers.md and its tests use. Here the writer closes the file a few
microseconds after creating it, so the two differ by that much.

The split between the trigger daemon and the executor is at the record's arrival in queue/:
before it, the source, the gate and the enqueue (with its writes); after it, the executor
(claim, sandbox, action). The executor's own steps come from its `--- spos` log lines (1 ms
resolution). Also reported: the trigger daemon's CPU time per event (its process CPU clock, all
threads, including a webhook connection's thread that has ended), and its CPU time, wake-ups and
memory while idle with both triggers armed, right after start and after the samples.

All times are CLOCK_REALTIME (time.time(), the queue file name's clock and the stamp's). This
process sleeps (in poll on its own inotify watch of completed/, or, as the webhook's sender,
waiting for the answer) while a run goes through, so it takes little CPU from the daemons during
what is measured; the watcher process wakes once per run, when the record lands in queue/.

Reuses bench_executor.py's stamp program, log parsing, percentile and daemon handling, and
bench_reconcile.py's spawner and code snapshot: unless --live is given, the daemons import a copy
of reconciler/ taken at start. Needs root, bubblewrap and cgroups (what the executor needs), and
an installed spos. About two minutes with the defaults.

See bench/README.md for the targets and the latest numbers.

Standard library only. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import hmac
import http.client
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

from bench_executor import (
    AGENTS, STAMP, STATE, Daemon, Helper, build_stamp, environment, fmt_ms, iso_epoch, log_notes,
    made_note, parse_stamp, percentile, state_mount_point, verdict,
)
from bench_reconcile import (
    Failed, Runner, code_line, default_spos, describe_code, file_system_note, load_line, log,
    package_parent, save_results, snapshot_code,
)

AGENT = "bench-triggers"
TASK = "stamp"
FILE_TRIGGER = "bench-triggers-file"
HOOK_TRIGGER = "bench-triggers-hook"
DROP_DIR = "/srv/spos-bench/drop"
"""The watched directory (a device path)."""
FLOOR_DIR = "/srv/spos-bench/floor"
"""The floor's directory, beside the watched one: the same file system, not watched by spos."""
FLOOR_SYNC_DIR = "/srv/spos-bench/floor-sync"
WRITES_DIR = "/srv/spos-bench/writes"
"""Where the reference atomic writes go (the root's file system, like the queue)."""
SECRET_FILE = "/etc/spos-bench/webhook-secret"
HOOK_PATH = "/hooks/spos-bench"
SECRET = b"spos-bench-secret"

LATENCY_TARGET = 0.005
"""'A few milliseconds' (the issue): read as a median of at most 5 ms."""
RUN_TIMEOUT = 30.0

IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
_EVENT = struct.Struct("iIII")

WATCHER = r"""
import ctypes, os, signal, struct, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's; it ends this with SIGTERM
libc = ctypes.CDLL(None, use_errno=True)
libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
fd = libc.inotify_init1(os.O_CLOEXEC)  # blocking: read() sleeps until an event is queued
if fd < 0:
    raise SystemExit(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
tags = {}
for spec in sys.argv[1:]:
    tag, mask, path = spec.split(":", 2)
    wd = libc.inotify_add_watch(fd, os.fsencode(path), int(mask))
    if wd < 0:
        raise SystemExit(f"inotify_add_watch {path}: {os.strerror(ctypes.get_errno())}")
    tags[wd] = tag
header = struct.Struct("iIII")
os.write(1, b"ready\n")
while True:
    chunk = os.read(fd, 65536)
    now = time.time()
    lines, offset = [], 0
    while offset + header.size <= len(chunk):
        wd, mask, cookie, length = header.unpack_from(chunk, offset)
        offset += header.size
        name = chunk[offset:offset + length].rstrip(b"\0").decode(errors="replace")
        offset += length
        lines.append(f"{tags.get(wd, '?')} {mask} {now!r} {name}\n")
    os.write(1, "".join(lines).encode())
"""
"""The floor, and the moment a record lands in queue/: a separate process blocked in read() on
a blocking inotify fd, printing `<tag> <mask> <time> <name>` for every event, the time taken as
soon as read() returns. Runs with -I -S; the arguments are `tag:mask:directory`."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


# ------------------------------------------------------------------------------ inotify


class Seen(NamedTuple):
    tag: str
    mask: int
    time: float
    name: str


class Inotify:
    """This process's own inotify watches (non-blocking fd): `read()` what is queued now,
    `wait(seconds)` for at least one event."""

    def __init__(self, watches: dict[str, tuple[Path, int]]):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise Failed(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.tags: dict[int, str] = {}
        for tag, (path, mask) in watches.items():
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(str(path)), mask)
            if wd < 0:
                raise Failed(f"inotify_add_watch {path}: {os.strerror(ctypes.get_errno())}")
            self.tags[wd] = tag

    def read(self) -> list[Seen]:
        events = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            now, offset = time.time(), 0
            while offset + _EVENT.size <= len(chunk):
                wd, mask, _, length = _EVENT.unpack_from(chunk, offset)
                offset += _EVENT.size
                name = os.fsdecode(chunk[offset:offset + length].rstrip(b"\0"))
                offset += length
                events.append(Seen(self.tags.get(wd, "?"), mask, now, name))

    def wait(self, seconds: float) -> list[Seen]:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(max(0, int(seconds * 1000)))
        return self.read()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Watcher:
    """The WATCHER process and the events it printed, read from its stdout when asked."""

    def __init__(self, watches: dict[str, tuple[Path, int]], env: dict):
        specs = [f"{tag}:{mask}:{path}" for tag, (path, mask) in watches.items()]
        self.process = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHER, *specs],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        self.fd = self.process.stdout.fileno()
        self.buffer = b""
        self.seen: list[Seen] = []
        self.ready = False
        self.take(lambda _: False, 10, until_ready=True)

    def _read(self, seconds: float) -> bool:
        """Reads what the watcher printed, waiting at most `seconds`; False when nothing was."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(max(0, int(seconds * 1000))):
            return False
        chunk = os.read(self.fd, 65536)
        if not chunk:
            raise Failed(f"the inotify watcher exited ({self.process.wait()})")
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready = True
                continue
            tag, mask, at, name = line.decode().split(" ", 3)
            self.seen.append(Seen(tag, int(mask), float(at), name))
        return True

    def take(self, match: Callable[[Seen], bool], seconds: float, until_ready=False) -> Seen | None:
        """The first event printed that `match`es (removed from those kept), waiting for it at
        most `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            if until_ready and self.ready:
                return None
            for index, seen in enumerate(self.seen):
                if match(seen):
                    return self.seen.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed("the inotify watcher did not start" if until_ready
                             else "the inotify watcher saw no such event")
            self._read(remaining)

    def clear(self) -> None:
        """Forget every event printed so far."""
        while self._read(0):
            pass
        self.seen.clear()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


# ------------------------------------------------------------------------------ set-up


def manifests(argv: list[str]) -> str:
    """A Quota and a Capability as bench_executor.py's, one agent whose task runs the stamp
    program (concurrency Allow), and the two Triggers (no debounce, no settle, no rate limit)."""
    return f"""\
# Generated by bench/bench_triggers.py.
apiVersion: spos/v1
kind: Quota
metadata:
  name: bench
spec:
  cpu: "100%"
  memory: 256M
  tasksMax: 16
---
apiVersion: spos/v1
kind: Capability
metadata:
  name: bench
spec:
  description: Run the benchmark's time stamp program, nothing else.
  allowed:
    execute: [{os.path.dirname(STAMP)}]
    network: [none]
---
apiVersion: spos/v1
kind: Agent
metadata:
  name: {AGENT}
spec:
  description: Runs a program that prints the time it started, for bench/bench_triggers.py.
  capability: bench
  quota: bench
  tasks:
    {TASK}:
      command: {json.dumps(argv)}
      timeout: 1m
      concurrency: Allow
---
apiVersion: spos/v1
kind: Trigger
metadata:
  name: {FILE_TRIGGER}
spec:
  agent: {AGENT}
  task: {TASK}
  filesystem:
    path: {DROP_DIR}
    events: [close_write]
---
apiVersion: spos/v1
kind: Trigger
metadata:
  name: {HOOK_TRIGGER}
spec:
  agent: {AGENT}
  task: {TASK}
  webhook:
    path: {HOOK_PATH}
    secretFile: {SECRET_FILE}
"""


def write_file(path: Path) -> None:
    """What a writer dropping a small file does: create, write, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"spos bench\n")
    finally:
        os.close(fd)


def process_cpu(pid: int) -> float:
    """CPU seconds of a whole process: every thread, including those that have ended (a webhook
    connection's), from its CPU-time clock (the clock id clock_getcpuclockid() gives)."""
    return time.clock_gettime(((~pid) << 3) | 2)


def memory(pid: int) -> dict:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values.get("VmRSS", 0.0), "peak_rss_mb": values.get("VmHWM", 0.0)}


# ------------------------------------------------------------------------------ measuring


class TriggerBench:
    def __init__(self, args, runner: Runner, spos: list[str], code_path: str):
        self.args = args
        self.runner = runner
        self.spos = spos
        self.code_path = code_path
        self.work = Path(tempfile.mkdtemp(prefix="spos-bench-triggers-", dir=args.workdir))
        self.root = self.work / "root"
        self.repo = self.work / "repo"
        self.agent_dir = self.root / AGENTS / AGENT
        self.result: dict = {"workdir": str(self.work), "latency": {}, "breakdown": {},
                             "daemon_cpu_per_event": {}, "idle": {}}
        self.executor: Daemon | None = None
        self.triggerd: Daemon | None = None
        self.watcher: Watcher | None = None
        self.ended: Inotify | None = None
        self.sync: Inotify | None = None
        self.helper: Helper | None = None

    def host(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    def run(self) -> dict:
        try:
            self.setup()
            self.start_daemons()
            self.result["idle"]["fresh"] = self.idle("right after start")
            self.measure()
            self.result["idle"]["after work"] = self.idle("after the samples")
            self.result["triggerd_memory"] = memory(self.triggerd.pid)
            self.result["triggerd_life"] = self.triggerd.stop()
            self.result["executor_life"] = self.executor.stop()
        except Failed as exc:
            self.result["error"] = str(exc)
            log(f"FAILED: {exc}")
        finally:
            self.cleanup()
        return self.result

    def cleanup(self) -> None:
        """Every process this run started, the agent's cgroups and the root; also after Ctrl-C."""
        for closing in (self.watcher, self.ended, self.sync):
            if closing is not None:
                closing.close()
        if self.helper is not None:
            try:
                self.helper.close()
            except (OSError, subprocess.TimeoutExpired):
                self.helper.process.kill()
        for daemon in (self.triggerd, self.executor):
            if daemon is not None:
                try:
                    daemon.stop()
                except ChildProcessError:
                    pass  # already reaped
        self.runner.remove_cgroups(self.root)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")

    def setup(self) -> None:
        self.stamp = build_stamp(self.work, self.host(STAMP))
        for directory in (DROP_DIR, FLOOR_DIR, FLOOR_SYNC_DIR, WRITES_DIR):
            self.host(directory).mkdir(parents=True)
        secret = self.host(SECRET_FILE)
        secret.parent.mkdir(parents=True)
        secret.write_bytes(SECRET + b"\n")
        secret.chmod(0o600)
        (self.repo / "agents.d").mkdir(parents=True)
        (self.repo / "agents.d" / "bench.yaml").write_text(manifests(self.stamp["argv"]))
        applied = self.runner.run([*self.spos, "--root", str(self.root), "apply", "--auto-approve",
                                   "agents.d"], self.repo)
        registrations = self.root / STATE / "triggers"
        if ", 0 failed." not in applied["stdout"] or not all(
                (registrations / f"{name}.json").is_file() for name in (FILE_TRIGGER, HOOK_TRIGGER)):
            raise Failed(f"the apply did not register the agent and both triggers:\n"
                         f"{applied['stdout'][-2000:]}")
        for bucket in ("queue", "completed", "failed"):
            (self.agent_dir / bucket).mkdir(parents=True, exist_ok=True)
        self.result["stamp"] = self.stamp
        log(f"device root {self.root}: agent and triggers applied; action "
            f"{shlex.join(self.stamp['argv'])} ({self.stamp['kind']})")

    def start_daemons(self) -> None:
        r = ["--root", str(self.root)]
        self.executor = Daemon([*self.spos, *r, "executor"], self.runner.env, self.root,
                               self.work / "executor.stderr")
        self.result["executor_ready_s"] = self.executor.wait_ready()
        self.triggerd = Daemon([*self.spos, *r, "triggers", "--listen", "127.0.0.1:0"],
                               self.runner.env, self.root, self.work / "triggers.stderr")
        self.result["triggerd_armed_s"] = self.wait_armed()
        status = json.loads((self.root / STATE / "triggerd" / "status.json").read_text())
        host, _, port = status["listen"].rpartition(":")
        self.listen = (host, int(port))
        self.result["listen"] = status["listen"]
        log(f"executor (pid {self.executor.pid}) ready in {self.result['executor_ready_s'] * 1000:.0f} ms; "
            f"trigger daemon (pid {self.triggerd.pid}) armed in "
            f"{self.result['triggerd_armed_s'] * 1000:.0f} ms, webhooks on {status['listen']}")
        runs = self.agent_dir
        self.watcher = Watcher({"floor": (self.host(FLOOR_DIR), IN_CLOSE_WRITE),
                                "queue": (runs / "queue", IN_MOVED_TO)}, self.runner.lean_env)
        self.ended = Inotify({"completed": (runs / "completed", IN_MOVED_TO),
                              "failed": (runs / "failed", IN_MOVED_TO)})
        self.sync = Inotify({"floor-sync": (self.host(FLOOR_SYNC_DIR), IN_CLOSE_WRITE)})
        self.helper = Helper(self.code_path, self.root, self.runner.lean_env)
        time.sleep(0.5)

    def wait_armed(self, timeout: float = 30) -> float:
        """Until `spos trigger list --json` shows both triggers armed by this daemon, and its
        status file gives the listen address."""
        began = time.perf_counter()
        listing: dict = {}
        while time.perf_counter() - began < timeout:
            if self.triggerd.process.poll() is not None:
                raise Failed(f"the trigger daemon exited: {self.triggerd.stderr_path.read_text()[-2000:]}")
            done = self.runner.run([*self.spos, "--root", str(self.root), "trigger", "list", "--json"],
                                   self.repo)
            listing = json.loads(done["stdout"])
            daemon = listing.get("daemon") or {}
            states = {t["name"]: t.get("state") for t in listing.get("triggers", [])}
            if (daemon.get("running") and daemon.get("pid") == self.triggerd.pid and daemon.get("listen")
                    and states.get(FILE_TRIGGER) == "armed" and states.get(HOOK_TRIGGER) == "armed"):
                return time.perf_counter() - began
            time.sleep(0.1)
        raise Failed(f"the triggers were not armed within {timeout:g} s: {json.dumps(listing)[:2000]}")

    # -- samples ----------------------------------------------------------------------------

    def measure(self) -> None:
        paths = {
            "floor": self.trial_floor,
            "floor-sync": self.trial_floor_sync,
            "write": self.trial_write,
            "file": self.trial_file,
            "webhook": self.trial_webhook,
            "enqueue": self.trial_enqueue,
        }
        samples: dict[str, list[dict]] = {name: [] for name in paths}
        log(f"{self.args.samples} samples of each of {len(paths)} paths after a warm-up round, "
            f"interleaved, {self.args.gap:g} s after each run ended")
        before = process_cpu(self.triggerd.pid)
        for index in range(self.args.samples + 1):
            for name, trial in paths.items():
                sample = trial(index)
                if index:
                    samples[name].append(sample)
                if name in RUNS:
                    time.sleep(self.args.gap)  # after a run ended: the executor finishes up
            if index and index % 25 == 0:
                log(f"  {index}/{self.args.samples}: file median so far "
                    f"{fmt(statistics.median(s['stamp'] - s['t0'] for s in samples['file']))} to the "
                    f"action, {fmt(statistics.median(s['enqueued_at'] - s['t0'] for s in samples['file']))} "
                    "to enqueue()")
        self.result["triggerd_cpu_during_samples_s"] = process_cpu(self.triggerd.pid) - before
        self.result["samples"] = samples
        self.summarise(samples)

    def trial_floor(self, index: int) -> dict:
        """A file created in a directory another process watches; the time it read the event."""
        name = f"floor-{index:05d}"
        self.watcher.clear()
        t0 = time.time()
        write_file(self.host(FLOOR_DIR) / name)
        seen = self.watcher.take(lambda e: e.tag == "floor" and e.name == name, 10)
        return {"t0": t0, "event": seen.time}

    def trial_floor_sync(self, index: int) -> dict:
        """The same with this process's own watch, read as soon as close() returned."""
        name = f"floor-{index:05d}"
        self.sync.read()
        t0 = time.time()
        write_file(self.host(FLOOR_SYNC_DIR) / name)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for seen in self.sync.wait(deadline - time.monotonic()):
                if seen.name == name:
                    return {"t0": t0, "event": seen.time}
        raise Failed(f"no inotify event for {name}")

    def trial_write(self, index: int) -> dict:
        """For scale: one atomic write as the device layer does it (write, fsync, rename, fsync
        of the directory), on the root's file system. Each enqueue here does one: the record,
        which carries the small attachments (a trigger's events file, a webhook's payload)."""
        directory = self.host(WRITES_DIR)
        temp = directory / f".write-{index:05d}.tmp"
        t0 = time.time()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"x" * 400)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, directory / f"write-{index:05d}")
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"t0": t0, "event": time.time()}

    def trial_enqueue(self, index: int) -> dict:
        """For comparison, bench_executor.py's path: enqueue() called in a long-lived process
        (no trigger, no attachments), the same agent, task and executor."""
        self.watcher.clear()
        self.ended.read()
        answer = self.helper.ask(do="enqueue", agent=AGENT, task=TASK)
        sample = self.ran(answer["t0"], lambda record: record.get("id") == answer["id"],
                          f"enqueue {answer['id']}")
        sample["returned"] = answer["returned"]
        return sample

    def trial_file(self, index: int) -> dict:
        name = f"drop-{index:05d}.dat"
        self.watcher.clear()
        self.ended.read()
        cpu = process_cpu(self.triggerd.pid)
        t0 = time.time()
        write_file(self.host(DROP_DIR) / name)
        closed = time.time()

        def ours(record: dict) -> bool:
            source = record.get("source") or {}
            return source.get("trigger") == FILE_TRIGGER and (source.get("event") or {}).get("name") == name

        sample = self.ran(t0, ours, f"file {name}")
        sample["daemon_cpu_s"] = process_cpu(self.triggerd.pid) - cpu
        sample["closed"] = closed
        return sample

    def trial_webhook(self, index: int) -> dict:
        delivery = f"spos-bench-{os.getpid()}-{index:05d}"
        body = json.dumps({"sample": index, "delivery": delivery}).encode()
        host, port = self.listen
        # The whole request is built first, as a sender has it ready when its event comes
        # (http.client spent 0.5 ms between the clock's start and the last byte sent).
        request = "".join(f"{name}: {value}\r\n" for name, value in (
            ("Host", f"{host}:{port}"),
            ("Content-Type", "application/json"),
            ("Content-Length", len(body)),
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()),
            ("Connection", "close"),
        ))
        request = f"POST {HOOK_PATH} HTTP/1.1\r\n{request}\r\n".encode() + body
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        connection.settimeout(RUN_TIMEOUT)
        self.watcher.clear()
        self.ended.read()
        cpu = process_cpu(self.triggerd.pid)
        t0 = time.time()
        try:
            connection.connect((host, port))
            connection.sendall(request)
            sent = time.time()  # connected, and the whole request written to the socket
            response = http.client.HTTPResponse(connection)
            response.begin()
            answer = response.read()
            answered = time.time()
        finally:
            connection.close()
        if response.status != 202:
            raise Failed(f"webhook answered {response.status}: {answer[:500]!r}")
        run_id = json.loads(answer).get("run")
        sample = self.ran(t0, lambda record: record.get("id") == run_id, f"webhook {delivery}")
        sample["daemon_cpu_s"] = process_cpu(self.triggerd.pid) - cpu
        sample["answered"] = answered
        sample["sent"] = sent
        return sample

    def ran(self, t0: float, ours: Callable[[dict], bool], what: str) -> dict:
        """Wait (asleep in poll) for the run to reach completed/; then the time its record landed
        in queue/ (from the watcher), the enqueue time in its name, and its log."""
        deadline = time.monotonic() + RUN_TIMEOUT
        found = None
        while found is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"{what}: no run ended within {RUN_TIMEOUT:g} s; trigger daemon says "
                             f"{self.triggerd.stderr_path.read_text()[-1000:]}")
            for daemon, called in ((self.triggerd, "the trigger daemon"), (self.executor, "the executor")):
                if daemon.process.poll() is not None:
                    raise Failed(f"{what}: {called} exited ({daemon.process.returncode}): "
                                 f"{daemon.stderr_path.read_text()[-1000:]}")
            for seen in self.ended.wait(min(remaining, 1.0)):
                if seen.name.startswith(".") or not seen.name.endswith(".json"):
                    continue
                try:
                    record = json.loads((self.agent_dir / seen.tag / seen.name).read_text())
                except (OSError, ValueError):
                    continue
                if ours(record):
                    found = (seen.tag, seen.name, record)
                    break
        bucket, name, record = found
        if bucket != "completed":
            raise Failed(f"{what}: run {record.get('id')} {record.get('state')}: {record.get('reason')}")
        queued = self.watcher.take(lambda e: e.tag == "queue" and e.name == name, 10)
        text = (self.agent_dir / "logs" / f"{record['id']}.log").read_text()
        return {
            "t0": t0,
            "run": record["id"],
            "enqueued_at": int(name.split("-", 2)[1]) / 1e9,
            "in_queue": queued.time,
            "stamp": parse_stamp(text),
            "notes": log_notes(text),
            "ended_at": iso_epoch(record.get("endedAt")),
        }

    # -- idle -------------------------------------------------------------------------------

    def idle(self, label: str) -> dict:
        pid = self.triggerd.pid
        before, cpu_before = self.triggerd.counters(), process_cpu(pid)
        time.sleep(self.args.idle)
        after, cpu_after = self.triggerd.counters(), process_cpu(pid)
        seconds = after["at"] - before["at"]
        result = {
            "window_s": seconds,
            "cpu_s": cpu_after - cpu_before,
            "cpu_s_per_min": (cpu_after - cpu_before) / seconds * 60,
            "wakeups": after["voluntary"] - before["voluntary"],
            "threads": after["threads"],
            **memory(pid),
        }
        log(f"idle {label}: {result['cpu_s'] * 1000:.1f} ms CPU, {result['wakeups']} wake-ups in "
            f"{seconds:.1f} s, RSS {result['rss_mb']:.1f} MB, {result['threads']} threads")
        return result

    # -- numbers ----------------------------------------------------------------------------

    def summarise(self, samples: dict[str, list[dict]]) -> None:
        latency = self.result["latency"]
        for key, (_, path, measure, _) in ROWS.items():
            values = [v for v in (measure(s) for s in samples[path]) if v is not None]
            if values:
                latency[key] = summary(values)
        for path in ("file", "webhook", "enqueue"):
            self.result["breakdown"][path] = breakdown(samples[path])
        for path in ("file", "webhook"):
            cpu = [s["daemon_cpu_s"] for s in samples[path]]
            self.result["daemon_cpu_per_event"][path] = {"median_s": statistics.median(cpu),
                                                         "mean_s": statistics.mean(cpu)}
        for key, data in latency.items():
            log(f"  {ROWS[key][0]}: median {fmt(data['median_s'])}, p99 {fmt(data['p99_s'])}")


def summary(values: list[float]) -> dict:
    return {
        "median_s": statistics.median(values),
        "p90_s": percentile(values, 0.90),
        "p99_s": percentile(values, 0.99),
        "min_s": min(values),
        "max_s": max(values),
        "n": len(values),
        "samples_s": [round(v, 7) for v in values],
    }


RUNS = ("file", "webhook", "enqueue")
"""The paths whose samples start a run; the floors start none and need no gap after them."""

ROWS: dict[str, tuple[str, str, Callable[[dict], float | None], bool]] = {
    # key: (label, path, value of one sample, whether the target applies)
    "floor": ("floor: inotify, watcher process woken", "floor",
              lambda s: s["event"] - s["t0"], False),
    "floor-sync": ("floor: inotify, read after close()", "floor-sync",
                   lambda s: s["event"] - s["t0"], False),
    "write": ("for scale: an atomic write, 2 fsyncs", "write",
              lambda s: s["event"] - s["t0"], False),
    "file-enqueue": ("file created -> enqueue() called", "file",
                     lambda s: s["enqueued_at"] - s["t0"], True),
    "file-queued": ("file created -> record in queue/", "file",
                    lambda s: s["in_queue"] - s["t0"], True),
    "file-action": ("file created -> action running", "file",
                    lambda s: s["stamp"] - s["t0"], True),
    "file-executor": ("  of which record in queue/ -> action", "file",
                      lambda s: s["stamp"] - s["in_queue"], False),
    "hook-enqueue": ("webhook POST -> enqueue() called", "webhook",
                     lambda s: s["enqueued_at"] - s["t0"], True),
    "hook-queued": ("webhook POST -> record in queue/", "webhook",
                    lambda s: s["in_queue"] - s["t0"], True),
    "hook-answer": ("webhook POST -> 202 received", "webhook",
                    lambda s: s["answered"] - s["t0"], False),
    "hook-action": ("webhook POST -> action running", "webhook",
                    lambda s: s["stamp"] - s["t0"], True),
    "hook-executor": ("  of which record in queue/ -> action", "webhook",
                      lambda s: s["stamp"] - s["in_queue"], False),
    "enqueue-queued": ("plain enqueue() -> record in queue/", "enqueue",
                       lambda s: s["in_queue"] - s["t0"], False),
    "enqueue-action": ("plain enqueue() -> action running", "enqueue",
                       lambda s: s["stamp"] - s["t0"], False),
    "enqueue-executor": ("  of which record in queue/ -> action", "enqueue",
                         lambda s: s["stamp"] - s["in_queue"], False),
}
"""The plain enqueue() rows are bench_executor.py's 'executor, enqueue() in-process' path,
measured here under the same conditions as the trigger paths."""


def breakdown(samples: list[dict]) -> dict:
    """Median time from the event (file created, POST sent) to each step; the executor's steps
    from its log lines (1 ms resolution)."""
    stages: dict[str, list[float]] = {}
    for sample in samples:
        points = {
            "request sent": sample.get("sent"),
            "enqueue() called": sample["enqueued_at"],
            "record in queue/": sample["in_queue"],
            "enqueue() returned": sample.get("returned"),
            "202 received": sample.get("answered"),
            "attempt started": sample["notes"].get("started"),
            "spawned": sample["notes"].get("spawned"),
            "action running": sample["stamp"],
            "run recorded": sample["ended_at"],
        }
        for stage, at in points.items():
            if at is not None:
                stages.setdefault(stage, []).append(at - sample["t0"])
    return {stage: statistics.median(values) for stage, values in stages.items()}


# ------------------------------------------------------------------------------ reporting


def fmt(seconds: float | None) -> str:
    """Like bench_executor.fmt_ms, with hundredths below a millisecond (the floor)."""
    if seconds is not None and seconds < 0.001:
        return f"{seconds * 1000:.2f} ms"
    return fmt_ms(seconds)


def table(result: dict) -> str:
    lines = []
    latency = result["latency"]
    if latency:
        header = (f"{'latency':<40} {'median':>9} {'p90':>9} {'p99':>9} {'min':>9} {'max':>9} "
                  f"{'n':>4}  target")
        lines += [header, "-" * len(header)]
        for key, data in latency.items():
            label, _, _, targeted = ROWS[key]
            target = (f"<= {fmt(LATENCY_TARGET)} {verdict(data['median_s'], LATENCY_TARGET)}"
                      if targeted else "")
            lines.append(f"{label:<40} {fmt(data['median_s']):>9} {fmt(data['p90_s']):>9} "
                         f"{fmt(data['p99_s']):>9} {fmt(data['min_s']):>9} {fmt(data['max_s']):>9} "
                         f"{data['n']:>4}  {target}".rstrip())
            if key in ("write", "file-executor", "hook-executor"):
                lines.append("")
        if min(data["n"] for data in latency.values()) < 100:
            lines.append("  (p99 is the nearest rank: with fewer than 100 samples it is the maximum)")
        lines.append("  (the record's arrival in queue/ is seen by the watcher process, so it "
                     "includes one wake-up, about the first floor)")
        lines.append("")
        for path, stages in result["breakdown"].items():
            origin = {"file": "the file was created", "webhook": "the POST was sent",
                      "enqueue": "enqueue() was called"}[path]
            lines.append(f"where the time goes, {path} (median ms after {origin}):")
            lines.append("  " + " | ".join(f"{stage} {value * 1000:.1f}"
                                            for stage, value in stages.items()))
        cpu = result["daemon_cpu_per_event"]
        lines.append("CPU of the trigger daemon per event (median): " + ", ".join(
            f"{path} {fmt(data['median_s'])}" for path, data in cpu.items()))
        lines.append("")
    idle = result["idle"]
    if idle:
        header = (f"{'idle trigger daemon, both triggers armed':<40} {'window':>9} {'cpu':>9} "
                  f"{'cpu/min':>9} {'wake-ups':>9} {'RSS':>9} {'threads':>7}")
        lines += [header, "-" * len(header)]
        for name, data in idle.items():
            lines.append(f"{name:<40} {data['window_s']:>7.1f} s {fmt(data['cpu_s']):>9} "
                         f"{fmt(data['cpu_s_per_min']):>9} {data['wakeups']:>9} "
                         f"{data['rss_mb']:>6.1f} MB {data['threads']:>7}")
        lines.append("  (wake-ups: voluntary context switches of all its threads)")
    if "error" in result:
        lines.append(f"FAILED: {result['error'].splitlines()[0]}")
    return "\n".join(lines)


def report(args, env_info: dict, result: dict) -> None:
    payload = save_results(args, env_info, {"result": result})
    out = sys.stderr if args.json == "-" else sys.stdout
    stamp = result.get("stamp", {})
    lines = [
        f"spos trigger benchmark, {env_info['date']}: {env_info['cpus']} CPUs, Python "
        f"{env_info['python']}, kernel {env_info['kernel']}, {env_info['bubblewrap']}, "
        f"{env_info.get('launcher', 'Python launcher')}",
        code_line(env_info),
        f"action: {shlex.join(stamp.get('argv', []))} ({stamp.get('kind', '?')}), prints "
        f"CLOCK_REALTIME first; temporary device root in {env_info['workdir']}"
        f"{made_note(env_info)}{file_system_note(env_info)}",
        f"triggers: filesystem {DROP_DIR} [close_write], webhook {HOOK_PATH} (HMAC-SHA256); "
        "no debounce or settle; daemon and executor with their defaults",
        f"{args.samples} samples per path after a warm-up round, paths interleaved, each after the "
        f"previous run ended (+{args.gap:g} s); idle windows {args.idle:g} s",
        load_line(env_info, "min is the steadier figure"),
        "",
        table(result),
    ]
    print("\n".join(lines), file=out)
    if args.json == "-":
        print(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200,
                        help="measured samples per path (default 200; with fewer than 100, p99 is "
                             "the maximum)")
    parser.add_argument("--gap", type=float, default=0.05, metavar="SECONDS",
                        help="pause after each sample's run ended, so that the next event finds both "
                             "daemons asleep (default 0.05)")
    parser.add_argument("--idle", type=float, default=30, metavar="SECONDS",
                        help="length of each idle window (default 30, the daemon's status "
                             "heartbeat, so that each window holds one as a minute holds two)")
    parser.add_argument("--json", metavar="FILE", help="also write every number as JSON ('-': stdout)")
    parser.add_argument("--spos", metavar="CMD",
                        help="how to start spos (default: the spos script beside this python)")
    parser.add_argument("--live", action="store_true",
                        help="run the working tree's code, not a snapshot taken at start")
    parser.add_argument("--workdir", metavar="DIR", help="where to create the temporary root")
    parser.add_argument("--keep", action="store_true", help="keep the device root, its runs and logs")
    args = parser.parse_args()
    if args.samples < 1 or args.idle <= 0 or args.gap < 0:
        parser.error("--samples must be at least 1, --idle positive, --gap not negative")
    if os.geteuid() != 0:
        parser.error("the executor's sandbox needs root")
    spos = shlex.split(args.spos) if args.spos else default_spos()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # cleaned up like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it
    code_dir = None if args.live else Path(tempfile.mkdtemp(prefix="spos-bench-code-", dir=args.workdir))
    runner = None
    try:
        code = snapshot_code(code_dir) if code_dir else describe_code()
        code["snapshot"] = code_dir is not None
        runner = Runner(spos, str(code_dir) if code_dir else None)
        code_root = str(code_dir) if code_dir else package_parent()
        env_info = environment(args, spos, code, code_root)
        with state_mount_point() as made:
            env_info["made_mount_points"] = made
            result = TriggerBench(args, runner, spos, code_root).run()
        report(args, env_info, result)
    except KeyboardInterrupt:
        log("interrupted; every process and the temporary root were cleaned up")
        return 130
    finally:
        if runner is not None:
            try:
                runner.close()
            except (OSError, subprocess.TimeoutExpired):
                runner.spawner.kill()
        if code_dir:
            shutil.rmtree(code_dir, ignore_errors=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
