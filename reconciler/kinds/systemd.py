"""Timer Schedules on the device: a systemd `.timer` and `.service` pair per Schedule.

A Schedule with `timer:` becomes `/etc/systemd/system/spos-schedule-<schedule>.timer`, which
starts `spos-schedule-<schedule>.service`, which runs `spos action execute` for the task (in the
foreground, with the sandbox, limits and retries the executor uses). Schedule names are unique,
so unit names never collide, and the `spos-schedule-` prefix keeps them apart from any other
unit. The service carries the agent's Quota as resource control and its Capability as
sandboxing, as far as systemd can say them (docs/systemd.md has the mapping and its limits).

One resource (`timer/<schedule>`) covers both files: they are written, changed and removed
together, and the timer is what gets enabled. Its attributes are each file's path, mode and
settings (section -> key -> value, a list for a repeated key), so a plan shows the settings that
change; comments and blank lines are not compared. Where spos activates units (systemd is the
init system and --root is /: see reconciler/systemctl.py), `enabled` says whether the timer is
wanted by timers.target, as `systemctl enable` leaves it.

Ownership: each file starts with `# spos:managed timer/<schedule>`. A file at one of these paths
without that first line is not spos's: it is never overwritten or deleted. Drop-ins
(`<unit>.d/*.conf`, what `systemctl edit` writes) are the operator's and are left alone.

Activation: deleting stops and disables the timer before its files go; after every kind has
applied, `finish` reloads systemd once and enables and starts new timers, restarts changed
ones, and stops suspended ones.

Escaping: names are `[a-z0-9][a-z0-9_-]*` and no manifest string holds a control character
(validation). Every value is written so that systemd reads it back exactly: `%` is doubled
(specifiers), ExecStart words and paths are quoted per systemd.syntax(7) when they need it, `$`
in ExecStart is doubled (variable expansion), and a control character, which none should hold,
is escaped rather than written.
"""

from __future__ import annotations

import posixpath
import re
import stat
from typing import TYPE_CHECKING, Collection, Iterable

from reconciler import STATE_DIR
from reconciler.errors import SposError, UnsafePathError
from reconciler.kinds.agent import compile_capability, compile_quota
from reconciler.kinds.cron import option_value
from reconciler.manifest import Manifest, ManifestSet
from reconciler.resource import Change, Facts, Resource

if TYPE_CHECKING:
    from reconciler.device import Device
    from reconciler.memo import PlanMemo

UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/timers.target.wants"
UNIT_PREFIX = "spos-schedule-"
SUFFIXES = ("timer", "service")
FILE_MODE = "0644"
MARKER = "# spos:managed "
NOTE = ("# Written by spos apply from the Schedule of the same name; it undoes edits to this "
        "file. Change the manifest, or add a drop-in (systemctl edit).")

_BARE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class NotOwnedError(SposError):
    """A unit file spos would write exists and is not spos's."""


def unit_name(schedule: str) -> str:
    return f"{UNIT_PREFIX}{schedule}"


def unit_path(schedule: str, suffix: str) -> str:
    return f"{UNIT_DIR}/{unit_name(schedule)}.{suffix}"


# ---------------------------------------------------------------- rendering (pure)

def render_units(schedule: Manifest, capability: dict | None, quota: dict | None,
                 facts: Facts) -> dict:
    """The timer and service of one timer Schedule: {suffix: {path, mode, sections}}. Pure."""
    spec = schedule.spec
    about = f"spos schedule {schedule.name}: task {spec['task']} of agent {spec['agent']}"
    if spec.get("suspend"):
        about += " (suspended)"
    timer_sections = {
        "Unit": {"Description": _text(about)},
        "Timer": _timer_settings(spec["timer"]),
    }
    if not spec.get("suspend"):
        timer_sections["Install"] = {"WantedBy": "timers.target"}
    command = _command(spec["agent"], spec["task"], facts)
    if spec.get("concurrency"):
        command += ["--concurrency", spec["concurrency"]]
    service = {"Type": "oneshot", "ExecStart": " ".join(_exec_word(word) for word in command)}
    service.update(resource_control(quota))
    service.update(sandboxing(capability, facts, command))
    return {
        "timer": _file(schedule.name, "timer", timer_sections),
        "service": _file(schedule.name, "service", {"Unit": {"Description": _text(about)},
                                                     "Service": service}),
    }


