"""Admission of rate- and concurrency-limited runs: run now, or come back when, with which
headers, decided from what Redis answered (no Redis here, and a fixed random source)."""

from __future__ import annotations

from celery_unique import Reservation
from celery_unique.core import admission
from celery_unique.core.lifecycle import DeferralKind
from celery_unique.core.messages import BOOKED_HEADER


def low(a: float, b: float) -> float:
    return a


def high(a: float, b: float) -> float:
    return b


def test_a_run_with_a_slot_now_runs() -> None:
    assert admission.rate(Reservation(True, 4, 0.0, 0.0), 60.0, 0) is None
    assert admission.concurrency(True, None) is None


def test_a_booked_slot_defers_to_exactly_that_moment_and_says_it_is_booked() -> None:
    deferral = admission.rate(Reservation(True, 0, 1.7, 0.0), 60.0, 2, rng=high)
    assert deferral is not None
    assert deferral.countdown == 1.7  # no jitter: the bucket spaces the slots itself
    assert deferral.kind is DeferralKind.RATE_LIMIT
    assert deferral.headers == {BOOKED_HEADER: 2} and deferral.stores_state


def test_no_slot_within_reach_spreads_the_refused_over_half_the_horizon() -> None:
    refused = Reservation(False, 0, 500.0, 440.0)
    early = admission.rate(refused, 60.0, 0, rng=low)
    late = admission.rate(refused, 60.0, 0, rng=high)
    assert early is not None and late is not None
    assert (early.countdown, late.countdown) == (30.0, 60.0)  # min(retry_after, 30) + [0, 30]
    assert early.headers == {BOOKED_HEADER: None}  # it books afresh when it comes back
    soon = admission.rate(Reservation(False, 0, 80.0, 5.0), 60.0, 0, rng=low)
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
