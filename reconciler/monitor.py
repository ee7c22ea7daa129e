"""`spos action monitor` and `spos action watch`: what the agents are doing now, and as it happens.

Both read the executor's own state and nothing else, so they cannot disagree with it: the run
directories (docs/queue.md, executor/runs.py), the runs' logs, and each active run's own cgroup,
`<parent>/<agent>/<run id>` as the executor names it (docs/cgroups.md). Nothing is kept between
two looks but what `watch` needs to tell what changed.

A look has to stay cheap on a device with thousands of finished runs that enqueues hundreds a
second, refreshed every second (monitor) or five times a second (watch):

- queued, completed and failed runs are counted by their file names, never read;
- only active records are parsed (the executor runs a few at a time), and each active run's
  cgroup gives two small files: its CPU time and the memory it uses now;
- `watch` reads a record only when its run appeared, moved or was rewritten, and a log only
  past where it stopped reading.

What cannot be measured is None (null in JSON, "-" in tables), never an error: a run that has
not started yet or is between two steps (no cgroup), no cgroup file system, a controller that
is not mounted. What a record holds is read through `_Fields`, so a value of the wrong kind
(written by hand, or by a run's own words) is None too; text from a record or a log is escaped
where a terminal shows it (`_shown`), and kept as written in JSON.

The one-shot table (`text`) and the live view are both rendered from the JSON form
(`snapshot`). rich draws the live view and is imported only there, so `--json` stays fast.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.errors import SposError, UnsafePathError, UsageError
from reconciler.executor.enqueue import listening
from reconciler.executor.owner import alive
from reconciler.executor.runs import RUN_FILE, TERMINAL_BUCKET, CorruptRecord, RunStore
from reconciler.executor.supervise import run_dirs
from reconciler.numbers import amount, printable
from reconciler.views import clock, human_size

COUNTED = {"queued": "queue", "active": "active", "completed": "completed", "failed": "failed"}
"""The run counts of an agent, by the directory they count."""

LOOK_ORDER = ("queue", "active", "queue", "active", "completed", "failed")
"""The order a look lists an agent's run directories in: the order runs move through them,
with the two a run goes back and forth between (claimed, then requeued for a retry or when its
executor died) listed twice. A run that moves once or twice while they are listed is seen;
only one that moves three times within the few milliseconds of one look can be missed."""

USAGE_FILES = {1: ("cpuacct/cpuacct.usage", "memory/memory.usage_in_bytes"),
               2: ("cpu.stat", "memory.current")}
"""Per cgroup version, the files with a cgroup's CPU time and the memory it uses now."""

POLL_SECONDS = 0.2
"""How often `watch` looks at the run directories and logs."""

KEY_SECONDS = 0.1
"""How long the live view waits for a key at a time: it notices a resized terminal this fast."""

PARTIAL_LINE_BYTES = 64 * 1024
"""Output without a newline is shown as a line once it grows this long."""

EXECUTOR_NOTE = re.compile(r"--- spos \d{4}-\d\d-\d\dT\S+ .*$")
"""A line the executor adds to a run's log (supervise.LogWriter.note); watch's events say the
same. It follows the run's last output at once, so after output without a newline it ends
that line."""


# -- the snapshot ----------------------------------------------------------------------------


def snapshot(device: Device, agent: str | None = None, now: float | None = None) -> dict:
    """What every agent (or only `agent`) is doing at `now` (default: the clock). An agent is
    a directory under the agents' state directory; naming one that has none is an error."""
    now = time.time() if now is None else now
    store = RunStore(device)
    owners = _Owners()
    agents = [_agent(device, store, owners, name, now) for name in _agent_names(store, agent)]
    return {
        "time": _iso(now),
        "executorRunning": listening(device),
        "totals": {key: sum(each["runs"][key] for each in agents) for key in COUNTED},
        "agents": agents,
    }


def _agent_names(store: RunStore, agent: str | None) -> list[str]:
    if agent is None:
        return store.agents()
    if not agent:
        raise UsageError(f"there is no agent '' on this device: name one of the directories in "
                         f"{AGENTS_DIR}")
    if "/" in agent or agent.startswith(".") or not store.device.is_dir(f"{AGENTS_DIR}/{agent}"):
        raise UsageError(f"there is no agent {agent!r} on this device (no {AGENTS_DIR}/{agent})")
    return [agent]


def _agent(device: Device, store: RunStore, owners: "_Owners", agent: str, now: float) -> dict:
    """The agent's run counts and its active runs. A directory listed twice (LOOK_ORDER) counts
    what either listing saw: a run that moves meanwhile may be counted in two places, and is
    missed only as LOOK_ORDER says."""
    listed: dict[str, list[str] | set[str]] = {}
    for bucket, names in _listings(device, agent):
        listed[bucket] = {*listed[bucket], *names} if bucket in listed else names
    records = sorted(filter(_is_record, listed["active"]))
    cancelling = {name.removesuffix(".cancel") for name in listed["active"] if name.endswith(".json.cancel")}
    active = []
    for name in records:
        try:
            run = store.load(agent, "active", name)
        except (FileNotFoundError, CorruptRecord):
            continue  # it moved on since the listing, or is not a record (the executor sets it aside)
        record = _Fields(run.record)
        active.append(_active_run(device, agent, record, owners.alive(record), name in cancelling, now))
    counts = {key: sum(map(_is_record, listed[bucket])) for key, bucket in COUNTED.items()}
    return {"agent": agent, "runs": counts, "active": active}