def _file(schedule: str, suffix: str, sections: dict) -> dict:
    return {"path": unit_path(schedule, suffix), "mode": FILE_MODE, "sections": sections}


def _timer_settings(timer: dict) -> dict:
    settings: dict = {}
    calendar = timer.get("onCalendar")
    if calendar is not None:
        events = [calendar] if isinstance(calendar, str) else calendar
        settings["OnCalendar"] = _one_or_many([_text(event.strip()) for event in events])
    for field, key in (("onBootSec", "OnBootSec"), ("onUnitActiveSec", "OnUnitActiveSec"),
                       ("randomizedDelaySec", "RandomizedDelaySec"), ("accuracy", "AccuracySec")):
        if field in timer:
            settings[key] = timer[field]
    if timer.get("persistent") and calendar is not None:  # systemd ignores it without one
        settings["Persistent"] = "true"
    return settings


def _command(agent: str, task: str, facts: Facts) -> list[str]:
    return facts.spos_argv("action", "execute", "--agent", agent, "--task", task)


_RESOURCE_CONTROL = (("cpuPercent", "CPUQuota"), ("memoryBytes", "MemoryMax"),
                     ("ioWeight", "IOWeight"), ("tasksMax", "TasksMax"), ("nice", "Nice"))


def resource_control(quota: dict | None) -> dict:
    """The Quota (compiled, see kinds/agent.py) as systemd resource-control settings. Pure.
    Storage limits and retention have no systemd setting; the executor keeps them."""
    settings = {}
    for field, key in _RESOURCE_CONTROL:
        value = (quota or {}).get(field)
        if value is not None:
            settings[key] = _cpu_quota(value) if field == "cpuPercent" else str(value)
    return settings


def _cpu_quota(percent: float) -> str:
    """systemd takes hundredths of a percent at most (validation refuses less than 0.01%)."""
    return format(round(percent, 2), "f").rstrip("0").rstrip(".") + "%"


def sandboxing(capability: dict | None, facts: Facts, command: list[str]) -> dict:
    """The Capability (compiled) as systemd sandboxing settings for the service. Pure.

    The service runs spos's executor, which builds the action's own sandbox inside it, so these
    settings bound what the executor can reach; reads and executables are narrowed by the
    executor alone (it needs Python, bubblewrap and its own package, wherever they are).
    """
    allowed = (capability or {}).get("allowed") or {}
    denied = (capability or {}).get("denied") or {}
    state = f"/{STATE_DIR}"  # run records, logs, outputs, the executor's locks: all spos's own
    writable = list(allowed.get("write") or [])
    settings: dict = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": _one_or_many([_path(_on_host(path, facts), "-") for path in (
            state, *(path for path in writable if not _within(path, state)))]),
    }
    read_only = [path for path in denied.get("write") or []
                 if any(_within(path, parent) for parent in writable)]
    if read_only:
        settings["ReadOnlyPaths"] = _one_or_many(
            [_path(_on_host(path, facts), "-") for path in read_only])
    hidden = [path for path in denied.get("read") or []
              if not any(_within(needed, path) for needed in (state, *_needed_by(command)))]
    if hidden:
        settings["InaccessiblePaths"] = _one_or_many(
            [_path(_on_host(path, facts), "-") for path in hidden])
    devices = list(allowed.get("devices") or [])
    if devices:
        settings["DevicePolicy"] = "closed"
        settings["DeviceAllow"] = _one_or_many([f"{_path(device)} rw" for device in devices])
    else:
        settings["PrivateDevices"] = "yes"
    settings.update(_network(allowed.get("network") or []))
    return settings


