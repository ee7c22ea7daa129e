"""The quick schema check never accepts a manifest the thorough one refuses.

`validate` asks jsonschema_rs for a yes/no first and runs jsonschema, which explains, only on a
no (`_Schemas` in reconciler/validate.py). Were jsonschema_rs to say yes where jsonschema finds
errors, an invalid manifest would be accepted and applied. Both engines run here, for every
kind, on every manifest the repository holds (the examples, the policies, the test fixtures and
the manifests embedded in test cases and test sources) and on systematic mutations of each valid
one: every field deleted or replaced by awkward values, every string with something before or
after it or padded past its maxLength, every number at and around its bounds, every enum set to
its other choices, and every mapping given unknown keys, malformed keys and the fields its
schema names but it lacks (at the schema's example values).

The other direction, a no that jsonschema does not confirm, only costs time: the document is
accepted as before. Each such case must still match a difference understood here (`_explain`),
so that a new one is looked at, not waved through. Values only YAML makes (dates, tuples,
non-string keys...) have their own test: `surely_valid` answers no and jsonschema judges.

Run with -s to see how many documents each test checks and how long it takes.
"""

from __future__ import annotations

import ast
import copy
import datetime
import json
import math
import re
import textwrap
import time
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pytest

from reconciler.validate import (
    KINDS, SCHEMA_FILES, _KindSchema, _Schemas, _unsafe_values, schema_dir,
)

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIRECTORIES = ("agents.d", "policies", "tests")

# Replacement values every field gets ...
VALUES = ["", "x", "x\n", "a%b", 0, -1, 1.5, 10**30, True, None, [], {}, ["x"], {"bogus": 1},
          "\u0663", "1s", "5m", "0", "-5m", "../etc", "/", "UPPER"]
# ... and more where the two engines could plausibly read a value differently: integral floats
# (integer? enum?), integers past 64 bits, floats JSON cannot hold, line ends and other control
# characters a regular expression may treat specially, repeated items (uniqueItems). Values made
# from the value at hand and its schema come on top (`_derived_values`).
MORE_VALUES = [1.0, 100.0, 2**64, -(2**63) - 1, False, math.nan, math.inf, "x\r", "a\x00",
               ["x", "x"], [2, 2.0]]
# Keys added to every mapping: `bogus` (unknown), and keys a propertyNames pattern must refuse.
KEYS = ["bogus", "", "x\n", "UPPER", "a%b", "\u0663"]
DELETE = "delete"

# jsonschema_rs sees every distinct mutation; jsonschema, which takes a few hundred times as
# long, a bounded choice of them (`select`): what jsonschema_rs accepts in this many contexts
# per kind, field and mutation, what it refuses once (a replaced value once per schema it meets).
THOROUGH_WHEN_ACCEPTED = 2
THOROUGH_WHEN_REFUSED = 1
MOST_THOROUGH_CHECKS = 10_000  # about 5 s; more means the dedupe stopped working


# ---------------------------------------------------------------- the engines


class Engines:
    """Both engines for every kind, from `_Schemas` exactly as validate builds them."""

    def __init__(self) -> None:
        self.schemas = _Schemas(schema_dir())
        self.quick = {kind: self.schemas.quick(SCHEMA_FILES[kind]) for kind in KINDS}
        self.thorough = {kind: self.schemas.thorough(SCHEMA_FILES[kind]) for kind in KINDS}
        self.model = {kind: _model(self.schemas, SCHEMA_FILES[kind]) for kind in KINDS}
        self.valid: list[Manifest] | None = None  # see valid_manifests

    def quick_accepts(self, kind: str, doc: Any) -> bool | None:
        """jsonschema_rs's verdict, None for a value it cannot read (then `surely_valid` says
        no and jsonschema judges)."""
        try:
            return self.quick[kind].is_valid(doc)
        except (ValueError, TypeError, OverflowError):
            return None

    def thorough_accepts(self, kind: str, doc: Any) -> bool:
        return next(iter(self.thorough[kind].iter_errors(doc)), None) is None

    def thorough_errors(self, kind: str, doc: Any) -> list[str]:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(document)'}: {e.message}"
                for e in self.thorough[kind].iter_errors(doc)]


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines()


class _NoJsonType:
    """What jsonschema_rs makes of a float JSON cannot hold (nan, inf): a value every `type`,
    `const` and `enum` refuses (its messages call it null, yet `type: null` refuses it too)."""

    def __repr__(self) -> str:
        return "<non-finite float>"