def _listings(device: Device, agent: str) -> list[tuple[str, list[str]]]:
    """(directory, its names) of the agent's run directories, listed in LOOK_ORDER."""
    return [(bucket, _entries(device, agent, bucket)) for bucket in LOOK_ORDER]


def _entries(device: Device, agent: str, bucket: str) -> list[str]:
    """Every name in one of the agent's run directories, unsorted: counting needs no order."""
    try:
        return os.listdir(device.host(f"{AGENTS_DIR}/{agent}/{bucket}"))
    except (OSError, SposError):  # missing, or a link passed over as `action list` does
        return []


def _is_record(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


class _Fields:
    """The fields of a run record (or of one of its attempts, or of an object in it) as monitor
    and watch read them: each of the kind docs/queue.md gives it, or None when the record holds
    anything else there. A record is written by hand, and partly in a run's own words, as well
    as by the executor: what is read through here cannot fail a look or put NaN or Infinity in
    JSON. Text is handed on as written; what shows it on a terminal escapes it (`_shown`).
    RunStore.load has checked `id`, `task`, `attempt` and `notBefore`: they are read directly."""

    def __init__(self, fields):
        self.fields = fields if isinstance(fields, dict) else {}

    def __getitem__(self, key: str):
        return self.fields[key]

    @property
    def attempt(self) -> int:
        """The record's attempt: the one running, or the last."""
        return self.fields.get("attempt", 1)

    def text(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if isinstance(value, str) else None

    def time(self, key: str) -> str | None:
        """An ISO 8601 time, as written."""
        value = self.text(key)
        return value if _epoch(value) is not None else None

    def number(self, key: str, negative: bool = False) -> int | float | None:
        """A plain, finite, believable number (numbers.amount), as written: 50 stays 50."""
        value = self.fields.get(key)
        return value if amount(value, negative=negative) is not None else None

    def whole(self, key: str) -> int | None:
        """A whole number, negative ones too (an exit code, a process id)."""
        value = self.number(key, negative=True)
        return value if isinstance(value, int) else None

    def json(self, key: str):
        """A JSON value as written, but every number JSON cannot hold (NaN, Infinity) made None."""
        return _finite(self.fields.get(key))

    def object(self, key: str) -> "_Fields | None":
        value = self.fields.get(key)
        return _Fields(value) if isinstance(value, dict) else None

    def items(self, key: str) -> list["_Fields"]:
        """The objects of a list."""
        value = self.fields.get(key)
        if not isinstance(value, list):
            return []
        return [_Fields(item) for item in value if isinstance(item, dict)]


def _finite(value):
    """A JSON value with every number JSON cannot hold (NaN, Infinity) made None."""
    if isinstance(value, float):
        return value if amount(value, negative=True) is not None else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _active_run(device: Device, agent: str, record: _Fields, owned: bool, cancelling: bool,
                now: float) -> dict:
    started = _attempt_start(record)
    cpu, memory = _usage(device, agent, record["id"])
    return {
        "id": record["id"],
        "task": record["task"],
        "attempt": record.attempt,
        "state": _state(started, owned, cancelling),
        "startedAt": started,
        "runtimeSeconds": _seconds_since(started, now),
        "progress": _progress(record.object("progress")),
        "cpuSeconds": cpu,
        "memoryBytes": memory,
    }


def _attempt_start(record: _Fields) -> str | None:
    """When the running attempt started; None while the executor sets it up: a record claimed
    for a retry still carries the start of the attempt before until the new one is recorded."""
    started = record.text("startedAt")
    attempts = record.items("attempts")
    if started is None or (attempts and attempts[-1].text("startedAt") == started):
        return None
    return started


class _Owners:
    """Whether the executors owning runs are alive, each looked up once a snapshot: a few
    executors own all the active runs there are."""

    def __init__(self):
        self.known: dict[tuple, bool] = {}

    def alive(self, record: _Fields) -> bool:
        """An owner whose fields are not of their kind cannot be told alive: abandoned."""
        owner = record.object("executor") or _Fields({})
        pid, boot, ticks = owner.whole("pid"), owner.text("bootId"), owner.whole("startTicks")
        if (pid, boot, ticks) not in self.known:
            self.known[pid, boot, ticks] = alive({"pid": pid, "bootId": boot, "startTicks": ticks})
        return self.known[pid, boot, ticks]


def _state(started: str | None, owned: bool, cancelling: bool) -> str:
    """abandoned: its executor is gone (the next one to start runs it again); cancelling: a
    cancel request waits for its executor; starting: claimed, not started yet; running."""
    if not owned:
        return "abandoned"
    if cancelling:
        return "cancelling"
    return "running" if started else "starting"


def _progress(progress: _Fields | None) -> dict | None:
    """The last progress the run reported: percent (None after only `message` lines, or when it
    is not a number from 0 to 100) and message ("" for none, or for anything but text)."""
    if progress is None:
        return None
    percent = progress.number("percent")
    return {"percent": percent if percent is not None and percent <= 100 else None,
            "message": progress.text("message") or ""}


def _usage(device: Device, agent: str, run_id: str) -> tuple[float | None, int | None]:
    """CPU seconds and memory in use of the run's own cgroup; None where there is none to read."""
    tree = device.cgroups
    if tree.version is None:
        return None, None
    path = f"{tree.parent}/{agent}/{run_id}"
    cpu_file, memory_file = USAGE_FILES[tree.version]
    try:
        cpu, memory = tree.read(path, cpu_file), tree.read(path, memory_file)
    except (OSError, SposError):
        return None, None
    return _cpu_seconds(cpu, tree.version), _kernel_count(memory)


def _cpu_seconds(content: str | None, version: int) -> float | None:
    """v1 `cpuacct.usage` is nanoseconds; v2 `cpu.stat` has `usage_usec`."""
    if content is None:
        return None
    if version == 1:
        nanoseconds = _kernel_count(content)
        return None if nanoseconds is None else round(nanoseconds / 1e9, 3)
    for line in content.splitlines():
        key, _, value = line.partition(" ")
        microseconds = _kernel_count(value) if key == "usage_usec" else None
        if microseconds is not None:
            return round(microseconds / 1e6, 3)
    return None


def _kernel_count(content: str | None) -> int | None:
    """The count a cgroup file holds: decimal digits, no more than a 64-bit counter has."""
    if content is None or not content.isdecimal() or len(content) > 20:
        return None
    return int(content)


def _seconds_since(iso: str | None, now: float) -> float | None:
    moment = _epoch(iso)
    return None if moment is None else round(max(0.0, now - moment), 3)


# -- the one-shot table ----------------------------------------------------------------------

AGENT_HEADER = ("AGENT", "QUEUED", "ACTIVE", "COMPLETED", "FAILED")
RUN_HEADER = ("RUN", "AGENT", "TASK", "ATTEMPT", "STATE", "STARTED", "RUNTIME", "PROGRESS", "CPU",
              "MEMORY")
MESSAGE_CHARACTERS = 40
"""A progress message longer than this is cut in the one-shot table."""

BAR_WIDTH = 8
"""Characters of a progress bar in the live view."""

STATE_STYLES = {"running": "green", "cancelling": "yellow", "abandoned": "red"}


def text(snap: dict) -> str:
    """The snapshot as two tables, agents then active runs, rendered from its JSON form."""
    if not snap["agents"]:
        return "No agents on this device.\n"
    lines = [_headline(snap), ""]
    lines += _columns([AGENT_HEADER, *(_agent_row(agent) for agent in snap["agents"])])
    lines.append("")
    runs = [(agent["agent"], run) for agent in snap["agents"] for run in agent["active"]]
    if runs:
        lines += _columns([RUN_HEADER, *(_run_row(agent, run) for agent, run in runs)])
    else:
        lines.append("No active runs.")
    return "\n".join(lines) + "\n"


def _headline(snap: dict) -> str:
    totals = snap["totals"]
    executor = ("an executor is running" if snap["executorRunning"]
                else "no executor is running: queued runs wait")
    return (f"{_local(snap['time'], '%Y-%m-%d %H:%M:%S %Z')}: {totals['active']} active, "
            f"{totals['queued']} queued, {totals['completed']} completed, {totals['failed']} failed; "
            f"{executor}")


def _agent_row(agent: dict) -> tuple[str, ...]:
    return (agent["agent"], *(str(agent["runs"][key]) for key in ("queued", "active", "completed", "failed")))


def _run_row(agent: str, run: dict) -> tuple[str, ...]:
    return (run["id"], agent, run["task"], str(run["attempt"]), run["state"],
            _local(run["startedAt"], "%H:%M:%S"), _duration(run["runtimeSeconds"]),
            _progress_text(run["progress"]), _duration(run["cpuSeconds"]), _size(run["memoryBytes"]))


def _progress_text(progress: dict | None) -> str:
    if progress is None:
        return "-"
    message = _shown(progress["message"])  # cut as it is shown
    if len(message) > MESSAGE_CHARACTERS:
        message = message[:MESSAGE_CHARACTERS - 1] + "…"
    return " ".join(part for part in (_percent(progress["percent"]), message) if part) or "-"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """The rows aligned in columns, every cell `_shown`: a record's text reaches the terminal
    escaped, one line a row."""
    rows = [tuple(map(_shown, row)) for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}%"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else clock(seconds)


def _size(value: int | None) -> str:
    return "-" if value is None else human_size(value)


# -- the live view ---------------------------------------------------------------------------


def live(device: Device, agent: str | None = None, interval: float = 1.0) -> int:
    """The snapshot full-screen (the terminal's alternate screen), taken again every
    `interval` seconds and redrawn at once when the terminal is resized, until q, Ctrl-C or
    SIGTERM; the terminal is left as it was found."""
    if not sys.stdout.isatty():
        raise UsageError("--live draws on a terminal, and standard output is not one: drop --live "
                         "for one snapshot, or use --json")
    if interval <= 0:
        raise UsageError("--interval must be more than 0s")
    snap = snapshot(device, agent)  # an unknown agent is said before the screen changes
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with _Keys(sys.stdin) as keys, _sigterm_interrupts():
        try:
            with Live(console=console, screen=True, auto_refresh=False) as view:
                _refresh_until_quit(view, console, keys, lambda: snapshot(device, agent), snap, interval)
        except KeyboardInterrupt:
            pass
    return 0


def _refresh_until_quit(view, console, keys: "_Keys", take, snap: dict, interval: float) -> None:
    drawn_size = None
    due = time.monotonic() + interval
    while True:
        if time.monotonic() >= due:
            snap, due = take(), time.monotonic() + interval
            drawn_size = None
        if console.size != drawn_size:
            drawn_size = console.size
            view.update(live_view(snap, drawn_size.height), refresh=True)
        if keys.quit_within(max(0.0, min(KEY_SECONDS, due - time.monotonic()))):
            return


class _Keys:
    """The keys typed while the view is up, read without waiting for Enter: standard input in
    cbreak mode (no echo, no line editing; Ctrl-C still interrupts), restored on the way out.
    When standard input is not a terminal only Ctrl-C (or SIGTERM) stops the view."""

    def __init__(self, stream):
        self.terminal = stream.fileno() if stream is not None and stream.isatty() else None
        self.reading = self.terminal is not None
        self.saved = None

    def __enter__(self) -> "_Keys":
        if self.terminal is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.terminal)
            tty.setcbreak(self.terminal)
        return self

    def __exit__(self, *_) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.terminal, termios.TCSADRAIN, self.saved)

    def quit_within(self, timeout: float) -> bool:
        """Whether q was typed within `timeout` seconds."""
        if not self.reading:
            time.sleep(timeout)
            return False
        if not select.select([self.terminal], [], [], timeout)[0]:
            return False
        typed = os.read(self.terminal, 64)
        self.reading = bool(typed)  # nothing: the terminal is gone, no more keys
        return b"q" in typed


