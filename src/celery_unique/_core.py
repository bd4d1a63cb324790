"""The sans-IO core: every decision the library makes, and no I/O.

An operation of one round trip is an :class:`Op`: the step to send (:class:`Eval` a script,
:class:`Call` a read-only command) and the function that reads its reply. An operation of
several is a *flow*: a generator that yields steps (and :class:`Sleep`), is sent the raw reply
of each, and returns a result. The two executors in ``_backend`` carry them out, one
synchronously and one with ``await``; neither decides anything. Errors of the executor
(``BackendError``) are thrown into a flow, so a flow that can ride out an outage (lock
renewal) decides that here too.

Durations are float seconds everywhere in Python and integer milliseconds only on the way to
Lua; the conversion happens in this module alone. Replies may be ``bytes`` or ``str``
(``decode_responses=True``): the parsers accept both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._exceptions import BackendError, ConfigurationError, RateLimitExceeded
from ._keys import LockKeys
from ._limits import RateLimit
from ._models import Acquisition, Decision, Reservation
from ._scripts import ACQUIRE, EXTEND, RELEASE, TOKEN_BUCKET, Script

__all__ = [
    "Call",
    "Eval",
    "Flow",
    "Op",
    "Sleep",
    "Step",
    "acquire",
    "acquire_once",
    "check_timeout",
    "decode",
    "extend",
    "hit",
    "owner",
    "parse_acquire",
    "release",
    "renew",
    "reserve",
    "to_ms",
    "wait",
]

T = TypeVar("T")

Clock = Callable[[], float]

# Blocking acquire backs off from the first to the last delay, doubling, with jitter,
# and never sleeps past the holder's remaining TTL or the caller's deadline.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.25


@dataclass(frozen=True, slots=True)
class Eval:
    """Run ``script`` with ``keys`` and ``args`` (EVALSHA; the executor handles NOSCRIPT)."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Call:
    """Run one read-only Redis command, e.g. ``("GET", key)``."""

    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next step."""

    seconds: float


Step = Eval | Call | Sleep
Flow = Generator[Step, Any, T]


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    """One round trip: the step to send and how to read its reply."""

    step: Eval | Call
    parse: Callable[[Any], T]


def _flag(reply: Any) -> bool:
    return int(reply) == 1


def _owner(reply: bytes | str | None) -> str | None:
    return None if reply is None else decode(reply)


def to_ms(seconds: float, what: str = "ttl") -> int:
    """Seconds (float) to the whole milliseconds Lua takes, rounding up; rejects nonsense."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{what} must be a finite number of seconds > 0, got {seconds!r}: "
            "locks always expire, so that a crashed owner cannot hold one for ever"
        )
    return max(1, math.ceil(seconds * 1000))


