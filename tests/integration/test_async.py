"""What only the asyncio flavour has: a native ``task.cancel()``, and the batching of many
coroutines' calls (tests/integration/test_cancellation.py runs the rest on asyncio and trio)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from celery_unique import AsyncRedisBackend, BackendError, RateLimit
from tests.conftest import lock_key, lock_owner
from tests.helpers import async_wait_until
from tests.proxy import Proxy

pytestmark = pytest.mark.anyio


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


async def test_cancelling_acquire_mid_flight_never_leaves_the_lock_behind(
    proxy: Proxy, prefix: str, client: redis.Redis
) -> None:
    backend = AsyncRedisBackend.from_url(proxy.url, key_prefix=prefix)
    await backend.acquire_or_owner("warm-up", "x", 1)  # connect first
    lock = backend.lock("job", ttl=60)
    proxy.hold_replies()
    task = asyncio.get_running_loop().create_task(lock.acquire())
    # Redis runs the acquire; its reply is held on the way back.
    await async_wait_until(lambda: lock_owner(client, prefix, "job") == lock.token)
    task.cancel()
    proxy.pass_replies()
    await asyncio.wait([task])
    assert task.cancelled()
    assert lock_owner(client, prefix, "job") is None  # freed before the cancel completed
    await backend.aclose()


async def test_a_lone_acquire_cancelled_with_its_reply_lost_returns_in_time_and_cleans_up(
    proxy: Proxy, prefix: str, client: redis.Redis
) -> None:
    """The lone caller's command goes out from its own task; cancelled while its reply is
    held back for good, the reply is waited for off its path only until the deadline, and
    the lock it may hold is freed once Redis answers again."""
    backend = AsyncRedisBackend.from_url(proxy.url, key_prefix=prefix, socket_timeout=1.0)
    await backend.acquire_or_owner("warm-up", "x", 1)  # connected: the acquire is one trip
    lock = backend.lock("job", ttl=60)
    proxy.hold_replies()
    task = asyncio.get_running_loop().create_task(lock.acquire())
    await async_wait_until(lambda: lock_owner(client, prefix, "job") == lock.token)
    started = time.monotonic()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert time.monotonic() - started <= 1.0 + 0.5  # the deadline, not the lost reply's
    proxy.pass_replies()
    await async_wait_until(lambda: lock_owner(client, prefix, "job") is None)  # cleaned up
    assert await backend.lock("other", ttl=5).owner() is None  # and the pool is in order
    await backend.aclose()


async def test_auto_renew_task_stops_with_release(abackend: AsyncRedisBackend) -> None:
    lock = abackend.lock("job", ttl=0.3, auto_renew=True)
    before = {task for task in asyncio.all_tasks() if not task.done()}
    async with lock:
        assert lock.renewing
        (renewal,) = (
            {task for task in asyncio.all_tasks() if not task.done()}
            - before
            - {asyncio.current_task()}
        )
    assert renewal.done()
    assert not lock.renewing


# -- coalescing: the calls of one loop iteration share one round trip -------------------------


async def test_concurrent_hits_share_one_connection_and_keep_their_results(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    name = f"coalesce-{uuid.uuid4().hex[:8]}"
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix, client_name=name)
    try:
        limiter = backend.rate_limiter(RateLimit(3, per=3600))
        decisions = await asyncio.gather(*(limiter.hit("k") for _ in range(200)))
        opened = sum(1 for c in client.client_list() if c.get("name") == name)
    finally:
        await backend.aclose()
    # Exactly what 200 separate calls would get: the burst admitted, every other one denied.
    assert sum(d.allowed for d in decisions) == 3
    assert sorted(d.remaining for d in decisions if d.allowed) == [0, 1, 2]
    # The first call goes straight out; the 199 that queue behind it share batches of 8 to 32
    # commands, each batch on one connection: a handful of connections, not one per call.
    assert opened <= 12


async def test_an_error_in_a_batch_reaches_only_its_own_caller(
    abackend: AsyncRedisBackend, client: redis.Redis, prefix: str
) -> None:
    client.hset(lock_key(prefix, "broken"), "not", "a string")
    results = await asyncio.gather(
        abackend.acquire_or_owner("a", "me", 10),
        abackend.acquire_or_owner("broken", "me", 10),
        abackend.acquire_or_owner("b", "me", 10),
        return_exceptions=True,
    )
    assert isinstance(results[1], BackendError)
    assert isinstance(results[1].__cause__, redis.ResponseError)
    assert [r.acquired for r in (results[0], results[2])] == [True, True]  # type: ignore[union-attr]


async def test_a_flushed_script_cache_is_reloaded_for_a_whole_batch(
    abackend: AsyncRedisBackend, client: redis.Redis
) -> None:
    await abackend.acquire_or_owner("warm", "me", 10)
    client.script_flush()
    results = await asyncio.gather(
        *(abackend.acquire_or_owner(f"n{i}", "me", 10) for i in range(20))
    )
    assert all(r.acquired for r in results)


async def test_a_caller_cancelled_before_the_round_trip_sends_nothing(
    abackend: AsyncRedisBackend, client: redis.Redis, prefix: str
) -> None:
    call = asyncio.get_running_loop().create_task(abackend.acquire_or_owner("never", "me", 10))
    later = asyncio.get_running_loop().create_task(abackend.acquire_or_owner("other", "me", 10))
    await asyncio.sleep(0)  # the first went straight out; "never" waits for the next batch
    call.cancel()  # before the loop turns and the batch goes out
    assert (await later).acquired  # a later round trip does go out
    assert lock_owner(client, prefix, "never") is None
