"""A server that became a replica (an old master after a failover) answers READONLY: the
caller gets BackendUnavailable and the connection is dropped, so that the next one is made
afresh (through Sentinel: to the new master) instead of asking the replica again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio

from celery_unique import AsyncRedisBackend, BackendUnavailable
from celery_unique.executors import AsyncRedisExecutor
from celery_unique.testing import RedisServer, running_redis, wait_until
from tests.conftest import MakeBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
def demoted() -> Iterator[tuple[RedisServer, RedisServer]]:
    with running_redis() as master, running_redis() as replica:
        yield master, replica


def clients_of(server: RedisServer) -> int:
    """Ordinary client connections the server has, besides the one asking (not its master's
    replication link)."""
    listed = str(server.command("CLIENT", "LIST")).splitlines()
    # The asking one's command reads client|list (Redis 7) or client (6.2).
    asking = (" cmd=client|list ", " cmd=client ")
    return sum(" flags=N " in line and not any(a in line for a in asking) for line in listed)


def demote(replica: RedisServer, master: RedisServer) -> None:
    replica.command("REPLICAOF", master.host, master.port)
    wait_until("the replica to sync", lambda: "connected" in str(replica.command("ROLE")), 10)


async def dropped(replica: RedisServer) -> None:
    # Polled with the event loop running: an asyncio socket closes on the loop's next turns.
    deadline = time.monotonic() + 5.0
    while clients_of(replica):
        assert time.monotonic() < deadline, "the connection that answered READONLY stayed open"
        await anyio.sleep(0.02)


async def check_dropped(
    backend: AsyncRedisBackend, master: RedisServer, replica: RedisServer
) -> None:
    assert (await backend.acquire_or_owner("warm", "me", 10)).acquired
    assert clients_of(replica) >= 1  # the pooled connection
    demote(replica, master)
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="READONLY"):
            await backend.acquire_or_owner("job", "me", 10)
        await dropped(replica)
    replica.command("REPLICAOF", "NO", "ONE")
    assert (await backend.acquire_or_owner("job", "me", 10)).acquired


async def test_a_connection_that_answered_readonly_is_dropped(
    make_backend: MakeBackend, demoted: tuple[RedisServer, RedisServer]
) -> None:
    master, replica = demoted
    await check_dropped(make_backend(replica.url), master, replica)


@pytest.mark.parametrize("read_streams", [True, False])
async def test_both_async_read_paths_drop_it(
    demoted: tuple[RedisServer, RedisServer], prefix: str, read_streams: bool
) -> None:
    master, replica = demoted
    # RESP2: the stream path parses replies itself; read_response reads them otherwise.
    client = redis.asyncio.Redis.from_url(replica.url, protocol=2)
    executor = AsyncRedisExecutor(client, read_streams=read_streams)
    backend = AsyncRedisBackend(executor=executor, key_prefix=prefix)
    try:
        await check_dropped(backend, master, replica)
    finally:
        await backend.aclose()
