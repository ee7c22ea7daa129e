"""Load a manifest directory and check it completely: YAML, schemas, names, references, policies.

Every problem is collected as a `Diagnostic` with file, line, column and field path; `load`
raises one `ManifestError` carrying all of them, or returns the `ManifestSet`. Nothing here
touches the device.

Per-document checks (YAML, schema, cron syntax, control characters) depend only on a file's
bytes, so their result is cached by content hash: a no-op plan over a large repository parses
and schema-checks nothing. Timers' calendar events are checked by systemd itself: the events of
every file not in the cache go to one `systemd-analyze calendar` run (reconciler/systemctl.py).
Where it is not installed they are not checked, the loaded set says so in `notes`, and those
files are not cached, so a later run with systemd checks them. Checks across documents
(duplicates, references) always run, on each manifest's `Refs` rather than its spec; policies,
which judge each manifest on its own, judge only files they have not passed before. A cached
file's specs are decoded only when something reads them (see `_Cache`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import marshal
import math
import os
import re
import sys
import weakref
import zlib
from contextlib import suppress
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from reconciler import __version__, cronexpr, units
from reconciler.diagnostics import Diagnostic
from reconciler.errors import ManifestError, SposError
from reconciler.manifest import API_VERSION, KINDS, Manifest, ManifestSet, Refs, dotted_path
from reconciler.source import (
    Document, content_digest, discover, display_name, locate, parse, read_bounded, schemas_path,
)

SCHEMA_FILES = {kind: f"{kind.lower()}.schema.json" for kind in KINDS}
_CACHE_FORMAT = 7  # 7: an index of kinds, names and refs; documents in a tokened data file


def load(
    manifest_dir: str | os.PathLike,
    policy_dir: str | os.PathLike | None = None,
    cache_file: str | os.PathLike | None = None,
    known: dict[str, tuple[str, str]] | None = None,
    listed: dict[str, list[str]] | None = None,
    stage: Callable[..., None] | None = None,
    advance: Callable[[], None] | None = None,
    ahead: "ReadAhead | None" = None,
) -> ManifestSet:
    """Every manifest under `manifest_dir`, checked against the schemas and `policy_dir`.

    Raises ManifestError with every problem found. `cache_file`, when given, stores the result
    of per-document checks by content hash; it is best effort and never required. `known` maps
    a file's path (as discovered) to its display name and content hash, just taken by
    `memo.fingerprint`: such a file is not read again when the cache holds its documents.
    `listed` maps a directory (as given) to the files `memo.fingerprint` found in it.
    `stage(text, total)` is told each step as it starts (`total`: how many files it checks, or
    None) and `advance()` each file checked, for a long load to show its progress.
    `ahead` holds the manifests of files of `known` read from the cache before (`ReadAhead`).
    """
    run = _Run(cache_file, known or {}, listed or {}, stage or (lambda text, total=None: None),
               advance or (lambda: None), ahead.found if ahead is not None else {})
    run.read_directory(manifest_dir, role="manifests")
    if policy_dir is not None:  # named but missing is a problem: no guardrails would apply
        run.read_directory(policy_dir, role="policies")
    run.check_calendars()
    run.stage("Checking across documents...", None)
    run.check_across_documents()
    run.save_cache()
    if run.diagnostics:
        raise ManifestError(run.diagnostics)
    manifest_set = ManifestSet(run.manifests, notes=run.notes)
    manifest_set.digest = run.digest()
    return manifest_set


def prime_cache(cache_file: str | os.PathLike, known: dict[str, tuple[str, str]],
                policy_paths: set[str] = frozenset()) -> int:
    """Parse and check, as `load` does file by file, the files of `known` (path -> (display
    name, content hash), as `memo.fingerprint` gives them) that the cache at `cache_file` does
    not hold, and cache those that pass: `load` then finds them there and neither parses nor
    checks them again. Problems are neither reported nor cached (`load` finds them again).
    Paths in `policy_paths` are read as policies. Returns how many files were read."""
    run = _Run(cache_file, known, {}, lambda text, total=None: None, lambda: None)
    missing = [path for path, (_, digest) in known.items() if run.cache.files.get(digest) is None]
    for path in missing:
        run.read_file(path, role="policies" if path in policy_paths else "manifests")
    run.check_calendars()
    if missing:
        run.cache.save(keep={digest for _, digest in known.values()})
    return len(missing)


class ReadAhead:
    """The manifests of the files of `known` (as `load` takes it) that the cache holds, read
    before `load` is called: while another process parses and caches the files it does not
    hold (`prime_cache`), this one reads the rest. What is read stays valid when that process
    adds to the cache or compacts it: each manifest reads its spec through the data file as it
    was opened here."""

    def __init__(self, cache_file: str | os.PathLike, known: dict[str, tuple[str, str]]):
        cache = _Cache(cache_file)
        self.found: dict[str, list[Manifest]] = {}
        for path, (display, digest) in known.items():
            manifests = cache.manifests(display, digest, path)
            if manifests is not None:
                self.found[path] = manifests


def schema_dir() -> Path:
    """The JSON Schemas: beside the package in a checkout, inside it once installed."""
    return Path(schemas_path())


class _Run:
    """The state of one load: files seen, manifests accepted, problems found."""

    def __init__(self, cache_file, known: dict[str, tuple[str, str]],
                 listed: dict[str, list[str]], stage, advance, ahead=None):
        self.known, self.listed, self.ahead = known, listed, ahead or {}
        self.stage, self.advance = stage, advance
        self.diagnostics: list[Diagnostic] = []
        self.manifests: list[Manifest] = []
        self.candidates: list[Manifest] = []
        self.file_hashes: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.paths: dict[str, str] = {}
        self.roles: dict[str, str] = {}
        self.schemas: _Schemas | None = None
        self.cache = _Cache(cache_file)
        self.calendars: list[_Calendars] = []
        self.notes: list[str] = []
        self.cwd = os.path.realpath(os.getcwd())

    def read_directory(self, given: str | os.PathLike, role: str) -> None:
        directory = Path(given)
        if not directory.is_dir():
            summary = (f"expected the {role} directory, got a file" if directory.exists()
                       else f"{role} directory does not exist")
            self.diagnostics.append(Diagnostic(str(directory), 1, 1, summary))
            return
        paths = self.listed.get(os.fspath(given))
        if paths is None:
            unlisted: list[tuple[str, str, str]] = []
            paths = discover(directory, unlisted)
            for path, summary, hint in unlisted:
                self.diagnostics.append(Diagnostic(path, 1, 1, summary, hint=hint))
        noun = {"manifests": "manifest", "policies": "policy"}.get(role, role)
        self.stage(f"Checking {len(paths)} {noun} file{'' if len(paths) == 1 else 's'}...", len(paths))
        for path in paths:
            self.read_file(path, role)
            self.advance()

    def read_file(self, path: str, role: str) -> None:
        display, digest = self.known.get(path, (None, None))
        cached = self.ahead.get(path)
        if cached is None and digest:
            cached = self.cache.manifests(display, digest, path)
        raw = None
        if cached is None:
            display = display_name(path, self.cwd)
            raw, unreadable = read_bounded(path)
            if unreadable:
                self.paths[display] = path
                self.diagnostics.append(Diagnostic(display, 1, 1, unreadable))
                return
            digest = hashlib.sha256(raw).hexdigest()
            cached = self.cache.manifests(display, digest, path)
        self.paths[display] = path
        self.file_hashes[display] = digest
        self.roles[display] = role
        if cached is not None:  # checked before: its manifests, specs read only if needed
            for manifest in cached:
                self.accept_manifest(manifest, role, valid=True)
            return
        text = self.text_of(display, raw)
        if text is None:
            self.diagnostics.append(Diagnostic(display, 1, 1, "file is not valid UTF-8"))
            return
        documents, problems = parse(text, display)
        invalid: set[int] = set()
        for document in documents:
            found = self.check_document(document, text)
            if found:
                invalid.add(document.index)
            problems.extend(found)
        events = [(document, path, event) for document in documents
                  if document.index not in invalid and _kind_of(document.data) == "Schedule"
                  for path, event in _calendar_events(document.data["spec"])]
        if events:  # checked, and the file cached, once every file has been read
            self.calendars.append(_Calendars(display, digest, documents, events, not problems))
        elif not problems:
            self.cache.put(digest, documents)
        self.diagnostics.extend(problems)
        for document in documents:
            self.accept(document, role, valid=document.index not in invalid, origin=digest)

    def accept(self, document: Document, role: str, valid: bool, origin: str = "") -> None:
        data = document.data
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            return
        if data.get("kind") not in KINDS or not isinstance(data["metadata"].get("name"), str):
            return
        manifest = Manifest.from_document(data, document.file, document.index, document.line,
                                          origin=f"{origin}:{document.index}" if origin else "")
        self.accept_manifest(manifest, role, valid)

    def accept_manifest(self, manifest: Manifest, role: str, valid: bool) -> None:
        self.candidates.append(manifest)
        wrong_place = (manifest.kind == "Policy") != (role == "policies")
        if wrong_place:
            where = "policies/" if manifest.kind == "Policy" else "the manifests directory"
            self.report(manifest, ("kind",), f"{manifest.kind} documents belong in {where}")
        elif valid:
            self.manifests.append(manifest)

    def check_document(self, document: Document, text: str) -> list[Diagnostic]:
        problems = []
        for path, summary, hint in _document_problems(document.data, self.schema_checker):
            line, col = locate(text, document.index, path)
            problems.append(Diagnostic(document.file, line, col, summary, dotted_path(path), hint))
        return problems

    def check_calendars(self) -> None:
        """Every calendar event of the files just read, in one `systemd-analyze calendar` run."""
        if not self.calendars:
            return
        from reconciler.systemctl import CalendarsUnchecked, check_calendars

        try:
            refused = check_calendars([event for c in self.calendars for _, _, event in c.events])
        except CalendarsUnchecked as exc:
            self.notes.append(
                f"timers' onCalendar values were not checked ({exc}): systemd checks them when it "
                "loads the units. Validate where systemd is installed to check them now.")
            return
        for calendars in self.calendars:
            bad = [(document, path, event) for document, path, event in calendars.events
                   if event in refused]
            for document, path, event in bad:
                line, col = locate(self.text_of(calendars.display), document.index, path)
                self.diagnostics.append(Diagnostic(
                    calendars.display, line, col,
                    f"{event!r} is not a calendar event systemd can use: {refused[event]}",
                    dotted_path(path),
                    "write a systemd.time(7) event such as 'Mon..Fri *-*-* 08:00:00', "
                    "'*-*-* 04:00 Europe/Berlin' or 'daily'; `systemd-analyze calendar EVENT` "
                    "shows how systemd reads it"))
            if not bad and calendars.clean:
                self.cache.put(calendars.digest, calendars.documents)

    def schema_checker(self, kind: str):
        if self.schemas is None:
            self.schemas = _Schemas(schema_dir())
        return self.schemas.validator(kind)

    def check_across_documents(self) -> None:
        for manifest, path, summary, hint in _duplicates(self.candidates):
            self.report(manifest, path, summary, hint)
        for manifest, path, summary, hint in _duplicate_webhook_paths(self.candidates):
            self.report(manifest, path, summary, hint)
        for manifest, path, summary, hint in _shared_serial_devices(self.candidates):
            self.report(manifest, path, summary, hint)
        for manifest, path, summary, hint in _shared_mqtt_client_ids(self.candidates):
            self.report(manifest, path, summary, hint)
        known = _index(self.candidates)
        for manifest, path, summary, hint in _dangling_references(self.manifests, known):
            self.report(manifest, path, summary, hint)
        self.check_policies()

    def check_policies(self) -> None:
        """Policies judge each manifest on its own, so a file that broke none of these exact
        policies (same files, same spos code) before does not need judging again."""
        from reconciler import policy
        from reconciler.memo import code_fingerprint

        policies = [m for m in self.manifests if m.kind == "Policy"]
        if not policies:
            return
        verdict = hashlib.sha256(code_fingerprint().encode())
        for display in sorted(self.roles):
            if self.roles[display] == "policies":
                verdict.update(f"{display}\0{self.file_hashes[display]}\n".encode())
        judged_by = verdict.hexdigest()
        judged = [m for m in self.manifests if m.kind != "Policy"
                  and not self.cache.judged(self.file_hashes[m.file], judged_by)]
        broken = set()
        for manifest, path, summary, hint in policy.violations(policies + judged,
                                                               calendar_interval):
            broken.add(manifest.file)
            self.report(manifest, path, summary, hint)
        for file in {m.file for m in judged} - broken:
            self.cache.mark_judged(self.file_hashes[file], judged_by)

    def report(self, manifest: Manifest, path: tuple, summary: str, hint: str = "") -> None:
        text = self.text_of(manifest.file)
        line, col = locate(text, manifest.index, path) if text else (manifest.line, 1)
        self.diagnostics.append(
            Diagnostic(manifest.file, line, col, summary, dotted_path(path), hint)
        )

    def text_of(self, display: str, raw: bytes | None = None) -> str | None:
        if display not in self.texts:
            if raw is None:
                with open(self.paths[display], "rb") as handle:
                    raw = handle.read()
            try:
                self.texts[display] = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return self.texts[display]

    def digest(self) -> str:
        return content_digest(self.file_hashes)

    def save_cache(self) -> None:
        self.cache.save(keep=set(self.file_hashes.values()))


class _Calendars(NamedTuple):
    """The calendar events of one file read (not cached) in this run, waiting to be checked."""

    display: str
    digest: str
    documents: list[Document]
    events: list[tuple[Document, tuple, str]]  # (document, field path, event)
    clean: bool  # no other problem: cache the file once its events pass


def _calendar_events(spec: Any) -> list[tuple[tuple, str]]:
    """(field path, event) for each onCalendar event of a Schedule's spec."""
    timer = spec.get("timer") if isinstance(spec, dict) else None
    calendar = timer.get("onCalendar") if isinstance(timer, dict) else None
    path = ("spec", "timer", "onCalendar")
    if isinstance(calendar, str):
        return [(path, calendar.strip())]
    if isinstance(calendar, list):
        return [((*path, index), event.strip()) for index, event in enumerate(calendar)
                if isinstance(event, str)]
    return []