@contextmanager
def _sigterm_interrupts():
    """SIGTERM stops the view as Ctrl-C does, so the terminal is restored on the way out."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def live_view(snap: dict, height: int):
    """The live view of a snapshot for a terminal `height` lines high: a headline (the time,
    the totals, whether an executor serves the queue), the agents with their queue depth and
    run counts, and the active runs with progress bars. When not every row fits, the agents
    get a third of the room (two lines at least), those with nothing queued or active left
    out first, and a line under each table cut short says how many rows it left out."""
    from rich.console import Group

    agents = snap["agents"]
    runs = [(agent["agent"], run) for agent in agents for run in agent["active"]]
    room = height - 7  # headline, two gaps, two headers with their rules
    run_rows, agent_rows = _fit(len(runs), len(agents), room)
    if agent_rows < len(agents):
        agents = sorted(agents, key=lambda agent: (not _busy(agent), agent["agent"]))
    return Group(_live_headline(snap), _cell(""), _agents_table(agents, agent_rows), _cell(""),
                 _runs_table(runs, run_rows))


def _fit(runs: int, agents: int, room: int) -> tuple[int, int]:
    """Rows for the runs table and the agents table in `room` lines."""
    if runs + agents <= room:
        return runs, agents
    agent_rows = min(agents, max(2, room // 3))
    run_rows = max(0, min(runs, room - agent_rows))
    return run_rows, max(0, min(agents, room - run_rows))


def _busy(agent: dict) -> bool:
    return bool(agent["runs"]["queued"] or agent["runs"]["active"])


def _live_headline(snap: dict):
    from rich.text import Text

    totals = snap["totals"]
    headline = Text.assemble(
        (_local(snap["time"], "%H:%M:%S"), "bold"),
        f"  {totals['active']} active  {totals['queued']} queued  {totals['completed']} completed  ",
        (f"{totals['failed']} failed", "red" if totals["failed"] else ""),
        "  executor ",
        ("running", "green") if snap["executorRunning"] else ("NOT RUNNING", "bold red"),
        ("  q quits", "dim"),
    )
    headline.no_wrap, headline.overflow = True, "ellipsis"
    return headline


def _agents_table(agents: list[dict], rows: int):
    table = _table(False, ("AGENT", {}), ("QUEUED", {"justify": "right"}), ("ACTIVE", {"justify": "right"}),
                   ("COMPLETED", {"justify": "right"}), ("FAILED", {"justify": "right"}))
    shown, left_out = _cut(agents, rows)
    for agent in shown:
        counts = agent["runs"]
        table.add_row(*map(_cell, (agent["agent"], counts["queued"], counts["active"], counts["completed"])),
                      _cell(counts["failed"], "red" if counts["failed"] else ""))
    table.caption = _left_out(left_out, "agents")
    return table


def _runs_table(runs: list[tuple[str, dict]], rows: int):
    if not runs:
        return _cell("No active runs.", "dim")
    table = _table(True, ("RUN", {"min_width": 8}), ("AGENT", {"min_width": 5}), ("TASK", {"min_width": 5}),
                   ("#", {"justify": "right"}), ("STATE", {"min_width": 10}),
                   ("RUNTIME", {"justify": "right"}), ("PROGRESS", {"min_width": BAR_WIDTH}),
                   ("", {"justify": "right"}), ("MESSAGE", {"ratio": 1}), ("CPU", {"justify": "right"}),
                   ("MEMORY", {"justify": "right"}))
    shown, left_out = _cut(runs, rows)
    for agent, run in shown:
        progress = run["progress"] or {"percent": None, "message": ""}
        table.add_row(*map(_cell, (short_id(run["id"]), agent, run["task"], run["attempt"])),
                      _cell(run["state"], STATE_STYLES.get(run["state"], "")),
                      _cell(_duration(run["runtimeSeconds"])), _bar(progress["percent"]),
                      _cell(_percent(progress["percent"])), _cell(progress["message"]),
                      _cell(_duration(run["cpuSeconds"])), _cell(_size(run["memoryBytes"])))
    table.caption = _left_out(left_out, "runs")
    return table


def _table(expand: bool, *columns: tuple[str, dict]):
    """A table without borders, its header underlined; `expand`: as wide as the terminal, the
    columns with a ratio taking what is left."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  expand=expand, caption_justify="left")
    for header, options in columns:
        table.add_column(header, overflow="ellipsis", **{"no_wrap": True, **options})
    return table


