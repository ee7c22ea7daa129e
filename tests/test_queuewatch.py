"""The executor's inotify watch on the queues (reconciler/executor/queuewatch.py), against the
real kernel: what it reports, and that it says when it cannot watch something, so the executor
falls back to rescanning every 30 s (docs/executor.md, "Waking up")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.executor.dispatch import RESCAN_UNWATCHED, Executor, Settings
from reconciler.executor.queuewatch import QueueWatch
from reconciler.inotify import Inotify, WatchFailed

AGENTS = AGENTS_DIR.lstrip("/")


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / AGENTS / "alpha" / "queue").mkdir(parents=True)
    return tmp_path


def queue(root: Path, agent: str = "alpha") -> Path:
    return root / AGENTS / agent / "queue"


def enqueued(root: Path, name: str, agent: str = "alpha") -> None:
    """What enqueue does: a temporary file written, then renamed into the queue."""
    temporary = queue(root, agent) / f".{name}.spos-tmp-1"
    temporary.write_text("{}")
    temporary.rename(queue(root, agent) / name)


def listed_all(root: Path) -> QueueWatch:
    """A watch as the executor's first listing of every queue leaves it."""
    watch = QueueWatch(Device(str(root)))
    watch.begin_listing_all()
    for agent in sorted(os.listdir(root / AGENTS)):
        watch.watch(agent)
    return watch


def test_a_run_renamed_into_a_queue_names_its_agent_and_its_temporary_file_wakes_nothing(root):
    (root / AGENTS / "beta" / "queue").mkdir(parents=True)
    watch = listed_all(root)
    assert watch.complete
    (queue(root) / ".050-1-a.json.spos-tmp-1").write_text("{}")
    assert not watch.inotify.readable(0.05)  # no wake-up before the run can be seen
    (queue(root) / ".050-1-a.json.spos-tmp-1").rename(queue(root) / "050-1-a.json")
    enqueued(root, "050-2-b.json", "beta")
    assert watch.read() == ({"alpha", "beta"}, False, False)
    assert watch.read() == (set(), False, False)
    watch.close()


def test_a_queue_removed_and_made_again_is_watched_again(root):
    watch = listed_all(root)
    queue(root).rmdir()
    assert watch.read() == ({"alpha"}, False, True)
    watch.watch("alpha")  # what the listing that follows does: no queue, so its agent's directory
    assert watch.complete and "alpha" in watch.awaiting
    queue(root).mkdir()
    assert watch.read()[0] == {"alpha"}
    watch.watch("alpha")
    assert watch.complete
    enqueued(root, "050-1-a.json")
    assert watch.read()[0] == {"alpha"}
    watch.close()


def test_a_queue_moved_away_is_no_longer_followed(root):
    watch = listed_all(root)
    queue(root).rename(queue(root).with_name("queue.old"))
    assert watch.read() == ({"alpha"}, False, True)
    (queue(root).with_name("queue.old") / "050-1-a.json").write_text("{}")
    (queue(root).with_name("queue.old") / "050-1-a.json").rename(
        queue(root).with_name("queue.old") / "050-1-b.json")
    assert watch.read() == (set(), False, False)  # not a queue any more
    watch.close()


def test_a_new_agent_is_watched_once_apply_has_made_its_queue(root):
    watch = listed_all(root)
    (root / AGENTS / "gamma").mkdir()
    agents, everything, came = watch.read()
    assert agents == {"gamma"} and came and not everything
    watch.watch("gamma")  # listed before its queue exists: its directory is watched instead
    assert watch.complete and "gamma" in watch.awaiting
    queue(root, "gamma").mkdir()
    assert watch.read()[0] == {"gamma"}
    watch.watch("gamma")
    assert watch.complete
    enqueued(root, "050-1-a.json", "gamma")
    assert watch.read()[0] == {"gamma"}
    watch.close()


def test_names_that_are_not_agents_leave_the_watch_complete(root):
    """Anyone may write a name on the wake pipe: one with no agent's directory is not an
    unwatched queue (it would keep the rescan at 30 s)."""
    watch = listed_all(root)
    watch.watch("nobody")
    assert watch.complete
    watch.close()


def test_the_agents_directory_replaced_asks_for_every_queue(root):
    watch = listed_all(root)
    (root / AGENTS).rename(root / "agents.old")
    (root / AGENTS / "alpha" / "queue").mkdir(parents=True)
    agents, everything, came = watch.read()
    assert everything and came
    assert not watch.complete
    watch.begin_listing_all()
    watch.watch("alpha")
    assert watch.complete
    enqueued(root, "050-1-a.json")
    assert watch.read()[0] == {"alpha"}
    watch.close()


def overflowed(root: Path) -> QueueWatch:
    """A watch whose kernel event queue overflowed. The limit is read when an inotify instance
    is made: it is lowered for that moment only."""
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")
    saved = limit.read_text()
    try:
        limit.write_text("4\n")
        watch = listed_all(root)
    finally:
        limit.write_text(saved)
    for index in range(10):
        enqueued(root, f"050-{index}-a.json")
    return watch


def test_an_overflow_of_the_kernels_event_queue_asks_for_every_queue(root):
    watch = overflowed(root)
    agents, everything, _ = watch.read()
    assert everything
    watch.close()


