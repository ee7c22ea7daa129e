"""The filesystem trigger source on real inotify: which file events fire, with what data, and
that none are lost to settling, overflows or a watched directory that is replaced.

Each test ends with a sentinel: one more file event, awaited last. The source handles inotify
events in order, so once the sentinel has been emitted, everything the earlier actions caused
has been emitted too, and the recorded list can be compared exactly."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from reconciler.triggers.base import Context, Event, Outcome, Registration
from reconciler.triggers import filesystem
from reconciler.inotify import Inotify, watch_failure
from reconciler.triggers.filesystem import open_source
from waiting import wait_for

WATCHED = "/srv/in"


class Recorder:
    """The `emit` of these tests: records each event's data, and the size the event's file had
    when it was emitted (None when it no longer existed)."""

    def __init__(self, device: Path):
        self.device = device
        self.events: list[dict] = []
        self.sizes: list[int | None] = []
        self.release = threading.Event()
        self.release.set()
        self.blocked = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        if not self.release.is_set():
            self.blocked.set()
            self.release.wait(10)
        host = self.device / event.data["path"].lstrip("/")
        with self._lock:
            self.events.append(event.data)
            self.sizes.append(host.stat().st_size if host.exists() else None)
        return Outcome("queued", run="r1")

    def recorded(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def wait_for_event(self, name: str, event: str, timeout: float = 3) -> list[dict]:
        """Everything recorded, once an `event` for the file `name` is among it."""
        wait_for(lambda: any(e["name"] == name and e["event"] == event for e in self.recorded()),
                 f"{event} {name}", timeout)
        return self.recorded()


@pytest.fixture
def device(tmp_path) -> Path:
    root = tmp_path / "device"
    (root / WATCHED.lstrip("/")).mkdir(parents=True)
    return root


@pytest.fixture
def watch(device):
    """Starts a filesystem source on the device with the given `filesystem` section (path
    defaults to WATCHED); returns it and its recorder. Every source is stopped afterwards."""
    sources = []

    def start(**config):
        config.setdefault("path", WATCHED)
        recorder = Recorder(device)
        registration = Registration(name="drop", agent="a", task="t", type="filesystem", config=config)
        source = open_source(registration, recorder, Context(host=lambda path: str(device) + path))
        sources.append(source)
        source.start()
        return source, recorder

    yield start
    for source in sources:
        source.stop()


def host(device: Path, name: str, under: str = WATCHED) -> Path:
    return device / under.lstrip("/") / name


def event(name: str, kind: str, under: str = WATCHED, **extra) -> dict:
    """The data the source emits for the file `name` below `under`."""
    return {"path": f"{under}/{name}", "event": kind, "name": name, **extra}


def by_name(events: list[dict]) -> list[dict]:
    return sorted(events, key=lambda e: (e["name"], e["event"]))


# What fires, with what data


def test_a_written_file_fires_create_and_close_write_by_default(device, watch):
    source, recorder = watch()
    host(device, "a.txt").write_text("hello")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [
        event("a.txt", "create"), event("a.txt", "close_write"),
        event("end.txt", "create"), event("end.txt", "close_write"),
    ]
    assert source.status().state == "armed"
    assert source.status().detail == "watching 1 directory"


def test_only_the_configured_events_fire(device, watch):
    _, recorder = watch(events=["close_write"])
    host(device, "a.txt").write_text("hello")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [
        event("a.txt", "close_write"), event("end.txt", "close_write"),
    ]


def test_files_there_before_start_are_not_events_but_their_changes_are(device, watch):
    host(device, "old.log").write_text("one\n")
    host(device, "end.log").write_text("")
    _, recorder = watch(events=["modify"])
    for name in ("old.log", "end.log"):
        with host(device, name).open("a") as handle:
            handle.write("more\n")

    assert recorder.wait_for_event("end.log", "modify") == [
        event("old.log", "modify"), event("end.log", "modify"),
    ]


def test_a_deleted_file_fires_delete(device, watch):
    host(device, "gone.txt").write_text("")
    host(device, "end.txt").write_text("")
    _, recorder = watch(events=["delete"])
    host(device, "gone.txt").unlink()
    host(device, "end.txt").unlink()

    assert recorder.wait_for_event("end.txt", "delete") == [
        event("gone.txt", "delete"), event("end.txt", "delete"),
    ]


def test_a_rename_within_the_path_fires_move_with_where_it_came_from(device, watch):
    host(device, "a.txt").write_text("")
    _, recorder = watch(events=["move"])
    host(device, "a.txt").rename(host(device, "b.txt"))

    assert recorder.wait_for_event("b.txt", "move") == [
        event("b.txt", "move", **{"from": f"{WATCHED}/a.txt"}),
    ]


def test_a_partial_upload_renamed_into_place_fires_once(device, watch):
    _, recorder = watch(events=["close_write", "move"], patterns=["*.csv"], ignore=["*.part"])
    host(device, "x.csv.part").write_text("a,b\n1,2\n")
    host(device, "x.csv.part").rename(host(device, "x.csv"))
    host(device, "end.csv").write_text("")

    assert recorder.wait_for_event("end.csv", "close_write") == [
        event("x.csv", "move", **{"from": f"{WATCHED}/x.csv.part"}),
        event("end.csv", "close_write"),
    ]


def test_moves_into_and_out_of_the_path_fire_move_without_the_outside_end(device, watch):
    outside = device / "srv" / "outside"
    outside.mkdir()
    (outside / "in.csv").write_text("")
    host(device, "out.csv").write_text("")
    _, recorder = watch(events=["move"])
    (outside / "in.csv").rename(host(device, "in.csv"))
    host(device, "out.csv").rename(outside / "out.csv")
    (outside / "end.csv").write_text("")
    (outside / "end.csv").rename(host(device, "end.csv"))

    assert recorder.wait_for_event("end.csv", "move") == [
        event("in.csv", "move"), event("out.csv", "move"), event("end.csv", "move"),
    ]


def test_a_file_renamed_so_that_it_no_longer_matches_fires_at_its_old_path_with_where_it_went(device, watch):
    host(device, "report.csv").write_text("")
    _, recorder = watch(events=["move"], patterns=["*.csv"])
    host(device, "report.csv").rename(host(device, "report.csv.done"))
    host(device, "end.done").write_text("")
    host(device, "end.done").rename(host(device, "end.csv"))

    assert recorder.wait_for_event("end.csv", "move") == [
        event("report.csv", "move", to=f"{WATCHED}/report.csv.done"),
        event("end.csv", "move", **{"from": f"{WATCHED}/end.done"}),
    ]


def test_patterns_select_files_and_ignore_overrides_them(device, watch):
    _, recorder = watch(events=["close_write"], patterns=["*.csv", "*.json"], ignore=[".*", "*.tmp.csv"])
    for name in ("a.csv", "b.txt", ".a.csv", "c.tmp.csv", "d.json", "end.csv"):
        host(device, name).write_text("")

    assert recorder.wait_for_event("end.csv", "close_write") == [
        event("a.csv", "close_write"), event("d.json", "close_write"), event("end.csv", "close_write"),
    ]


def test_a_pattern_without_a_slash_also_matches_the_file_name_in_subdirectories(device, watch):
    source, recorder = watch(events=["close_write"], recursive=True, patterns=["data-*"], ignore=[".*"])
    host(device, "sub").mkdir()
    # once sub/ is watched, its files are seen as they are written (not also by a listing)
    wait_for(lambda: "2 directories" in source.status().detail, "sub/ to be watched", 3)
    for name in ("sub/data-1.csv", "sub/.data-2.swp", "sub/other.csv", "data-end"):
        host(device, name).write_text("")

    assert recorder.wait_for_event("data-end", "close_write") == [
        event("sub/data-1.csv", "close_write"), event("data-end", "close_write"),
    ]


# Directories


def test_recursive_watches_directories_created_after_start(device, watch):
    host(device, "existing").mkdir()
    source, recorder = watch(events=["close_write"], recursive=True)
    host(device, "existing/a.txt").write_text("")
    host(device, "later").mkdir()
    wait_for(lambda: source.status().detail == "watching 3 directories", "the new directory watched", 3)
    host(device, "later/b.txt").write_text("")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [
        event("existing/a.txt", "close_write"), event("later/b.txt", "close_write"),
        event("end.txt", "close_write"),
    ]


def test_recursive_reports_a_file_created_right_after_its_directories_once(device, watch):
    _, recorder = watch(events=["create"], recursive=True)
    names = [f"d{i}/b/c/f" for i in range(20)]
    for name in names:
        host(device, name).parent.mkdir(parents=True)
        host(device, name).touch()
    host(device, "end").touch()

    recorded = recorder.wait_for_event("end", "create")
    assert by_name(recorded) == by_name([event(name, "create") for name in names + ["end"]])


def test_recursive_reports_the_files_of_a_directory_moved_in_or_within(device, watch):
    outside = device / "srv" / "staging"
    (outside / "batch").mkdir(parents=True)
    (outside / "batch" / "a.csv").write_text("")
    _, recorder = watch(events=["move"], recursive=True)
    (outside / "batch").rename(host(device, "batch"))
    wait_for(lambda: recorder.recorded(), "the moved-in file", 3)
    host(device, "batch").rename(host(device, "done"))
    host(device, "end.csv").write_text("")
    host(device, "end.csv").rename(host(device, "done/end.csv"))

    assert recorder.wait_for_event("done/end.csv", "move") == [
        event("batch/a.csv", "move"),
        event("done/a.csv", "move", **{"from": f"{WATCHED}/batch/a.csv"}),
        event("done/end.csv", "move", **{"from": f"{WATCHED}/end.csv"}),
    ]


def test_recursive_watches_a_new_directory_renamed_before_it_could_be_watched(device, watch):
    """A directory created and renamed (a staging directory put in place) before the source
    could watch it is watched under its new name, and the files in it are reported."""
    _, recorder = watch(events=["create"], recursive=True)
    recorder.release.clear()
    host(device, "first").touch()
    wait_for(recorder.blocked.is_set, "the source to be held up emitting", 3)
    host(device, "staging").mkdir()
    host(device, "staging/a.csv").touch()
    host(device, "staging").rename(host(device, "batch"))
    recorder.release.set()
    wait_for(lambda: len(recorder.recorded()) >= 2, "the staged file", 3)
    host(device, "batch/b.csv").touch()
    host(device, "end").touch()

    assert recorder.wait_for_event("end", "create") == [
        event("first", "create"), event("batch/a.csv", "create"), event("batch/b.csv", "create"),
        event("end", "create"),
    ]


def test_without_recursive_subdirectories_and_directories_do_not_fire(device, watch):
    _, recorder = watch(events=["create", "close_write"])
    host(device, "sub").mkdir()
    host(device, "sub/inner.txt").write_text("")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [
        event("end.txt", "create"), event("end.txt", "close_write"),
    ]


def test_a_single_file_path_reports_only_that_file(device, watch):
    target = f"{WATCHED}/config.json"
    host(device, "config.json").write_text("{}")
    _, recorder = watch(path=target, events=["close_write", "move"])
    host(device, "other.json").write_text("{}")
    host(device, "config.json").write_text('{"a": 1}')
    host(device, "config.json.new").write_text('{"a": 2}')
    host(device, "config.json.new").rename(host(device, "config.json"))

    assert recorder.wait_for_event("config.json", "move") == [
        {"path": target, "event": "close_write", "name": "config.json"},
        {"path": target, "event": "move", "name": "config.json", "from": f"{WATCHED}/config.json.new"},
    ]


# Settling


def test_a_file_written_in_chunks_fires_once_after_the_last_write(device, watch):
    # settling 20 times the pause between chunks: a writer held up under load stays in time
    _, recorder = watch(settleSeconds=1.0)
    chunks = 7
    for _ in range(chunks):
        with host(device, "big.bin").open("ab") as handle:
            handle.write(b"x" * 1000)
        time.sleep(0.05)
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [
        event("big.bin", "close_write"), event("end.txt", "close_write"),
    ]
    assert recorder.sizes[0] == chunks * 1000


def test_files_settle_independently(device, watch):
    # a.txt settles while b.txt is still written, every tenth of b's settling time
    _, recorder = watch(events=["close_write"], settleSeconds=0.8)
    host(device, "a.txt").write_text("done")
    chunks = 15
    for _ in range(chunks):
        with host(device, "b.txt").open("a") as handle:
            handle.write("x")
        time.sleep(0.08)

    assert recorder.wait_for_event("b.txt", "close_write") == [
        event("a.txt", "close_write"), event("b.txt", "close_write"),
    ]
    assert recorder.sizes == [4, chunks]


def test_a_file_deleted_before_it_settles_fires_nothing(device, watch):
    _, recorder = watch(settleSeconds=0.2)
    host(device, "tmp.txt").write_text("")
    host(device, "tmp.txt").unlink()
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "close_write") == [event("end.txt", "close_write")]



def test_a_file_renamed_before_it_settles_fires_once_at_its_new_name(device, watch):
    """The write a rename interrupts is handed over where the file now is, once it settles;
    a trigger that counts the move hears of the move instead."""
    _, recorder = watch(events=["close_write"], settleSeconds=0.5)
    host(device, "a.txt").write_text("done")
    host(device, "a.txt").rename(host(device, "b.txt"))
    host(device, "end.txt").write_text("")

    assert by_name(recorder.wait_for_event("end.txt", "close_write")) == [
        event("b.txt", "close_write"), event("end.txt", "close_write"),
    ]
    assert recorder.sizes[recorder.recorded().index(event("b.txt", "close_write"))] == 4

# Nothing is lost


def test_files_created_while_inotify_events_were_lost_are_reported(device, watch):
    """The kernel queue (fs.inotify.max_queued_events) is overrun for real: the source is held
    in emit while an ignored file is renamed back and forth (two events a rename) until the
    queue is full, so the events of the files created next are lost."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overrun it")
    source, recorder = watch(events=["create"], ignore=["noise*"])
    recorder.release.clear()
    host(device, "first").touch()
    wait_for(recorder.blocked.is_set, "the source to block in emit", 3)
    noise = [host(device, "noise-a"), host(device, "noise-b")]
    noise[0].touch()
    for i in range(limit // 2 + 10):
        os.rename(noise[i % 2], noise[(i + 1) % 2])
    names = [f"f{i:02}" for i in range(50)]
    for name in names:
        host(device, name).touch()
    recorder.release.set()
    recorder.wait_for_event(names[-1], "create")
    host(device, "zz-end").touch()

    recorded = recorder.wait_for_event("zz-end", "create")
    assert by_name(recorded) == by_name([event(name, "create") for name in ["first", *names, "zz-end"]])
    assert source.status().state == "armed"


def test_a_watched_directory_removed_and_recreated_is_watched_again(device, watch):
    host(device, "old.txt").write_text("")
    _, recorder = watch(events=["create", "delete"])
    shutil.rmtree(host(device, ""))
    host(device, "").mkdir()
    host(device, "new.txt").write_text("")
    recorder.wait_for_event("new.txt", "create")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "create") == [
        event("old.txt", "delete"), event("new.txt", "create"), event("end.txt", "create"),
    ]