def _cut(items: list, rows: int) -> tuple[list, int]:
    """The items that fit in `rows` lines, and how many are left out (the line saying so takes
    the last one). With no room at all, nothing is said: the screen cuts it off anyway."""
    if len(items) <= rows or rows <= 0:
        return items[:max(0, rows)], 0
    return items[:rows - 1], len(items) - rows + 1


def _left_out(count: int, what: str):
    """The line under a table cut short: one line, however narrow the terminal."""
    return _cell(f"… {count} more {what}", "dim") if count else None


def _cell(value, style: str = ""):
    """A value as text, taken literally (a task's message is no rich markup) and `_shown`."""
    from rich.text import Text

    return Text(_shown(value), style=style, no_wrap=True, overflow="ellipsis")


def _bar(percent: float | None):
    from rich.progress_bar import ProgressBar

    return _cell("-") if percent is None else ProgressBar(total=100, completed=percent, width=BAR_WIDTH)


# -- watching one agent ----------------------------------------------------------------------


def watch(device: Device, agent: str, as_json: bool = False) -> int:
    """Print `agent`'s run events and its runs' output as they happen, until Ctrl-C: first its
    active runs (history is not repeated), then every run queued, started, retried or ended
    from then on. `as_json`: one JSON object a line."""
    _agent_names(RunStore(device), agent)
    follower = Follower(device, agent)
    write = _json_line if as_json else _text_line
    try:
        events = follower.start()
        if not as_json:
            print(f"Watching {_shown(agent)}: {follower.count('active')} active, {follower.count('queue')} "
                  "queued. Ctrl-C stops.", file=sys.stderr, flush=True)
        while True:
            sys.stdout.write("".join(map(write, events)))
            sys.stdout.flush()
            time.sleep(POLL_SECONDS)
            events = follower.poll()
    except KeyboardInterrupt:
        return 0
    finally:
        follower.close()


