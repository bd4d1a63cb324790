"""Cancellation of the async objects, on asyncio and on trio alike (anyio's cancel scopes):
a cancelled ``async with`` frees at once, an acquire cut short mid-flight never leaves its
lock behind, and a storm of cancellations leaves the pool and Redis in order."""

from __future__ import annotations

import random
import time
import uuid

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend
from tests.conftest import lock_owner
from tests.helpers import async_wait_until
from tests.proxy import Proxy

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_cancelling_a_scope_inside_async_with_frees_the_key(
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


async def test_a_timeout_around_the_block_frees_the_key(abackend: AsyncRedisBackend) -> None:
    lock = abackend.lock("job", ttl=60)
    with anyio.move_on_after(0.05):
        async with lock:
            await anyio.sleep(10)
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


async def test_cancelling_acquire_mid_flight_never_leaves_the_lock_behind(
    proxy: Proxy, prefix: str, client: redis.Redis
) -> None:
    backend = AsyncRedisBackend.from_url(proxy.url, key_prefix=prefix)
    await backend.acquire_or_owner("warm-up", "x", 1)  # connect first
    lock = backend.lock("job", ttl=60)
    proxy.hold_replies()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lock.acquire)
        # Redis runs the acquire; its reply is held on the way back.
        await async_wait_until(lambda: lock_owner(client, prefix, "job") == lock.token)
        tg.cancel_scope.cancel()
        proxy.pass_replies()
    assert lock_owner(client, prefix, "job") is None  # freed before the cancel completed
    await backend.aclose()


async def test_an_acquire_cancelled_with_its_reply_lost_returns_in_time_and_cleans_up(
    proxy: Proxy, prefix: str, client: redis.Redis
) -> None:
    """Cancelled while its reply is held back for good, the reply is waited for only until
    the deadline, and the lock it may hold is freed once Redis answers again."""
    backend = AsyncRedisBackend.from_url(proxy.url, key_prefix=prefix, socket_timeout=1.0)
    await backend.acquire_or_owner("warm-up", "x", 1)  # connected: the acquire is one trip
    lock = backend.lock("job", ttl=60)
    proxy.hold_replies()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lock.acquire)
        await async_wait_until(lambda: lock_owner(client, prefix, "job") == lock.token)
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started <= 1.0 + 0.5  # the deadline, not the lost reply's
    proxy.pass_replies()
    await async_wait_until(lambda: lock_owner(client, prefix, "job") is None)  # cleaned up
    assert await backend.lock("other", ttl=5).owner() is None  # and the pool is in order
    await backend.aclose()


async def test_hundreds_of_tasks_share_a_small_pool_without_failing(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    name = f"pool-{uuid.uuid4().hex[:8]}"  # count only this backend's connections
    backend = AsyncRedisBackend.from_url(
        redis_url, key_prefix=prefix, max_connections=4, client_name=name
    )
    results: list[bool] = []
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        lock = backend.lock(f"job{i % 50}", ttl=30)
        got = await lock.acquire(timeout=20)
        if got:
            opened = max(opened, sum(1 for c in client.client_list() if c.get("name") == name))
            await lock.release()
        results.append(got)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(400):
                tg.start_soon(one, i)
    finally:
        await backend.aclose()
    assert results == [True] * 400
    assert 1 <= opened <= 4


async def test_a_storm_of_cancellations_leaves_nothing_held_and_the_pool_in_order(
    proxy: Proxy, prefix: str, client: redis.Redis
) -> None:
    """Two hundred holders on a slow link, each cut short at a random moment: entering,
    holding, leaving. Every lock is free once the clean-ups are answered, and the backend
    works on."""
    backend = AsyncRedisBackend.from_url(proxy.url, key_prefix=prefix, max_connections=8)
    proxy.delay = 0.01
    rng = random.Random(19)

    async def holder(i: int) -> None:
        with anyio.move_on_after(rng.uniform(0, 0.08)):
            async with backend.lock(f"storm{i % 20}", ttl=30, timeout=5):
                await anyio.sleep(rng.uniform(0, 0.04))

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(holder, i)
    proxy.delay = 0.0
    await async_wait_until(
        lambda: all(lock_owner(client, prefix, f"storm{i}") is None for i in range(20))
    )
    lock = backend.lock("after", ttl=5)
    assert await lock.acquire(blocking=False)
    await lock.release()
    await backend.aclose()
