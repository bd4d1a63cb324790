"""Whether a rate- or concurrency-limited run may start now, or when it comes back: pure
decisions over what Redis answered, for the Celery layer to carry out.

Each function returns ``None`` (run now) or a :class:`~.lifecycle.Deferral`: the countdown,
its kind, the words for the log and the headers the deferred copy carries (:func:`arrived`
may also say :class:`Wait`). ``rng`` is ``random.uniform`` or a test's own; ``now`` is the
worker's clock, epoch seconds. :func:`fit` makes any deferral one the transport can carry.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .lifecycle import Deferral, DeferralKind
from .messages import BOOKED_HEADER, SLOT_HEADER
from .results import Reservation

__all__ = ["SHORT_WAIT", "Wait", "arrived", "booked", "concurrency", "fit", "rate"]

#: Seconds before its booked slot under which a copy that came early waits in its run
#: rather than going back to the queue (which, in whole seconds, takes at least one).
SHORT_WAIT = 1.0
# Float noise in a countdown (2.0000000001) is not worth a whole second more.
_NOISE = 1e-6


@dataclass(frozen=True, slots=True)
class Wait:
    """Run after waiting ``seconds`` in the run: the booked slot is that close."""

    seconds: float


def fit(deferral: Deferral, whole_seconds: bool) -> Deferral:
    """The deferral as the transport can carry it. With ``whole_seconds`` (RabbitMQ's native
    delayed delivery, which Celery uses for quorum queues, counts whole seconds and refuses
    less than one) the countdown is rounded up, to 1 s at least: never shorter than decided,
    so a booked slot is never run early. Otherwise it is kept as it is."""
    if not whole_seconds:
        return deferral
    seconds = max(1, math.ceil(deferral.countdown - _NOISE))
    return dataclasses.replace(deferral, countdown=float(seconds))


def arrived(slot_at: Any, booked_for: Any, now: float) -> Wait | Deferral | None:
    """A copy carrying its booking (``slot_at``: :data:`~.messages.SLOT_HEADER`'s value,
    ``booked_for``: :data:`~.messages.BOOKED_HEADER`'s) reaches a worker at ``now``: run
    (``None``: the slot has come, or the message names none), wait the remainder in the run
    when it is under :data:`SHORT_WAIT`, else go back to the queue until the slot, still
    booked."""
    try:
        left = float(slot_at) - now
    except (TypeError, ValueError):  # none (sent by an older version), or not a number
        return None
    if not left > 0:  # NaN included: a slot that cannot be read is not waited for
        return None
    if left < SHORT_WAIT:
        return Wait(left)
    return Deferral(
        left,
        DeferralKind.RATE_LIMIT,
        "it came before its booked rate-limit slot",
        {BOOKED_HEADER: booked_for, SLOT_HEADER: slot_at},
    )


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
    reservation: Reservation,
    horizon: float,
    retries: int,
    now: float,
    rng: Uniform = random.uniform,
) -> Deferral | None:
    """After booking the earliest slot within ``horizon`` seconds: run now, come back at the
    booked slot (marked booked for this ``retries``, with the slot's moment by ``now``'s
    clock), or, with none within reach, come back about when one could be and book then."""
    if not reservation.reserved:
        # Every instance refused now sees about the same wait: spread them over half the
        # horizon, in which about that many slots come within reach.
        countdown = min(reservation.retry_after, horizon / 2) + rng(0, horizon / 2)
        return Deferral(
            countdown,
            DeferralKind.RATE_LIMIT,
            "no rate-limit slot within reach",
            {BOOKED_HEADER: None, SLOT_HEADER: None},
        )
    if reservation.delay > 0:
        # No jitter: the bucket spaces the booked slots itself.
        return Deferral(
            reservation.delay,
            DeferralKind.RATE_LIMIT,
            "its rate-limit slot is booked",
            {BOOKED_HEADER: retries, SLOT_HEADER: now + reservation.delay},
        )
    return None
