"""The async backend's batches on the wire: every caller gets its own reply or error, whatever
the network does to the replies, and connections go back to the pool usable on every path."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from celery_unique import AsyncRedisBackend, BackendError, BackendUnavailable, RateLimit
from celery_unique.core.keys import KeySpace
from celery_unique.core.steps import Call, Op
from celery_unique.executors import AsyncRedisExecutor
from tests.conftest import lock_key, lock_owner
from tests.helpers import async_wait_until
from tests.proxy import Proxy

pytestmark = pytest.mark.anyio

Make = Callable[..., AsyncRedisBackend]


@pytest.fixture(params=["streams", "read_response"])
async def make(prefix: str, request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Backends whose batches are read off the stream at once, or reply by reply through
    redis-py's ``read_response`` (the fallback when the stream is not what it should be)."""
    made: list[AsyncRedisBackend] = []

    def build(url: str, **kwargs: Any) -> AsyncRedisBackend:
        backend = AsyncRedisBackend.from_url(url, key_prefix=prefix, **kwargs)
        if request.param == "read_response":
            executor = AsyncRedisExecutor(backend.client, read_streams=False)
            backend = AsyncRedisBackend(executor=executor, key_prefix=prefix)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.aclose()


def tokens_taken(client: redis.Redis, prefix: str, name: str, limit: RateLimit) -> int:
    """How many tokens Redis has handed out from ``name``'s bucket (a slow limit: ``limit``
    must take far longer to refill a token than the test runs)."""
    (key,) = KeySpace(prefix).rate(name, [limit.spec])
    state = client.get(key)
    if state is None:
        return 0
    period_us = int(limit.spec.split("/")[1])  # a token's debt, in the bucket's units
    return math.ceil(int(state.split()[0]) / period_us)


async def mixed_batch(backend: AsyncRedisBackend) -> None:
    """Scripts, plain GETs, nil and arrays in one go; checks each caller's result."""
    limiter = backend.rate_limiter(RateLimit(5, per=3600))
    await backend.acquire_or_owner("held", "owner-1", 30)
    results = await asyncio.gather(
        *(limiter.hit("k") for _ in range(8)),
        backend.acquire_or_owner("held", "someone", 30),
        backend.acquire_or_owner("free", "me", 30),
        backend.lock("held", ttl=30).owner(),
        backend.lock("nobody", ttl=30).owner(),
        backend.release("free", "not-me"),
    )
    decisions, (taken, mine, owner, nobody, released) = results[:8], results[8:]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3  # type: ignore[union-attr]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]  # type: ignore[union-attr]
    assert not taken.acquired and taken.owner == "owner-1"  # type: ignore[union-attr]
    assert mine.acquired and mine.fence is not None  # type: ignore[union-attr]
    assert owner == "owner-1"
    assert nobody is None
    assert released is False


async def test_replies_arriving_a_few_bytes_at_a_time_reach_the_right_callers(
    proxy: Proxy, make: Make
) -> None:
    proxy.chunk = 3
    await mixed_batch(make(proxy.url))


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode_responses", [False, True])
async def test_every_client_flavour_gets_the_same_results(
    redis_url: str, make: Make, protocol: int, decode_responses: bool
) -> None:
    await mixed_batch(make(redis_url, protocol=protocol, decode_responses=decode_responses))


async def test_a_single_connection_client_works_too(redis_url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, single_connection_client=True)
    backend = AsyncRedisBackend(client, key_prefix=prefix)
    try:
        await mixed_batch(backend)
    finally:
        await backend.aclose()