def _ecma_pattern(pattern: str) -> str:
    """`pattern` for Python's re with `$` read as ECMA-262 (which JSON Schema specifies) and
    Rust's regex read it: the very end of the string, never before a final newline."""
    return re.sub(r"(?<!\\)\$", r"\\Z", pattern)


def _model(schemas: _Schemas, name: str):
    """jsonschema reading documents the way jsonschema_rs is known to read them differently:
    `$` in a pattern only at the very end, and non-finite floats as no JSON type at all."""
    from jsonschema import Draft202012Validator, ValidationError, validators
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    def pattern(validator, value, instance, schema):
        if validator.is_type(instance, "string") and not re.search(_ecma_pattern(value), instance):
            yield ValidationError(f"{instance!r} does not match {value!r}")

    registry = Registry().with_resources(
        (file, Resource.from_contents(contents, DRAFT202012))
        for file, contents in schemas.contents.items())
    model = validators.extend(Draft202012Validator, {"pattern": pattern})
    return model(schemas.contents[name], registry=registry)


# ---------------------------------------------------------------- the corpus


class Manifest(NamedTuple):
    origin: str
    kind: str
    doc: Any


@lru_cache(maxsize=1)
def _yaml():
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=False)


def _load_all(text: str) -> list[Any]:
    try:
        return list(_yaml().load_all(text))
    except Exception:  # noqa: BLE001 - a file YAML cannot read holds no manifest to compare on
        return []


def _kind_of(doc: Any) -> str | None:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) and kind in KINDS else None


def _with_embedded(doc: Any) -> Iterator[Any]:
    """`doc` and the documents of every YAML text a string in it holds (test cases embed the
    manifests they apply as `manifests: |` blocks)."""
    yield doc
    for text in _strings(doc):
        if "kind:" in text:
            for inner in _load_all(text):
                yield from _with_embedded(inner)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for child in value.values():
            yield from _strings(child)
    elif isinstance(value, list):
        for child in value:
            yield from _strings(child)


