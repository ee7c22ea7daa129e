"""Reading manifest files: discovery, hardened YAML parsing, and locating fields for errors.

Parsing uses ruamel.yaml's C safe loader (fast, no line numbers). Only when a problem must be
reported is the file parsed again with the round-trip loader to find the line and column of the
offending field (`locate`). YAML hazards are turned into diagnostics, never tracebacks:
duplicate keys, tags other than the core schema's, `%YAML 1.1` (its booleans and octals differ),
alias/merge bombs and recursive aliases (the expanded size is bounded), absurd nesting depth,
oversized files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import Diagnostic

MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64
MAX_SCAN_DEPTH = 1_000
"""The C parser recurses per nesting level and crashes past ~20,000: refuse well before parsing."""
MANIFEST_SUFFIXES = (".yaml", ".yml")

_YAML_DIRECTIVE = re.compile(r"^%YAML[ \t]+(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One YAML document of a manifest file."""

    file: str
    index: int
    line: int
    data: Any


def discover(directory: str | os.PathLike) -> list[Path]:
    """Every `*.yaml` / `*.yml` file below `directory`, at any depth, hidden entries skipped."""
    found = []
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            Path(current, name)
            for name in sorted(files)
            if name.endswith(MANIFEST_SUFFIXES) and not name.startswith(".")
        )
    return found


def parse(text: str, file: str) -> tuple[list[Document], list[Diagnostic]]:
    """The non-empty documents of `text`, or the diagnostics that explain why it can't be read."""
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

    constructor, parser = _safe_loader(text)
    documents: list[Document] = []
    index = 0
    try:
        while parser.check_node():
            node = parser.get_node()
            line = node.start_mark.line + 1
            data = constructor.construct_document(node)
            if data is not None:
                problem = _bomb_check(data)
                if problem:
                    return [], [Diagnostic(file, line, node.start_mark.column + 1, problem)]
                documents.append(Document(file, index, line, data))
            index += 1
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        summary = " ".join(str(part).strip() for part in (exc.context, exc.problem) if part)
        return [], [Diagnostic(file, line, col, f"invalid YAML: {_first_line(summary)}")]
    except YAMLError as exc:
        return [], [Diagnostic(file, 1, 1, f"invalid YAML: {_first_line(str(exc))}")]
    except RecursionError:
        return [], [Diagnostic(file, 1, 1, f"YAML nesting deeper than {MAX_DEPTH} levels")]
    return documents, []


def locate(text: str, index: int, path: tuple) -> tuple[int, int]:
    """1-based line and column of the deepest existing node along `path` in document `index`.

    Slow (round-trip loader); called only to report a problem.
    """
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = True
    try:
        docs = list(yaml.load_all(text))
    except Exception:  # the fast parse already reported why this file is unreadable
        return 1, 1
    nonempty = _doc_positions(text)
    node = docs[index] if index < len(docs) else None
    line, col = nonempty.get(index, (1, 1))
    for key in path:
        position = _child_position(node, key)
        if position is None:
            break
        line, col = position
        node = node[key]
    return line, col


def _child_position(node: Any, key: Any) -> tuple[int, int] | None:
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            line, col = lc.item(key)
        elif isinstance(node, dict) and key in node:
            line, col = lc.key(key)
        else:
            return None
    except (KeyError, IndexError, TypeError):
        return None
    return line + 1, col + 1


def _doc_positions(text: str) -> dict[int, tuple[int, int]]:
    constructor, parser = _safe_loader(text)
    positions = {}
    index = 0
    try:
        while parser.check_node():
            node = parser.get_node()
            positions[index] = (node.start_mark.line + 1, node.start_mark.column + 1)
            index += 1
    except Exception:
        pass
    return positions


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
    for tag in _REJECTED_TAGS:
        constructor.add_constructor(tag, _reject_tag)
    constructor.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_string)
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


def _timestamp_as_string(constructor, node):
    return constructor.construct_scalar(node)


def _bomb_check(data: Any) -> str:
    """Explain why `data` is unsafe to walk (cyclic, too large when expanded, too deep), or ''."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def expanded(value: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _TooDeep
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise _Cyclic
        in_progress.add(key)
        children = value.values() if isinstance(value, dict) else value
        total = 1 + sum(expanded(child, depth + 1) for child in children)
        if total > MAX_EXPANDED_NODES:
            raise _TooLarge
        in_progress.discard(key)
        sizes[key] = total
        return total

    try:
        expanded(data, 0)
    except _Cyclic:
        return "recursive YAML alias: a node refers to itself"
    except _TooLarge:
        return f"document expands to more than {MAX_EXPANDED_NODES} nodes (alias or merge bomb?)"
    except _TooDeep:
        return f"YAML nesting deeper than {MAX_DEPTH} levels"
    return ""


class _Cyclic(Exception):
    pass


class _TooLarge(Exception):
    pass


class _TooDeep(Exception):
    pass


def _first_line(text: str) -> str:
    return " ".join(text.split())
