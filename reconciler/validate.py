"""Load a manifest directory and check it completely: YAML, schemas, names, references, policies.

Every problem is collected as a `Diagnostic` with file, line, column and field path; `load`
raises one `ManifestError` carrying all of them, or returns the `ManifestSet`. Nothing here
touches the device.

Per-document checks (YAML, schema, cron syntax, control characters) depend only on a file's
bytes, so their result is cached by content hash: a no-op plan over a large repository parses
and schema-checks nothing. Checks across documents (duplicates, references, policies) are cheap
and always run.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from reconciler import __version__, cronexpr
from reconciler.errors import Diagnostic, ManifestError
from reconciler.manifest import API_VERSION, KINDS, Manifest, ManifestSet
from reconciler.source import Document, discover, locate, parse

SCHEMA_FILES = {kind: f"{kind.lower()}.schema.json" for kind in KINDS}
_CACHE_FORMAT = 1


def load(
    manifest_dir: str | os.PathLike,
    policy_dir: str | os.PathLike | None = None,
    cache_file: str | os.PathLike | None = None,
) -> ManifestSet:
    """Every manifest under `manifest_dir`, checked against the schemas and `policy_dir`.

    Raises ManifestError with every problem found. `cache_file`, when given, stores the result
    of per-document checks by content hash; it is best effort and never required.
    """
    run = _Run(cache_file)
    run.read_directory(Path(manifest_dir), role="manifests")
    if policy_dir is not None and Path(policy_dir).is_dir():
        run.read_directory(Path(policy_dir), role="policies")
    run.check_across_documents()
    run.save_cache()
    if run.diagnostics:
        raise ManifestError(run.diagnostics)
    manifest_set = ManifestSet(run.manifests)
    manifest_set.digest = run.digest()
    return manifest_set


def schema_dir() -> Path:
    """The JSON Schemas: beside the package in a checkout, inside it once installed."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "schemas"
    return checkout if checkout.is_dir() else here / "schemas"


class _Run:
    """The state of one load: files seen, manifests accepted, problems found."""

    def __init__(self, cache_file):
        self.diagnostics: list[Diagnostic] = []
        self.manifests: list[Manifest] = []
        self.candidates: list[Manifest] = []
        self.file_hashes: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.schemas: _Schemas | None = None
        self.cache = _Cache(cache_file)

    def read_directory(self, directory: Path, role: str) -> None:
        if not directory.is_dir():
            self.diagnostics.append(
                Diagnostic(str(directory), 1, 1, f"{role} directory does not exist")
            )
            return
        for path in discover(directory):
            self.read_file(path, role)

    def read_file(self, path: Path, role: str) -> None:
        display = _display(path)
        self.paths[display] = path
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        self.file_hashes[display] = digest
        documents = self.cache.get(display, digest)
        problems: list[Diagnostic] = []
        if documents is None:
            text = self.text_of(display, raw)
            if text is None:
                self.diagnostics.append(Diagnostic(display, 1, 1, "file is not valid UTF-8"))
                return
            documents, problems = parse(text, display)
            for document in documents:
                problems.extend(self.check_document(document, text))
            if not problems:
                self.cache.put(display, digest, documents)
        self.diagnostics.extend(problems)
        for document in documents:
            self.accept(document, role, valid=not problems)

    def accept(self, document: Document, role: str, valid: bool) -> None:
        data = document.data
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            return
        if data.get("kind") not in KINDS or not isinstance(data["metadata"].get("name"), str):
            return
        manifest = Manifest.from_document(data, document.file, document.index, document.line)
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
            problems.append(Diagnostic(document.file, line, col, summary, _dotted(path), hint))
        return problems

    def schema_checker(self, kind: str):
        if self.schemas is None:
            self.schemas = _Schemas(schema_dir())
        return self.schemas.validator(kind)

    def check_across_documents(self) -> None:
        from reconciler import policy

        for manifest, path, summary, hint in _duplicates(self.candidates):
            self.report(manifest, path, summary, hint)
        known = _index(self.candidates)
        for manifest, path, summary, hint in _dangling_references(self.manifests, known):
            self.report(manifest, path, summary, hint)
        for manifest, path, summary, hint in policy.violations(self.manifests):
            self.report(manifest, path, summary, hint)

    def report(self, manifest: Manifest, path: tuple, summary: str, hint: str = "") -> None:
        text = self.text_of(manifest.file)
        line, col = locate(text, manifest.index, path) if text else (manifest.line, 1)
        self.diagnostics.append(
            Diagnostic(manifest.file, line, col, summary, _dotted(path), hint)
        )

    def text_of(self, display: str, raw: bytes | None = None) -> str | None:
        if display not in self.texts:
            if raw is None:
                raw = self.paths[display].read_bytes()
            try:
                self.texts[display] = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return self.texts[display]

    def digest(self) -> str:
        canonical = json.dumps(sorted(self.file_hashes.items())).encode()
        return "sha256:" + hashlib.sha256(canonical).hexdigest()

    def save_cache(self) -> None:
        self.cache.save(keep=self.file_hashes)


