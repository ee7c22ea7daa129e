"""Retention: finished runs are removed once their agent's Quota has kept them long enough.

The compiled agent config holds `quota.retentionSeconds` (docs/agent-config.md): how long the
record and logs of a `completed` run are kept, how long those of a run that ended otherwise
(failed, timeout, cancelled, skipped, expired) are kept, and how long a temporary directory
left behind by a run is kept. A pass looks at each applied agent and removes, per finished run
past its time, its log (and rotated log), its checkpoint directory, its temporary directory,
and last its record, so a pass cut short leaves a record that the next pass finds again.

A run's age counts from `endedAt` in its record; a record without one (or an unreadable one)
counts from its file's modification time. A temporary directory with no record left counts
from its own modification time.

The copies of the configs runs ran under (`configs/`, see provenance.py) go once no run record
left names them, never the current config's, and never one written in the last COPY_GRACE
seconds (a run starting under it may not have recorded it yet). Records are read for this only
when the agent has a copy other than its current config's, oldest first, and only until every
such copy is found named: most passes read none.

What a pass never does:
- touch `queue/` or `active/`, or anything of a run that is queued or active (a retry waiting
  in the queue keeps its checkpoint and temporary directory);
- touch `output/` (the operator's), or an agent that is not applied (no `agent.json`: its
  history is kept for the operator, see docs/agent-config.md);
- follow a symlink. Directories are opened with O_NOFOLLOW and walked by file descriptor, so a
  link planted anywhere in an agent's directory is removed as a link or refused, and nothing
  outside the agent's directory is ever reached; nor does it descend into another file system.

Files that vanish while a pass runs (another pass, the executor, an operator) are skipped. A
broken agent directory, or an agent.json that is not JSON or whose `quota` is of the wrong
shape, is reported and the pass goes on with the next agent.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from reconciler import AGENT_CONFIG, AGENTS_DIR, STATE_DIR
from reconciler.device import Device
from reconciler.errors import SposError, UsageError
from reconciler.executor.config import quota_problem
from reconciler.executor.enqueue import wake
from reconciler.executor.provenance import CONFIGS_DIR, copy_name, digest

DEFAULT_RETENTION = {"temp": 24 * 3600, "completed": 7 * 86400, "failed": 30 * 86400}
"""Seconds, as `spos apply` compiles them for an agent whose Quota says nothing (or no Quota)."""

STATUS_FILE = f"/{STATE_DIR}/cleanup.json"
"""Where the executor writes the outcome of its last pass."""

MAX_DEPTH = 256
"""A directory tree deeper than this is not removed (and is reported): walking it would hold
one file descriptor per level."""

COPY_GRACE = 60.0
"""Seconds a config copy is kept after it was written, whether or not a record names it yet."""

TMP_GRACE = 60.0
"""Seconds a temporary directory with no run record is kept after it was last changed, whatever
the `temp` retention: an enqueue writes a trigger's large attachments into it before the queue
file (docs/queue.md), so until then it has no record."""

_RUN_DIRECTORIES = ("queue", "active", "completed", "failed", "checkpoints", "logs", "tmp")
_RECORD_BUCKETS = ("queue", "active", "completed", "failed")
_CONFIG_COPY = re.compile(r"^sha256-[0-9a-f]{64}\.json$")
_RUN_FILE = re.compile(r"^\d{3}-\d{20}-(?P<id>[0-9A-Za-z_-]+)\.json(?P<corrupt>\.corrupt)?$")
_LOG_FILE = re.compile(r"^(?P<id>[0-9A-Za-z_-]+)\.log(?:\.\d+)?$")
_RUN_ID = re.compile(r"^[0-9A-Za-z_-]+$")


class RetentionError(SposError):
    """Something in an agent's directory that a pass refuses to remove; the message says why."""


