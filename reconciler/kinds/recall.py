"""What a kind whose resource is one file knows of it from the plan memo (memo.py)."""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING, Callable

from reconciler.resource import Resource

if TYPE_CHECKING:
    import os

    from reconciler.memo import PlanMemo


def recall(memo: "PlanMemo", key: str, stats: tuple[os.stat_result | None, ...], rid: str,
           kind: str, read: Callable[[], Resource | None]) -> Resource | None:
    """The resource `rid`, whose file's stat is `stats[0]` (other stats it depends on after
    it): known by the digest remembered for these exact stats, and read only if its attributes
    are needed; else read now and remembered. None when the file is absent."""
    if stats[0] is None:
        return None
    known = memo.lookup(key, stats) if stat.S_ISREG(stats[0].st_mode) else None
    if known is not None:
        return Resource(rid, kind, digest=known, load=read)
    resource = read()
    if resource is not None:
        memo.remember(key, stats, resource.digest)
    return resource