@dataclass
class _Followed:
    """What has been said of one run that has not ended: `started` and `ended` are the last
    attempts said to have started and ended (for a run there before watching began: the
    attempts it had then)."""

    bucket: str
    log: "_LogTail"
    task: str | None = None
    started: int = 0
    ended: int = 0
    queued_said: bool = False
    missing: int = 0


class Follower:
    """One agent's runs as watch follows them. Each look lists the agent's four run directories
    and reads the records of the runs that appeared, moved, or were rewritten since the last
    look (inotify says which, `_Rewritten`), and the new lines of the active runs' logs. From
    a record's attempts it tells, in order, what was not told yet: a run that was queued,
    retried and ended between two looks is still told in full."""

    def __init__(self, device: Device, agent: str):
        self.device, self.agent = device, agent
        self.store = RunStore(device)
        self.runs: dict[str, _Followed] = {}
        self.finished: dict[str, str] = {}  # name -> bucket of the ended runs at the last look
        self.rewritten = _Rewritten(device, agent)

    def count(self, bucket: str) -> int:
        return sum(followed.bucket == bucket for followed in self.runs.values())

    def start(self) -> list[dict]:
        """Take in what is there now (inotify watches first, so nothing falls in between):
        events for the active runs only; their logs are followed from their current end."""
        waiting, self.finished = self._look()
        events = []
        for run_id, (bucket, name) in waiting.items():
            record = self._record(bucket, name)
            if record is None:
                continue  # it moved on: the next look finds it
            followed = self.runs[run_id] = _Followed(bucket, self._log(run_id, from_end=True),
                                                     started=record.attempt - 1, ended=record.attempt - 1,
                                                     queued_said=True)
            events += self._catch_up(run_id, followed, bucket, record)
        return events

    def poll(self) -> list[dict]:
        """What happened since the last look."""
        rewritten = self.rewritten.names()
        waiting, finished = self._look()
        arrived = sorted(name for name in finished if name not in self.finished)
        self.finished = finished
        events, ended = [], set()
        for name in arrived:
            run_id = _run_id(name)
            ended.add(run_id)
            followed = self.runs.get(run_id) or _Followed(finished[name], self._log(run_id))
            events += self._read_on(run_id, followed, finished[name], name)
        moved = []
        for run_id, (bucket, name) in waiting.items():
            if run_id in ended:
                continue  # its end is written before its active record is removed
            followed = self.runs.get(run_id)
            if followed is None:
                followed = self.runs[run_id] = _Followed(bucket, self._log(run_id))
                moved.append((name, run_id, bucket))
            elif followed.bucket != bucket or rewritten is None or name in rewritten:
                moved.append((name, run_id, bucket))
            followed.missing = 0
        for name, run_id, bucket in sorted(moved):  # in queue order: by priority, then age
            events += self._read_on(run_id, self.runs[run_id], bucket, name)
        self._forget_missing(set(waiting) | ended)
        for run_id, followed in self.runs.items():
            if followed.bucket == "active":
                events += self._output(run_id, followed)
        return events

    def close(self) -> None:
        self.rewritten.close()
        for followed in self.runs.values():
            followed.log.close()

    def _look(self) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        """(run id -> (bucket, name) of the queued and active runs, name -> bucket of the
        ended ones). Directories are listed in LOOK_ORDER, so a run that moves during the look
        is seen (in two places at worst: the later one counts)."""
        waiting, finished = {}, {}
        for bucket, names in _listings(self.device, self.agent):
            for name in names:
                match = RUN_FILE.fullmatch(name)
                if match and bucket in ("completed", "failed"):
                    finished[name] = bucket
                elif match:
                    waiting[match["id"]] = (bucket, name)
        return waiting, finished

    def _forget_missing(self, seen: set[str]) -> None:
        """Runs in no directory for three looks in a row (removed by hand, or set aside as not
        a record) are no longer followed. One look is not enough: a run going back to the queue
        for a retry can be missed by a look."""
        for run_id in [run_id for run_id in self.runs if run_id not in seen]:
            followed = self.runs[run_id]
            followed.missing += 1
            if followed.missing >= 3:
                followed.log.close()
                del self.runs[run_id]

    def _log(self, run_id: str, from_end: bool = False) -> "_LogTail":
        """The run's log; a logs directory that is a link is not read (no output is told)."""
        directory, _, name = run_dirs(self.agent, run_id)["log"].rpartition("/")
        try:
            return _LogTail(f"{self.device.host(directory)}/{name}", from_end)
        except UnsafePathError:
            return _LogTail(None, from_end)

    def _record(self, bucket: str, name: str) -> _Fields | None:
        try:
            return _Fields(self.store.load(self.agent, bucket, name).record)
        except (FileNotFoundError, CorruptRecord):
            return None

    def _read_on(self, run_id: str, followed: _Followed, bucket: str, name: str) -> list[dict]:
        """The events of the run's record in `bucket`; none when it moved on before it could be
        read (the next look finds it where it went)."""
        record = self._record(bucket, name)
        return [] if record is None else self._catch_up(run_id, followed, bucket, record)

    def _catch_up(self, run_id: str, followed: _Followed, bucket: str, record: _Fields) -> list[dict]:
        """The events `record`, found in `bucket`, tells that were not told yet, in order."""
        followed.bucket, followed.task = bucket, record["task"]
        attempt = record.attempt
        events = [] if followed.queued_said else self._queued(run_id, followed, record)
        followed.queued_said = True
        for entry in _attempts(record):
            if entry["attempt"] <= followed.ended:
                continue
            if entry["attempt"] > followed.started:
                followed.started = entry["attempt"]
                events.append(self._event(run_id, followed, "started", entry.time("startedAt"),
                                          attempt=entry["attempt"]))
            events += self._output(run_id, followed, final=True)
            if entry["attempt"] < attempt:
                events.append(self._retrying(run_id, followed, entry, record))
            followed.ended = entry["attempt"]
        if bucket == "active" and attempt > followed.started:
            followed.started = attempt
            events.append(self._event(run_id, followed, "started", _attempt_start(record), attempt=attempt))
        if bucket in ("completed", "failed"):
            events += self._output(run_id, followed, final=True)
            events.append(self._ended(run_id, followed, bucket, record))
            followed.log.close()
            self.runs.pop(run_id, None)
        return events

    def _queued(self, run_id: str, followed: _Followed, record: _Fields) -> list[dict]:
        """A run `action execute` runs at once was never queued: its first event is its start."""
        source = record.json("source") if record.object("source") is not None else {}
        if source.get("kind") == "execute":
            return []
        return [self._event(run_id, followed, "queued", record.time("enqueuedAt"),
                            priority=record.number("priority", negative=True), source=source)]

    def _retrying(self, run_id: str, followed: _Followed, entry: _Fields, record: _Fields) -> dict:
        """An attempt ended and the run goes on; when it is the one just before the record's
        attempt, the record says when the next one may start (none: at once)."""
        in_seconds = None
        not_before = None
        if entry["attempt"] == record.attempt - 1:
            not_before = record.text("notBefore")  # a time, RunStore.load has checked
            due, ended = _epoch(not_before), _epoch(entry.time("endedAt"))
            in_seconds = 0.0 if not_before is None else (
                None if due is None or ended is None else round(max(0.0, due - ended), 1))
        return self._event(run_id, followed, "retrying", entry.time("endedAt"), attempt=entry["attempt"],
                           **_outcome(entry), nextAttempt=entry["attempt"] + 1, notBefore=not_before,
                           inSeconds=in_seconds)

    def _ended(self, run_id: str, followed: _Followed, bucket: str, record: _Fields) -> dict:
        """The run's end; its state is the directory it ended in when the record's own state
        does not belong there."""
        outcome = _outcome(record)
        if TERMINAL_BUCKET.get(outcome["state"]) != bucket:
            outcome["state"] = bucket
        return self._event(run_id, followed, "ended", record.time("endedAt"), attempt=record.attempt,
                           **outcome)

    def _output(self, run_id: str, followed: _Followed, final: bool = False) -> list[dict]:
        """The run's new output lines, without the executor's notes."""
        events = []
        for line in followed.log.lines(final):
            note = EXECUTOR_NOTE.search(line)
            if note is None or note.start() > 0:
                events.append(self._event(run_id, followed, "output", None,
                                          line=line if note is None else line[:note.start()]))
        return events

    def _event(self, run_id: str, followed: _Followed, kind: str, when: str | None, **fields) -> dict:
        return {"time": when or _iso(time.time()), "run": run_id, "agent": self.agent,
                "task": followed.task, "event": kind, **fields}


