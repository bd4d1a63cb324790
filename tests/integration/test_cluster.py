"""Locks, semaphores and rate limits on a real local Redis Cluster of three primaries with a
replica each, through both cluster clients and ``from_url(..., cluster=True)``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import cast

import anyio
import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from celery_unique import AsyncRedisBackend, ConfigurationError, RedisBackend
from celery_unique.testing import ClusterServers, running_cluster
from tests.conftest import MakeBackend, Threaded

pytestmark = pytest.mark.anyio

# Names whose keys land on different masters, and names that would break a naive hash tag.
NAMES = [f"report:{i}" for i in range(12)] + ["", "{", "}", "a{b}c", "}{", "{}x"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with running_cluster(3, 1) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_url(cluster: ClusterServers) -> str:
    return cluster.url


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """A cluster runs on redis-py's clients: under trio it is refused (see the test below)."""
    return cast(str, request.param)


def test_a_cluster_under_trio_is_refused_with_what_is_supported(cluster_url: str) -> None:
    async def main() -> None:
        backend = AsyncRedisBackend.from_url(cluster_url, cluster=True)
        with pytest.raises(ConfigurationError, match="Cluster and Sentinel run on asyncio"):
            await backend.lock("job", ttl=5).acquire(blocking=False)
        await backend.aclose()

    anyio.run(main, backend="trio")


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


async def test_from_url_runs_locks_semaphores_and_limits_on_the_cluster(
    make_backend: MakeBackend, cluster_url: str
) -> None:
    backend = make_backend(cluster_url, cluster=True)
    for name in NAMES:
        lock = backend.lock(name, ttl=10)
        assert await lock.acquire(blocking=False), name
        assert await lock.owner() == lock.token
        await lock.release()
        semaphore = backend.semaphore(name, limit=2, ttl=10)
        assert await semaphore.acquire(blocking=False)
        assert await semaphore.holders() == 1
        await semaphore.release()
        limiter = backend.rate_limiter("1/h")
        assert (await limiter.hit(name)).allowed
        assert not (await limiter.hit(name)).allowed


def clients_named(cluster: ClusterServers, name: str) -> int:
    listed = "\n".join(str(node.command("CLIENT", "LIST")) for node in cluster.nodes)
    return listed.count(f" name={name} ")


async def test_closing_a_cluster_backend_closes_every_node_connection(
    flavour: str, cluster: ClusterServers
) -> None:
    name = f"close-{uuid.uuid4().hex[:8]}"
    if flavour == "sync":
        sync = RedisBackend.from_url(cluster.url, cluster=True, client_name=name)
        for lock_name in NAMES:
            sync.acquire_or_owner(lock_name, "me", 10)
        assert clients_named(cluster, name) >= 3  # one per primary at least
        sync.close()
    else:
        backend = AsyncRedisBackend.from_url(cluster.url, cluster=True, client_name=name)
        for lock_name in NAMES:
            await backend.acquire_or_owner(lock_name, "me", 10)
        assert clients_named(cluster, name) >= 3
        await backend.aclose()
    deadline = time.monotonic() + 10
    while clients_named(cluster, name):
        assert time.monotonic() < deadline, "a node connection stayed open after close"
        await anyio.sleep(0.02)


async def test_an_evicting_policy_on_the_cluster_is_warned_about_once(
    make_backend: MakeBackend, cluster: ClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_unique")
    for node in cluster.nodes:
        node.command("CONFIG", "SET", "maxmemory-policy", "volatile-ttl")
    try:
        backend = make_backend(cluster.url, cluster=True)
        for name in NAMES[:6]:
            await backend.acquire_or_owner(name, "me", 10)
    finally:
        for node in cluster.nodes:
            node.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    warned = [r for r in caplog.records if "maxmemory-policy volatile-ttl" in r.getMessage()]
    assert len(warned) == 1
