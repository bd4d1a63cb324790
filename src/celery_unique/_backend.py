"""The two executors: :class:`RedisBackend` (``redis.Redis``) and :class:`AsyncRedisBackend`
(``redis.asyncio.Redis``).

They carry out the steps of the core's flows and nothing else: EVALSHA, and on NOSCRIPT
(a restarted or flushed server) SCRIPT LOAD and one retry; redis-py errors become
:class:`BackendError`/:class:`BackendUnavailable`, chained. Every decision is in ``_core``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import redis
import redis.asyncio
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import _core
from ._core import Call, Eval, Flow, Op, Sleep, Step
from ._exceptions import BackendError, BackendUnavailable, ConfigurationError
from ._keys import DEFAULT_PREFIX, KeySpace
from ._lock import AsyncLock, Lock
from ._models import Acquisition
from ._ratelimit import AsyncRateLimiter, LimitSpec, RateLimiter

__all__ = ["AsyncRedisBackend", "RedisBackend"]

T = TypeVar("T")
L = TypeVar("L", Lock, AsyncLock)
R = TypeVar("R", RateLimiter, AsyncRateLimiter)
Backend = TypeVar("Backend", bound="_BackendBase[Any, Any]")

# from_url() defaults, each overridable by keyword. They bound every call: a dead server
# answers within seconds instead of redis-py's ten retries, and a crowd of callers waits
# for one of ``max_connections`` connections instead of failing with "Too many connections".
_CLIENT_DEFAULTS: Mapping[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 5.0,
    "max_connections": 64,
    "timeout": 10.0,  # seconds to wait for a free pooled connection
}


def _client_kwargs(redis_kw: dict[str, Any]) -> dict[str, Any]:
    kwargs = {**_CLIENT_DEFAULTS, **redis_kw}
    # A fresh Retry per client: redis-py mutates it while it counts attempts.
    kwargs.setdefault("retry", Retry(EqualJitterBackoff(cap=0.5, base=0.05), 2))
    return kwargs


def _command(step: Eval | Call) -> tuple[str | int, ...]:
    """The Redis command a step is sent as."""
    if isinstance(step, Call):
        return step.args
    return ("EVALSHA", step.script.sha, len(step.keys), *step.keys, *step.args)


def _backend_error(exc: RedisError) -> BackendError:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return BackendUnavailable(
            f"Redis could not be reached ({type(exc).__name__}: {exc}); check that the server "
            "is running and the URL, network and pool settings are right"
        )
    return BackendError(f"Redis answered with an error: {type(exc).__name__}: {exc}")


class _BackendBase(Generic[L, R]):
    """What both executors share: the client check, the key space and the lock factory."""

    _client_types: ClassVar[tuple[type, ...]]
    _pool_class: ClassVar[Any]  # the flavour's redis-py BlockingConnectionPool
    _other: ClassVar[str]
    _lock_class: type[L]
    _limiter_class: type[R]

    @classmethod
    def from_url(
        cls: type[Backend], url: str, *, key_prefix: str = DEFAULT_PREFIX, **redis_kw: Any
    ) -> Backend:
        """A backend on a new client for ``url``; ``redis_kw`` go to redis-py's pool.

        Defaults bound every call: 2 s to connect, 5 s per reply, two retries, and at most
        64 connections that callers queue for (``max_connections``, ``timeout``).
        """
        pool = cls._pool_class.from_url(url, **_client_kwargs(redis_kw))
        client_class: Any = cls._client_types[0]
        return cls(client_class.from_pool(pool), key_prefix=key_prefix)

    def __init__(self, client: Any, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        if not isinstance(client, self._client_types):
            wanted = " or ".join(f"{t.__module__}.{t.__qualname__}" for t in self._client_types)
            raise ConfigurationError(
                f"{type(self).__name__} needs a {wanted} client, got "
                f"{type(client).__module__}.{type(client).__qualname__}; "
                f"for that kind of client use {self._other}"
            )
        self._client: Any = client
        self._keys = KeySpace(key_prefix)

    @property
    def client(self) -> Any:
        """The redis-py client this backend runs on."""
        return self._client

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this backend writes."""
        return self._keys.prefix

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
    ) -> L:
        """A lock named ``name``, held for ``ttl`` seconds once acquired.

        ``blocking`` and ``timeout`` apply to ``with``/``async with``; ``auto_renew`` extends
        it every ``ttl / 3`` while held and calls ``on_lost(lock)`` if it is lost anyway;
        ``token`` names the owner (default: a random one). See :class:`Lock`.
        """
        return self._lock_class(
            self,  # type: ignore[arg-type]  # each subclass pairs itself with its lock class
            name,
            ttl,
            blocking=blocking,
            timeout=timeout,
            auto_renew=auto_renew,
            token=token,
            on_lost=on_lost,
        )

    def rate_limiter(self, limits: LimitSpec) -> R:
        """A limiter for one limit or several (``"10/s"``, ``RateLimit(...)``, or a list of
        them, all of which must admit a request); see :class:`RateLimiter`."""
        return self._limiter_class(self, limits)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r}, key_prefix={self.key_prefix!r})"