class _Rewritten:
    """Which run files were written into the agent's run directories since the last call:
    moved there, or rewritten in place (a record is always written by renaming a whole new
    file over it). A look that lists the directories sees where runs are, but not a run that
    went from the queue to active/ and back for a retry between two looks: this does.

    Read from inotify (reconciler.inotify). None: anything may have been (the
    event queue overflowed). Where inotify cannot be had, nothing is known this way and a run
    retried between two looks is told when it moves next."""

    def __init__(self, device: Device, agent: str):
        from reconciler.inotify import Inotify, WatchFailed

        self.directories = [device.host(f"{AGENTS_DIR}/{agent}/{bucket}") for bucket in COUNTED.values()]
        self.watched: set[str] = set()
        try:
            self.inotify = Inotify()
        except WatchFailed:
            self.inotify = None
        self._watch()

    def names(self) -> set[str] | None:
        from reconciler.inotify import IN_Q_OVERFLOW

        self._watch()
        if self.inotify is None:
            return set()
        events = self.inotify.read()
        if any(event.mask & IN_Q_OVERFLOW for event in events):
            return None
        return {event.name for event in events}

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()

    def _watch(self) -> None:
        """Watch the run directories there are (the executor makes them when first needed)."""
        from reconciler.inotify import IN_DONT_FOLLOW, IN_MOVED_TO, IN_ONLYDIR, WatchFailed

        for directory in self.directories:
            if self.inotify is None or directory in self.watched:
                continue
            try:
                if self.inotify.add_watch(directory, IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW) is not None:
                    self.watched.add(directory)
            except WatchFailed:  # a watch limit reached: go on without
                self.inotify.close()
                self.inotify = None