def _network(rules: list[str]) -> dict:
    """Only what the unit can say exactly: no network, or loopback only. Rules by address,
    port or host name are the executor's to enforce."""
    if all(rule == "none" for rule in rules):
        return {"IPAddressDeny": "any", "RestrictAddressFamilies": "AF_UNIX AF_NETLINK"}
    if all(rule in ("loopback", "none") for rule in rules):
        return {"IPAddressDeny": "any", "IPAddressAllow": "localhost"}
    return {}


def _needed_by(command: list[str]) -> list[str]:
    """Paths the service cannot run without (besides spos's state): the spos command's files
    and, beside its interpreter, the interpreter's library directory."""
    paths = [word for word in command if word.startswith("/")]
    if command and command[0].startswith("/"):
        paths.append(posixpath.join(posixpath.dirname(posixpath.dirname(command[0])), "lib"))
    return paths


def _within(path: str, parent: str) -> bool:
    path, parent = posixpath.normpath(path), posixpath.normpath(parent)
    return parent == "/" or path == parent or path.startswith(parent + "/")


def _on_host(path: str, facts: Facts) -> str:
    return path if facts.root == "/" else facts.root.rstrip("/") + path


def _one_or_many(values: list[str]) -> str | list[str]:
    """A setting given once is a string, repeated a list: as parse_unit reads a file back."""
    return values[0] if len(values) == 1 else values


def _text(value: str) -> str:
    """A free-text value (a description, a calendar event): specifiers escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value).replace("%", "%%")


def _exec_word(word: str) -> str:
    """One ExecStart argument as systemd.syntax(7) reads it back: bare when that is safe, else
    double-quoted with backslash escapes. `%` and `$` are doubled either way."""
    if not _BARE.match(word):
        escaped = word.replace("\\", "\\\\").replace('"', '\\"')
        word = '"' + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", escaped) + '"'
    return word.replace("%", "%%").replace("$", "$$")


def _path(path: str, prefix: str = "") -> str:
    """A path in a path-list setting (`-` prefix: ignore it when missing): quoted when it holds
    anything but plain path characters, `%` doubled."""
    value = prefix + path
    if not _BARE.match(value):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        value = '"' + _CONTROL.sub("?", escaped) + '"'  # no escape says a control character here
    return value.replace("%", "%%")


def unit_text(rid: str, unit: dict) -> str:
    """The file for one unit's attributes: marker, note, then each section. Pure."""
    lines = [f"{MARKER}{rid}", NOTE]
    for section, settings in unit["sections"].items():
        lines += ["", f"[{section}]"]
        for key, value in settings.items():
            lines += [f"{key}={item}" for item in (value if isinstance(value, list) else [value])]
    return "\n".join(lines) + "\n"


def parse_unit(text: str) -> dict:
    """Section -> key -> value (a list when the key repeats), as systemd reads the file: blank
    lines and comments skipped, whitespace around keys and values stripped. A line that is no
    setting is kept under the key "" so that it shows as a difference. Pure."""
    sections: dict[str, dict] = {}
    current: dict | None = None
    for raw in text.split("\n"):  # as systemd reads it; a Unicode line separator breaks no line
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        key, value = (key.strip(), value.strip()) if equals else ("", line)
        target = current if current is not None else sections.setdefault("", {})
        if key not in target:
            target[key] = value
        elif isinstance(target[key], list):
            target[key].append(value)
        else:
            target[key] = [target[key], value]
    return sections


def is_owned(text: str, rid: str) -> bool:
    return text.split("\n", 1)[0].rstrip() == f"{MARKER}{rid}"


# ---------------------------------------------------------------- the kind