def _document_problems(data: Any, schema_checker) -> Iterable[tuple[tuple, str, str]]:
    """(field path, summary, hint) for every problem a single document has on its own."""
    if not isinstance(data, dict):
        yield (), "a manifest must be a mapping with apiVersion, kind, metadata and spec", ""
        return
    yield from _control_characters(data, ())
    if data.get("apiVersion") != API_VERSION:
        yield ("apiVersion",), f"apiVersion must be {API_VERSION!r}, got {data.get('apiVersion')!r}", ""
        return
    kind = data.get("kind")
    if kind not in KINDS:
        yield ("kind",), f"unknown kind {kind!r}", _did_you_mean(kind, KINDS, f"kinds: {', '.join(KINDS)}")
        return
    yield from _schema_problems(data, schema_checker(kind))
    spec = data.get("spec")
    if kind == "Schedule" and isinstance(spec, dict):
        yield from _schedule_problems(spec)


def _schedule_problems(spec: dict) -> Iterable[tuple[tuple, str, str]]:
    expression = spec.get("cron")
    if isinstance(expression, str):
        try:
            cronexpr.validate(expression)
        except cronexpr.CronSyntaxError as exc:
            yield ("spec", "cron"), f"invalid cron expression {expression!r}: {exc}", ""
    zone = spec.get("timeZone")
    if isinstance(zone, str):
        if "cron" not in spec:
            yield ("spec", "timeZone"), "timeZone applies to cron schedules only", (
                "for a timer, write the zone inside onCalendar, e.g. '*-*-* 09:00 Europe/Berlin'")
        elif not _is_time_zone(zone):
            yield ("spec", "timeZone"), f"unknown time zone {zone!r}", "use an IANA name such as Europe/Berlin or UTC"
        elif expression and expression.strip().lower() == cronexpr.REBOOT:
            yield ("spec", "timeZone"), "timeZone has no meaning for @reboot", ""


