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
    """One inotify instance: a watch on `agents/` and one on each agent's `queue/` (or, while
    it has none, on the agent's directory)."""

    def __init__(self, device: "Device"):
        self.device = device
        self.inotify: Inotify | None = None
        self.problem: str | None = None  # why some queue is not watched, in words
        self.agents_wd: int | None = None
        self.agent_of: dict[int, str] = {}  # a queue's watch descriptor -> its agent
        self.wd_of: dict[str, int] = {}
        self.awaiting: dict[str, int] = {}  # agent -> its directory's watch, until it has a queue
        # agents whose directory exists, and neither it nor a queue in it is watched
        self.unwatched: set[str] = set()
        self.listed = False  # whether every queue was listed (and so watched) once
        try:
            self.inotify = Inotify()
        except (OSError, WatchFailed) as exc:
            self.problem = str(exc)

    @property
    def fd(self) -> int:
        return self.inotify.fd if self.inotify is not None else -1

    @property
    def complete(self) -> bool:
        """Whether `agents/` and every agent's queue known to exist (or, for an agent without
        one, its directory) are watched."""
        return self.inotify is not None and self.agents_wd is not None and not self.unwatched

    def begin_listing_all(self) -> None:
        """Before every queue is listed: watch `agents/` (again: what is there now may be
        another directory than the one watched), and forget which agents were unwatched and
        why (the listing watches each agent it finds)."""
        self.unwatched.clear()
        self.listed = True
        if self.inotify is None:
            return
        self.problem = None
        wd, problem = self._add(AGENTS_DIR, AGENTS_EVENTS)
        if wd != self.agents_wd and self.agents_wd is not None:
            self._forget_all()  # a new agents/: the queues watched may be the old one's
        self.agents_wd = wd
        if wd is None and problem:  # not made yet (no agent applied): not worth a word
            self.problem = problem

    def watch(self, agent: str) -> None:
        """Watch `agent`'s queue, before it is listed: what is renamed into it after the watch
        is reported, what came before is in the listing. The watch is made again each time:
        the directory there now may not be the one watched (an agent's directory replaced,
        two swapped, events lost to an overflow), and for one already watched the kernel
        gives back its descriptor."""
        if self.inotify is None:
            return
        queue = f"{AGENTS_DIR}/{agent}/queue"
        wd, problem = self._add(queue, QUEUE_EVENTS)
        if wd is None:
            self._unwatch(agent)
            awaiting, why = self._await_queue(agent)
            if awaiting:
                wd, problem = self._add(queue, QUEUE_EVENTS)  # made in between?
            else:
                problem = problem or why
        if wd is None:
            if agent not in self.awaiting and self._is_agent(agent):
                self.unwatched.add(agent)
                self.problem = problem or self.problem
            else:
                self.unwatched.discard(agent)
            return
        self.unwatched.discard(agent)
        awaited = self.awaiting.pop(agent, None)
        if awaited is not None:
            self._remove(awaited)
        if self.wd_of.get(agent) not in (None, wd):
            self._unwatch(agent)
        previous = self.agent_of.get(wd)  # the same directory under another name: moved
        if previous is not None and previous != agent:
            self.wd_of.pop(previous, None)
        self.agent_of[wd] = agent
        self.wd_of[agent] = wd

    def read(self) -> tuple[set[str], bool, bool]:
        """What the queued events say: (the agents whose queue to list again, whether to list
        every queue, whether an agent's directory or queue came or went)."""
        agents: set[str] = set()
        everything = came_or_went = False
        awaited = {wd: agent for agent, wd in self.awaiting.items()}
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
            elif event.wd in awaited:
                agent = awaited[event.wd]
                if event.name == "queue" or event.mask & (LEFT | IN_IGNORED):
                    agents.add(agent)  # listed next, which watches its queue
                if event.mask & (LEFT | IN_IGNORED) and self.awaiting.get(agent) == event.wd:
                    self._remove(self.awaiting.pop(agent))
                    came_or_went = True
            elif event.wd in self.agent_of:
                agent = self.agent_of[event.wd]
                if event.mask & (LEFT | IN_IGNORED):
                    self._unwatch(agent)  # listed next, which watches a queue there again
                    came_or_went = True
                    agents.add(agent)
                elif not event.name.startswith("."):
                    agents.add(agent)
        return agents, everything, came_or_went

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    def _unwatch(self, agent: str) -> None:
        wd = self.wd_of.pop(agent, None)
        if wd is not None and self.agent_of.get(wd) == agent:
            del self.agent_of[wd]
            self._remove(wd)

    def _forget_all(self) -> None:
        for wd in (*self.agent_of, *self.awaiting.values(), self.agents_wd):
            if wd is not None:
                self._remove(wd)
        self.agent_of.clear()
        self.wd_of.clear()
        self.awaiting.clear()
        self.agents_wd = None

    def _await_queue(self, agent: str) -> tuple[bool, str | None]:
        """Watch the directory of an agent that has no queue (apply has not made it yet, or
        deleted the agent and kept its history): the queue's making is reported. (False, why)
        when there is no such directory (why: None), or it cannot be watched."""
        wd, why = self._add(f"{AGENTS_DIR}/{agent}", AGENT_EVENTS)
        old = self.awaiting.pop(agent, None)
        if old is not None and old != wd:
            self._remove(old)  # another directory than the one watched, or none
        if wd is None:
            return False, why
        self.awaiting[agent] = wd
        return True, None

    def _add(self, path: str, mask: int) -> tuple[int | None, str | None]:
        """The watch descriptor of `path`, or None and why not (None: it does not exist)."""
        try:
            return self.inotify.add_watch(self.device.host(path), mask), None
        except (WatchFailed, SposError) as exc:
            return None, str(exc)

    def _remove(self, wd: int) -> None:
        self.inotify.remove_watch(wd)  # refused (EINVAL) when the kernel dropped it already

    def _is_agent(self, agent: str) -> bool:
        try:
            return os.path.isdir(self.device.host(f"{AGENTS_DIR}/{agent}"))
        except SposError:
            return False