def test_a_watched_directory_replaced_by_a_rename_is_watched_again(device, watch):
    staging = device / "srv" / "staging"
    staging.mkdir()
    (staging / "a.txt").write_text("")
    host(device, "old.txt").write_text("")
    _, recorder = watch(events=["create", "delete"])
    host(device, "old.txt").unlink()
    staging.rename(host(device, ""))
    host(device, "b.txt").write_text("")
    recorder.wait_for_event("b.txt", "create")
    host(device, "end.txt").write_text("")

    recorded = recorder.wait_for_event("end.txt", "create")
    assert recorded[0] == event("old.txt", "delete")
    assert by_name(recorded[1:-1]) == [event("a.txt", "create"), event("b.txt", "create")]
    assert recorded[-1] == event("end.txt", "create")


def test_a_file_that_appeared_while_events_were_lost_reaches_a_trigger_counting_only_close_write(device, watch):
    # The example file-drop trigger counts close_write and move: a file found by a rescan must
    # still reach it, as must one rewritten meanwhile.
    staging = device / "srv" / "staging"
    staging.mkdir()
    (staging / "new.csv").write_text("1")
    (staging / "kept.csv").write_text("2, longer now")
    host(device, "kept.csv").write_text("2")
    _, recorder = watch(events=["close_write", "move"])
    shutil.rmtree(host(device, ""))
    staging.rename(host(device, ""))
    recorder.wait_for_event("new.csv", "close_write")
    host(device, "end.csv").write_text("")

    recorded = recorder.wait_for_event("end.csv", "close_write")
    assert by_name(recorded[:-1]) == [event("kept.csv", "close_write"), event("new.csv", "close_write")]
    assert recorded[-1] == event("end.csv", "close_write")