def _is_time_zone(name: str) -> bool:
    import zoneinfo

    if name.startswith(("/", ".")) or ".." in name or not all(c.isalnum() or c in "_+-/" for c in name):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _control_characters(value: Any, path: tuple) -> Iterable[tuple[tuple, str, str]]:
    """Newlines, NUL and other control characters would let a value inject lines into a crontab
    or unit file; they are refused in every string a manifest holds."""
    if isinstance(value, str):
        bad = sorted({c for c in value if ord(c) < 32 and c != "\t" or ord(c) == 127})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            yield path, f"control characters ({shown}) are not allowed in manifest strings", (
                "newlines and NUL could inject lines into crontab or unit files; write one line")
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _control_characters(key, path)
            yield from _control_characters(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _control_characters(child, (*path, index))


_PATTERN_MESSAGES = {
    "^[a-z0-9][a-z0-9_-]*$": (
        "is not a valid name",
        "use lowercase letters, digits, '-' and '_', starting with a letter or digit; names "
        "become file names and crontab lines on the device",
    ),
    "^([0-9]+(ms|s|m|h|d))+$": ("is not a duration", "write e.g. 90s, 5m, 2h, 1h30m or 7d"),
    "^[0-9]+(K|M|G|T|Ki|Mi|Gi|Ti)?$": ("is not a size", "write e.g. 512M, 2G or 1Gi"),
    "^[0-9]+(\\.[0-9]+)?%$": ("is not a percentage", "write e.g. 50% (half a CPU) or 150%"),
}


def _schema_problems(data: dict, validator) -> Iterable[tuple[tuple, str, str]]:
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        yield from _explain(error)


def _explain(error) -> Iterable[tuple[tuple, str, str]]:
    """Turn a jsonschema error into messages a person can act on."""
    path = tuple(error.absolute_path)
    kind = error.validator
    instance = error.instance
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(error.schema.get("properties", {}))
        for key in _unexpected_keys(instance, error.schema):
            yield (*path, key), f"unknown field {key!r}", _did_you_mean(
                key, allowed, f"allowed here: {', '.join(allowed)}" if allowed else "")
    elif kind == "required":
        missing = [name for name in error.validator_value if name not in instance]
        for name in missing:
            yield path, f"missing required field {name!r}", ""
    elif kind in ("oneOf", "anyOf") and _alternatives(error.validator_value):
        names = _alternatives(error.validator_value)
        present = [n for n in names if isinstance(instance, dict) and n in instance]
        choice = ", ".join(repr(n) for n in names)
        if present:
            yield path, f"set exactly one of {choice}; found {', '.join(map(repr, present))}", ""
        else:
            yield path, f"set one of {choice}", ""
    elif kind in ("oneOf", "anyOf") and error.context:
        from jsonschema.exceptions import best_match

        yield from _explain(best_match(error.context))
    elif kind == "pattern" and error.validator_value in _PATTERN_MESSAGES:
        what, hint = _PATTERN_MESSAGES[error.validator_value]
        yield path, f"{instance!r} {what}", hint
    elif kind == "enum":
        options = [str(o) for o in error.validator_value]
        yield path, f"{instance!r} is not one of {', '.join(options)}", _did_you_mean(
            str(instance), options, "")
    elif kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        yield path, f"expected {_article(expected)}, got {_json_type(instance)}", ""
    else:
        yield path, error.message, ""


def _unexpected_keys(instance: dict, schema: dict) -> list[str]:
    import re

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


def _index(manifests: list[Manifest]) -> dict[str, dict[str, Manifest]]:
    known: dict[str, dict[str, Manifest]] = {kind: {} for kind in KINDS}
    for manifest in manifests:
        known[manifest.kind].setdefault(manifest.name, manifest)
    return known


def _dangling_references(manifests: list[Manifest], known: dict[str, dict[str, Manifest]]):
    for manifest in manifests:
        spec = manifest.spec
        if manifest.kind == "Agent":
            for field, kind in (("capability", "Capability"), ("quota", "Quota")):
                name = spec.get(field)
                if name is not None and name not in known[kind]:
                    yield manifest, ("spec", field), f"{kind} {name!r} does not exist", \
                        _did_you_mean(name, known[kind], f"no {kind} is defined" if not known[kind] else "")
        elif manifest.kind in ("Schedule", "Trigger"):
            agent = known["Agent"].get(spec.get("agent"))
            if agent is None:
                yield manifest, ("spec", "agent"), f"Agent {spec.get('agent')!r} does not exist", \
                    _did_you_mean(spec.get("agent"), known["Agent"], "")
                continue
            tasks = agent.spec.get("tasks") or {}
            if spec.get("task") not in tasks:
                yield manifest, ("spec", "task"), (
                    f"Agent {agent.name!r} has no task {spec.get('task')!r}"
                ), _did_you_mean(spec.get("task"), tasks, f"its tasks: {', '.join(tasks)}")


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


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _Schemas:
    """The kind schemas, loaded once, cross-file references resolved by file name."""

    def __init__(self, directory: Path):
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.directory = directory
        resources = []
        for path in sorted(directory.glob("*.schema.json")):
            contents = json.loads(path.read_text())
            resources.append((path.name, Resource.from_contents(contents, DRAFT202012)))
        self.registry = Registry().with_resources(resources)
        self.validators: dict[str, Any] = {}

    def validator(self, kind: str):
        if kind not in self.validators:
            from jsonschema import Draft202012Validator

            schema = self.registry.contents(SCHEMA_FILES[kind])
            self.validators[kind] = Draft202012Validator(schema, registry=self.registry)
        return self.validators[kind]


class _Cache:
    """Documents of files that passed every per-document check, keyed by content hash."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.key = _cache_key()
        self.files: dict[str, dict] = {}
        self.dirty = False
        if self.path is None:
            return
        try:
            stored = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(stored, dict) and stored.get("key") == self.key:
            self.files = stored.get("files", {})

    def get(self, display: str, digest: str) -> list[Document] | None:
        entry = self.files.get(display)
        if not entry or entry.get("sha256") != digest:
            return None
        return [Document(display, index, line, data) for index, line, data in entry["documents"]]

    def put(self, display: str, digest: str, documents: list[Document]) -> None:
        if self.path is None:
            return
        self.files[display] = {
            "sha256": digest,
            "documents": [[d.index, d.line, d.data] for d in documents],
        }
        self.dirty = True

    def save(self, keep: dict[str, str]) -> None:
        if self.path is None:
            return
        stale = set(self.files) - set(keep)
        if not self.dirty and not stale:
            return
        for display in stale:
            del self.files[display]
        payload = json.dumps({"key": self.key, "files": self.files}, separators=(",", ":"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temp.write_text(payload)
            os.replace(temp, self.path)
        except OSError:
            pass


def _cache_key() -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{__version__}".encode())
    for path in sorted(schema_dir().glob("*.schema.json")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
