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
pays nothing for the batching. A command with a deadline sooner than the executor's (a
renewal's extend, the last attempt of a timed acquire) goes out at once in a batch of its own:
a batch has one deadline, and sharing would hold every other caller of it to the soonest. What
a batch does on the wire is the sender's business.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.steps import Call, Eval

__all__ = ["Batcher", "Request", "Sender"]

BATCH_MIN, BATCH_MAX = 8, 32


class Request:
    """A step waiting for its reply, and the caller waiting for it (``None``: the caller
    sends it from its own task).

    ``sent`` is set once the step is on the wire. A caller that gave up after that may still
    learn what it did (see :meth:`Batcher.outcome`): the reply is kept as ``answer``.
    ``salvage``: sent from its caller's own task (:meth:`Batcher.inline`), by a caller that,
    cancelled mid-command, still wants the reply: the sender then reads it off the caller's
    path and hands it to ``late``.
    """

    __slots__ = ("answer", "answered", "future", "late", "salvage", "sent", "since", "step")

    def __init__(
        self,
        step: Eval | Call,
        future: asyncio.Future[Any] | None = None,
        *,
        salvage: bool = False,
    ) -> None:
        self.step = step
        self.future = future
        self.salvage = salvage
        # When its caller asked (the loop's clock): its deadline runs from here, the wait
        # for a batch to leave included.
        self.since = time.monotonic()
        self.sent = False
        self.answered = False
        self.answer: Any = None
        self.late: asyncio.Future[Any] | None = None

    def answer_late(self, reply: Any) -> None:
        """Hand ``reply`` (or the error) to ``late``, the future of a caller that gave up
        after the send, if it asked for one and has no answer yet."""
        if self.late is not None and not self.late.done():
            _settle_future(self.late, reply)

    def cancelled(self) -> bool:
        """Whether the caller gave up: its step need not be sent any more."""
        return self.future is not None and self.future.cancelled()


#: Sends a batch and returns one reply (or the error its caller gets) per request, skipping
#: requests cancelled by then (their place holds anything); raises when the batch as a whole
#: failed, and every caller of it gets that error.
Sender = Callable[[list[Request]], Awaitable[list[Any]]]


class Batcher:
    """Gathers the steps submitted on each event loop into batches for ``send``;
    ``timeout``: the deadline ``send`` gives a batch whose steps ask for no sooner one."""

    def __init__(self, send: Sender, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._pending: dict[asyncio.AbstractEventLoop, list[Request]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # round trips under way (lone calls and batches)
        self._waiting = 0  # steps in batches, pending or in flight

    async def one(self, step: Eval | Call) -> Any:
        """The reply to ``step``: sent at once when nothing else is under way, else batched."""
        if self._in_flight or self._pending:
            return await self.submit(step)
        return await self.inline(Request(step))

    def idle(self) -> bool:
        """Whether nothing is under way or waiting: a command may go straight out."""
        return not (self._in_flight or self._pending)

    async def inline(self, request: Request) -> Any:
        """The reply to ``request``, sent at once from the caller's own task (no batch, no
        task, no loop turn): for when :meth:`idle`."""
        self._in_flight += 1
        try:
            (reply,) = await self._send([request])
        finally:
            self._in_flight -= 1
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def submit(self, step: Eval | Call) -> asyncio.Future[Any]:
        """Queue ``step`` for the next batch; a future of its reply."""
        future = self.request(step).future
        assert future is not None
        return future

    def request(self, step: Eval | Call) -> Request:
        """Queue ``step`` for the next batch; the request, whose future gets its reply."""
        (request,) = self.request_all((step,))
        return request

    def request_all(self, steps: tuple[Eval | Call, ...]) -> list[Request]:
        """Queue ``steps`` for the next batch, all in the same one; their requests."""
        loop = asyncio.get_running_loop()
        requests = [Request(step, loop.create_future()) for step in steps]
        self._waiting += len(requests)
        if any(step.timeout is not None and step.timeout < self._timeout for step in steps):
            self._start(loop, requests)  # a sooner deadline: a batch of its own (see above)
            return requests
        batch = self._pending.get(loop)
        if batch is None:
            if not self._in_flight:
                # Nothing under way to share a round trip with: send at once, no loop turn.
                self._start(loop, requests)
                return requests
            batch = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        batch.extend(requests)
        if len(batch) >= min(BATCH_MAX, max(BATCH_MIN, self._waiting // 2)):
            self._pending[loop] = []
            self._start(loop, batch)
        return requests

    @staticmethod
    def outcome(request: Request) -> asyncio.Future[Any] | None:
        """For a caller that gave up (its future cancelled): a future of the reply (or error)
        its step got, if the step was sent; ``None`` if it never was (and never will be)."""
        future = request.future
        if future is not None and future.done() and not future.cancelled():
            return future  # answered before the cancellation landed
        if not request.sent:
            return None
        if request.late is None:
            request.late = asyncio.get_running_loop().create_future()
            if request.answered:
                _settle_future(request.late, request.answer)
        return request.late

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

    async def _settle(self, batch: list[Request]) -> None:
        """Send ``batch`` and give each caller its reply or error."""
        size = len(batch)
        # Counted done before its callers wake: a caller's next command then goes straight
        # out when nothing else is under way, instead of in a batch of its own.
        done = False
        try:
            batch = [request for request in batch if not request.cancelled()]  # gave up already
            if not batch:
                return
            try:
                replies = await self._send(batch)
            except BaseException as exc:
                done = self._done(size)
                for request in batch:
                    _settle(request, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            done = self._done(size)
            for request, reply in zip(batch, replies, strict=True):
                _settle(request, reply)
        finally:
            if not done:
                self._done(size)

    def _done(self, size: int) -> bool:
        self._in_flight -= 1
        self._waiting -= size
        return True


def _settle(request: Request, reply: Any) -> None:
    future = request.future
    if future is None:
        return
    if future.done():  # the caller gave up: it may want to learn what the step did
        if request.sent:
            request.answered, request.answer = True, reply
            request.answer_late(reply)
        return
    _settle_future(future, reply)


def _settle_future(future: asyncio.Future[Any], reply: Any) -> None:
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
