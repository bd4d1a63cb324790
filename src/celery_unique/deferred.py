"""Work that may never be needed, started only when it is due: one timer thread per process.

A held lease renews itself every third of its TTL, but most holds (a short Celery task's run,
a quick critical section) end long before the first renewal is due. Starting a renewal thread
for each of them cost as much as a Redis round trip (``Thread.start`` waits until the thread
runs). So renewal is scheduled here instead: :func:`call_at` files a callback under a due
time in one heap, one daemon thread per process wakes when the earliest is due and calls it,
and a callback cancelled before then costs nothing more than its entry. A forked child gets
a thread (and a heap) of its own.

Filing wakes the thread only when the new entry is due before everything already filed. So
the thread drops cancelled entries only when it wakes for one that is due (and those due
within :data:`_SWEEP` after it): were it to drop them as soon as it runs, the heap of a
worker running one short task after another would be empty at each filing, and every run
would wake the thread for nothing (a thread switch per task).
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

# Seconds past the entry it woke for within which the thread also drops cancelled entries: a
# busy process's heap is swept about once per this, not once per entry.
_SWEEP = 1.0
# Entries in the heap past which a filing drops the cancelled ones (then twice what is left).
_COMPACT_MIN = 4096


class Scheduled:
    """A callback filed for later; :meth:`cancel` before it is due and it never runs."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """It will not run (if it has not started already)."""
        self.cancelled = True
        self.callback = _nothing  # its entry may wait in the heap a while: hold nothing


def _nothing() -> None:
    pass


class _Timer:
    """The heap of scheduled callbacks and the one thread that runs them when due."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.heap: list[tuple[float, int, Scheduled]] = []
        self.order = itertools.count()  # ties in due time run in filing order
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.compact_at = _COMPACT_MIN

    def add(self, due: float, scheduled: Scheduled) -> None:
        with self.wake:
            heap = self.heap
            if len(heap) >= self.compact_at:
                # Cancelled entries wait for their due time (see the module docstring): with
                # long leases they pile up, so drop them all now and then (amortised O(1)).
                heap[:] = [entry for entry in heap if not entry[2].cancelled]
                heapq.heapify(heap)
                self.compact_at = max(_COMPACT_MIN, 2 * len(heap))
            heapq.heappush(heap, (due, next(self.order), scheduled))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.run, name="celery-unique timer", daemon=True
                )
                self.thread.start()
            elif heap[0][2] is scheduled:
                self.wake.notify()  # due sooner than what the thread waits for

    def run(self) -> None:
        heap = self.heap
        while True:
            with self.wake:
                while True:
                    if not heap:
                        self.wake.wait()
                        continue
                    due, _, scheduled = heap[0]
                    now = time.monotonic()
                    if due > now:
                        self.wake.wait(due - now)
                        continue
                    heapq.heappop(heap)
                    if scheduled.cancelled:
                        # Due, and nothing to run: drop the cancelled ones due soon after it
                        # too, so that the thread wakes about once per _SWEEP.
                        while heap and heap[0][2].cancelled and heap[0][0] <= now + _SWEEP:
                            heapq.heappop(heap)
                        continue
                    break
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