def _python_manifests(path: Path) -> Iterator[Any]:
    """Manifests written as string constants in a test module (the dedented text)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "kind:" in node.value:
            yield from _load_all(textwrap.dedent(node.value))


def _canonical(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)  # keeps True apart from 1, 1.0 from 1
    except (TypeError, ValueError):
        return repr(value)


@lru_cache(maxsize=1)
def corpus() -> tuple[Manifest, ...]:
    """Every distinct manifest of a known kind in the repository, smallest first."""
    found: dict[tuple[str, str], Manifest] = {}
    for directory in CORPUS_DIRECTORIES:
        for path in sorted((REPO / directory).rglob("*")):
            if path.suffix in (".yaml", ".yml") and path.is_file():
                docs = [d for top in _load_all(path.read_text(encoding="utf-8"))
                        for d in _with_embedded(top)]
            elif path.suffix == ".py" and path.is_file() and "apiVersion" in path.read_text(
                    encoding="utf-8"):
                docs = list(_python_manifests(path))
            else:
                continue
            for doc in docs:
                kind = _kind_of(doc)
                if kind:
                    origin = str(path.relative_to(REPO))
                    found.setdefault((kind, _canonical(doc)), Manifest(origin, kind, doc))
    return tuple(sorted(found.values(), key=lambda m: (len(_canonical(m.doc)), m.origin)))


def valid_manifests(engines: Engines) -> list[Manifest]:
    """The manifests jsonschema accepts and, for every field the schemas name that none of them
    has, the smallest of them given that field with the schema's example (in place of a
    sibling field, where the two exclude each other: `below` for `above`)."""
    if engines.valid is None:
        valid = [m for m in corpus() if engines.thorough_accepts(m.kind, m.doc)]
        covered = {(m.kind, _field(path)) for m in valid for path in _paths(m.doc)}
        waiting = list(valid)
        while waiting:
            manifest = waiting.pop(0)
            for path in _paths(manifest.doc):
                node = _at(manifest.doc, path)
                for name, example in _fields_to_add(manifest.kind, _field(path), node):
                    if (manifest.kind, _field((*path, name))) in covered:
                        continue
                    added = _with_key(manifest.doc, path, name, example)
                    tries = [added] + [_deleted(added, (*path, other)) for other in node]
                    doc = next((d for d in tries if engines.thorough_accepts(manifest.kind, d)),
                               None)
                    if doc is not None:
                        covered |= {(manifest.kind, _field(p)) for p in _paths(doc)}
                        widened = Manifest(f"{manifest.origin}, with {_dotted((*path, name))} "
                                           "from the schema's example", manifest.kind, doc)
                        valid.append(widened)
                        waiting.append(widened)
        engines.valid = valid
    return engines.valid


def schema_fields(kind: str) -> set[tuple]:
    """Every field the schema of `kind` names (list indices and map keys generalised)."""
    fields: set[tuple] = set()

    def walk(field: tuple) -> None:
        schema, _ = _subschema(kind, field)
        if schema is None or len(field) > 12:
            return
        below = [(*field, name) for name in schema.get("properties") or {}]
        below += [(*field, key) for key, keyword in (("*", "additionalProperties"), ("[]", "items"))
                  if isinstance(schema.get(keyword), dict)]
        for child in below:
            fields.add(child)
            walk(child)

    walk(())
    return fields


# ---------------------------------------------------------------- the schemas, read for mutations


@lru_cache(maxsize=1)
def _contents() -> dict[str, Any]:
    return _Schemas(schema_dir()).contents


def _resolved(schema: Any, file: str) -> tuple[Any, str]:
    """`schema` through its $refs: the referenced schema with the referring one's keywords over
    it, and the file it is in."""
    while isinstance(schema, dict) and "$ref" in schema:
        target, _, pointer = schema["$ref"].partition("#")
        file = target or file
        referenced = _contents()[file]
        for part in filter(None, pointer.split("/")):
            referenced = referenced[part]
        schema = {**referenced, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema, file


@lru_cache(maxsize=None)
def _subschema(kind: str, field: tuple) -> tuple[dict | None, str]:
    """The schema a value at `field` meets and its file; None inside a oneOf (onCalendar)."""
    file = SCHEMA_FILES[kind]
    schema, file = _resolved(_contents()[file], file)
    for key in field:
        where = {"[]": "items", "*": "additionalProperties"}
        child = (schema.get(where[key]) if key in where
                 else (schema.get("properties") or {}).get(key))
        if not isinstance(child, dict):
            return None, file
        schema, file = _resolved(child, file)
    return schema, file


@lru_cache(maxsize=1)
def _schema_facts() -> tuple[frozenset, frozenset]:
    """(fields whose value is a map of any keys, fields an `if` looks at), from the schemas."""
    maps: set[str] = set()
    conditions: set[str] = set()

    def walk(node: Any, file: str) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if isinstance(_resolved(sub, file)[0].get("additionalProperties"), dict):
                    maps.add(name)
            if isinstance(node.get("if"), dict):
                conditions.update(node["if"].get("properties", {}), node["if"].get("required", []))
            for child in node.values():
                walk(child, file)
        elif isinstance(node, list):
            for child in node:
                walk(child, file)

    for file, schema in _contents().items():
        walk(schema, file)
    return frozenset(maps), frozenset(conditions)


_ANNOTATIONS = {"description", "examples", "default", "$comment", "title"}
_NO_EXAMPLE = object()


def _without_annotations(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_annotations(v) for k, v in schema.items() if k not in _ANNOTATIONS}
    if isinstance(schema, list):
        return [_without_annotations(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def _schema_at(kind: str, field: tuple) -> tuple:
    """The schema a value at `field` meets, annotations left out (so every duration, every
    name... is one schema), or the field itself where it is not one plain subschema."""
    schema, file = _subschema(kind, field)
    if schema is None:
        return ("field", kind, field)
    text = json.dumps(_without_annotations(schema), sort_keys=True)
    return (file if '"#' in text else "", text)  # a local $ref means what its file holds


def _example(schema: Any, file: str, depth: int = 0) -> Any:
    """A value the schema's authors wrote for it (example, default, const, first choice), or
    an object of its required fields' examples."""
    schema, file = _resolved(schema, file)
    if not isinstance(schema, dict):
        return _NO_EXAMPLE
    if schema.get("examples"):
        return copy.deepcopy(schema["examples"][0])
    for keyword in ("default", "const"):
        if keyword in schema:
            return copy.deepcopy(schema[keyword])
    if schema.get("enum"):
        return schema["enum"][0]
    if schema.get("type") == "boolean":
        return True
    if schema.get("type") == "object" and depth < 4:
        example = {}
        for name in schema.get("required", []):
            value = _example((schema.get("properties") or {}).get(name), file, depth + 1)
            if value is _NO_EXAMPLE:
                return _NO_EXAMPLE
            example[name] = value
        return example
    return _NO_EXAMPLE


