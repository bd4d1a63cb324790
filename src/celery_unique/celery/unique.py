"""UniqueTask: a Celery task of which at most one instance per key is queued or running.

This module holds the task class (its settings, override points and public surface); the
work is done by :mod:`.producer` (``apply_async``), :mod:`.runs` (the worker's delivery) and
:mod:`.plans` (the lock actions), on the core's lifecycle (:mod:`celery_unique.core.lifecycle`),
where every decision is made.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from celery.exceptions import Ignore
from celery.result import AsyncResult

from ..backends import AsyncRedisBackend, RedisBackend
from ..core import lifecycle as lc
from ..core.arguments import ArgumentKey, UniqueOn
from ..errors import ConfigurationError, DuplicateTaskError
from . import follow as _follow  # noqa: F401  (registers the follower task on every app)
from . import producer as _producer
from . import publishers, runs
from .admin import clear_locks
from .base import RedisTask
from .settings import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Setting,
    check_choice,
    check_encoder,
    check_flag,
    check_seconds,
    from_task,
)
from .store import async_backend_for

__all__ = ["RUN_SEPARATOR", "UniqueConfig", "UniqueTask", "clear_locks"]

logger = logging.getLogger("celery_unique")

RUN_SEPARATOR = lc.RUN_SEPARATOR
UNTIL_CHOICES = ("executed", "started", "expired")
ON_DUPLICATE_CHOICES = ("return", "raise", "replace")

#: Derives a lock name from a call's arguments.
KeyFunction = Callable[[tuple[Any, ...], dict[str, Any]], str]

# Where UniqueTask reads each setting: the task option, then app.conf.
_SOURCES: dict[str, tuple[str | None, str | None]] = {
    "on": ("unique_on", None),
    "ttl": ("unique_ttl", "unique_ttl"),
    "lease": ("unique_lease", "unique_lease"),
    "until": ("unique_until", "unique_until"),
    "on_duplicate": ("on_duplicate", "unique_on_duplicate"),
    "fail_open": ("unique_fail_open", "unique_fail_open"),
    "json_encoder": (None, "unique_json_encoder"),
    "hard_ttl": (None, None),
    "while_running": ("unique_while_running", "unique_while_running"),
    "enabled": (None, None),  # for subclasses: unset is on
}


@dataclass(frozen=True, slots=True)
class UniqueConfig:
    """A unique task's resolved settings (see :meth:`UniqueTask.unique_setting`): where its
    keys live, how a call becomes its key, and the lifecycle's policy."""

    backend: RedisBackend
    key: KeyFunction
    policy: lc.Policy

    @property
    def on_duplicate(self) -> str:
        """``"return"``, ``"raise"`` or ``"replace"``."""
        return self.policy.on_duplicate

    @property
    def fail_open(self) -> bool:
        """Whether a call goes on without the key when Redis is unreachable."""
        return self.policy.fail_open


def resolve(task: UniqueTask) -> UniqueConfig:
    """Read and check every setting of ``task``, once."""

    def get(name: str, default: Any) -> Setting:
        return task.unique_setting(name) or Setting(default, f"the default {name}")

    ttl = check_seconds(get("ttl", DEFAULT_TTL))
    lease = check_seconds(get("lease", DEFAULT_LEASE))
    until = check_choice(get("until", "executed"), UNTIL_CHOICES)
    while_running = check_flag(task.unique_setting("while_running"))
    if while_running and until != "started":
        raise ConfigurationError(
            f"unique_while_running of task {task.name!r} needs unique_until='started' (one "
            f"queued and one running instance per key), got unique_until={until!r}"
        )
    policy = lc.Policy(
        ttl=ttl,
        lease=min(lease, ttl),
        until=until,
        hard_ttl=check_flag(task.unique_setting("hard_ttl")),
        while_running=while_running,
        on_duplicate=check_choice(get("on_duplicate", "return"), ON_DUPLICATE_CHOICES),
        fail_open=check_flag(task.unique_setting("fail_open")),
    )
    return UniqueConfig(task.redis_backend(), task.unique_key_function(), policy)


