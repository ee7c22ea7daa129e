"""Storage quotas: the space an agent's temporary files, outputs and logs take on disk.

A Quota's `storage: {temp, output, log}` bounds, per agent, the blocks used under
`agents/<agent>/tmp`, `output` and `logs` (docs/manifests.md). The executor measures them before
it starts a run (an agent already over a quota gets no new run) and while runs go on (a run
of an agent that goes over is stopped and fails, with the reason in its record).

Measuring walks the directory like `du`: allocated blocks of every file and directory, a file
with several links counted once, symbolic links never followed (a link is counted as itself).
The walk is bounded (`MAX_ENTRIES`): past it, the directory is reported as over its quota
rather than walked for ever, which is said in the reason.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from reconciler import AGENTS_DIR
from reconciler.views import human_size

MAX_ENTRIES = 500_000
DIRECTORIES = {"temp": "tmp", "output": "output", "log": "logs"}


@dataclass(frozen=True)
class Usage:
    bytes: int
    complete: bool = True  # False: the walk stopped at MAX_ENTRIES


def usage(host_dir: str, max_entries: int = MAX_ENTRIES) -> Usage:
    """Bytes allocated under `host_dir` (0 when it does not exist), links never followed."""
    total, seen, count = 0, set(), 0
    pending = [host_dir]
    while pending:
        directory = pending.pop()
        try:
            entries = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with entries:
            for entry in entries:
                count += 1
                if count > max_entries:
                    return Usage(total, complete=False)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
    return Usage(total)


def over_quota(device, agent: str, limits: dict[str, int]) -> str | None:
    """Why `agent` is over one of its storage quotas (`limits`: {"temp"|"output"|"log": bytes},
    as in the compiled quota's storageBytes), or None."""
    for name, limit in sorted(limits.items()):
        directory = DIRECTORIES.get(name)
        if directory is None or limit is None:
            continue
        used = usage(device.host(f"{AGENTS_DIR}/{agent}/{directory}"))
        if not used.complete:
            return (f"{name} storage quota {human_size(limit)} exceeded: more than {MAX_ENTRIES} "
                    f"entries under {directory}/")
        if used.bytes > limit:
            return f"{name} storage quota exceeded: {directory}/ uses {human_size(used.bytes)} of {human_size(limit)}"
    return None