@dataclass
class Removal:
    """One finished run (`what` = "run"), one leftover temporary directory ("tmp") or one
    config copy no run names any more ("config", with no run id) that a pass removed, or in a
    dry run would remove."""

    agent: str
    run_id: str
    what: str
    state: str
    since: float
    age_seconds: float
    paths: list[str]

    def to_json(self) -> dict:
        return {
            "agent": self.agent,
            "runId": self.run_id or None,
            "what": self.what,
            "state": self.state,
            "since": datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds"),
            "ageSeconds": round(self.age_seconds, 3),
            "paths": self.paths,
        }


@dataclass
class CleanupReport:
    """What one pass did. `complete` is False when it stopped at its limit with more to do."""

    dry_run: bool = False
    removed: list[Removal] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kept_agents: list[str] = field(default_factory=list)
    complete: bool = True
    seconds: float = 0.0

    def count(self, what: str) -> int:
        return sum(1 for removal in self.removed if removal.what == what)

    def to_json(self) -> dict:
        return {
            "dryRun": self.dry_run,
            "complete": self.complete,
            "durationSeconds": round(self.seconds, 3),
            "removed": [removal.to_json() for removal in self.removed],
            "errors": self.errors,
            "keptAgents": self.kept_agents,
        }


def clean(device: Device, *, agent: str | None = None, now: float | None = None,
          dry_run: bool = False, time_budget: float | None = None) -> CleanupReport:
    """One retention pass over every agent's runs (or only `agent`'s). With `dry_run`, nothing
    is removed and the report says what would be. With `time_budget` (seconds), the pass stops
    removing once it has spent that time (after at least one removal, so every pass makes
    progress) and reports itself incomplete; runs go oldest first within an agent. Listing an
    agent's runs does not count against the budget (_Budget)."""
    if agent is not None and ("/" in agent or agent.startswith(".") or not agent):
        raise UsageError(f"{agent!r} is not an agent name")
    report = CleanupReport(dry_run=dry_run)
    started = time.monotonic()
    budget = _Budget(time_budget)
    now = time.time() if now is None else now
    agents_dir = device.host(AGENTS_DIR)
    try:
        agents_fd = _open_directory(None, agents_dir)
    except FileNotFoundError:
        if agent is not None:
            report.errors.append(f"{agent}: no such agent on this device")
        return report
    mounts = _mount_points_below(agents_dir)
    try:
        names = [agent] if agent else sorted(n for n in os.listdir(agents_fd) if not n.startswith("."))
        for name in names:
            if budget.over(report):
                break
            try:
                inside = f"{agents_dir}/{name}/"
                _AgentPass(agents_fd, name, now, dry_run, report, budget,
                           [m[len(inside):] for m in mounts if m.startswith(inside)]).run()
            except FileNotFoundError:
                if agent is not None:
                    report.errors.append(f"{name}: no such agent on this device")
            except (OSError, SposError) as exc:
                report.errors.append(f"{name}: {_describe(exc)}")
    finally:
        os.close(agents_fd)
        report.seconds = time.monotonic() - started
    return report


class PeriodicCleanup:
    """The executor's retention passes: the first when it starts, then one every `interval`
    seconds (0 turns them off). A pass stops once it has spent `budget` seconds removing (its
    listings not counted, see _Budget); when more is due,
    it nudges the executor's wake pipe, so the next slice follows the next round of dispatching:
    a large backlog is worked off in slices and never holds up dispatch for long. Each pass's
    outcome is written to STATUS_FILE; a pass never raises."""

    def __init__(self, device: Device, interval: float, budget: float = 0.25):
        self.device = device
        self.interval = interval
        self.budget = budget
        self.next_due = time.monotonic()

    def run_if_due(self) -> CleanupReport | None:
        if self.interval <= 0 or time.monotonic() < self.next_due:
            return None
        try:
            report = clean(self.device, time_budget=self.budget)
        except (OSError, SposError) as exc:
            report = CleanupReport(errors=[_describe(exc)])
        if report.complete:
            self.next_due = time.monotonic() + self.interval
        else:
            wake(self.device)
        self._record(report)
        return report

    def _record(self, report: CleanupReport) -> None:
        status = {
            "format": 1,
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "complete": report.complete,
            "durationSeconds": round(report.seconds, 3),
            "removed": {"runs": report.count("run"), "tmp": report.count("tmp")},
            "errors": report.errors,
        }
        try:
            self.device.write_atomic(STATUS_FILE, (json.dumps(status, indent=2) + "\n").encode())
        except (OSError, SposError):
            pass  # the status is a courtesy; the next pass writes it again