async def test_a_connection_dropped_mid_batch_fails_every_caller_of_it(
    proxy: Proxy, make: Make, client: redis.Redis, prefix: str
) -> None:
    backend = make(proxy.url)
    limiter = backend.rate_limiter(RateLimit(100, per=3600))
    await limiter.hit("warm-up")  # connected
    proxy.cut_after = 5  # every connection dies five bytes into its replies
    results = await asyncio.gather(*(limiter.hit("k") for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert all(isinstance(r.__cause__, redis.ConnectionError) for r in results)  # type: ignore[union-attr]
    # The dropped connections were discarded: the pool connects afresh, and every reply
    # reaches its own caller again (how many of the failed commands ran is unknowable).
    proxy.cut_after = None
    decisions = await asyncio.gather(*(limiter.hit("k") for _ in range(20)))
    remaining = sorted(d.remaining for d in decisions)
    assert remaining == list(range(remaining[0], remaining[0] + 20))


async def test_replies_that_never_come_time_out_for_every_caller(proxy: Proxy, make: Make) -> None:
    backend = make(proxy.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    limiter = backend.rate_limiter(RateLimit(100, per=3600))
    # A few connections, as many as the batches below take: the second round is batched as
    # they are (the first round's first command also carries the checks of the first use).
    for _ in range(2):
        await asyncio.gather(*(limiter.hit("warm-up") for _ in range(20)))
    proxy.hold = True
    started = time.monotonic()
    results = await asyncio.gather(*(limiter.hit("k") for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert all(r.outcome_unknown for r in results)  # type: ignore[union-attr]  # they were sent
    assert time.monotonic() - started < 0.3 + 0.5  # the socket timeout bounds every caller


async def test_a_sooner_deadline_holds_no_other_caller_to_it(proxy: Proxy, make: Make) -> None:
    """A command that must be answered sooner than the executor's deadline (a renewal's
    extend near the end of its lease) goes in a batch of its own: the callers it would have
    shared a round trip with keep their own deadline, on a link slower than its."""
    backend = make(proxy.url)
    limiter = backend.rate_limiter(RateLimit(100, per=3600))
    await asyncio.gather(*(limiter.hit("warm-up") for _ in range(5)))
    proxy.delay = 0.2
    hurried = backend.executor.execute(Op(Call(("PING",), timeout=0.05), lambda reply: reply))
    hits = [limiter.hit("k") for _ in range(10)]
    results = await asyncio.gather(*hits[:5], hurried, *hits[5:], return_exceptions=True)
    assert isinstance(results[5], BackendUnavailable), results[5]
    decisions = results[:5] + results[6:]
    assert all(getattr(d, "allowed", False) for d in decisions), decisions


async def test_callers_cancelled_after_the_send_leave_the_others_and_the_pool_in_order(
    proxy: Proxy, make: Make, client: redis.Redis, prefix: str
) -> None:
    backend = make(proxy.url, max_connections=3)
    limit = RateLimit(100, per=3600)
    limiter = backend.rate_limiter(limit)
    await asyncio.gather(*(limiter.hit("warm-up") for _ in range(20)))  # connections open
    proxy.hold_replies()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(limiter.hit("k")) for _ in range(10)]
    # Every command is on its way (the first alone, then batches): Redis has run all ten.
    await async_wait_until(lambda: tokens_taken(client, prefix, "k", limit) == 10)
    for task in tasks[::2]:
        task.cancel()
    proxy.pass_replies()
    await asyncio.wait(tasks)
    assert all(task.cancelled() for task in tasks[::2])
    assert all(task.result().allowed for task in tasks[1::2])
    # Redis ran all ten; the cancelled callers' replies were read and dropped, or their
    # connection discarded: either way the next replies are the right ones.
    assert (await limiter.hit("k")).remaining == 89
    assert await backend.lock("other", ttl=5).owner() is None


async def test_a_lone_caller_cancelled_mid_read_frees_its_connection(
    proxy: Proxy, make: Make, client: redis.Redis, prefix: str
) -> None:
    backend = make(proxy.url, max_connections=1, timeout=2)
    await backend.acquire_or_owner("warm-up", "me", 5)
    proxy.hold_replies()
    task = asyncio.get_running_loop().create_task(backend.acquire_or_owner("job", "me", 30))
    await async_wait_until(lambda: lock_owner(client, prefix, "job") == "me")  # Redis ran it
    task.cancel()  # while its reply is held back: mid-read
    proxy.pass_replies()
    await asyncio.wait([task])
    assert task.cancelled()
    # Had the connection gone back with the reply still due, this would read that reply,
    # and had it not gone back at all, this would wait for the pool and fail.
    assert await backend.lock("other", ttl=5).owner() is None
    assert lock_owner(client, prefix, "job") == "me"  # it was sent: Redis ran it


async def test_a_caller_cancelled_while_waiting_for_a_connection_sends_nothing(
    proxy: Proxy, make: Make, client: redis.Redis, prefix: str
) -> None:
    backend = make(proxy.url, max_connections=1, timeout=5)
    await backend.acquire_or_owner("warm-up", "me", 5)
    proxy.hold_replies()
    loop = asyncio.get_running_loop()
    first = loop.create_task(backend.acquire_or_owner("first", "me", 30))
    # The first went out alone and holds the only connection until its reply, held back.
    await async_wait_until(lambda: lock_owner(client, prefix, "first") == "me")
    waiting = loop.create_task(backend.acquire_or_owner("never", "me", 30))
    await asyncio.sleep(0.1)  # its batch is waiting for the connection (none can free up)
    waiting.cancel()
    proxy.pass_replies()
    await asyncio.wait([first, waiting])
    assert first.result().acquired
    assert waiting.cancelled()
    assert lock_owner(client, prefix, "never") is None


async def test_hundreds_of_hits_on_two_connections_decide_exactly(
    redis_url: str, make: Make
) -> None:
    backend = make(redis_url, max_connections=2)
    limiter = backend.rate_limiter(RateLimit(150, per=3600))
    decisions = await asyncio.gather(*(limiter.hit("k") for _ in range(400)))
    assert sum(d.allowed for d in decisions) == 150
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(150))


async def test_a_flushed_script_cache_is_reloaded_for_every_script_of_a_batch(
    redis_url: str, make: Make, client: redis.Redis
) -> None:
    backend = make(redis_url)
    limiter = backend.rate_limiter("5/h")
    await backend.acquire_or_owner("a", "me", 30)
    client.script_flush()
    first, acquired, extended, released, second = await asyncio.gather(
        limiter.hit("k"),
        backend.acquire_or_owner("b", "me", 30),
        backend.extend("a", "me", 60),
        backend.release("a", "me"),
        limiter.hit("k"),
    )
    assert [first.remaining, second.remaining] == [4, 3]
    assert acquired.acquired
    assert extended is True and released is True


async def test_an_error_reply_stays_with_its_caller_and_keeps_its_class(
    redis_url: str, make: Make, client: redis.Redis, prefix: str
) -> None:
    backend = make(redis_url)
    client.hset(lock_key(prefix, "broken"), "not", "a string")
    results = await asyncio.gather(
        *(backend.acquire_or_owner(name, "me", 10) for name in ("a", "broken", "b", "broken")),
        return_exceptions=True,
    )
    for i in (1, 3):
        error = results[i]
        assert isinstance(error, BackendError) and not isinstance(error, BackendUnavailable)
        assert isinstance(error.__cause__, redis.ResponseError)
        assert "WRONGTYPE" in str(error)
    assert results[0].acquired and results[2].acquired  # type: ignore[union-attr]


async def test_a_health_check_interval_is_honoured(proxy: Proxy, make: Make) -> None:
    def pings() -> int:
        # This backend's own: the server's count has the Celery worker's PINGs in it too.
        return proxy.sent.count(b"\r\nPING\r\n")

    backend = make(proxy.url, health_check_interval=0.3)
    limiter = backend.rate_limiter("5/h")
    await limiter.hit("k")
    before = pings()
    await limiter.hit("k")  # within the interval: no PING
    assert pings() == before
    await asyncio.sleep(0.35)
    assert (await limiter.hit("k")).remaining == 2  # a PING first, then the hit
    assert pings() == before + 1


async def test_closing_waits_for_the_batches_under_way_and_leaves_nothing_open(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    name = f"closing-{uuid.uuid4().hex[:8]}"
    backend = AsyncRedisBackend.from_url(
        redis_url, key_prefix=prefix, max_connections=2, client_name=name
    )
    limiter = backend.rate_limiter(RateLimit(100, per=3600))
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(limiter.hit("k")) for _ in range(50)]
    # Submitted: one alone, the rest in batches, some of them waiting for a connection.
    await asyncio.sleep(0)
    await backend.aclose()
    assert all(task.done() for task in tasks)
    assert sorted(task.result().remaining for task in tasks) == list(range(50, 100))
    # The server drops closed connections from its list a moment later.
    await async_wait_until(lambda: not any(c.get("name") == name for c in client.client_list()))
