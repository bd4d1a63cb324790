"""Frozen result objects returned by backends, locks and limiters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Acquisition"]


@dataclass(frozen=True, slots=True)
class Acquisition:
    """The outcome of one acquire attempt.

    ``acquired`` says whether the caller holds the lock now. ``owner`` is the token of the holder
    (the caller's own token when acquired). ``ttl`` is the lock's remaining lifetime in seconds
    (``None`` when the key has no expiry, which this library never sets). ``fence`` is the fencing
    token, strictly increasing per lock name, set only when acquired.
    """

    acquired: bool
    owner: str
    ttl: float | None
    fence: int | None = None
