"""A server that is down, silent or gone silent gives BackendUnavailable within its deadline.

Every operation is timed on its own, all of them at once (so the whole test takes one
deadline, not one per operation), against a port that accepts connections and never answers
and against a fault proxy that stops passing replies on.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend, BackendError, BackendUnavailable
from celery_unique.testing import free_port
from tests.conftest import MakeBackend, lock_key, lock_owner
from tests.proxy import Proxy

pytestmark = pytest.mark.anyio

Operation = Callable[[AsyncRedisBackend], Awaitable[Any]]

OPERATIONS: dict[str, Operation] = {
    "acquire, non-blocking": lambda b: b.lock("job", ttl=10).acquire(blocking=False),
    "acquire, blocking": lambda b: b.lock("job", ttl=10).acquire(),
    "release": lambda b: b.lock("job", ttl=10).release(),
    "extend": lambda b: b.lock("job", ttl=10).extend(),
    "owner": lambda b: b.lock("job", ttl=10).owner(),
    "acquire_or_owner": lambda b: b.acquire_or_owner("job", "me", 10),
    "hit": lambda b: b.rate_limiter("5/s").hit("k"),
    "reserve": lambda b: b.rate_limiter("5/s").reserve("k", max_wait=1),
    "wait": lambda b: b.rate_limiter("5/s").wait("k"),
}


async def failure_times(
    backend: AsyncRedisBackend, operations: dict[str, Operation] = OPERATIONS
) -> dict[str, float]:
    """How long each operation took to raise BackendUnavailable, all run at once."""
    times: dict[str, float] = {}

    async def timed(name: str, operation: Operation) -> None:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await operation(backend)
        times[name] = time.monotonic() - started

    async with anyio.create_task_group() as group:
        for name, operation in operations.items():
            group.start_soon(timed, name, operation)
    return times


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def test_refused_connection_is_backend_unavailable_quickly(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        await backend.acquire_or_owner("job", "me", 10)
    assert time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert not caught.value.outcome_unknown  # nothing was sent
    with pytest.raises(BackendUnavailable):
        async with backend.lock("job", ttl=10):
            pytest.fail("entered without Redis")


async def test_every_operation_on_a_silent_server_gives_up_within_the_socket_timeout(
    make_backend: MakeBackend, silent_server: str
) -> None:
    backend = make_backend(silent_server, socket_timeout=0.5, socket_connect_timeout=0.5)
    times = await failure_times(backend)
    assert max(times.values()) <= 0.5 + 0.5, times


async def test_with_the_defaults_every_operation_gives_up_within_two_and_a_half_seconds(
    make_backend: MakeBackend, silent_server: str
) -> None:
    times = await failure_times(make_backend(silent_server))
    assert max(times.values()) <= 2.5, times
    assert min(times.values()) >= 1.5, times  # the 2 s socket timeout, not a shortcut


async def test_a_server_gone_silent_keeps_every_deadline(
    make_backend: MakeBackend, proxy: Proxy
) -> None:
    backend = make_backend(proxy.url, socket_timeout=0.5)
    await backend.acquire_or_owner("warm-up", "me", 10)  # pooled connections exist now
    proxy.hold = True  # commands still reach Redis; no reply comes back
    times = await failure_times(backend)
    assert max(times.values()) <= 0.5 + 0.5, times


async def test_a_timed_acquire_keeps_the_callers_timeout_on_a_server_gone_silent(
    make_backend: MakeBackend, proxy: Proxy
) -> None:
    backend = make_backend(proxy.url)  # the 2 s default deadline
    await backend.acquire_or_owner("warm-up", "me", 10)
    proxy.hold = True
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        await backend.lock("job", ttl=10).acquire(timeout=0.8)
    elapsed = time.monotonic() - started
    assert 0.7 <= elapsed <= 0.8 + 0.5  # the caller's timeout, not the 2 s deadline
    assert caught.value.outcome_unknown  # the acquire was sent: it may have run


async def test_an_acquire_without_an_answer_is_cleaned_up_off_the_callers_path(
    make_backend: MakeBackend, proxy: Proxy, client: redis.Redis, prefix: str
) -> None:
    backend = make_backend(proxy.url, socket_timeout=0.5)
    await backend.acquire_or_owner("warm-up", "me", 10)
    proxy.hold = True  # the acquire reaches Redis and takes the lock; no reply comes back
    lock = backend.lock("job", ttl=60)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await lock.acquire(blocking=False)
    assert time.monotonic() - started <= 0.5 + 0.5  # no second deadline for the clean-up
    assert lock_owner(client, prefix, "job") is not None  # Redis ran the acquire
    proxy.hold = False  # the server answers again
    # The clean-up release went out behind the caller's back: the lock is not left for 60 s.
    deadline = time.monotonic() + 10
    while lock_owner(client, prefix, "job") is not None:
        assert time.monotonic() < deadline, "the interrupted acquire's lock was never freed"
        await anyio.sleep(0.02)


async def test_a_redis_error_is_backend_error_chained(
    make_backend: MakeBackend, client: redis.Redis, prefix: str
) -> None:
    client.hset(lock_key(prefix, "job"), "not", "a string")
    backend = make_backend()
    with pytest.raises(BackendError) as caught:
        await backend.acquire_or_owner("job", "me", 10)
    assert not isinstance(caught.value, BackendUnavailable)
    assert isinstance(caught.value.__cause__, redis.ResponseError)
