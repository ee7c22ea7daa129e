"""JSON for the every-minute enqueue path, without importing the `json` package.

`import json` pulls in `re`, and `re` pulls in `enum`, `functools` and `collections`: together
about 20 ms on a small device, more than the rest of what a crontab line's `spos action run`
does. The scanner and the string quoting `json` itself uses live in CPython's `_json`
extension, which imports nothing; this module drives them directly. What it reads and writes is
exactly what `json.loads` reads and `json.dumps(..., indent=2)` writes (tests/test_leanjson.py
holds the two together). Where `_json` is missing (another Python), it is `json` itself.

Only for hot paths that would otherwise not import `json`; everywhere else, use `json`.
"""

from __future__ import annotations

try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - CPython always has it
    _quote = _make_scanner = None

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What `_json.make_scanner` reads from a `json.JSONDecoder`: the defaults of `json.loads`."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _make_scanner(_Context()) if _make_scanner is not None else None


def loads(text: str):
    """`json.loads(text)` for a str: the same values, a ValueError for the same inputs."""
    if _scan is None:
        import json

        return json.loads(text)
    if text.startswith("\ufeff"):
        raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise _error("Expecting value", text, stop.value) from None
    rest = text[end:]
    end += len(rest) - len(rest.lstrip(_WHITESPACE))
    if end != len(text):
        raise _error("Extra data", text, end)
    return value


def dumps(value) -> str:
    """`json.dumps(value, indent=2)` for plain data (dict with str keys, list, tuple, str, int,
    float, bool, None); TypeError for anything else."""
    if _quote is None:
        import json

        return json.dumps(value, indent=2)
    parts: list[str] = []
    _write(value, parts, "\n")
    return "".join(parts)


def _write(value, parts: list[str], newline: str) -> None:
    if isinstance(value, str):
        parts.append(_quote(value))
    elif value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int):
        parts.append(int.__repr__(value))
    elif isinstance(value, float):
        parts.append(_float(value))
    elif isinstance(value, dict):
        if not value:
            parts.append("{}")
            return
        inner = newline + "  "
        parts.append("{")
        for index, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"keys must be str here, not {type(key).__name__}")
            parts.append(inner if index == 0 else "," + inner)
            parts.append(_quote(key))
            parts.append(": ")
            _write(item, parts, inner)
        parts.append(newline + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            parts.append("[]")
            return
        inner = newline + "  "
        parts.append("[")
        for index, item in enumerate(value):
            parts.append(inner if index == 0 else "," + inner)
            _write(item, parts, inner)
        parts.append(newline + "]")
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "Infinity"
    if value == float("-inf"):
        return "-Infinity"
    return float.__repr__(value)


def _error(message: str, text: str, position: int) -> ValueError:
    """json's own JSONDecodeError (a ValueError) once something is wrong: importing `json`
    only then costs nothing on the path that works."""
    from json import JSONDecodeError

    return JSONDecodeError(message, text, position)
