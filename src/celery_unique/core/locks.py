"""Lock decisions: acquire (once, or waiting with backoff), release, extend, owner, renewal.

A held lock is one key whose value is ``<fence>:<token>`` (see ``lua/acquire.lua``). Each
function returns an :class:`~.steps.Op` (one round trip) or a flow; none does I/O. Given the
holder's ``fence``, release and extend also carry the server's owner-checked commands as
alternatives to their scripts (:mod:`.native`).
"""

from __future__ import annotations

from typing import Any

from . import holding, native
from .results import Acquisition
from .scripts import ACQUIRE, EXTEND, MOVE, RELEASE
from .steps import Call, Clock, Eval, Flow, Op, decode, flag, to_ms

__all__ = [
    "acquire",
    "acquire_once",
    "extend",
    "move",
    "owner",
    "parse_acquire",
    "parse_owner",
    "release",
    "ttl",
]


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


def move(key: str, token: str, ttl: float, predecessor: str, freeing: str) -> Op[Acquisition]:
    """Acquire lock ``key`` for ``token`` (also from ``predecessor``) and, in the same step,
    free lock ``freeing`` (same hash slot) if ``predecessor`` holds it."""
    return Op(Eval(MOVE, (freeing, key), (predecessor, token, to_ms(ttl))), parse_acquire)


def acquire(
    key: str,
    token: str,
    ttl: float,
    *,
    blocking: bool = True,
    timeout: float | None = None,
    clock: Clock,
) -> Flow[Acquisition]:
    """Acquire, waiting with backoff when ``blocking`` (see :func:`.holding.acquire`)."""
    args = _acquire_args(token, to_ms(ttl), None)
    return holding.acquire(
        lambda within: Eval(ACQUIRE, (key,), args, within),
        parse_acquire,
        blocking=blocking,
        timeout=timeout,
        clock=clock,
    )


def release(
    key: str, token: str, owner_prefix: str | None = None, *, fence: int | None = None
) -> Op[bool]:
    """Delete the lock if ``token`` owns it (or an owner starting with ``owner_prefix``).

    ``fence``: the one this holder's acquire answered, for the owner-checked delete where the
    server has it (the answer is the script's either way).
    """
    if owner_prefix is not None:
        return Op(Eval(RELEASE, (key,), (token, owner_prefix)), flag)
    alternatives = () if fence is None else native.release(key, native.held_value(fence, token))
    return Op(Eval(RELEASE, (key,), (token,), natives=alternatives), flag)


def extend(key: str, token: str, ttl: float, *, fence: int | None = None) -> Op[bool]:
    """Set the lock's TTL to ``ttl`` from now if ``token`` owns it; ``True`` if it did.

    ``fence``: as for :func:`release`.
    """
    ttl_ms = to_ms(ttl)
    alternatives = (
        () if fence is None else native.extend(key, native.held_value(fence, token), ttl_ms)
    )
    return Op(Eval(EXTEND, (key,), (token, ttl_ms), natives=alternatives), flag)


def owner(key: str) -> Op[str | None]:
    """The token holding the lock, or ``None`` when it is free."""
    return Op(Call(("GET", key)), parse_owner)


def ttl(key: str) -> Op[float | None]:
    """Seconds the lock has left, or ``None`` when it is free."""
    return Op(Call(("PTTL", key)), lambda reply: _seconds(int(reply)))
