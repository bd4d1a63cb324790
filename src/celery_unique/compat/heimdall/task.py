"""celery-heimdall's task base, helpers and rate limits on celery-unique's tasks."""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from celery import Task

from ... import AsyncRedisBackend, ConfigurationError, RedisBackend
from ... import RateLimit as _Limit
from ...celery import (
    RateLimitedTask,
    RedisTask,
    Setting,
    UniqueTask,
    arguments_key,
    backend_for,
    force_release,
    holder_id,
    key_prefix,
)
from .config import Config
from .errors import AlreadyQueuedError

#: How a call's arguments become a lock (or bucket) name.
_Naming = Callable[[Sequence[Any], Mapping[str, Any]], str]

__all__ = [
    "HeimdallTask",
    "RateLimit",
    "Strategy",
    "acquire_lock",
    "release_lock",
    "unique_key_for_task",
]


class Strategy(enum.Enum):
    """How a :class:`RateLimit` counts. There is one: a token bucket, atomic in Redis."""

    DEFAULT = 10


@dataclasses.dataclass
class RateLimit:
    """A fleet-wide rate limit for ``heimdall={"rate_limit": ...}``.

    ``rate_limit`` is ``(times, per)``: at most ``times`` runs at once, refilled evenly at
    ``times`` per ``per`` seconds. Or a callable returning that pair, called with any of
    the parameters it names: ``key`` (the bucket), ``task``, ``args``, ``kwargs``.
    """

    rate_limit: tuple[int, float] | Callable[..., tuple[int, float]]
    strategy: Strategy = Strategy.DEFAULT


def _limit(pair: object, task: Task) -> _Limit:
    """Our :class:`celery_unique.RateLimit` for heimdall's ``(times, per)``."""
    if not (isinstance(pair, tuple | list) and len(pair) == 2):
        raise ConfigurationError(
            f"the rate limit of task {task.name!r} must be a (times, per) pair, got {pair!r}"
        )
    times, per = pair
    return _Limit(times, per=per)


def unique_key_for_task(
    task: Task, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, prefix: str = ""
) -> str:
    """The lock (or bucket) name of a call: ``prefix`` plus the ``key`` option's value.

    Without a ``key`` option: the task name and a digest of its arguments, bound to its
    signature (so ``f(1)`` and ``f(x=1)`` are one key).
    """
    option = (getattr(task, "heimdall", None) or {}).get("key")
    args, kwargs = list(args or ()), dict(kwargs or {})
    if option is None:
        digest = task.argument_key if isinstance(task, HeimdallTask) else arguments_key(task)
        return prefix + digest(tuple(args), kwargs)
    key = option(args, kwargs) if callable(option) else option
    if not isinstance(key, str):
        raise ConfigurationError(
            f"the heimdall 'key' of task {task.name!r} must be a str or a function of "
            f"(args, kwargs) returning one, got {key!r}"
        )
    return prefix + key


def _backend(task: Task) -> RedisBackend:
    if isinstance(task, RedisTask):
        return task.redis_backend()
    return backend_for(task.app)


def acquire_lock(task: Task, key: str, timeout: float, *, task_id: str) -> bool:
    """Take lock ``key`` for ``timeout`` seconds as ``task_id``, or raise
    :class:`AlreadyQueuedError` naming its holder. Never waits."""
    got = _backend(task).acquire_or_owner(key, task_id, timeout)
    if not got.acquired:
        raise AlreadyQueuedError(
            expires_in=None if got.ttl is None else math.ceil(got.ttl),
            likely_culprit=holder_id(got.owner),
        )
    return True


def release_lock(task: Task, key: str) -> None:
    """Delete lock ``key`` whoever holds it: an administrative reset, as in celery-heimdall."""
    force_release(_backend(task), key)


#: Every key the ``heimdall`` task option may hold.
OPTIONS = frozenset(
    {
        "unique",
        "unique_timeout",
        "unique_raises",
        "unique_wait_for_expiry",
        "key",
        "rate_limit",
        "times",
        "per",
        "lock_prefix",
        "rate_limit_prefix",
        "unique_lock_blocking",
        "unique_lock_timeout",
    }
)