class _LogTail:
    """A run's log, read line by line as it grows, from its start or (`from_end`) from what is
    new. The executor rotates a log when it would pass its quota (`.log` renamed to `.log.1`, a
    new `.log` started): the old file is read to its end, then the new one from its start, as
    `spos action logs -f` does; a log read from its start that was rotated before it was
    first opened starts with its `.log.1`. Only regular files are read: a link in their place
    is not followed, a FIFO not waited on. `path` None: there is nothing to read."""

    def __init__(self, path: str | None, from_end: bool):
        self.path = path
        self.handle = None
        self.offset = _size_of(path) if from_end else 0
        self.opened = from_end
        self.partial = b""

    def lines(self, final: bool = False) -> list[str]:
        """The complete lines written since the last call; `final`: the run's attempt ended, so
        a last line without a newline is complete too."""
        self.partial += self._read()
        *complete, self.partial = self.partial.split(b"\n")
        if self.partial and (final or len(self.partial) >= PARTIAL_LINE_BYTES):
            complete.append(self.partial)
            self.partial = b""
        return [line.decode(errors="replace").removesuffix("\r") for line in complete]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def _read(self) -> bytes:
        data = b""
        for _ in range(4):  # a rotation or two while reading; a busy log is read on at the next look
            if self.handle is None and not self._open():
                return data
            chunk = self.handle.read()
            data += chunk
            if not chunk:
                if not _rotated(self.path, self.handle):
                    return data
                self.close()
                self.offset = 0
        return data

    def _open(self) -> bool:
        if self.path is None:
            return False
        for path in (self.path,) if self.opened else (f"{self.path}.1", self.path):
            self.handle = open_regular(path)
            if self.handle is None:
                continue
            self.opened = True
            self.handle.seek(self.offset)
            return True
        return False


