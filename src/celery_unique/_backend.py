"""The two executors: :class:`RedisBackend` (``redis.Redis``) and :class:`AsyncRedisBackend`
(``redis.asyncio.Redis``).

They carry out the steps of the core's flows and nothing else: EVALSHA, and on NOSCRIPT
(a restarted or flushed server) SCRIPT LOAD and one retry; redis-py errors become
:class:`BackendError`/:class:`BackendUnavailable`, chained. Every decision is in ``_core``.
The async one batches the commands of concurrent callers: each batch is packed and its
replies read here (``_resp``), on one connection of the client's own pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import redis
import redis.asyncio
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import _core, _resp
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


# A batch goes out before the loop turns once it holds half the commands waiting (but at
# least _BATCH_MIN, at most _BATCH_MAX). Two or more batches under way, on their own pooled
# connections, let Redis run one while Python reads the replies of another, instead of each
# side idling while the other works: at 64 callers that is ~1.5x the decisions/s of one
# batch. Smaller batches cost more per command (a connection, a write, a read) than they gain.
_BATCH_MIN, _BATCH_MAX = 8, 32
_READ_SIZE = 65536  # bytes per read of a batch's replies

# redis-py >= 5.3 takes no command name to pick a pooled connection (and warns if given one).
_command_name = inspect.signature(redis.asyncio.ConnectionPool.get_connection).parameters.get(
    "command_name"
)
_NO_COMMAND_NAME = _command_name is None or _command_name.default is None

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float | None) -> AsyncIterator[None]:
        with anyio.fail_after(seconds):
            yield


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
        self._in_flight = 0  # round trips under way (direct calls and batches)
        self._waiting = 0  # commands in batches, queued or in flight
        # A batch goes out on one connection of the client's pool, packed and read here. A
        # cluster would split it per node, and a single-connection client owns its one
        # connection: those send each command through redis-py, concurrently.
        self._wire = not isinstance(client, redis.asyncio.RedisCluster) and not getattr(
            client, "single_connection_client", False
        )
        if self._wire:
            encoder = client.connection_pool.get_encoder()
            self._packer = _resp.Packer(encoder.encoding, encoder.encoding_errors)
            self._decode: Callable[[bytes], str] | None = (
                functools.partial(
                    bytes.decode, encoding=encoder.encoding, errors=encoder.encoding_errors
                )
                if encoder.decode_responses
                else None
            )

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
        """Close the client and its connections, once the batches under way are answered."""
        # A batch still waiting for a connection would otherwise take one after the pool
        # closed, open it afresh and leave it open.
        loop = asyncio.get_running_loop()
        while True:
            if sending := [task for task in self._sending if task.get_loop() is loop]:
                await asyncio.wait(sending)
            elif loop in self._batches:
                await asyncio.sleep(0)  # a batch is due to leave this loop iteration
            else:
                break
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
            return op.parse(await self._alone(op.step))
        finally:
            self._in_flight -= 1

    async def _alone(self, step: Eval | Call) -> Any:
        """Carry out one step in the caller's own task."""
        if not self._wire:
            return await self._do(step)
        connection = await self._connection()
        try:
            (reply,) = await self._exchange(connection, [step])
        finally:
            await self._client.connection_pool.release(connection)
        if isinstance(reply, BackendError):
            raise reply
        return reply

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
        """Queue ``step`` for the next batch; a future of its reply.

        Callers that submit before the loop turns share a batch: its commands go out in one
        write on one pooled connection and their replies are read back in one go, which is
        what lets one Python process keep up with Redis. A batch that reaches half of the
        commands waiting (8 to 32) goes at once, so that several are under way together.
        Each caller still gets exactly the reply, or the error, its own command would have
        got alone; one that is cancelled before its batch goes out has its command dropped,
        as if it had never been sent.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting += 1
        batch = self._batches.get(loop)
        if batch is None:
            if not self._in_flight:
                # Nothing under way to share a round trip with: send at once, no loop turn.
                self._start(loop, [(step, future)])
                return future
            batch = self._batches[loop] = []
            loop.call_soon(self._flush, loop)
        batch.append((step, future))
        if len(batch) >= min(_BATCH_MAX, max(_BATCH_MIN, self._waiting // 2)):
            self._batches[loop] = []
            self._start(loop, batch)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._batches.pop(loop, None)
        if batch:
            self._start(loop, batch)

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
        size = len(batch)
        try:
            await self._settle(batch)
        finally:
            self._waiting -= size

    async def _settle(self, batch: list[tuple[Eval | Call, asyncio.Future[Any]]]) -> None:
        """Send ``batch`` and give each caller its reply or error."""
        batch = [item for item in batch if not item[1].cancelled()]  # gave up before it went
        if not batch:
            return
        replies: list[Any] = []
        try:
            if self._wire:
                connection = await self._connection()
                try:
                    # Waiting for a free connection takes time: drop who gave up meanwhile.
                    batch = [item for item in batch if not item[1].cancelled()]
                    if batch:
                        replies = await self._exchange(connection, [step for step, _ in batch])
                finally:
                    await self._client.connection_pool.release(connection)
            else:
                replies = await asyncio.gather(
                    *(self._do(step) for step, _ in batch), return_exceptions=True
                )
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

    async def _connection(self) -> Any:
        """A connected connection from the client's pool (waiting for one if all are busy)."""
        pool = self._client.connection_pool
        try:
            return await (pool.get_connection() if _NO_COMMAND_NAME else pool.get_connection("_"))
        except RedisError as exc:
            raise _backend_error(exc) from exc

    async def _exchange(self, connection: Any, steps: list[Eval | Call]) -> list[Any]:
        """Send ``steps`` on ``connection`` in one write and read their replies: each reply in
        place, an error reply as the :class:`BackendError` its caller gets. On NOSCRIPT (a
        restarted or flushed server) the missing scripts are loaded and those steps run again,
        together in one more round trip. A failure of the connection itself (refused, reset,
        timed out, cancelled) leaves the stream in an unknown state: the connection is
        disconnected and the error raised, for every caller of the batch."""
        packer = self._packer
        try:
            replies = await self._round_trip(connection, [self._pack(step) for step in steps])
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                scripts = {steps[i].script: None for i in missing}  # type: ignore[union-attr]
                loads = [packer.command(("SCRIPT", "LOAD", script.source)) for script in scripts]
                again = await self._round_trip(
                    connection, loads + [self._pack(steps[i]) for i in missing]
                )
                for i, reply in zip(missing, again[len(loads) :], strict=True):
                    replies[i] = reply
        except BaseException as exc:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect(nowait=True)
            if isinstance(exc, RedisError):
                raise _backend_error(exc) from exc
            raise
        callbacks = self._client.response_callbacks
        for i, step in enumerate(steps):
            reply = replies[i]
            if isinstance(reply, RedisError):
                replies[i] = self._in_place(reply)
            elif isinstance(step, Call) and (callback := callbacks.get(step.args[0])):
                replies[i] = callback(reply)  # what execute_command would have returned
        return replies

    def _pack(self, step: Eval | Call) -> bytes:
        if isinstance(step, Eval):
            return self._packer.evalsha(step.script.sha, step.keys, step.args)
        return self._packer.command(step.args)

    async def _round_trip(self, connection: Any, commands: list[bytes]) -> list[Any]:
        """Write ``commands`` at once and read one reply for each, within the socket timeout."""
        # redis-py's public send/read calls add a timeout, a task or a parser pass per reply;
        # the connection's own stream does the same job once per batch.
        if connection.health_check_interval:
            await connection.check_health()  # a PING when one is due, as redis-py would send
        reader: asyncio.StreamReader = connection._reader
        writer: asyncio.StreamWriter = connection._writer
        parser = _resp.Reader(self._decode)
        replies: list[Any] = []
        try:
            async with _timeout(connection.socket_timeout):
                writer.write(b"".join(commands))
                await writer.drain()
                while len(replies) < len(commands):
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        raise RedisConnectionError("Connection closed by server.")
                    parser.feed(data)
                    while (reply := parser.get()) is not _resp.INCOMPLETE:
                        replies.append(reply)
        except TimeoutError as exc:
            raise RedisTimeoutError("Timeout reading from Redis") from exc
        except OSError as exc:
            raise RedisConnectionError(f"Error while talking to Redis: {exc}") from exc
        if len(replies) != len(commands):
            raise InvalidResponse(f"{len(replies)} replies to {len(commands)} commands")
        if connection.health_check_interval:
            loop_time = asyncio.get_running_loop().time()
            connection.next_health_check = loop_time + connection.health_check_interval
        return replies

    @staticmethod
    def _in_place(reply: RedisError) -> BackendError:
        error = _backend_error(reply)
        error.__cause__ = reply
        return error

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
