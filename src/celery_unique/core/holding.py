"""Flows shared by everything that is held for a lease (locks, semaphore slots): waiting to
acquire with backoff, keeping a lease alive, and freeing one after an unanswered acquire."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..errors import BackendError
from .steps import WITHDRAWN, Call, Clock, Eval, Flow, Sleep, check_timeout, flag

__all__ = [
    "ATTEMPT_FLOOR",
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "Attempt",
    "acquire",
    "loss_margin",
    "release_eventually",
    "renew",
    "stamped",
]

# Blocking acquire backs off from the first to the last delay, doubling, with jitter,
# and never sleeps past the moment a holder's lease ends nor the caller's deadline.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.25
#: Seconds an attempt of a blocking acquire with a timeout may take at least, however little
#: of the timeout is left: the last attempt must be able to answer "held" on a slow day rather
#: than fail for want of time. A hung server thus ends ``acquire(timeout=T)`` by T + this, and
#: the rest of the promised 0.5 s is left for raising the error (a floor of the whole 0.5 s
#: overshot it by a few ms, as the chaos suite found).
ATTEMPT_FLOOR = 0.4
#: Seconds between the tries of a clean-up after an unanswered acquire: the first, then
#: doubling to the last.
CLEANUP_FIRST, CLEANUP_MAX = 0.05, 1.0


class Attempt(Protocol):
    """What an attempt answers: whether it acquired, and if not, how soon a holder's lease
    ends (``ttl``, seconds; ``None`` when unknown)."""

    @property
    def acquired(self) -> bool: ...

    @property
    def ttl(self) -> float | None: ...


R = TypeVar("R", bound=Attempt)
T = TypeVar("T")


def acquire(
    attempt: Callable[[float | None], Eval],
    parse: Callable[[Any], R],
    *,
    blocking: bool = True,
    timeout: float | None = None,
    clock: Clock,
) -> Flow[R]:
    """Try ``attempt(step_timeout)`` until it acquires, waiting with capped, jittered backoff
    when ``blocking``.

    A sleep never outlasts a holder's remaining lease (a place is free then) nor the deadline;
    the last attempt is made at the deadline. With a ``timeout`` every attempt must be
    answered by the deadline too (but gets at least :data:`ATTEMPT_FLOOR`), so a hung server
    cannot stretch the wait past it. An executor's error ends the flow: a fault is never
    reported as "held by another".
    """
    check_timeout(blocking, timeout)
    deadline = None if timeout is None else clock() + timeout
    untimed = attempt(None)
    backoff = BACKOFF_FIRST
    while True:
        step = untimed if deadline is None else attempt(max(deadline - clock(), ATTEMPT_FLOOR))
        result = parse((yield step))
        if result.acquired or not blocking:
            return result
        now = clock()
        if deadline is not None and now >= deadline:
            return result
        delay = backoff * (0.5 + random.random() / 2)
        if result.ttl is not None:
            delay = min(delay, result.ttl + 0.001)
        if deadline is not None:
            delay = min(delay, deadline - now)
        yield Sleep(delay)
        backoff = min(backoff * 2, BACKOFF_MAX)


def renew(
    extend: Callable[[float, float], Eval | Call],
    ttl: float,
    *,
    clock: Clock,
    until: float | None = None,
    since: float | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> Flow[str]:
    """Keep a lease alive: ``extend(span, step_timeout)`` every ``ttl / 3`` until it is lost.

    ``since``: the ``clock()`` time the successful acquire was sent (default: now). The lease
    is counted from there, not from its reply: Redis may have run the acquire at once and the
    reply come late, and a successor can take the name ``ttl`` after that.

    Returns why renewal stopped: ``"lost"`` (another holds it, or it expired),
    ``"unreachable"`` (Redis did not answer in time to save the lease: it is reported a
    :data:`loss_margin` before it can end, so that the holder knows before a successor can
    take it), ``"stopped"`` (``stopped()`` turned true: the holder is releasing; no extend is
    sent once it has) or ``"until"``: with ``until`` (a ``clock()`` time), no extend reaches
    past it, and the last one makes the lease end right then.
    A failed extend is retried sooner, while the lease still has time left.
    """
    interval = ttl / 3
    start = clock() if since is None else since
    valid_until = start + ttl
    margin = loss_margin(ttl)
    delay = max(start + interval - clock(), 0.0)
    while True:
        if until is not None and valid_until >= until:
            return "until"
        yield Sleep(delay)
        if stopped():
            return "stopped"
        sent = clock()
        give_up = valid_until - margin
        if sent >= give_up:
            return "unreachable"
        span = ttl
        if until is not None and until - sent < ttl:
            span = until - sent
            if span < 0.001:  # below Redis' resolution: let the lease end as it stands
                return "until"
        # An answer after the moment the loss must be reported is worthless: wait no longer.
        step = extend(span, give_up - sent)
        try:
            reply = yield step
        except BackendError:
            if stopped():
                return "stopped"
            left = give_up - clock()
            if left <= 0:
                return "unreachable"
            delay = min(interval / 4, left / 2)
            continue
        # Withdrawn (the release began before it was written), or a "no" that may be the
        # release's doing: not a loss.
        if reply is WITHDRAWN or stopped():
            return "stopped"
        if not flag(reply):
            return "lost"
        # The new TTL runs from when Redis ran the script, which is after ``sent``.
        valid_until = sent + span
        delay = interval


def loss_margin(ttl: float) -> float:
    """How long before a lease's end an unreachable Redis is reported as its loss: a tenth of
    the TTL, at most 0.25 s (time for the holder to hear of it before a successor can)."""
    return min(ttl / 10, 0.25)


def stamped(flow: Flow[T], clock: Clock) -> Flow[tuple[T, float]]:
    """Run ``flow`` and return its result with the ``clock()`` time its last command was
    handed out: the moment a lease it took is counted from (never later than its send)."""
    sent = clock()
    reply: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value, sent
            if not isinstance(step, Sleep):
                sent = clock()
            reply, error = None, None
            try:
                reply = yield step
            except GeneratorExit:
                raise
            except BaseException as exc:  # the executor's error, for the flow to handle
                error = exc
    finally:
        flow.close()


def release_eventually(release: Eval | Call, ttl: float, *, clock: Clock) -> Flow[bool]:
    """Free what an unanswered acquire may have taken: the clean-up behind an interrupted
    acquire, run off the caller's path.

    Redis did not answer the acquire, so it may not answer this either: ``release`` is sent
    again, backing off, until it is answered or ``ttl`` is over (what was taken, if anything,
    has expired by then). Returns whether something was released.
    """
    give_up = clock() + ttl
    # Soon, and often: until it is answered, the key may answer other callers with a holder
    # that will never run (an apply whose reply was lost). One call a second at most.
    backoff = CLEANUP_FIRST
    while True:
        try:
            return flag((yield release))
        except BackendError:  # noqa: PERF203  # the executor throws it in at that yield
            left = give_up - clock()
            if left <= 0:
                return False
            yield Sleep(min(backoff * (0.5 + random.random() / 2), left))
            backoff = min(backoff * 2, CLEANUP_MAX)
