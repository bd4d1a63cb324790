"""Frozen result objects returned by backends, locks and limiters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Acquisition", "Decision", "Reservation", "Slot"]


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


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one rate-limit check.

    ``allowed`` says whether the tokens were taken. ``remaining`` is how many tokens the
    tightest limit has left (after this request, when allowed). ``retry_after`` is how many
    seconds to wait before the same request would be admitted (``0.0`` when allowed).
    """

    allowed: bool
    remaining: int
    retry_after: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """The outcome of one reservation: tokens booked for the earliest slot within a max wait.

    ``reserved`` says whether the tokens were taken, for the slot ``delay`` seconds from now
    (``0.0``: go now). Otherwise nothing was taken: the earliest slot is ``delay`` seconds away,
    beyond the max wait, and ``retry_after`` says in how many seconds a reservation with the
    same max wait could succeed (if nobody books before). ``remaining`` is how many tokens the
    tightest limit has left (at the slot, after this request, when reserved).

    A reserved slot is spent even if the caller never uses it: the limit stays conservative.
    """

    reserved: bool
    remaining: int
    delay: float
    retry_after: float


@dataclass(frozen=True, slots=True)
class Slot:
    """The outcome of one attempt at a semaphore slot.

    ``acquired`` says whether the caller holds a slot now; ``holders`` how many live holders
    the semaphore has (the caller included, when acquired). ``ttl`` is the caller's lease in
    seconds when acquired, else the seconds until the earliest holder's lease ends. ``due``:
    when refused with a queue, seconds until the caller's turn to try again (else ``ttl``).
    """

    acquired: bool
    holders: int
    ttl: float
    due: float = 0.0
