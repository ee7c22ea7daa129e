"""Cron schedules on the device: one line per Schedule in `/etc/cron.d/spos-<agent>`.

Each managed line is preceded by a marker comment naming its resource id:

    # spos:managed cron/research-001-hourly
    0 * * * * root /usr/local/bin/spos action run --agent research-001 --task check ...

spos edits only marked lines. Anything else in the file (lines an operator added, comments,
blank lines, environment settings) is kept in place and in order. A file is deleted only when
nothing but spos's own lines would remain.

Debian's cron reads `/etc/cron.d` files whose names have no dot and that are not writable by
group or others, so files are named `spos-<agent>` and written 0644. A cron `%` means newline,
so one in a command is escaped; newlines never reach here (validation refuses them).
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Collection, Iterable

from reconciler import cronexpr
from reconciler.errors import UnsafePathError
from reconciler.manifest import Manifest, ManifestSet
from reconciler.resource import Change, Facts, Resource, digest

if TYPE_CHECKING:
    from reconciler.device import Device
    from reconciler.memo import PlanMemo

CRON_DIR = "/etc/cron.d"
FILE_PREFIX = "spos-"
FILE_MODE = "0644"
MARKER = "# spos:managed "
HEADER = "# spos:file "
SUSPENDED = "#suspended# "


def file_for(agent: str) -> str:
    return f"{CRON_DIR}/{FILE_PREFIX}{agent}"


def render_line(schedule: str, spec: dict, user: str, facts: Facts) -> str:
    """The crontab line for one Schedule. Pure."""
    expression = spec["cron"].strip()
    argv = facts.spos_argv("action", "run", "--quiet", "--agent", spec["agent"],
                           "--task", spec["task"], "--schedule", schedule)
    if spec.get("startingDeadline"):
        argv += ["--deadline", spec["startingDeadline"]]
    if spec.get("concurrency"):
        argv += ["--concurrency", spec["concurrency"]]
    zone = spec.get("timeZone")
    if zone and expression.lower() != cronexpr.REBOOT:
        argv += ["--cron", expression, "--cron-tz", zone]
        expression = cronexpr.widen_for_time_zone(cronexpr.parse(expression))
    command = shlex.join(argv).replace("%", "\\%")
    line = f"{expression} {user} {command}"
    return SUSPENDED + line if spec.get("suspend") else line


class CronKind:
    name = "cron"
    replace_on = ("file",)
    marked = True  # spos knows its lines by the marker above each

    def inputs(self, manifests: ManifestSet) -> dict[str, tuple[Manifest, ...]]:
        """Resource id -> every manifest its rendering reads (render.py relies on this). Pure."""
        agents = manifests.of_kind("Agent")
        return {
            f"cron/{schedule.name}": (schedule, agents[schedule.refs.agent])
            for schedule in manifests.of_kind("Schedule").values() if schedule.refs.cron
        }

    @staticmethod
    def starts(attrs: dict) -> tuple[str, str] | None:
        """The agent and task the line enqueues; None while it is suspended."""
        line = attrs.get("line") or ""
        if line.startswith(SUSPENDED):
            return None
        words = line.split()
        agent, task = option_value(words, "--agent"), option_value(words, "--task")
        return (agent, task) if agent and task else None

    def render(self, manifests: ManifestSet, facts: Facts,
               skip: Collection[str] = ()) -> Iterable[Resource]:
        """One resource per cron Schedule, but those whose id is in `skip`. Pure."""
        agents = manifests.of_kind("Agent")
        for schedule in manifests.of_kind("Schedule").values():
            if not schedule.refs.cron or f"cron/{schedule.name}" in skip:
                continue
            spec = schedule.spec
            user = agents[spec["agent"]].spec.get("user", "root")
            yield Resource(
                id=f"cron/{schedule.name}",
                kind=self.name,
                attrs={
                    "file": file_for(spec["agent"]),
                    "mode": FILE_MODE,
                    "line": render_line(schedule.name, spec, user, facts),
                },
                source=schedule.where,
            )

    def observe(self, device: "Device", ids: set[str], discover: bool = True,
                memo: "PlanMemo | None" = None) -> dict[str, Resource]:
        """Every marked line in spos's cron files (ids not found are absent).

        A marker found in more than one file (a file copied by hand) is one resource: the copy
        in its agent's own file, with the other files listed as `duplicates`. The desired form
        has no duplicates, so the plan shows them and apply removes them: a task never fires
        twice because of a stray copy. With a `memo`, a file with the stat it had when last
        read is not read again.
        """
        copies: dict[str, list[tuple[str, str, str, str]]] = {}
        for name in device.listdir(CRON_DIR):
            if not name.startswith(FILE_PREFIX):
                continue
            path = f"{CRON_DIR}/{name}"
            st = device.stat(path)
            if st is None:
                continue
            mode = format(st.st_mode & 0o7777, "04o")
            # {id: [line, digest of the line as found here]}: the digest is remembered too, so
            # an unchanged file costs a plan no JSON encoding (chmod moves the change time).
            entries = memo.lookup(f"cron:{name}", (st,)) if memo is not None else None
            if not _well_formed(entries):
                text = device.read_text(path)
                if text is None:
                    continue
                entries = {rid: [line, digest({"file": path, "mode": mode, "line": line})]
                           for rid, line in parse_entries(text).items()}
                if memo is not None:
                    memo.remember(f"cron:{name}", (st,), entries)
            for rid, (line, found_digest) in entries.items():
                copies.setdefault(rid, []).append((path, mode, line, found_digest))
        found = {}
        for rid, entries in copies.items():
            entries.sort(key=lambda entry: entry[0] != file_for(_agent_of(entry[2])))
            path, mode, line, found_digest = entries[0]
            attrs = {"file": path, "mode": mode, "line": line}
            if len(entries) > 1:
                attrs["duplicates"] = sorted(entry[0] for entry in entries[1:])
                found_digest = None
            found[rid] = Resource(rid, self.name, attrs, digest=found_digest)
        return found

    def apply(self, device: "Device", changes: list[Change]) -> Iterable[tuple[Change, str | None]]:
        """Edit each affected file once: the changed lines, nothing else."""
        edits: dict[str, dict[str, str | None]] = {}
        touched: dict[str, list[Change]] = {}

        def plan_edit(path: str, change: Change, line: str | None) -> None:
            edits.setdefault(path, {})[change.id] = line
            touched.setdefault(path, []).append(change)

        for change in changes:
            before = change.before or {}
            for stray in before.get("duplicates", []):
                plan_edit(stray, change, None)
            if change.action in ("delete", "replace"):
                plan_edit(before["file"], change, None)
            if change.after is not None:  # last, so a line kept in a file is not removed
                plan_edit(change.after["file"], change, change.after["line"])
        failed: dict[str, str] = {}
        for path, lines in edits.items():
            try:
                self._edit_file(device, path, lines)
            except (OSError, UnsafePathError) as exc:
                for change in touched[path]:
                    failed.setdefault(change.id, f"{path}: {exc}")
        for change in changes:
            yield change, failed.get(change.id)

    @staticmethod
    def _edit_file(device: "Device", path: str, lines: dict[str, str | None]) -> None:
        current = device.read_text(path)
        agent = path.rsplit("/", 1)[1][len(FILE_PREFIX):]
        updated = edit(current, lines, agent)
        if updated is None:
            device.remove(path)
        elif updated != current or _mode(device, path) != FILE_MODE:
            device.makedirs(CRON_DIR)
            device.write_atomic(path, updated.encode(), mode=int(FILE_MODE, 8))


def _agent_of(line: str) -> str:
    """The agent a rendered line enqueues for ('' when the line is not one of ours)."""
    return option_value(line.split(), "--agent") or ""


def option_value(words: list[str], option: str) -> str | None:
    """The word after `option` in a command spos rendered (agent and task names hold no
    spaces or quotes, so splitting on white space finds them)."""
    return words[words.index(option) + 1] if option in words[:-1] else None


def _mode(device: "Device", path: str) -> str | None:
    st = device.stat(path)
    return None if st is None else format(st.st_mode & 0o7777, "04o")


def _lines(text: str) -> list[str]:
    """The file's lines as cron reads them: broken at "\n" alone, so that a carriage return or
    a Unicode line separator in an operator's line stays in that line, as it was."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def parse_entries(text: str) -> dict[str, str]:
    """Managed resource id -> the line below its marker ('' when the marker ends the file)."""
    entries = {}
    lines = _lines(text)
    for index, line in enumerate(lines):
        if line.startswith(MARKER):
            rid = line[len(MARKER):].strip()
            following = lines[index + 1] if index + 1 < len(lines) else ""
            entries[rid] = "" if following.startswith(MARKER) else following
    return entries


