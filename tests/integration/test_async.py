"""What only the asyncio flavour has: cancellation, and many coroutines on one pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
async def abackend(redis_url: str, prefix: str) -> AsyncIterator[AsyncRedisBackend]:
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)
    yield backend
    await backend.aclose()


async def test_cancelling_an_anyio_scope_inside_async_with_frees_the_key(
    abackend: AsyncRedisBackend,
) -> None:
    lock = abackend.lock("job", ttl=60)
    entered = anyio.Event()

    async def hold() -> None:
        async with lock:
            entered.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await entered.wait()
        tg.cancel_scope.cancel()
    assert await lock.owner() is None  # freed at once, not after the 60 s TTL


async def test_cancelling_an_asyncio_task_inside_async_with_frees_the_key(
    abackend: AsyncRedisBackend,
) -> None:
    lock = abackend.lock("job", ttl=60)
    entered = asyncio.Event()

    async def hold() -> None:
        async with lock:
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.get_running_loop().create_task(hold())
    await entered.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert await lock.owner() is None


async def test_a_timeout_around_the_block_frees_the_key(abackend: AsyncRedisBackend) -> None:
    lock = abackend.lock("job", ttl=60)
    with anyio.move_on_after(0.05):
        async with lock:
            await anyio.sleep(10)
    assert await lock.owner() is None


async def test_cancelling_acquire_mid_flight_never_leaves_the_lock_behind(
    abackend: AsyncRedisBackend, client: redis.Redis
) -> None:
    await abackend.acquire_or_owner("warm-up", "x", 1)  # a pooled connection is ready
    lock = abackend.lock("job", ttl=60)
    # Pause the server so that the acquire is on the wire, unanswered, when it is cancelled.
    # Redis still runs it when the pause ends: the cancelled caller must not keep the lock.
    client.client_pause(300)
    task = asyncio.get_running_loop().create_task(lock.acquire())
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    await asyncio.sleep(0.4)  # past the pause, whatever the cancelled call left behind
    assert await lock.owner() is None


async def test_cancelling_a_blocking_wait_gives_up_cleanly(abackend: AsyncRedisBackend) -> None:
    holder = abackend.lock("job", ttl=60)
    assert await holder.acquire()
    waiter = abackend.lock("job", ttl=60)
    with anyio.move_on_after(0.2) as scope:
        await waiter.acquire()
    assert scope.cancelled_caught
    assert await holder.owner() == holder.token  # the waiter's cleanup left it alone
    await holder.release()


async def test_hundreds_of_coroutines_share_a_small_pool_without_failing(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix, max_connections=4)
    before = int(client.info("clients")["connected_clients"])

    async def one(i: int) -> bool:
        lock = backend.lock(f"job{i % 50}", ttl=30)
        if await lock.acquire(timeout=20):
            await lock.release()
            return True
        return False

    try:
        results = await asyncio.gather(*(one(i) for i in range(400)))
        opened = int(client.info("clients")["connected_clients"]) - before
    finally:
        await backend.aclose()
    assert all(results)
    assert 1 <= opened <= 4


async def test_auto_renew_task_stops_with_release(abackend: AsyncRedisBackend) -> None:
    lock = abackend.lock("job", ttl=0.3, auto_renew=True)
    async with lock:
        renewal = lock._renewal
        assert renewal is not None and not renewal.done()
    assert renewal.done()
    assert lock._renewal is None