def test_a_queue_that_cannot_be_watched_brings_the_rescan_back_to_30_seconds(root, monkeypatch):
    device = Device(str(root))
    executor = Executor(device, sandbox=None, settings=Settings(rescan=3600, cleanup_interval=0))
    executor._watch_queues()
    executor._list_queues()
    assert executor.watch.complete and executor._rescan_interval() == 3600

    add_watch = Inotify.add_watch

    def refused(self, path, mask):  # watches made before stay (the kernel gives them back)
        if "/beta" in path:
            raise WatchFailed("inotify watch limit reached (sysctl fs.inotify.max_user_watches is 1)")
        return add_watch(self, path, mask)

    monkeypatch.setattr(Inotify, "add_watch", refused)
    (root / AGENTS / "beta" / "queue").mkdir(parents=True)
    executor.list_all = True
    executor._list_queues()
    assert not executor.watch.complete and executor.watch.unwatched == {"beta"}
    assert executor._rescan_interval() == RESCAN_UNWATCHED
    assert "max_user_watches" in executor.watch.problem
    executor.watch.close()


def test_the_first_rescan_at_start_sets_the_long_interval_once_every_queue_is_watched(root):
    """At start nothing is watched yet; the start's listing watches every queue, so an idle
    executor does not look at every queue again 30 s later."""
    device = Device(str(root))
    executor = Executor(device, sandbox=None, settings=Settings(rescan=3600, cleanup_interval=0))
    executor._watch_queues()
    assert not executor.watch.complete
    executor.dispatch()
    assert executor.watch.complete
    assert executor.next_rescan - time.monotonic() > 3600 - 60
    executor.watch.close()


def test_a_queue_unwatchable_at_start_brings_the_first_rescan_within_30_seconds(root, monkeypatch):
    add_watch = Inotify.add_watch

    def refused(self, path, mask):
        if "/alpha" in path:
            raise WatchFailed("inotify watch limit reached (sysctl fs.inotify.max_user_watches is 1)")
        return add_watch(self, path, mask)

    monkeypatch.setattr(Inotify, "add_watch", refused)
    executor = Executor(Device(str(root)), sandbox=None,
                        settings=Settings(rescan=3600, cleanup_interval=0))
    executor._watch_queues()
    executor.dispatch()
    assert executor.watch.unwatched == {"alpha"}
    assert executor.next_rescan - time.monotonic() <= RESCAN_UNWATCHED
    executor.watch.close()


def relisted(watch: QueueWatch, root: Path) -> None:
    """What the executor's next listing of every queue does."""
    watch.begin_listing_all()
    for agent in sorted(os.listdir(root / AGENTS)):
        watch.watch(agent)


def test_an_agents_directory_moved_away_and_made_again_has_its_new_queue_watched(root):
    """The old queue sends nothing (it was not moved itself): the listing finds that the queue
    there now is another directory."""
    watch = listed_all(root)
    (root / AGENTS / "alpha").rename(root / "alpha.old")
    queue(root).mkdir(parents=True)
    agents, _, _ = watch.read()
    assert agents == {"alpha"}
    watch.watch("alpha")
    assert watch.complete
    enqueued(root, "050-1-a.json")
    assert watch.read()[0] == {"alpha"}
    (root / "alpha.old" / "queue" / "x.json").write_text("{}")
    (root / "alpha.old" / "queue" / "x.json").rename(root / "alpha.old" / "queue" / "y.json")
    assert watch.read()[0] == set()  # the old one is watched no more
    watch.close()


def test_two_agents_directories_swapped_are_reported_under_their_own_names(root):
    (root / AGENTS / "beta" / "queue").mkdir(parents=True)
    watch = listed_all(root)
    alpha, beta, swap = (root / AGENTS / name for name in ("alpha", "beta", "swap"))
    alpha.rename(swap)
    beta.rename(alpha)
    swap.rename(beta)
    for agent in watch.read()[0]:
        watch.watch(agent)
    enqueued(root, "050-1-a.json", "beta")
    assert watch.read()[0] == {"beta"}
    enqueued(root, "050-2-a.json", "alpha")
    assert watch.read()[0] == {"alpha"}
    watch.close()


def test_a_queue_made_again_while_events_were_lost_is_watched_after_the_listing(root):
    watch = overflowed(root)
    for name in os.listdir(queue(root)):
        os.unlink(queue(root) / name)
    queue(root).rmdir()  # its IN_DELETE_SELF and IN_IGNORED are lost with the rest
    queue(root).mkdir()
    assert watch.read()[1]
    relisted(watch, root)
    assert watch.complete
    enqueued(root, "050-x-a.json")
    assert watch.read()[0] == {"alpha"}
    watch.close()


def test_a_deleted_agent_whose_history_is_kept_leaves_the_watch_complete(root):
    """apply removes a deleted agent's config and its empty run directories, and keeps its
    history: its directory is watched (a queue made there is reported), so the rescan need
    not come every 30 s for it."""
    (root / AGENTS / "alpha" / "completed").mkdir()
    watch = listed_all(root)
    queue(root).rmdir()
    for agent in watch.read()[0]:
        watch.watch(agent)
    relisted(watch, root)
    assert watch.complete
    queue(root).mkdir()
    assert watch.read()[0] == {"alpha"}
    watch.close()


def test_an_agent_without_a_queue_whose_directory_cannot_be_watched_says_why(root, monkeypatch):
    add_watch = Inotify.add_watch

    def refused(self, path, mask):
        if path.endswith("/delta"):
            raise WatchFailed("inotify watch limit reached (sysctl fs.inotify.max_user_watches is 1)")
        return add_watch(self, path, mask)

    monkeypatch.setattr(Inotify, "add_watch", refused)
    (root / AGENTS / "delta").mkdir()
    watch = listed_all(root)
    assert not watch.complete and watch.unwatched == {"delta"}
    assert "max_user_watches" in watch.problem
    watch.close()
