"""The threads that publish for the async API (``aapply_async``, ``adelay``).

Celery keeps a result backend, with its own Redis connections, per thread that publishes. On
short-lived worker threads (asyncio's or anyio's, which end after a while idle) each publish
could build one afresh, and each thread's end left its sockets for a later garbage collection.
So the publishes go to a few threads of our own, started on first use and kept for the life
of the process (a forked child starts its own).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..background import seen_through

__all__ = ["PUBLISHERS", "run_in_publisher"]

T = TypeVar("T")

#: How many threads publish at once (Celery's broker pool holds 10 connections by default).
PUBLISHERS = 8

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _publishers() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(PUBLISHERS, thread_name_prefix="celery-unique-publish")
        return _pool


async def run_in_publisher(function: Callable[[], T]) -> T:
    """Run ``function`` in a publisher thread and return what it returns.

    Once started it is seen through: a cancellation waits for it to end and is raised then,
    so that what it did (a message sent, a key freed) is done when the caller learns of it.
    """
    return await seen_through(_publishers().submit(function))


def _after_fork_in_child() -> None:
    global _lock, _pool
    # The parent's threads are not in the child: a pool that counts them would never run.
    _lock, _pool = threading.Lock(), None


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
