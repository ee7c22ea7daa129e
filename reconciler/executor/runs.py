"""Run records on disk: where each run is, and the only ways it moves.

A run is one JSON file. Its directory is its state bucket, per agent under
`<state>/agents/<agent>/`:

    queue/      queued, or waiting for a retry (`notBefore`)
    active/     claimed by an executor, running
    completed/  succeeded
    failed/     failed, timed out, cancelled, skipped or expired (the record's `state` says which)

The file keeps its name in every bucket, `<100-priority>-<enqueue ns>-<run id>.json`, so the
queue sorts by priority, then age. Every move is a rename within one file system, so a run is
in exactly one bucket at any instant; claiming is `rename(queue/x, active/x)`, which succeeds
for exactly one of several executors. A record is rewritten with the device layer's atomic
write, so readers never see a torn file.

Next to an active record live files named after it: `<name>.cancel` (a cancel request, see
cancel.py) and `<name>.reserve`, room set aside on the state file system when the run is
claimed and given back just before its end is written, so that a full disk still lets the end
be recorded. Either one whose record left active/ is a stray, removed under the claim lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

from reconciler import AGENTS_DIR
from reconciler.device import Device, StagedWrite, temporary_writer
from reconciler.errors import SposError, UnsafePathError
from reconciler.executor.config import CONCURRENCY
from reconciler.executor.enqueue import attachments_problem

BUCKETS = ("queue", "active", "completed", "failed")
TERMINAL_BUCKET = {
    "completed": "completed",
    "failed": "failed",
    "timeout": "failed",
    "cancelled": "failed",
    "skipped": "failed",
    "expired": "failed",
}
STATES = ("queued", "active", *TERMINAL_BUCKET)
RUN_ID = re.compile(r"[0-9A-Za-z_-]+")
RUN_FILE = re.compile(r"\d{3}-\d{20}-(?P<id>[0-9A-Za-z_-]+)\.json")
SIDECARS = ("cancel", "reserve")
RESERVE_BYTES = 64 * 1024
"""Room set aside per active run for writing its end: a record and its temporary copy, with
plenty to spare for a directory that has to grow."""

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def _writer_gone(name: str) -> bool:
    """Whether `name` is a temporary file of Device.write_staged whose process is gone. A live
    one (or a pid taken again since) is left alone."""
    pid = temporary_writer(name)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def storage_failure(exc: BaseException) -> bool:
    """Whether `exc` is the state file system refusing a write: full (ENOSPC), over quota
    (EDQUOT), failing (EIO) or read-only (EROFS). Such a failure fails the run being written,
    never the executor."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


@dataclass
class Run:
    """A run record and where it lives."""

    agent: str
    bucket: str
    name: str
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def state(self) -> str:
        return self.record.get("state") or ("queued" if self.bucket == "queue" else self.bucket)

    @property
    def path(self) -> str:
        return f"{AGENTS_DIR}/{self.agent}/{self.bucket}/{self.name}"


class CorruptRecord(Exception):
    """A run file that is not a readable record; it is set aside, never retried."""


