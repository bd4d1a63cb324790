"""Celery integration: :class:`UniqueTask` and :func:`clear_locks`.

This package and ``compat/`` are the only places Celery is imported. The lock a
unique task holds goes through three owners, all in one Redis key:

* ``<task id>`` while queued: taken by ``apply_async`` before publishing, for ``unique_ttl``
  plus any countdown/ETA delay;
* ``<task id>\\x1f<run id>`` while running: handed over at start by the worker that runs it
  (a second delivery of the same id sees another run's token and cannot run beside it),
  for a short lease renewed every third of it, so a killed worker frees it within a lease;
* back to ``<task id>`` when the run retries or is deferred (the re-published message is the
  same instance), or released when it ends for good.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from celery import Celery, Task, signals
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from celery.result import AsyncResult, EagerResult
from celery.utils import uuid
from kombu.utils.imports import symbol_by_name

from ..backends import RedisBackend
from ..core.arguments import ArgumentKey, UniqueOn
from ..core.keys import DEFAULT_PREFIX, task_lock_start
from ..core.results import Acquisition
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DuplicateTaskError,
    LockNotOwnedError,
)
from ..locks import Lock

__all__ = ["UniqueTask", "clear_locks", "defer"]

logger = logging.getLogger("celery_unique")

#: Separates a task id from the run id in the token of a running task's lock.
RUN_SEPARATOR = "\x1f"
#: Message header carrying the unique key, so the worker never has to re-derive it from
#: arguments that serialisation may have changed (tuples to lists, datetimes to strings).
KEY_HEADER = "celery_unique_key"
#: Message header (epoch seconds) when the instance's ``unique_ttl`` ends: until then
#: ``unique_until="expired"`` keeps the lock, and a hard TTL never renews past it.
HOLD_HEADER = "celery_unique_hold_until"
#: Message header marking a copy deferred because another delivery of it was running.
DEFERRED_HEADER = "celery_unique_deferred"

DEFAULT_TTL = 3600.0
DEFAULT_LEASE = 30.0
UNTIL_CHOICES = ("executed", "started", "expired")
ON_DUPLICATE_CHOICES = ("return", "raise")

_BACKENDS: weakref.WeakKeyDictionary[Celery, RedisBackend] = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()
# The run locks this process holds, by task id: a retry publishes from inside the run and
# hands the run's lock back to the queued instance.
_RUNNING: dict[str, Lock] = {}


def holder_id(owner: str) -> str:
    """The task id in a lock token (a queued token is the id, a run token extends it)."""
    return owner.partition(RUN_SEPARATOR)[0]


def _is_redis_url(url: object) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0] in ("redis", "rediss", "unix")


def backend_for(app: Celery) -> RedisBackend:
    """The backend unique tasks of ``app`` use, built once from ``app.conf``."""
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(app)
        if backend is None:
            conf = app.conf
            url = conf.get("unique_backend_url")
            if not url:
                url = next(
                    (u for u in (conf.result_backend, conf.broker_url) if _is_redis_url(u)), None
                )
            if not url:
                raise ConfigurationError(
                    "unique tasks need Redis: set app.conf.unique_backend_url "
                    "(e.g. 'redis://localhost:6379/0'); neither the result backend nor the "
                    "broker is a Redis URL"
                )
            prefix = conf.get("unique_key_prefix") or DEFAULT_PREFIX
            backend = _BACKENDS[app] = RedisBackend.from_url(url, key_prefix=prefix)
        return backend


def _setting(task: Task, option: str, conf_key: str, default: Any) -> Any:
    value = getattr(task, option, None)
    if value is None:
        value = task.app.conf.get(conf_key)
    return default if value is None else value


def _static_option(task: Task, option: str) -> Any:
    # Options given to @app.task become class attributes; a function there (unique_on=lambda)
    # would come back bound to the task. Read it as stored.
    value = inspect.getattr_static(task, option, None)
    return value.__func__ if isinstance(value, staticmethod | classmethod) else value


def _encoder(value: object, option: str = "unique_json_encoder") -> type[json.JSONEncoder] | None:
    if value is None:
        return None
    encoder: object = symbol_by_name(value) if isinstance(value, str) else value  # type: ignore[no-untyped-call]
    if not (isinstance(encoder, type) and issubclass(encoder, json.JSONEncoder)):
        raise ConfigurationError(
            f"{option} must be a json.JSONEncoder subclass or its dotted path, got {value!r}"
        )
    return encoder


def _positive(task: Task, option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(
            f"{option} of task {task.name!r} must be a number of seconds > 0, got {value!r}"
        )
    return float(value)


def _choice(task: Task, option: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigurationError(
            f"{option} of task {task.name!r} must be one of {list(choices)}, got {value!r}"
        )
    return str(value)


#: Derives a lock name from a call's arguments.
KeyFunction = Callable[[tuple[Any, ...], dict[str, Any]], str]


@dataclass(frozen=True, slots=True)
class _Unique:
    """A task's resolved settings: task options first, then ``app.conf``, then defaults.

    ``hard_ttl`` (for the compat layers, whose libraries promised it): ``ttl`` counts from
    publishing and bounds the lock's whole life, running included; the run's lease renews up
    to that moment and no further, and a run starting after it runs without the lock.
    """

    backend: RedisBackend
    key: KeyFunction
    ttl: float
    lease: float
    until: str
    on_duplicate: str
    fail_open: bool
    hard_ttl: bool = False

    @property
    def holds_until(self) -> bool:
        """Whether messages carry the moment the TTL ends (:data:`HOLD_HEADER`)."""
        return self.hard_ttl or self.until == "expired"

    @classmethod
    def resolve(cls, task: Task) -> _Unique:
        ttl = _positive(task, "unique_ttl", _setting(task, "unique_ttl", "unique_ttl", DEFAULT_TTL))
        lease = _positive(
            task, "unique_lease", _setting(task, "unique_lease", "unique_lease", DEFAULT_LEASE)
        )
        return cls(
            backend=backend_for(task.app),
            key=ArgumentKey(
                task.name,
                task.run,
                _static_option(task, "unique_on"),
                _encoder(task.app.conf.get("unique_json_encoder")),
            ),
            ttl=ttl,
            lease=min(lease, ttl),
            until=_choice(
                task,
                "unique_until",
                _setting(task, "unique_until", "unique_until", "executed"),
                UNTIL_CHOICES,
            ),
            on_duplicate=_choice(
                task,
                "on_duplicate",
                _setting(task, "on_duplicate", "unique_on_duplicate", "return"),
                ON_DUPLICATE_CHOICES,
            ),
            fail_open=bool(_setting(task, "unique_fail_open", "unique_fail_open", False)),
        )


def _delay(app: Celery, options: Mapping[str, Any]) -> float:
    """Seconds until an ETA/countdown message may run: the queued lock must outlive it."""
    countdown = options.get("countdown")
    if countdown:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if eta is None:
        return 0.0
    if isinstance(eta, str):
        eta = datetime.datetime.fromisoformat(eta)
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=datetime.timezone.utc)
    seconds: float = (eta - app.now()).total_seconds()
    return max(0.0, seconds)


class UniqueTask(Task):  # type: ignore[misc]
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
    * ``on_duplicate`` (``app.conf.unique_on_duplicate``): ``"return"`` or ``"raise"``;
    * ``unique_fail_open``: publish without the lock, with a warning, if Redis is down.

    Calling the task directly (``task(...)``) or through ``task.apply()`` runs it in-process
    without a lock; in ``task_always_eager`` mode ``apply_async`` holds the lock while the
    task runs inline, like a worker would.
    """

    unique_on: ClassVar[UniqueOn] = None
    unique_ttl: ClassVar[float | None] = None
    unique_lease: ClassVar[float | None] = None
    unique_until: ClassVar[str | None] = None
    on_duplicate: ClassVar[str | None] = None
    unique_fail_open: ClassVar[bool | None] = None

    @functools.cached_property
    def _unique(self) -> _Unique:
        # Resolved on first use: the app is configured and finalized by then.
        return _Unique.resolve(self)

    def unique_key(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> str:
        """The lock name a call with these arguments uses (no argument value appears in it)."""
        return self._unique.key(tuple(args or ()), dict(kwargs or {}))

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
        """Take the lock in one Redis call, then publish; a duplicate publishes nothing."""
        unique = self._unique
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        headers = dict(options.pop("headers", None) or {})
        task_id = task_id or uuid()
        request = self.request
        # A retry or deferral re-publishes the running instance from inside its own run.
        inside = not request.called_directly and not request.is_eager and request.id == task_id
        key = (
            headers.get(KEY_HEADER)
            or (getattr(request, KEY_HEADER, None) if inside else None)
            or unique.key(args, kwargs)
        )
        ttl = unique.ttl + _delay(self.app, options)
        running = _RUNNING.get(task_id) if inside else None
        try:
            if running is not None:  # hand the run's lock back to the queued instance
                got = running.hand_over(task_id, ttl)
            else:
                got = unique.backend.acquire_or_owner(key, task_id, ttl)
        except BackendUnavailable:
            if not unique.fail_open:
                raise
            logger.warning(
                "Redis unreachable: publishing %s[%s] without its unique lock (unique_fail_open)",
                self.name,
                task_id,
                exc_info=True,
            )
            got = None
        if got is not None and not got.acquired:
            holder = holder_id(got.owner)
            if not (inside and holder == task_id):  # another delivery of this very instance
                return self._duplicate(holder, got.ttl)
        headers[KEY_HEADER] = key
        if unique.holds_until:
            headers[HOLD_HEADER] = self.app.now().timestamp() + ttl
        try:
            result = super().apply_async(
                args,
                kwargs,
                task_id=task_id,
                producer=producer,
                link=link,
                link_error=link_error,
                shadow=shadow,
                headers=headers,
                **options,
            )
        except BaseException:
            if got is not None and got.acquired:
                self._release_quietly(key, task_id)
            raise
        if isinstance(result, EagerResult) and unique.until != "expired":
            # Ran inline already (no worker, no hand-over): the instance is done.
            self._release_quietly(key, task_id)
        return result

    def _duplicate(self, holder: str, ttl: float | None) -> AsyncResult:
        if self._unique.on_duplicate == "raise":
            raise self._duplicate_error(holder, ttl)
        return self.AsyncResult(holder)

    def _duplicate_error(self, holder: str, ttl: float | None) -> DuplicateTaskError:
        """What a duplicate raises with ``on_duplicate="raise"`` (the compat layers' own)."""
        return DuplicateTaskError(duplicate_message(self, holder, ttl), task_id=holder, ttl=ttl)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        unique = self._unique
        task_id: str = request.id
        key = getattr(request, KEY_HEADER, None) or unique.key(args, kwargs)
        if unique.until == "started":
            self._release_quietly(key, task_id)
            return super().__call__(*args, **kwargs)

        lease = unique.lease
        left = self._ttl_left(request) if unique.holds_until else None
        ends = None if left is None else time.monotonic() + left
        if left is not None and unique.hard_ttl:
            if left <= 0:
                # The TTL promised the key to newer instances from this moment on.
                logger.info(
                    "%s[%s] starts after its unique_ttl ended: running without the lock",
                    self.name,
                    task_id,
                )
                return super().__call__(*args, **kwargs)
            lease = min(lease, left)
        lock = unique.backend.lock(
            key,
            ttl=lease,
            token=f"{task_id}{RUN_SEPARATOR}{os.urandom(8).hex()}",
            auto_renew=True,
            lifetime=left if unique.hard_ttl else None,
        )
        try:
            got = lock.take_over(task_id)
        except BackendUnavailable:
            if not unique.fail_open:
                raise
            logger.warning(
                "Redis unreachable: running %s[%s] without its unique lock (unique_fail_open)",
                self.name,
                task_id,
                exc_info=True,
            )
            return super().__call__(*args, **kwargs)
        if not got.acquired:
            holder = holder_id(got.owner)
            if holder != task_id:
                return self._key_taken(holder)
            self._running_elsewhere(task_id, got)
        if getattr(request, DEFERRED_HEADER, None) and self.AsyncResult(task_id).successful():
            # The delivery this copy waited for has run the instance to success meanwhile.
            self._finish(key, lock, ends)
            raise Ignore()
        _RUNNING[task_id] = lock
        try:
            retval = super().__call__(*args, **kwargs)
        except Retry:
            raise  # apply_async handed the lock back to the queued retry
        except Reject as reject:
            self._finish(key, lock, ends, requeued=bool(reject.requeue))
            raise
        except BaseException:
            self._finish(key, lock, ends)
            raise
        else:
            self._finish(key, lock, ends)
            return retval
        finally:
            _RUNNING.pop(task_id, None)
            lock.abandon()

    def _ttl_left(self, request: Any) -> float:
        """Seconds until this instance's ``unique_ttl`` ends (from now if it never had one)."""
        hold = getattr(request, HOLD_HEADER, None)
        if not hold:  # sent around apply_async (send_task, beat): the TTL runs from now
            return self._unique.ttl
        return float(hold) - float(self.app.now().timestamp())

    def _key_taken(self, holder: str) -> Any:
        """The run found its key held by another instance: what the run returns instead.

        That happens when this instance outlived its ``unique_ttl`` in the queue, or was sent
        around ``apply_async`` (``send_task``, beat) while another held the key. The holder
        does the work; running both would break the promise. Ignored: no result is stored.
        """
        logger.warning(
            "%s[%s] not run: its unique key is held by %s", self.name, self.request.id, holder
        )
        raise Ignore()

    def _running_elsewhere(self, task_id: str, got: Acquisition) -> NoReturn:
        # Another delivery of this very instance is running (a broker redelivered it), or
        # died less than a lease ago. Never run beside it: come back when its lease is over.
        countdown = (got.ttl or self._unique.lease) + random.uniform(0.5, 2.0)
        logger.warning(
            "%s[%s] is already running elsewhere: deferred by %.1f s", self.name, task_id, countdown
        )
        defer(self, countdown, "already running elsewhere", {DEFERRED_HEADER: True})

    def _finish(self, key: str, lock: Lock, ends: float | None, *, requeued: bool = False) -> None:
        """The run is over (or requeued): release, or hand back to the queued instance.

        ``ends`` is the ``time.monotonic()`` moment this instance's TTL ends, if it counts.
        """
        unique, task_id = self._unique, holder_id(lock.token)
        if requeued:
            keep = unique.ttl
        elif unique.until == "expired" and ends is not None:
            keep = ends - time.monotonic()
        else:
            keep = 0.0
        try:
            if keep > 0:
                lock.hand_over(task_id, keep)
            else:
                lock.release()
        except LockNotOwnedError:
            pass  # lost (expired, or taken over): nothing of ours to free
        except BackendError:
            logger.warning(
                "could not free the unique lock of %s[%s]; it expires within %.0f s",
                self.name, task_id, unique.lease, exc_info=True,
            )  # fmt: skip

    def _release_quietly(self, key: str, task_id: str) -> None:
        try:
            self._unique.backend.release(key, task_id, owner_prefix=task_id + RUN_SEPARATOR)
        except BackendError:
            logger.warning(
                "could not free the unique lock of %s[%s]", self.name, task_id, exc_info=True
            )


def duplicate_message(task: Task, holder: str, ttl: float | None) -> str:
    """Why a call was refused as a duplicate, and what to do about it."""
    left = "an unknown time" if ttl is None else f"{ttl:.1f} s"
    return (
        f"task {task.name!r} is already queued or running with the same unique key as "
        f"{holder}; its lock lasts {left} more. Use that result, or revoke it"
    )


def defer(
    task: Task, countdown: float, reason: str, headers: Mapping[str, Any] | None = None
) -> NoReturn:
    """Put the running instance back in the queue for ``countdown`` seconds and stop this run.

    Same task id, same retry count (a deferral is not a retry: it uses none of
    ``max_retries`` up), options untouched. Published through ``apply_async``, so a unique
    task hands its lock back to the queued instance.
    """
    request = task.request
    task.signature_from_request(
        request,
        request.args,
        request.kwargs,
        countdown=countdown,
        retries=request.retries,
        headers={**(request.headers or {}), **(headers or {})},
    ).apply_async()
    raise Retry(reason, when=countdown)


def clear_locks(app: Celery, task: UniqueTask | None = None) -> int:
    """Delete the unique-task locks of ``app`` (or of one ``task``); returns how many.

    Uses SCAN, so it never blocks Redis the way KEYS would.
    """
    if task is not None:
        return unlink_locks(task._unique.backend, task_lock_start(task.name))
    return unlink_locks(backend_for(app), task_lock_start())


def force_release(backend: RedisBackend, name: str) -> None:
    """Delete lock ``name`` whoever holds it: the old libraries' administrative reset."""
    backend.executor.unlink([backend.keys.lock(name)])


def unlink_locks(backend: RedisBackend, start: str) -> int:
    """UNLINK every lock of ``backend`` whose name starts with ``start``; returns how many."""
    deleted = 0
    batch: list[str] = []
    for key in backend.executor.scan(backend.keys.lock_pattern(start)):
        batch.append(key)
        if len(batch) >= 500:
            deleted += backend.executor.unlink(batch)
            batch.clear()
    return deleted + backend.executor.unlink(batch)


# -- signals the worker's main process sends: the run there may never see its end ---------


def _key_of(task: UniqueTask, request: Any, args: Any, kwargs: Any) -> str | None:
    key = getattr(request, KEY_HEADER, None) if request is not None else None
    if key:
        return str(key)
    try:
        return task.unique_key(args or (), kwargs or {})
    except Exception:  # arguments that no longer bind: the lease will free the lock
        return None


@signals.task_revoked.connect(weak=False, dispatch_uid="celery_unique.revoked")  # type: ignore[untyped-decorator]
def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Revoked, expired or terminated: free the lock, whether queued or running."""
    if isinstance(sender, UniqueTask) and request is not None:
        key = _key_of(sender, request, request.args, request.kwargs)
        if key is not None:
            sender._release_quietly(key, request.id)


@signals.task_failure.connect(weak=False, dispatch_uid="celery_unique.failure")  # type: ignore[untyped-decorator]
def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """A hard time limit, a lost worker child or a dropped Reject, seen by the main process."""
    from billiard.exceptions import WorkerLostError

    if not isinstance(sender, UniqueTask) or task_id is None:
        return
    if not isinstance(exception, WorkerLostError | TimeLimitExceeded | Reject):
        return  # failures inside the run were handled there
    request = sender.request if sender.request.id == task_id else None
    key = _key_of(sender, request, args, kwargs)
    if key is not None:
        sender._release_quietly(key, task_id)
