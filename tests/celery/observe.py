"""What the in-process worker (and this process) really did, seen through Celery's signals.

The worker fixture runs in this process, on threads, so its signals reach these receivers:
tests count deferrals, publishes and ends instead of inferring them from a sleep, and bound
the moment a rate limit admitted each run with Redis time taken on both sides of it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery.utils.dispatch import Signal

from celery_unique import signals as unique_signals
from celery_unique.core.messages import BOOKED_HEADER
from tests.celery import app as t
from tests.helpers import wait_until


def _ours(task: str, leading: Sequence[Any]) -> Callable[[Any, Sequence[Any]], bool]:
    """Whether a signal is about ``task`` called with these leading arguments."""

    def match(sender: Any, args: Sequence[Any]) -> bool:
        name = sender if isinstance(sender, str) else getattr(sender, "name", None)
        return name == task and tuple(args[: len(leading)]) == tuple(leading)

    return match


@contextmanager
def _connected(*pairs: tuple[Signal, Callable[..., None]]) -> Iterator[None]:
    with ExitStack() as stack:
        for signal, receiver in pairs:
            signal.connect(receiver, weak=False)
            stack.callback(signal.disconnect, receiver)
        yield


@contextmanager
def deferrals(task: str, *leading: Any) -> Iterator[Counter[str]]:
    """How many times each instance of ``task`` (with these leading arguments) was deferred."""
    ours, seen, lock = _ours(task, leading), Counter[str](), threading.Lock()

    def count(sender: Any = None, task_id: str = "", **_: Any) -> None:
        # Sent in the deferred run's own thread, so its request is at hand.
        if ours(sender, sender.request.args):
            with lock:
                seen[task_id] += 1

    with _connected((unique_signals.task_deferred, count)):
        yield seen


@contextmanager
def publishes(task: str, *leading: Any) -> Iterator[list[str]]:
    """The ids of the messages of ``task`` (with these leading arguments) sent from this
    process, the worker's threads included."""
    ours, sent = _ours(task, leading), list[str]()

    def record(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        if ours(sender, body[0]):  # message protocol 2: (args, kwargs, embed)
            sent.append(headers["id"])

    with _connected((signals.after_task_publish, record)):
        yield sent


@contextmanager
def ends(task: str, *leading: Any) -> Iterator[list[tuple[str, str]]]:
    """``(task id, state)`` of every run of ``task`` (with these leading arguments) as it
    ended: SUCCESS, RETRY (deferrals too), IGNORED, ..."""
    ours, ended = _ours(task, leading), list[tuple[str, str]]()

    def record(sender: Any = None, task_id: Any = None, args: Any = (), **kw: Any) -> None:
        if ours(sender, args):
            ended.append((task_id, kw["state"]))

    with _connected((signals.task_postrun, record)):
        yield ended


Window = tuple[float, float]


def redis_now() -> float:
    return t.redis_now_us() / 1e6


@dataclass
class _Slot:
    earliest: float
    latest: float | None = None  # None: the run's own end


@contextmanager
def admissions(task: str, *leading: Any) -> Iterator[list[Window]]:
    """For each run of ``task`` (with these leading arguments) that succeeds, an interval of
    Redis time (seconds) that holds the moment its rate limit admitted it.

    A run that asks the limiter is admitted between its start (``task_prerun``, Redis time
    read before the run asks) and its end (``task_postrun``). A copy deferred to a slot its
    run booked was admitted at that slot: between the booking run's start and the moment it
    was deferred (``task_retry``, after the booking), each plus the booked delay. The copy's
    wake-up and run come later, however late a loaded box has them, and are not measured.
    Leaving the block waits until every instance that started in it has succeeded.
    """
    ours, lock = _ours(task, leading), threading.Lock()
    slots: dict[str, _Slot] = {}  # task id -> the slot its next successful run runs on
    local = threading.local()  # the slot the run in this worker thread booked, if it asked
    found: list[Window] = []

    def prerun(sender: Any = None, task_id: Any = None, args: Any = (), **_: Any) -> None:
        if not ours(sender, args):
            return
        request = sender.request
        if getattr(request, BOOKED_HEADER, None) == request.retries:
            local.slot = None  # runs on the slot an earlier run booked: nothing to add
            return
        local.slot = _Slot(redis_now())
        with lock:
            slots[task_id] = local.slot

    def retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        slot = getattr(local, "slot", None)
        when = getattr(reason, "when", None)
        if not ours(sender, request.args) or slot is None or not isinstance(when, int | float):
            return
        # Deferred to `when` s after its booking. A copy deferred without a booking asks
        # again when it comes back, with a slot of its own.
        latest = redis_now() + when
        with lock:
            slot.earliest, slot.latest = slot.earliest + when, latest

    def postrun(sender: Any = None, task_id: Any = None, args: Any = (), **kw: Any) -> None:
        if not ours(sender, args) or kw["state"] != "SUCCESS":
            return
        ended = redis_now()
        with lock:
            slot = slots[task_id]
            found.append((slot.earliest, ended if slot.latest is None else slot.latest))

    with _connected(
        (signals.task_prerun, prerun), (signals.task_retry, retry), (signals.task_postrun, postrun)
    ):
        yield found
        # A result is stored before the worker sends task_postrun: a test that has every
        # result may leave the block before the last runs' ends are recorded. Wait for them.
        wait_until(lambda: len(found) >= len(slots))


def assert_within_the_limit(windows: Sequence[Window], burst: int, rate: float) -> None:
    """A token bucket admits at most ``burst + rate x w`` in any span of ``w`` seconds.

    Each span runs from one admission's earliest moment to another's latest, and counts the
    admissions that surely lie inside it: sound however wide a loaded box makes the windows,
    and as exact as the old check on the run times (minus its allowance) on a quiet one.
    """
    for start, _ in windows:
        for _, end in windows:
            if end < start:
                continue
            inside = sum(1 for low, high in windows if low >= start and high <= end)
            assert inside <= burst + rate * (end - start) + 1e-6, (start, end, inside)


def span(windows: Sequence[Window]) -> float:
    """From the earliest moment of the first admission to the latest of the last: at least
    the time between the two (so ``span(w) >= x`` holds however wide the windows are)."""
    return max(high for _, high in windows) - min(low for low, _ in windows)
