"""The async executor's scheduler: commands of concurrent callers share round trips.

Callers that submit before the event loop turns share a batch: its commands go out in one
write on one pooled connection and their replies come back in one read, which is what lets
one Python process keep up with Redis. A batch that reaches half of the commands waiting (8 to
32) leaves at once, so that several are under way together: Redis runs one while Python reads
the replies of another, instead of each side idling while the other works (at 64 callers ~1.5x
the decisions/s of one batch at a time; smaller batches cost more per command than they gain).

Each caller gets exactly the reply, or the error, its own command would have got alone; one
cancelled before its batch leaves has its command dropped, as if it had never been sent. With
nothing else under way a command goes straight out from the caller's own task: a lone caller
pays nothing for the batching. What a batch does on the wire is the sender's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.steps import Call, Eval

__all__ = ["Batcher", "Request", "Sender"]

BATCH_MIN, BATCH_MAX = 8, 32


class Request:
    """A step waiting for its reply, and the caller waiting for it (``None``: the caller
    sends it from its own task)."""

    __slots__ = ("future", "step")

    def __init__(self, step: Eval | Call, future: asyncio.Future[Any] | None = None) -> None:
        self.step = step
        self.future = future

    def cancelled(self) -> bool:
        """Whether the caller gave up: its step need not be sent any more."""
        return self.future is not None and self.future.cancelled()


#: Sends a batch and returns one reply (or the error its caller gets) per request, skipping
#: requests cancelled by then (their place holds anything); raises when the batch as a whole
#: failed, and every caller of it gets that error.
Sender = Callable[[list[Request]], Awaitable[list[Any]]]


class Batcher:
    """Gathers the steps submitted on each event loop into batches for ``send``."""

    def __init__(self, send: Sender) -> None:
        self._send = send
        self._pending: dict[asyncio.AbstractEventLoop, list[Request]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # round trips under way (lone calls and batches)
        self._waiting = 0  # steps in batches, pending or in flight

    async def one(self, step: Eval | Call) -> Any:
        """The reply to ``step``: sent at once when nothing else is under way, else batched."""
        if self._in_flight or self._pending:
            return await self.submit(step)
        self._in_flight += 1
        try:
            (reply,) = await self._send([Request(step)])
        finally:
            self._in_flight -= 1
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def submit(self, step: Eval | Call) -> asyncio.Future[Any]:
        """Queue ``step`` for the next batch; a future of its reply."""
        (future,) = self.submit_all((step,))
        return future

    def submit_all(self, steps: tuple[Eval | Call, ...]) -> list[asyncio.Future[Any]]:
        """Queue ``steps`` for the next batch, all in the same one; futures of their replies."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in steps]
        requests = [Request(step, future) for step, future in zip(steps, futures, strict=True)]
        self._waiting += len(requests)
        batch = self._pending.get(loop)
        if batch is None:
            if not self._in_flight:
                # Nothing under way to share a round trip with: send at once, no loop turn.
                self._start(loop, requests)
                return futures
            batch = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        batch.extend(requests)
        if len(batch) >= min(BATCH_MAX, max(BATCH_MIN, self._waiting // 2)):
            self._pending[loop] = []
            self._start(loop, batch)
        return futures

    def forget(self) -> None:
        """Drop every batch and count as they stand (in a forked child: the parent's, whose
        tasks belong to an event loop the child does not run)."""
        self._pending.clear()
        self._sending.clear()
        self._in_flight = self._waiting = 0

    async def drain(self) -> None:
        """Wait until every batch of the running loop has been answered."""
        loop = asyncio.get_running_loop()
        while True:
            if sending := [task for task in self._sending if task.get_loop() is loop]:
                await asyncio.wait(sending)
            elif loop in self._pending:
                await asyncio.sleep(0)  # a batch is due to leave this loop iteration
            else:
                return

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, None)
        if batch:
            self._start(loop, batch)

    def _start(self, loop: asyncio.AbstractEventLoop, batch: list[Request]) -> None:
        self._in_flight += 1
        task = loop.create_task(self._settle(batch))
        self._sending.add(task)  # a strong reference until it is done
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight -= 1

    async def _settle(self, batch: list[Request]) -> None:
        """Send ``batch`` and give each caller its reply or error."""
        size = len(batch)
        try:
            batch = [request for request in batch if not request.cancelled()]  # gave up already
            if not batch:
                return
            try:
                replies = await self._send(batch)
            except BaseException as exc:
                for request in batch:
                    _settle(request.future, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for request, reply in zip(batch, replies, strict=True):
                _settle(request.future, reply)
        finally:
            self._waiting -= size


def _settle(future: asyncio.Future[Any] | None, reply: Any) -> None:
    if future is None or future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
