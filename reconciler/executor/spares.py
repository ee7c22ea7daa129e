"""Spare run cgroups: the emptied cgroup of an ended run is kept for the agent's next run.

Every run gets a cgroup of its own (cgroup.py), named after it. Making one and removing it
again costs the kernel more than the run's limits do: a directory in each of the seven v1
hierarchies, and, for each removed memory cgroup, one that lingers "dying" for as long as page
cache is charged to it. Hundreds of those slow every later cgroup operation on the machine
(docs/executor.md, "Spare cgroups"). So on cgroup v1 the executor keeps the emptied cgroup of an
ended run under its agent, renamed `spare-<executor pid>-<start ticks>-<random>`, and the
agent's next run takes it (`Cgroups.reuse`: renamed to the run's id, limits written again
where the agent's Quota or devices changed, counters taken as the run's zero). A run in a
reused cgroup is limited and counted as in a new one.

At most `per_agent` are kept for one agent and `total` in all (the least recently kept is
removed to make room); a spare that cannot be reused is removed, and the run gets a new
cgroup. The executor removes its spares when it stops; the next executor removes those of one
that died (`sweep`). An empty spare holds no process, so removing an agent's cgroup (a pruned
agent) removes its spares too. On cgroup v2 every run gets a new cgroup: a cgroup's peak memory
cannot be set back there on every kernel.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re

from reconciler.executor import owner
from reconciler.executor.cgroup import CgroupError, Cgroups, DeviceRule, Limits, RunCgroup

PREFIX = "spare-"
_NAME = re.compile(r"^spare-(\d+)-(\d+)-[0-9a-f]+$")


class SpareCgroups:
    """The spare cgroups one executor keeps, most recently kept last."""

    def __init__(self, cgroups: Cgroups, per_agent: int, total: int):
        self.cgroups = cgroups
        self.per_agent = per_agent
        self.total = total
        self._spares: list[RunCgroup] = []
        self._owner = owner.tag()

    def __len__(self) -> int:
        return len(self._spares)

    def take(self, name: str, limits: Limits, devices: tuple[DeviceRule, ...]) -> RunCgroup | None:
        """The cgroup for the run `name`, made of a spare under the same parent; None when
        there is none, or when it could not be reused (then it is gone: removed, or taken by
        the agent's removal)."""
        parent = posixpath.dirname(name)
        for index in range(len(self._spares) - 1, -1, -1):
            if _parent(self._spares[index]) == parent:
                spare = self._spares.pop(index)
                try:
                    return self.cgroups.reuse(spare, name, limits, devices)
                except CgroupError:
                    _remove(spare)
                    return None
        return None

    def keep(self, run: RunCgroup) -> bool:
        """Keep the emptied cgroup of an ended run as a spare of its parent; False when it is
        not kept (not v1, not empty, the agent has enough, or it cannot be renamed), and the
        caller removes it."""
        if run.version != 1 or self.total <= 0 or self.per_agent <= 0:
            return False
        parent = _parent(run)
        if sum(1 for spare in self._spares if _parent(spare) == parent) >= self.per_agent:
            return False
        try:
            if run.pids():
                return False
            spare = self.cgroups.rename(run, f"{parent}/{PREFIX}{self._owner}-{os.urandom(4).hex()}")
        except (CgroupError, OSError):
            return False
        self._spares.append(spare)
        while len(self._spares) > self.total:
            _remove(self._spares.pop(0))
        return True

    def retain(self, keep) -> None:
        """Remove the spares of the agents for which `keep(agent)` is false (no longer
        applied)."""
        for spare in [s for s in self._spares if not keep(posixpath.basename(_parent(s)))]:
            self._spares.remove(spare)
            _remove(spare)

    def close(self) -> None:
        """Remove every spare (the executor stops)."""
        while self._spares:
            _remove(self._spares.pop())


def sweep(cgroups: Cgroups, cgroup_parent: str, agent: str) -> None:
    """Remove the spare cgroups of `agent` that an executor which is gone kept."""
    parent = f"{cgroup_parent}/{agent}"
    for name in cgroups.children(parent):
        match = _NAME.match(name)
        if match and owner.gone(match[1], match[2]):
            _remove(cgroups.existing(f"{parent}/{name}"))


def _parent(run: RunCgroup) -> str:
    return posixpath.dirname(run.name)


def _remove(run: RunCgroup) -> None:
    """Remove a spare; one that cannot be removed now is left for the next sweep or for the
    agent's removal (nothing runs in it)."""
    with contextlib.suppress(CgroupError, OSError):
        run.remove()