class RedisBackend(_BackendBase[Lock, RateLimiter]):
    """Locks and limits on a synchronous ``redis.Redis`` (or ``redis.cluster.RedisCluster``).

    ``RedisBackend.from_url("redis://localhost:6379/0")``, or ``RedisBackend(client)``.
    """

    _client_types = (redis.Redis, redis.RedisCluster)
    _pool_class = redis.BlockingConnectionPool
    _other = "AsyncRedisBackend"
    _lock_class = Lock
    _limiter_class = RateLimiter

    def acquire_or_owner(
        self, name: str, token: str, ttl: float, *, previous: str | None = None
    ) -> Acquisition:
        """Acquire ``name`` for ``token``, or learn who holds it; one round trip.

        With ``previous``, a lock held by that token passes to ``token`` (a hand-over).
        """
        return self._one(_core.acquire_once(self._keys.lock(name), token, ttl, previous))

    def release(self, name: str, token: str, *, owner_prefix: str | None = None) -> bool:
        """Delete the lock if ``token`` owns it; ``True`` if it did. One round trip.

        With ``owner_prefix``, an owner whose token starts with it counts as the caller too.
        """
        return self._one(_core.release(self._keys.lock(name), token, owner_prefix))

    def extend(self, name: str, token: str, ttl: float) -> bool:
        """Give the lock ``ttl`` seconds from now if ``token`` owns it. One round trip."""
        return self._one(_core.extend(self._keys.lock(name), token, ttl))

    def close(self) -> None:
        """Close the client and its connections."""
        self._client.close()

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _one(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        return op.parse(self._do(op.step))

    def _run(self, flow: Flow[T], sleep: Callable[[float], object] = time.sleep) -> T:
        """Carry out ``flow``; errors of a step are thrown into it, where it may handle them."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    reply = self._do(step)
                except BackendError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            flow.close()

    def _do(self, step: Eval | Call) -> Any:
        client = self._client
        try:
            if isinstance(step, Call):
                return client.execute_command(*step.args)
            try:
                return client.execute_command(*_command(step))
            except NoScriptError:
                client.script_load(step.script.source)
                return client.execute_command(*_command(step))
        except RedisError as exc:
            raise _backend_error(exc) from exc


class AsyncRedisBackend(_BackendBase[AsyncLock, AsyncRateLimiter]):
    """Locks and limits on ``redis.asyncio.Redis`` (or ``redis.asyncio.RedisCluster``).

    ``AsyncRedisBackend.from_url("redis://localhost:6379/0")``, or ``AsyncRedisBackend(client)``.
    Importing it does not import Celery.
    """

    _client_types = (redis.asyncio.Redis, redis.asyncio.RedisCluster)
    _pool_class = redis.asyncio.BlockingConnectionPool
    _other = "RedisBackend"
    _lock_class = AsyncLock
    _limiter_class = AsyncRateLimiter

    def __init__(self, client: Any, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(client, key_prefix=key_prefix)
        # Commands waiting for this loop iteration's round trip, per event loop.
        self._batches: dict[
            asyncio.AbstractEventLoop, list[tuple[Eval | Call, asyncio.Future[Any]]]
        ] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # round trips under way (direct calls and pipelines)
        # A cluster pipeline would split per node anyway: send those one by one, concurrently.
        self._cluster = isinstance(client, redis.asyncio.RedisCluster)

    async def acquire_or_owner(
        self, name: str, token: str, ttl: float, *, previous: str | None = None
    ) -> Acquisition:
        """Acquire ``name`` for ``token``, or learn who holds it; one round trip.

        With ``previous``, a lock held by that token passes to ``token`` (a hand-over).
        """
        return await self._one(_core.acquire_once(self._keys.lock(name), token, ttl, previous))

    async def release(self, name: str, token: str, *, owner_prefix: str | None = None) -> bool:
        """Delete the lock if ``token`` owns it; ``True`` if it did. One round trip.

        With ``owner_prefix``, an owner whose token starts with it counts as the caller too.
        """
        return await self._one(_core.release(self._keys.lock(name), token, owner_prefix))

    async def extend(self, name: str, token: str, ttl: float) -> bool:
        """Give the lock ``ttl`` seconds from now if ``token`` owns it. One round trip."""
        return await self._one(_core.extend(self._keys.lock(name), token, ttl))

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncRedisBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _one(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        if self._in_flight or self._batches:
            return op.parse(await self._submit(op.step))
        # Nobody to share a round trip with: go straight out, without the loop turn.
        self._in_flight += 1
        try:
            return op.parse(await self._do(op.step))
        finally:
            self._in_flight -= 1

    async def _run(self, flow: Flow[T], *, see_through: bool = False) -> T:
        """Carry out ``flow``; errors of a step are thrown into it, where it may handle them.

        With ``see_through``, a cancellation that lands while a command is in flight waits for
        its reply before it is raised, so the caller knows whether the command ran.
        """
        try:
            step: Step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    reply = await (self._complete(step) if see_through else self._submit(step))
                except BackendError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            flow.close()

    async def _complete(self, step: Eval | Call) -> Any:
        # Once a command is on the wire Redis runs it, read or not. A caller cancelled before
        # the reply could not tell whether it now holds a lock, and a cleanup sent on another
        # connection might even overtake it. So the command is seen through (bounded by the
        # socket timeout) and the cancellation is raised after it.
        reply = self._submit(step)
        try:
            return await asyncio.shield(reply)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([reply])
            if not reply.cancelled():
                reply.exception()  # retrieved: it is the cancellation that matters now
            raise

    def _submit(self, step: Eval | Call) -> asyncio.Future[Any]:
        """Queue ``step`` for this event-loop iteration's round trip; a future of its reply.

        Every caller that submits before the loop turns joins one pipeline: one round trip
        and one pooled connection however many coroutines decide at once, which is what lets
        one Python process keep up with Redis. Each caller still gets exactly the reply, or
        the error, its own command would have got alone; one that is cancelled before the
        pipeline goes out has its command dropped, as if it had never been sent.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        batch = self._batches.get(loop)
        if batch is None:
            if not self._in_flight:
                # Nothing under way to share a round trip with: send at once, no loop turn.
                self._start(loop, [(step, future)])
                return future
            batch = self._batches[loop] = []
            loop.call_soon(self._flush, loop)
        batch.append((step, future))
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._start(loop, self._batches.pop(loop, []))

    def _start(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Eval | Call, asyncio.Future[Any]]]
    ) -> None:
        self._in_flight += 1
        task = loop.create_task(self._send(batch))
        self._sending.add(task)  # a strong reference until it is done
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight -= 1

    async def _send(self, batch: list[tuple[Eval | Call, asyncio.Future[Any]]]) -> None:
        batch = [item for item in batch if not item[1].cancelled()]  # gave up before it went
        if not batch:
            return
        replies: list[Any]
        try:
            if len(batch) == 1:
                replies = [await self._do(batch[0][0])]
            elif self._cluster:
                replies = await asyncio.gather(
                    *(self._do(step) for step, _ in batch), return_exceptions=True
                )
            else:
                replies = await self._pipeline([step for step, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                if isinstance(reply, BaseException):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _pipeline(self, steps: list[Eval | Call]) -> list[Any]:
        """Run ``steps`` in one non-transactional pipeline; errors come back in place."""
        replies = await self._execute(steps)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # a restarted or flushed server: load what it lacks, run those again
            try:
                for script in {steps[i].script for i in missing}:  # type: ignore[union-attr]
                    await self._client.script_load(script.source)
            except RedisError as exc:
                raise _backend_error(exc) from exc
            for i, reply in zip(
                missing, await self._execute([steps[i] for i in missing]), strict=True
            ):
                replies[i] = reply
        return [self._in_place(reply) for reply in replies]

    async def _execute(self, steps: list[Eval | Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for step in steps:
            pipe.execute_command(*_command(step))
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise _backend_error(exc) from exc
        return replies

    @staticmethod
    def _in_place(reply: Any) -> Any:
        if isinstance(reply, RedisError):
            error = _backend_error(reply)
            error.__cause__ = reply
            return error
        return reply

    async def _do(self, step: Eval | Call) -> Any:
        client = self._client
        try:
            if isinstance(step, Call):
                return await client.execute_command(*step.args)
            try:
                return await client.execute_command(*_command(step))
            except NoScriptError:
                await client.script_load(step.script.source)
                return await client.execute_command(*_command(step))
        except RedisError as exc:
            raise _backend_error(exc) from exc