CALENDAR_ITERATIONS = 200
"""How many elapses of a timer's calendar events are looked at for its shortest interval."""


def calendar_interval(events: tuple[str, ...]) -> float | None:
    """The shortest time between two elapses of a timer that fires at each of `events`, over
    their next CALENDAR_ITERATIONS elapses as systemd computes them, in UTC (`*:0/10`, or
    `["08:00", "08:00:30"]`, fire more often than they look). None when they elapse less than
    twice, or systemd-analyze cannot compute them here (a missing tool, or an event systemd
    refuses, which `check_calendars` reports)."""
    series = [_calendar_elapses(event) for event in events]
    if not series or any(elapses is None for elapses in series):
        return None
    # Past the last elapse listed for an event, its later ones are unknown: gaps stop there.
    horizon = min((elapses[-1] for elapses in series if len(elapses) == CALENDAR_ITERATIONS),
                  default=float("inf"))
    times = sorted({moment for elapses in series for moment in elapses if moment <= horizon})
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    return min(gaps) if gaps else None


@lru_cache(maxsize=1024)
def _calendar_elapses(event: str) -> tuple[float, ...] | None:
    from datetime import datetime, timezone

    from reconciler import forecast

    try:
        elapses = forecast.systemd_calendar(event, timezone.utc, datetime.now(timezone.utc),
                                            CALENDAR_ITERATIONS)
    except forecast.CalendarUnavailable:
        return None
    return tuple(moment.timestamp() for moment in elapses)


