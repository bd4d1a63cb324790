"""RateLimit specs and the core's rate-limit operations, without Redis."""

from __future__ import annotations

from typing import Any

import pytest

from celery_unique import ConfigurationError, Decision, RateLimit, RateLimitExceeded
from celery_unique._core import Eval, Sleep, hit, parse_decision, wait
from celery_unique._ratelimit import as_limits
from celery_unique._scripts import TOKEN_BUCKET


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
    assert op.step == Eval(TOKEN_BUCKET, ("a", "b"), (2, 10, 1_000_000, 10, 1, 1_200_000_000, 3))
    assert op.parse([1, 5, 0]) == Decision(True, 5, 0.0)
    assert parse_decision([0, 0, 250_000]) == Decision(False, 0, 0.25)


@pytest.mark.parametrize("cost", [0, -1, 1.5, 4])
def test_a_cost_no_bucket_can_hold_is_refused(cost: Any) -> None:
    with pytest.raises(ConfigurationError, match="cost"):
        hit(("a",), as_limits("3/s"), cost)


def test_wait_sleeps_what_the_bucket_says_and_gives_up_past_the_timeout() -> None:
    now = [0.0]
    flow = wait(("a",), as_limits("1/s"), 1, timeout=1.0, clock=lambda: now[0])
    assert isinstance(next(flow), Eval)
    step = flow.send([0, 0, 400_000])
    assert isinstance(step, Sleep)
    assert 0.4 < step.seconds < 0.45
    now[0] += step.seconds
    next(flow)
    with pytest.raises(RateLimitExceeded) as caught:
        flow.send([0, 0, 900_000])  # admission would come after the timeout
    assert caught.value.retry_after == 0.9
