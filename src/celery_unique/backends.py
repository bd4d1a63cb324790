"""The entry points: :class:`RedisBackend` (``redis.Redis``) and :class:`AsyncRedisBackend`
(``redis.asyncio.Redis``), each an executor and a key space, and the factory of the locks and
limiters that run on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import redis
import redis.asyncio

from .core import locks
from .core.keys import DEFAULT_PREFIX, KeySpace
from .core.rates import LimitSpec
from .core.results import Acquisition
from .errors import ConfigurationError
from .executors import AsyncExecutor, AsyncRedisExecutor, Executor, RedisExecutor
from .executors.connect import async_client, sync_client
from .limiters import AsyncRateLimiter, RateLimiter
from .locks import AsyncLock, AsyncSemaphore, Lock, Semaphore

__all__ = ["AsyncRedisBackend", "RedisBackend"]

X = TypeVar("X", Executor, AsyncExecutor)
L = TypeVar("L", Lock, AsyncLock)
S = TypeVar("S", Semaphore, AsyncSemaphore)
R = TypeVar("R", RateLimiter, AsyncRateLimiter)
Backend = TypeVar("Backend", bound="_BackendBase[Any, Any, Any, Any]")


class _BackendBase(Generic[X, L, S, R]):
    """What both flavours share: the client check, the key space and the factories."""

    _client_types: ClassVar[tuple[type, ...]]
    _other: ClassVar[str]
    _executor_class: Callable[..., X]
    _lock_class: type[L]
    _semaphore_class: type[S]
    _limiter_class: type[R]
    _client_from_url: ClassVar[Callable[..., Any]]

    @classmethod
    def from_url(
        cls: type[Backend],
        url: str,
        *,
        key_prefix: str = DEFAULT_PREFIX,
        cluster: bool = False,
        **redis_kw: Any,
    ) -> Backend:
        """A backend on a new client for ``url``; ``redis_kw`` go to redis-py.

        ``redis://``, ``rediss://`` (TLS: ``ssl_ca_certs=``, ``ssl_certfile=``...;
        ``ssl_cert_reqs`` also in the URL's query, as Celery spells it), ``unix://``;
        ``cluster=True`` for a Redis Cluster; Celery's Sentinel form
        ``sentinel://h1:26379;sentinel://h2:26379/0`` with ``master_name=`` (and
        ``sentinel_kwargs={"password": ...}`` for the sentinels' own password).

        Defaults bound every call: 2 s to connect and 2 s per reply, so an operation on a hung
        or unreachable server raises :class:`~celery_unique.BackendUnavailable` within about
        2 s (``socket_timeout=T``: within T); at most 64 pooled connections, which callers
        queue for (``max_connections``). A failover (Sentinel, Cluster) is
        ``BackendUnavailable`` until the replica is promoted; replication being
        asynchronous, a lock granted just before it can be lost with the old master, so a
        resource that must never see two holders checks ``lock.fence`` (README: Deployment).
        """
        return cls(cls._client_from_url(url, cluster=cluster, **redis_kw), key_prefix=key_prefix)

    def __init__(
        self,
        client: Any = None,
        *,
        key_prefix: str = DEFAULT_PREFIX,
        timeout: float | None = None,
        executor: X | None = None,
    ) -> None:
        self.keys = KeySpace(key_prefix)
        if executor is not None:
            # An executor of the caller's own: another transport, or a fake one in tests.
            if client is not None or timeout is not None:
                raise ConfigurationError("give a client (and timeout) or an executor, not both")
            self.executor: X = executor
            return
        if not isinstance(client, self._client_types):
            wanted = " or ".join(f"{t.__module__}.{t.__qualname__}" for t in self._client_types)
            raise ConfigurationError(
                f"{type(self).__name__} needs a {wanted} client, got "
                f"{type(client).__module__}.{type(client).__qualname__}; "
                f"for that kind of client use {self._other}"
            )
        self.executor = self._executor_class(client, timeout=timeout, probe_key=self.keys.probe())

    @property
    def client(self) -> Any:
        """The redis-py client this backend runs on."""
        return self.executor.client

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this backend writes."""
        return self.keys.prefix

    @property
    def timeout(self) -> float:
        """Seconds one operation may take before it raises ``BackendUnavailable``."""
        return self.executor.timeout

    def lock(
        self,
        name: str,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_renew: bool = False,
        token: str | None = None,
        on_lost: Callable[[L], object] | None = None,
        lifetime: float | None = None,
    ) -> L:
        """A lock named ``name``, held for ``ttl`` seconds once acquired.

        ``blocking`` and ``timeout`` apply to ``with``/``async with``; ``auto_renew`` extends
        it every ``ttl / 3`` while held (never past ``lifetime`` seconds after it was
        acquired) and calls ``on_lost(lock)`` if it is lost anyway; ``token`` names the owner
        (default: a random one). See :class:`~celery_unique.Lock`.
        """
        return self._lock_class(
            self.executor,  # type: ignore[arg-type]  # each flavour pairs its executor and lock
            self.keys,
            name,
            ttl,
            blocking=blocking,
            timeout=timeout,
            auto_renew=auto_renew,
            token=token,
            on_lost=on_lost,
            lifetime=lifetime,
        )

    def semaphore(
        self,
        name: str,
        limit: int,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_renew: bool = False,
        token: str | None = None,
        on_lost: Callable[[S], object] | None = None,
        lifetime: float | None = None,
        queue: bool = False,
    ) -> S:
        """A semaphore named ``name`` admitting ``limit`` holders, each for a ``ttl``-second
        lease once acquired; ``queue=True`` queues callers turned away (see ``retry_after``);
        the other options are as for :meth:`lock`. See :class:`~celery_unique.Semaphore`."""
        return self._semaphore_class(
            self.executor,  # type: ignore[arg-type]  # each flavour pairs its executor and class
            self.keys,
            name,
            limit,
            ttl,
            blocking=blocking,
            timeout=timeout,
            auto_renew=auto_renew,
            token=token,
            on_lost=on_lost,
            lifetime=lifetime,
            queue=queue,
        )

    def rate_limiter(self, limits: LimitSpec) -> R:
        """A limiter for one limit or several (``"10/s"``, ``RateLimit(...)``, or a list of
        them, all of which must admit a request); see :class:`~celery_unique.RateLimiter`."""
        return self._limiter_class(self.executor, self.keys, limits)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client!r}, key_prefix={self.key_prefix!r})"


