"""Semaphore decisions: at most ``limit`` holders at once, each with a lease on Redis time.

The semaphore is one sorted set of holder tokens scored by when their leases end (see
``lua/semaphore_acquire.lua``); expired holders never count and the key expires with the last
lease. Each function returns an :class:`~.steps.Op` or a flow; none does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError
from . import holding
from .results import Slot
from .scripts import SEMAPHORE_ACQUIRE, SEMAPHORE_EXTEND, SEMAPHORE_HOLDERS, SEMAPHORE_RELEASE
from .steps import Clock, Eval, Flow, Op, flag, to_ms

__all__ = [
    "acquire",
    "acquire_once",
    "check_limit",
    "extend",
    "holders",
    "parse_slot",
    "release",
    "release_held",
]


def check_limit(limit: int) -> int:
    """A limit must be a whole number of holders >= 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be a whole number of holders >= 1, got {limit!r}")
    return limit


def parse_slot(reply: list[Any]) -> Slot:
    """``{1, holders, ttl_ms}`` or ``{0, holders, wait_ms, due_ms}`` -> :class:`Slot`."""
    if int(reply[0]) == 1:
        return Slot(True, int(reply[1]), int(reply[2]) / 1000)
    return Slot(False, int(reply[1]), int(reply[2]) / 1000, int(reply[3]) / 1000)


def acquire_once(key: str | Sequence[str], token: str, limit: int, ttl: float) -> Op[Slot]:
    """One attempt at a slot (re-acquiring with the same token renews its lease). With the
    three keys of ``KeySpace.semaphore_queue``, a caller turned away is queued and told when
    its turn comes (:attr:`Slot.due`)."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    return Op(Eval(SEMAPHORE_ACQUIRE, keys, (token, limit, to_ms(ttl))), parse_slot)


def acquire(
    key: str | Sequence[str],
    token: str,
    limit: int,
    ttl: float,
    *,
    blocking: bool = True,
    timeout: float | None = None,
    clock: Clock,
) -> Flow[Slot]:
    """Take a slot, waiting with backoff when ``blocking``: never past the moment the earliest
    lease ends, nor the deadline (see :func:`.holding.acquire`). ``key`` as for
    :func:`acquire_once`."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    args = (token, limit, to_ms(ttl))
    return holding.acquire(
        lambda within: Eval(SEMAPHORE_ACQUIRE, keys, args, within),
        parse_slot,
        blocking=blocking,
        timeout=timeout,
        clock=clock,
    )


def release(key: str, token: str) -> Op[bool]:
    """Give up ``token``'s slot; ``True`` if it held a live one."""
    return Op(Eval(SEMAPHORE_RELEASE, (key,), (token,)), flag)


def release_held(keys: Sequence[str], token: str, held: float) -> Op[bool]:
    """Give up ``token``'s slot of a queued semaphore (its three keys) after holding it
    ``held`` seconds, which the typical hold time learns from."""
    args = (token, max(0, round(held * 1000)))
    return Op(Eval(SEMAPHORE_RELEASE, (keys[0], keys[2]), args), flag)


def extend(key: str, token: str, ttl: float) -> Op[bool]:
    """Renew ``token``'s lease to ``ttl`` from now if its slot is live; ``True`` if it was."""
    return Op(Eval(SEMAPHORE_EXTEND, (key,), (token, to_ms(ttl))), flag)


def holders(key: str) -> Op[int]:
    """How many live holders the semaphore has."""
    return Op(Eval(SEMAPHORE_HOLDERS, (key,), ()), int)
