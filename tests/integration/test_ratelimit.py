"""Rate limiters against a real Redis, both flavours; accuracy across OS processes."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from unittest import mock

import anyio
import anyio.lowlevel
import pytest
import redis

from celery_unique import (
    AsyncRedisBackend,
    ConfigurationError,
    RateLimit,
    RateLimitExceeded,
    RedisBackend,
)

pytestmark = pytest.mark.anyio

HOURLY = RateLimit(3, per=3600)  # nothing refills during a test


async def test_hit_admits_the_burst_then_reports_when_to_retry(
    backend: AsyncRedisBackend,
) -> None:
    limiter = backend.rate_limiter(HOURLY)
    decisions = [await limiter.hit("customer:7") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert 1199 < decisions[3].retry_after <= 1200
    assert (await limiter.hit("customer:8")).allowed  # keys are separate buckets


async def test_several_limits_are_decided_together(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter(["100/s", RateLimit(2, per=3600)])
    assert [(await limiter.hit("k")).allowed for _ in range(3)] == [True, True, False]


async def test_wait_sleeps_until_admitted(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter(RateLimit("20/s", burst=1))
    assert (await limiter.hit("k")).allowed
    started = time.monotonic()
    assert (await limiter.wait("k")).allowed
    assert 0.02 < time.monotonic() - started < 1.0  # about one token's time (50 ms)


async def test_wait_gives_up_with_rate_limit_exceeded(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter(RateLimit(1, per=3600))
    await limiter.hit("k")
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.wait("k", timeout=0.5)
    assert time.monotonic() - started < 0.5  # it knew at once that 0.5 s would not do
    assert 3500 < caught.value.retry_after <= 3600


async def test_client_clocks_moved_by_an_hour_change_nothing(
    backend: AsyncRedisBackend,
) -> None:
    limiter = backend.rate_limiter(HOURLY)
    real = time.time
    with mock.patch("time.time", lambda: real() + 3600):
        first = [(await limiter.hit("k")).allowed for _ in range(4)]
    with mock.patch("time.time", lambda: real() - 3600):
        second = (await limiter.hit("k")).allowed
    assert first == [True, True, True, False]
    assert second is False  # only Redis time counts


async def test_bad_costs_are_refused(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter(HOURLY)
    with pytest.raises(ConfigurationError, match="cost"):
        await limiter.hit("k", cost=4)


# -- accuracy under oversubscription, across processes ---------------------------------------

PROCESSES = 4
RATE = RateLimit("100/s", burst=10)
SECONDS = 1.5


def _hammer(url: str, prefix: str, barrier: Barrier, out: Queue[tuple[int, int]]) -> None:
    limiter = RedisBackend.from_url(url, key_prefix=prefix).rate_limiter(RATE)
    limiter.hit("warm-up")
    barrier.wait(timeout=60)
    admitted = tried = 0
    stop = time.monotonic() + SECONDS
    while time.monotonic() < stop:
        admitted += limiter.hit("shared").allowed
        tried += 1
    out.put((admitted, tried))


def test_processes_at_ten_times_the_rate_never_get_more_than_the_bucket_allows(
    redis_url: str, client: redis.Redis
) -> None:
    prefix = f"acc{uuid.uuid4().hex[:8]}:"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    out: Queue[tuple[int, int]] = ctx.Queue()
    workers = [
        ctx.Process(target=_hammer, args=(redis_url, prefix, barrier, out))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=60)
    start = client.time()
    results = [out.get(timeout=60) for _ in workers]
    end = client.time()
    for worker in workers:
        worker.join(30)
    admitted = sum(a for a, _ in results)
    tried = sum(t for _, t in results)
    elapsed = (end[0] - start[0]) + (end[1] - start[1]) / 1e6
    bound = RATE.burst + RATE.rate * elapsed
    assert tried >= 10 * bound  # really oversubscribed
    assert admitted <= bound  # never over
    assert admitted >= 0.95 * bound * SECONDS / elapsed  # and not needlessly under


async def test_async_limiter_shares_buckets_with_sync_ones(redis_url: str, prefix: str) -> None:
    sync = RedisBackend.from_url(redis_url, key_prefix=prefix).rate_limiter(HOURLY)
    abackend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)
    try:
        alimiter = abackend.rate_limiter(HOURLY)
        assert sync.hit("k").allowed
        results = [(await alimiter.hit("k")).allowed for _ in range(3)]
        assert results == [True, True, False]
    finally:
        await abackend.aclose()
        sync._backend.close()
        await anyio.lowlevel.checkpoint()