class TimerKind:
    name = "timer"
    replace_on: tuple[str, ...] = ()
    marked = True  # spos knows its units by the marker on their first line

    def inputs(self, manifests: ManifestSet) -> dict[str, tuple[Manifest, ...]]:
        """Resource id -> every manifest its rendering reads (render.py relies on this). Pure."""
        agents = manifests.of_kind("Agent")
        capabilities, quotas = manifests.of_kind("Capability"), manifests.of_kind("Quota")
        found = {}
        for schedule in manifests.of_kind("Schedule").values():
            if not schedule.refs.timer:
                continue
            agent = agents[schedule.refs.agent]
            found[f"timer/{schedule.name}"] = tuple(m for m in (
                schedule, agent, capabilities.get(agent.refs.capability),
                quotas.get(agent.refs.quota)) if m is not None)
        return found

    @staticmethod
    def starts(attrs: dict) -> tuple[str, str] | None:
        """The agent and task the timer's service runs."""
        service = ((attrs.get("service") or {}).get("sections") or {}).get("Service") or {}
        command = service.get("ExecStart")
        words = command.split() if isinstance(command, str) else []
        agent, task = option_value(words, "--agent"), option_value(words, "--task")
        return (agent, task) if agent and task else None

    def render(self, manifests: ManifestSet, facts: Facts,
               skip: Collection[str] = ()) -> Iterable[Resource]:
        """One resource per timer Schedule, but those whose id is in `skip`. Pure."""
        agents = manifests.of_kind("Agent")
        capabilities, quotas = manifests.of_kind("Capability"), manifests.of_kind("Quota")
        for schedule in manifests.of_kind("Schedule").values():
            rid = f"timer/{schedule.name}"
            if not schedule.refs.timer or rid in skip:
                continue
            agent = agents[schedule.spec["agent"]]
            capability = capabilities.get(agent.spec.get("capability"))
            quota = quotas.get(agent.spec.get("quota"))
            attrs = render_units(
                schedule,
                compile_capability(capability.name, capability.spec) if capability else None,
                compile_quota(quota.name, quota.spec) if quota else None,
                facts,
            )
            if facts.activate_units:
                attrs["enabled"] = not schedule.spec.get("suspend", False)
            yield Resource(id=rid, kind=self.name, attrs=attrs, source=schedule.where)

    def observe(self, device: "Device", ids: set[str], discover: bool = True,
                memo: "PlanMemo | None" = None) -> dict[str, Resource]:
        """Every schedule with a unit file of spos's (marker first) at its path; `enabled` too
        where spos activates units. With a `memo`, a file with the stat it had when last read is
        not read again."""
        schedules = {rid.split("/", 1)[1] for rid in ids}
        if discover:
            for entry in device.listdir(UNIT_DIR):
                stem, _, suffix = entry.rpartition(".")
                if stem.startswith(UNIT_PREFIX) and suffix in SUFFIXES:
                    schedules.add(stem[len(UNIT_PREFIX):])
        wanted = set(device.listdir(WANTS_DIR)) if device.systemd is not None else None
        found = {}
        for schedule in sorted(schedules):
            rid = f"timer/{schedule}"
            files = {suffix: self._read(device, rid, unit_path(schedule, suffix), memo)
                     for suffix in SUFFIXES}
            if not any(files.values()):
                continue
            attrs: dict = dict(files)
            if wanted is not None:
                attrs["enabled"] = f"{unit_name(schedule)}.timer" in wanted
            found[rid] = Resource(rid, self.name, attrs)
        return found

    @staticmethod
    def _read(device: "Device", rid: str, path: str, memo: "PlanMemo | None") -> dict | None:
        try:
            st = device.stat(path)
        except UnsafePathError:
            return None  # a link is never spos's; writing it is refused in apply
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        name = f"unit:{path.rsplit('/', 1)[1]}"
        remembered = memo.lookup(name, (st,)) if memo is not None else None
        if remembered is None:
            text = device.read_text(path)
            if text is None:
                return None
            remembered = [parse_unit(text) if is_owned(text, rid) else None]
            if memo is not None:
                memo.remember(name, (st,), remembered)
        sections = remembered[0]
        if sections is None:
            return None
        return {"path": path, "mode": format(st.st_mode & 0o7777, "04o"), "sections": sections}

    def apply(self, device: "Device", changes: list[Change]) -> Iterable[tuple[Change, str | None]]:
        """Write or remove each Schedule's files. A delete first stops and disables the timer
        where spos activates units; everything else about activation waits for `finish`."""
        for change in changes:
            try:
                if change.action == "delete":
                    self._remove(device, change)
                else:
                    self._write(device, change)
            except (OSError, SposError) as exc:
                yield change, str(exc)
            else:
                yield change, None

    def finish(self, device: "Device", applied: list[Change]) -> Iterable[tuple[Change, str]]:
        """After every kind applied: one daemon-reload if a unit file changed, then enable and
        start new timers, restart changed ones, stop and disable suspended ones. Yields each
        change whose activation failed, with why; none where spos does not activate units."""
        systemd = device.systemd
        if systemd is None:
            return
        if any(_files_changed(change) for change in applied):
            try:
                systemd.run("daemon-reload")
            except SposError as exc:
                for change in applied:
                    yield change, f"systemd did not load the changed unit files: {exc}"
                return
        for change in applied:
            if change.action == "delete":
                continue
            try:
                _activate(systemd, change)
            except SposError as exc:
                yield change, f"unit files written, not activated: {exc}"

    @staticmethod
    def _write(device: "Device", change: Change) -> None:
        # Both files are checked before either is written: a Schedule refused for one that is
        # not spos's leaves nothing of its own behind that the plan did not show.
        currents = {}
        for suffix in ("service", "timer"):
            unit = change.after[suffix]
            current = currents[suffix] = device.read_text(unit["path"])
            if current is not None and not is_owned(current, change.id):
                raise NotOwnedError(
                    f"refusing to overwrite {unit['path']}: it is not spos's (its first line is "
                    f"not '{MARKER}{change.id}'); rename or remove it, or rename the Schedule")
        # The service first: a timer is never left pointing at a missing or old service.
        for suffix in ("service", "timer"):
            unit = change.after[suffix]
            text = unit_text(change.id, unit)
            current = currents[suffix]
            st = device.stat(unit["path"]) if current is not None else None
            mode = format(st.st_mode & 0o7777, "04o") if st is not None else None
            if current != text or mode != unit["mode"]:
                device.makedirs(UNIT_DIR)
                device.write_atomic(unit["path"], text.encode(), mode=int(unit["mode"], 8))

    @staticmethod
    def _remove(device: "Device", change: Change) -> None:
        before = change.before or {}
        systemd = device.systemd
        if systemd is not None and before.get("timer") is not None:
            systemd.run("disable", "--now", posixpath.basename(before["timer"]["path"]))
        for suffix in SUFFIXES:  # the timer first: it is what starts the service
            unit = before.get(suffix)
            if unit is None:
                continue
            current = device.read_text(unit["path"])
            if current is not None and is_owned(current, change.id):
                device.remove(unit["path"])


def _files_changed(change: Change) -> bool:
    before, after = change.before or {}, change.after or {}
    return any(before.get(suffix) != after.get(suffix) for suffix in SUFFIXES)


def _activate(systemd, change: Change) -> None:
    """Bring one written timer to the state its change asks for."""
    before, after = change.before or {}, change.after
    timer = posixpath.basename(after["timer"]["path"])
    wanted, was = after.get("enabled", False), before.get("enabled", False)
    if wanted and not was:
        systemd.run("enable", "--now", timer)
    elif wanted and before.get("timer") != after["timer"]:
        systemd.run("restart", timer)
    elif was and not wanted:
        systemd.run("disable", "--now", timer)


KIND = TimerKind()