def open_regular(path: str):
    """The regular file at `path` open for reading; None when there is none (not there, a
    link, a FIFO, a directory...)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _rotated(path: str, handle) -> bool:
    """Whether the log at `path` is no longer the file `handle` reads."""
    try:
        return os.lstat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except OSError:
        return False


def _size_of(path: str | None) -> int:
    """How much the regular file at `path` holds; 0 for anything else."""
    try:
        status = os.lstat(path) if path is not None else None
    except OSError:
        return 0
    return status.st_size if status is not None and stat.S_ISREG(status.st_mode) else 0


def _attempts(record: _Fields) -> list[_Fields]:
    """The record's ended attempts that say which attempt they were, in order."""
    return [entry for entry in record.items("attempts") if entry.whole("attempt") is not None]


def _outcome(attempt: _Fields) -> dict:
    """How an attempt (or a run: its last attempt) ended, as its `retrying` or `ended` event
    says it."""
    return {"state": attempt.text("state"), "exitCode": attempt.whole("exitCode"),
            "reason": attempt.text("reason") or "", "durationSeconds": attempt.number("durationSeconds")}


def _run_id(name: str) -> str:
    return RUN_FILE.fullmatch(name)["id"]


def short_id(run_id: str) -> str:
    """The last part of a run id (`9f1c2a7b` of `20261126T090000-9f1c2a7b`): random, so unique
    enough to read, and every command that takes a run id takes it too (a run is found by the
    end of its file name)."""
    return run_id.rpartition("-")[2] or run_id


def _json_line(event: dict) -> str:
    return json.dumps(event) + "\n"


def _text_line(event: dict) -> str:
    """`HH:MM:SS <run> <task>: <what happened>`, or `<run> | <output line>` indented under it;
    <run> is the short form of the run id, its last part. The line is `_shown`: what a run
    wrote reaches the terminal escaped."""
    run = short_id(event["run"])
    if event["event"] == "output":
        return _shown(f"{'':8} {run} | {event['line']}") + "\n"
    return _shown(f"{_local(event['time'], '%H:%M:%S')} {run} {event['task']}: {_what(event)}") + "\n"


def _what(event: dict) -> str:
    kind = event["event"]
    if kind == "queued":
        return "queued"
    if kind == "started":
        return f"started attempt {event['attempt']}"
    ended = _ending(event)
    if kind == "retrying":
        when = "retrying" if event["inSeconds"] is None else f"retrying in {clock(event['inSeconds'])}"
        return f"{when}: attempt {event['attempt']} {ended}".rstrip()
    return f"ended {ended}"


def _ending(event: dict) -> str:
    """`STATE exit CODE in DURATION (reason)`, leaving out what the record does not have."""
    words = [event["state"]] if event["state"] else []
    if event["exitCode"] is not None:
        words.append(f"exit {event['exitCode']}")
    if event["durationSeconds"] is not None:
        words.append(f"in {clock(event['durationSeconds'])}")
    if event["reason"]:
        words.append(f"({event['reason']})")
    return " ".join(words)


# -- text and times --------------------------------------------------------------------------


def _shown(value) -> str:
    """A value as one line of a terminal: control characters escaped (numbers.printable), a
    newline too."""
    text = str(value)
    if text.isprintable():  # nearly always, and quick to tell
        return text
    return printable(text).replace("\n", "\\x0a")


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="milliseconds")


def _epoch(iso) -> float | None:
    """The moment an ISO 8601 time names; None for anything else, or for a time without a zone
    that the device's clock cannot place (year 1 or 9999 in some zones)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _local(iso: str | None, form: str) -> str:
    """A recorded time in the device's time zone, as people read the clock there; "-" for none,
    or for one that is outside the calendar there (years 1 to 9999)."""
    moment = _epoch(iso)
    if moment is None:
        return "-"
    try:
        return datetime.fromtimestamp(moment).astimezone().strftime(form)
    except (ValueError, OverflowError, OSError):
        return "-"
