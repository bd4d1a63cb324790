"""A server out of memory (maxmemory reached, noeviction) and a read-only replica: typed
errors that say what to do, and nothing published by apply_async."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique import BackendError, BackendUnavailable, UniqueTask
from celery_unique.testing import RedisServer, running_redis, wait_until
from tests.conftest import MakeBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
def full_server() -> Iterator[RedisServer]:
    with running_redis(args=["--maxmemory-policy", "noeviction"]) as server:
        server.command("CONFIG", "SET", "maxmemory", 1)  # any write is past the limit now
        yield server


@pytest.fixture
def replica() -> Iterator[RedisServer]:
    with running_redis() as master, running_redis() as replica:
        replica.command("REPLICAOF", master.host, master.port)
        wait_until("the replica to sync", lambda: "connected" in str(replica.command("ROLE")), 10)
        yield replica


async def test_out_of_memory_is_a_backend_error_with_the_advice(
    make_backend: MakeBackend, full_server: RedisServer
) -> None:
    backend = make_backend(full_server.url)
    # (A semaphore's acquire first drops expired holders, a write Redis allows when out of
    # memory, and a script that has written may write on: Redis lets it through.)
    for operation in (
        lambda: backend.acquire_or_owner("job", "me", 10),
        lambda: backend.lock("other", ttl=10).acquire(blocking=False),
        lambda: backend.rate_limiter("5/s").hit("k"),
    ):
        with pytest.raises(BackendError) as caught:
            await operation()
        assert not isinstance(caught.value, BackendUnavailable)
        assert "out of memory" in str(caught.value) and "noeviction" in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.RedisError)


async def test_a_read_only_replica_is_backend_unavailable(
    make_backend: MakeBackend, replica: RedisServer
) -> None:
    backend = make_backend(replica.url)
    with pytest.raises(BackendUnavailable, match="READONLY"):
        await backend.acquire_or_owner("job", "me", 10)
    with pytest.raises(BackendUnavailable, match="READONLY"):
        await backend.rate_limiter("5/s").hit("k")


@pytest.mark.parametrize("store", ["full", "replica"])
def test_apply_async_publishes_nothing_when_the_lock_store_refuses(
    make_app: Any,
    redis_url: str,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    server: RedisServer = request.getfixturevalue("full_server" if store == "full" else "replica")
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app = make_app(broker_url=redis_url, unique_backend_url=server.url)

    @app.task(base=UniqueTask, shared=False, name=f"refused-{uuid.uuid4().hex[:6]}")
    def job(x: int) -> None: ...

    expected = BackendUnavailable if store == "replica" else BackendError
    with pytest.raises(expected) as caught:
        job.apply_async((1,), queue=queue)
    if store == "full":
        assert not isinstance(caught.value, BackendUnavailable)
        assert "out of memory" in str(caught.value)
    with redis.Redis.from_url(redis_url) as broker:
        assert broker.llen(queue) == 0
