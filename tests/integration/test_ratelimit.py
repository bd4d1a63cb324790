"""Rate limiters against a real Redis, both flavours; accuracy across OS processes."""

from __future__ import annotations

import multiprocessing
import threading
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
    RateLimiter,
    RateLimitExceeded,
    RedisBackend,
    Reservation,
)
from tests.helpers import async_wait_until, wait_until

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
    started = time.monotonic()  # before the hit: the token comes back 50 ms after it
    assert (await limiter.hit("k")).allowed
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
    # The window opens once every process waits at the barrier, before this last party
    # lets them go: it holds every hit, and not their start-up.
    wait_until(lambda: barrier.n_waiting == PROCESSES, timeout=60)
    start = client.time()
    barrier.wait(timeout=60)
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
    sbackend = RedisBackend.from_url(redis_url, key_prefix=prefix)
    sync = sbackend.rate_limiter(HOURLY)
    abackend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)
    try:
        alimiter = abackend.rate_limiter(HOURLY)
        assert sync.hit("k").allowed
        results = [(await alimiter.hit("k")).allowed for _ in range(3)]
        assert results == [True, True, False]
    finally:
        await abackend.aclose()
        sbackend.close()
        await anyio.lowlevel.checkpoint()


# -- reservations ---------------------------------------------------------------------------------


