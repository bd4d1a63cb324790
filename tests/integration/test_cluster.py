"""Locks on a real local Redis Cluster of three masters, through both cluster clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.testing import redis_cluster
from tests.conftest import Threaded

pytestmark = pytest.mark.anyio

# Names whose keys land on different masters, and names that would break a naive hash tag.
NAMES = [f"report:{i}" for i in range(12)] + ["", "{", "}", "a{b}c", "}{", "{}x"]


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with redis_cluster(3) as url:
        yield url


@pytest.fixture
async def cluster_backend(
    flavour: str, cluster_url: str, prefix: str
) -> AsyncIterator[AsyncRedisBackend]:
    if flavour == "sync":
        sync = RedisBackend(redis.RedisCluster.from_url(cluster_url), key_prefix=prefix)
        yield cast(AsyncRedisBackend, Threaded(sync))
        sync.close()
    else:
        client = redis.asyncio.RedisCluster.from_url(cluster_url)
        backend = AsyncRedisBackend(client, key_prefix=prefix)
        yield backend
        await backend.aclose()


def test_the_names_spread_over_several_slots() -> None:
    assert len({key_slot(name.encode()) * 3 // 16384 for name in NAMES[:12]}) > 1


async def test_every_operation_works_on_a_cluster(cluster_backend: AsyncRedisBackend) -> None:
    for name in NAMES:
        lock = cluster_backend.lock(name, ttl=10)
        assert await lock.acquire(blocking=False), name
        assert lock.fence is not None
        assert not await cluster_backend.lock(name, ttl=10).acquire(blocking=False)
        assert await lock.owner() == lock.token
        await lock.extend(20)
        await lock.release()
        assert not await lock.locked()


async def test_script_flush_on_every_node_is_survived(
    cluster_backend: AsyncRedisBackend, cluster_url: str
) -> None:
    with redis.RedisCluster.from_url(cluster_url) as admin:
        admin.script_flush()  # sent to every primary
    for name in NAMES[:6]:
        got = await cluster_backend.acquire_or_owner(name, "me", 10)
        assert got.acquired
        assert await cluster_backend.release(name, "me")
