"""RateLimit specs and the core's rate-limit operations, without Redis."""

from __future__ import annotations

import math
from typing import Any

import pytest

from celery_unique import (
    ConfigurationError,
    Decision,
    RateLimit,
    RateLimitExceeded,
    Reservation,
)
from celery_unique.core.buckets import hit, parse_decision, reserve, wait
from celery_unique.core.rates import as_limits
from celery_unique.core.scripts import TOKEN_BUCKET
from celery_unique.core.steps import Eval, Sleep


@pytest.mark.parametrize(
    ("spec", "count", "per", "burst", "rate"),
    [
        ("10/s", 10, 1.0, 10, 10.0),
        ("100/m", 100, 60.0, 100, 100 / 60),
        ("1000/h", 1000, 3600.0, 1000, 1000 / 3600),
        ("2/d", 2, 86400.0, 2, 2 / 86400),
        (" 5 / s ", 5, 1.0, 5, 5.0),
        ("0.5/s", 0.5, 1.0, 1, 0.5),
        ("3/10s", 3, 10.0, 3, 0.3),
    ],
)
def test_celery_style_strings(spec: str, count: float, per: float, burst: int, rate: float) -> None:
    limit = RateLimit(spec)
    assert (limit.count, limit.per, limit.burst) == (count, per, burst)
    assert limit.rate == pytest.approx(rate)


def test_other_spellings_and_burst() -> None:
    assert RateLimit(2, per=60) == RateLimit((2, 60)) == RateLimit("2/m")
    assert RateLimit("10/s", burst=20).burst == 20
    assert RateLimit("100/m").spec == "5/3000000/100"  # exact: 5 tokens per 3 s, burst 100


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("ten/m", "not of the form"),
        ("0/s", "must be > 0"),
        ("-1/s", "not of the form"),
        ("5/x", "not of the form"),
        ("5", "not of the form"),
        ("5/0s", "must be > 0"),
        ((0, 60), "must be > 0"),
        ((1, -60), "must be > 0"),
        ((1, 2, 3), "pair"),
        (5, "give the period"),
        (float("inf"), "give the period"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RateLimit(spec)


@pytest.mark.parametrize("burst", [0, -1, 1.5, True])
def test_bad_bursts(burst: Any) -> None:
    with pytest.raises(ConfigurationError, match="burst"):
        RateLimit("1/s", burst=burst)


def test_a_span_too_long_to_track_exactly_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="too long"):
        RateLimit("1/d", burst=10**6)


def test_hit_builds_one_call_for_all_limits() -> None:
    limits = as_limits(["10/s", RateLimit(3, per=3600)])
    op = hit(("a", "b"), limits, 2)
    assert op.step == Eval(TOKEN_BUCKET, ("a", "b"), (2, 0, 10, 1_000_000, 10, 1, 1_200_000_000, 3))
    assert op.parse([1, 5, 0, 0]) == Decision(True, 5, 0.0)
    assert parse_decision([0, 0, 250_000, 0]) == Decision(False, 0, 0.25)


@pytest.mark.parametrize("cost", [0, -1, 1.5, 4])
def test_a_cost_no_bucket_can_hold_is_refused(cost: Any) -> None:
    with pytest.raises(ConfigurationError, match="cost"):
        hit(("a",), as_limits("3/s"), cost)
    with pytest.raises(ConfigurationError, match="cost"):
        reserve(("a",), as_limits("3/s"), cost, max_wait=1)


def test_reserve_sends_the_max_wait_in_microseconds_and_reads_the_slot() -> None:
    op = reserve(("a",), as_limits("10/s"), max_wait=2.5)
    assert op.step == Eval(TOKEN_BUCKET, ("a",), (1, 2_500_000, 10, 1_000_000, 10))
    assert op.parse([1, 3, 0, 0]) == Reservation(True, 3, 0.0, 0.0)
    assert op.parse([1, 0, 0, 400_000]) == Reservation(True, 0, 0.4, 0.0)
    # Denied: the slot is 3 s away, so a booking within 2.5 s is possible in 0.5 s.
    assert op.parse([0, 0, 3_000_000, 0]) == Reservation(False, 0, 3.0, 0.5)
    # Rounded down: a slot is never later than the caller accepted.
    assert reserve(("a",), as_limits("10/s"), max_wait=1e-7).step.args[1] == 0


def test_an_endless_max_wait_is_the_longest_the_buckets_track_exactly() -> None:
    limits = as_limits(["1000/s", RateLimit(5, per=1, burst=10**6)])
    longest = reserve(("a", "b"), limits, max_wait=math.inf).step.args[1]
    assert isinstance(longest, int)
    # A bucket may owe its burst plus the wait, plus one more burst, all below 2**53.
    for limit in limits:
        assert 2 * limit.burst * limit.period_us + longest * limit.n <= 2**53
    assert longest > 100 * 86400 * 10**6  # and that is months even for these limits
    assert reserve(("a", "b"), limits, max_wait=10**12).step.args[1] == longest


@pytest.mark.parametrize("max_wait", [-1, math.nan, "1", None, True])
def test_bad_max_waits_are_refused(max_wait: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_wait"):
        reserve(("a",), as_limits("3/s"), max_wait=max_wait)


def test_wait_books_once_and_sleeps_exactly_until_the_slot() -> None:
    flow = wait(("a",), as_limits("1/s"), 1, timeout=1.0)
    step = next(flow)
    assert isinstance(step, Eval) and step.args[1] == 1_000_000  # max wait = the timeout
    assert flow.send([1, 0, 0, 400_000]) == Sleep(0.4)  # one sleep, no jitter
    with pytest.raises(StopIteration) as done:
        flow.send(None)
    assert done.value.value == Decision(True, 0, 0.0)


def test_wait_goes_at_once_when_the_slot_is_now() -> None:
    flow = wait(("a",), as_limits("1/s"), 1)
    next(flow)
    with pytest.raises(StopIteration) as done:
        flow.send([1, 2, 0, 0])
    assert done.value.value == Decision(True, 2, 0.0)


def test_wait_gives_up_at_once_when_the_slot_is_past_the_timeout() -> None:
    flow = wait(("a",), as_limits("1/s"), 1, timeout=1.0)
    next(flow)
    with pytest.raises(RateLimitExceeded) as caught:
        flow.send([0, 0, 1_500_000, 0])  # the slot would come after the timeout
    assert caught.value.retry_after == 1.5


def test_wait_without_timeout_asks_again_only_beyond_what_buckets_can_book() -> None:
    flow = wait(("a",), as_limits("1/s"), 1)
    first = next(flow)
    assert isinstance(first, Eval)
    step = flow.send([0, 0, int(first.args[1]) + 2_000_000, 0])
    assert step == Sleep(2.0)
    assert isinstance(flow.send(None), Eval)
