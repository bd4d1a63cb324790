"""Locks through Redis Sentinel, in Celery's URL form: the master is found by name, with the
data servers' password in the URL and the sentinels' own in ``sentinel_kwargs``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend, BackendUnavailable, ConfigurationError, RedisBackend
from celery_unique.executors.connect import (
    parse_sentinel_url,
    sentinel_pool_classes,
    sentinel_pools_can_queue,
)
from celery_unique.testing import SentinelServers, redis_sentinel
from tests.conftest import MakeBackend, lock_owner

pytestmark = pytest.mark.anyio

SENTINEL_PW = "sentinel-pw"


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[SentinelServers]:
    with redis_sentinel(replicas=1, password="data-pw", sentinel_password=SENTINEL_PW) as setup:
        yield setup


def options() -> dict[str, Any]:
    return {"master_name": "mymaster", "sentinel_kwargs": {"password": SENTINEL_PW}}


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Sentinel runs on redis-py's clients: under trio it is refused (see the test below)."""
    return cast(str, request.param)


def test_sentinel_under_trio_is_refused_with_what_is_supported(
    sentinel_setup: SentinelServers,
) -> None:
    async def main() -> None:
        backend = AsyncRedisBackend.from_url(sentinel_setup.url, **options())
        with pytest.raises(ConfigurationError, match="Cluster and Sentinel run on asyncio"):
            await backend.rate_limiter("5/s").hit("k")
        await backend.aclose()

    anyio.run(main, backend="trio")


async def test_every_operation_runs_on_the_master_the_sentinels_name(
    make_backend: MakeBackend, sentinel_setup: SentinelServers, prefix: str
) -> None:
    backend = make_backend(sentinel_setup.url, **options())
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire(blocking=False)
    assert await lock.owner() == lock.token
    with redis.Redis.from_url(sentinel_setup.master.url) as master:
        assert lock_owner(master, prefix, "job") == lock.token  # on the master itself
    await lock.extend(20)
    await lock.release()
    semaphore = backend.semaphore("pool", limit=2, ttl=10)
    assert await semaphore.acquire(blocking=False)
    await semaphore.release()
    assert (await backend.rate_limiter("5/s").hit("k")).allowed


async def test_the_db_in_the_url_is_the_masters(
    make_backend: MakeBackend, sentinel_setup: SentinelServers, prefix: str
) -> None:
    url = sentinel_setup.url.removesuffix("/0") + "/3"
    backend = make_backend(url, **options())
    assert (await backend.acquire_or_owner("job", "me", 10)).acquired
    with redis.Redis.from_url(sentinel_setup.master.url.removesuffix("/0") + "/3") as db3:
        assert lock_owner(db3, prefix, "job") == "me"


async def test_the_sentinels_refuse_a_client_without_their_password(
    make_backend: MakeBackend, sentinel_setup: SentinelServers
) -> None:
    from celery_unique import BackendUnavailable

    backend = make_backend(sentinel_setup.url, master_name="mymaster")
    with pytest.raises(BackendUnavailable, match="No master found"):
        await backend.acquire_or_owner("job", "me", 10)


def test_callers_beyond_max_connections_queue_for_one(
    sentinel_setup: SentinelServers, prefix: str
) -> None:
    with RedisBackend.from_url(
        sentinel_setup.url, key_prefix=prefix, max_connections=1, **options()
    ) as backend:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            for i in range(20):
                try:
                    backend.acquire_or_owner(f"job{n}:{i}", "me", 10)
                except BaseException as exc:  # noqa: PERF203  (every failure is counted)
                    errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        if sentinel_pools_can_queue()[0]:
            assert errors == []
        else:  # redis-py 5.0: the plain Sentinel pool fails a caller beyond the limit at once
            assert errors and all(
                isinstance(e, BackendUnavailable) and "Too many connections" in str(e)
                for e in errors
            )


@pytest.mark.parametrize("blocking", [True, False])
def test_both_sentinel_pools_work(
    sentinel_setup: SentinelServers, prefix: str, blocking: bool
) -> None:
    # Which one from_url takes depends on the redis-py version: both are exercised here,
    # the queueing one where this redis-py can run it.
    if blocking and not sentinel_pools_can_queue()[0]:
        assert sentinel_pool_classes()[0] is redis.sentinel.SentinelConnectionPool
        blocking = False
    pool_class = sentinel_pool_classes(blocking=blocking)[0]
    manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        sentinel_setup.sentinel_addresses, sentinel_kwargs={"password": SENTINEL_PW}
    )
    client = manager.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        "mymaster", connection_pool_class=pool_class, password="data-pw"
    )
    with RedisBackend(client, key_prefix=prefix) as backend:
        assert backend.acquire_or_owner("job", "me", 10).acquired
        assert backend.release("job", "me")


@pytest.mark.parametrize("blocking", [True, False])
async def test_both_async_sentinel_pools_work(
    sentinel_setup: SentinelServers, prefix: str, blocking: bool
) -> None:
    import redis.asyncio.sentinel

    pool_class = sentinel_pool_classes(blocking=blocking)[1]
    manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        sentinel_setup.sentinel_addresses, sentinel_kwargs={"password": SENTINEL_PW}
    )
    client = manager.master_for("mymaster", connection_pool_class=pool_class, password="data-pw")
    async with AsyncRedisBackend(client, key_prefix=prefix) as backend:
        assert (await backend.acquire_or_owner("job", "me", 10)).acquired
        assert await backend.release("job", "me")


def test_celerys_url_form_is_parsed() -> None:
    addresses, params = parse_sentinel_url(
        "sentinel://:pw@h1:26380;sentinel://h2;sentinel://:pw@h3:26381/2"
    )
    assert addresses == [("h1", 26380), ("h2", 26379), ("h3", 26381)]
    assert params == {"password": "pw", "db": 2}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1/1;sentinel://h2/2", "disagree on its db"),
        ("sentinel://h1;redis://h2", "sentinel://host:port parts"),
        ("sentinel://h1/x", "db of a Sentinel URL is a number"),
    ],
)
def test_a_wrong_sentinel_url_is_a_configuration_error(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisBackend.from_url(url, master_name="mymaster")


def test_a_sentinel_url_needs_a_master_name_and_only_it_takes_one() -> None:
    with pytest.raises(ConfigurationError, match="needs master_name"):
        RedisBackend.from_url("sentinel://h1:26379")
    with pytest.raises(ConfigurationError, match="apply to a sentinel:// URL only"):
        AsyncRedisBackend.from_url("redis://h1:6379", master_name="mymaster")
