"""RateLimitedTask: fleet-wide rate and concurrency limits, checked when a run starts."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..backends import RedisBackend
from ..core import admission
from ..core.lifecycle import Event
from ..core.messages import BOOKED_HEADER, SLOT_HEADER
from ..core.rates import RateLimit, as_limits
from ..errors import BackendError, LockNotOwnedError
from ..limiters import RateLimiter
from ..locks import Semaphore
from .base import RedisTask, arguments_key, defer
from .settings import (
    DEFAULT_LEASE,
    DEFAULT_MAX_WAIT,
    Setting,
    check_count,
    check_seconds,
    from_task,
)

logger = logging.getLogger("celery_unique")

__all__ = ["RateConfig", "RateLimitedTask"]

# Where RateLimitedTask reads each setting: the task option, then app.conf.
_SOURCES: dict[str, tuple[str | None, str | None]] = {
    "limit": ("global_rate_limit", "unique_global_rate_limit"),
    "key": ("rate_limit_key", None),
    "max_wait": ("rate_limit_max_wait", "unique_rate_limit_max_wait"),
    "concurrency": ("concurrency_limit", None),
    "concurrency_key": ("concurrency_key", None),
    "lease": ("unique_lease", "unique_lease"),
}


class RateLimitedTask(RedisTask):
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
      still waiting for its countdown is delivered again;
    * ``concurrency_limit``: at most this many runs at once, fleet-wide, per
      ``concurrency_key`` (``None``: one count per task; argument names or a callable, as for
      ``rate_limit_key``). A run over the limit is deferred (same id, no retry used, a unique
      lock kept) to its turn in a first-come-first-served queue, spaced by how long runs
      typically take; its slot is freed when it ends however it ends (success, failure,
      ``Ignore``/``Reject``, revoke, time limit, lost child) and by its lease
      (``unique_lease``, default 30 s, renewed while it runs) if the worker dies.

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
    Booked runs start at their slot by the workers' clocks: keep them in sync (NTP); a copy
    that arrives before its slot waits for it, or is deferred again, never runs early (on
    RabbitMQ with quorum queues a deferral is rounded up to whole seconds: see
    :func:`~celery_unique.celery.base.whole_seconds`).
    """

    global_rate_limit: ClassVar[Any] = None
    rate_limit_key: ClassVar[Any] = None
    rate_limit_max_wait: ClassVar[float | None] = None
    concurrency_limit: ClassVar[int | None] = None
    concurrency_key: ClassVar[Any] = None

    def rate_setting(self, name: str) -> Setting | None:
        """The configured value of setting ``name`` (``limit``, ``key``, ``max_wait``,
        ``concurrency``, ``concurrency_key``, ``lease``) and where it was set, ``None`` if
        unset: the task's options, then ``app.conf``."""
        option, conf_key = _SOURCES[name]
        return from_task(self, option, conf_key)

    @functools.cached_property
    def rate_config(self) -> RateConfig:
        """This task's resolved settings (read on first use)."""
        return RateConfig.resolve(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        # The cheaper limit to give back first: a deferral by the rate limit frees the slot,
        # while a slot refused costs no rate-limit token.
        running = self._take_run_slot(args, kwargs)
        try:
            # A copy carrying its booking runs at its slot: the slot was taken when it was
            # deferred, and a broker's redelivery of that copy must not book (or be refused)
            # a second time.
            booking = getattr(request, BOOKED_HEADER, None)
            if admission.booked(booking, request.retries):
                self._await_slot(booking)
            else:
                self._take_slot(args, kwargs)
            return super().__call__(*args, **kwargs)
        finally:
            if running is not None:
                self._free_run_slot(running)

    def _take_run_slot(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Semaphore | None:
        """A slot of the concurrency limit for this run, or defer the instance (raises Retry)."""
        slot = self.rate_config.run_slot(args, kwargs, self.request.id)
        if slot is None:
            return None
        deferral = admission.concurrency(slot.acquire(blocking=False), slot.retry_after)
        if deferral is not None:
            defer(self, deferral)
        return slot

    def free_ended_instance(
        self, task_id: str, request: Any, args: Any, kwargs: Any, event: Event
    ) -> None:
        """Free the concurrency slot of an instance the main process saw revoked, expired
        or killed (its token is the task id)."""
        super().free_ended_instance(task_id, request, args, kwargs, event)
        if self.rate_config.concurrency is None:
            return
        try:
            slot = self.rate_config.run_slot(args or (), kwargs or {}, task_id)
            if slot is not None:
                slot.release()  # owner-checked: only the slot of this task id
        except LockNotOwnedError:
            pass  # it held none (it had not started, or its lease ended)
        except Exception:  # arguments that no longer bind, Redis down: the lease frees it
            logger.warning(
                "could not free the concurrency slot of %s[%s]", self.name, task_id, exc_info=True
            )

    def _free_run_slot(self, slot: Semaphore) -> None:
        try:
            slot.release()
        except LockNotOwnedError:
            pass  # its lease ended (a stalled worker): nothing of ours to free
        except BackendError:
            logger.warning(
                "could not free the concurrency slot of %s[%s]; it frees within %.0f s",
                self.name, self.request.id, slot.ttl, exc_info=True,
            )  # fmt: skip

    def _await_slot(self, booking: Any) -> None:
        """A booked copy that came before its slot (the transport rounded its countdown, a
        clock drifted): wait if the slot is near, else defer to it (raises Retry)."""
        early = admission.arrived(getattr(self.request, SLOT_HEADER, None), booking, time.time())
        if isinstance(early, admission.Wait):
            time.sleep(early.seconds)
        elif early is not None:
            defer(self, early)

    def _take_slot(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Book this run's slot: return if it is now, else defer the instance (raises Retry)."""
        rated = self.rate_config
        limits = rated.limits(args, kwargs)
        if limits is None:
            return
        horizon = rated.max_wait
        slot = rated.limiter(limits).reserve(rated.key(args, kwargs), max_wait=horizon)
        deferral = admission.rate(slot, horizon, self.request.retries, time.time())
        if deferral is not None:
            defer(self, deferral)


@dataclass(frozen=True, slots=True)
class RateConfig:
    """A rate-limited task's resolved settings (``backend`` is ``None`` without any limit: a
    task that limits nothing needs no Redis)."""

    backend: RedisBackend | None
    static: tuple[RateLimit, ...] | None
    dynamic: Callable[..., Any] | None
    key: Callable[[Sequence[Any], Mapping[str, Any]], str]
    max_wait: float
    concurrency: int | None = None
    concurrency_key: Callable[[Sequence[Any], Mapping[str, Any]], str] | None = None
    lease: float = DEFAULT_LEASE
    _limiters: dict[tuple[str, ...], RateLimiter] = field(default_factory=dict)

    @classmethod
    def resolve(cls, task: RateLimitedTask) -> RateConfig:
        found = task.rate_setting("limit")
        spec = None if found is None else found.value
        key = task.rate_setting("key")
        max_wait = task.rate_setting("max_wait") or Setting(DEFAULT_MAX_WAIT, "the default")
        concurrency = task.rate_setting("concurrency")
        limit = None if concurrency is None else check_count(concurrency)
        conc_key = task.rate_setting("concurrency_key")
        lease = task.rate_setting("lease") or Setting(DEFAULT_LEASE, "the default")
        return cls(
            backend=None if spec is None and limit is None else task.redis_backend(),
            static=None if spec is None or callable(spec) else as_limits(spec),
            dynamic=spec if callable(spec) else None,
            key=_rate_key(task, None if key is None else key.value),
            max_wait=check_seconds(max_wait),
            concurrency=limit,
            concurrency_key=_rate_key(task, None if conc_key is None else conc_key.value),
            lease=check_seconds(lease),
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

    def run_slot(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str
    ) -> Semaphore | None:
        """The concurrency slot a run of ``task_id`` would hold (``None``: no limit). Its
        token is the task id, so the worker's main process can free it too."""
        if self.concurrency is None or self.backend is None or self.concurrency_key is None:
            return None
        return self.backend.semaphore(
            self.concurrency_key(args, kwargs),
            self.concurrency,
            self.lease,
            token=task_id,
            auto_renew=True,
            queue=True,
        )


def _rate_key(task: RedisTask, option: Any) -> Callable[[Sequence[Any], Mapping[str, Any]], str]:
    if option is None:
        name = f"task:{task.name}"
        return lambda args, kwargs: name
    if callable(option):
        return lambda args, kwargs: str(option(*args, **kwargs))
    # A list of argument names: hashed like unique keys, so no value appears in Redis.
    return arguments_key(task, option)
