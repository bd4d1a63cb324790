"""Work that may never be needed, started only when it is due: one timer thread per process.

A held lease renews itself every third of its TTL, but most holds (a short Celery task's run,
a quick critical section) end long before the first renewal is due. Starting a renewal thread
for each of them cost as much as a Redis round trip (``Thread.start`` waits until the thread
runs). So renewal is scheduled here instead: :func:`call_at` files a callback under a due
time in one heap, one daemon thread per process wakes when the earliest is due and calls it,
and a callback cancelled before then costs nothing more than its entry. A forked child gets
a thread (and a heap) of its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["Scheduled", "call_at"]

logger = logging.getLogger("celery_unique")


class Scheduled:
    """A callback filed for later; :meth:`cancel` before it is due and it never runs."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """It will not run (if it has not started already)."""
        self.cancelled = True


class _Timer:
    """The heap of scheduled callbacks and the one thread that runs them when due."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.heap: list[tuple[float, int, Scheduled]] = []
        self.order = itertools.count()  # ties in due time run in filing order
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None

    def add(self, due: float, scheduled: Scheduled) -> None:
        with self.wake:
            heapq.heappush(self.heap, (due, next(self.order), scheduled))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.run, name="celery-unique timer", daemon=True
                )
                self.thread.start()
            elif self.heap[0][2] is scheduled:
                self.wake.notify()  # due sooner than what the thread waits for

    def run(self) -> None:
        while True:
            with self.wake:
                while True:
                    while self.heap and self.heap[0][2].cancelled:
                        heapq.heappop(self.heap)
                    if not self.heap:
                        self.wake.wait()
                        continue
                    left = self.heap[0][0] - time.monotonic()
                    if left <= 0:
                        break
                    self.wake.wait(left)
                scheduled = heapq.heappop(self.heap)[2]
            if not scheduled.cancelled:
                try:
                    scheduled.callback()
                except Exception:  # a callback's failure is its own; the timer goes on
                    logger.exception("a scheduled callback failed")


_timer: _Timer | None = None
_timer_lock = threading.Lock()


def call_at(due: float, callback: Callable[[], object]) -> Scheduled:
    """Call ``callback`` on this process's timer thread at ``due`` (``time.monotonic()``),
    unless cancelled first. It should be quick: start a thread for longer work."""
    global _timer
    with _timer_lock:
        if _timer is None or _timer.pid != os.getpid():
            _timer = _Timer()  # first use, or a forked child: the parent's thread is not here
        timer = _timer
    scheduled = Scheduled(callback)
    timer.add(due, scheduled)
    return scheduled
