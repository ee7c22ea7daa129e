"""Reading manifest files: discovery, hardened YAML parsing, and locating fields for errors.

Parsing uses ruamel.yaml's C safe loader. Only when a problem must be reported is the file
composed again (same parser, without constructing) to find the line and column of the offending
field in the node marks (`locate`). YAML hazards are turned into diagnostics, never tracebacks:
duplicate keys, tags other than the core schema's, `%YAML 1.1` (its booleans and octals differ),
alias/merge bombs and recursive aliases (the expanded size is bounded, before construction),
mapping keys that are not strings, absurd nesting depth, oversized files, absurd document counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from reconciler.diagnostics import Diagnostic

MAX_FILE_BYTES = 1 << 20
MAX_DOCUMENTS = 10_000
"""Per file. Each document costs ~0.1 ms to construct: 1 MiB of `---` would otherwise take 10 s."""
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64
MAX_SCAN_DEPTH = 1_000
"""The C parser recurses per nesting level and crashes past ~20,000: refuse well before parsing."""
MAX_NUMBER_CHARS = 100
"""An integer written longer than this means nothing to any field, and past 4,300 digits Python
can neither read nor print it."""
MANIFEST_SUFFIXES = (".yaml", ".yml")

_YAML_DIRECTIVE = re.compile(r"^%YAML[ \t]+(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One YAML document of a manifest file."""

    file: str
    index: int
    line: int
    data: Any


def discover(directory: str | os.PathLike,
             unlisted: list[tuple[str, str, str]] | None = None) -> list[str]:
    """Every `*.yaml` / `*.yml` file below `directory`, at any depth, hidden entries skipped,
    as normalised path strings (a large repository has tens of thousands: no Path objects).
    A directory that cannot be listed, or is a link (not followed: it could lead back up), is
    added to `unlisted` as (path, summary, hint): its manifests are not known, which is an
    error, never a directory to skip."""
    found = []
    refused = None if unlisted is None else (lambda exc: unlisted.append(
        (exc.filename, f"cannot read the directory: {exc.strerror}", "")))
    for current, dirs, files in os.walk(os.path.normpath(directory), onerror=refused):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if unlisted is not None:
            unlisted.extend((os.path.join(current, d), "a linked directory is not read",
                             "move its manifests here, or link each file")
                            for d in dirs if os.path.islink(os.path.join(current, d)))
        found.extend(
            os.path.join(current, name)
            for name in sorted(files)
            if name.endswith(MANIFEST_SUFFIXES) and not name.startswith(".")
        )
    return found


