"""Measuring an agent's storage for its Quota (executor/storage.py): like `du`, never through a
link, each file with several links once, bounded."""

from __future__ import annotations

import os

from reconciler.device import Device
from reconciler.executor.storage import over_quota, usage

AGENT = "var/lib/systemprompt-os/agents/alpha"


def blocks(path) -> int:
    return os.lstat(path).st_blocks * 512


def test_usage_counts_blocks_below_the_directory(tmp_path):
    (tmp_path / "d/sub").mkdir(parents=True)
    (tmp_path / "d/a").write_bytes(b"x" * 100_000)
    (tmp_path / "d/sub/b").write_bytes(b"y" * 50_000)
    expected = sum(blocks(p) for p in (tmp_path / "d/a", tmp_path / "d/sub", tmp_path / "d/sub/b"))
    assert usage(str(tmp_path / "d")).bytes == expected
    assert usage(str(tmp_path / "missing")).bytes == 0


def test_links_are_never_followed_and_hard_links_count_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 1_000_000)
    measured = tmp_path / "d"
    measured.mkdir()
    os.symlink(outside, measured / "to-dir")
    os.symlink(outside / "big", measured / "to-file")
    (measured / "one").write_bytes(b"x" * 200_000)
    os.link(measured / "one", measured / "two")
    expected = blocks(measured / "one") + blocks(measured / "to-dir") + blocks(measured / "to-file")
    assert usage(str(measured)).bytes == expected


def test_a_walk_past_its_bound_is_reported_incomplete(tmp_path):
    for index in range(30):
        (tmp_path / f"f{index}").write_text("x")
    assert not usage(str(tmp_path), max_entries=10).complete
    assert usage(str(tmp_path), max_entries=100).complete


def test_over_quota_names_the_directory_and_the_numbers(tmp_path):
    device = Device(tmp_path)
    (tmp_path / AGENT / "output").mkdir(parents=True)
    (tmp_path / AGENT / "output/result").write_bytes(os.urandom(300_000))
    assert over_quota(device, "alpha", {"output": 1_000_000, "temp": 10}) is None
    reason = over_quota(device, "alpha", {"output": 100_000})
    assert reason.startswith("output storage quota exceeded: output/ uses 3")
    assert reason.endswith("of 100K")