class RedisBackend(_BackendBase[Executor, Lock, Semaphore, RateLimiter]):
    """Locks and limits on a synchronous ``redis.Redis`` (or ``redis.cluster.RedisCluster``).

    ``RedisBackend.from_url("redis://localhost:6379/0")``, or ``RedisBackend(client)``;
    ``timeout=`` bounds each operation (default: the client's ``socket_timeout``, else 2 s).
    """

    _client_types = (redis.Redis, redis.RedisCluster)
    _other = "AsyncRedisBackend"
    _executor_class = RedisExecutor
    _lock_class = Lock
    _semaphore_class = Semaphore
    _limiter_class = RateLimiter
    _client_from_url = staticmethod(sync_client)

    def acquire_or_owner(
        self, name: str, token: str, ttl: float, *, previous: str | None = None
    ) -> Acquisition:
        """Acquire ``name`` for ``token``, or learn who holds it; one round trip.

        With ``previous``, a lock held by that token passes to ``token`` (a hand-over).
        """
        return self.executor.execute(locks.acquire_once(self.keys.lock(name), token, ttl, previous))

    def release(self, name: str, token: str, *, owner_prefix: str | None = None) -> bool:
        """Delete the lock if ``token`` owns it; ``True`` if it did. One round trip.

        With ``owner_prefix``, an owner whose token starts with it counts as the caller too.
        """
        return self.executor.execute(locks.release(self.keys.lock(name), token, owner_prefix))

    def extend(self, name: str, token: str, ttl: float) -> bool:
        """Give the lock ``ttl`` seconds from now if ``token`` owns it. One round trip."""
        return self.executor.execute(locks.extend(self.keys.lock(name), token, ttl))

    def owner(self, name: str) -> str | None:
        """The token holding lock ``name``, or ``None`` when it is free. One round trip."""
        return self.executor.execute(locks.owner(self.keys.lock(name)))

    def close(self) -> None:
        """Close the client and its connections."""
        self.executor.close()

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRedisBackend(_BackendBase[AsyncExecutor, AsyncLock, AsyncSemaphore, AsyncRateLimiter]):
    """Locks and limits on ``redis.asyncio.Redis`` (or ``redis.asyncio.RedisCluster``).

    ``AsyncRedisBackend.from_url("redis://localhost:6379/0")``, or ``AsyncRedisBackend(client)``.
    The commands that coroutines of one event loop issue together share round trips (see
    :mod:`celery_unique.executors.batching`). Under trio the same object connects to the
    client's server over anyio streams (:mod:`celery_unique.executors.streams`; Cluster and
    Sentinel are asyncio only). Importing it does not import Celery.
    """

    _client_types = (redis.asyncio.Redis, redis.asyncio.RedisCluster)
    _other = "RedisBackend"
    _executor_class = AsyncRedisExecutor
    _lock_class = AsyncLock
    _semaphore_class = AsyncSemaphore
    _limiter_class = AsyncRateLimiter
    _client_from_url = staticmethod(async_client)

    async def acquire_or_owner(
        self, name: str, token: str, ttl: float, *, previous: str | None = None
    ) -> Acquisition:
        """Acquire ``name`` for ``token``, or learn who holds it; one round trip.

        With ``previous``, a lock held by that token passes to ``token`` (a hand-over).
        """
        return await self.executor.execute(
            locks.acquire_once(self.keys.lock(name), token, ttl, previous)
        )

    async def release(self, name: str, token: str, *, owner_prefix: str | None = None) -> bool:
        """Delete the lock if ``token`` owns it; ``True`` if it did. One round trip.

        With ``owner_prefix``, an owner whose token starts with it counts as the caller too.
        """
        return await self.executor.execute(locks.release(self.keys.lock(name), token, owner_prefix))

    async def extend(self, name: str, token: str, ttl: float) -> bool:
        """Give the lock ``ttl`` seconds from now if ``token`` owns it. One round trip."""
        return await self.executor.execute(locks.extend(self.keys.lock(name), token, ttl))

    async def owner(self, name: str) -> str | None:
        """The token holding lock ``name``, or ``None`` when it is free. One round trip."""
        return await self.executor.execute(locks.owner(self.keys.lock(name)))

    async def aclose(self) -> None:
        """Close the client and its connections, once the batches under way are answered."""
        await self.executor.aclose()

    async def __aenter__(self) -> AsyncRedisBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
