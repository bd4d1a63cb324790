"""The asyncio executor: the core's steps on a ``redis.asyncio`` client, batched.

The pieces: :class:`~.batching.Batcher` decides which commands share a round trip,
:class:`~.sender.BatchSender` carries a batch over one pooled connection, and this module drives
the core's flows over them. Every operation ends within its deadline, as the sync executor's do.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import anyio
import redis.exceptions as rex

from ..core.steps import Call, Eval, Flow, Op, Sleep, Step
from ..errors import BackendError, BackendUnavailable
from .batching import Batcher, Request
from .connections import aclose_client, deadline_of
from .errors import backend_error
from .policy import EvictionCheck
from .sender import BatchSender

__all__ = ["AsyncRedisExecutor"]

T = TypeVar("T")
# Executors alive in this process, for the fork hook below.
_live: weakref.WeakSet[AsyncRedisExecutor] = weakref.WeakSet()


class AsyncRedisExecutor:
    """Carries out the core's operations and flows on an asyncio redis-py client.

    ``timeout``: seconds one operation may take, connecting and waiting for a pooled connection
    included (default: the client's ``socket_timeout``, else 2 s). ``read_streams=False``
    reads every reply through redis-py's ``read_response`` (see :mod:`.sender`). Implements
    :class:`~.protocol.AsyncExecutor`.
    """

    def __init__(
        self, client: Any, *, timeout: float | None = None, read_streams: bool = True
    ) -> None:
        self.client = client
        self.timeout = deadline_of(client, timeout)
        self._sender = BatchSender(client, self.timeout, read_streams=read_streams)
        self._batcher = Batcher(self._sender)
        self._eviction = EvictionCheck()
        _live.add(self)

    def after_fork(self) -> None:
        """In a forked child (run by itself, :func:`os.register_at_fork`): forget the
        parent's connections and batches, so that the child opens its own. redis-py's
        asyncio pools, unlike its sync ones, do not do this on a change of process."""
        self._sender.forget_connections()
        self._batcher.forget()

    async def execute(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        if self._eviction.pending:
            return op.parse(await self._checked(op.step))
        return op.parse(await self._batcher.one(op.step))

    def _with_policy_check(self, step: Eval | Call) -> Request:
        # The first command takes the eviction policy check along in its own batch: no
        # round trip of its own, no caller waits for it, and its answer is read by a callback.
        if not self._eviction.claim():
            return self._batcher.request(step)
        check, request = self._batcher.request_all((EvictionCheck.step, step))
        assert check.future is not None
        check.future.add_done_callback(self._policy_read)
        return request

    async def _checked(self, step: Eval | Call) -> Any:
        future = self._with_policy_check(step).future
        assert future is not None
        return await future

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
        try:
            step: Step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    if on_cancelled is not None:
                        reply = await self._seen_through(step, on_cancelled)
                    elif self._eviction.pending:
                        reply = await self._checked(step)
                    else:
                        reply = await self._batcher.one(step)
                except BackendError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            flow.close()

    async def _seen_through(self, step: Eval | Call, report: Callable[[Any], object]) -> Any:
        # Once a command is on the wire Redis runs it, read or not. A caller cancelled before
        # the reply could not tell whether it now holds a lock, and a cleanup sent on another
        # connection might even overtake it. So the command is seen through (bounded by its
        # deadline) and the cancellation is raised after it.
        # The caller awaits its reply's future itself (a shield would cost every caller a loop
        # turn and split the next batch); once cancelled, the batcher hands what the command
        # got to ``outcome``, if it was sent.
        pending = self._eviction.pending
        request = self._with_policy_check(step) if pending else self._batcher.request(step)
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

    async def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching the glob ``match`` (SCAN, never KEYS; every primary of a
        cluster), as text."""
        try:
            async for key in self.client.scan_iter(match=match, count=count):
                yield key.decode() if isinstance(key, bytes) else key
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    async def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` (UNLINK); returns how many existed."""
        if not keys:
            return 0
        try:
            return int(await self.client.unlink(*keys))
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    async def aclose(self) -> None:
        """Close the client and its connections, once the batches under way are answered."""
        # A batch still waiting for a connection would otherwise take one after the pool
        # closed, open it afresh and leave it open.
        await self._batcher.drain()
        await aclose_client(self.client, self._sender.nodes_seen.values())


def _after_fork_in_child() -> None:
    for executor in list(_live):
        executor.after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
