"""Fleet-wide rate limiters: :class:`RateLimiter` and :class:`AsyncRateLimiter`, side by side.

A token bucket per key lives in Redis, so every worker, process and host shares it (Celery's
own ``rate_limit`` is counted per worker). Several limits (per second and per hour, or
requests and tokens) are decided together in one atomic command. Besides taking tokens now
(``hit``), a caller can book them for the earliest moment every limit has them (``reserve``):
callers are then served in the order they asked, each told exactly how long to wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from .core import buckets
from .core.keys import KeySpace
from .core.rates import LimitSpec, as_limits
from .core.results import Decision, Reservation

if TYPE_CHECKING:
    from .executors import AsyncExecutor, Executor

__all__ = ["AsyncRateLimiter", "RateLimiter"]

E = TypeVar("E", "Executor", "AsyncExecutor")


class _LimiterBase(Generic[E]):
    def __init__(self, executor: E, keys: KeySpace, limits: LimitSpec) -> None:
        self._executor: E = executor
        self._keyspace = keys
        self.limits = as_limits(limits)
        self._specs = tuple(limit.spec for limit in self.limits)

    def _keys(self, key: str) -> tuple[str, ...]:
        return self._keyspace.rate(key, self._specs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {', '.join(map(str, self.limits))}>"


class RateLimiter(_LimiterBase["Executor"]):
    """A token bucket per key, shared by every process on the same Redis.

    ::

        limiter = backend.rate_limiter(RateLimit("10/s", burst=20))
        if limiter.hit("customer:7").allowed: ...
        limiter.wait("customer:7")   # sleeps until its booked slot
        slot = limiter.reserve("customer:7", max_wait=30)   # or book one and go later
    """

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if every limit has them; one command."""
        return self._executor.execute(buckets.hit(self._keys(key), self.limits, cost))

    def reserve(self, key: str, cost: int = 1, *, max_wait: float) -> Reservation:
        """Book ``cost`` tokens for the earliest moment every limit has them, if that is within
        ``max_wait`` seconds; one command. The caller goes after ``delay`` seconds.

        Slots are handed out in the order callers ask (first come, first served), and a
        booked slot is spent even if never used. ``max_wait=0`` decides like :meth:`hit`.
        """
        return self._executor.execute(
            buckets.reserve(self._keys(key), self.limits, cost, max_wait=max_wait)
        )

    def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Book the earliest slot and sleep until it: one command, one sleep, no polling.

        :class:`RateLimitExceeded` at once (nothing taken) when the slot is beyond
        ``timeout`` seconds. A wait interrupted after booking has spent its slot.
        """
        return self._executor.run(buckets.wait(self._keys(key), self.limits, cost, timeout=timeout))


class AsyncRateLimiter(_LimiterBase["AsyncExecutor"]):
    """The async twin of :class:`RateLimiter` (asyncio or trio): same methods, awaited."""

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if every limit has them; one command."""
        return await self._executor.execute(buckets.hit(self._keys(key), self.limits, cost))

    async def reserve(self, key: str, cost: int = 1, *, max_wait: float) -> Reservation:
        """Book ``cost`` tokens for the earliest moment every limit has them, if that is within
        ``max_wait`` seconds; one command. See :meth:`RateLimiter.reserve`."""
        return await self._executor.execute(
            buckets.reserve(self._keys(key), self.limits, cost, max_wait=max_wait)
        )

    async def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Book the earliest slot and sleep until it: one command, one sleep, no polling.

        :class:`RateLimitExceeded` at once (nothing taken) when the slot is beyond
        ``timeout`` seconds. A task cancelled after booking has spent its slot (the limit
        stays conservative: nobody else gets it).
        """
        return await self._executor.run(
            buckets.wait(self._keys(key), self.limits, cost, timeout=timeout)
        )
