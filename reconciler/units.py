"""The quantities manifests are written in: durations, byte sizes, CPU percentages. Pure."""

from __future__ import annotations

import re
from functools import lru_cache

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d))+$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SIZE = re.compile(r"^(\d+)(K|M|G|T|Ki|Mi|Gi|Ti)?$")
_SIZE_FACTOR = {
    None: 1,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


@lru_cache(maxsize=1024)
def seconds(text: str) -> int | float:
    """`"1h30m"` -> 5400, `"1500ms"` -> 1.5. Raises ValueError for anything else."""
    if not _DURATION.match(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 5m, 2h, 1h30m, 7d)")
    milliseconds = sum(int(n) * _DURATION_MS[unit] for n, unit in _DURATION_PART.findall(text))
    return milliseconds // 1000 if milliseconds % 1000 == 0 else milliseconds / 1000


@lru_cache(maxsize=1024)
def size_bytes(text: str) -> int:
    """`"2G"` -> 2_000_000_000, `"1Gi"` -> 1_073_741_824."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G, 1Gi)")
    return int(match.group(1)) * _SIZE_FACTOR[match.group(2)]


@lru_cache(maxsize=1024)
def percent(text: str) -> float:
    """`"150%"` -> 150.0 (one and a half CPUs)."""
    match = _PERCENT.match(str(text))
    if not match:
        raise ValueError(f"not a percentage: {text!r} (use e.g. 50%)")
    return float(match.group(1))
