"""The async executor on anyio byte streams: RESP over TCP, TLS or a Unix socket, on every
backend anyio runs (trio as well as asyncio).

redis.asyncio runs on asyncio only. Under another anyio backend (trio) an
:class:`~.aio.AsyncRedisExecutor` hands its calls to a :class:`StreamExecutor` built from its
client's connection settings (:class:`Address`: host and port or Unix path, database, ACL user
and password or credential provider, client name, TLS), so one backend object serves either.
Commands are packed and replies parsed by :mod:`.wire`, and every call follows the send policy
of the other executors (:mod:`.policy`): one budget that connecting, TLS and the handshake
spend from too, one resend where safe, NOSCRIPT reloaded on the same connection, the eviction
check and the native-command probes along with the first command.

Each call takes a pooled connection of its own (at most ``max_connections`` at once, callers
queue for a free one within their budget): no batching, which on asyncio the redis.asyncio
executor does. Connections belong to the event loop run that opened them; a later run (a new
``trio.run``) opens its own.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.tls
import redis.asyncio
import redis.exceptions as rex

from ..core.native import PROBE_KEY
from ..core.steps import WITHDRAWN, Call, Eval, Flow, Gate, Op, is_idempotent
from ..errors import BackendError, ConfigurationError
from .connections import DEFAULT_TIMEOUT
from .driving import adrive
from .errors import backend_error, native_refusal, refused_by_replica
from .policy import Budget, EvictionCheck, NativeCommands
from .wire import INCOMPLETE, Packer, Reader

__all__ = ["Address", "StreamConnection", "StreamExecutor"]

T = TypeVar("T")

_READ_SIZE = 65536
#: What a stream raises when the connection under it broke or was closed.
_LOST: tuple[type[BaseException], ...] = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    rex.ConnectionError,
)
#: And the budget's own deadline (``anyio.fail_after``'s ``TimeoutError``).
_LOST_OR_LATE: tuple[type[BaseException], ...] = (*_LOST, TimeoutError)
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to connect: what a redis-py client's pool would use (:meth:`of`)."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = None
    credential_provider: Any = None  # redis-py's: asked for (user and) password per connection
    client_name: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    max_connections: int = 64
    encoding: str = "utf-8"
    encoding_errors: str = "strict"
    decode_responses: bool = False

    @classmethod
    def of(cls, client: Any) -> Address:
        """The address of a ``redis.asyncio`` client's connections; a
        :class:`ConfigurationError` for a client whose connections are not one server's (a
        cluster, a Sentinel-managed pool), which this executor does not drive."""
        # A single-connection client's pool is one server's too: its settings are used.
        pool = getattr(client, "connection_pool", None)
        if pool is None or getattr(pool, "sentinel_manager", None) is not None:
            raise ConfigurationError(
                "under trio (any anyio backend other than asyncio) celery_unique connects to one "
                "Redis server itself: standalone Redis over TCP, TLS or a Unix socket, with ACL "
                "users and a database. Redis Cluster and Sentinel run on asyncio only "
                "(redis.asyncio): run this program under asyncio, or point it at the master"
            )
        kwargs = pool.connection_kwargs
        tls = None
        if issubclass(pool.connection_class, redis.asyncio.SSLConnection):
            tls = _tls_context(kwargs)
        return cls(
            host=kwargs.get("host", "localhost"),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path"),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            credential_provider=kwargs.get("credential_provider"),
            client_name=kwargs.get("client_name"),
            tls=tls,
            tls_hostname=kwargs.get("host") if tls is not None else None,
            max_connections=int(getattr(pool, "max_connections", 64) or 64),
            encoding=kwargs.get("encoding", "utf-8"),
            encoding_errors=kwargs.get("encoding_errors", "strict"),
            decode_responses=bool(kwargs.get("decode_responses", False)),
        )

    def handshake(self, packer: Packer) -> list[bytes]:
        """The commands a new connection sends before any other (AUTH, SELECT, SETNAME)."""
        commands = []
        username, password = self.username, self.password
        if self.credential_provider is not None:
            credentials = self.credential_provider.get_credentials()
            username, password = (None, *credentials) if len(credentials) == 1 else credentials
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            commands.append(packer.command(auth))
        if self.db:
            commands.append(packer.command(("SELECT", self.db)))
        if self.client_name:
            commands.append(packer.command(("CLIENT", "SETNAME", self.client_name)))
        return commands


def _tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """An SSL context with redis-py's ``ssl_*`` settings."""
    context = ssl.create_default_context()
    reqs = kwargs.get("ssl_cert_reqs", "required")
    mode = _CERT_REQS.get(reqs.lower(), ssl.CERT_REQUIRED) if isinstance(reqs, str) else reqs
    context.check_hostname = bool(kwargs.get("ssl_check_hostname", False)) and (
        mode != ssl.CERT_NONE
    )
    context.verify_mode = mode
    if kwargs.get("ssl_certfile"):
        context.load_cert_chain(
            kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password")
        )
    if kwargs.get("ssl_ca_certs") or kwargs.get("ssl_ca_data") or kwargs.get("ssl_ca_path"):
        context.load_verify_locations(
            kwargs.get("ssl_ca_certs"), kwargs.get("ssl_ca_path"), kwargs.get("ssl_ca_data")
        )
    if kwargs.get("ssl_min_version") is not None:
        context.minimum_version = kwargs["ssl_min_version"]
    if kwargs.get("ssl_ciphers"):
        context.set_ciphers(kwargs["ssl_ciphers"])
    return context