async def test_reserve_books_the_next_slot_or_takes_nothing(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter(HOURLY)
    now = await limiter.reserve("k", max_wait=0)
    assert now == Reservation(True, 2, 0.0, 0.0)  # a full bucket: go now
    await limiter.hit("k", cost=2)
    first = await limiter.reserve("k", max_wait=7200)
    assert first.reserved and first.remaining == 0 and 1199 < first.delay <= 1200
    # The next slot is a token (20 min) later; beyond a max wait of 30 min nothing is taken.
    too_far = await limiter.reserve("k", max_wait=1800)
    assert not too_far.reserved
    assert 2399 < too_far.delay <= 2400
    assert too_far.retry_after == pytest.approx(too_far.delay - 1800)
    second = await limiter.reserve("k", max_wait=7200)
    assert second.reserved and second.delay == pytest.approx(too_far.delay, abs=0.5)
    # Plain hits see the booked slots: nothing before them.
    assert (await limiter.hit("k")).retry_after > second.delay


async def test_several_limits_book_the_latest_of_their_slots(backend: AsyncRedisBackend) -> None:
    limiter = backend.rate_limiter([RateLimit(6, per=3600, burst=2), RateLimit(2, per=3600)])
    assert [(await limiter.reserve("k", max_wait=0)).reserved for _ in range(2)] == [True, True]
    # The first limit has a token again in 10 min, the second in 30 min: the slot is 30 min.
    third = await limiter.reserve("k", max_wait=3600)
    assert third.reserved and 1799 < third.delay <= 1800


class Commands:
    """The top-level commands Redis receives that mention ``needle`` (through MONITOR)."""

    def __init__(self, url: str, needle: str) -> None:
        self.url, self.needle, self.seen = url, needle, list[str]()
        self._client = redis.Redis.from_url(url)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        with self._client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._ready.set()
            for command in monitor.listen():
                text = command["command"]
                if text == f"ECHO {self.needle}:stop":
                    return
                if self.needle in text and command["client_type"] != "lua":
                    self.seen.append(text.split()[0])

    def __enter__(self) -> Commands:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.echo(f"{self.needle}:stop")
        self._thread.join(10)
        self._client.close()


async def test_wait_books_once_sleeps_once_and_serves_in_order(
    backend: AsyncRedisBackend, redis_url: str, prefix: str
) -> None:
    limiter = backend.rate_limiter(RateLimit("20/s", burst=1))  # a slot every 50 ms
    await limiter.hit("warm-up")  # the script is loaded: no NOSCRIPT retry below
    woke: list[tuple[int, float]] = []
    started = time.monotonic()

    async def waiter(i: int) -> None:
        # Asks in this order: once Redis has run the bookings of the i waiters before it.
        await async_wait_until(lambda: len(commands.seen) >= i)
        await limiter.wait("k")
        woke.append((i, time.monotonic() - started))

    with Commands(redis_url, prefix) as commands:
        async with anyio.create_task_group() as group:
            for i in range(6):
                group.start_soon(waiter, i)
    assert commands.seen == ["EVALSHA"] * 6  # one command each: no polling
    assert [i for i, _ in woke] == list(range(6))  # first come, first served
    for i, at in woke:
        assert at >= 0.05 * i - 0.005  # never before its slot (50 ms apart after the first)
    assert woke[-1][1] < 1.0


async def test_wait_with_timeout_books_within_it_or_gives_up_at_once(
    backend: AsyncRedisBackend, client: redis.Redis
) -> None:
    limiter = backend.rate_limiter(RateLimit("10/s", burst=1))
    started = time.monotonic()  # before the hit: the next slot is 100 ms after it
    await limiter.hit("k")
    assert (await limiter.wait("k", timeout=0.5)).allowed  # its slot is ~100 ms away
    assert 0.09 < time.monotonic() - started < 0.5
    for _ in range(4):  # the next slots: 100, 200, 300 and 400 ms on
        before = _redis_us(client)
        last = await limiter.reserve("k", max_wait=0.5)
        assert last.reserved
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.wait("k", timeout=0.25)  # the next slot is ~500 ms away
    after = _redis_us(client)
    assert time.monotonic() - started < 0.1
    # The next slot is a token after the last one booked, which was last.delay after that
    # booking's script ran; the refused wait ran between then and `after`.
    next_slot = last.delay + 0.1
    assert next_slot - (after - before) / 1e6 - 1e-6 <= caught.value.retry_after
    assert 0.25 < caught.value.retry_after <= next_slot + 1e-6


def _book(
    backend: RedisBackend,
    limiter: RateLimiter,
    stop: float,
    out: list[tuple[int, int, Reservation]],
) -> None:
    client = backend.client
    while time.monotonic() < stop:
        before = _redis_us(client)
        booked = limiter.reserve("shared", max_wait=0.3)
        out.append((before, _redis_us(client), booked))


def _redis_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def test_threads_booking_flat_out_get_exactly_the_slots_the_bucket_allows(
    redis_url: str, prefix: str
) -> None:
    backend = RedisBackend.from_url(redis_url, key_prefix=prefix)
    limiter = backend.rate_limiter(RATE)
    start = _redis_us(backend.client) / 1e6
    tried: list[tuple[int, int, Reservation]] = []
    stop = time.monotonic() + 0.5
    threads = [
        threading.Thread(target=_book, args=(backend, limiter, stop, tried)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    backend.close()
    booked = [(before / 1e6, after / 1e6, r.delay) for before, after, r in tried if r.reserved]
    # A slot is the script's TIME plus the delay; the script ran between before and after.
    latest_low = max(before + delay for before, _, delay in booked)
    latest_high = max(after + delay for _, after, delay in booked)
    assert len(tried) > 3 * len(booked)  # really oversubscribed
    # From a full bucket at start, the slots up to the latest hold burst + rate x span...
    assert len(booked) <= RATE.burst + RATE.rate * (latest_high - start)
    # ... and no fewer: once it books ahead, every slot up to the latest was handed out, none
    # twice, a token apart. Counted from the first slot booked ahead, not from `start`: until
    # then the bucket is full, and while the threads get going (with pauses of tens of ms on
    # a loaded box, at a slot per 10 ms) its tokens overflow; once it owes, a pause shorter
    # than the horizon loses nothing.
    ahead = [(before + delay, after + delay) for before, after, delay in booked if delay > 0]
    first_high = min(high for _, high in ahead)
    assert len(ahead) >= 1 + RATE.rate * (latest_low - first_high) - 1
    assert latest_low - start > 0.5  # it booked ahead, past the end of the run
