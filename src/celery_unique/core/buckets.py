"""Rate-limit decisions: take tokens now (``hit``), book the earliest slot (``reserve``), or
book and sleep until it (``wait``). Each is one call of ``lua/token_bucket.lua``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError, RateLimitExceeded
from .rates import RateLimit
from .results import Decision, Reservation
from .scripts import TOKEN_BUCKET
from .steps import Call, Eval, Flow, Op, Sleep, check_timeout

__all__ = [
    "check_cost",
    "hit",
    "parse_decision",
    "parse_reservation",
    "remaining",
    "reserve",
    "stored",
    "time_us",
    "wait",
]


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
    return max(0, min((_EXACT - 2 * limit.burst * limit.period_us) // limit.n for limit in limits))


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
        args += (limit.n, limit.period_us, limit.burst)
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


def remaining(state: bytes | str, spec: str, now_us: int) -> int:
    """How many tokens a bucket holds at ``now_us`` (Redis time, µs): its stored state
    (``"<debt> <last>"``, see ``lua/token_bucket.lua``) read with its key's spec
    (``"<n>/<period_us>/<burst>"``). Negative while slots are booked ahead."""
    debt_text, last_text = (state.decode() if isinstance(state, bytes) else state).split()
    n, period_us, burst = (int(part) for part in spec.split("/"))
    debt = max(0, int(debt_text) - max(0, now_us - int(last_text)) * n)
    return (burst * period_us - debt) // period_us


def stored(key: str) -> Op[bytes | str | None]:
    """The state bucket ``key`` stores, for :func:`remaining`; ``None`` once it has expired
    (a full bucket keeps nothing)."""
    return Op(Call(("GET", key)), lambda reply: reply)


def time_us() -> Op[int]:
    """Redis's clock now, in µs: the clock the buckets count by."""
    return Op(Call(("TIME",)), lambda reply: int(reply[0]) * 1_000_000 + int(reply[1]))
