"""Admission of rate- and concurrency-limited runs: run now, or come back when, with which
headers, decided from what Redis answered (no Redis here, and a fixed random source)."""

from __future__ import annotations

import math

import pytest

from celery_unique import Reservation
from celery_unique.core import admission
from celery_unique.core.lifecycle import Deferral, DeferralKind
from celery_unique.core.messages import BOOKED_HEADER, SLOT_HEADER

#: The fake clock: epoch seconds at the moment a decision is made.
NOW = 1_700_000_000.25


def low(a: float, b: float) -> float:
    return a


def high(a: float, b: float) -> float:
    return b


def test_a_run_with_a_slot_now_runs() -> None:
    assert admission.rate(Reservation(True, 4, 0.0, 0.0), 60.0, 0, NOW) is None
    assert admission.concurrency(True, None) is None


def test_a_booked_slot_defers_to_exactly_that_moment_and_says_it_is_booked() -> None:
    deferral = admission.rate(Reservation(True, 0, 1.7, 0.0), 60.0, 2, NOW, rng=high)
    assert deferral is not None
    assert deferral.countdown == 1.7  # no jitter: the bucket spaces the slots itself
    assert deferral.kind is DeferralKind.RATE_LIMIT
    assert deferral.headers == {BOOKED_HEADER: 2, SLOT_HEADER: NOW + 1.7}
    assert deferral.stores_state


def test_no_slot_within_reach_spreads_the_refused_over_half_the_horizon() -> None:
    refused = Reservation(False, 0, 500.0, 440.0)
    early = admission.rate(refused, 60.0, 0, NOW, rng=low)
    late = admission.rate(refused, 60.0, 0, NOW, rng=high)
    assert early is not None and late is not None
    assert (early.countdown, late.countdown) == (30.0, 60.0)  # min(retry_after, 30) + [0, 30]
    # It books afresh when it comes back: no booking, no slot.
    assert early.headers == {BOOKED_HEADER: None, SLOT_HEADER: None}
    soon = admission.rate(Reservation(False, 0, 80.0, 5.0), 60.0, 0, NOW, rng=low)
    assert soon is not None and soon.countdown == 5.0


def test_a_copy_runs_without_a_second_booking_only_for_the_retry_it_was_booked_for() -> None:
    assert admission.booked(1, 1)
    assert not admission.booked(1, 2)  # a retry of the run books its own slot
    assert not admission.booked(None, 0)  # refused, or never deferred


def test_a_run_over_the_concurrency_limit_comes_back_at_its_turn() -> None:
    deferral = admission.concurrency(False, 2.0, rng=high)
    assert deferral is not None
    assert deferral.countdown == 2.0 * 1.1 and deferral.kind is DeferralKind.CONCURRENCY
    unknown = admission.concurrency(False, None, rng=low)
    assert unknown is not None and unknown.countdown == 1.0


def deferral_of(countdown: float) -> Deferral:
    return Deferral(countdown, DeferralKind.WHILE_RUNNING, "test", {"h": 1})


@pytest.mark.parametrize(
    ("decided", "carried"),
    [(0.001, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0000000001, 1.0), (1.01, 2.0), (2.5, 3.0)],
)
def test_in_whole_seconds_a_deferral_is_rounded_up_to_one_second_at_least(
    decided: float, carried: float
) -> None:
    fitted = admission.fit(deferral_of(decided), whole_seconds=True)
    assert fitted.countdown == carried
    assert fitted.countdown >= decided - 1e-6  # never shorter than decided (but float noise)
    assert fitted.countdown == int(fitted.countdown) >= 1  # RabbitMQ's delayed delivery: int
    # Only the countdown changes: kind, words, headers and stores_state stay.
    assert fitted == Deferral(carried, DeferralKind.WHILE_RUNNING, "test", {"h": 1})


@pytest.mark.parametrize("decided", [0.001, 0.5, 1.7, 31.25])
def test_elsewhere_a_deferral_keeps_its_countdown(decided: float) -> None:
    assert admission.fit(deferral_of(decided), whole_seconds=False).countdown == decided


def test_a_booked_slot_rounded_up_is_reached_not_passed_by_the_copy() -> None:
    # Booked 1.7 s ahead at NOW; in whole seconds the copy comes back at NOW + 2.
    booked = admission.rate(Reservation(True, 0, 1.7, 0.0), 60.0, 0, NOW)
    assert booked is not None
    fitted = admission.fit(booked, whole_seconds=True)
    assert fitted.countdown == 2.0 and fitted.headers == booked.headers
    slot_at = fitted.headers[SLOT_HEADER]
    assert admission.arrived(slot_at, 0, NOW + fitted.countdown) is None  # runs: slot passed


def test_a_copy_at_or_after_its_slot_runs() -> None:
    assert admission.arrived(NOW, 0, NOW) is None
    assert admission.arrived(NOW, 0, NOW + 5) is None
    assert admission.arrived(None, 0, NOW) is None  # sent by a version without the header
    assert admission.arrived("not a number", 0, NOW) is None
    assert admission.arrived(math.nan, 0, NOW) is None


def test_a_copy_just_before_its_slot_waits_the_remainder_in_the_run() -> None:
    for slot_at, left in [(NOW + 0.4, 0.4), (str(NOW + 0.999), 0.999)]:
        wait = admission.arrived(slot_at, 0, NOW)
        assert isinstance(wait, admission.Wait) and wait.seconds == pytest.approx(left)


def test_a_copy_long_before_its_slot_goes_back_still_booked_and_never_runs_early() -> None:
    slot_at = NOW + 2.3
    early = admission.arrived(slot_at, 3, NOW)
    assert isinstance(early, Deferral)
    assert early.countdown == pytest.approx(2.3) and early.kind is DeferralKind.RATE_LIMIT
    assert early.headers == {BOOKED_HEADER: 3, SLOT_HEADER: slot_at}  # same slot, same booking
    # In whole seconds it comes back at NOW + 3, after its slot: it runs then.
    fitted = admission.fit(early, whole_seconds=True)
    assert fitted.countdown == 3.0
    assert admission.arrived(slot_at, 3, NOW + fitted.countdown) is None