class UniqueTask(RedisTask):
    """A Celery task of which at most one instance per key is queued or running.

    ::

        @app.task(base=UniqueTask, unique_on=["customer_id"], unique_ttl=3600)
        def generate_report(customer_id, fmt="pdf"): ...

    A duplicate ``delay()``/``apply_async()`` publishes nothing: it returns the holder's
    ``AsyncResult`` (``on_duplicate="return"``) or raises :class:`DuplicateTaskError`
    (``"raise"``). Options, each also settable app-wide as ``app.conf.unique_*``:

    * ``unique_on``: ``None`` (all arguments), a list of argument names, ``[]`` (the task
      name only) or a callable taking the task's arguments and returning a JSON-able value;
    * ``unique_ttl``: seconds a queued instance holds its key (plus any countdown/ETA);
    * ``unique_lease``: seconds a running instance holds it between renewals (default 30);
    * ``unique_until``: ``"executed"`` (default), ``"started"`` or ``"expired"``;
    * ``on_duplicate`` (``app.conf.unique_on_duplicate``): ``"return"``, ``"raise"``, or
      ``"replace"``: a call while the holder is still queued takes its place in one atomic
      step (the newest arguments and options win; the replaced instance never runs and reads
      ``REVOKED``); while the holder runs it returns the holder's result. With ``countdown=``
      that is a trailing debounce: only the last of a burst of calls runs;
    * ``unique_fail_open``: publish without the lock, with a warning, if Redis is down;
    * ``unique_while_running`` (with ``unique_until="started"``): at most one queued and one
      running instance per key: a call while one runs queues one more, further calls are
      duplicates of that queued one, which starts only once the running one has ended (it
      is deferred, not failed, if a worker gets it earlier).

    ``apply_async`` raises :class:`~celery_unique.BackendUnavailable` within the backend's
    deadline (about 2 s) when Redis does not answer, and publishes nothing. Calling the task
    directly (``task(...)``) or through ``task.apply()`` runs it in-process without a lock;
    in ``task_always_eager`` mode ``apply_async`` holds the lock while the task runs inline.

    Subclasses (the compat layers) adapt it through :meth:`unique_setting`,
    :meth:`unique_key_function`, :meth:`redis_backend`, :meth:`duplicate_error` and
    :meth:`skipped_result`.
    """

    unique_on: ClassVar[UniqueOn] = None
    unique_ttl: ClassVar[float | None] = None
    unique_lease: ClassVar[float | None] = None
    unique_until: ClassVar[str | None] = None
    on_duplicate: ClassVar[str | None] = None
    unique_fail_open: ClassVar[bool | None] = None
    unique_while_running: ClassVar[bool | None] = None

    # -- override points ----------------------------------------------------------------------

    def unique_setting(self, name: str) -> Setting | None:
        """The configured value of setting ``name`` and where it was set, ``None`` if unset:
        ``on``, ``ttl``, ``lease``, ``until``, ``on_duplicate``, ``fail_open``,
        ``json_encoder``, ``hard_ttl`` (``ttl`` bounds the key's whole life, the run
        included), ``while_running`` or ``enabled`` (a false value makes the task a plain
        Celery task: no key is taken, checked or freed; unset is on). Read from the task's
        options, then ``app.conf.unique_*``."""
        option, conf_key = _SOURCES[name]
        return from_task(self, option, conf_key)

    def unique_key_function(self) -> KeyFunction:
        """How a call's arguments become its lock name (default: ``unique_on``)."""
        on = self.unique_setting("on")
        return ArgumentKey(
            self.name,
            self.run,
            None if on is None else on.value,
            check_encoder(self.unique_setting("json_encoder")),
        )

    def duplicate_error(self, holder: str, ttl: float | None) -> DuplicateTaskError:
        """What a duplicate raises with ``on_duplicate="raise"``."""
        return DuplicateTaskError(duplicate_message(self, holder, ttl), task_id=holder, ttl=ttl)

    def skipped_result(self, holder: str) -> Any:
        """What a run returns when its key is held by another instance (default: nothing
        is stored, ``Ignore``).

        That happens when this instance outlived its ``unique_ttl`` in the queue, or was sent
        around ``apply_async`` (``send_task``, beat) while another held the key. The holder
        does the work; running both would break the promise.
        """
        logger.warning(
            "%s[%s] not run: its unique key is held by %s", self.name, self.request.id, holder
        )
        raise Ignore()

    def _unique_enabled(self) -> bool:
        found = self.unique_setting("enabled")
        return found is None or bool(found.value)

    # -- the public surface -------------------------------------------------------------------

    @functools.cached_property
    def unique_config(self) -> UniqueConfig:
        """This task's resolved settings (read on first use: the app is configured then)."""
        return resolve(self)

    def unique_key(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> str:
        """The lock name a call with these arguments uses (no argument value appears in it)."""
        return self.unique_config.key(tuple(args or ()), dict(kwargs or {}))

    def clear_locks(self) -> int:
        """Delete every lock of this task (SCAN, not KEYS); returns how many were deleted."""
        return clear_locks(self.app, self)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Take the key in one Redis call, then publish; a duplicate publishes nothing."""
        if not self._unique_enabled():  # enabled: see unique_setting("enabled")
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        call = _producer.prepare(self, args, kwargs, task_id, options)
        call.options.update(producer=producer, link=link, link_error=link_error, shadow=shadow)
        return _producer.apply(self, call, super().apply_async)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async`` for async code: the key is taken through the running loop's
        :class:`~celery_unique.AsyncRedisBackend` (a duplicate touches neither the broker nor
        a thread, but for one of a queued holder, whose result it reads in a thread to learn
        whether it was revoked), and a new instance is published from a publisher thread (one
        of a few kept for the process: :mod:`.publishers`), so the event loop never blocks.
        Cancelled before the publish, it frees the key it took.
        """
        # enabled: see unique_setting("enabled")
        backend = self.async_redis_backend() if self._unique_enabled() else None
        if backend is None:  # no asyncio twin of this task's Redis: all of it off the loop
            return await publishers.run_in_publisher(
                functools.partial(self.apply_async, args, kwargs, task_id, **options)
            )
        call = _producer.prepare(self, args, kwargs, task_id, options)
        return await _producer.aapply(self, call, backend, super().apply_async)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay`` for async code; see :meth:`aapply_async`."""
        return await self.aapply_async(args, kwargs)

    def async_redis_backend(self) -> AsyncRedisBackend | None:
        """The asyncio twin of :meth:`redis_backend` for the running event loop (one per
        loop), or ``None`` when there is none (a custom sync client): ``aapply_async`` then
        runs ``apply_async`` in a publisher thread."""
        return async_backend_for(self.app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        if not self._unique_enabled():  # enabled: see unique_setting("enabled")
            return super().__call__(*args, **kwargs)
        body = functools.partial(super().__call__, *args, **kwargs)
        return runs.run(self, args, kwargs, body)

    def free_ended_instance(
        self, task_id: str, request: Any, args: Any, kwargs: Any, event: lc.Event
    ) -> None:
        """Free the key of an instance the main process saw revoked, expired or killed."""
        super().free_ended_instance(task_id, request, args, kwargs, event)
        if self._unique_enabled():  # enabled: see unique_setting("enabled")
            runs.free_ended(self, task_id, request, args, kwargs, event)


def duplicate_message(task: RedisTask, holder: str, ttl: float | None) -> str:
    """Why a call was refused as a duplicate, and what to do about it."""
    left = "an unknown time" if ttl is None else f"{ttl:.1f} s"
    return (
        f"task {task.name!r} is already queued or running with the same unique key as "
        f"{holder}; its lock lasts {left} more. Use that result, or revoke it"
    )
