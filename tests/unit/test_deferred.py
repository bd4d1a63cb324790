"""The process's timer (renewal's first extend is filed there) and a renewal's stop flag."""

from __future__ import annotations

import threading
import time

from celery_unique.deferred import call_at
from celery_unique.leases import StopFlag


def test_a_due_callback_runs_and_a_cancelled_one_never_does() -> None:
    ran: list[str] = []
    done = threading.Event()
    # Far more cancelled entries than the heap keeps before it drops them: the live ones,
    # filed before, among and after them, still run, in due order. Every entry is due well
    # after the filing ends, so none can run before it is cancelled.
    due = time.monotonic() + 1.0
    call_at(due + 0.05, lambda: ran.append("first"))
    for _ in range(10_000):
        call_at(due, lambda: ran.append("cancelled")).cancel()
    call_at(due + 0.10, lambda: ran.append("second"))
    for _ in range(10_000):
        call_at(due + 0.5, lambda: ran.append("cancelled")).cancel()
    call_at(due + 0.15, done.set)
    assert done.wait(10.0)
    assert ran == ["first", "second"]


def test_a_callback_filed_sooner_than_the_earliest_wakes_the_timer() -> None:
    done = threading.Event()
    later = call_at(time.monotonic() + 60.0, done.set)
    call_at(time.monotonic() + 0.01, done.set)
    assert done.wait(5.0)
    later.cancel()


def test_the_stop_flag_wakes_a_wait_whether_raised_before_or_during_it() -> None:
    raised = StopFlag()
    raised.set()
    assert raised.is_set() and raised.wait(10.0)

    flag = StopFlag()
    assert not flag.wait(0.01) and not flag.is_set()
    threading.Timer(0.05, flag.set).start()
    started = time.monotonic()
    assert flag.wait(10.0)
    assert time.monotonic() - started < 5.0
