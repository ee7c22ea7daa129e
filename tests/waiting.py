"""Bounded waiting for tests that watch real processes: poll, and fail with what was awaited."""

from __future__ import annotations

import time

import pytest


def wait_for(predicate, what: str, timeout: float):
    """The first true value of `predicate()`, polled every 20 ms; fails the test after
    `timeout` seconds, naming `what` it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.02)
