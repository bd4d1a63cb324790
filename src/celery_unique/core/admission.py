"""Whether a rate- or concurrency-limited run may start now, or when it comes back: pure
decisions over what Redis answered, for the Celery layer to carry out.

Each function returns ``None`` (run now) or a :class:`~.lifecycle.Deferral`: the countdown,
its kind, the words for the log and the headers the deferred copy carries. ``rng`` is
``random.uniform`` or a test's own.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .lifecycle import Deferral, DeferralKind
from .messages import BOOKED_HEADER
from .results import Reservation

__all__ = ["booked", "concurrency", "rate"]

#: ``random.uniform``'s shape: a number between the two bounds.
Uniform = Callable[[float, float], float]


def booked(header: Any, retries: int) -> bool:
    """Whether a run's rate-limit slot was booked already: its copy came back at the slot
    (the header holds the retry count it was booked for). A broker's redelivery of that copy
    must not book (or be refused) a second time; a retry of the run books its own."""
    return header is not None and header == retries


def concurrency(
    acquired: bool, due: float | None, rng: Uniform = random.uniform
) -> Deferral | None:
    """After an attempt at a concurrency slot: run (``acquired``), or come back at the
    caller's turn in the queue of runs turned away (``due`` seconds; unknown: in a second), a
    little jittered against lockstep."""
    if acquired:
        return None
    return Deferral(
        (due or 1.0) * rng(1.0, 1.1), DeferralKind.CONCURRENCY, "its concurrency limit is reached"
    )


def rate(
    reservation: Reservation, horizon: float, retries: int, rng: Uniform = random.uniform
) -> Deferral | None:
    """After booking the earliest slot within ``horizon`` seconds: run now, come back at the
    booked slot (marked booked for this ``retries``), or, with none within reach, come back
    about when one could be and book then."""
    if not reservation.reserved:
        # Every instance refused now sees about the same wait: spread them over half the
        # horizon, in which about that many slots come within reach.
        countdown = min(reservation.retry_after, horizon / 2) + rng(0, horizon / 2)
        return Deferral(
            countdown,
            DeferralKind.RATE_LIMIT,
            "no rate-limit slot within reach",
            {BOOKED_HEADER: None},
        )
    if reservation.delay > 0:
        # No jitter: the bucket spaces the booked slots itself.
        return Deferral(
            reservation.delay,
            DeferralKind.RATE_LIMIT,
            "its rate-limit slot is booked",
            {BOOKED_HEADER: retries},
        )
    return None
