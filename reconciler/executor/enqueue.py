"""Enqueueing an action: what `spos action run` (and so every crontab line) does.

A queued action is one JSON file in `<state>/agents/<agent>/queue/`, written atomically; its
name sorts by priority (highest first), then by time. The format is the contract with the
executor (docs/queue.md). Once the record is in place, a message on the executor's wake pipe
naming the agent starts it at once.
This module imports only the device layer and the parts of the standard library that cost
nothing to import (not `json`, `re` or `datetime`: together they would double the start-up of
cron's call every minute).
"""

from __future__ import annotations

import os
import stat
import time

from reconciler import AGENTS_DIR, STATE_DIR, leanjson
from reconciler.device import Device, write_all
from reconciler.errors import SposError
from reconciler.executor.config import CONCURRENCY, ConfigError, agent_config, task_config

QUEUE_FORMAT = 1
WAKE_PIPE = f"/{STATE_DIR}/executor.wake"
WAKE_ANY = b"!"
"""A wake-up that names no agent: the executor looks at every agent's queue."""
WAKE_OVERFLOW = 32768
"""A drain of the wake pipe this long may have followed a full pipe, which refuses writes: the
executor then looks at every agent's queue, as for a wake-up that names none."""
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _NAME_START | {"-", "_"}
ATTACHMENTS_DIR = "spos-trigger"
"""Inside a run's tmp directory: the files a trigger hands the run (docs/triggers.md)."""
INLINE_ATTACHMENTS = 16 * 1024
"""Attachments up to this many bytes together travel in the queue record (base64) and the
executor writes them out when the run starts: one durable write per event instead of three
(docs/queue.md, "Attachments"). Small enough that twice such a record stays within the room
set aside for recording a run's end (runs.RESERVE_BYTES)."""
_ATTACHMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def enqueue(
    device: Device,
    agent: str,
    task: str,
    *,
    priority: int | None = None,
    source: dict | None = None,
    deadline_seconds: float | None = None,
    now: float | None = None,
    claim: bool = False,
    concurrency: str | None = None,
    attachments: dict[str, bytes] | None = None,
) -> dict:
    """Queue one run of `agent`/`task` and return the queued record (its `id` names the run).

    With `claim`, the record goes straight to `active/`, owned by the caller, who runs it now
    (`spos action execute`); no executor sees it in the queue. `concurrency` overrides the
    task's for this run. `attachments` (file name -> content) reach the run's tmp directory,
    under `spos-trigger/`, before it starts: up to INLINE_ATTACHMENTS bytes together they go in
    the record, which the executor writes out (`write_attachments`); larger ones are written
    there now, before the record. Either way an executor never sees the run without them."""
    if "/" in agent or agent in ("", ".", ".."):
        raise ConfigError(f"{agent!r} is not an agent name")
    task_spec = task_config(agent_config(device, agent), task)
    if priority is None:
        priority = int(task_spec.get("priority", 50))
    if not 0 <= priority <= 100:
        raise ConfigError(f"priority must be 0-100, got {priority}")
    if concurrency is not None and concurrency not in CONCURRENCY:
        raise ConfigError(f"concurrency must be one of {', '.join(CONCURRENCY)}, got {concurrency!r}")
    now = time.time() if now is None else now
    enqueued = _microseconds(now)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(enqueued // 1_000_000))}-{os.urandom(4).hex()}"
    record = {
        "format": QUEUE_FORMAT,
        "id": run_id,
        "agent": agent,
        "task": task,
        "priority": priority,
        "enqueuedAt": utc_timestamp(enqueued),
        "notAfter": (
            utc_timestamp(enqueued + _microseconds(deadline_seconds))
            if deadline_seconds is not None else None
        ),
        "source": source or {"kind": "manual"},
        "attempt": 1,
    }
    if concurrency is not None:
        record["concurrency"] = concurrency
    if attachments:
        _check_attachment_names(attachments)
        if travel_in_record(attachments):
            from binascii import b2a_base64

            record["attachments"] = {name: b2a_base64(content, newline=False).decode()
                                     for name, content in attachments.items()}
        else:
            _attach(device, agent, run_id, attachments)
    if claim:
        from reconciler.executor.owner import identity

        record.update(state="active", executor=identity())
    name = f"{100 - priority:03d}-{int(now * 1e9):020d}-{run_id}.json"
    bucket = f"{AGENTS_DIR}/{agent}/{'active' if claim else 'queue'}"
    if not device.is_dir(bucket):
        device.makedirs(bucket, mode=0o750)
    # The executor is woken as soon as the record is in place, while its directory is being
    # fsynced: it claims the run with a durable write of its own. Whoever enqueues still
    # returns only once the queue file is durable.
    device.write_atomic(
        f"{bucket}/{name}",
        (leanjson.dumps(record) + "\n").encode(),
        mode=0o644,
        renamed=None if claim else lambda: wake(device, agent),
    )
    return record


def utc_timestamp(microseconds: int) -> str:
    """A time in microseconds since the epoch as the queue writes times: ISO 8601 in UTC to the
    millisecond (`2026-11-27T02:19:44.123+00:00`, what `datetime.isoformat(timespec=
    "milliseconds")` writes), without importing `datetime`."""
    whole, fraction = divmod(microseconds, 1_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{fraction // 1000:03d}+00:00"


def _microseconds(seconds: float) -> int:
    """Seconds as whole microseconds, rounded as `datetime` rounds a timestamp (half to even)."""
    whole = int(seconds // 1)
    return whole * 1_000_000 + round((seconds - whole) * 1_000_000)


def listening(device: Device) -> bool:
    """Whether some executor holds the wake pipe open for reading: opening a FIFO for writing
    without blocking fails (ENXIO) when nobody reads it."""
    try:
        host = device.host(WAKE_PIPE)
        if not stat.S_ISFIFO(os.lstat(host).st_mode):
            return False
        os.close(os.open(host, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC))
    except (OSError, SposError):
        return False
    return True


def wake(device: Device, agent: str | None = None) -> None:
    """Nudge a running executor: about `agent`'s queue (it lists only that one), or without
    an agent about everything. Never blocks and never fails: with no executor reading, or a
    full pipe, nothing happens, and an executor's periodic rescan finds the work anyway."""
    try:
        host = device.host(WAKE_PIPE)
        if not stat.S_ISFIFO(os.lstat(host).st_mode):
            return
        fd = os.open(host, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, wake_message(agent))
    except OSError:
        pass
    finally:
        os.close(fd)


def wake_message(agent: str | None) -> bytes:
    """What `wake` writes: the agent's name and a newline (one write, shorter than PIPE_BUF, so
    never interleaved with another), or WAKE_ANY."""
    return WAKE_ANY if agent is None else agent.encode("utf-8", "replace") + b"\n"


def woken_agents(data: bytes) -> set[str] | None:
    """The agents whose queues the wake messages in `data` (one drain of the pipe) name; None
    when the executor must look at every queue: a message names no agent (WAKE_ANY, or
    anything that is not an agent's name), or the drain was long enough that the pipe may
    have been full and refused some."""
    if len(data) >= WAKE_OVERFLOW or not data.endswith(b"\n") and data:
        return None
    agents: set[str] = set()
    for line in data.split(b"\n")[:-1]:
        name = line.decode("ascii", "replace")
        if not (0 < len(name) <= 63 and name[0] in _NAME_START and _NAME_CHARS.issuperset(name)):
            return None
        agents.add(name)
    return agents


def attachments_dir(agent: str, run_id: str) -> str:
    """The device path of a run's attachments directory (in its tmp directory)."""
    return f"{AGENTS_DIR}/{agent}/tmp/{run_id}/{ATTACHMENTS_DIR}"


def travel_in_record(attachments: dict[str, bytes]) -> bool:
    """Whether `enqueue` puts these attachments in the queue record (INLINE_ATTACHMENTS) rather
    than writing them into the run's tmp directory first."""
    return sum(len(content) for content in attachments.values()) <= INLINE_ATTACHMENTS


def _attachment_name(name) -> bool:
    """A plain file name: letters, digits, `.`, `_` and `-`, starting with a letter or a digit,
    at most 200 characters (the attachments are files of one directory, each written through a
    temporary file whose name is longer)."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name[0] not in "._-"
            and all(char in _ATTACHMENT_CHARS for char in name))


def _check_attachment_names(attachments) -> None:
    for name in attachments:
        if not _attachment_name(name):
            raise ValueError(f"{name!r} is not an attachment name")


def _attach(device: Device, agent: str, run_id: str, attachments: dict[str, bytes]) -> None:
    directory = attachments_dir(agent, run_id)
    device.makedirs(directory, mode=0o750)
    for name, content in attachments.items():
        device.write_atomic(f"{directory}/{name}", content, mode=0o640)


def attachments_problem(value) -> str | None:
    """What is wrong with a queue record's `attachments` (docs/queue.md), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return "`attachments` must be an object"
    from binascii import Error, a2b_base64

    for name, text in value.items():
        if not _attachment_name(name):
            return f"`attachments` names {name!r}, which is not an attachment name"
        if not isinstance(text, str):
            return f"`attachments.{name}` must be base64 text"
        try:
            a2b_base64(text, strict_mode=True)
        except (Error, ValueError):
            return f"`attachments.{name}` is not base64"
    return None


def write_attachments(device: Device, agent: str, record: dict) -> None:
    """Write out the attachments a queue record carries (`enqueue`; checked by the record's
    loading, `attachments_problem`) into the run's tmp directory, where the executor names
    them to the action; again for each attempt (the record keeps them until the run ends).
    Not fsynced: the record holds them durably.

    The executor calls it once an earlier attempt's directory is gone, so the directory is
    made here and each file created in it through the directory's fd, refusing anything
    already there: a mkdir and one create per file, where a walk from the root and a
    temporary file renamed into place per file cost three times as long between a run's
    claim and its action starting. A directory that is there already has each file replaced
    atomically instead, without following links."""
    inline = record.get("attachments")
    if not inline:
        return
    from binascii import a2b_base64

    directory = attachments_dir(agent, record["id"])
    host = device.host(directory)
    try:
        os.mkdir(host, 0o750)
    except FileNotFoundError:  # no tmp directory yet: the walk makes it, or refuses a link
        device.makedirs(directory, mode=0o750)
    except FileExistsError:
        for name, text in inline.items():
            device.replace(f"{directory}/{name}", a2b_base64(text), mode=0o640)
        return
    folder = os.open(host, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name, text in inline.items():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o640, dir_fd=folder)
            try:
                write_all(fd, a2b_base64(text))
                os.fchmod(fd, 0o640)
            finally:
                os.close(fd)
    finally:
        os.close(folder)


def trigger_env(source: dict, tmp: str, tmp_host, inline=()) -> dict[str, str]:
    """The environment that tells a run what triggered it (docs/triggers.md): SPOS_TRIGGER,
    SPOS_TRIGGER_TYPE, SPOS_EVENT_COUNT, one SPOS_EVENT_<KEY> per entry of the last event's
    data, and SPOS_EVENTS_FILE / SPOS_PAYLOAD naming the attachments the run has. `tmp` is the
    run's tmp directory as the run sees it, `tmp_host` the same directory on this machine,
    where the large ones were written before the record; `inline`, the names of those the
    record carries, which `write_attachments` puts there before the action starts (perhaps
    after this is called: a run whose attachments cannot be written does not start)."""
    if source.get("kind") != "trigger":
        return {}
    import re

    env = {
        "SPOS_TRIGGER": str(source.get("trigger", "")),
        "SPOS_TRIGGER_TYPE": str(source.get("type", "")),
        "SPOS_EVENT_COUNT": str(source.get("events", 1)),
    }
    for key, value in (source.get("event") or {}).items():
        name = re.sub(r"[^A-Za-z0-9]", "_", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key))).upper()
        env[f"SPOS_EVENT_{name}"] = str(value).replace("\0", "")
    for variable, file in (("SPOS_EVENTS_FILE", "events.json"), ("SPOS_PAYLOAD", "payload")):
        if file in inline or os.path.isfile(os.path.join(tmp_host, ATTACHMENTS_DIR, file)):
            env[variable] = f"{tmp}/{ATTACHMENTS_DIR}/{file}"
    return env