def text(report: CleanupReport) -> str:
    """The human form of a report (`spos action cleanup`). Pure."""
    verb = "would remove" if report.dry_run else "removed"
    lines = []
    for removal in report.removed:
        if removal.what == "run":
            parts = ", ".join(_part(path) for path in removal.paths)
            lines.append(f"{verb} {removal.agent} run {removal.run_id} ({removal.state}, ended "
                         f"{_age(removal.age_seconds)} ago): {parts}")
        elif removal.what == "tmp":
            lines.append(f"{verb} {removal.agent} tmp/{removal.run_id} ({removal.state}, "
                         f"{_age(removal.age_seconds)} old)")
        else:
            copy = "/".join(removal.paths[0].rsplit("/", 2)[-2:])
            lines.append(f"{verb} {removal.agent} {copy} ({removal.state}, "
                         f"{_age(removal.age_seconds)} old)")
    for agent in report.kept_agents:
        lines.append(f"kept {agent}: not applied on this device (no {AGENT_CONFIG}); its runs stay "
                     "for the operator")
    runs, tmp, configs = report.count("run"), report.count("tmp"), report.count("config")
    if not runs and not tmp and not configs:
        if not report.errors:  # an error says what went wrong; "nothing to do" would contradict it
            lines.append("Nothing to clean up.")
    else:
        parts = [f"{runs} finished run{'s' if runs != 1 else ''}",
                 f"{tmp} leftover temporary director{'ies' if tmp != 1 else 'y'}"]
        if configs:
            parts.append(f"{configs} unused config cop{'ies' if configs != 1 else 'y'}")
        total = ", ".join(parts[:-1]) + " and " + parts[-1]
        lines.append(f"Would remove {total} (dry run: nothing was removed)." if report.dry_run
                     else f"Removed {total}.")
    if not report.complete:
        lines.append("More is due than one pass removes; run it again.")
    return "".join(f"{line}\n" for line in lines)


# -- one agent --------------------------------------------------------------------------------


@dataclass
class _Finished:
    """A record in completed/ or failed/ (or a record set aside as corrupt)."""

    bucket: str
    name: str
    run_id: str
    state: str
    kind: str          # which retention applies: "completed" or "failed" (its bucket)
    since: float       # when it ended