@lru_cache(maxsize=None)
def _examples(kind: str, field: tuple) -> tuple[tuple[str, Any], ...]:
    schema, file = _subschema(kind, field)
    if schema is None:
        return ()
    found = ((name, _example(sub, file)) for name, sub in (schema.get("properties") or {}).items())
    return tuple((name, value) for name, value in found if value is not _NO_EXAMPLE)


def _fields_to_add(kind: str, field: tuple, node: Any) -> list[tuple[str, Any]]:
    """The fields the schema names for the mapping `node` that it lacks, with example values."""
    if not isinstance(node, dict):
        return []
    return [(name, copy.deepcopy(value)) for name, value in _examples(kind, field)
            if name not in node]


def _derived_values(kind: str, field: tuple, node: Any) -> list[tuple[str, Any]]:
    """Replacements made from the value itself and its schema: a string with something before
    or after it (a pattern's anchors), padded to its maxLength and one past; the other choices
    of an enum; each bound of a number, and just below and above it."""
    schema, _ = _subschema(kind, field)
    schema = schema or {}
    derived = []
    if isinstance(node, str):
        derived += [("~ + '!'", node + "!"), ("~ '!' +", "!" + node), ("~ + newline", node + "\n"),
                    ("~ + ' '", node + " ")]
        longest = schema.get("maxLength")
        if isinstance(longest, int) and longest > len(node):
            derived += [(f"~ padded to {n}", node + "a" * (n - len(node)))
                        for n in (longest, longest + 1)]
    choices = schema.get("enum") or []
    derived += [(f"= {choice!r}", choice) for choice in choices[:3] + choices[-3:]]
    for keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = schema.get(keyword)
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            steps = (-1, 0, 1) if schema.get("type") == "integer" else (-1, -0.5, 0, 0.5, 1)
            derived += [(f"= {bound + step!r}", bound + step) for step in steps]
    return derived


# ---------------------------------------------------------------- mutations


class Mutation(NamedTuple):
    origin: str
    kind: str
    path: tuple
    change: str  # "replace", "delete" or "add" (a key to the mapping at path)
    label: str
    context: tuple  # see `mutations`
    doc: Any


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*path, index))


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path)) or "(document)"


def _at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _changed(doc: Any, path: tuple, change) -> Any:
    """A copy of `doc` with `change(container)` applied to the container at `path`; only the
    containers along `path` are copied, the rest is shared (and never modified)."""
    root = node = copy.copy(doc)
    for key in path:
        node[key] = copy.copy(node[key])
        node = node[key]
    change(node)
    return root


def _replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return copy.deepcopy(value)
    return _changed(doc, path[:-1],
                    lambda parent: parent.__setitem__(path[-1], copy.deepcopy(value)))


def _deleted(doc: Any, path: tuple) -> Any:
    return _changed(doc, path[:-1], lambda parent: parent.__delitem__(path[-1]))


def _with_key(doc: Any, path: tuple, key: Any, value: Any = "x") -> Any:
    return _changed(doc, path, lambda mapping: mapping.__setitem__(key, value))


def _free(path: tuple) -> list[bool]:
    """For the container at each prefix of `path` (the root first, the node at `path` last):
    whether its keys are data (task names, label keys...) rather than fields."""
    maps, _ = _schema_facts()
    free = [False]
    for key in path:
        free.append(not free[-1] and key in maps)
    return free


def _field(path: tuple) -> tuple:
    """`path` with list indices and the keys of free-form maps generalised: where in the
    schema a mutation lands."""
    free = _free(path)
    return tuple("*" if free[i] else "[]" if isinstance(key, int) else key
                 for i, key in enumerate(path))


def _entry(key: Any, value: Any, free: bool) -> tuple:
    """What of one entry of a mapping can decide a verdict beyond the entry itself: whether it
    is there (its key, unless keys are data), its type and emptiness, and its value for the
    fields an `if` looks at."""
    _, conditions = _schema_facts()
    if free:
        return ("*",)
    if key in conditions and not isinstance(value, (dict, list)):
        return (str(key), _canonical(value))
    return (str(key), type(value).__name__, bool(value))


