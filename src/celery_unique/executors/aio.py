"""The asyncio executor: the core's steps on a ``redis.asyncio`` client, batched.

The pieces: :class:`~.batching.Batcher` decides which commands share a round trip,
:class:`~.sender.BatchSender` carries a batch over one pooled connection, and this module drives
the core's flows over them. Every operation ends within its deadline, as the sync executor's do.

redis.asyncio runs on asyncio only: under trio every call is handed to a
:class:`~.streams.StreamExecutor` to the same server (:meth:`AsyncRedisExecutor.elsewhere`),
so one backend object serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import anyio
import redis.exceptions as rex

from ..background import current_run
from ..core.native import PROBE_KEY
from ..core.steps import Call, Eval, Flow, Op
from ..errors import BackendError, BackendUnavailable
from .batching import Batcher, Request
from .connections import aclose_client, deadline_of, direct_pool
from .driving import adrive
from .errors import backend_error, native_refusal
from .policy import EvictionCheck, NativeCommands
from .sender import BatchSender
from .streams import Address, StreamExecutor

__all__ = ["AsyncRedisExecutor", "running_loop"]

T = TypeVar("T")
# Executors alive in this process, for the fork hook below.
_live: weakref.WeakSet[AsyncRedisExecutor] = weakref.WeakSet()


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio event loop; ``None`` under trio; a :class:`ConfigurationError`
    that says what to do outside any (see :func:`~celery_unique.background.current_run`)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        current_run()  # raises outside any event loop
        return None


class AsyncRedisExecutor:
    """Carries out the core's operations and flows on an asyncio redis-py client.

    ``timeout``: seconds one operation may take, connecting and waiting for a pooled connection
    included (default: the client's ``socket_timeout``, else 2 s). ``read_streams=False``
    reads every reply through redis-py's ``read_response`` (see :mod:`.sender`).
    ``probe_key``: as for :class:`~.sync.RedisExecutor`. Implements
    :class:`~.protocol.AsyncExecutor`.
    """

    def __init__(
        self,
        client: Any,
        *,
        timeout: float | None = None,
        read_streams: bool = True,
        probe_key: str = PROBE_KEY,
    ) -> None:
        self.client = client
        self.timeout = deadline_of(client, timeout)
        self._sender = BatchSender(client, self.timeout, read_streams=read_streams)
        self._batcher = Batcher(self._sender, self.timeout)
        self._eviction = EvictionCheck()
        # Probes for owner-checked commands go along with the first command too, where the
        # sender writes its own batches (a cluster client routes each command itself).
        self._native = NativeCommands(
            enabled=direct_pool(client) is not None, key=probe_key, refusal=native_refusal
        )
        self._probe_key = probe_key
        self._streams: StreamExecutor | None = None
        _live.add(self)

    def after_fork(self) -> None:
        """In a forked child (run by itself, :func:`os.register_at_fork`): forget the
        parent's connections and batches, so that the child opens its own. redis-py's
        asyncio pools, unlike its sync ones, do not do this on a change of process."""
        self._sender.forget_connections()
        self._batcher.forget()

    def elsewhere(self) -> StreamExecutor:
        """The executor this one hands its calls to under another backend than asyncio
        (trio): on anyio streams, to the same server as the client (see :mod:`.streams`)."""
        if self._streams is None:
            address = Address.of(self.client)  # a ConfigurationError for a cluster, Sentinel
            self._streams = StreamExecutor(address, timeout=self.timeout, probe_key=self._probe_key)
        return self._streams

    async def execute(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        if running_loop() is None:
            return await self.elsewhere().execute(op)
        step = op.step
        if self._eviction.pending or self._native.pending or self._native.pick(step):
            return op.parse(await self._send_any(step))
        return op.parse(await self._batcher.one(step))

    async def _send_any(self, step: Eval | Call) -> Any:
        """``step``'s reply, sent as the native command the policy picks where there is one."""
        alternative = self._native.pick(step)
        if alternative is not None:
            try:
                got: Any = await self._one(self._native.command(step, alternative))
            except BackendError as exc:
                got = exc
            answer = self._native.settle(alternative, got)
            if answer is not None:
                return answer
        return await self._one(step)

    async def _one(self, step: Eval | Call) -> Any:
        if self._eviction.pending or self._native.pending:
            future = self._with_checks(step).future
            assert future is not None
            return await future
        return await self._batcher.one(step)

    def _with_checks(self, step: Eval | Call) -> Request:
        # The first command takes the eviction policy check and the probes along in its own
        # batch: no round trip of their own, no caller waits for them, and their answers are
        # read by callbacks.
        checking = self._eviction.claim()
        probing = self._native.claim()
        if not (checking or probing):
            return self._batcher.request(step)
        along = (
            *(EvictionCheck.steps if checking else ()),
            *(self._native.steps if probing else ()),
        )
        *checks, request = self._batcher.request_all((*along, step))
        futures = [check.future for check in checks if check.future is not None]
        if checking:
            futures[0].add_done_callback(self._policy_read)
        if probing:
            # A batch's replies are handed out in order, so the probes' are all in once the
            # last one is; read then, before the caller (whose reply comes after) goes on.
            probes = futures[-len(self._native.steps) :]
            probes[-1].add_done_callback(lambda _: self._probes_read(probes))
        return request

    def _probes_read(self, probes: list[asyncio.Future[Any]]) -> None:
        if not all(probe.done() and not probe.cancelled() for probe in probes):
            self._native.unanswered()
            return
        replies = [probe.exception() or probe.result() for probe in probes]
        if any(isinstance(reply, BackendUnavailable) for reply in replies):
            self._native.unanswered()  # not answered (or only "try again"): ask next time
        else:
            self._native.answered(replies)

    def _policy_read(self, check: asyncio.Future[Any]) -> None:
        if check.cancelled():
            self._eviction.unanswered()
            return
        error = check.exception()
        reply = check.result() if error is None else error
        self._eviction.answered(reply, unreachable=isinstance(error, BackendUnavailable))

    async def run(self, flow: Flow[T], *, on_cancelled: Callable[[Any], object] | None = None) -> T:
        """Carry out ``flow``; errors of a step are thrown into it, where it may handle them.

        With ``on_cancelled``, a cancellation that lands while a command is in flight waits for
        its reply (within the command's deadline), hands the reply (or the error it got) to
        ``on_cancelled``, and is raised then: the caller learns what the command did, and
        nothing it sends next can overtake it.
        """
        if running_loop() is None:
            return await self.elsewhere().run(flow, on_cancelled=on_cancelled)
        if on_cancelled is None:
            return await adrive(flow, self._send_any, asyncio.sleep)
        return await adrive(
            flow, functools.partial(self._seen_through, report=on_cancelled), asyncio.sleep
        )

    async def _seen_through(self, step: Eval | Call, report: Callable[[Any], object]) -> Any:
        # Once a command is on the wire Redis runs it, read or not. A caller cancelled before
        # the reply could not tell whether it now holds a lock, and a cleanup sent on another
        # connection might even overtake it. So the command is seen through (bounded by its
        # deadline) and the cancellation is raised after it.
        # The caller awaits its reply's future itself (a shield would cost every caller a loop
        # turn and split the next batch); once cancelled, the batcher hands what the command
        # got to ``outcome``, if it was sent.
        pending = self._eviction.pending or self._native.pending
        if not pending and self._native.pick(step) is None and self._batcher.idle():
            return await self._lone_seen_through(step, report)
        request = self._with_checks(step) if pending else self._batcher.request(step)
        assert request.future is not None
        try:
            return await request.future
        except asyncio.CancelledError:
            outcome = self._batcher.outcome(request)
            if outcome is not None:
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([outcome])
                if not outcome.cancelled():
                    error = outcome.exception()
                    report(outcome.result() if error is None else error)
            raise

    async def _lone_seen_through(self, step: Eval | Call, report: Callable[[Any], object]) -> Any:
        # Nothing else under way: sent from the caller's own task, no task of its own. Cut
        # short once on the wire, the sender reads the reply off this path (Request.salvage)
        # and the cancellation is raised once it is in, as on the batched path.
        request = Request(step, salvage=True)
        try:
            return await self._batcher.inline(request)
        except asyncio.CancelledError:
            late = request.late
            if late is not None:
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([late])
                error = late.exception()
                report(late.result() if error is None else error)
            raise

    async def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching the glob ``match`` (SCAN, never KEYS; every primary of a
        cluster), as text."""
        if running_loop() is None:
            async for key in self.elsewhere().scan(match, count):
                yield key
            return
        try:
            async for key in self.client.scan_iter(match=match, count=count):
                yield key.decode() if isinstance(key, bytes) else key
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    async def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` (UNLINK); returns how many existed."""
        if not keys:
            return 0
        if running_loop() is None:
            return await self.elsewhere().unlink(keys)
        try:
            return int(await self.client.unlink(*keys))
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    async def aclose(self) -> None:
        """Close the client and its connections, once the batches under way are answered."""
        if running_loop() is None:
            if self._streams is not None:
                await self._streams.aclose()
            return
        # A batch still waiting for a connection would otherwise take one after the pool
        # closed, open it afresh and leave it open.
        await self._batcher.drain()
        await aclose_client(self.client, self._sender.nodes_seen.values())
        # And any connection of ours the pool no longer lists (one it let go in a failover).
        for connection in list(self._sender.used):
            with contextlib.suppress(rex.RedisError, OSError):
                await connection.disconnect()


def _after_fork_in_child() -> None:
    for executor in list(_live):
        executor.after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
