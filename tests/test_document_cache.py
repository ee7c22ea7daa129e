"""The document cache's index and data file (validate._Cache): what a plan relies on when it
takes a cached file's manifests without parsing the file again."""

from __future__ import annotations

import hashlib
import os

import pytest

from reconciler.source import Document
from reconciler.validate import _Cache


def agent(name: str, padding: int = 0) -> dict:
    spec = {"quota": "small", "tasks": {"ping": {"command": ["/bin/true"]}}}
    if padding:
        spec["tasks"]["ping"]["env"] = {"PAD": "x" * padding}
    return {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": name}, "spec": spec}


def put(cache: _Cache, name: str, padding: int = 0) -> str:
    """Cache a one-document file for agent `name`; its digest stands for its content."""
    data = agent(name, padding)
    digest = hashlib.sha256(repr(data).encode()).hexdigest()
    cache.put(digest, [Document(f"{name}.yaml", 0, 1, data)])
    return digest


def spec_of(cache: _Cache, digest: str, name: str) -> dict:
    [manifest] = cache.manifests(f"{name}.yaml", digest, f"/nonexistent/{name}.yaml")
    assert (manifest.kind, manifest.name, manifest.refs.quota) == ("Agent", name, "small")
    return manifest.spec


@pytest.fixture
def index(tmp_path):
    return tmp_path / "cache" / "manifests.marshal"


def test_entries_written_by_one_load_are_read_by_the_next(index):
    first = _Cache(index)
    digests = {name: put(first, name) for name in ("a", "b")}
    first.save(keep=set(digests.values()))

    again = _Cache(index)
    for name, digest in digests.items():
        assert spec_of(again, digest, name) == agent(name)["spec"]


def test_a_file_added_later_is_appended_not_rewritten(index):
    first = _Cache(index)
    a = put(first, "a")
    first.save(keep={a})
    data = index.with_suffix(".data")
    inode, size = data.stat().st_ino, data.stat().st_size

    second = _Cache(index)
    b = put(second, "b")
    second.save(keep={a, b})
    assert data.stat().st_ino == inode and data.stat().st_size > size
    third = _Cache(index)
    assert spec_of(third, a, "a") == agent("a")["spec"]
    assert spec_of(third, b, "b") == agent("b")["spec"]


def test_the_data_file_is_compacted_once_most_of_it_is_unused(index):
    cache = _Cache(index)
    kept = put(cache, "kept")
    big = put(cache, "big", padding=3 << 20)  # 3 MB, dropped below
    cache.save(keep={kept, big})
    data = index.with_suffix(".data")
    assert data.stat().st_size > 3 << 20

    later = _Cache(index)
    small = put(later, "small")
    later.save(keep={kept, small})  # `big` no longer used: 3 MB of 3 MB + a few bytes unused
    assert data.stat().st_size < 1 << 16
    after = _Cache(index)
    assert spec_of(after, kept, "kept") == agent("kept")["spec"]
    assert spec_of(after, small, "small") == agent("small")["spec"]
    assert after.manifests("big.yaml", big, "/nonexistent") is None


def test_a_spec_not_read_yet_is_read_from_the_data_file_its_own_load_compacted(index):
    """A load saves the cache before rendering reads the specs it deferred; when that save
    compacted the data file, those specs come from the new file (not the old one at the new
    offsets, which would look damaged and throw the whole cache away)."""
    cache = _Cache(index)
    big = put(cache, "big", padding=3 << 20)
    kept = put(cache, "kept")
    cache.save(keep={kept, big})

    later = _Cache(index)
    [manifest] = later.manifests("kept.yaml", kept, "/nonexistent/kept.yaml")
    small = put(later, "small")
    later.save(keep={kept, small})  # compacts
    assert index.with_suffix(".data").stat().st_size < 1 << 16

    assert manifest.spec == agent("kept")["spec"]
    assert index.exists() and _Cache(index).manifests("small.yaml", small, "/nonexistent") is not None


def test_manifests_read_ahead_keep_their_specs_when_the_cache_is_compacted_meanwhile(index):
    """A plan reads the cached files' manifests while a child parses and caches the edited
    ones (validate.ReadAhead); the child may compact the data file under it."""
    from reconciler.validate import ReadAhead

    cache = _Cache(index)
    kept = put(cache, "kept")
    big = put(cache, "big", padding=3 << 20)
    cache.save(keep={kept, big})
    ahead = ReadAhead(index, {"/nonexistent/kept.yaml": ("kept.yaml", kept),
                              "/nonexistent/new.yaml": ("new.yaml", "not-cached-yet")})
    assert set(ahead.found) == {"/nonexistent/kept.yaml"}

    child = _Cache(index)  # what the parsing child does, compacting as it saves
    small = put(child, "small")
    child.save(keep={kept, small})
    assert index.with_suffix(".data").stat().st_size < 1 << 16

    [manifest] = ahead.found["/nonexistent/kept.yaml"]
    assert manifest.spec == agent("kept")["spec"]  # its spec is read only now


def test_two_loads_saving_at_once_leave_a_readable_cache(index):
    base = _Cache(index)
    a = put(base, "a")
    base.save(keep={a})

    one, two = _Cache(index), _Cache(index)  # both loaded before either saves
    b, c = put(one, "b"), put(two, "c")
    one.save(keep={a, b})
    two.save(keep={a, c})  # the last index wins; `b` stays as unused bytes in the data file

    after = _Cache(index)
    assert spec_of(after, a, "a") == agent("a")["spec"]
    assert spec_of(after, c, "c") == agent("c")["spec"]
    assert after.manifests("b.yaml", b, "/nonexistent") is None  # parsed again when needed


def test_an_index_is_never_read_against_another_data_file(index, tmp_path):
    cache = _Cache(index)
    a = put(cache, "a")
    cache.save(keep={a})
    elsewhere = _Cache(tmp_path / "other" / "manifests.marshal")
    put(elsewhere, "a")  # the same entry, written into a data file of its own
    elsewhere.save(keep={a})
    data = index.with_suffix(".data")
    os.unlink(data)  # a new inode, which may well get the old one's number
    data.write_bytes((tmp_path / "other" / "manifests.data").read_bytes())
    assert _Cache(index).manifests("a.yaml", a, "/nonexistent") is None

    again = _Cache(index)  # and saving starts a data file of its own again
    b = put(again, "b")
    again.save(keep={b})
    assert spec_of(_Cache(index), b, "b") == agent("b")["spec"]


def test_a_damaged_index_is_ignored(index):
    cache = _Cache(index)
    a = put(cache, "a")
    cache.save(keep={a})
    for damage in (b"", b"\x00" * 10, index.read_bytes()[:-5]):
        index.write_bytes(damage)
        assert _Cache(index).manifests("a.yaml", a, "/nonexistent") is None