def test_a_directory_above_the_watched_one_swapped_leads_to_the_new_one(device, watch):
    _, recorder = watch(events=["create"])
    (device / "srv").rename(device / "srv.old")  # what inotify on the watched one does not see
    host(device, "").mkdir(parents=True)
    host(device, "new.txt").write_text("")
    (device / "srv.old" / "in" / "stale.txt").write_text("")  # no longer under the path

    recorded = recorder.wait_for_event("new.txt", "create")
    time.sleep(0.3)
    assert recorder.recorded() == recorded == [event("new.txt", "create")]


def test_a_link_on_the_path_re_pointed_leads_to_its_new_target(device, watch):
    for release in ("rel1", "rel2"):
        (device / "srv" / release / "inbox").mkdir(parents=True)
    (device / "srv" / "current").symlink_to("rel1")
    source, recorder = watch(path="/srv/current/inbox", events=["create"])
    wait_for(lambda: source.status().state == "armed", "the source to arm", 3)
    (device / "srv" / "current.tmp").symlink_to("rel2")
    (device / "srv" / "current.tmp").rename(device / "srv" / "current")  # ln -sfn + mv -T
    time.sleep(0.2)
    (device / "srv" / "rel2" / "inbox" / "two.txt").write_text("")
    (device / "srv" / "rel1" / "inbox" / "one.txt").write_text("")  # the old release: not watched

    recorded = wait_for(lambda: recorder.recorded(), "an event", 3)
    time.sleep(0.3)
    assert recorder.recorded() == recorded
    assert recorded == [{"path": "/srv/current/inbox/two.txt", "event": "create", "name": "two.txt"}]


