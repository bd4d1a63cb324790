"""RateLimitedTask: a fleet-wide rate limit, a slot booked when a run starts."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..backends import RedisBackend
from ..core.arguments import ArgumentKey
from ..core.rates import RateLimit, as_limits
from ..limiters import RateLimiter
from .base import BOOKED_HEADER, BackedTask, defer
from .settings import DEFAULT_MAX_WAIT, Found, check_seconds, from_task

__all__ = ["RateConfig", "RateLimitedTask"]

# Where RateLimitedTask reads each setting: the task option, then app.conf.
_SOURCES: dict[str, tuple[str | None, str | None]] = {
    "limit": ("global_rate_limit", "unique_global_rate_limit"),
    "key": ("rate_limit_key", None),
    "max_wait": ("rate_limit_max_wait", "unique_rate_limit_max_wait"),
}


class RateLimitedTask(BackedTask):
    """A Celery task whose runs are limited fleet-wide, through a token bucket in Redis.

    ::

        @app.task(base=RateLimitedTask, global_rate_limit="2/m", rate_limit_key=["customer_id"])
        def call_partner_api(customer_id): ...

    Celery's own ``rate_limit`` is counted per worker; this one is shared by every worker.

    * ``global_rate_limit``: ``"N/s"``-style string, :class:`RateLimit`, a list of them (all
      must admit), or a callable taking the task's arguments and returning one (or ``None``
      for no limit);
    * ``rate_limit_key``: ``None`` (one bucket per task), a list of argument names (a bucket
      per their values), or a callable taking the task's arguments and returning the bucket
      name (which tasks may share, e.g. ``"partner-api"``);
    * ``rate_limit_max_wait`` (``app.conf.unique_rate_limit_max_wait``): how far ahead, in
      seconds, a run may book its slot (default 60). Keep it well below the broker's
      ``visibility_timeout`` (Redis broker: one hour by default), past which a message
      still waiting for its countdown is delivered again.

    When a run starts it books the earliest slot the limits have for it within
    ``rate_limit_max_wait`` (one Redis command): a slot now runs at once; a later slot defers
    the instance to exactly that moment, and the copy that comes back runs without a second
    check (its message says the slot is booked). Instances are thus served in the order they
    started, each deferred at most once, spaced by the limit itself. With no slot within the
    horizon nothing is booked: the instance is deferred to about when one could be, spread
    over up to half the horizon so that a backlog does not all come back at once, and books
    then. A deferral keeps the task id, the retry count (it uses none of ``max_retries`` up)
    and the options; with :class:`UniqueTask` (``class T(UniqueTask, RateLimitedTask)``) it
    keeps the unique lock. A booked slot whose instance is revoked meanwhile is spent.
    Booked runs start at their slot by the workers' clocks: keep them in sync (NTP).
    """

    global_rate_limit: ClassVar[Any] = None
    rate_limit_key: ClassVar[Any] = None
    rate_limit_max_wait: ClassVar[float | None] = None

    def rate_setting(self, name: str) -> Found | None:
        """The configured value of setting ``name`` (``limit``, ``key``, ``max_wait``) and
        where it was set, ``None`` if unset: the task's options, then ``app.conf``."""
        option, conf_key = _SOURCES[name]
        return from_task(self, option, conf_key)

    @functools.cached_property
    def rate_config(self) -> RateConfig:
        """This task's resolved settings (read on first use)."""
        return RateConfig.resolve(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        # A copy carrying its booking runs: its slot was taken when it was deferred, and a
        # broker's redelivery of that copy must not book (or be refused) a second time.
        if not (
            request.called_directly
            or request.is_eager
            or getattr(request, BOOKED_HEADER, None) == request.retries
        ):
            self._take_slot(args, kwargs)
        return super().__call__(*args, **kwargs)

    def _take_slot(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Book this run's slot: return if it is now, else defer the instance (raises Retry)."""
        rated = self.rate_config
        limits = rated.limits(args, kwargs)
        if limits is None:
            return
        horizon = rated.max_wait
        slot = rated.limiter(limits).reserve(rated.key(args, kwargs), max_wait=horizon)
        if not slot.reserved:
            # Every instance refused now sees about the same wait: spread them over half the
            # horizon, in which about that many slots come within reach.
            countdown = min(slot.retry_after, horizon / 2) + random.uniform(0, horizon / 2)
            defer(self, countdown, "rate limited", {BOOKED_HEADER: None})
        if slot.delay > 0:
            # No jitter: the bucket spaces the booked slots itself.
            booked = {BOOKED_HEADER: self.request.retries}
            defer(self, slot.delay, "rate limited: slot booked", booked)


@dataclass(frozen=True, slots=True)
class RateConfig:
    """A rate-limited task's resolved settings (``backend`` is ``None`` without a limit: a
    task that limits nothing needs no Redis)."""

    backend: RedisBackend | None
    static: tuple[RateLimit, ...] | None
    dynamic: Callable[..., Any] | None
    key: Callable[[Sequence[Any], Mapping[str, Any]], str]
    max_wait: float
    _limiters: dict[tuple[str, ...], RateLimiter] = field(default_factory=dict)

    @classmethod
    def resolve(cls, task: RateLimitedTask) -> RateConfig:
        found = task.rate_setting("limit")
        spec = None if found is None else found.value
        key = task.rate_setting("key")
        max_wait = task.rate_setting("max_wait") or Found(DEFAULT_MAX_WAIT, "the default")
        return cls(
            backend=None if spec is None else task.redis_backend(),
            static=None if spec is None or callable(spec) else as_limits(spec),
            dynamic=spec if callable(spec) else None,
            key=_rate_key(task, None if key is None else key.value),
            max_wait=check_seconds(max_wait),
        )

    def limits(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[RateLimit, ...] | None:
        if self.dynamic is None:
            return self.static
        spec = self.dynamic(*args, **kwargs)
        return None if spec is None else as_limits(spec)

    def limiter(self, limits: tuple[RateLimit, ...]) -> RateLimiter:
        specs = tuple(limit.spec for limit in limits)
        limiter = self._limiters.get(specs)
        if limiter is None:
            assert self.backend is not None  # limits come only with a limit configured
            limiter = self._limiters[specs] = self.backend.rate_limiter(limits)
        return limiter


def _rate_key(task: BackedTask, option: Any) -> Callable[[Sequence[Any], Mapping[str, Any]], str]:
    if option is None:
        name = f"task:{task.name}"
        return lambda args, kwargs: name
    if callable(option):
        return lambda args, kwargs: str(option(*args, **kwargs))
    # A list of argument names: hashed like unique keys, so no value appears in Redis.
    return ArgumentKey(task.name, task.run, option)
