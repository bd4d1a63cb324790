"""Celery integration: :class:`RateLimitedTask`, a fleet-wide rate limit checked at run start."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery import Task

from ._backend import RedisBackend
from ._keys import ArgumentKey
from ._limits import RateLimit
from ._ratelimit import RateLimiter, as_limits
from ._tasks import _static_option, backend_for, defer

__all__ = ["RateLimitedTask"]


class RateLimitedTask(Task):  # type: ignore[misc]
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
      name (which tasks may share, e.g. ``"partner-api"``).

    The check happens when a run starts. An instance over the limit is deferred by the wait
    the bucket names plus jitter: same task id, same retry count, options untouched; with
    :class:`UniqueTask` (``class T(UniqueTask, RateLimitedTask)``) it keeps its unique lock.
    """

    global_rate_limit: ClassVar[Any] = None
    rate_limit_key: ClassVar[Any] = None

    @functools.cached_property
    def _rated(self) -> _Rated:
        return _Rated.resolve(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not (request.called_directly or request.is_eager):
            rated = self._rated
            limits = rated.limits(args, kwargs)
            if limits is not None:
                decision = rated.limiter(limits).hit(rated.key(args, kwargs))
                if not decision.allowed:
                    # Jitter spreads deferred instances so they do not all return at once.
                    wait = decision.retry_after
                    defer(self, wait + random.uniform(0, min(1.0, wait)), "rate limited")
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True, slots=True)
class _Rated:
    """A rate-limited task's resolved settings."""

    backend: RedisBackend
    static: tuple[RateLimit, ...] | None
    dynamic: Callable[..., Any] | None
    key: Callable[[Sequence[Any], Mapping[str, Any]], str]
    _limiters: dict[tuple[str, ...], RateLimiter] = field(default_factory=dict)

    @classmethod
    def resolve(cls, task: Task) -> _Rated:
        spec = _static_option(task, "global_rate_limit")
        if spec is None:
            spec = task.app.conf.get("unique_global_rate_limit")
        static = None if spec is None or callable(spec) else as_limits(spec)
        return cls(
            backend=backend_for(task.app),
            static=static,
            dynamic=spec if callable(spec) else None,
            key=_rate_key(task, _static_option(task, "rate_limit_key")),
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
            limiter = self._limiters[specs] = self.backend.rate_limiter(limits)
        return limiter


def _rate_key(task: Task, option: Any) -> Callable[[Sequence[Any], Mapping[str, Any]], str]:
    if option is None:
        name = f"task:{task.name}"
        return lambda args, kwargs: name
    if callable(option):
        return lambda args, kwargs: str(option(*args, **kwargs))
    # A list of argument names: hashed like unique keys, so no value appears in Redis.
    return ArgumentKey(task.name, task.run, option)
