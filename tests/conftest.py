"""Shared fixtures: one real redis-server per session, a key prefix per test, and one
surface over both backends so each integration test body runs sync and async."""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import anyio.to_thread
import pytest
import redis

from celery_unique import AsyncLock, AsyncRedisBackend, Lock, RedisBackend
from celery_unique.core.keys import KeySpace
from celery_unique.core.locks import parse_owner
from celery_unique.testing import TLSFiles, find_tls_redis_server, redis_server, tls_files
from tests.proxy import Proxy

MIN_REDIS = (6, 2)
#: Set to 1 (as CI does) to make a missing TLS-capable redis-server an error, not a skip.
REQUIRE_TLS = "CELERY_UNIQUE_REQUIRE_TLS"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``CELERY_UNIQUE_TEST_REDIS_URL`` if set, else a private server."""
    external = os.environ.get("CELERY_UNIQUE_TEST_REDIS_URL")
    if external:
        yield external
        return
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        version = tuple(int(p) for p in str(client.info("server")["redis_version"]).split(".")[:2])
        client.close()
        assert version >= MIN_REDIS, f"Redis >= 6.2 is needed, this server is {version}"
        yield url


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Throwaway TLS files, once a TLS-capable redis-server is known to be there (else a skip,
    or with ``CELERY_UNIQUE_REQUIRE_TLS=1`` a failure that says what to install)."""
    try:
        find_tls_redis_server()
    except FileNotFoundError as exc:
        if os.environ.get(REQUIRE_TLS) == "1":
            pytest.fail(f"{REQUIRE_TLS}=1 and {exc}")
        pytest.skip(str(exc))
    return tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}:"


def lock_key(prefix: str, name: str) -> str:
    """The Redis key of lock ``name`` under ``prefix``, as the library lays it out."""
    return KeySpace(prefix).lock(name)


def lock_owner(client: redis.Redis, prefix: str, name: str) -> str | None:
    """Who holds lock ``name`` in Redis right now (its token), read past the library."""
    return parse_owner(client.get(lock_key(prefix, name)))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain sync client for looking at what the library wrote."""
    with redis.Redis.from_url(redis_url) as plain:
        yield plain


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[Proxy]:
    """A fault proxy in front of the test Redis (runs on the test's event loop)."""
    async for running in Proxy(redis_url).run():
        yield running


@pytest.fixture
async def abackend(redis_url: str, prefix: str) -> AsyncIterator[AsyncRedisBackend]:
    """An async backend on the test Redis, closed afterwards."""
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)
    yield backend
    await backend.aclose()


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """asyncio, but trio for a test of the ``trio`` flavour (see :func:`flavour`)."""
    if "flavour" in request.fixturenames and request.getfixturevalue("flavour") == "trio":
        return "trio"
    return "asyncio"


class Threaded:
    """An async view of a sync object: every method runs in a worker thread, for real.

    Factories (``lock``) are called directly, like their async twins, and wrapped in turn.
    """

    _FACTORIES = frozenset({"lock", "semaphore", "rate_limiter"})

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        if name in self._FACTORIES:
            return lambda *a, **k: Threaded(attr(*a, **k))

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await anyio.to_thread.run_sync(functools.partial(attr, *args, **kwargs))

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_target":
            object.__setattr__(self, name, value)
        else:
            setattr(self._target, name, value)

    async def __aenter__(self) -> Any:
        await anyio.to_thread.run_sync(self._target.__enter__)
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await anyio.to_thread.run_sync(self._target.__exit__, *exc_info)


MakeBackend = Callable[..., AsyncRedisBackend]


@pytest.fixture(params=["sync", "async", "trio"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Which client a test drives: the sync one (on threads behind the async API), the async
    one under asyncio (redis.asyncio, batched), or the async one under trio (anyio streams)."""
    return cast(str, request.param)


@pytest.fixture
async def make_backend(flavour: str, redis_url: str, prefix: str) -> AsyncIterator[MakeBackend]:
    """Builds backends of this test's flavour, seen through the async surface."""
    made: list[RedisBackend | AsyncRedisBackend] = []

    def make(url: str = redis_url, **kwargs: Any) -> AsyncRedisBackend:
        kwargs.setdefault("key_prefix", prefix)
        if flavour == "sync":
            sync = RedisBackend.from_url(url, **kwargs)
            made.append(sync)
            return cast(AsyncRedisBackend, Threaded(sync))
        asyncb = AsyncRedisBackend.from_url(url, **kwargs)
        made.append(asyncb)
        return asyncb

    yield make
    for backend in made:
        if isinstance(backend, RedisBackend):
            backend.close()
        else:
            await backend.aclose()


@pytest.fixture
def backend(make_backend: MakeBackend) -> AsyncRedisBackend:
    """The backend of this test's flavour (sync ones run on threads behind the async API)."""
    return make_backend()


AnyLock = Lock | AsyncLock
