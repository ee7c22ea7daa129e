"""The executor's rescan looks at every agent's `queue/` and `active/` (docs/executor.md,
"Waking up"). It lists again only a directory that may have changed since its last listing
(runs.Listings), and it never misses a change: a directory is taken as unchanged only when its
identity and times are what they were, and when its last listing came well after its last
change, since two changes in one tick of the file system's clock leave the same time."""

from __future__ import annotations

import os
import time

import pytest

from reconciler import AGENTS_DIR
from reconciler.device import Device
from reconciler.executor import runs
from reconciler.executor.runs import Listings, RunStore

QUEUE = f"{AGENTS_DIR}/alpha/queue"


@pytest.fixture
def device(tmp_path):
    device = Device(str(tmp_path))
    device.makedirs(QUEUE)
    (device.path(QUEUE) / "050-1-a.json").write_text("{}")
    return device


def counting(device: Device) -> list[str]:
    """The directories listed through the device, in order (Device.listdir, or Device.locate
    followed by a listing of its own, as Listings does)."""
    listed: list[str] = []
    for method in ("listdir", "locate"):
        real = getattr(device, method)

        def recorded(path: str, real=real):
            listed.append(path)
            return real(path)

        setattr(device, method, recorded)
    return listed


def settled(device: Device, monkeypatch) -> int:
    """The queue modified an hour back, and listings made as if well after its last change:
    they may be kept. Returns the modification time set (ns)."""
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(device.host(QUEUE), ns=(hour_ago, hour_ago))
    now = time.time_ns()
    monkeypatch.setattr(runs.time, "time_ns", lambda: now + Listings.RACY_NS * 2)
    return hour_ago


def test_an_unchanged_directory_is_not_listed_again(device, monkeypatch):
    settled(device, monkeypatch)
    listings = Listings(device)
    listed = counting(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    assert RunStore(device, listings).names("alpha", "queue") == ["050-1-a.json"]
    assert listed == [QUEUE]


def test_a_file_added_removed_or_renamed_after_a_kept_listing_is_seen(device, monkeypatch):
    settled(device, monkeypatch)
    listings = Listings(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    queue = device.path(QUEUE)
    (queue / "050-2-b.json").write_text("{}")
    assert listings.listdir(QUEUE) == ["050-1-a.json", "050-2-b.json"]

    settled(device, monkeypatch)
    assert listings.listdir(QUEUE) == ["050-1-a.json", "050-2-b.json"]
    (queue / "050-1-a.json").rename(queue / "050-3-a.json")
    assert listings.listdir(QUEUE) == ["050-2-b.json", "050-3-a.json"]

    modified = settled(device, monkeypatch)
    assert listings.listdir(QUEUE) == ["050-2-b.json", "050-3-a.json"]
    time.sleep(0.05)  # past a tick of the file system's clock (at most 10 ms)
    (queue / "050-2-b.json").unlink()
    # Setting the modification time back does not hide the change: the change time moved.
    os.utime(queue, ns=(modified, modified))
    assert listings.listdir(QUEUE) == ["050-3-a.json"]


def test_a_listing_made_soon_after_a_change_is_not_kept(device):
    """The directory changed just now: a second change in the same clock tick would leave its
    times as they are, so the next look lists it again whatever the times say."""
    listings = Listings(device)
    listed = counting(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    (device.path(QUEUE) / "050-2-b.json").write_text("{}")
    assert listings.listdir(QUEUE) == ["050-1-a.json", "050-2-b.json"]
    assert listings.listdir(QUEUE) == ["050-1-a.json", "050-2-b.json"]
    assert listed == [QUEUE] * 3


def test_a_directory_replaced_or_removed_is_listed_afresh(device, monkeypatch):
    settled(device, monkeypatch)
    listings = Listings(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    queue = device.path(QUEUE)
    queue.rename(queue.with_name("old-queue"))
    assert listings.listdir(QUEUE) == []
    queue.mkdir()
    (queue / "050-9-z.json").write_text("{}")
    settled(device, monkeypatch)
    assert listings.listdir(QUEUE) == ["050-9-z.json"]


def test_a_caller_changing_the_returned_list_changes_no_later_listing(device, monkeypatch):
    settled(device, monkeypatch)
    listings = Listings(device)
    listings.listdir(QUEUE).clear()
    assert listings.listdir(QUEUE) == ["050-1-a.json"]


def test_a_step_of_the_wall_clock_has_every_directory_listed_again(device, monkeypatch):
    """Set back, the clock could give a later change the times of an earlier one."""
    settled(device, monkeypatch)
    listings = Listings(device)
    listed = counting(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    stepped = time.time_ns() - 60 * 10**9
    monkeypatch.setattr(runs.time, "time_ns", lambda: stepped)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    assert listed == [QUEUE, QUEUE]


def test_a_kept_listing_stands_for_fifteen_minutes_at_most(device, monkeypatch):
    """A change whose times do not show (a server's clock behind this one) waits that long."""
    settled(device, monkeypatch)
    listings = Listings(device)
    listed = counting(device)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    later = time.monotonic_ns() + Listings.KEEP_NS + 1
    wall = time.time_ns()
    monkeypatch.setattr(runs.time, "monotonic_ns", lambda: later)
    monkeypatch.setattr(runs.time, "time_ns", lambda: wall + Listings.KEEP_NS + 1)
    assert listings.listdir(QUEUE) == ["050-1-a.json"]
    assert listed == [QUEUE, QUEUE]


def test_finished_runs_are_listed_afresh_and_never_kept(device, monkeypatch):
    finished = f"{AGENTS_DIR}/alpha/completed"
    device.makedirs(finished)
    (device.path(finished) / "050-1-a.json").write_text("{}")
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(device.host(finished), ns=(hour_ago, hour_ago))
    settled(device, monkeypatch)
    listings = Listings(device)
    store = RunStore(device, listings)
    listed = counting(device)
    assert store.names("alpha", "completed") == store.names("alpha", "completed") == ["050-1-a.json"]
    assert listed == [finished, finished]
    assert store.names("alpha", "queue") == store.names("alpha", "queue") == ["050-1-a.json"]
    assert listed == [finished, finished, QUEUE]