class _AgentPass:
    """One agent's run directories, opened without following links, for one pass."""

    def __init__(self, agents_fd: int, agent: str, now: float, dry_run: bool,
                 report: CleanupReport, budget: "_Budget", mounts: list[str]):
        self.agent, self.now, self.dry_run, self.report = agent, now, dry_run, report
        self.budget = budget
        self.mounts = mounts  # mount points inside this agent's directory, relative to it
        self.fd = _open_directory(agents_fd, agent)
        self.dirs: dict[str, int | None] = {}

    def run(self) -> None:
        try:
            for name in (*_RUN_DIRECTORIES, CONFIGS_DIR):
                self.dirs[name] = _open_directory(self.fd, name, missing_ok=True)
            applied = self._applied_config()
            if applied is None:
                self.report.kept_agents.append(self.agent)
                return
            config, current = applied
            problem = quota_problem(config.get("quota"))
            if problem:
                raise RetentionError(f"{AGENT_CONFIG}: {problem}; the agent is left alone until "
                                     "spos apply repairs it")
            gone = self._clean(_retention(config))
            if self.report.complete:
                self._clean_configs(current, gone)
        finally:
            for fd in self.dirs.values():
                if fd is not None:
                    os.close(fd)
            os.close(self.fd)

    def _clean(self, retention: dict) -> set[str]:
        """Remove the agent's finished runs past their retention, then the temporary
        directories left behind; the ids of the runs removed (or in a dry run, to be)."""
        listing = time.monotonic()
        protected = self._queued_or_active()
        finished = sorted(self._finished(), key=lambda run: run.since)
        files = self._files_of_runs()
        protected |= self._queued_or_active()  # a run that moved between buckets while we listed
        self.budget.uncounted(listing)
        ended = {run.run_id: run.since for run in finished}
        gone = set()
        for run in finished:
            if run.run_id in protected or self.now - run.since < retention[run.kind]:
                continue
            if self.budget.over(self.report):
                return gone
            try:
                if self._clean_run(run, files.get(run.run_id, []), retention):
                    gone.add(run.run_id)
                ended[run.run_id] = run.since
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            except (OSError, SposError) as exc:
                self.report.errors.append(f"{self.agent}: run {run.run_id}: {_describe(exc)}")
        leftovers = {run_id for run_id, paths in files.items() if f"tmp/{run_id}" in paths}
        for run_id in sorted(leftovers - gone - protected):
            self._clean_temporary(run_id, ended.get(run_id), retention["temp"])
        return gone

    def _clean_configs(self, current: str, gone: set[str]) -> None:
        """Remove the config copies no run record left names (records of the runs in `gone`
        do not count: they are removed, or in a dry run would be), except the current
        config's and those younger than COPY_GRACE."""
        unnamed = self._config_copies() - {copy_name(current)}
        if not unnamed:
            return
        try:
            for named in self._digests_named(gone):
                unnamed.discard(copy_name(named))
                if not unnamed:
                    return
            applied = self._applied_config()  # the last look: an apply may have changed it back
        except (OSError, SposError) as exc:
            self.report.errors.append(f"{self.agent}: {CONFIGS_DIR}/: {_describe(exc)}; "
                                      "no config copy removed")
            return
        if applied is None:
            return  # no longer applied: its history, copies included, is kept
        unnamed.discard(copy_name(applied[1]))
        for name in sorted(unnamed):
            if self.budget.over(self.report):
                return
            self._remove_copy(name)

    def _config_copies(self) -> set[str]:
        return {name for name in self._names(CONFIGS_DIR) if _CONFIG_COPY.match(name)}

    def _remove_copy(self, name: str) -> None:
        try:
            written = _lstat(self.dirs[CONFIGS_DIR], name).st_mtime
            if self.now - written < COPY_GRACE:
                return
            if self.dry_run or _unlink(self.dirs[CONFIGS_DIR], name):
                self._add("config", "", "no run names it", written, [f"{CONFIGS_DIR}/{name}"])
        except FileNotFoundError:
            return
        except (OSError, SposError) as exc:
            self.report.errors.append(f"{self.agent}: {CONFIGS_DIR}/{name}: {_describe(exc)}")

    def _digests_named(self, gone: set[str]):
        """The config digests the agent's run records name (their attempts' and the one they
        are at), record by record, oldest record first. A record that moves to another bucket
        meanwhile is read where it went; an unreadable one names nothing, but one the file
        system fails to read raises, so that no copy is removed on a partial view."""
        for bucket, name in self._records_by_age(gone):
            record = self._read_record(bucket, name)
            if not isinstance(record, dict):
                continue
            attempts = record.get("attempts") if isinstance(record.get("attempts"), list) else []
            for entry in [record, *attempts]:
                if isinstance(entry, dict) and isinstance(entry.get("configDigest"), str):
                    yield entry["configDigest"]

    def _records_by_age(self, gone: set[str]) -> list[tuple[str, str]]:
        found = []
        for bucket in _RECORD_BUCKETS:
            if self.dirs[bucket] is None:
                continue
            with os.scandir(self.dirs[bucket]) as entries:
                for entry in entries:
                    match = _RUN_FILE.match(entry.name)
                    if not match or match["corrupt"] or match["id"] in gone:
                        continue
                    try:
                        found.append((entry.stat(follow_symlinks=False).st_mtime, bucket, entry.name))
                    except FileNotFoundError:
                        continue
        return [(bucket, name) for _, bucket, name in sorted(found)]

    def _read_record(self, bucket: str, name: str):
        """The parsed record, looked for in `bucket` and then in the others (a run keeps its
        file name in every bucket); None when it is gone or not JSON."""
        for where in (bucket, *(b for b in _RECORD_BUCKETS if b != bucket)):
            if self.dirs[where] is None:
                continue
            try:
                return json.loads(_record_bytes(self.dirs[where], name))
            except FileNotFoundError:
                continue
            except (RetentionError, ValueError, RecursionError):
                return None  # a link, or not a record (nested too deeply to parse, too)
        return None

    def _clean_run(self, run: _Finished, paths: list[str], retention: dict) -> bool:
        """Remove a finished run whose file is past its retention, once its record confirms
        the end time. A record is written as its run ends, so its file is never older than its
        `endedAt`: records younger than their retention are never read, which spares most of
        them on most passes, and the rest are read one at a time, oldest first, so a pass with
        a time budget reads little more than it removes."""
        if run.state != "corrupt":
            self._read_end(run)
            if self.now - run.since < retention[run.kind]:
                return False
        if self._remove_run(run, paths):
            self._add("run", run.run_id, run.state, run.since, [f"{run.bucket}/{run.name}", *paths])
            return True
        return False

    def _clean_temporary(self, run_id: str, ended: float | None, keep: float) -> None:
        """A temporary directory left behind: of a finished run whose end is `keep` ago, or of
        a run with no record left whose directory was last changed `keep` ago (and at least
        TMP_GRACE ago)."""
        try:
            since = ended if ended is not None else _lstat(self.dirs["tmp"], run_id).st_mtime
            if self.now - since < (keep if ended is not None else max(keep, TMP_GRACE)):
                return
            if ended is None and run_id in self._queued_or_active():  # the last look before removing
                return
            if self.budget.over(self.report):
                return
            state = "finished" if ended is not None else "no run record"
            self._refuse_mounts(f"tmp/{run_id}")
            if self.dry_run or remove_tree(self.dirs["tmp"], run_id):
                self._add("tmp", run_id, state, since, [f"tmp/{run_id}"])
        except FileNotFoundError:
            return
        except (OSError, SposError) as exc:
            self.report.errors.append(f"{self.agent}: tmp/{run_id}: {_describe(exc)}")

    def _remove_run(self, run: _Finished, paths: list[str]) -> bool:
        """Remove a run's files, its record last; False when another process removed the
        record first (the run is then reported by that process)."""
        for path in paths:
            self._refuse_mounts(path)
        if self.dry_run:
            return True
        for path in paths:
            where, name = path.split("/", 1)
            if where == "logs":
                _unlink(self.dirs["logs"], name)
            else:
                remove_tree(self.dirs[where], name)
        bucket_fd = self.dirs[run.bucket]
        if run.name.endswith(".corrupt"):
            _unlink(bucket_fd, run.name + ".reason")
        return _unlink(bucket_fd, run.name)

    def _refuse_mounts(self, path: str) -> None:
        """A bind mount of the same file system would look like any directory to the walk."""
        for mount in self.mounts:
            if mount == path or mount.startswith(path + "/"):
                raise RetentionError(f"{mount} is a mount point; {path} is left in place")

    def _add(self, what: str, run_id: str, state: str, since: float, paths: list[str]) -> None:
        base = f"{AGENTS_DIR}/{self.agent}"
        self.report.removed.append(Removal(
            self.agent, run_id, what, state, since, self.now - since, [f"{base}/{p}" for p in paths]))

    # -- reading ------------------------------------------------------------------------------

    def _applied_config(self) -> tuple[dict, str] | None:
        """The agent's config (agent.json) and the digest of its bytes; None when the agent is
        not applied."""
        try:
            fd = os.open(AGENT_CONFIG, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RetentionError(f"{AGENT_CONFIG} is a symlink; the agent is left alone") from None
            raise
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise RetentionError(f"{AGENT_CONFIG} is not a regular file; the agent is left alone")
            raw = handle.read()
            try:
                config = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
                raise RetentionError(f"{AGENT_CONFIG} is not valid JSON; the agent is left alone "
                                     "until spos apply repairs it") from None
        return (config if isinstance(config, dict) else {}), digest(raw)

    def _names(self, directory: str) -> list[str]:
        fd = self.dirs.get(directory)
        if fd is None:
            return []
        return [name for name in os.listdir(fd) if not name.startswith(".")]

    def _files_of_runs(self) -> dict[str, list[str]]:
        """Run id -> its logs, checkpoint directory and temporary directory, as found."""
        files: dict[str, list[str]] = {}
        for name in sorted(self._names("logs")):
            match = _LOG_FILE.match(name)
            if match:
                files.setdefault(match["id"], []).append(f"logs/{name}")
        for directory in ("checkpoints", "tmp"):
            for name in self._names(directory):
                if _RUN_ID.match(name):
                    files.setdefault(name, []).append(f"{directory}/{name}")
        return files

    def _queued_or_active(self) -> set[str]:
        ids = set()
        for bucket in ("queue", "active"):
            for name in self._names(bucket):
                match = _RUN_FILE.match(name)
                if match:
                    ids.add(match["id"])
        return ids

    def _finished(self) -> list[_Finished]:
        """Every record in completed/ and failed/, dated by its file's modification time until
        `_read_end` reads it."""
        finished = []
        for bucket in ("completed", "failed"):
            if self.dirs[bucket] is None:
                continue
            with os.scandir(self.dirs[bucket]) as entries:
                for entry in entries:
                    match = _RUN_FILE.match(entry.name)
                    if not match:
                        continue
                    try:
                        status = entry.stat(follow_symlinks=False)
                        if not stat.S_ISREG(status.st_mode):
                            raise RetentionError("not a regular file (a symlink?); left alone")
                        finished.append(_Finished(bucket, entry.name, match["id"],
                                                  "corrupt" if match["corrupt"] else bucket,
                                                  bucket, status.st_mtime))
                    except FileNotFoundError:
                        continue
                    except (OSError, SposError) as exc:
                        self.report.errors.append(f"{self.agent}: {bucket}/{entry.name}: {_describe(exc)}")
        return finished

    def _read_end(self, run: _Finished) -> None:
        """Take the run's state and end time from its record; an unreadable record keeps the
        file's modification time."""
        try:
            record = json.loads(_record_bytes(self.dirs[run.bucket], run.name))
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            return
        if not isinstance(record, dict):
            return
        if isinstance(record.get("state"), str):
            run.state = record["state"]
        ended = _epoch(record.get("endedAt"))
        if ended is not None:
            run.since = ended


def _retention(config: dict) -> dict:
    """Seconds to keep each kind, from the config's Quota, with the defaults for what it leaves
    out. Numbers are kept as they are: a whole number of seconds may be too large for a float
    (a duration of hundreds of digits), and Python compares it with one exactly."""
    quota = config.get("quota") or {}
    given = quota.get("retentionSeconds") or {}
    return {
        kind: given[kind] if isinstance(given.get(kind), (int, float)) and given[kind] >= 0
        else default
        for kind, default in DEFAULT_RETENTION.items()
    }


def _record_bytes(directory_fd: int, name: str) -> bytes:
    """A run record's bytes, read without following a link: RetentionError for a link or for
    anything but a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RetentionError("a symlink, not a run record; left alone") from None
        raise
    with os.fdopen(fd, "rb") as record_file:
        if not stat.S_ISREG(os.fstat(record_file.fileno()).st_mode):
            raise RetentionError("not a regular file; left alone")
        return record_file.read()


# -- removing without following links ----------------------------------------------------------


def _open_directory(parent_fd: int | None, name: str, missing_ok: bool = False) -> int | None:
    """Open a directory for walking, refusing a symlink (O_NOFOLLOW) or anything else that is
    not a directory. `parent_fd` None: `name` is a host path (already checked for links)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RetentionError(f"{name} is a symlink or not a directory; left alone") from None
        raise


def remove_tree(parent_fd: int, name: str) -> bool:
    """Delete `name`, in the directory open as `parent_fd`, and everything below it. A symlink
    is removed as a link and never followed; a directory on another file system (a mount) is
    refused. False when it was already gone."""
    try:
        top = _lstat(parent_fd, name)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(top.st_mode):
        return _unlink(parent_fd, name)
    stack: list[tuple[int, str, int]] = []  # (parent fd, name, own fd), outermost first
    try:
        fd = _open_directory(parent_fd, name, missing_ok=True)
        if fd is None:
            return False
        stack.append((parent_fd, name, fd))
        while stack:
            parent, current, fd = stack[-1]
            child = _empty_but_one_directory(fd, top.st_dev)
            if child is not None:
                if len(stack) >= MAX_DEPTH:
                    raise RetentionError(f"more than {MAX_DEPTH} directory levels; left in place")
                try:
                    child_fd = _open_directory(fd, child, missing_ok=True)
                except RetentionError:
                    continue  # replaced by a link or a file since the scan: the next scan removes it
                if child_fd is not None:
                    stack.append((fd, child, child_fd))
                continue
            stack.pop()
            os.close(fd)
            _rmdir(parent, current)
    finally:
        for _, _, fd in stack:
            os.close(fd)
    return True


def _empty_but_one_directory(fd: int, device: int) -> str | None:
    """Unlink everything in the directory open as `fd` except directories; return the name of
    one directory found (to descend into), or None when the directory is empty now."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(status.st_mode):
                if status.st_dev != device:
                    raise RetentionError(f"{entry.name} is on another file system (a mount); left in place")
                return entry.name
            _unlink(fd, entry.name)
    return None


def _mount_points_below(directory: str) -> list[str]:
    """Mount points at or below `directory` (host paths), from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            if point == directory or point.startswith(directory + "/"):
                points.append(point)
    return points


def _lstat(fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=fd, follow_symlinks=False)


def _unlink(fd: int | None, name: str) -> bool:
    if fd is None:
        return False
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return False
    return True


def _rmdir(fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RetentionError(f"{name} gained new entries while being removed; "
                                 "the next pass tries again") from None
        raise


# -- small helpers ----------------------------------------------------------------------------


class _Budget:
    """The time a pass with a time budget may spend removing. Listing an agent's run
    directories is not counted: every slice of a backlog lists them again, and with tens of
    thousands of runs the listing alone outlasts the executor's budget, so a slice that counted
    it removed one run and stopped, and the backlog took one slice (and one listing) a run."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def uncounted(self, since: float) -> None:
        """Leave the time from `since` (time.monotonic()) until now out of the budget."""
        if self.deadline is not None:
            self.deadline += time.monotonic() - since

    def over(self, report: CleanupReport) -> bool:
        """Whether the pass must stop; it removes at least one thing first."""
        if self.deadline is None or not report.removed or time.monotonic() < self.deadline:
            return False
        report.complete = False
        return True


def _epoch(text) -> float | None:
    """An ISO 8601 time as seconds since the epoch; None for anything else, and for a time
    whose zone takes it before year 1 or past year 9999 in UTC (a report could not show it)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc).timestamp()
    except (ValueError, OverflowError):
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def _part(path: str) -> str:
    """`.../logs/X.log.1` -> `log.1`; `.../checkpoints/X` -> `checkpoint`; a record -> `record`."""
    directory, name = path.rsplit("/", 2)[-2:]
    if directory == "logs":
        return "log" + name.split(".log", 1)[1]
    return {"checkpoints": "checkpoint", "tmp": "tmp"}.get(directory, "record")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"