def _summary(node: Any, free: bool) -> Any:
    """The entries of a mapping; the length and number of distinct items of a list."""
    if isinstance(node, dict):
        return tuple(sorted(_entry(k, v, free) for k, v in node.items()))
    if isinstance(node, list):
        return ("list", len(node), len({_canonical(v) for v in node}))
    return "scalar"


def mutations(valid: list[Manifest]) -> Iterator[Mutation]:
    """Every mutation of every valid manifest, once per kind, field, mutation and context: the
    summaries of the containers from the root down to the one the mutation changes, and what
    the change does to that one. Everything off this spine is unchanged and was valid."""
    seen = set()
    fixed = [(f"= {value!r}", value) for value in VALUES + MORE_VALUES]
    for manifest in valid:
        kind, doc = manifest.kind, manifest.doc
        spines: dict[tuple, tuple] = {}  # path -> summaries of the containers down to it

        def spine(path: tuple) -> tuple:
            if path not in spines:
                above = spine(path[:-1]) if path else ()
                spines[path] = above + (_summary(_at(doc, path), _free(path)[-1]),)
            return spines[path]

        for path in _paths(doc):
            node, field, free = _at(doc, path), _field(path), _free(path)
            values = dict(fixed + _derived_values(kind, field, node))
            candidates = []  # (change, label, context, the mutated document, made on demand)
            if not path:
                candidates += [("replace", label, (), lambda v=v: copy.deepcopy(v))
                               for label, v in values.items()]
            else:
                parent, last = _at(doc, path[:-1]), path[-1]
                above = spine(path[:-1])
                if isinstance(parent, dict):
                    change = lambda v: _entry(last, v, free[-2])  # noqa: E731
                else:
                    others = {_canonical(item) for i, item in enumerate(parent) if i != last}
                    change = lambda v: _canonical(v) in others  # noqa: E731 - uniqueItems
                candidates.append(("delete", DELETE, above + ("deleted",),
                                   lambda: _deleted(doc, path)))
                candidates += [("replace", label, above + (change(v),),
                                lambda v=v: _replaced(doc, path, v)) for label, v in values.items()]
            if isinstance(node, dict):
                additions = [(f"+ key {key!r}", key, "x") for key in KEYS] + [
                    (f"+ field {name}", name, value)
                    for name, value in _fields_to_add(kind, field, node)]
                candidates += [("add", label, spine(path) + (_entry(key, value, free[-1]),),
                                lambda key=key, value=value: _with_key(doc, path, key, value))
                               for label, key, value in additions]
            for change_, label, context, make in candidates:
                key = (kind, field, label, context)
                if key not in seen:
                    seen.add(key)
                    yield Mutation(manifest.origin, kind, path, change_, label, context, make())


def _bucket(mutation: Mutation, accepted: bool) -> tuple:
    """Which mutations jsonschema checks only once (or THOROUGH_WHEN_ACCEPTED times).

    A value put in place of another is judged by the schema at its place, by the fields of its
    mapping an `if` looks at (and whether it is one), and in a list by whether it repeats an
    item; so what jsonschema_rs refuses is checked once per such schema and value, wherever it
    is. Everything else, and all it accepts, per kind, field and mutation."""
    field = _field(mutation.path)
    if accepted or mutation.change != "replace" or not mutation.path:
        return (mutation.kind, field, mutation.label, accepted)
    _, conditions = _schema_facts()
    parent, last = _at(mutation.doc, mutation.path[:-1]), mutation.path[-1]
    if isinstance(parent, dict):
        context = (last if last in conditions else None,
                   tuple(sorted((k, _canonical(v)) for k, v in parent.items()
                                if k in conditions and k != last)))
    else:
        context = len({_canonical(v) for v in parent}) < len(parent)
    return (_schema_at(mutation.kind, field), mutation.label, context)


def _shape(mutation: Mutation) -> Any:
    """The fields of the mapping a mutation changes (the items of a list: none or some)."""
    path = mutation.path if mutation.change == "add" else mutation.path[:-1]
    container = _at(mutation.doc, path) if mutation.path or mutation.change == "add" else None
    if isinstance(container, dict):
        return frozenset(map(str, container))
    return bool(container)


