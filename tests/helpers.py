"""Waiting for an event in tests: poll for it with a generous deadline, never sleep a guess.

::

    wait_until(lambda: t.runs(tag) == 1)
    await async_wait_until(lambda: client.get(key) is not None)

The deadline only bounds a failing test: a passing one returns as soon as the event is seen,
so it can be generous (a loaded CI box may be ten times slower than a laptop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

TIMEOUT = 30.0
INTERVAL = 0.01


def wait_until(
    predicate: Callable[[], T], timeout: float = TIMEOUT, interval: float = INTERVAL
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something true, and return
    that; fail the test if ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting"
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float = TIMEOUT,  # noqa: ASYNC109 (wait_until's own signature, awaited)
    interval: float = INTERVAL,
) -> T:
    """:func:`wait_until` for async tests: sleeps with ``await``, so the loop runs meanwhile
    (``predicate`` itself is a quick synchronous check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting"
        await anyio.sleep(interval)