def _kind_of(data: Any) -> Any:
    return data.get("kind") if isinstance(data, dict) else None


def _document_problems(data: Any, schema_checker) -> Iterable[tuple[tuple, str, str]]:
    """(field path, summary, hint) for every problem a single document has on its own."""
    if not isinstance(data, dict):
        yield (), "a manifest must be a mapping with apiVersion, kind, metadata and spec", ""
        return
    yield from _unsafe_values(data, ())
    if data.get("apiVersion") != API_VERSION:
        yield ("apiVersion",), f"apiVersion must be {API_VERSION!r}, got {data.get('apiVersion')!r}", ""
        return
    kind = data.get("kind")
    if kind not in KINDS:
        yield ("kind",), f"unknown kind {kind!r}", _did_you_mean(kind, KINDS, f"kinds: {', '.join(KINDS)}")
        return
    yield from _schema_problems(data, schema_checker(kind))
    spec = data.get("spec")
    if kind == "Agent" and isinstance(spec, dict):
        yield from _step_name_problems(spec)
        yield from _hook_problems(spec)
    if kind == "Schedule" and isinstance(spec, dict):
        yield from _schedule_problems(spec)
        yield from _timer_problems(spec)
    if kind == "Quota" and isinstance(spec, dict):
        yield from _quota_problems(spec)
    if kind in ("Capability", "Policy") and isinstance(spec, dict):
        yield from _network_rule_problems(spec)


