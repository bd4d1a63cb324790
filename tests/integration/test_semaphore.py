"""Semaphores against a real Redis; every body runs once per flavour (sync on threads, async)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend, LockNotOwnedError, LockTimeout, RedisBackend
from celery_unique.core.keys import KeySpace
from tests.helpers import async_wait_until

pytestmark = pytest.mark.anyio


async def test_a_limit_of_two_admits_two_holders_and_no_third(backend: AsyncRedisBackend) -> None:
    a, b, c = (backend.semaphore("api", limit=2, ttl=10) for _ in range(3))
    assert await a.acquire(blocking=False)
    assert await b.acquire(blocking=False)
    assert not await c.acquire(blocking=False)
    assert await a.holders() == 2
    await a.release()
    assert await c.acquire(blocking=False)  # a's slot went to c
    with pytest.raises(LockNotOwnedError):
        await a.release()  # a gave up its slot already
    await b.release()
    await c.release()
    assert await c.holders() == 0


async def test_a_blocking_acquire_gets_the_slot_freed_while_it_waits(
    backend: AsyncRedisBackend,
) -> None:
    holder = backend.semaphore("api", limit=1, ttl=10)
    assert await holder.acquire()
    waiter = backend.semaphore("api", limit=1, ttl=10)
    got: list[bool] = []

    async def wait() -> None:
        got.append(await waiter.acquire(timeout=10))

    async with anyio.create_task_group() as group:
        group.start_soon(wait)
        await anyio.sleep(0.05)  # the waiter is backing off now
        assert not got
        await holder.release()
    assert got == [True]
    await waiter.release()


async def test_a_blocking_acquire_never_sleeps_past_the_earliest_lease(
    backend: AsyncRedisBackend,
) -> None:
    # The holder never releases: its lease (0.3 s) ends, and the waiter takes its place then.
    assert await backend.semaphore("api", limit=1, ttl=0.3).acquire()
    waiter = backend.semaphore("api", limit=1, ttl=10)
    started = time.monotonic()
    assert await waiter.acquire(timeout=5)
    assert time.monotonic() - started < 5  # it was the lease, not the timeout
    await waiter.release()


async def test_a_full_semaphore_times_out_with_lock_timeout(backend: AsyncRedisBackend) -> None:
    assert await backend.semaphore("api", limit=1, ttl=30).acquire()
    with pytest.raises(LockTimeout) as caught:
        async with backend.semaphore("api", limit=1, ttl=30, timeout=0.2):
            pytest.fail("entered a full semaphore")
    assert caught.value.ttl is not None and 29 < caught.value.ttl <= 30


async def test_auto_renew_keeps_a_slot_past_its_ttl_and_reports_a_loss(
    backend: AsyncRedisBackend, client: redis.Redis, prefix: str
) -> None:
    lost: list[object] = []
    slot = backend.semaphore("api", limit=1, ttl=1.0, auto_renew=True, on_lost=lost.append)
    assert await slot.acquire()
    await anyio.sleep(2.5)  # over two TTLs: only renewal can have kept it
    assert await slot.holders() == 1
    assert not await backend.semaphore("api", limit=1, ttl=10).acquire(blocking=False)
    client.delete(KeySpace(prefix).semaphore("api"))  # someone clears it
    await async_wait_until(lambda: lost)  # reported
    assert slot.lost


async def test_the_key_expires_with_its_last_lease(
    backend: AsyncRedisBackend, client: redis.Redis, prefix: str
) -> None:
    key = KeySpace(prefix).semaphore("api")
    await backend.semaphore("api", limit=5, ttl=0.5).acquire()
    await backend.semaphore("api", limit=5, ttl=1.0).acquire()
    assert 500 < client.pttl(key) <= 1000
    await async_wait_until(lambda: not client.exists(key))


async def test_a_cancelled_async_block_frees_its_slot(redis_url: str, prefix: str) -> None:
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)
    try:
        entered = anyio.Event()

        async def hold() -> None:
            async with backend.semaphore("api", limit=1, ttl=60):
                entered.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as group:
            group.start_soon(hold)
            await entered.wait()
            group.cancel_scope.cancel()
        assert await backend.semaphore("api", limit=1, ttl=1).holders() == 0  # not for 60 s
    finally:
        await backend.aclose()


# -- across processes ----------------------------------------------------------------------------

PROCESSES, LIMIT, TRIALS = 16, 3, 30


def _contender(url: str, prefix: str, barrier: Barrier, results: Queue[tuple[int, int]]) -> None:
    backend = RedisBackend.from_url(url, key_prefix=prefix)
    backend.acquire_or_owner("warm-up", "x", 1)  # connect before the first race
    for trial in range(TRIALS):
        slot = backend.semaphore(f"race:{trial}", limit=LIMIT, ttl=60)
        barrier.wait(timeout=60)
        results.put((trial, int(slot.acquire(blocking=False))))
    backend.close()


def test_exactly_three_of_16_processes_get_a_slot_each_trial(redis_url: str, prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results: Queue[tuple[int, int]] = ctx.Queue()
    processes = [
        ctx.Process(target=_contender, args=(redis_url, prefix, barrier, results))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    winners = dict.fromkeys(range(TRIALS), 0)
    for _ in range(PROCESSES * TRIALS):
        trial, won = results.get(timeout=120)
        winners[trial] += won
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert winners == dict.fromkeys(range(TRIALS), LIMIT)


def _holder(url: str, prefix: str, ready: Event) -> None:
    backend = RedisBackend.from_url(url, key_prefix=prefix)
    slot = backend.semaphore("killed", limit=1, ttl=1.5, auto_renew=True)
    assert slot.acquire()
    ready.set()
    time.sleep(3600)  # killed long before


def test_a_sigkilled_holders_slot_frees_within_its_lease(redis_url: str, prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    process = ctx.Process(target=_holder, args=(redis_url, prefix, ready))
    process.start()
    assert ready.wait(60)
    backend = RedisBackend.from_url(redis_url, key_prefix=prefix)
    try:
        time.sleep(2)  # longer than the lease: only renewal can have kept the slot
        assert backend.semaphore("killed", limit=1, ttl=5).holders() == 1
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        killed_at = time.monotonic()
        waiter = backend.semaphore("killed", limit=1, ttl=5)
        assert waiter.acquire(timeout=10)
        assert time.monotonic() - killed_at <= 1.5 + 0.5  # within the dead holder's lease
        waiter.release()
    finally:
        backend.close()