def edit(text: str | None, changes: dict[str, str | None], agent: str) -> str | None:
    """`text` with each managed entry in `changes` replaced (str), removed (None) or appended.

    Unmarked lines keep their content and order. Returns None when only spos's own lines would
    remain, meaning the file should be deleted. Pure.
    """
    lines = _lines(text) if text else []
    out: list[str] = []
    done: set[str] = set()
    index = 0
    while index < len(lines):
        line = lines[index]
        rid = line[len(MARKER):].strip() if line.startswith(MARKER) else None
        if rid is None or rid not in changes:
            out.append(line)
            index += 1
            continue
        has_entry = index + 1 < len(lines) and not lines[index + 1].startswith(MARKER)
        index += 2 if has_entry else 1
        if changes[rid] is not None and rid not in done:
            out += [line, changes[rid]]
        done.add(rid)
    additions = [rid for rid, new in sorted(changes.items()) if new is not None and rid not in done]
    if not out and additions:
        out.append(f"{HEADER}entries for agent {agent}. Lines below a '{MARKER.strip()}' marker "
                   "belong to spos; all other lines are left as they are.")
    for rid in additions:
        out += [f"{MARKER}{rid}", changes[rid]]
    if all(not line.strip() or line.startswith(HEADER) for line in out):
        return None
    return "\n".join(out) + "\n"


KIND = CronKind()


def _well_formed(entries) -> bool:
    """Whether remembered entries are as observe() writes them (a damaged memo costs a read)."""
    return isinstance(entries, dict) and all(
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], str) for value in entries.values())