def _network_rule_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    """Network rules the schema's pattern lets through but that are no address (`1:2:3`)."""
    from reconciler.policy import destinations

    for section in ("allowed", "denied", "deny"):
        rules = spec.get(section).get("network") if isinstance(spec.get(section), dict) else None
        for index, rule in enumerate(rules if isinstance(rules, list) else ()):
            if not isinstance(rule, str):
                continue
            try:
                destinations(rule)
            except ValueError as exc:
                yield ("spec", section, "network", index), f"{rule!r} is not a network rule: {exc}", (
                    "write any, loopback, none, or an address or CIDR with an optional :port")


def _hook_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    """onSuccess / onFailure name tasks of the same agent."""
    tasks = spec.get("tasks")
    if not isinstance(tasks, dict):
        return
    for task_name, task in tasks.items():
        for hook in ("onSuccess", "onFailure"):
            names = task.get(hook) if isinstance(task, dict) else None
            for index, name in enumerate(names if isinstance(names, list) else ()):
                if isinstance(name, str) and name not in tasks:
                    yield ("spec", "tasks", task_name, hook, index), (
                        f"this agent has no task {name!r}"
                    ), _did_you_mean(name, tasks, f"its tasks: {', '.join(tasks)}")


def _step_name_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    """Step names are unique within a task: a resumed run continues at the step it names."""
    tasks = spec.get("tasks")
    for task_name, task in (tasks.items() if isinstance(tasks, dict) else ()):
        steps = task.get("steps") if isinstance(task, dict) else None
        seen: dict[str, int] = {}
        for index, step in enumerate(steps if isinstance(steps, list) else ()):
            name = step.get("name") if isinstance(step, dict) else None
            if not isinstance(name, str):
                continue
            if name in seen:
                yield ("spec", "tasks", task_name, "steps", index, "name"), (
                    f"duplicate step name {name!r}: also the name of steps[{seen[name]}]"
                ), "step names must be unique within a task; a resumed run continues at a step by name"
            else:
                seen[name] = index


def _schedule_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    expression = spec.get("cron")
    if isinstance(expression, str):
        try:
            cronexpr.validate(expression)
        except cronexpr.CronSyntaxError as exc:
            yield ("spec", "cron"), f"invalid cron expression {expression!r}: {exc}", ""
    zone = spec.get("timeZone")
    if isinstance(zone, str) and "cron" in spec:
        if not _is_time_zone(zone):
            yield ("spec", "timeZone"), f"unknown time zone {zone!r}", "use an IANA name such as Europe/Berlin or UTC"
        elif expression and expression.strip().lower() == cronexpr.REBOOT:
            yield ("spec", "timeZone"), "timeZone has no meaning for @reboot", ""


_TIMER_SPANS = ("onBootSec", "onUnitActiveSec", "randomizedDelaySec", "accuracy")
_LONGEST_SPAN_SECONDS = (2**63 - 1) / 1_000_000
"""systemd counts time spans in microseconds; past 2**63 it overflows (about 292,000 years)."""


def _timer_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    """What the schema lets through but systemd cannot take in a timer unit (calendar events
    themselves are checked by systemd, see `_Run.check_calendars`)."""
    timer = spec.get("timer")
    if not isinstance(timer, dict):
        return
    for path, event in _calendar_events(spec):
        if "\\" in event:
            yield path, f"{event!r} contains a backslash", (
                "calendar events never need one, and at the end of a unit file line it would "
                "join the next line to this one")
    for field in _TIMER_SPANS:
        value = timer.get(field)
        try:
            seconds = units.seconds(value) if isinstance(value, str) else None
        except ValueError:
            continue  # the schema says what is wrong with it
        if seconds is not None and seconds > _LONGEST_SPAN_SECONDS:
            yield ("spec", "timer", field), f"{value!r} is longer than a systemd timer can count", (
                "systemd time spans end at 106751991d")
        elif field == "onUnitActiveSec" and seconds == 0:
            yield ("spec", "timer", field), (
                "an interval of 0 would start the task again as soon as it starts"), (
                "give an interval longer than 0, e.g. 15m")


def _quota_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    """Limits of zero let nothing run, and systemd cannot set them."""
    cpu, memory = spec.get("cpu"), spec.get("memory")
    try:
        if isinstance(cpu, str) and round(units.percent(cpu), 2) == 0:
            yield ("spec", "cpu"), f"{cpu!r} is below the smallest CPU limit, 0.01%", (
                "a CPU limit of 0 lets nothing run; leave cpu out for no limit")
        if isinstance(memory, (str, int, float)) and not isinstance(memory, bool) \
                and units.size_bytes(memory) == 0:
            yield ("spec", "memory"), "a memory limit of 0 lets nothing run", (
                "leave memory out for no limit")
    except ValueError:
        return  # the schema says what is wrong with it


_TIME_ZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
"""An IANA key: ASCII words separated by single slashes. It reaches the crontab line, so no
path tricks (leading '/', '..', '.') and nothing a shell or cron would read."""