def check_timeout(blocking: bool, timeout: float | None) -> None:
    """Validate ``acquire(blocking, timeout)`` the way ``threading.Lock`` does."""
    if timeout is None:
        return
    if not blocking:
        raise ConfigurationError("timeout cannot be given with blocking=False")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigurationError(f"timeout must be a number of seconds, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ConfigurationError(f"timeout must be >= 0 seconds or None, got {timeout!r}")


def decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seconds(ms: int) -> float | None:
    # PTTL answers -1 for a key without expiry (never set by this library) and -2 for none.
    return ms / 1000 if ms >= 0 else None


def parse_acquire(reply: list[Any]) -> Acquisition:
    """``{1, token, ttl_ms, fence}`` or ``{0, owner, pttl_ms}`` -> :class:`Acquisition`."""
    if int(reply[0]) == 1:
        return Acquisition(True, decode(reply[1]), _seconds(int(reply[2])), int(reply[3]))
    return Acquisition(False, decode(reply[1]), _seconds(int(reply[2])))


def _acquire_step(keys: LockKeys, token: str, ttl_ms: int, previous: str | None = None) -> Eval:
    args: tuple[str | int, ...] = (token, ttl_ms) if previous is None else (token, ttl_ms, previous)
    return Eval(ACQUIRE, (keys.lock, keys.fence), args)


def acquire_once(
    keys: LockKeys, token: str, ttl: float, previous: str | None = None
) -> Op[Acquisition]:
    """One attempt: acquire, re-acquire (same token), take over from ``previous`` if it holds
    the lock, or learn the owner."""
    return Op(_acquire_step(keys, token, to_ms(ttl), previous), parse_acquire)


def acquire(
    keys: LockKeys,
    token: str,
    ttl: float,
    *,
    blocking: bool = True,
    timeout: float | None = None,
    clock: Clock,
) -> Flow[Acquisition]:
    """Acquire, waiting with capped, jittered backoff when ``blocking``.

    A sleep never outlasts the holder's remaining TTL (the lock is free then) nor the
    deadline; the last attempt is made at the deadline.
    """
    check_timeout(blocking, timeout)
    step = _acquire_step(keys, token, to_ms(ttl))
    deadline = None if timeout is None else clock() + timeout
    backoff = BACKOFF_FIRST
    while True:
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


def release(keys: LockKeys, token: str, owner_prefix: str | None = None) -> Op[bool]:
    """Delete the lock if ``token`` owns it (or an owner starting with ``owner_prefix``)."""
    args = (token,) if owner_prefix is None else (token, owner_prefix)
    return Op(Eval(RELEASE, (keys.lock,), args), _flag)


def extend(keys: LockKeys, token: str, ttl: float) -> Op[bool]:
    """Set the lock's TTL to ``ttl`` from now if ``token`` owns it; ``True`` if it did."""
    return Op(Eval(EXTEND, (keys.lock,), (token, to_ms(ttl))), _flag)


def owner(keys: LockKeys) -> Op[str | None]:
    """The token holding the lock, or ``None`` when it is free."""
    return Op(Call(("GET", keys.lock)), _owner)


def renew(
    keys: LockKeys, token: str, ttl: float, *, clock: Clock, until: float | None = None
) -> Flow[str]:
    """Keep a held lock alive: extend it every ``ttl / 3`` until it is lost.

    Returns why renewal stopped: ``"lost"`` (someone else owns it or it expired),
    ``"unreachable"`` (Redis did not answer for a whole TTL, so the lock has expired there)
    or ``"until"``: with ``until`` (a ``clock()`` time), no extend reaches past it, and the
    last one makes the lock expire right then.
    A failed extend is retried sooner, while the lock still has time left.
    """
    step = extend(keys, token, ttl).step
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
        try:
            renewed = _flag((yield step if span == ttl else extend(keys, token, span).step))
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


def check_cost(cost: int, limits: Sequence[RateLimit]) -> None:
    """A cost must be a whole number of tokens that every limit's burst can ever hold."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigurationError(f"cost must be a whole number of tokens >= 1, got {cost!r}")
    smallest = min(limit.burst for limit in limits)
    if cost > smallest:
        raise ConfigurationError(
            f"cost {cost} exceeds the burst of a limit ({smallest}): it could never be admitted"
        )


def parse_decision(reply: list[Any]) -> Decision:
    """``{allowed, remaining, retry_after_us, ...}`` -> :class:`Decision`."""
    return Decision(int(reply[0]) == 1, int(reply[1]), int(reply[2]) / 1_000_000)


# Lua keeps integers exact below 2**53. A bucket may owe its capacity plus the longest wait
# booked (W x N units), and a request adds up to one more capacity: W is capped to stay exact.
# (For any real limit the cap is years: "1000/s" with a burst of 10**6 allows ~100 days.)
_EXACT = 2**53


def _horizon_us(limits: Sequence[RateLimit]) -> int:
    """The longest wait, in microseconds, that every limit's bucket can book exactly."""
    return max(
        0, min((_EXACT - 2 * limit.burst * limit._period_us) // limit._n for limit in limits)
    )


def _max_wait_us(max_wait: float, limits: Sequence[RateLimit]) -> int:
    if (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or math.isnan(max_wait)
        or max_wait < 0
    ):
        raise ConfigurationError(f"max_wait must be a number of seconds >= 0, got {max_wait!r}")
    horizon = _horizon_us(limits)
    # Rounded down: a slot the caller accepts is never later than it said.
    return horizon if max_wait * 1_000_000 >= horizon else math.floor(max_wait * 1_000_000)


def _bucket(keys: Sequence[str], limits: Sequence[RateLimit], cost: int, max_wait_us: int) -> Eval:
    check_cost(cost, limits)
    args: list[str | int] = [cost, max_wait_us]
    for limit in limits:
        args += (limit._n, limit._period_us, limit.burst)
    return Eval(TOKEN_BUCKET, tuple(keys), tuple(args))


def hit(keys: Sequence[str], limits: Sequence[RateLimit], cost: int = 1) -> Op[Decision]:
    """Take ``cost`` tokens from every limit's bucket, or from none; one round trip."""
    return Op(_bucket(keys, limits, cost, 0), parse_decision)


def parse_reservation(reply: list[Any], max_wait_us: int) -> Reservation:
    """``{allowed, remaining, retry_after_us, delay_us}`` -> :class:`Reservation`."""
    if int(reply[0]) == 1:
        return Reservation(True, int(reply[1]), int(reply[3]) / 1_000_000, 0.0)
    slot_us = int(reply[2])
    return Reservation(False, int(reply[1]), slot_us / 1e6, (slot_us - max_wait_us) / 1e6)


def reserve(
    keys: Sequence[str], limits: Sequence[RateLimit], cost: int = 1, *, max_wait: float
) -> Op[Reservation]:
    """Book ``cost`` tokens in every limit's bucket for the earliest moment all have them, if
    that is within ``max_wait`` seconds (``math.inf``: whenever); else take nothing. One
    round trip; ``max_wait=0`` decides like :func:`hit`."""
    wait_us = _max_wait_us(max_wait, limits)
    return Op(_bucket(keys, limits, cost, wait_us), lambda reply: parse_reservation(reply, wait_us))


def wait(
    keys: Sequence[str],
    limits: Sequence[RateLimit],
    cost: int = 1,
    *,
    timeout: float | None = None,
) -> Flow[Decision]:
    """Book the earliest slot (within ``timeout``) and sleep until it: one command and one
    sleep, so waiters are served in the order they asked, without polling.

    :class:`RateLimitExceeded` at once when the slot lies beyond ``timeout``; nothing is
    taken then. A waiter cancelled while it sleeps has spent its slot (never handed to
    another: the limit stays conservative).
    """
    if timeout is not None:
        check_timeout(True, timeout)
    op = reserve(keys, limits, cost, max_wait=math.inf if timeout is None else timeout)
    while True:
        booked = op.parse((yield op.step))
        if booked.reserved:
            if booked.delay > 0:
                yield Sleep(booked.delay)
            return Decision(True, booked.remaining, 0.0)
        if timeout is not None:
            raise RateLimitExceeded(
                f"the rate limit would admit this request in {booked.delay:.3f} s, "
                "after the timeout: wait longer or lower the request rate",
                retry_after=booked.delay,
            )
        # Beyond the longest wait a bucket can book exactly (years): come back nearer to it.
        yield Sleep(booked.retry_after)
