"""The pool of network namespaces that runs of one agent take turns on (netns.py).

The pool's bookkeeping is checked with stand-in fds; the namespaces themselves (made by a
thread, loopback up, never the caller's) with real ones, as root. What a run sees in them is
checked from inside the sandbox in test_sandbox.py.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from reconciler.executor.netns import NetworkPool, new_namespace


def _stand_in() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_namespace_given_back_goes_to_the_same_group_alone():
    pool = NetworkPool(limit=4)
    pool.unavailable = "no new namespaces in this test"  # only what was given back
    fd = _stand_in()
    pool.give("spos/agent-a", fd)
    assert pool.take("spos/agent-b") is None
    lease = pool.take("spos/agent-a")
    assert lease is not None and lease.fd == fd
    assert pool.take("spos/agent-a") is None  # one run at a time: it is out now
    lease.give_back()
    assert lease.fd == -1 and pool.kept() == 1
    lease.give_back()  # once only
    assert pool.kept() == 1
    pool.close()
    assert not _is_open(fd)


def test_the_pool_keeps_at_most_its_limit_closing_the_longest_unused_first():
    pool = NetworkPool(limit=2)
    old, middle, new = _stand_in(), _stand_in(), _stand_in()
    pool.give("spos/old", old)
    pool.give("spos/middle", middle)
    pool.give("spos/new", new)
    assert pool.kept() == 2
    assert not _is_open(old) and _is_open(middle) and _is_open(new)
    pool.close()
    assert not _is_open(middle) and not _is_open(new) and pool.kept() == 0


def test_a_lease_closed_instead_of_given_back_is_never_handed_on():
    """What the sandbox does with the namespace of a run whose cgroup could not be emptied,
    or that never started."""
    pool = NetworkPool(limit=2)
    pool.unavailable = "no new namespaces in this test"
    fd = _stand_in()
    pool.give("spos/agent", fd)
    lease = pool.take("spos/agent")
    lease.close()
    assert not _is_open(fd) and pool.kept() == 0
    assert pool.take("spos/agent") is None


def test_a_passing_failure_to_make_a_namespace_is_tried_again_a_lasting_one_is_not(monkeypatch):
    """Out of fds or memory now, the next run asks again; no privilege for it (EPERM), the
    sandbox makes each run's own from then on, without asking again."""
    import errno

    from reconciler.executor import netns

    answers = [OSError(errno.EMFILE, "Too many open files"), _stand_in(),
               OSError(errno.EPERM, "Operation not permitted")]

    def made():
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(netns, "new_namespace", made)
    pool = NetworkPool(limit=2)
    assert pool.take("spos/agent") is None and pool.unavailable is None
    lease = pool.take("spos/agent")
    assert lease is not None
    lease.close()
    assert pool.take("spos/other") is None and "not permitted" in pool.unavailable
    assert pool.take("spos/other") is None and answers == []


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="making a network namespace needs root")
def test_a_new_namespace_has_its_loopback_up_and_leaves_the_caller_where_it_was():
    before = os.readlink("/proc/self/ns/net")
    fd = new_namespace()
    try:
        assert os.readlink("/proc/self/ns/net") == before
        assert os.readlink(f"/proc/self/fd/{fd}") != before
        inside = subprocess.run(
            ["nsenter", f"--net=/proc/self/fd/{fd}", "ip", "-o", "addr", "show", "dev", "lo"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=10)
    finally:
        os.close(fd)
    assert inside.returncode == 0, inside.stderr
    assert "127.0.0.1/8" in inside.stdout and "::1/128" in inside.stdout