def test_a_link_re_pointed_to_where_it_led_loses_no_event(device, watch):
    (device / "srv" / "rel1" / "inbox").mkdir(parents=True)
    (device / "srv" / "current").symlink_to("rel1")
    source, recorder = watch(path="/srv/current/inbox", events=["create", "close_write"])
    wait_for(lambda: source.status().state == "armed", "the source to arm", 3)
    inbox = device / "srv" / "rel1" / "inbox"
    (inbox / "a.txt").write_text("1")
    (device / "srv" / "current.tmp").symlink_to("rel1")
    (device / "srv" / "current.tmp").rename(device / "srv" / "current")  # the same target
    (inbox / "b.txt").write_text("2")

    recorded = recorder.wait_for_event("b.txt", "close_write")
    time.sleep(0.3)
    assert recorder.recorded() == recorded
    assert [(e["name"], e["event"]) for e in recorded] == [
        ("a.txt", "create"), ("a.txt", "close_write"), ("b.txt", "create"), ("b.txt", "close_write")]


def test_files_of_a_watched_directory_moved_away_count_as_deleted(device, watch):
    host(device, "old.txt").write_text("")
    _, recorder = watch(events=["create", "delete"])
    host(device, "").rename(device / "srv" / "archive")
    host(device, "").mkdir()
    host(device, "new.txt").write_text("")
    recorder.wait_for_event("new.txt", "create")
    host(device, "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "create") == [
        event("old.txt", "delete"), event("new.txt", "create"), event("end.txt", "create"),
    ]


