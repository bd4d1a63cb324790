"""Locks against a real Redis; every body runs once per flavour (sync on threads, async)."""

from __future__ import annotations

import itertools
import time
import uuid

import anyio
import pytest
import redis

from celery_unique import (
    Acquisition,
    AsyncRedisBackend,
    LockNotOwnedError,
    LockTimeout,
)
from tests.conftest import MakeBackend, lock_key, lock_owner

pytestmark = pytest.mark.anyio


def commands(client: redis.Redis, name: str = "evalsha") -> int:
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0))


async def test_acquire_release_and_ownership(backend: AsyncRedisBackend) -> None:
    a = backend.lock("job", ttl=10)
    b = backend.lock("job", ttl=10)
    assert await a.acquire(blocking=False)
    assert a.fence is not None
    assert await a.owner() == a.token
    assert await a.locked()
    assert not await b.acquire(blocking=False)
    with pytest.raises(LockNotOwnedError):
        await b.release()
    assert await a.owner() == a.token  # b's failed release left a's lock alone
    await a.release()
    assert not await a.locked()
    assert await b.acquire(blocking=False)
    await b.release()


async def test_low_level_one_command_api(backend: AsyncRedisBackend) -> None:
    got = await backend.acquire_or_owner("job", "me", 10)
    assert got.acquired and got.owner == "me" and got.ttl == 10.0 and got.fence
    other = await backend.acquire_or_owner("job", "you", 10)
    assert other.acquired is False and other.owner == "me"
    assert other.ttl is not None and 9.0 < other.ttl <= 10.0
    assert await backend.extend("job", "me", 60)
    assert not await backend.extend("job", "you", 60)
    assert not await backend.release("job", "you")
    assert await backend.release("job", "me")
    assert not await backend.release("job", "me")


async def test_reacquire_by_the_same_owner_refreshes_and_keeps_the_fence(
    backend: AsyncRedisBackend,
) -> None:
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire(blocking=False)
    fence = lock.fence
    assert await lock.acquire(blocking=False)
    assert lock.fence == fence
    await lock.release()


async def test_context_manager_raises_lock_timeout_naming_the_owner(
    backend: AsyncRedisBackend,
) -> None:
    holder = backend.lock("job", ttl=30)
    async with holder:
        started = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            async with backend.lock("job", ttl=30, timeout=0.3):
                pytest.fail("acquired a held lock")
        assert time.monotonic() - started >= 0.3
        assert caught.value.owner == holder.token
        assert caught.value.key == "job"
        assert caught.value.ttl is not None and 0 < caught.value.ttl <= 30
    assert not await holder.locked()


async def test_non_blocking_context_manager_fails_at_once(backend: AsyncRedisBackend) -> None:
    async with backend.lock("job", ttl=30):
        with pytest.raises(LockTimeout):
            async with backend.lock("job", ttl=30, blocking=False):
                pytest.fail("acquired a held lock")


async def test_blocking_acquire_gets_the_lock_when_the_holder_expires(
    backend: AsyncRedisBackend,
) -> None:
    started = time.monotonic()  # before the holder's acquire: it expires 0.3 s after that
    await backend.acquire_or_owner("job", "holder", 0.3)
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire(timeout=5)
    waited = time.monotonic() - started
    assert 0.2 < waited < 2.0  # woke near the holder's expiry, not at the timeout
    await lock.release()


async def test_blocking_acquire_backs_off_instead_of_polling(
    backend: AsyncRedisBackend, client: redis.Redis
) -> None:
    await backend.acquire_or_owner("job", "holder", 30)
    before = commands(client)
    assert not await backend.lock("job", ttl=10).acquire(timeout=1.0)
    attempts = commands(client) - before
    # A busy loop makes thousands of calls a second; the capped backoff about ten.
    assert 3 <= attempts <= 25


async def test_a_stale_holder_cannot_release_or_extend_the_new_owners_lock(
    backend: AsyncRedisBackend, client: redis.Redis
) -> None:
    stale = backend.lock("job", ttl=0.05)
    assert await stale.acquire(blocking=False)
    deadline = time.monotonic() + 5
    while await stale.locked():  # wait for Redis to expire it, however long that takes
        assert time.monotonic() < deadline
        await anyio.sleep(0.01)
    fresh = backend.lock("job", ttl=30)
    assert await fresh.acquire(blocking=False)
    with pytest.raises(LockNotOwnedError):
        await stale.extend(30)
    with pytest.raises(LockNotOwnedError):
        await stale.release()
    assert await fresh.owner() == fresh.token
    assert fresh.fence is not None and stale.fence is not None and fresh.fence > stale.fence
    await fresh.release()


async def test_script_flush_between_operations_is_survived(
    backend: AsyncRedisBackend, client: redis.Redis
) -> None:
    lock = backend.lock("job", ttl=30)
    client.script_flush()
    assert await lock.acquire(blocking=False)
    client.script_flush()
    await lock.extend()
    client.script_flush()
    await lock.release()
    assert not await lock.locked()


async def test_fence_strictly_increases_across_owners(backend: AsyncRedisBackend) -> None:
    fences = []
    for _ in range(30):
        lock = backend.lock("job", ttl=10)
        assert await lock.acquire(blocking=False)
        fences.append(lock.fence)
        await lock.release()
    assert all(b > a for a, b in itertools.pairwise(fences))  # type: ignore[operator]


@pytest.mark.parametrize("decode_responses", [False, True])
async def test_bytes_and_decoded_clients_both_work(
    make_backend: MakeBackend, decode_responses: bool
) -> None:
    backend = make_backend(decode_responses=decode_responses)
    name = "naïve {braced} name"
    first = await backend.acquire_or_owner(name, "tok-é", 10)
    assert first == Acquisition(True, "tok-é", 10.0, first.fence)
    other = await backend.acquire_or_owner(name, "other", 10)
    assert other.owner == "tok-é"
    lock = backend.lock(name, ttl=10, token="tok-é")
    assert await lock.owner() == "tok-é"
    await lock.release()


async def test_auto_renew_keeps_the_lock_past_its_ttl(backend: AsyncRedisBackend) -> None:
    # Renewed every third of its TTL: a renewal may come up to 2/3 s late (a loaded box's
    # scheduler) before the lock would lapse.
    lock = backend.lock("job", ttl=1.0, auto_renew=True)
    async with lock:
        for _ in range(12):  # three TTLs
            await anyio.sleep(0.25)
            assert await lock.owner() == lock.token
    assert not await lock.locked()
    assert not lock.lost


async def test_auto_renew_reports_a_lost_lock(
    backend: AsyncRedisBackend, client: redis.Redis, prefix: str
) -> None:
    lost: list[object] = []
    lock = backend.lock("job", ttl=0.3, auto_renew=True, on_lost=lost.append)
    assert await lock.acquire()
    client.set(lock_key(prefix, "job"), "1:thief")  # someone takes it over
    deadline = time.monotonic() + 5
    while not lost:
        assert time.monotonic() < deadline, "the loss was never reported"
        await anyio.sleep(0.02)
    assert lock.lost
    with pytest.raises(LockNotOwnedError):
        await lock.release()
    assert lock_owner(client, prefix, "job") == "thief"


async def test_names_are_isolated_by_prefix(make_backend: MakeBackend) -> None:
    one = make_backend(key_prefix=f"a{uuid.uuid4().hex[:6]}:")
    two = make_backend(key_prefix=f"b{uuid.uuid4().hex[:6]}:")
    assert (await one.acquire_or_owner("job", "x", 10)).acquired
    assert (await two.acquire_or_owner("job", "y", 10)).acquired
