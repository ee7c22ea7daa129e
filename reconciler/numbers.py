"""Reading amounts and text that spos's own records hold, where a hand edit or a hostile
writer may have put anything.

Run records, progress lines, load samples and trigger events are written by spos, by actions
and by the world outside (a serial line, a webhook header). What reads them for a person or a
script must not fail on a wrong type, must print only JSON that every parser takes (no NaN,
no Infinity), and must not hand terminal control characters to the operator's terminal.
"""

from __future__ import annotations

import math
import re

LARGEST = 1e15
"""Larger amounts are not believed: no run lasts, counts or uses that much of anything (about
31 million years in seconds, a petabyte in bytes)."""


def amount(value, *, negative: bool = False) -> float | None:
    """`value` as a float when it is a plain, finite, believable number (not a bool, not a
    string, within LARGEST, and not below zero unless `negative`), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not -LARGEST <= value <= LARGEST:
        return None  # before float(), which overflows on a 400-digit integer
    value = float(value)
    if not math.isfinite(value) or abs(value) > LARGEST or (value < 0 and not negative):
        return None
    return value


def strict_json(value):
    """`value` as strict JSON can hold it: a float that is not finite (`1e999` or `NaN` in a
    record, which Python's parser reads and its writer writes back) is None, wherever it is."""
    if isinstance(value, dict):
        return {key: strict_json(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [strict_json(inner) for inner in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """`text` as a string safe to print on a terminal: control characters (escape sequences,
    bell, carriage return, and the C1 set) are shown as `\\xNN` escapes; tab and newline stay."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", str(text))