def _is_time_zone(name: str) -> bool:
    import zoneinfo

    if not _TIME_ZONE.fullmatch(name):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _unsafe_values(value: Any, path: tuple) -> Iterable[tuple[tuple, str, str]]:
    """Newlines, NUL and other control characters would let a value inject lines into a crontab
    or unit file; they are refused in every string a manifest holds, the C1 ones (U+0080 to
    U+009F) and Unicode's line and paragraph separators (U+2028, U+2029) too, which some readers
    take for line breaks. So are `.inf` and `.nan`, which no field means and JSON cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, f"{value} is not a finite number", ""
    elif isinstance(value, str):
        bad = sorted({c for c in value if c != "\t" and (
            ord(c) < 32 or 127 <= ord(c) <= 159 or c in "\u2028\u2029")})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            yield path, f"control characters ({shown}) are not allowed in manifest strings", (
                "newlines and NUL could inject lines into crontab or unit files; write one line")
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _unsafe_values(key, path)
            yield from _unsafe_values(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _unsafe_values(child, (*path, index))


_PATTERN_MESSAGES = {
    "^[a-z0-9][a-z0-9_-]*$": (
        "is not a valid name",
        "use lowercase letters, digits, '-' and '_', starting with a letter or digit; names "
        "become file names and crontab lines on the device",
    ),
    "^([0-9]+(ms|s|m|h|d))+$": ("is not a duration", "write e.g. 90s, 5m, 2h, 1h30m or 7d"),
    "^[0-9]+(K|M|G|T|Ki|Mi|Gi|Ti)?$": ("is not a size", "write e.g. 512M, 2G or 1Gi"),
    "^[0-9]+(\\.[0-9]+)?%$": ("is not a percentage", "write e.g. 50% (half a CPU) or 150%"),
    "^[a-z_][a-z0-9_-]{0,31}$": (
        "is not a valid user name",
        "lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32",
    ),
    "^[A-Za-z_][A-Za-z0-9_]*$": (
        "is not a valid environment variable name",
        "letters, digits and '_', not starting with a digit",
    ),
    "^[^%]*$": (
        "contains '%'",
        "systemd reads '%' in a unit file as a specifier; calendar events never need one",
    ),
    "^/": ("is not an absolute path", "start it with '/'"),
    "^/dev/": ("is not a device path", "device nodes are under /dev, e.g. /dev/ttyUSB0"),
}
_DEPENDENCY_HINTS = {
    "timeZone": "for a timer, write the zone inside onCalendar, e.g. '*-*-* 09:00 Europe/Berlin'",
}
_TYPE_NOUNS = {"object": "mapping", "array": "list", "integer": "integer", "number": "number",
               "string": "string", "boolean": "boolean", "null": "null"}


def _schema_problems(data: dict, validator) -> Iterable[tuple[tuple, str, str]]:
    seen = set()  # jsonschema reports each missing field of one `required` as its own error
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        for problem in _explain(error):
            if problem not in seen:
                seen.add(problem)
                yield problem


def _explain(error) -> Iterable[tuple[tuple, str, str]]:
    """Turn a jsonschema error into messages a person can act on."""
    path = tuple(error.absolute_path)
    kind = error.validator
    instance = error.instance
    expected = error.validator_value
    if "propertyNames" in error.absolute_schema_path:
        path = (*path, instance)  # the key itself is wrong: point at it
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(error.schema.get("properties", {}))
        for key in _unexpected_keys(instance, error.schema):
            yield (*path, key), f"unknown field {key!r}", _did_you_mean(
                key, allowed, f"allowed here: {', '.join(allowed)}" if allowed else "")
    elif kind == "required":
        missing = [name for name in expected if name not in instance]
        for name in missing:
            yield path, f"missing required field {name!r}", ""
    elif kind == "dependentRequired":
        for name, needs in expected.items():
            missing = [need for need in needs if name in instance and need not in instance]
            if missing:
                yield (*path, name), f"{name} is only allowed together with {' and '.join(missing)}", \
                    _DEPENDENCY_HINTS.get(name, "")
    elif kind in ("oneOf", "anyOf") and _alternatives(expected):
        if not isinstance(instance, dict):
            return  # the type error says what is wrong
        names = _alternatives(expected)
        present = [n for n in names if n in instance]
        choice = ", ".join(repr(n) for n in names)
        if present:
            yield path, f"set exactly one of {choice}; found {', '.join(map(repr, present))}", ""
        else:
            yield path, f"set one of {choice}", ""
    elif kind in ("oneOf", "anyOf") and error.context:
        from jsonschema.exceptions import best_match

        best = best_match([error])  # descends to the branch error that explains most
        if best is not error:
            yield from _explain(best)
        elif all(branch.validator == "type" for branch in error.context):
            yield _type_problem(path, [branch.validator_value for branch in error.context], instance)
        else:
            yield path, error.message, ""
    elif kind == "not" and isinstance(expected, dict) and expected.get("description"):
        yield path, expected["description"], ""
    elif kind == "pattern" and expected in _PATTERN_MESSAGES:
        what, hint = _PATTERN_MESSAGES[expected]
        yield path, f"{_shown(instance)} {what}", hint
    elif kind == "pattern":
        yield path, f"{_shown(instance)} is not in the required form", _form_hint(error.schema)
    elif kind == "enum":
        options = [str(o) for o in expected]
        yield path, f"{_shown(instance)} is not one of {', '.join(options)}", _did_you_mean(
            str(instance), options, "")
    elif kind == "type":
        yield _type_problem(path, expected if isinstance(expected, list) else [expected], instance)
    elif kind in ("minLength", "minItems", "minProperties") and expected == 1:
        yield path, "must not be empty", ""
    elif kind == "minItems":
        yield path, f"needs at least {expected} items, has {len(instance)}", ""
    elif kind == "maxItems":
        yield path, f"may hold at most {expected} items, has {len(instance)}", ""
    elif kind == "maxLength":
        yield path, f"{_shown(instance)} is longer than {expected} characters", ""
    elif kind == "uniqueItems" and isinstance(instance, list):
        repeated = next(v for i, v in enumerate(instance) if v in instance[:i])
        yield path, f"{_shown(repeated)} is listed more than once", ""
    else:
        yield path, error.message, ""


def _type_problem(path: tuple, wanted: list[str], instance: Any) -> tuple[tuple, str, str]:
    nouns = " or ".join(_TYPE_NOUNS.get(t, t) for t in wanted)
    hint = ""
    if "string" in wanted and isinstance(instance, (bool, int, float)):
        hint = f"quote it: {json.dumps(json.dumps(instance))}"
    return path, f"expected {_article(nouns)}, got {_json_type(instance)}", hint


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _form_hint(schema: dict) -> str:
    """What a value of `schema` looks like, from its description and examples."""
    hint = schema.get("description", "")
    examples = schema.get("examples")
    if examples:
        hint = f"{hint} e.g. {', '.join(map(str, examples[:3]))}".strip()
    return hint


def _unexpected_keys(instance: dict, schema: dict) -> list[str]:
    properties = schema.get("properties", {})
    patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
    return [
        key for key in instance
        if key not in properties and not any(p.search(str(key)) for p in patterns)
    ]


def _alternatives(branches: list) -> list[str]:
    """For the `oneOf: [{required: [a]}, {required: [b]}]` idiom: ['a', 'b']."""
    names = []
    for branch in branches:
        required = branch.get("required") if isinstance(branch, dict) else None
        if not required or len(required) != 1:
            return []
        names.append(required[0])
    return names


def _duplicates(manifests: list[Manifest]):
    first: dict[tuple[str, str], Manifest] = {}
    for manifest in manifests:
        key = (manifest.kind, manifest.name)
        if key in first:
            yield manifest, ("metadata", "name"), (
                f"duplicate {manifest.kind} {manifest.name!r}: also defined at {first[key].where}"
            ), ""
        else:
            first[key] = manifest


def _duplicate_webhook_paths(manifests: list[Manifest]):
    """The trigger daemon routes a request by its path: one webhook Trigger per path."""
    return _one_trigger_each(manifests, lambda refs: refs.webhook, ("spec", "webhook", "path"),
                             lambda path, first: (f"webhook path {path!r} is already used by "
                                                  f"Trigger {first.name!r} at {first.where}", ""))


def _shared_serial_devices(manifests: list[Manifest]):
    """A byte read from a serial device goes to one reader only: two Triggers on one device
    would each get part of its lines."""
    return _one_trigger_each(
        manifests, lambda refs: refs.serial, ("spec", "serial", "device"),
        lambda device, first: (
            f"serial device {device!r} is already read by Trigger {first.name!r} at {first.where}",
            "each byte a device sends goes to one reader: use one Trigger per device (mode "
            "line, and let its task tell lines apart)"))


def _shared_mqtt_client_ids(manifests: list[Manifest]):
    """A broker keeps one connection per client id and drops the older one when another
    connects: two Triggers with one clientId would take turns being connected, each losing
    messages while the other holds the id."""
    return _one_trigger_each(
        manifests, lambda refs: refs.mqtt_client, ("spec", "mqtt", "clientId"),
        lambda key, first: (
            f"MQTT client id {key.split(' ', 1)[1]!r} on {key.split(' ', 1)[0]} is already used "
            f"by Trigger {first.name!r} at {first.where}",
            "a broker keeps one connection per client id: give each Trigger its own clientId, "
            "or leave it out and let the broker assign one"))


def _one_trigger_each(manifests: list[Manifest], key, path: tuple, problem):
    """(manifest, path, summary, hint) for each Trigger whose `key(refs)` an earlier Trigger
    already has; `problem(value, earlier)` says what is wrong."""
    first: dict[str, Manifest] = {}
    for manifest in manifests:
        value = key(manifest.refs) if manifest.kind == "Trigger" else None
        if value is None:
            continue
        if value in first:
            yield (manifest, path, *problem(value, first[value]))
        else:
            first[value] = manifest


def _index(manifests: list[Manifest]) -> dict[str, dict[str, Manifest]]:
    known: dict[str, dict[str, Manifest]] = {kind: {} for kind in KINDS}
    for manifest in manifests:
        known[manifest.kind].setdefault(manifest.name, manifest)
    return known


def _dangling_references(manifests: list[Manifest], known: dict[str, dict[str, Manifest]]):
    """Names that lead nowhere; read from each manifest's `refs`, not its spec."""
    for manifest in manifests:
        refs = manifest.refs
        if manifest.kind == "Agent":
            for field, kind in (("capability", "Capability"), ("quota", "Quota")):
                name = getattr(refs, field)
                if name is not None and name not in known[kind]:
                    defined = ", ".join(sorted(known[kind]))
                    otherwise = f"defined: {defined}" if defined else f"no {kind} is defined"
                    yield manifest, ("spec", field), f"{kind} {name!r} does not exist", \
                        _did_you_mean(name, known[kind], otherwise)
        elif manifest.kind in ("Schedule", "Trigger"):
            agent = known["Agent"].get(refs.agent)
            if agent is None:
                yield manifest, ("spec", "agent"), f"Agent {refs.agent!r} does not exist", \
                    _did_you_mean(refs.agent, known["Agent"], "")
                continue
            tasks = agent.refs.tasks
            if tasks is None:
                continue  # the Agent's own problems are reported where it is defined
            if refs.task not in tasks:
                yield manifest, ("spec", "task"), (
                    f"Agent {agent.name!r} has no task {refs.task!r}"
                ), _did_you_mean(refs.task, tasks, f"its tasks: {', '.join(map(str, tasks))}")