def read_bounded(path: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes of a manifest file, or why they are not read. Only regular files of at most
    MAX_FILE_BYTES: a symlink to /dev/zero or a FIFO would otherwise never end (or block)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return b"", f"cannot read the file: {exc.strerror}"
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b"", "not a regular file"
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        return b"", f"file is larger than {MAX_FILE_BYTES} bytes"
    return raw, ""


def display_name(path: str | os.PathLike, cwd: str, real: str | None = None) -> str:
    """The path as users see it: relative to the working directory `cwd` (resolved) when below
    it. Symlinks inside the manifest tree are resolved, so a linked file is reported where it
    really is (`real`, when the caller knows it already)."""
    resolved = real or os.path.realpath(path)
    if resolved.startswith(cwd + os.sep):
        return resolved[len(cwd) + 1:]
    return str(path)


def schemas_path() -> str:
    """The JSON Schemas' directory: beside the package in a checkout, inside it once installed."""
    here = os.path.dirname(os.path.realpath(__file__))
    checkout = os.path.join(os.path.dirname(here), "schemas")
    return checkout if os.path.isdir(checkout) else os.path.join(here, "schemas")


def content_digest(file_hashes: dict[str, str]) -> str:
    """The digest of a set of manifest files: their names as shown and their contents."""
    canonical = json.dumps(sorted(file_hashes.items())).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def parse(text: str, file: str) -> tuple[list[Document], list[Diagnostic]]:
    """The non-empty documents of `text`, and the diagnostics that explain why it, or a part of
    it, can't be read. A document that cannot be read ends the file; those before it are kept
    (not to be applied: the problem is an error), so that other files' references to what they
    define are not reported as dangling."""
    if len(text) > MAX_FILE_BYTES:
        return [], [Diagnostic(file, 1, 1, f"file is larger than {MAX_FILE_BYTES} bytes")]
    for match in _YAML_DIRECTIVE.finditer(text):
        if match.group(1) != "1.2":
            line = text.count("\n", 0, match.start()) + 1
            return [], [
                Diagnostic(
                    file, line, 1, f"unsupported YAML version directive %YAML {match.group(1)}",
                    hint="manifests are YAML 1.2; remove the directive (YAML 1.1 reads `no` "
                    "as false and 0755 as octal)",
                )
            ]
    if _nesting_upper_bound(text) > MAX_SCAN_DEPTH:
        return [], [Diagnostic(file, 1, 1, f"YAML nesting deeper than {MAX_DEPTH} levels")]
    from ruamel.yaml.error import MarkedYAMLError, YAMLError
    from ruamel.yaml.reader import ReaderError

    constructor, parser = _safe_loader(text)
    documents: list[Document] = []
    index = 0
    try:
        while parser.check_node():
            node = parser.get_node()
            if index == MAX_DOCUMENTS:  # nothing of it is checked: that alone would take long
                return [], [Diagnostic(
                    file, node.start_mark.line + 1, node.start_mark.column + 1,
                    f"more than {MAX_DOCUMENTS} documents in one file", hint="split the file",
                )]
            unsafe = _unsafe_node(node)
            if unsafe:
                mark, problem, hint = unsafe
                return documents, [Diagnostic(file, mark.line + 1, mark.column + 1, problem, hint=hint)]
            data = constructor.construct_document(node)
            if data is not None:
                documents.append(Document(file, index, node.start_mark.line + 1, data))
            index += 1
    except ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        summary = f"invalid YAML: {exc.reason}: {chr(exc.character)!r}"
        return documents, [Diagnostic(file, line, col, summary)]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        summary = " ".join(str(part).strip() for part in (exc.context, exc.problem) if part)
        return documents, [Diagnostic(file, line, col, f"invalid YAML: {_first_line(summary)}")]
    except YAMLError as exc:
        return documents, [Diagnostic(file, 1, 1, f"invalid YAML: {_first_line(str(exc))}")]
    except RecursionError:
        return documents, [Diagnostic(file, 1, 1, f"YAML nesting deeper than {MAX_DEPTH} levels")]
    return documents, []


def locate(text: str, index: int, path: tuple) -> tuple[int, int]:
    """1-based line and column of the deepest existing node along `path` in document `index`:
    a mapping entry is found at its key, a list item at the item.

    Called only to report a problem. The file is composed again (C parser, node marks only)
    once, and kept for the next problem in the same file: a file with many problems costs one
    parse, not one per problem.
    """
    try:
        nodes = _composed(text)
    except Exception:  # the fast parse already reported why this file is unreadable
        return 1, 1
    if index >= len(nodes.roots):
        return 1, 1
    node = nodes.roots[index]
    mark = node.start_mark
    for key in path:
        child = nodes.child(node, key)
        if child is None:
            break
        mark, node = child
    return mark.line + 1, mark.column + 1


@lru_cache(maxsize=4)
def _composed(text: str) -> "_Nodes":
    _, parser = _safe_loader(text)
    roots = []
    while parser.check_node():
        roots.append(parser.get_node())
    return _Nodes(roots)


class _Nodes:
    """The composed documents of one file; each mapping's keys are indexed on first use."""

    def __init__(self, roots: list[Any]):
        self.roots = roots
        self.keys: dict[int, dict[str, tuple[Any, Any]]] = {}

    def child(self, node: Any, key: Any) -> tuple[Any, Any] | None:
        """(mark, node) of `key` below `node`: the key's mark in a mapping, the item's in a list."""
        from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

        if isinstance(node, MappingNode):
            if id(node) not in self.keys:
                self.keys[id(node)] = {
                    k.value: (k.start_mark, v) for k, v in node.value if isinstance(k, ScalarNode)
                }
            return self.keys[id(node)].get(key) if isinstance(key, str) else None
        if isinstance(node, SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            return node.value[key].start_mark, node.value[key]
        return None


def _nesting_upper_bound(text: str) -> int:
    """A cheap over-estimate of how deeply `text` nests (indentation, `- ` runs, open brackets)."""
    block = 0
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        markers = len(_SEQUENCE_MARKERS.match(stripped).group(0)) // 2
        block = max(block, len(line) - len(stripped) + markers)
    flow = depth = 0
    for char in _BRACKETS.findall(text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        flow = max(flow, depth)
    return block + flow


_SEQUENCE_MARKERS = re.compile(r"(?:[-?] +)*")
_BRACKETS = re.compile(r"[\[\]{}]")


def _safe_loader(text: str):
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=False)
    constructor, parser = yaml.get_constructor_parser(text)
    for tag in (*_REJECTED_TAGS, None):  # None: every tag without a constructor (!!python/...)
        constructor.add_constructor(tag, _reject_tag)
    for tag in _STRING_TAGS:
        constructor.add_constructor(tag, _as_string)
    for tag in _CHECKED_TAGS:
        constructor.add_constructor(tag, _checked_scalar)
    return constructor, parser


_REJECTED_TAGS = (
    "tag:yaml.org,2002:binary",
    "tag:yaml.org,2002:set",
    "tag:yaml.org,2002:omap",
    "tag:yaml.org,2002:pairs",
)


def _reject_tag(constructor, node):
    from ruamel.yaml.constructor import ConstructorError

    raise ConstructorError(
        None, None, f"the tag {node.tag!r} is not allowed in manifests", node.start_mark
    )


_STRING_TAGS = (
    "tag:yaml.org,2002:timestamp",  # a date stays the text it was written as
    "tag:yaml.org,2002:value",  # YAML 1.1's `=`; in YAML 1.2 a plain `=` is a string
)


def _as_string(constructor, node):
    return constructor.construct_scalar(node)


_CHECKED_TAGS = {
    "tag:yaml.org,2002:int": ("an integer", "!!int", "construct_yaml_int"),
    "tag:yaml.org,2002:float": ("a number", "!!float", "construct_yaml_float"),
    "tag:yaml.org,2002:bool": ("a boolean", "!!bool", "construct_yaml_bool"),
}


def _checked_scalar(constructor, node):
    """An int, float or bool. A plain scalar gets these tags only when it has their form; an
    explicit tag (`!!int x`, `!!bool maybe`) does not, and is an error at the value. So is an
    integer longer than MAX_NUMBER_CHARS."""
    from ruamel.yaml.constructor import ConstructorError, SafeConstructor

    noun, tag, construct = _CHECKED_TAGS[node.tag]
    if tag == "!!int" and len(node.value) > MAX_NUMBER_CHARS:
        raise ConstructorError(
            None, None, f"{node.value[:12]}... has more than {MAX_NUMBER_CHARS} characters: "
            "no field takes a number that large", node.start_mark)
    try:
        return getattr(SafeConstructor, construct)(constructor, node)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConstructorError(
            None, None, f"{node.value!r} is not {noun}, as its tag {tag} says", node.start_mark
        ) from None


def _unsafe_node(root: Any) -> tuple[Any, str, str] | None:
    """Why the composed document `root` is unsafe to construct, as (mark, summary, hint), or None.

    Checked on the node graph, before construction: an alias refers to the same node each time,
    so its expanded size is counted without expanding it, and merge keys (`<<`), which the
    constructor would expand, are counted like any other alias. Mapping keys must be strings.
    """
    from ruamel.yaml.nodes import MappingNode, ScalarNode

    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def expanded(node: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _Unsafe(node, f"YAML nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, ScalarNode):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise _Unsafe(node, "recursive YAML alias: a node refers to itself")
        in_progress.add(key)
        if isinstance(node, MappingNode):
            for key_node, _ in node.value:
                _check_key(key_node)
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value
        total = 1 + sum(expanded(child, depth + 1) for child in children)
        if total > MAX_EXPANDED_NODES:
            raise _Unsafe(
                node, f"document expands to more than {MAX_EXPANDED_NODES} nodes (alias or merge bomb?)"
            )
        in_progress.discard(key)
        sizes[key] = total
        return total

    try:
        expanded(root, 0)
    except _Unsafe as unsafe:
        return unsafe.node.start_mark, unsafe.summary, unsafe.hint
    return None


_STRING_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge", *_STRING_TAGS)
_TAG_NOUNS = {
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:seq": "a list",
    "tag:yaml.org,2002:map": "a mapping",
}


def _check_key(key_node: Any) -> None:
    """Keys are field names and names of your own (tasks, env variables): only strings.
    `1:`, `true:` or `null:` would reach the device as "1", "true" or "null"."""
    from ruamel.yaml.nodes import ScalarNode

    if key_node.tag in _STRING_KEY_TAGS:
        return
    what = _TAG_NOUNS.get(key_node.tag, f"tagged {key_node.tag}")
    if isinstance(key_node, ScalarNode) and key_node.value:
        raise _Unsafe(
            key_node, f"mapping key {key_node.value} is read as {what}, not a string",
            f'quote it: "{key_node.value}"',
        )
    raise _Unsafe(key_node, f"a mapping key must be a string, not {what}")


class _Unsafe(Exception):
    def __init__(self, node: Any, summary: str, hint: str = ""):
        super().__init__(summary)
        self.node, self.summary, self.hint = node, summary, hint


def _first_line(text: str) -> str:
    return " ".join(text.split())
