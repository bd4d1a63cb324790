"""RateLimitedTask through a real worker: the limit holds fleet-wide, runs are deferred."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis
from celery.result import AsyncResult

from celery_unique import RateLimit
from celery_unique._tasks import backend_for
from tests.celery import app as t

pytestmark = pytest.mark.usefixtures("worker")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_the_limit_holds_in_every_window_and_every_task_succeeds(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    results = [t.limited.delay(tag, i) for i in range(25)]
    assert sorted(r.get(timeout=60) for r in results) == list(range(25))
    times = sorted(int(x) for x in client.lrange(f"times:{tag}", 0, -1))
    assert len(times) == 25
    burst, rate = t.LIMITED.burst, t.LIMITED.rate
    # A token bucket admits at most burst + rate x w in any window of w seconds; the run
    # records its time a moment after admission, hence the small allowance.
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            window = (times[j] - start) / 1e6
            assert j - i + 1 <= burst + rate * (window + 0.02), (i, j, window)
    assert all(r.state == "SUCCESS" for r in results)


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
    result = t.unique_limited.delay(tag)
    wait_until(lambda: result.state == "RETRY")
    assert t.unique_limited.delay(tag).id == result.id  # still the one instance
    # max_retries=0, yet the deferral did not count as a retry: it still succeeds.
    assert AsyncResult(result.id, app=t.app).get(timeout=15) == 0
    assert t.runs(tag) == 1