def _did_you_mean(word: Any, options: Iterable[str], otherwise: str) -> str:
    options = [str(o) for o in options]
    if isinstance(word, str):
        lowered = {o.lower(): o for o in options}
        if word.lower() in lowered:
            return f"did you mean {lowered[word.lower()]!r}?"
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]!r}?"
    return otherwise


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value!r}"
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)


class _Schemas:
    """The kind schemas, loaded once, cross-file references resolved by file name.

    Each document is checked twice over only when it is wrong. `jsonschema_rs` (compiled, and
    quick to import) first answers whether it is valid at all; only a document it refuses, or
    one holding a value it cannot read, goes through `jsonschema`, which reports every problem
    with the detail `_explain` turns into messages. Importing `jsonschema` and `referencing`
    costs about 0.2 s, more than the rest of an apply that changed one file; most checks never
    pay it. Where the two disagree, `jsonschema` is the judge: a refusal it cannot explain is
    no problem (tests/test_schema_engines.py keeps the two in step on every schema)."""

    BASE = "https://spos.invalid/schemas/"

    def __init__(self, directory: Path):
        self.directory = directory
        self.contents = {path.name: json.loads(path.read_text())
                         for path in sorted(directory.glob("*.schema.json"))}
        self.validators: dict[str, _KindSchema] = {}
        self._registry = None

    def validator(self, kind: str) -> "_KindSchema":
        if kind not in self.validators:
            self.validators[kind] = _KindSchema(self, SCHEMA_FILES[kind])
        return self.validators[kind]

    def quick(self, name: str):
        import jsonschema_rs

        return jsonschema_rs.Draft202012Validator(
            self.contents[name], base_uri=self.BASE + name, retriever=self._retrieve)

    def thorough(self, name: str):
        from jsonschema import Draft202012Validator

        if self._registry is None:
            from referencing import Registry, Resource
            from referencing.jsonschema import DRAFT202012

            self._registry = Registry().with_resources(
                (file, Resource.from_contents(contents, DRAFT202012))
                for file, contents in self.contents.items())
        return Draft202012Validator(self._registry.contents(name), registry=self._registry)

    def _retrieve(self, uri: str):
        if not uri.startswith(self.BASE) or uri[len(self.BASE):] not in self.contents:
            raise ValueError(f"{uri} is not one of spos's schemas")
        return self.contents[uri[len(self.BASE):]]


