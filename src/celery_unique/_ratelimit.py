"""Fleet-wide rate limiters: :class:`RateLimiter` and :class:`AsyncRateLimiter`, side by side.

A token bucket per key lives in Redis, so every worker, process and host shares it (Celery's
own ``rate_limit`` is counted per worker). Several limits (per second and per hour, or
requests and tokens) are decided together in one atomic command. Besides taking tokens now
(``hit``), a caller can book them for the earliest moment every limit has them (``reserve``):
callers are then served in the order they asked, each told exactly how long to wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from . import _core
from ._exceptions import ConfigurationError
from ._limits import RateLimit
from ._models import Decision, Reservation

if TYPE_CHECKING:
    from ._backend import AsyncRedisBackend, RedisBackend

__all__ = ["AsyncRateLimiter", "LimitSpec", "RateLimiter", "as_limits"]

B = TypeVar("B", "RedisBackend", "AsyncRedisBackend")

#: What a limit may be given as: a RateLimit, a Celery-style string, or a list of them.
LimitSpec = RateLimit | str | Sequence[RateLimit | str]


def as_limits(limits: LimitSpec) -> tuple[RateLimit, ...]:
    """Normalise one limit or several into RateLimit objects."""
    items = [limits] if isinstance(limits, RateLimit | str) else list(limits)
    if not items:
        raise ConfigurationError("give at least one rate limit")
    return tuple(item if isinstance(item, RateLimit) else RateLimit(item) for item in items)


class _LimiterBase(Generic[B]):
    def __init__(self, backend: B, limits: LimitSpec) -> None:
        self._backend: B = backend
        self.limits = as_limits(limits)
        self._specs = tuple(limit.spec for limit in self.limits)

    def _keys(self, key: str) -> tuple[str, ...]:
        return self._backend._keys.rate(key, self._specs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {', '.join(map(str, self.limits))}>"


class RateLimiter(_LimiterBase["RedisBackend"]):
    """A token bucket per key, shared by every process on the same Redis.

    ::

        limiter = backend.rate_limiter(RateLimit("10/s", burst=20))
        if limiter.hit("customer:7").allowed: ...
        limiter.wait("customer:7")   # sleeps until its booked slot
        slot = limiter.reserve("customer:7", max_wait=30)   # or book one and go later
    """

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if every limit has them; one command."""
        return self._backend._one(_core.hit(self._keys(key), self.limits, cost))

    def reserve(self, key: str, cost: int = 1, *, max_wait: float) -> Reservation:
        """Book ``cost`` tokens for the earliest moment every limit has them, if that is within
        ``max_wait`` seconds; one command. The caller goes after ``delay`` seconds.

        Slots are handed out in the order callers ask (first come, first served), and a
        booked slot is spent even if never used. ``max_wait=0`` decides like :meth:`hit`.
        """
        return self._backend._one(
            _core.reserve(self._keys(key), self.limits, cost, max_wait=max_wait)
        )

    def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Book the earliest slot and sleep until it: one command, one sleep, no polling.

        :class:`RateLimitExceeded` at once (nothing taken) when the slot is beyond
        ``timeout`` seconds. A wait interrupted after booking has spent its slot.
        """
        return self._backend._run(_core.wait(self._keys(key), self.limits, cost, timeout=timeout))


class AsyncRateLimiter(_LimiterBase["AsyncRedisBackend"]):
    """The asyncio twin of :class:`RateLimiter`: same methods, awaited."""

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s buckets if every limit has them; one command."""
        return await self._backend._one(_core.hit(self._keys(key), self.limits, cost))

    async def reserve(self, key: str, cost: int = 1, *, max_wait: float) -> Reservation:
        """Book ``cost`` tokens for the earliest moment every limit has them, if that is within
        ``max_wait`` seconds; one command. See :meth:`RateLimiter.reserve`."""
        return await self._backend._one(
            _core.reserve(self._keys(key), self.limits, cost, max_wait=max_wait)
        )

    async def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Book the earliest slot and sleep until it: one command, one sleep, no polling.

        :class:`RateLimitExceeded` at once (nothing taken) when the slot is beyond
        ``timeout`` seconds. A task cancelled after booking has spent its slot (the limit
        stays conservative: nobody else gets it).
        """
        return await self._backend._run(
            _core.wait(self._keys(key), self.limits, cost, timeout=timeout)
        )
