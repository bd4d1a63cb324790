"""The async executor's I/O: one batch of commands on one pooled ``redis.asyncio`` connection.

The batch is packed once (:mod:`.wire`), written with redis-py's ``send_packed_command`` and its
replies read back in order, all within the batch's deadline; on NOSCRIPT the missing scripts
are loaded and those commands sent again, together, in one more round trip. A failure of the
connection itself (refused, reset, timed out, cancelled) leaves the stream in an unknown state:
the connection is dropped and every caller of the batch gets the error.

Replies are read with redis-py's ``read_response``, one call each. Where the connection is a
RESP2 one over asyncio streams, the whole batch's replies may instead be parsed from the
stream's buffer in one go (``read_streams=True``, the default): that fast path, the only one
that reads redis-py's private attributes, is :mod:`.fastread`, and falls back to
``read_response`` by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.exceptions as rex

from ..core.steps import WITHDRAWN, Call, Eval, is_idempotent
from . import fastread
from .batching import Request
from .connections import checkout_async, decoder, direct_pool, packer
from .errors import CLOSED_UNDER_US, backend_error, closed_under_us, refused_by_replica
from .policy import Budget

__all__ = ["BatchSender"]

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float | None) -> AsyncIterator[None]:
        with anyio.fail_after(seconds):
            yield


_BROKEN = (rex.ConnectionError, rex.TimeoutError, OSError)
_BROKEN_OR_LATE = (*_BROKEN, TimeoutError)  # TimeoutError: our own deadline's
_FAILED: tuple[type[Exception], ...] = (*_BROKEN_OR_LATE, *CLOSED_UNDER_US)
_PRECEDENCE = 0.25  # seconds past its deadline a client's own timeout may take to fire
_KEYLESS = frozenset({"CONFIG", "TIME", "PING"})  # commands a cluster may send to any node
_INHERITED: list[object] = []  # in a forked child: the parent's connections, never to be freed


class BatchSender:
    """Sends batches of steps for :class:`~.batching.Batcher`; see the module docstring."""

    def __init__(self, client: Any, timeout: float, *, read_streams: bool = True) -> None:
        self.client = client
        self.timeout = timeout
        self.read_streams = read_streams
        self._pool = direct_pool(client)
        #: The cluster nodes this sender has seen the client route to (closed at the end),
        #: by identity: redis-py 5.0's nodes compare equal but cannot be hashed.
        self.nodes_seen: dict[int, Any] = {}
        #: Every pooled connection this sender used: closed at the end whatever the pool's
        #: own bookkeeping did with it (a failover's pool may let one go without closing).
        self.used: weakref.WeakSet[Any] = weakref.WeakSet()
        #: One connection kept from the last batch, with its event loop: the next batch
        #: takes it without the pool's checkout and release (see :mod:`.fastread`).
        self._kept: tuple[asyncio.AbstractEventLoop, Any, fastread.Streams] | None = None
        # A Sentinel pool looks up the master as it lends a connection and lets go of those
        # to an old one: its connections always go back to it.
        self._keeps = getattr(self._pool, "sentinel_manager", None) is None
        #: Reads carried on for callers cancelled mid-command (strong references).
        self._salvaging: set[asyncio.Task[None]] = set()
        if self._pool is not None:
            self._packer = packer(self._pool)
            self._decode = decoder(self._pool)

    async def __call__(self, batch: list[Request]) -> list[Any]:
        steps = [request.step for request in batch]
        loop = asyncio.get_running_loop()
        # From the earliest caller's ask: a request that waited for a batch to leave has
        # spent that much of its deadline already.
        since = min(request.since for request in batch)
        budget = Budget(min(since, loop.time()), self.timeout, (s.timeout for s in steps))
        if self._pool is None:
            return await self._through_client(steps, budget.total)
        while True:
            try:
                kept = await self._kept_one(loop)
                if kept is None:
                    async with _timeout(budget.left(loop.time())):
                        connection = await checkout_async(self._pool)
                    self.used.add(connection)
                    if budget.spent(loop.time()):  # the deadline's cancellation was swallowed
                        await self._pool.release(connection)
                        raise TimeoutError
                    found = fastread.streams(connection) if self.read_streams else None
                else:
                    connection, found = kept
            except (rex.RedisError, TimeoutError) as exc:
                unknown = budget.outcome_unknown()  # an earlier attempt's may have run
                waited = budget.waited(loop.time())
                raise backend_error(exc, outcome_unknown=unknown, waited=waited) from exc
            except CLOSED_UNDER_US as exc:
                waited, unknown = budget.waited(loop.time()), budget.outcome_unknown()
                raise backend_error(
                    closed_under_us(exc), outcome_unknown=unknown, waited=waited
                ) from exc
            # Waiting for a free connection takes time: drop who gave up meanwhile, and what
            # was withdrawn (no await from here to the write: it stays so).
            replies: list[Any] = [None] * len(batch)
            live = []
            for i, request in enumerate(batch):
                if request.cancelled():
                    continue
                if _withdrawn(request.step):
                    replies[i] = WITHDRAWN
                    continue
                live.append(i)
            for i in live:
                batch[i].sent = True  # from here Redis may run it, read or not
            sent = False
            # Until the replies are in, what the read got (resumable where it is ours).
            salvage = found is not None and any(request.salvage for request in batch)
            progress = fastread.Progress(self._decode) if salvage else None
            try:
                if live:
                    async with _timeout(budget.left(loop.time())):
                        data = b"".join(self._pack(steps[i]) for i in live)
                        await self._write(connection, found, data)
                        sent = True
                        _check(budget, loop)
                        answers = await self._read(connection, len(live), progress)
                        progress = None
                        await self._reload_missing(
                            connection, found, [steps[i] for i in live], answers, budget
                        )
                    for i, answer in zip(live, answers, strict=True):
                        replies[i] = answer
            except _FAILED as caught:
                broken = caught if isinstance(caught, _BROKEN_OR_LATE) else closed_under_us(caught)
                await self._drop(connection)
                if budget.resend(
                    loop.time(),
                    sent=sent,
                    connection_lost=isinstance(broken, rex.ConnectionError),
                    idempotent=all(map(is_idempotent, steps)),
                ):
                    continue
                replica = refused_by_replica(broken)
                raise backend_error(
                    broken,
                    outcome_unknown=budget.outcome_unknown(sent=sent, refused_by_replica=replica),
                    waited=budget.waited(loop.time()),
                ) from caught
            except BaseException as exc:
                sought = [batch[i] for i in live if batch[i].sent and batch[i].salvage]
                if sought and isinstance(exc, asyncio.CancelledError):
                    # Its caller was cancelled mid-command and still wants the reply: it is
                    # read off the caller's path (see Request.salvage).
                    await self._salvage(connection, found, sought, progress, budget)
                else:
                    await self._drop(connection)
                raise
            await self._put_back(connection, found, replies, loop)
            return [_as_error(reply) for reply in replies]

    async def _put_back(
        self,
        connection: Any,
        found: fastread.Streams | None,
        replies: list[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Done with ``connection``: kept for the next batch, back to the pool, or dropped."""
        if any(map(refused_by_replica, replies)):
            await self._drop(connection)  # an old master: reconnect to the current one
        elif self._kept is None and self._keeps and found is not None and fastread.sound(found):
            self._kept = (loop, connection, found)
        else:
            await self._pool.release(connection)  # type: ignore[union-attr]  # only when pooled

    async def _salvage(
        self,
        connection: Any,
        found: fastread.Streams | None,
        requests: list[Request],
        progress: fastread.Progress | None,
        budget: Budget,
    ) -> None:
        """Hand ``requests`` (sent, their caller cancelled) a future of their replies each
        (``late``): read by a task within the budget where the read can go on (``progress``),
        else, the connection dropped, the error of a command whose outcome is unknown."""
        loop = asyncio.get_running_loop()
        for request in requests:
            request.late = loop.create_future()
        if progress is None:  # cut short where the stream is not ours to go on reading
            await self._drop(connection)
            error = backend_error(
                rex.ConnectionError("the call was cancelled before its reply was read"),
                outcome_unknown=True,
                waited=budget.waited(loop.time()),
            )
            for request in requests:
                request.answer_late(error)
            return
        task = loop.create_task(self._read_on(connection, found, requests, progress, budget))
        self._salvaging.add(task)  # a strong reference until it is done
        task.add_done_callback(self._salvaging.discard)

    async def _read_on(
        self,
        connection: Any,
        found: fastread.Streams | None,
        requests: list[Request],
        progress: fastread.Progress,
        budget: Budget,
    ) -> None:
        loop = asyncio.get_running_loop()
        steps = [request.step for request in requests]
        try:
            async with _timeout(budget.left(loop.time())):
                answers = await self._read(connection, len(requests), progress)
                await self._reload_missing(connection, found, steps, answers, budget)
        except BaseException as exc:
            await self._drop(connection)
            broken = exc if isinstance(exc, _BROKEN_OR_LATE) else closed_under_us(exc)
            error = backend_error(broken, outcome_unknown=True, waited=budget.waited(loop.time()))
            error.__cause__ = exc
            for request in requests:
                request.answer_late(error)
            if not isinstance(exc, Exception):
                raise
            return
        await self._put_back(connection, found, answers, loop)
        for request, answer in zip(requests, answers, strict=True):
            request.answer_late(_as_error(answer))

    async def _kept_one(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[Any, fastread.Streams] | None:
        """The kept connection and its streams, if it is this loop's and still sound; else
        ``None`` (one the server closed meanwhile is dropped, another loop's goes back to
        the pool)."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        kept_loop, connection, found = kept
        if kept_loop is not loop:
            await self._pool.release(connection)  # type: ignore[union-attr]  # only when pooled
            return None
        if not fastread.sound(found):
            await self._drop(connection)
            return None
        return connection, found

    async def _write(self, connection: Any, found: fastread.Streams | None, data: bytes) -> None:
        if found is None or not await fastread.write_batch(found, data):
            await connection.send_packed_command(data)

    def forget_connections(self) -> None:
        """Forget the pool's connections without closing them: in a forked child they are
        the parent's sockets, on the parent's event loop, and the child must not touch them.
        (A cluster client's are its own business: make an asyncio cluster client after the
        fork.)"""
        if self._pool is None:
            return
        # Not even by freeing them: a connection freed in the child closes its stream, which
        # unregisters the socket from the parent's epoll set (the kernel object the child
        # shares), and the parent then never hears its replies. So what the pool held at the
        # fork is kept alive for the child's lifetime (a few objects, once per fork).
        with contextlib.suppress(TypeError):  # a pool without a __dict__: nothing to keep
            _INHERITED.append(list(vars(self._pool).values()))
        _INHERITED.append(list(self.used))  # nor closed at the child's end
        self.used = weakref.WeakSet()
        self._kept = None
        self._pool.reset()

    async def _drop(self, connection: Any) -> None:
        with contextlib.suppress(rex.RedisError, OSError):
            await connection.disconnect(nowait=True)
        await self._pool.release(connection)  # type: ignore[union-attr]  # only when pooled

    def _pack(self, step: Eval | Call) -> bytes:
        if isinstance(step, Eval):
            return self._packer.evalsha(step.script.sha, step.keys, step.args)
        return self._packer.command(step.args)

    async def _reload_missing(
        self,
        connection: Any,
        found: fastread.Streams | None,
        steps: list[Eval | Call],
        answers: list[Any],
        budget: Budget,
    ) -> None:
        """Load the scripts answered NOSCRIPT and send those steps again, in one round trip."""
        missing = [i for i, answer in enumerate(answers) if isinstance(answer, rex.NoScriptError)]
        # Their first send did not run: the next is their real send, gated like it.
        for i in [i for i in missing if _withdrawn(steps[i])]:
            answers[i] = WITHDRAWN
            missing.remove(i)
        if not missing:
            return
        scripts = {steps[i].script: None for i in missing}  # type: ignore[union-attr]
        loads = [self._packer.command(("SCRIPT", "LOAD", script.source)) for script in scripts]
        await self._write(
            connection, found, b"".join(loads + [self._pack(steps[i]) for i in missing])
        )
        _check(budget, asyncio.get_running_loop())
        again = await self._read(connection, len(loads) + len(missing))
        for i, answer in zip(missing, again[len(loads) :], strict=True):
            answers[i] = answer

    async def _read(
        self, connection: Any, count: int, progress: fastread.Progress | None = None
    ) -> list[Any]:
        """``count`` replies, error replies in place as redis-py exceptions."""
        if self.read_streams:
            answers = await fastread.read_batch(connection, count, self._decode, progress)
            if answers is not None:
                return answers
        return [await _reply_or_error(connection) for _ in range(count)]

    async def _through_client(self, steps: list[Eval | Call], budget: float) -> list[Any]:
        # A cluster routes each key to its node; a single-connection client owns its one.
        # At the client's own deadline its socket timeout ends a stuck read first, and
        # redis-py closes that connection itself; cancelled, a cluster node's connection in
        # use may be left open once the node drops out of the client's view (a failover).
        # So the client gets a moment's precedence; a caller's sooner deadline is kept.
        bound = budget + _PRECEDENCE if budget >= self.timeout else budget
        try:
            async with _timeout(bound):
                replies = await asyncio.gather(
                    *(self._one(step) for step in steps), return_exceptions=True
                )
        except TimeoutError as exc:
            raise backend_error(exc, outcome_unknown=True, waited=budget) from exc
        finally:
            self._see_nodes()
        return list(replies)

    def _see_nodes(self) -> None:
        # A node that fails is dropped from the client's view (its routing table and its
        # startup nodes, which it asks for the layout) with connections still open, and its
        # close() no longer reaches them: ours will. Noted after each call, so the nodes a
        # call found (the first one's layout, a refresh) are among them.
        manager = getattr(self.client, "nodes_manager", None)
        if manager is not None:
            for node in (*manager.nodes_cache.values(), *manager.startup_nodes.values()):
                self.nodes_seen[id(node)] = node

    async def _one(self, step: Eval | Call) -> Any:
        if _withdrawn(step):
            return WITHDRAWN
        client = self.client
        try:
            if isinstance(step, Call):
                if step.args[0] in _KEYLESS and hasattr(client, "get_random_node"):
                    # No key to route by: any node answers (redis-py 5.0's cluster client,
                    # left to work that out itself, fails on CONFIG GET with a ValueError).
                    await client.initialize()  # a no-op once it knows its nodes
                    node = client.get_random_node()
                    return await client.execute_command(*step.args, target_nodes=node)
                return await client.execute_command(*step.args)
            command = ("EVALSHA", step.script.sha, len(step.keys), *step.keys, *step.args)
            try:
                return await client.execute_command(*command)
            except rex.NoScriptError:
                await client.script_load(step.script.source)
                return await client.execute_command(*command)
        except rex.RedisError as exc:
            raise backend_error(exc) from exc
        except CLOSED_UNDER_US as exc:
            raise backend_error(closed_under_us(exc), outcome_unknown=True) from exc


def _check(budget: Budget, loop: asyncio.AbstractEventLoop) -> None:
    """Raise the deadline's ``TimeoutError`` if it has passed. Python 3.11's
    ``asyncio.wait_for``, which redis-py writes with, swallows a cancellation that lands as
    the write completes: the deadline's ``asyncio.timeout`` then fired for nothing, and the
    read after it would wait a whole socket timeout more."""
    if budget.spent(loop.time()):
        raise TimeoutError


def _withdrawn(step: Eval | Call) -> bool:
    if step.gate is None:
        return False
    with step.gate.hold() as open_:
        return not open_


async def _reply_or_error(connection: Any) -> Any:
    try:
        return await connection.read_response()
    except rex.ResponseError as exc:  # an error reply, read whole: the stream is in step
        return exc


def _as_error(reply: Any) -> Any:
    """An error reply as the :class:`BackendError` its caller gets, chained."""
    if isinstance(reply, rex.RedisError):
        error = backend_error(reply)
        error.__cause__ = reply
        return error
    return reply
