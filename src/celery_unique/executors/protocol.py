"""The I/O boundary: what locks, limiters and the Celery layer need from an executor.

An executor carries out the core's steps on Redis and decides nothing. Two implementations,
:class:`~.sync.RedisExecutor` and :class:`~.aio.AsyncRedisExecutor`, run on redis-py; a fake one
that records steps is enough to test anything above the core. The contract:

* ``execute(op)`` sends one step, reads its reply and returns ``op.parse(reply)``;
* ``run(flow)`` drives a flow: each step's reply (or the :class:`BackendError` it caused) is
  sent (thrown) into the flow; :class:`~celery_unique.core.steps.Sleep` is waited out;
* every operation ends within ``timeout`` seconds (or the sooner deadline its step names),
  raising :class:`BackendUnavailable` when Redis did not answer in time, with
  ``outcome_unknown`` set when the command had been sent;
* a step is sent twice only where it cannot have run the first time, or running it twice is
  harmless (``Script.idempotent``); NOSCRIPT loads the script and sends the step again;
* a script step that carries native alternatives may be sent as one of them, as
  :class:`~.policy.NativeCommands` picks; the result and the errors are the script's;
* errors are the library's (:mod:`celery_unique.errors`), chained from redis-py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from ..core.steps import Flow, Op

__all__ = ["AsyncExecutor", "Executor"]

T = TypeVar("T")


class Executor(Protocol):
    """Carries out the core's operations synchronously; see the module docstring."""

    #: The redis-py client underneath (``None`` for an executor without one).
    client: Any
    #: Seconds one operation may take at most.
    timeout: float

    def execute(self, op: Op[T]) -> T:
        """Send ``op``'s step and return its parsed reply."""

    def run(self, flow: Flow[T], *, sleep: Callable[[float], object] = ...) -> T:
        """Drive ``flow`` to its result; ``sleep`` waits out its sleeps."""

    def scan(self, match: str, count: int = 1000) -> Iterator[str]:
        """Every key matching the glob ``match``, on every primary."""

    def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; how many existed."""

    def close(self) -> None:
        """Release the connections."""


class AsyncExecutor(Protocol):
    """Carries out the core's operations with ``await``; see the module docstring."""

    client: Any
    timeout: float

    async def execute(self, op: Op[T]) -> T:
        """Send ``op``'s step and return its parsed reply."""

    async def run(self, flow: Flow[T], *, on_cancelled: Callable[[Any], object] | None = None) -> T:
        """Drive ``flow`` to its result; with ``on_cancelled`` a cancellation waits for the
        command in flight and hands ``on_cancelled`` its reply (or error) before it is raised."""

    def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching the glob ``match``, on every primary."""

    async def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; how many existed."""

    async def aclose(self) -> None:
        """Release the connections."""