class Listings:
    """Directory listings kept between one look and the next, for a process that lists the
    same directories over and over: the executor lists every agent's `queue/` and `active/` on
    each rescan, and a thousand agents made an idle executor's rescan cost tens of
    milliseconds. A directory is listed again when its identity, modification or change time
    is not what it was at its last listing, and also:

    - when that listing came less than RACY_NS after the directory's last change: a change in
      the same tick of the file system's clock as an earlier one leaves the time as it was, so
      only a listing made well after a change may stand for the directory;
    - when the wall clock has stepped since (the file system's times come from it: set back, a
      later change could carry the times of an earlier one);
    - at least every KEEP_NS whatever the times say (a file system whose clock is not this
      machine's, a server's), so a change the times hide only waits that long. It spans three
      of the executor's rescans (every 5 minutes): a shorter one would have every rescan list
      every directory again.

    Only the directories a rescan looks at belong here (each agent's `queue/` and `active/`,
    and the agents' directory); a kept listing not used for KEEP_NS is dropped."""

    RACY_NS = 5 * 10**9
    KEEP_NS = 900 * 10**9
    CLOCK_STEP_NS = 10**9

    def __init__(self, device: Device):
        self.device = device
        # device path -> (host path, (dev, inode, mtime, ctime) at the listing, the names,
        #                 the wall clock less the monotonic one then, the monotonic time then)
        self._kept: dict[str, tuple[str, tuple[int, int, int, int], list[str], int, int]] = {}
        self._swept = time.monotonic_ns()

    def listdir(self, device_path: str) -> list[str]:
        """Device.listdir, from the last listing when the directory cannot have changed."""
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        if now - self._swept > self.KEEP_NS:
            self._kept = {path: kept for path, kept in self._kept.items()
                          if now - kept[4] <= self.KEEP_NS}
            self._swept = now
        kept = self._kept.pop(device_path, None)
        if kept is not None:
            host, signature, names, kept_offset, kept_at = kept
            try:
                st = os.lstat(host)
            except OSError:
                st = None
            if (st is not None and now - kept_at <= self.KEEP_NS
                    and abs(offset - kept_offset) < self.CLOCK_STEP_NS
                    and (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == signature):
                self._kept[device_path] = kept
                return list(names)
        # As Device.listdir, from one lstat that also gives the times: links are refused.
        host, st = self.device.locate(device_path)
        listed_at = time.time_ns()
        try:
            names = sorted(os.listdir(host))
        except (FileNotFoundError, NotADirectoryError):
            return []
        if st is not None and stat.S_ISDIR(st.st_mode) and \
                max(st.st_mtime_ns, st.st_ctime_ns) < listed_at - self.RACY_NS:
            signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            self._kept[device_path] = (host, signature, names, offset, now)
        return list(names)


class RunStore:
    """Every agent's runs on one device. With `listings`, directories are listed through it
    (a long-lived process's rescans); without, afresh each time."""

    def __init__(self, device: Device, listings: Listings | None = None):
        self.device = device
        self._kept_listdir = listings.listdir if listings is not None else device.listdir
        self._lock_fd = -1
        self._lock_depth = 0
        self.refused: dict[str, str] = {}
        """Device path -> why it was passed over: an agent's directory or a bucket that is a
        link or not a directory. The other agents are served; the executor says so once."""

    def agents(self) -> list[str]:
        """The agents' directories: real ones only (a link or a file there is passed over)."""
        agents = []
        for name in self._listdir(AGENTS_DIR):
            if name.startswith("."):
                continue
            path = f"{AGENTS_DIR}/{name}"
            try:
                st = self.device.stat(path)
            except UnsafePathError as exc:
                self.refused[path] = str(exc)
                continue
            if st is not None and stat.S_ISDIR(st.st_mode):
                agents.append(name)
            elif st is not None:
                self.refused[path] = f"{path} is not a directory"
        return agents

    def names(self, agent: str, bucket: str) -> list[str]:
        """The run files in one of the agent's buckets. `completed/` and `failed/` are listed
        afresh: only the rescan's directories are kept (Listings)."""
        path = f"{AGENTS_DIR}/{agent}/{bucket}"
        kept = bucket in ("queue", "active")
        return [name for name in self._listdir(path, kept)
                if name.endswith(".json") and not name.startswith(".")]

    def _listdir(self, path: str, kept: bool = True) -> list[str]:
        """The names in `path`, from a kept listing (Listings) or afresh; none, and the path in
        `refused`, when it is a link or lies below one."""
        try:
            return (self._kept_listdir if kept else self.device.listdir)(path)
        except UnsafePathError as exc:
            self.refused[path] = str(exc)
            return []

    def load(self, agent: str, bucket: str, name: str) -> Run:
        try:
            raw = self.device.read_text(f"{AGENTS_DIR}/{agent}/{bucket}/{name}")
        except UnsafePathError as exc:  # a link or a directory by a run file's name
            raise CorruptRecord(f"{name}: not a run record: {exc}") from None
        if raw is None:
            raise FileNotFoundError(name)
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise CorruptRecord(f"{name}: not valid JSON ({exc})") from None
        except RecursionError:
            raise CorruptRecord(f"{name}: nested too deeply to be a run record") from None
        problem = _shape_problem(record)
        if problem:
            raise CorruptRecord(f"{name}: not a run record: {problem}")
        return Run(agent, bucket, name, record)

    def runs(self, agent: str | None = None, buckets=BUCKETS) -> Iterator[Run]:
        """Every readable run, bucket by bucket, in queue order within a bucket."""
        for name_of_agent in [agent] if agent else self.agents():
            for bucket in buckets:
                for name in self.names(name_of_agent, bucket):
                    try:
                        yield self.load(name_of_agent, bucket, name)
                    except (FileNotFoundError, CorruptRecord):
                        continue

    def find(self, run_id: str, agent: str | None = None, buckets=BUCKETS) -> Run | None:
        """The run wherever it is, or only among `agent`'s runs in `buckets`."""
        suffix = f"-{run_id}.json"
        # A run that moves while we look (claimed, finished, or queued again for a retry,
        # which is a move back to an earlier bucket) is looked for again.
        for _ in range(3):
            for name_of_agent in [agent] if agent else self.agents():
                for bucket in buckets:
                    for name in self.names(name_of_agent, bucket):
                        if name.endswith(suffix):
                            try:
                                return self.load(name_of_agent, bucket, name)
                            except FileNotFoundError:
                                continue
                            except CorruptRecord:
                                return None
        return None

    def save(self, run: Run) -> None:
        """Rewrite the record in place, atomically."""
        self.stage(run).commit()

    def stage(self, run: Run) -> StagedWrite:
        """The record's new content written beside it: `commit()` makes it the record,
        durably (what `save` does at once); until then the file keeps its old content."""
        data = (json.dumps(run.record, indent=2, sort_keys=True) + "\n").encode()
        return self.device.write_staged(run.path, data, mode=0o644)

    def claim(self, run: Run) -> bool:
        """Move a queued run to active; False when another executor was faster. Executors
        hold `locked()` around the claim and the write of their ownership."""
        return self.move(run, "active")

    @contextmanager
    def locked(self):
        """The claim lock (flock on `agents/.claims.lock`). A claim and the recording of its
        owner happen under it, and so does recovery: a run claimed a moment ago is never
        mistaken for one whose executor died. So do a cancel request and the recording of a
        run's end: a request is either seen by the run's owner or finds the run ended.
        Taken again while this store holds it (`lock()`, an enclosing `locked()`), it is
        held until the outermost release."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def lock(self) -> None:
        """Take the claim lock, or count one more hold of it; `unlock()` gives one back."""
        if self._lock_depth == 0:
            path = self.device.host(f"{AGENTS_DIR}/.claims.lock")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:  # a read-only file system still locks
                if exc.errno != errno.EROFS:
                    raise
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._lock_depth += 1

    def unlock(self) -> None:
        if self._lock_depth <= 0:
            raise RuntimeError("the claim lock was given back more often than it was taken")
        self._lock_depth -= 1
        if self._lock_depth == 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    def finish(self, run: Run, state: str) -> None:
        """Record the final state and move the run to its terminal bucket (its reserve is
        given back first, to make room for exactly this write)."""
        run.record["state"] = state
        self.release(run)
        self._relocate(run, TERMINAL_BUCKET[state])

    def requeue(self, run: Run) -> None:
        """Put an active run back in the queue (a retry, or a run whose executor died): the
        record is rewritten in active/, then renamed, so no executor can claim a queued copy
        while the active one still exists."""
        run.record["state"] = "queued"
        self.release(run)
        self.save(run)
        self.move(run, "queue")

    def reserve(self, run: Run) -> None:
        """Set RESERVE_BYTES aside for the run's end, in a file next to its active record.
        Raises a storage failure when there is no room; a file system that cannot preallocate
        leaves the run without a reserve."""
        host = self.device.host(self.sidecar(run, "reserve"))
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            os.close(fd)
            os.unlink(host)
            if storage_failure(exc):
                raise
            return
        os.close(fd)

    def release(self, run: Run) -> bool:
        """Give the run's reserve back; False when it had none (or it cannot be removed now)."""
        try:
            os.unlink(self.device.host(self.sidecar(run, "reserve")))
        except FileNotFoundError:
            return False
        except OSError as exc:
            if storage_failure(exc):
                return False
            raise
        return True

    def sidecar(self, run: Run, kind: str) -> str:
        """The device path of a file kept next to the run's active record (SIDECARS)."""
        return f"{AGENTS_DIR}/{run.agent}/active/{run.name}.{kind}"

    def strays(self, agent: str) -> list[tuple[str, str]]:
        """(bucket, name) of the agent's sidecar files whose record is no longer in active/
        (the run ended or went back to the queue while a request was being written, or its
        process died between two writes), and of records being written by a process that died
        meanwhile: in active/ an executor killed while its claim was being made durable, in
        queue/ an enqueuer (`spos action run`, a trigger) killed before its record was in place."""
        names = self._listdir(f"{AGENTS_DIR}/{agent}/active")
        records = {name for name in names if name.endswith(".json")}
        strays = []
        for name in names:
            record, _, kind = name.rpartition(".")
            if kind in SIDECARS and not name.startswith(".") and record not in records:
                strays.append(("active", name))
            elif name.startswith(".") and _writer_gone(name):
                strays.append(("active", name))
        strays += [("queue", name) for name in self._listdir(f"{AGENTS_DIR}/{agent}/queue")
                   if name.startswith(".") and _writer_gone(name)]
        return strays

    def remove_strays(self, agent: str) -> None:
        """Remove the agent's stray files. Call it under `locked()`, which claims, cancel
        requests and the recording of a run's end hold too."""
        for bucket, name in self.strays(agent):
            try:
                os.unlink(self.device.host(f"{AGENTS_DIR}/{agent}/{bucket}/{name}"))
            except FileNotFoundError:
                continue
            except OSError as exc:
                if not storage_failure(exc):
                    raise

    def unreadable(self, run_id: str) -> tuple[str, str, str] | None:
        """(agent, device path, reason) of a record whose name carries `run_id` and that cannot
        be read as a run (hand-damaged; the executor sets aside only those it would run), or
        None."""
        suffix = f"-{run_id}.json"
        for agent in self.agents():
            for bucket in BUCKETS:
                for name in self.names(agent, bucket):
                    if name.endswith(suffix):
                        try:
                            self.load(agent, bucket, name)
                        except CorruptRecord as exc:
                            return agent, f"{AGENTS_DIR}/{agent}/{bucket}/{name}", str(exc)
                        except FileNotFoundError:
                            continue
        return None

    def found_aside(self, run_id: str) -> tuple[str, str, str] | None:
        """(agent, device path, reason) of a run file set aside as corrupt (`set_aside`) whose
        name carries `run_id`, or None."""
        suffix = f"-{run_id}.json.corrupt"
        for agent in self.agents():
            directory = f"{AGENTS_DIR}/{agent}/failed"
            for name in self._listdir(directory, kept=False):
                if name.endswith(suffix):
                    try:
                        reason = (self.device.read_text(f"{directory}/{name}.reason") or "").strip()
                    except (OSError, SposError):
                        reason = ""
                    return agent, f"{directory}/{name}", reason or "its reason was not kept"
        return None

    def set_aside(self, agent: str, bucket: str, name: str, reason: str) -> None:
        """Move an unreadable file out of the way, into failed/, renamed so it is never retried."""
        # The entry itself may be a link: it is moved as it is, never followed.
        source = f"{self.device.host(f'{AGENTS_DIR}/{agent}/{bucket}')}/{name}"
        target = self.device.path(f"{AGENTS_DIR}/{agent}/failed/{name}.corrupt")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        note = self.device.path(f"{AGENTS_DIR}/{agent}/failed/{name}.corrupt.reason")
        try:
            note.write_text(reason + "\n")
        except OSError as exc:  # the file is out of the way; its reason is also in the log
            if not storage_failure(exc):
                raise

    def _relocate(self, run: Run, bucket: str) -> None:
        """Write the updated record into `bucket` (durably: fsync of the file and of the
        directory), then drop the old copy. The removal is not fsynced: a crash, even a power
        loss, before it reaches the disk leaves two copies, and the executor's recovery keeps
        the one in the later bucket, as for a crash between the two steps."""
        target = Run(run.agent, bucket, run.name, run.record)
        try:
            self.save(target)
        except FileNotFoundError:  # the bucket is made when first needed
            self.device.makedirs(self._bucket(run.agent, bucket), mode=0o750)
            self.save(target)
        if bucket != run.bucket:
            try:
                os.unlink(self.device.host(run.path))
            except FileNotFoundError:
                pass
        run.bucket = bucket

    def move(self, run: Run, bucket: str) -> bool:
        """Rename the run's file into `bucket`; False when it was no longer where `run` says."""
        source = self.device.host(run.path)
        target = self.device.host(f"{self._bucket(run.agent, bucket)}/{run.name}")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            if self.device.is_dir(self._bucket(run.agent, bucket)):
                return False
            self.device.makedirs(self._bucket(run.agent, bucket), mode=0o750)
            try:
                os.rename(source, target)
            except FileNotFoundError:
                return False
        run.bucket = bucket
        return True

    @staticmethod
    def _bucket(agent: str, bucket: str) -> str:
        return f"{AGENTS_DIR}/{agent}/{bucket}"


def _shape_problem(record) -> str | None:
    """What keeps a parsed run file from being used as a run record (docs/queue.md), or None.
    Only what the executor relies on is checked: fields that name paths or times, or that it
    counts with."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("id"), str) or not RUN_ID.fullmatch(record["id"]):
        return "`id` must be a run id (letters, digits, `_` and `-`)"
    if not isinstance(record.get("task"), str):
        return "`task` must be a task name"
    attempt = record.get("attempt", 1)
    if type(attempt) is not int or attempt < 1:
        return "`attempt` must be a whole number from 1"
    for key in ("notBefore", "notAfter"):
        value = record.get(key)
        if value is None:
            continue
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return f"`{key}` must be an ISO 8601 time or null"
    for key, kind, what in (("attempts", list, "a list"), ("stepsDone", list, "a list"),
                            ("executor", dict, "an object"), ("source", dict, "an object")):
        if record.get(key) is not None and not isinstance(record[key], kind):
            return f"`{key}` must be {what}"
    if not all(isinstance(item, dict) for item in record.get("attempts") or ()):
        return "`attempts` must be a list of objects"
    if not all(isinstance(item, str) for item in record.get("stepsDone") or ()):
        return "`stepsDone` must be a list of step names"
    if record.get("concurrency") is not None and record["concurrency"] not in CONCURRENCY:
        return f"`concurrency` must be one of {', '.join(CONCURRENCY)}"
    return attachments_problem(record.get("attachments"))