class StreamConnection:
    """One connection: its stream, the parser of its replies, and its socket."""

    __slots__ = ("raw", "reader", "stream", "tls")

    def __init__(self, stream: anyio.abc.ByteStream, decode: Callable[[bytes], str] | None):
        self.stream = stream
        self.reader = Reader(decode)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        # A socket of its own on trio; asyncio hands out a wrapper that refuses I/O.
        self.raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
        self.tls = stream.extra(anyio.streams.tls.TLSAttribute.ssl_object, None) is not None

    def quiet(self) -> bool:
        """Whether an idle connection has nothing to read: not closed by the server meanwhile
        (an end of stream), no stray bytes."""
        if self.raw is None:
            return True
        try:
            return not self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def write(self, data: bytes, gate: Gate | None) -> bool:
        """Write ``data``; with a ``gate``, only while it is open (``False``: withdrawn).

        A gate is held from its check to the end of the write, and a holder's release waits
        on it without awaiting: so a gated write must not yield. It starts on the socket
        itself, which takes a command of this size at once; TLS cannot be written so, and
        is written just after the check (a renewal's extend may then follow its release by
        one write: the server refuses an extend of a lease no longer held).
        """
        if gate is None:
            await self.stream.send(data)
            return True
        with gate.hold() as open_:
            if not open_:
                return False
            if self.raw is not None and not self.tls:
                try:
                    done = self.raw.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    done = 0
                data = data[done:]
        if data:
            await self.stream.send(data)
        return True

    async def read(self, count: int) -> list[Any]:
        """The next ``count`` replies (error replies in place, as redis-py exceptions)."""
        replies: list[Any] = []
        reader = self.reader
        while True:
            while (reply := reader.get()) is not INCOMPLETE:
                replies.append(reply)
                if len(replies) == count:
                    return replies
            try:
                data = await self.stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                raise rex.ConnectionError("Connection closed by server.") from None
            reader.feed(data)

    async def close(self) -> None:
        await anyio.aclose_forcefully(self.stream)

    def abandon(self) -> None:
        """Close the socket without the event loop (it belongs to a run that has ended)."""
        if self.raw is not None:
            with contextlib.suppress(OSError):
                self.raw.close()


class _Pool:
    """The connections of one executor in one event loop run."""

    def __init__(self, size: int) -> None:
        self.idle: list[StreamConnection] = []
        self.slots = anyio.CapacityLimiter(size)

    def abandon(self) -> None:
        """Close the idle connections without an event loop (their run has ended)."""
        for connection in self.idle:
            connection.abandon()
        self.idle.clear()


#: Each run's pools (anyio's run-scoped variable): connections never cross event loops.
_POOLS: anyio.lowlevel.RunVar[weakref.WeakKeyDictionary[StreamExecutor, _Pool]] = (
    anyio.lowlevel.RunVar("celery_unique_stream_pools")
)


