"""Lock decisions: acquire (once, or waiting with backoff), release, extend, owner, renewal.

A held lock is one key whose value is ``<fence>:<token>`` (see ``lua/acquire.lua``). Each
function returns an :class:`~.steps.Op` (one round trip) or a flow; none does I/O.
"""

from __future__ import annotations

import random
from typing import Any

from ..errors import BackendError
from .results import Acquisition
from .scripts import ACQUIRE, EXTEND, RELEASE
from .steps import Call, Clock, Eval, Flow, Op, Sleep, check_timeout, decode, flag, to_ms

__all__ = [
    "ATTEMPT_FLOOR",
    "acquire",
    "acquire_once",
    "extend",
    "owner",
    "parse_acquire",
    "parse_owner",
    "release",
    "release_eventually",
    "renew",
]

# Blocking acquire backs off from the first to the last delay, doubling, with jitter,
# and never sleeps past the holder's remaining TTL or the caller's deadline.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.25
#: Seconds an attempt of a blocking acquire with a timeout may take at least, however little
#: of the timeout is left: the last attempt must be able to answer "held" on a slow day rather
#: than fail for want of time. A hung server thus ends ``acquire(timeout=T)`` by T + this.
ATTEMPT_FLOOR = 0.5


def _seconds(ms: int) -> float | None:
    # PTTL answers -1 for a key without expiry (never set by this library) and -2 for none.
    return ms / 1000 if ms >= 0 else None


def parse_owner(value: bytes | str | None) -> str | None:
    """The token in a lock key's value (``<fence>:<token>``), or ``None`` for no lock."""
    if value is None:
        return None
    return decode(value).partition(":")[2]


def parse_acquire(reply: list[Any]) -> Acquisition:
    """``{1, token, ttl_ms, fence}`` or ``{0, owner, pttl_ms}`` -> :class:`Acquisition`."""
    if int(reply[0]) == 1:
        return Acquisition(True, decode(reply[1]), _seconds(int(reply[2])), int(reply[3]))
    return Acquisition(False, decode(reply[1]), _seconds(int(reply[2])))


def _acquire_args(token: str, ttl_ms: int, previous: str | None) -> tuple[str | int, ...]:
    return (token, ttl_ms) if previous is None else (token, ttl_ms, previous)


def acquire_once(key: str, token: str, ttl: float, previous: str | None = None) -> Op[Acquisition]:
    """One attempt: acquire, re-acquire (same token: TTL refreshed, fence kept), take over
    from ``previous`` if that token holds the lock, or learn the owner."""
    return Op(Eval(ACQUIRE, (key,), _acquire_args(token, to_ms(ttl), previous)), parse_acquire)


def acquire(
    key: str,
    token: str,
    ttl: float,
    *,
    blocking: bool = True,
    timeout: float | None = None,
    clock: Clock,
) -> Flow[Acquisition]:
    """Acquire, waiting with capped, jittered backoff when ``blocking``.

    A sleep never outlasts the holder's remaining TTL (the lock is free then) nor the
    deadline; the last attempt is made at the deadline. With a ``timeout`` every attempt must
    be answered by the deadline too (but gets at least :data:`ATTEMPT_FLOOR`), so a hung
    server cannot stretch the wait past it. An executor's error ends the flow: a fault is
    never reported as "held by another".
    """
    check_timeout(blocking, timeout)
    args = _acquire_args(token, to_ms(ttl), None)
    step = Eval(ACQUIRE, (key,), args)
    deadline = None if timeout is None else clock() + timeout
    backoff = BACKOFF_FIRST
    while True:
        if deadline is not None:
            step = Eval(ACQUIRE, (key,), args, max(deadline - clock(), ATTEMPT_FLOOR))
        result = parse_acquire((yield step))
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


def release(key: str, token: str, owner_prefix: str | None = None) -> Op[bool]:
    """Delete the lock if ``token`` owns it (or an owner starting with ``owner_prefix``)."""
    args = (token,) if owner_prefix is None else (token, owner_prefix)
    return Op(Eval(RELEASE, (key,), args), flag)


def release_eventually(key: str, token: str, ttl: float, *, clock: Clock) -> Flow[bool]:
    """Release a lock that an unanswered acquire may have taken: the clean-up behind an
    interrupted acquire, run off the caller's path.

    Redis did not answer the acquire, so it may not answer this either: the release is tried
    again, backing off, until it is answered or ``ttl`` is over (the lock, if it was taken,
    has expired by then). Returns whether a lock was released.
    """
    give_up = clock() + ttl
    step = release(key, token).step
    backoff = BACKOFF_MAX
    while True:
        try:
            return flag((yield step))
        except BackendError:  # noqa: PERF203  # the executor throws it in at that yield
            left = give_up - clock()
            if left <= 0:
                return False
            yield Sleep(min(backoff * (0.5 + random.random() / 2), left))
            backoff = min(backoff * 2, 4.0)


def extend(key: str, token: str, ttl: float) -> Op[bool]:
    """Set the lock's TTL to ``ttl`` from now if ``token`` owns it; ``True`` if it did."""
    return Op(Eval(EXTEND, (key,), (token, to_ms(ttl))), flag)


def owner(key: str) -> Op[str | None]:
    """The token holding the lock, or ``None`` when it is free."""
    return Op(Call(("GET", key)), parse_owner)


def renew(
    key: str, token: str, ttl: float, *, clock: Clock, until: float | None = None
) -> Flow[str]:
    """Keep a held lock alive: extend it every ``ttl / 3`` until it is lost.

    Returns why renewal stopped: ``"lost"`` (someone else owns it or it expired),
    ``"unreachable"`` (Redis did not answer for a whole TTL, so the lock has expired there)
    or ``"until"``: with ``until`` (a ``clock()`` time), no extend reaches past it, and the
    last one makes the lock expire right then.
    A failed extend is retried sooner, while the lock still has time left.
    """
    interval = ttl / 3
    valid_until = clock() + ttl
    delay = interval
    while True:
        if until is not None and valid_until >= until:
            return "until"
        yield Sleep(delay)
        sent = clock()
        span = ttl
        if until is not None and until - sent < ttl:
            span = until - sent
            if span < 0.001:  # below Redis' resolution: let the lock expire as it stands
                return "until"
        # An answer later than the lock's end is worthless: wait no longer than that.
        step = Eval(EXTEND, (key,), (token, to_ms(span)), max(valid_until - sent, 0.05))
        try:
            renewed = flag((yield step))
        except BackendError:
            left = valid_until - clock()
            if left <= 0:
                return "unreachable"
            delay = min(interval / 4, left / 2)
            continue
        if not renewed:
            return "lost"
        # The new TTL runs from when Redis ran the script, which is after ``sent``.
        valid_until = sent + span
        delay = interval
