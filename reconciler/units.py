"""The quantities manifests are written in: durations, byte sizes, CPU percentages. Pure.

Read by hand rather than with `re`: a crontab line's `spos action run --deadline 10m` parses a
duration every minute, and importing `re` would cost it more than the rest of the parse and the
enqueue together. The grammar is what the schemas' patterns say; digits are what `\\d` matches
(any Unicode decimal digit) and, as with `$`, one newline may end the text
(tests/test_units.py holds these readers to those regular expressions).
"""

from __future__ import annotations

_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SIZE_FACTOR = {
    "": 1,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
_CACHE_LIMIT = 1024
_seconds: dict[str, int | float] = {}
_sizes: dict[str, int] = {}
_percents: dict[str, float] = {}


def seconds(text: str) -> int | float:
    """`"1h30m"` -> 5400, `"1500ms"` -> 1.5. Raises ValueError for anything else."""
    known = _seconds.get(text)
    if known is not None:
        return known
    if not isinstance(text, str):
        raise TypeError(f"a duration is text, not {type(text).__name__}")
    milliseconds = _duration_ms(text)
    if milliseconds is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 5m, 2h, 1h30m, 7d)")
    value = milliseconds // 1000 if milliseconds % 1000 == 0 else milliseconds / 1000
    return _remember(_seconds, text, value)


def size_bytes(text: str | int) -> int:
    """`"2G"` -> 2_000_000_000, `"1Gi"` -> 1_073_741_824; a number of bytes as it is (`65536`,
    and `65536.0`, which YAML gives for `65536.0` and JSON Schema counts as an integer)."""
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    text = str(text)
    known = _sizes.get(text)
    if known is not None:
        return known
    body = _without_final_newline(text)
    digits, unit = _leading_digits(body)
    if not digits or unit not in _SIZE_FACTOR:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G, 1Gi)")
    return _remember(_sizes, text, int(digits) * _SIZE_FACTOR[unit])


def percent(text: str) -> float:
    """`"150%"` -> 150.0 (one and a half CPUs)."""
    text = str(text)
    known = _percents.get(text)
    if known is not None:
        return known
    body = _without_final_newline(text)
    number = body[:-1]
    whole, dot, fraction = number.partition(".")
    if (not body.endswith("%") or not _all_digits(whole)
            or (dot and not _all_digits(fraction))):
        raise ValueError(f"not a percentage: {text!r} (use e.g. 50%)")
    return _remember(_percents, text, float(number))


def _duration_ms(text: str) -> int | None:
    """The sum of the `<digits><unit>` parts that make up all of `text`, or None."""
    body = _without_final_newline(text)
    if not body:
        return None
    total = 0
    while body:
        digits, body = _leading_digits(body)
        if not digits:
            return None
        unit = "ms" if body.startswith("ms") else body[:1]
        if unit not in _DURATION_MS:
            return None
        total += int(digits) * _DURATION_MS[unit]
        body = body[len(unit):]
    return total


def _leading_digits(text: str) -> tuple[str, str]:
    index = 0
    while index < len(text) and text[index].isdecimal():
        index += 1
    return text[:index], text[index:]


def _all_digits(text: str) -> bool:
    return bool(text) and text.isdecimal()


def _without_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _remember(cache: dict, text: str, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[text] = value
    return value