def select(engines: Engines, generated: list[Mutation]) -> Iterator[Mutation]:
    """The mutations jsonschema checks too, smallest documents first (the corpus is sorted so):
    what jsonschema_rs accepts, in THOROUGH_WHEN_ACCEPTED contexts per bucket that differ in
    the container changed, what it refuses once per bucket (see `_bucket`)."""
    taken: dict[tuple, set] = defaultdict(set)
    for mutation in generated:
        accepted = bool(engines.quick_accepts(mutation.kind, mutation.doc))
        bucket = _bucket(mutation, accepted)
        variant = _shape(mutation) if accepted else ()
        limit = THOROUGH_WHEN_ACCEPTED if accepted else THOROUGH_WHEN_REFUSED
        if variant not in taken[bucket] and len(taken[bucket]) < limit:
            taken[bucket].add(variant)
            yield mutation


# ---------------------------------------------------------------- the verdicts


def _non_finite_as_no_type(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return _NoJsonType()
    if isinstance(value, dict):
        return {k: _non_finite_as_no_type(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_non_finite_as_no_type(v) for v in value]
    return value


def _explain(engines: Engines, kind: str, doc: Any) -> str | None:
    """Why jsonschema_rs refuses a document jsonschema accepts, if it is a difference understood
    here, else None. The model is jsonschema reading the document as jsonschema_rs does; the
    reasons name each difference that alone makes the model refuse too."""
    model = engines.model[kind]
    if next(iter(model.iter_errors(_non_finite_as_no_type(doc))), None) is None:
        return None
    reasons = []
    if next(iter(model.iter_errors(doc)), None) is not None:
        reasons.append("a pattern's `$` that Python's re matches before a final newline")
    if not engines.thorough_accepts(kind, _non_finite_as_no_type(doc)):
        reasons.append("a non-finite float, which jsonschema_rs reads as no JSON type")
    return " and ".join(reasons) or "a newline and a non-finite float together"


class Comparison(NamedTuple):
    checked: int
    dangerous: list[str]
    harmless: Counter
    unexplained: list[str]


def compare(engines: Engines, cases: list[tuple[str, str, Any]]) -> Comparison:
    """Both engines on every (description, kind, document) in `cases`."""
    dangerous, unexplained, harmless = [], [], Counter()
    for description, kind, doc in cases:
        quick, thorough = engines.quick_accepts(kind, doc), engines.thorough_accepts(kind, doc)
        if quick and not thorough:
            dangerous.append(f"{kind} {description}: jsonschema_rs accepts, jsonschema finds\n    "
                             + "\n    ".join(engines.thorough_errors(kind, doc)))
        elif thorough and quick is None:
            harmless["a value jsonschema_rs cannot read"] += 1
        elif thorough and not quick:
            reason = _explain(engines, kind, doc)
            if reason is None:
                unexplained.append(f"{kind} {description}: jsonschema_rs refuses, jsonschema "
                                   f"accepts: {_canonical(doc)[:400]}")
            elif not list(_unsafe_values(doc, ())):  # so far each holds a newline or a nan
                unexplained.append(f"{kind} {description}: {reason}, yet no control character "
                                   f"or non-finite number: {_canonical(doc)[:400]}")
            else:
                harmless[reason] += 1
    return Comparison(len(cases), dangerous, harmless, unexplained)


def assert_in_step(comparison: Comparison) -> None:
    assert not comparison.dangerous, (
        f"{len(comparison.dangerous)} documents jsonschema_rs accepts but jsonschema refuses: "
        "validate would accept them\n" + "\n".join(comparison.dangerous[:30]))
    assert not comparison.unexplained, (
        f"{len(comparison.unexplained)} documents jsonschema_rs refuses for no known reason "
        "(accepted, as jsonschema finds nothing, but not understood)\n"
        + "\n".join(comparison.unexplained[:30]))


# ---------------------------------------------------------------- the tests


def test_the_valid_manifests_to_mutate_hold_every_field_of_every_kind(engines):
    """The comparison covers every schema: every field each kind's schema names is in some
    valid manifest (from the repository, or given the schema's example)."""
    valid = valid_manifests(engines)
    covered = {(m.kind, _field(path)) for m in valid for path in _paths(m.doc)}
    for kind in KINDS:
        missing = schema_fields(kind) - {field for k, field in covered if k == kind}
        assert schema_fields(kind) and not missing, (kind, sorted(missing))
    assert {m.kind for m in valid if "schema's example" not in m.origin} == set(KINDS)
    assert set(_schema_facts()[0]) >= {"tasks", "env", "labels", "annotations"}
    assert set(_schema_facts()[1]) >= {"metric", "mode", "operator"}


def test_the_engines_agree_on_every_manifest_in_the_repository(engines):
    """Examples, policies, fixtures, known-bad files and embedded manifests: same verdicts."""
    comparison = compare(engines, [(m.origin, m.kind, m.doc) for m in corpus()])
    assert comparison.checked > 200
    assert_in_step(comparison)


def test_the_engines_agree_on_mutations_of_every_valid_manifest(engines):
    """Every field of every valid manifest deleted, replaced by awkward values, and unknown or
    malformed keys added to every mapping: jsonschema_rs accepts none that jsonschema refuses,
    and each document it alone refuses is a difference understood here."""
    started = time.perf_counter()
    valid = valid_manifests(engines)
    generated = list(mutations(valid))
    chosen = [(f"{_dotted(m.path)} {m.label} (from {m.origin})", m.kind, m.doc)
              for m in select(engines, generated)]
    comparison = compare(engines, chosen)
    print(f"{len(valid)} valid manifests, {len(generated)} distinct mutations checked by "
          f"jsonschema_rs, {comparison.checked} of them by jsonschema too, in "
          f"{time.perf_counter() - started:.1f}s; refused by jsonschema_rs alone: "
          f"{dict(comparison.harmless)}")
    assert_in_step(comparison)
    assert len(generated) > 20_000 and 5_000 < comparison.checked < MOST_THOROUGH_CHECKS


# ---------------------------------------------------------------- values only YAML makes


# Scalars the safe loader turns into something JSON has no word for, or at the edge of what it
# has: dates, timestamps, integers past 64 bits, non-finite floats, bytes, sets, ordered maps,
# lists of pairs (tuples), and aliases that make a structure contain itself.
YAML_VALUES = [
    "2024-01-01", "2024-01-01T10:00:00Z", "2001-12-14 21:59:43.10 -5", "!!timestamp 2024-01-01",
    "123456789012345678901234567890", "-123456789012345678901234567890", "0x7fffffffffffffffffff",
    ".nan", "-.inf", "1e400", "!!float 1", "!!binary aGk=", "!!set {a}", "!!omap [a: 1]",
    "!!pairs [a: 1, a: 2]", "&r [*r]", "&r {a: *r}",
]
# Keys the safe loader makes that are not strings.
YAML_KEYS = ["1", "null", "true", "1.5", "2024-01-01", "[a, b]", "123456789012345678901234567890"]


def _yaml_value(text: str) -> Any:
    return _yaml().load(f"v: {text}\n")["v"]


def _yaml_key(text: str) -> Any:
    (key,) = _yaml().load(f"? {text}\n: x\n")
    return key


def test_yaml_makes_the_values_these_tests_mean():
    """The values fed below are what the safe loader really produces."""
    assert type(_yaml_value("2024-01-01")) is datetime.date
    assert type(_yaml_value("2024-01-01T10:00:00Z")) is datetime.datetime
    assert _yaml_value("123456789012345678901234567890") > 2**64
    assert math.isnan(_yaml_value(".nan")) and _yaml_value("1e400") == math.inf
    assert isinstance(_yaml_value("!!binary aGk="), bytes)
    assert isinstance(_yaml_value("!!pairs [a: 1, a: 2]")[0], tuple)
    looped = _yaml_value("&r [*r]")
    assert looped[0] is looped
    assert {type(_yaml_key(k)) for k in YAML_KEYS} == {int, type(None), bool, float,
                                                       datetime.date, tuple}


def test_the_quick_check_answers_yes_or_no_for_anything_yaml_makes(engines):
    """Dates, big integers, bytes, sets, tuples, looping aliases, non-string keys: put anywhere
    in a valid manifest, `surely_valid` answers a bool and never raises; where jsonschema_rs
    cannot read the document it says no, so jsonschema judges it. It says yes only when
    jsonschema finds nothing."""
    values = [(f"= {text}", _yaml_value(text)) for text in YAML_VALUES]
    keys = [(f"+ key {text}", _yaml_key(text)) for text in YAML_KEYS]
    cases, seen = [], set()
    for manifest in valid_manifests(engines):
        for path in _paths(manifest.doc):
            field = _field(path)
            where = _schema_at(manifest.kind, field) if path else (manifest.kind, field)
            for label, value in values:  # once per schema met, in the smallest manifest
                if (where, label) not in seen:
                    seen.add((where, label))
                    cases.append((manifest.kind, f"{_dotted(path)} {label}",
                                  _replaced(manifest.doc, path, value)))
            for label, key in keys if isinstance(_at(manifest.doc, path), dict) else ():
                if ((manifest.kind, field), label) not in seen:
                    seen.add(((manifest.kind, field), label))
                    cases.append((manifest.kind, f"{_dotted(path)} {label}",
                                  _with_key(manifest.doc, path, key)))
    for kind in KINDS:  # not even a mapping
        cases += [(kind, f"(document) {label}", value) for label, value in values]
    assert len(cases) > 1_000

    kind_of = {SCHEMA_FILES[kind]: kind for kind in KINDS}
    schemas = _Schemas(schema_dir())
    schemas.quick = lambda name: engines.quick[kind_of[name]]  # compiled once, not per case
    asked: list[str] = []
    schemas.thorough = lambda name: asked.append(name) or engines.thorough[kind_of[name]]
    unreadable, accepted_anyway, yes, dangerous = [], [], 0, []
    for kind, description, doc in cases:
        asked.clear()
        checker = _KindSchema(schemas, SCHEMA_FILES[kind])
        verdict = checker.surely_valid(doc)
        assert type(verdict) is bool, (kind, description, verdict)
        if engines.quick_accepts(kind, doc) is None:  # jsonschema_rs raised
            unreadable.append(description)
            assert verdict is False, (kind, description)
            errors = list(checker.iter_errors(doc))
            assert asked == [SCHEMA_FILES[kind]], (kind, description)  # jsonschema judged it
            if not errors:
                accepted_anyway.append(f"{kind} {description}")
        if verdict:
            yes += 1
            if not engines.thorough_accepts(kind, doc):
                dangerous.append(f"{kind} {description}: {engines.thorough_errors(kind, doc)}")
            assert list(checker.iter_errors(doc)) == [] and asked == []
    print(f"{len(cases)} documents with values only YAML makes: {yes} surely valid, "
          f"{len(unreadable)} unreadable by jsonschema_rs, so judged by jsonschema, which "
          f"accepts {len(accepted_anyway)}: {accepted_anyway}")
    assert not dangerous, "\n".join(dangerous)
    # jsonschema lets a key that is no string through where keys are free (env, annotations:
    # propertyNames only constrains strings); reading the YAML refuses it first (next test).
    assert all(" + key " in case and (".env " in case or ".annotations " in case)
               for case in accepted_anyway), accepted_anyway
    assert len(unreadable) > 100 and yes > 10, (len(unreadable), yes)  # both paths taken


def test_what_jsonschema_rs_alone_refuses_is_refused_by_validate_anyway(engines):
    """The differences `_explain` knows are real, and harmless twice over: jsonschema accepts
    (so validate does, as before), and the control-character and finite-number checks refuse."""
    agent = {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": "probe\n"},
             "spec": {"tasks": {"tick": {"command": ["/bin/true"]}}}}
    trigger = {"apiVersion": "spos/v1", "kind": "Trigger", "metadata": {"name": "hot"},
               "spec": {"agent": "a", "task": "t",
                        "condition": {"metric": "cpu_temp", "above": math.nan}}}
    for kind, doc, reason in [("Agent", agent, "newline"), ("Trigger", trigger, "non-finite")]:
        verdicts = engines.quick_accepts(kind, doc), engines.thorough_accepts(kind, doc)
        assert verdicts == (False, True)
        assert reason in _explain(engines, kind, doc)
        assert list(_unsafe_values(doc, ()))


@pytest.mark.parametrize("key", ["1", "null", "true", "1.5", "[a, b]", "2024-01-01"])
def test_a_key_that_is_no_string_is_refused_before_any_schema(key):
    """jsonschema would let `env: {1: x}` through; reading the file refuses it (a date stays
    the text it was written as), so neither schema engine ever sees a key that is no string."""
    from reconciler.source import parse

    documents, problems = parse(textwrap.dedent(f"""\
        apiVersion: spos/v1
        kind: Agent
        metadata: {{name: probe}}
        spec:
          env:
            ? {key}
            : x
          tasks: {{tick: {{command: [/bin/true]}}}}
    """), "probe.yaml")
    if key == "2024-01-01":
        assert problems == [] and documents[0].data["spec"]["env"] == {key: "x"}
    else:
        assert documents == [] and len(problems) == 1, problems
