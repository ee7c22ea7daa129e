"""The executor's inotify watch on every agent's queue.

A record lands in `queue/` by a rename (enqueue, a retry, a claim given back), and the kernel
reports each rename into a watched directory. So the watch wakes the executor for every queued
run, with its agent's name, whoever queued it and whether or not the wake pipe carried a
message: a lost wake-up no longer waits for the rescan. The pipe stays (it names the agent as
soon as the record has its name, and it is how `spos action cancel` nudges the executor); the
watch is a second, independent way in.

What the watch cannot say, it says it cannot: an overflow of the kernel's event queue asks for
every queue to be listed; a watched queue deleted, moved or unmounted asks for its agent's to
be listed (and watched again); an agent whose directory exists but whose queue cannot be
watched leaves the watch incomplete, and the executor then rescans as often as it did without
one (`complete`). When that queue is only not made yet (apply makes an agent's directory, then
the queue in it), the agent's directory is watched until it is."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from reconciler import AGENTS_DIR
from reconciler.errors import SposError
from reconciler.inotify import (IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_DONT_FOLLOW, IN_IGNORED,
                                IN_MOVE_SELF, IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW,
                                IN_UNMOUNT, Inotify, WatchFailed)

if TYPE_CHECKING:
    from reconciler.device import Device

LEFT = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
"""A watched directory is no longer where it was watched (IN_UNMOUNT comes unasked)."""
QUEUE_EVENTS = IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
"""A record renamed into the queue, or the queue gone. The creation and writing of a record's
temporary file are not asked for: they would wake the executor before the run can be seen."""
AGENTS_EVENTS = (IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
                 | IN_ONLYDIR | IN_DONT_FOLLOW)
"""An agent's directory made, removed or renamed (apply, an operator), or `agents/` gone."""
AGENT_EVENTS = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
"""In an agent's directory without a queue: the queue made, or the directory gone."""


class QueueWatch:
    """One inotify instance: a watch on `agents/` and one on each agent's `queue/`."""

    def __init__(self, device: "Device"):
        self.device = device
        self.inotify: Inotify | None = None
        self.problem: str | None = None  # why not every queue is watched, in words
        self.agents_wd: int | None = None
        self.agent_of: dict[int, str] = {}  # a queue's watch descriptor -> its agent
        self.wd_of: dict[str, int] = {}
        self.awaiting: dict[int, str] = {}  # an agent's directory, watched until its queue is made
        self.unwatched: set[str] = set()  # agents whose directory exists, their queue unwatched
        try:
            self.inotify = Inotify()
        except (OSError, WatchFailed) as exc:
            self.problem = str(exc)

    @property
    def fd(self) -> int:
        return self.inotify.fd if self.inotify is not None else -1

    @property
    def complete(self) -> bool:
        """Whether every agent's queue known to exist, and `agents/` itself, are watched."""
        return self.inotify is not None and self.agents_wd is not None and not self.unwatched

    def begin_listing_all(self) -> None:
        """Before every queue is listed: watch `agents/` (again, if it was replaced), and
        forget which agents were unwatched (the listing watches each one it finds)."""
        self.unwatched.clear()
        if self.inotify is None or self.agents_wd is not None:
            return
        self.agents_wd = self._add(AGENTS_DIR, AGENTS_EVENTS)

    def watch(self, agent: str) -> None:
        """Watch `agent`'s queue, before it is listed: what is renamed into it after the watch
        is reported, what came before is in the listing. Nothing when it is watched already."""
        if self.inotify is None or agent in self.wd_of:
            return
        wd = self._add(f"{AGENTS_DIR}/{agent}/queue", QUEUE_EVENTS)
        if wd is None and self._await_queue(agent):
            wd = self._add(f"{AGENTS_DIR}/{agent}/queue", QUEUE_EVENTS)  # made meanwhile?
        if wd is None:
            if self._is_agent(agent):
                self.unwatched.add(agent)
            return
        self.unwatched.discard(agent)
        for awaited in [w for w, a in self.awaiting.items() if a == agent]:
            del self.awaiting[awaited]
            self.inotify.remove_watch(awaited)
        previous = self.agent_of.get(wd)  # the same directory under another name: moved
        if previous is not None:
            self.wd_of.pop(previous, None)
        self.agent_of[wd] = agent
        self.wd_of[agent] = wd

    def read(self) -> tuple[set[str], bool, bool]:
        """What the queued events say: (the agents whose queue to list again, whether to list
        every queue, whether an agent's directory or queue came or went)."""
        agents: set[str] = set()
        everything = came_or_went = False
        for event in self.inotify.read() if self.inotify is not None else ():
            if event.mask & IN_Q_OVERFLOW:
                everything = True
            elif event.wd == self.agents_wd:
                if event.mask & (LEFT | IN_IGNORED):
                    self._forget_all()  # the queues watched are no longer the agents'
                    everything = True
                elif event.name and not event.name.startswith("."):
                    agents.add(event.name)
                came_or_went = True
            elif event.wd in self.awaiting:
                if event.name == "queue" or event.mask & (LEFT | IN_IGNORED):
                    agents.add(self.awaiting[event.wd])
                if event.mask & (LEFT | IN_IGNORED):
                    self.inotify.remove_watch(event.wd)
                    del self.awaiting[event.wd]
            elif event.wd in self.agent_of:
                agent = self.agent_of[event.wd]
                if event.mask & (LEFT | IN_IGNORED):
                    self._forget(event.wd)  # listed next, which watches a queue there again
                    self.wd_of.pop(agent, None)
                    came_or_went = True
                    agents.add(agent)
                elif not event.name.startswith("."):
                    agents.add(agent)
        return agents, everything, came_or_went

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    def _forget(self, wd: int) -> None:
        """Drop a watch whose directory left (a moved one would still report, elsewhere)."""
        if self.agent_of.pop(wd, None) is not None or wd == self.agents_wd:
            self.inotify.remove_watch(wd)  # refused (EINVAL) when the kernel dropped it already

    def _forget_all(self) -> None:
        for wd in (*self.agent_of, *self.awaiting, self.agents_wd):
            self.inotify.remove_watch(wd)
        self.agent_of.clear()
        self.wd_of.clear()
        self.awaiting.clear()
        self.agents_wd = None

    def _await_queue(self, agent: str) -> bool:
        """Watch the directory of an agent that has no queue yet, until it has one. False when
        there is no such directory (or it cannot be watched)."""
        if agent in self.awaiting.values():
            return False
        wd = self._add(f"{AGENTS_DIR}/{agent}", AGENT_EVENTS)
        if wd is None:
            return False
        self.awaiting[wd] = agent
        return True

    def _add(self, path: str, mask: int) -> int | None:
        try:
            return self.inotify.add_watch(self.device.host(path), mask)
        except (WatchFailed, SposError) as exc:
            self.problem = str(exc)
            return None

    def _is_agent(self, agent: str) -> bool:
        try:
            return os.path.isdir(self.device.host(f"{AGENTS_DIR}/{agent}"))
        except SposError:
            return False
