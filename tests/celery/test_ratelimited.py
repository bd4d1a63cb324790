"""RateLimitedTask through a real worker: the limit holds fleet-wide, runs are deferred."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from celery_unique import ConfigurationError, RateLimit, RateLimitedTask
from celery_unique.celery.ratelimited import RateConfig
from celery_unique.celery.store import backend_for
from celery_unique.core.messages import BOOKED_HEADER
from tests.celery import app as t
from tests.celery.observe import admissions, assert_within_the_limit, deferrals, span
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


def run_times(client: redis.Redis, tag: str) -> list[int]:
    return sorted(int(x) for x in client.lrange(f"times:{tag}", 0, -1))


def test_the_limit_holds_in_every_window_and_every_task_succeeds(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    with admissions("t.limited", tag) as admitted:
        results = [t.limited.delay(tag, i) for i in range(25)]
        assert sorted(r.get(timeout=60) for r in results) == list(range(25))
    times = run_times(client, tag)
    assert len(times) == len(admitted) == 25
    assert_within_the_limit(admitted, t.LIMITED.burst, t.LIMITED.rate)
    assert all(r.state == "SUCCESS" for r in results)


def test_a_queue_books_its_slots_so_each_instance_is_deferred_at_most_once(
    client: redis.Redis,
) -> None:
    tag, n = uuid.uuid4().hex, 30
    with deferrals("t.booked", tag) as seen, admissions("t.booked", tag) as admitted:
        results = [t.booked.delay(tag, i) for i in range(n)]
        assert sorted(r.get(timeout=30) for r in results) == list(range(n))
    times = run_times(client, tag)
    assert len(times) == len(admitted) == n
    assert_within_the_limit(admitted, t.BOOKED.burst, t.BOOKED.rate)
    # Linear: each instance books a slot at its first start and is deferred to it once (a
    # re-check at every return deferred these 30 about 340 times, up to 25 times each).
    assert max(seen.values()) == 1
    assert n - 10 <= seen.total() < n
    # And no slot wasted: after the burst, the slots came at the limit's pace (the windows'
    # span bounds the slots' from above, without the copies' wake-ups in it).
    assert span(admitted) < (n - t.BOOKED.burst) / t.BOOKED.rate + 0.5


def test_a_copy_carrying_its_booking_runs_without_booking_again(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    hourly = backend_for(t.app).rate_limiter(RateLimit(1, per=3600))  # t.dynamic's bucket
    assert hourly.hit(tag).allowed  # the hour's only token is spent
    # A broker redelivers a copy whose slot was booked (retries 0): it runs, and books nothing.
    redelivered = t.dynamic.apply_async((tag, 1), headers={BOOKED_HEADER: 0})
    redelivered.get(timeout=10)
    assert 3590 < hourly.hit(tag).retry_after <= 3600  # not a second token later
    # A booking is for one run: the retry of a run that had one books (or waits) again.
    retry = t.dynamic.apply_async((tag, 1), headers={BOOKED_HEADER: 0}, retries=1)
    wait_until(lambda: retry.state == "RETRY")
    assert t.runs(tag) == 1
    retry.revoke()


def test_beyond_the_horizon_nothing_is_booked_until_a_slot_comes_within_it(
    client: redis.Redis,
) -> None:
    tag = uuid.uuid4().hex
    limiter = backend_for(t.app).rate_limiter(RateLimit(1, per=1))  # t.short_horizon's bucket
    spent = t.redis_now_us()
    assert limiter.hit(tag).allowed  # the next token is 1 s away; the task books 0.3 s ahead
    with deferrals("t.short_horizon", tag) as seen:
        t.short_horizon.delay(tag).get(timeout=10)
    (ran,) = run_times(client, tag)
    assert ran >= spent + 1_000_000  # not before the token came back
    # Refused (nothing taken) while the token was over 0.3 s away, then booked once.
    assert 2 <= seen.total() <= 10
    assert limiter.hit(tag).retry_after <= 1.0  # one token was taken for the run, not more


@pytest.mark.parametrize("bad", [0, -1, math.inf, "60", True])
def test_a_bad_max_wait_is_refused_naming_the_option(bad: Any, redis_url: str) -> None:
    with throwaway_app(redis_url) as app:
        task = app.task(base=RateLimitedTask, global_rate_limit="1/s", rate_limit_max_wait=bad)(
            _noop
        )
        with pytest.raises(ConfigurationError, match="rate_limit_max_wait"):
            RateConfig.resolve(task)
        app.conf.unique_rate_limit_max_wait = bad
        with pytest.raises(ConfigurationError, match="unique_rate_limit_max_wait"):
            RateConfig.resolve(app.task(base=RateLimitedTask, global_rate_limit="1/s")(_noop2))


def test_the_max_wait_is_a_task_option_or_app_setting(redis_url: str) -> None:
    with throwaway_app(redis_url) as app:
        default = app.task(base=RateLimitedTask, global_rate_limit="1/s")(_noop)
        assert RateConfig.resolve(default).max_wait == 60.0
        app.conf.unique_rate_limit_max_wait = 5
        assert RateConfig.resolve(default).max_wait == 5.0
        own = app.task(base=RateLimitedTask, global_rate_limit="1/s", rate_limit_max_wait=2)(_noop2)
        assert RateConfig.resolve(own).max_wait == 2.0


@contextmanager
def throwaway_app(redis_url: str) -> Iterator[Celery]:
    app = Celery(f"throwaway-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(unique_backend_url=redis_url)
    try:
        yield app
    finally:
        app.close()


def _noop() -> None:
    pass


def _noop2() -> None:
    pass


def test_buckets_are_per_named_argument(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    first, other = t.per_customer.delay(1, tag), t.per_customer.delay(2, tag)
    first.get(timeout=10)
    other.get(timeout=10)
    again = t.per_customer.delay(1, tag)  # customer 1's hourly token is spent
    wait_until(lambda: again.state == "RETRY")
    assert t.runs(tag) == 2
    again.revoke()


def test_a_dynamic_limit_can_be_none(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    unlimited = [t.dynamic.delay(tag, 0) for _ in range(3)]
    for result in unlimited:
        result.get(timeout=10)
    limited = [t.dynamic.delay(tag, 1) for _ in range(2)]
    # One of the two takes the hour's only token (whichever a worker thread starts first).
    wait_until(lambda: sorted(r.state for r in limited) == ["RETRY", "SUCCESS"])
    assert t.runs(tag) == 4
    for result in limited:
        result.revoke()


def test_a_deferred_unique_task_keeps_its_lock_and_its_retries(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    limiter = backend_for(t.app).rate_limiter(RateLimit(1, per=2))
    assert limiter.hit(tag).allowed  # spend the only token: the task must wait ~2 s
    with deferrals("t.unique_limited", tag) as seen:
        result = t.unique_limited.delay(tag)
        wait_until(lambda: result.state == "RETRY")
        assert t.unique_limited.delay(tag).id == result.id  # still the one instance
        # max_retries=0, yet the deferral did not count as a retry: it still succeeds.
        assert AsyncResult(result.id, app=t.app).get(timeout=15) == 0
    assert t.runs(tag) == 1
    assert seen == {result.id: 1}  # deferred to its booked slot once, run without a re-check