class HeimdallTask(UniqueTask, RateLimitedTask):
    """celery-heimdall's task base: ``heimdall={...}`` turns on uniqueness and rate limits.

    * ``unique``: one instance per key, queued or running; a duplicate gets the holder's
      ``AsyncResult``, or with ``unique_raises`` an :class:`AlreadyQueuedError`;
    * ``unique_timeout``: seconds from queueing after which the lock is gone even if the
      task still runs (default 1 h); a dead worker's lock goes within ``unique_lease``;
    * ``unique_wait_for_expiry``: keep the lock after the run until ``unique_timeout``;
    * ``key``: the lock and bucket name, a string or ``lambda args, kwargs: ...``;
    * ``rate_limit``: a :class:`RateLimit`, or ``times`` and ``per``; shared by the whole
      task, or per ``key`` when one is given. A run over the limit is deferred (same id,
      ``max_retries`` untouched), not failed;
    * ``lock_prefix``, ``rate_limit_prefix``, ``unique_raises``, ``unique_timeout`` may also
      be set app-wide as ``app.conf.heimdall_<name>``.

    Redis is the app's (``unique_backend_url``, else the result backend, else the broker),
    unless a subclass overrides :meth:`setup_redis`.
    """

    heimdall: ClassVar[dict[str, Any]] = {}

    @functools.cached_property
    def heimdall_config(self) -> Config:
        """This task's settings."""
        return Config(self.app, task=self)

    def setup_redis(self) -> Any:
        """The redis-py client for this task's locks; override to use another Redis."""
        return backend_for(self.app).client

    @property
    def heimdall_redis(self) -> Any:
        """The redis-py client this task's locks and limits live in."""
        return self.redis_backend().client

    def redis_backend(self) -> RedisBackend:
        """The app's backend, or one on the client an overridden :meth:`setup_redis` gives."""
        if type(self).setup_redis is HeimdallTask.setup_redis:
            return super().redis_backend()
        return self._own_backend

    def async_redis_backend(self) -> AsyncRedisBackend | None:
        """The app's asyncio backend; ``None`` when :meth:`setup_redis` gives a client of
        its own (``aapply_async`` then runs in a publisher thread)."""
        if type(self).setup_redis is HeimdallTask.setup_redis:
            return super().async_redis_backend()
        return None

    @functools.cached_property
    def _own_backend(self) -> RedisBackend:
        return RedisBackend(self.setup_redis(), key_prefix=key_prefix(self.app))

    @functools.cached_property
    def argument_key(self) -> _Naming:
        """The digest of a call's arguments, bound to the signature (without a ``key``)."""
        return arguments_key(self)

    @functools.cached_property
    def _options(self) -> dict[str, Any]:
        """The ``heimdall`` option, checked: a misspelt key would silently do nothing."""
        options = self.heimdall
        if not isinstance(options, Mapping):
            raise ConfigurationError(
                f"the heimdall option of task {self.name!r} must be a dict, got {options!r}"
            )
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown heimdall option(s) {unknown} on task {self.name!r}; known: "
                f"{sorted(OPTIONS)}"
            )
        if ("times" in options) != ("per" in options):
            raise ConfigurationError(
                f"heimdall 'times' and 'per' of task {self.name!r} go together; or use "
                "'rate_limit': RateLimit((times, per))"
            )
        return dict(options)

    def unique_setting(self, name: str) -> Setting | None:
        """celery-heimdall's settings first: ``unique`` (without it the task takes no lock
        at all), ``unique_timeout`` (a hard TTL), ``unique_raises``,
        ``unique_wait_for_expiry``; then ``unique_lease`` and the rest."""
        conf, where = self.heimdall_config, f"the heimdall option of task {self.name!r}"
        if name == "enabled":
            return Setting(bool(self._options.get("unique")), where)
        if name == "ttl":
            return Setting(conf.unique_timeout, f"unique_timeout ({where}, or heimdall_*)")
        if name == "hard_ttl":
            return Setting(True, "celery-heimdall's behaviour")
        if name == "until":
            keep = bool(self._options.get("unique_wait_for_expiry"))
            return Setting("expired" if keep else "executed", where)
        if name == "on_duplicate":
            return Setting("raise" if conf.unique_raises else "return", where)
        return super().unique_setting(name)

    def unique_key_function(self) -> _Naming:
        """The ``key`` option, or the arguments' digest, after ``lock_prefix``."""
        prefix = self.heimdall_config.lock_prefix
        return lambda args, kwargs: unique_key_for_task(self, args, kwargs, prefix=prefix)

    def rate_setting(self, name: str) -> Setting | None:
        """``rate_limit`` (or ``times`` and ``per``), bucketed by ``key`` when given."""
        where = f"the heimdall option of task {self.name!r}"
        if name == "limit":
            limit = self._limit_spec()
            return None if limit is None else Setting(limit, where)
        if name == "key":  # a function of the task's arguments, as rate_limit_key takes
            return Setting(lambda *args, **kwargs: self._bucket(args, kwargs), where)
        return super().rate_setting(name)

    def _limit_spec(self) -> Any:
        options = self._options
        spec = options.get("rate_limit")
        if spec is None and "times" in options and "per" in options:
            spec = RateLimit((options["times"], options["per"]))
        if spec is None:
            return None
        if not isinstance(spec, RateLimit):
            raise ConfigurationError(
                f"heimdall 'rate_limit' of task {self.name!r} must be a RateLimit, got {spec!r}"
            )
        if callable(spec.rate_limit):
            return self._dynamic_limit(spec.rate_limit)
        return (_limit(spec.rate_limit, self),)

    def _bucket(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        prefix = self.heimdall_config.rate_limit_prefix
        if "key" in self._options:
            return unique_key_for_task(self, args, kwargs, prefix=prefix)
        return f"{prefix}{self.name}"  # "this task runs at most N times per period", fleet-wide

    def _dynamic_limit(self, function: Callable[..., Any]) -> Callable[..., tuple[_Limit]]:
        wanted = inspect.signature(function).parameters

        def limits(*args: Any, **kwargs: Any) -> tuple[_Limit]:
            offered = {"task": self, "args": args, "kwargs": kwargs}
            if "key" in wanted:
                offered["key"] = self._bucket(args, kwargs)
            return (_limit(function(**{k: v for k, v in offered.items() if k in wanted}), self),)

        return limits

    def duplicate_error(self, holder: str, ttl: float | None) -> AlreadyQueuedError:
        """celery-heimdall's :class:`AlreadyQueuedError`."""
        return AlreadyQueuedError(
            expires_in=None if ttl is None else math.ceil(ttl), likely_culprit=holder
        )

    def skipped_result(self, holder: str) -> None:
        """``None``: celery-heimdall's run-time check (for ``send_task`` and beat) returned
        it, so whoever waits on the result is not left hanging."""
        return None

    def only_after(self, key: str, seconds: float) -> bool:
        """``True`` at most once per ``seconds`` for ``key``, across the fleet.

        For a block inside a task that must run less often than the task itself::

            if self.only_after("refresh-cache", 3600): refresh_cache()
        """
        token = f"{self.request.id or 'direct'}:{os.urandom(8).hex()}"
        return self.redis_backend().acquire_or_owner(key, token, seconds).acquired