class StreamExecutor:
    """Carries out the core's operations over anyio streams; see the module docstring.

    ``timeout``: seconds one operation may take, connecting and waiting for a free connection
    included. Implements :class:`~.protocol.AsyncExecutor`.
    """

    client: Any = None

    def __init__(
        self, address: Address, *, timeout: float = DEFAULT_TIMEOUT, probe_key: str = PROBE_KEY
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._packer = Packer(address.encoding, address.encoding_errors)
        encoding, errors = address.encoding, address.encoding_errors
        self._decode: Callable[[bytes], str] | None = (
            (lambda data: data.decode(encoding, errors)) if address.decode_responses else None
        )
        self._eviction = EvictionCheck()
        self._native = NativeCommands(key=probe_key, refusal=native_refusal)
        #: Pools of earlier runs, whose idle connections a later one closes (one run at a time).
        self._earlier: list[_Pool] = []
        self._policy_query = self._pack(EvictionCheck.step)
        self._probe_queries = [self._pack(probe) for probe in self._native.steps]

    # -- the protocol ---------------------------------------------------------------------

    async def execute(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        return op.parse(await self._send_any(op.step))

    async def run(self, flow: Flow[T], *, on_cancelled: Callable[[Any], object] | None = None) -> T:
        """Carry out ``flow``; see :meth:`.protocol.AsyncExecutor.run`."""
        if on_cancelled is None:
            return await adrive(flow, self._send_any, anyio.sleep)
        return await adrive(
            flow, functools.partial(self._seen_through, report=on_cancelled), anyio.sleep
        )

    async def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching the glob ``match`` (SCAN, never KEYS), as text."""
        cursor: Any = "0"
        while True:
            cursor, keys = await self._send(Call(("SCAN", cursor, "MATCH", match, "COUNT", count)))
            for key in keys:
                yield key.decode() if isinstance(key, bytes) else key
            if cursor in (b"0", "0"):
                return

    async def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` (UNLINK); returns how many existed."""
        if not keys:
            return 0
        return int(await self._send(Call(("UNLINK", *keys), idempotent=False)))

    async def aclose(self) -> None:
        """Close the idle connections of the running event loop's run (and forget any of
        another run's)."""
        pool = self._pools().pop(self, None)
        if pool is not None:
            for connection in pool.idle:
                await connection.close()
            pool.idle.clear()
        for earlier in self._earlier:
            earlier.abandon()
        self._earlier.clear()

    # -- one step -------------------------------------------------------------------------

    async def _seen_through(self, step: Eval | Call, report: Callable[[Any], object]) -> Any:
        # Once a command is on the wire Redis runs it, read or not: a cancellation that lands
        # meanwhile waits for the reply (bounded by the step's deadline), hands it to
        # ``report`` and is raised then, so the caller learns what the command did.
        await anyio.lowlevel.checkpoint_if_cancelled()
        error: BackendError | None = None
        with anyio.CancelScope(shield=True):
            try:
                got = reply = await self._send_any(step)
            except BackendError as exc:
                got, error = exc, exc
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            report(got)
            raise
        if error is not None:
            raise error
        return reply

    async def _send_any(self, step: Eval | Call) -> Any:
        """``step``'s reply, sent as the native command the policy picks where there is one."""
        alternative = self._native.pick(step)
        if alternative is not None:
            try:
                got: Any = await self._send(self._native.command(step, alternative))
            except BackendError as exc:
                got = exc
            answer = self._native.settle(alternative, got)
            if answer is not None:
                return answer
        return await self._send(step)

    async def _send(self, step: Eval | Call) -> Any:
        """``step``'s reply under the send policy (:class:`~.policy.Budget`)."""
        clock = time.monotonic
        budget = Budget(clock(), self.timeout, (step.timeout,))
        data = self._pack(step)
        pool = self._pool()
        while True:
            sent = False
            connection: StreamConnection | None = None
            checking = probing = False
            try:
                with anyio.fail_after(max(budget.left(clock()), 0.0)):
                    async with pool.slots:
                        connection = await self._take(pool)
                        checking, probing = self._eviction.claim(), self._native.claim()
                        along = [self._policy_query] if checking else []
                        along += self._probe_queries if probing else []
                        if not await connection.write(b"".join((*along, data)), step.gate):
                            self._unanswered(checking, probing)
                            pool.idle.append(connection)
                            return WITHDRAWN
                        sent = True
                        replies = await connection.read(len(along) + 1)
                        if checking:
                            self._eviction.answered(replies[0])
                        if probing:
                            self._native.answered(
                                replies[len(along) - len(self._probe_queries) : len(along)]
                            )
                        checking = probing = False
                        reply = replies[-1]
                        if isinstance(reply, rex.NoScriptError):
                            reply = await self._load_and_resend(connection, step, data)
            except _LOST_OR_LATE as caught:
                # TimeoutError: the budget's (fail_after), the stream mid-exchange.
                self._unanswered(checking, probing)
                if connection is not None:
                    await connection.close()
                broken = _as_redis_error(caught)
                lost = isinstance(broken, rex.ConnectionError)
                if budget.resend(
                    clock(), sent=sent, connection_lost=lost, idempotent=is_idempotent(step)
                ):
                    continue
                unknown = budget.outcome_unknown(sent=sent)
                raise backend_error(
                    broken, outcome_unknown=unknown, waited=budget.waited(clock())
                ) from broken
            except rex.RedisError as exc:  # the handshake refused (SELECT, SETNAME): not lost
                self._unanswered(checking, probing)
                if connection is not None:
                    await connection.close()
                raise backend_error(exc) from exc
            except BaseException:
                # Cancelled mid-exchange: the stream is in an unknown state, not reused.
                self._unanswered(checking, probing)
                if connection is not None:
                    await connection.close()
                raise
            if isinstance(reply, rex.RedisError):
                if refused_by_replica(reply):
                    await connection.close()  # an old master: the next call reconnects
                else:
                    pool.idle.append(connection)
                raise backend_error(reply) from reply
            pool.idle.append(connection)
            return reply

    async def _load_and_resend(
        self, connection: StreamConnection, step: Eval | Call, data: bytes
    ) -> Any:
        assert isinstance(step, Eval)  # only scripts answer NOSCRIPT
        await connection.write(self._packer.command(("SCRIPT", "LOAD", step.script.source)), None)
        (loaded,) = await connection.read(1)
        if isinstance(loaded, rex.RedisError):
            return loaded
        # The first send did not run: this one is the step's real send, gated like it.
        if not await connection.write(data, step.gate):
            return WITHDRAWN
        (reply,) = await connection.read(1)
        return reply

    # -- connections ----------------------------------------------------------------------

    def _pools(self) -> weakref.WeakKeyDictionary[StreamExecutor, _Pool]:
        try:
            return _POOLS.get()
        except LookupError:
            pools: weakref.WeakKeyDictionary[StreamExecutor, _Pool] = weakref.WeakKeyDictionary()
            _POOLS.set(pools)
            return pools

    def _pool(self) -> _Pool:
        pools = self._pools()
        pool = pools.get(self)
        if pool is None:
            # A new run: connections of an earlier one cannot be used (nor closed) from here.
            for earlier in self._earlier:
                earlier.abandon()
            pool = pools[self] = _Pool(self.address.max_connections)
            self._earlier = [pool]
        return pool

    async def _take(self, pool: _Pool) -> StreamConnection:
        """An idle connection that is still sound, else a new one (connected and greeted)."""
        while pool.idle:
            connection = pool.idle.pop()
            if connection.quiet():
                return connection
            await connection.close()
        return await self._connect()

    async def _connect(self) -> StreamConnection:
        address = self.address
        stream: anyio.abc.ByteStream
        if address.path is not None:
            stream = await anyio.connect_unix(address.path)
        elif address.tls is not None:
            stream = await anyio.connect_tcp(
                address.host,
                address.port,
                ssl_context=address.tls,
                tls_hostname=address.tls_hostname,
                tls_standard_compatible=False,  # Redis may close without a TLS close_notify
            )
        else:
            stream = await anyio.connect_tcp(address.host, address.port)
        connection = StreamConnection(stream, self._decode)
        try:
            greeting = address.handshake(self._packer)
            if greeting:
                await connection.write(b"".join(greeting), None)
                for reply in await connection.read(len(greeting)):
                    if isinstance(reply, rex.RedisError):
                        if isinstance(reply, rex.ResponseError) and "AUTH" in str(reply):
                            raise rex.AuthenticationError(str(reply))
                        raise reply
        except BaseException:
            await connection.close()
            raise
        return connection

    def _unanswered(self, checking: bool, probing: bool) -> None:
        if checking:
            self._eviction.unanswered()
        if probing:
            self._native.unanswered()

    def _pack(self, step: Eval | Call) -> bytes:
        if isinstance(step, Eval):
            return self._packer.evalsha(step.script.sha, step.keys, step.args)
        return self._packer.command(step.args)


def _as_redis_error(caught: BaseException) -> BaseException:
    """What broke, as the redis-py error the policy and the messages read (chained to it)."""
    if isinstance(caught, rex.RedisError | TimeoutError | ssl.SSLError):
        return caught  # an SSLError: the TLS handshake's, with its reason for the message
    broken = rex.ConnectionError(f"the connection broke or could not be made ({caught})")
    broken.__cause__ = caught
    return broken
