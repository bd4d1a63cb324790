"""A server that is down or silent gives BackendUnavailable in bounded time, never a hang."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from celery_unique import BackendError, BackendUnavailable
from celery_unique.testing import free_port
from tests.conftest import MakeBackend

pytestmark = pytest.mark.anyio


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
    assert time.monotonic() - started < 3.0
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    with pytest.raises(BackendUnavailable):
        async with backend.lock("job", ttl=10):
            pytest.fail("entered without Redis")


async def test_silent_server_is_backend_unavailable_within_the_socket_timeout(
    make_backend: MakeBackend, silent_server: str
) -> None:
    backend = make_backend(silent_server, socket_timeout=0.3, socket_connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.lock("job", ttl=10).acquire()
    # three tries (two retries) of 0.3 s plus a short backoff
    assert time.monotonic() - started < 3.0


async def test_a_redis_error_is_backend_error_chained(
    make_backend: MakeBackend, client: redis.Redis, prefix: str
) -> None:
    client.hset(f"{prefix}lock:{{job}}", "not", "a string")
    backend = make_backend()
    with pytest.raises(BackendError) as caught:
        await backend.acquire_or_owner("job", "me", 10)
    assert not isinstance(caught.value, BackendUnavailable)
    assert isinstance(caught.value.__cause__, redis.ResponseError)