def test_a_path_absent_at_start_is_waited_for(device, watch):
    source, recorder = watch(path="/srv/later", events=["create"])
    assert source.status().state == "waiting"
    assert source.status().detail == "/srv/later does not exist"
    (device / "srv" / "later").mkdir()
    (device / "srv" / "later" / "a.txt").write_text("")
    recorder.wait_for_event("a.txt", "create")
    (device / "srv" / "later" / "end.txt").write_text("")

    assert recorder.wait_for_event("end.txt", "create") == [
        event("a.txt", "create", under="/srv/later"), event("end.txt", "create", under="/srv/later"),
    ]
    assert source.status().state == "armed"


def test_a_watch_limit_shows_as_an_error_naming_the_sysctl_and_is_retried(device, watch, monkeypatch):
    """The limit is reached in a stand-in for inotify_add_watch: raising the real
    fs.inotify.max_user_watches from a test would change the whole machine."""
    add_watch = Inotify.add_watch

    def limit_reached(self, path, mask):
        raise watch_failure(errno.ENOSPC, path)

    monkeypatch.setattr(filesystem, "ERROR_RETRY_SECONDS", 0.1)
    monkeypatch.setattr(Inotify, "add_watch", limit_reached)
    source, recorder = watch(events=["create"])
    assert source.status().state == "error"
    assert "inotify watch limit reached" in source.status().detail
    assert "raise fs.inotify.max_user_watches" in source.status().detail
    monkeypatch.setattr(Inotify, "add_watch", add_watch)
    wait_for(lambda: source.status().state == "armed", "the source to watch again", 3)
    host(device, "a.txt").touch()

    assert recorder.wait_for_event("a.txt", "create") == [event("a.txt", "create")]


# Lifecycle


def open_descriptors() -> list[str]:
    """What this process has open, as /proc/self/fd names it."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            continue
    return sorted(found)


def test_stop_releases_the_inotify_descriptor_and_can_be_repeated(device):
    before = open_descriptors()
    registration = Registration(name="drop", agent="a", task="t", type="filesystem",
                                config={"path": WATCHED, "recursive": True})
    source = open_source(registration, Recorder(device), Context(host=lambda path: str(device) + path))
    source.start()
    assert "anon_inode:inotify" in open_descriptors()
    source.stop()
    source.stop()

    assert open_descriptors() == before


def test_an_unknown_event_kind_is_refused(device):
    registration = Registration(name="drop", agent="a", task="t", type="filesystem",
                                config={"path": WATCHED, "events": ["create", "open"]})
    with pytest.raises(ValueError, match="open"):
        open_source(registration, Recorder(device), Context(host=lambda path: str(device) + path))