class _KindSchema:
    """One kind's schema: a quick verdict, and every error when the verdict is no."""

    def __init__(self, schemas: _Schemas, name: str):
        self.schemas, self.name = schemas, name
        self._quick = None
        self._thorough = None

    def surely_valid(self, data: Any) -> bool:
        if self._quick is None:
            self._quick = self.schemas.quick(self.name)
        try:
            return self._quick.is_valid(data)
        except (ValueError, TypeError, OverflowError):  # a value it cannot read: ask jsonschema
            return False

    def iter_errors(self, data: Any):
        if self.surely_valid(data):
            return iter(())
        if self._thorough is None:
            self._thorough = self.schemas.thorough(self.name)
        return self._thorough.iter_errors(data)


class _Cache:
    """Files that passed every per-document check, keyed by content hash alone: the same bytes
    parse the same wherever the file is and whatever the working directory.

    Two files, both spos's own state:

    - the index (`manifests.marshal`): per file, the kind, name and `Refs` of each of its
      manifests (what the checks across documents and the planner's inputs read), where its
      documents are in the data file, and the digest of the policies and spos code that last
      found nothing wrong with it (`judged`: those need not judge it again);
    - the data file (`manifests.data`): each file's documents, marshalled, appended once.

    Loading a repository in which one file changed decodes the index and that one file's
    documents, and appends one entry; the data file is rewritten without the entries no file
    uses only once they are most of it. A spec is read from the data file when first used
    (`Manifest.deferred`). The index names the data file's token (random, written at its start)
    and the length it had, and each entry its CRC: a data file replaced or cut short is not used, and a damaged entry is
    never read as valid: the file it stands for is read again (it must still have the content
    the entry was for), and both files are removed, for the next load to rebuild.

    Stored with `marshal` (plain data only; its format belongs to this Python version, which
    is part of the key): for 10,000 agents it is written ten times faster than as JSON. A
    damaged index is ignored and rewritten."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.data_path = self.path.with_suffix(".data") if self.path else None
        self.key = _cache_key()
        self.files: dict[str, list] = {}
        self.judgements: dict[str, str] = {}
        self.added: dict[str, bytes] = {}
        self.data_fd: int | None = None
        self.data_size = 0
        self.token = b""
        self.dirty = False
        self.damaged = False
        if self.path is None:
            return
        try:
            self.data_fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        weakref.finalize(self, os.close, self.data_fd)  # a daemon plans again and again
        try:
            stored = marshal.loads(self.path.read_bytes())
        except (OSError, ValueError, EOFError, TypeError):
            return
        if not (isinstance(stored, dict) and stored.get("key") == self.key):
            return
        st = os.fstat(self.data_fd)
        token = os.pread(self.data_fd, _TOKEN_BYTES, 0)
        if not (isinstance(stored.get("data"), list) and len(stored["data"]) == 2
                and stored["data"][0] == token and stored["data"][1] <= st.st_size):
            return  # another data file, or one cut short: nothing in it can be trusted
        self.token = token
        files, judgements = stored.get("files"), stored.get("judged")
        self.files = files if isinstance(files, dict) else {}
        self.judgements = judgements if isinstance(judgements, dict) else {}
        self.data_size = st.st_size

    def manifests(self, display: str, digest: str, path: str) -> list[Manifest] | None:
        """The manifests of the file with this content, their specs read on first use; None
        when it is not cached, or not as written. `path` is the file itself, read again should
        its entry in the data file turn out damaged."""
        entry = self.files.get(digest)
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], list)):
            return None
        offset, length, crc, heads = entry
        documents: dict[int, Any] = {}

        def body(index: int) -> tuple[dict, dict]:
            if not documents:
                documents.update(self._documents(display, digest, path))
            data = documents[index]
            return data.get("spec") or {}, data["metadata"].get("labels") or {}

        try:
            return [Manifest.deferred(kind, name, display, index, line, f"{digest}:{index}",
                                      Refs(*refs), partial(body, index))
                    for index, line, kind, name, refs in heads]
        except (TypeError, ValueError):  # not as written: parse the file again
            return None

    def _documents(self, display: str, digest: str, path: str) -> dict[int, Any]:
        """Index -> data of each document of a cached file: from the data file, or, when its
        entry is damaged, from the file again (which must still have this content)."""
        blob = self._blob(digest)
        if blob is not None:
            try:
                return {index: data for index, _, data in marshal.loads(blob)}
            except (ValueError, EOFError, TypeError):
                pass
        self.damaged = True  # rebuilt by the next load; this one reads the file itself
        for stale in (self.path, self.data_path):
            with suppress(OSError):
                os.unlink(stale)
        raw, unreadable = read_bounded(path)
        if unreadable or hashlib.sha256(raw).hexdigest() != digest:
            raise SposError(f"{display} changed while spos was reading the manifests (and the "
                            "manifest cache was damaged): run the command again")
        documents, problems = parse(raw.decode("utf-8"), display)
        if problems:
            raise SposError(f"{display}: {problems[0].summary}")
        return {document.index: document.data for document in documents}

    def _blob(self, digest: str) -> bytes | None:
        """A cached file's documents, marshalled; None when its entry is damaged."""
        if digest in self.added:
            return self.added[digest]
        offset, length, crc, _ = self.files[digest]
        try:
            blob = os.pread(self.data_fd, length, offset)
        except (OSError, TypeError, OverflowError):
            return None
        return blob if len(blob) == length and zlib.crc32(blob) == crc else None

    def put(self, digest: str, documents: list[Document]) -> None:
        if self.path is None:
            return
        heads = []
        for d in documents:
            data = d.data
            if (isinstance(data, dict) and isinstance(data.get("metadata"), dict)
                    and data.get("kind") in KINDS and isinstance(data["metadata"].get("name"), str)):
                kind = data["kind"]
                heads.append([d.index, d.line, kind, data["metadata"]["name"],
                              tuple(Refs.of(kind, data.get("spec") or {}))])
        blob = marshal.dumps([[d.index, d.line, d.data] for d in documents])
        self.added[digest] = blob
        self.files[digest] = [None, len(blob), zlib.crc32(blob), heads]
        self.dirty = True

    def judged(self, digest: str, judge: str) -> bool:
        return self.judgements.get(digest) == judge

    def mark_judged(self, digest: str, judge: str) -> None:
        if self.path is not None and digest in self.files and self.judgements.get(digest) != judge:
            self.judgements[digest] = judge
            self.dirty = True

    def save(self, keep: set[str]) -> None:
        """Append what was added, and write the index; best effort."""
        if self.path is None or self.damaged:
            return
        stale = set(self.files) - keep
        if not self.dirty and not stale:
            return
        for digest in stale:
            del self.files[digest]
            self.added.pop(digest, None)
        self.judgements = {d: j for d, j in self.judgements.items() if d in self.files}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            live = sum(entry[1] for entry in self.files.values())
            if self.data_fd is not None and self.data_size <= 2 * live + (1 << 20):
                fd, size = self._append()
            else:
                fd, size = self._rewrite()
            os.close(fd)
            payload = marshal.dumps({"key": self.key, "data": [self.token, size], "files": self.files,
                                     "judged": self.judgements})
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temp.write_bytes(payload)
            os.replace(temp, self.path)
        except OSError:
            pass

    def _append(self) -> tuple[int, int]:
        """Add the new entries at the end of the data file (O_APPEND: other writers' entries
        stay whole); the index is written after, so it never names what is not there."""
        fd = os.open(self.data_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        if os.pread(fd, _TOKEN_BYTES, 0) != self.token:  # compacted by another load meanwhile
            os.close(fd)
            return self._rewrite()
        for digest, blob in self.added.items():
            os.write(fd, blob)
            self.files[digest][0] = os.lseek(fd, 0, os.SEEK_CUR) - len(blob)
        return fd, os.fstat(fd).st_size

    def _rewrite(self) -> tuple[int, int]:
        """A new data file holding only the entries in use, in place of the old one. It starts
        with a random token, which its index names: an index is never read against another
        data file, even one that got the same inode."""
        blobs = [(digest, self.added.get(digest) or self._blob(digest)) for digest in self.files]
        if any(blob is None for _, blob in blobs):
            self.damaged = True
            raise OSError("the manifest cache's data file is damaged")
        temp = self.data_path.with_name(f".{self.data_path.name}.{os.getpid()}")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        self.token = os.urandom(_TOKEN_BYTES)
        os.write(fd, self.token)
        offset = _TOKEN_BYTES
        for digest, blob in blobs:
            os.write(fd, blob)
            self.files[digest][0] = offset
            offset += len(blob)
        os.replace(temp, self.data_path)
        # The offsets are the new file's now: specs not read yet must be read from it.
        if self.data_fd is not None:
            os.dup2(fd, self.data_fd, inheritable=False)
        else:
            self.data_fd = os.dup(fd)
            weakref.finalize(self, os.close, self.data_fd)
        return fd, os.fstat(fd).st_size


_TOKEN_BYTES = 16


def _cache_key() -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{__version__}:{sys.version}:{Refs._fields}".encode())
    for path in sorted(schema_dir().glob("*.schema.json")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
