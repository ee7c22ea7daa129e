"""Prepared sandboxes: the next run of a recently active agent starts in a sandbox set up ahead.

Setting up a sandbox (the cgroup, bubblewrap's namespaces and mounts, the launcher) is most of
the time between a run being claimed and its action starting. Once an agent that ran recently
has no run active and the executor has nothing else to do, the executor prepares one sandbox
of that agent's shape (`Sandbox.prepare`): bubblewrap builds the view and the launcher waits
for a run. (Never beside a run of the agent: its processes and memory count in the agent's
cgroup, whose Quota is its runs'.) The agent's
next run that has the same shape (the same capability, quota and user: what `SandboxSpec`
holds besides the run's own argv, environment, working directory and directories) is handed to
it; any other run starts afresh, and the unused sandbox is closed. So what a run can do does
not depend on whether it found one prepared (tests/test_sandbox.py checks that a prepared run
is kept to its own directories; docs/sandbox.md, "Prepared sandboxes").

At most `limit` are kept, one per agent, each closed after `idle` seconds unused; the executor
closes them all when it stops. Each holds bubblewrap's two processes and a waiting launcher
in a cgroup named `warm-<pid>-<start ticks>-<random>` under its agent's, which becomes the run's
cgroup when a run takes it. If the executor dies, bubblewrap's --die-with-parent ends them, and
the next executor removes the cgroups whose owner is gone (`sweep`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from reconciler.executor.owner import alive, identity
from reconciler.executor.sandbox import PreparedSandbox, SandboxError, SandboxSpec

PREFIX = "warm-"
_NAME = re.compile(r"^warm-(\d+)-(\d+)-[0-9a-f]+$")


@dataclass
class Slot:
    """One prepared sandbox and the executor's ends of its output and progress pipes."""

    agent: str
    sandbox: PreparedSandbox
    output_fd: int
    progress_fd: int
    progress_number: int  # the progress pipe's number in the run (SPOS_PROGRESS_FD)
    expires: float

    def close(self) -> None:
        """Never raises: a prepared sandbox that cannot be cleaned up now (a process stuck in
        the kernel) leaves its cgroup, which the next executor removes (`sweep`); the
        executor's own work goes on."""
        try:
            self.sandbox.close()
        except (SandboxError, OSError):
            pass
        finally:
            for fd in (self.output_fd, self.progress_fd):
                os.close(fd)


class PreparedPool:
    def __init__(self, sandbox, cgroup_parent: str, limit: int, idle: float):
        self.sandbox = sandbox
        self.cgroup_parent = cgroup_parent
        self.limit = limit
        self.idle = idle
        self.slots: dict[str, Slot] = {}
        self.wanted: dict[str, SandboxSpec] = {}  # agent -> its latest run's spec, oldest first
        self.last_run: dict[str, int] = {}  # agent -> when its latest run started (a counter)
        self._runs = 0
        owner = identity()
        self._owner = f"{owner['pid']}-{owner['startTicks']}"

    def take(self, agent: str, spec: SandboxSpec) -> Slot | None:
        """The agent's prepared sandbox if `spec` fits it (the caller then owns the slot's
        fds and starts or closes it); None otherwise (an unfit one is closed)."""
        slot = self.slots.pop(agent, None)
        if slot is not None and not slot.sandbox.matches(spec):
            slot.close()
            return None
        return slot

    def has(self, agent: str) -> bool:
        """Whether a prepared sandbox waits for `agent`'s next run (of whatever shape)."""
        return agent in self.slots

    def want(self, agent: str, spec: SandboxSpec) -> None:
        """A run of `agent` just started with `spec`: keep a sandbox of its shape ready."""
        if self.limit <= 0 or self.sandbox.unpreparable(spec):
            return
        self.wanted.pop(agent, None)
        self.wanted[agent] = spec
        self._runs += 1
        self.last_run[agent] = self._runs

    def pending(self, idle) -> bool:
        """Whether `fill(idle)` has work to do."""
        return self._next(idle) is not None

    def fill(self, idle) -> Slot | None:
        """Prepare one sandbox: for the most recently active agent that has none and for
        which `idle(agent)` is true (no run of it is active, so a prepared sandbox never takes
        from its runs' share of the agent's cgroup). At the limit, the sandbox of the least
        recently active agent makes room, if that agent ran before this one. One that cannot
        be prepared is not tried again until that agent's next run starts."""
        agent = self._next(idle)
        if agent is None:
            return None
        if len(self.slots) >= self.limit:  # the least recently active agent's makes room
            self.slots.pop(self._least_recent()).close()
        spec = self.wanted.pop(agent)
        output_read, output_write = os.pipe2(os.O_CLOEXEC)
        progress_read, progress_write = os.pipe2(os.O_CLOEXEC)
        try:
            prepared = self.sandbox.prepare(
                spec, f"{self.cgroup_parent}/{agent}/{PREFIX}{self._owner}-{os.urandom(4).hex()}",
                stdout=output_write, stderr=output_write, pass_fds=(progress_write,))
        except Exception:  # an optimisation only: whatever went wrong, runs start afresh
            os.close(output_read)
            os.close(progress_read)
            return None
        finally:
            os.close(output_write)
            os.close(progress_write)
        slot = Slot(agent, prepared, output_read, progress_read, progress_write,
                    time.monotonic() + self.idle)
        self.slots[agent] = slot
        return slot

    def _next(self, idle) -> str | None:
        agent = next((a for a in reversed(self.wanted) if a not in self.slots and idle(a)), None)
        if agent is None or self.limit <= 0:
            return None
        if len(self.slots) >= self.limit and \
                self.last_run.get(self._least_recent(), 0) >= self.last_run.get(agent, 0):
            return None
        return agent

    def _least_recent(self) -> str:
        return min(self.slots, key=lambda a: self.last_run.get(a, 0))

    def next_expiry(self) -> float | None:
        return min((slot.expires for slot in self.slots.values()), default=None)

    def expire(self, now: float) -> None:
        for agent, slot in list(self.slots.items()):
            if slot.expires <= now:
                del self.slots[agent]
                slot.close()

    def retain(self, keep) -> None:
        """Close the prepared sandboxes of the agents for which `keep(agent)` is false (those
        no longer applied: their cgroup's removal waits for it)."""
        for agent in [a for a in self.slots if not keep(a)]:
            self.slots.pop(agent).close()
        for agent in [a for a in self.wanted if not keep(a)]:
            del self.wanted[agent]
        for agent in [a for a in self.last_run if not keep(a)]:
            del self.last_run[agent]

    def close(self) -> None:
        self.wanted.clear()
        self.last_run.clear()
        while self.slots:
            _, slot = self.slots.popitem()
            slot.close()



def sweep(sandbox, cgroup_parent: str, agent: str) -> None:
    """Remove the cgroups of `agent`'s prepared sandboxes whose executors are gone (their
    processes died with them: bubblewrap's --die-with-parent)."""
    parent = f"{cgroup_parent}/{agent}"
    boot = identity()["bootId"]
    for name in sandbox.cgroups.children(parent):
        match = _NAME.match(name)
        if match and not alive({"pid": int(match[1]), "startTicks": int(match[2]), "bootId": boot}):
            sandbox.reap(f"{parent}/{name}")
