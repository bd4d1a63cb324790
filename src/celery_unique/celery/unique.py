"""UniqueTask: Celery's hooks and signals mapped onto the core's lifecycle of a unique key.

Every decision (what to acquire, hand over or release, and what the caller gets) is the
core's (:mod:`celery_unique.core.lifecycle`); this module translates ``apply_async``, the
run, Celery's exceptions (``Retry``, ``Reject``, ``Ignore``) and the worker's signals into
its events, and carries out the lock operations the plans ask for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult, EagerResult
from celery.states import READY_STATES, SUCCESS
from celery.utils import uuid

from .. import signals
from ..backends import AsyncRedisBackend, RedisBackend
from ..core import lifecycle as lc
from ..core import locks
from ..core.arguments import ArgumentKey, UniqueOn
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DuplicateTaskError,
    LockNotOwnedError,
)
from ..locks import Lock
from . import publishers
from .admin import clear_locks
from .base import (
    DEFERRED_HEADER,
    HOLD_HEADER,
    KEY_HEADER,
    WAITED_HEADER,
    RedisTask,
    defer,
    delay_of,
)
from .settings import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Setting,
    async_backend_for,
    check_choice,
    check_encoder,
    check_flag,
    check_seconds,
    from_task,
)

__all__ = ["RUN_SEPARATOR", "UniqueConfig", "UniqueTask", "clear_locks"]

logger = logging.getLogger("celery_unique")

RUN_SEPARATOR = lc.RUN_SEPARATOR
UNTIL_CHOICES = ("executed", "started", "expired")
#: Seconds a copy deferred for another delivery waits for that delivery's result to be final.
DONE_GRACE = 2.0
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
    """A unique task's resolved settings (see :meth:`UniqueTask.unique_setting`)."""

    backend: RedisBackend
    key: KeyFunction
    policy: lc.Policy
    on_duplicate: str
    fail_open: bool


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
    )
    return UniqueConfig(
        backend=task.redis_backend(),
        key=task.unique_key_function(),
        policy=policy,
        on_duplicate=check_choice(get("on_duplicate", "return"), ON_DUPLICATE_CHOICES),
        fail_open=check_flag(task.unique_setting("fail_open")),
    )


@dataclass(slots=True)
class _Run:
    """A delivery of an instance running in this thread, and its run lock."""

    task_id: str
    key: str
    state: lc.KeyState
    lock: Lock | None = None
    ends: float | None = None  # time.monotonic() when the instance's TTL ends, if it counts

    def ttl_left(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()


@dataclass(slots=True)
class _Call:
    """One ``apply_async`` call, prepared: what its lock operation and publish need."""

    config: UniqueConfig
    task_id: str
    key: str
    ttl: float
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    options: dict[str, Any]
    run: _Run | None
    state: lc.KeyState
    event: lc.Event

    def plan(self) -> lc.Plan:
        return lc.plan(self.state, self.event, self.config.policy, self.task_id)

    def displaces(self, transition: lc.Transition) -> bool:
        """Whether the call, a duplicate of a queued holder, is to take its place."""
        outcome = transition.outcome
        return (
            self.config.on_duplicate == "replace"
            and isinstance(self.event, lc.Apply)
            and isinstance(outcome, lc.Duplicate)
            and outcome.queued
        )

    def displace(self, transition: lc.Transition) -> lc.Plan:
        assert isinstance(transition.outcome, lc.Duplicate)
        event = lc.Displace(transition.outcome.holder, self.ttl)
        return lc.plan(lc.KeyState.NEW, event, self.config.policy, self.task_id)


# The run of this thread (Celery's own request stack is thread-local too): a retry or a
# deferral publishes from inside the run and hands the run's lock back to the queued copy.
_current = threading.local()


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
        call = self._prepare(args, kwargs, task_id, options)
        call.options.update(producer=producer, link=link, link_error=link_error, shadow=shadow)
        try:
            transition = self._perform(call.plan(), call.key, call.run)
            if call.displaces(transition):
                transition = self._perform(call.displace(transition), call.key)
        except BackendUnavailable as exc:
            transition = self._unreachable(call, exc)
        answer = self._decided(call, transition)
        return answer if answer is not None else self._publish(call, transition)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async`` for async code: the key is taken through the running loop's
        :class:`~celery_unique.AsyncRedisBackend` (a duplicate touches neither the broker nor
        a thread), and a new instance is published from a publisher thread (one of a few kept
        for the process: :mod:`.publishers`), so the event loop never blocks. Cancelled
        before the publish, it frees the key it took.
        """
        # enabled: see unique_setting("enabled")
        backend = self.async_redis_backend() if self._unique_enabled() else None
        if backend is None:  # no asyncio twin of this task's Redis: all of it off the loop
            return await publishers.run_in_publisher(
                functools.partial(self.apply_async, args, kwargs, task_id, **options)
            )
        call = self._prepare(args, kwargs, task_id, options)
        try:
            transition = await self._aperform(backend, call.plan(), call.key)
            if call.displaces(transition):
                transition = await self._aperform(backend, call.displace(transition), call.key)
        except BackendUnavailable as exc:
            transition = self._unreachable(call, exc)
        answer = self._decided(call, transition)
        if answer is not None:
            return answer
        # Not cancelled once under way: the message goes out or not, and the key follows it
        # (freed if publishing fails); a cancellation lands once it has.
        return await publishers.run_in_publisher(functools.partial(self._publish, call, transition))

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay`` for async code; see :meth:`aapply_async`."""
        return await self.aapply_async(args, kwargs)

    def async_redis_backend(self) -> AsyncRedisBackend | None:
        """The asyncio twin of :meth:`redis_backend` for the running event loop (one per
        loop), or ``None`` when there is none (a custom sync client): ``aapply_async`` then
        runs ``apply_async`` in a publisher thread."""
        return async_backend_for(self.app)

    def _prepare(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None,
        options: dict[str, Any],
    ) -> _Call:
        """Everything about a call that needs no I/O: its key, TTL and event."""
        config = self.unique_config
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        headers = dict(options.pop("headers", None) or {})
        task_id = task_id or uuid()
        request = self.request
        # A retry or a deferral re-publishes the instance from inside its own delivery.
        inside = not request.called_directly and not request.is_eager and request.id == task_id
        run: _Run | None = getattr(_current, "run", None) if inside else None
        if run is not None and run.task_id != task_id:
            run = None
        key = (
            headers.get(KEY_HEADER)
            or (getattr(request, KEY_HEADER, None) if inside else None)
            or config.key(args, kwargs)
        )
        ttl = config.policy.ttl + delay_of(self.app, options)
        state: lc.KeyState
        event: lc.Event
        if run is not None and run.state is lc.KeyState.RUNNING:
            state, event = run.state, lc.Retry(ttl)
        elif inside:
            state, event = (run.state if run else lc.KeyState.QUEUED), lc.Republish(ttl)
        else:
            state, event = lc.KeyState.NEW, lc.Apply(ttl)
        return _Call(config, task_id, key, ttl, args, kwargs, headers, options, run, state, event)

    def _unreachable(self, call: _Call, exc: BackendUnavailable) -> lc.Transition:
        """Redis did not answer the call's lock operation: fail, or fail open."""
        if exc.outcome_unknown:
            self._free_later(call.key, call.task_id)  # it may have been taken: not for an hour
        if not call.config.fail_open:
            raise exc
        logger.warning(
            "Redis unreachable: publishing %s[%s] without its unique lock (unique_fail_open)",
            self.name,
            call.task_id,
            exc_info=True,
        )
        return lc.Transition(call.state, lc.Publish(locked=False))

    def _decided(self, call: _Call, transition: lc.Transition) -> AsyncResult | None:
        """What a duplicate returns (or raises); ``None`` when the call is to be published."""
        if call.run is not None:
            call.run.state = transition.state
        outcome = transition.outcome
        if not isinstance(outcome, lc.Duplicate):
            return None
        logger.info("%s[%s] is a duplicate of %s", self.name, call.task_id, outcome.holder)
        signals.task_duplicate.send(sender=self, task_id=outcome.holder, ttl=outcome.ttl)
        if call.config.on_duplicate == "raise":
            raise self.duplicate_error(outcome.holder, outcome.ttl)
        return self.AsyncResult(outcome.holder)

    def _publish(self, call: _Call, transition: lc.Transition) -> AsyncResult:
        """Publish the call's message (the key is taken); free the key if that fails."""
        policy, outcome = call.config.policy, transition.outcome
        headers = {**call.headers, KEY_HEADER: call.key}
        if policy.tracks_ttl_end:
            headers[HOLD_HEADER] = self.app.now().timestamp() + call.ttl
        try:
            result = super().apply_async(
                call.args, call.kwargs, task_id=call.task_id, headers=headers, **call.options
            )
        except BaseException:
            if isinstance(outcome, lc.Publish) and outcome.locked:
                failed = lc.plan(transition.state, lc.PublishFailed(), policy, call.task_id)
                self._quietly(failed, call.key, call.task_id)
            raise
        if isinstance(outcome, lc.Publish) and outcome.replaces is not None:
            self._replaced(outcome.replaces, call.task_id)
        if isinstance(result, EagerResult) and transition.state is lc.KeyState.QUEUED:
            done = lc.plan(lc.KeyState.QUEUED, lc.EagerDone(), policy, call.task_id)
            self._quietly(done, call.key, call.task_id)
        return result

    def _replaced(self, holder: str, by: str) -> None:
        # The replaced instance never runs (its key is not its own any more: a worker skips
        # it); its result says so.
        logger.info("%s[%s] replaced by %s", self.name, holder, by)
        try:
            self.backend.mark_as_revoked(holder, reason=f"replaced by {by}")
        except Exception:
            logger.warning("could not mark %s[%s] revoked", self.name, holder, exc_info=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        if not self._unique_enabled():  # enabled: see unique_setting("enabled")
            return super().__call__(*args, **kwargs)
        config = self.unique_config
        policy = config.policy
        task_id: str = request.id
        key = getattr(request, KEY_HEADER, None) or config.key(args, kwargs)
        left = self._ttl_left(request) if policy.tracks_ttl_end else None
        deferred = bool(getattr(request, DEFERRED_HEADER, None))
        waited = int(getattr(request, WAITED_HEADER, None) or 0)
        state = lc.KeyState.HANDED_BACK if request.retries or deferred else lc.KeyState.QUEUED
        run = _Run(task_id, key, state, ends=None if left is None else time.monotonic() + left)
        start = lc.Start(os.urandom(8).hex(), ttl_left=left, deferred=deferred, waited=waited)
        try:
            transition = self._start(run, lc.plan(state, start, policy, task_id))
        except BackendUnavailable:
            if not config.fail_open:
                raise
            logger.warning(
                "Redis unreachable: running %s[%s] without its unique lock (unique_fail_open)",
                self.name,
                task_id,
                exc_info=True,
            )
            return super().__call__(*args, **kwargs)
        run.state, outcome = transition.state, transition.outcome
        if isinstance(outcome, lc.Skip):
            return self.skipped_result(outcome.holder)
        if isinstance(outcome, lc.Deferral):
            # A copy of a run under way leaves the task's state to that run (its success
            # would otherwise read RETRY, and a later copy would run the instance again).
            elsewhere = outcome.reason != "while_running"
            headers: dict[str, Any]
            if elsewhere:
                why, headers = "already running elsewhere", {DEFERRED_HEADER: True}
            else:
                why, headers = "another instance is running", {WAITED_HEADER: waited + 1}
            _current.run = run  # its copy is published from here: a Republish
            try:
                defer(
                    self,
                    outcome.countdown,
                    outcome.reason,
                    why,
                    headers,
                    stores_state=not elsewhere,
                )
            finally:
                _current.run = None
        if isinstance(outcome, lc.Run) and not outcome.locked:
            if outcome.why:
                logger.info(
                    "%s[%s] runs without its unique lock: %s", self.name, task_id, outcome.why
                )
            _current.run = run
            try:
                return super().__call__(*args, **kwargs)
            finally:
                _current.run = None
        if isinstance(outcome, lc.Run) and outcome.unless_done and self._ran_elsewhere(task_id):
            self._end(run, lc.RanElsewhere())
            raise Ignore()
        return self._run_locked(run, args, kwargs)

    def _ran_elsewhere(self, task_id: str) -> bool:
        """Whether the delivery this copy waited for ran the instance to success. It frees
        the key a moment before Celery stores its result: a result not final yet is waited
        for (:data:`DONE_GRACE` at most; a delivery that died leaves none)."""
        deadline = time.monotonic() + DONE_GRACE
        while True:
            try:
                state = self.AsyncResult(task_id).state
            except NotImplementedError:  # no result backend: nothing to learn it from
                return False
            if state in READY_STATES or time.monotonic() >= deadline:
                return bool(state == SUCCESS)
            time.sleep(0.05)

    # -- carrying the plans out ---------------------------------------------------------------

    def _run_locked(self, run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _current.run = run
        try:
            retval = super().__call__(*args, **kwargs)
        except Retry:
            raise  # apply_async handed the key back to the queued copy
        except Reject as reject:
            self._end(run, lc.Requeue() if reject.requeue else lc.Rejected())
            raise
        except Ignore:
            self._end(run, lc.Ignored(run.ttl_left()))
            raise
        except BaseException:
            self._end(run, lc.Failure(run.ttl_left()))
            raise
        else:
            self._end(run, lc.Success(run.ttl_left()))
            return retval
        finally:
            _current.run = None
            if run.lock is not None:
                run.lock.abandon()

    def _start(self, run: _Run, plan: lc.Plan) -> lc.Transition:
        action = plan.action
        if not isinstance(action, lc.TakeOver):
            return self._perform(plan, run.key, run)
        backend = self.unique_config.backend
        keys = backend.keys
        run.lock = Lock(
            backend.executor,
            keys,
            run.key,
            action.ttl,
            key=keys.running_lock(run.key) if action.running else None,
            token=action.token,
            auto_renew=True,
            lifetime=action.lifetime,
            on_lost=lambda _lock: self._lease_lost(run),
        )
        freeing = keys.lock(run.key) if action.running else None
        return plan.settle(run.lock.take_over(action.predecessor, freeing=freeing))

    def _perform(self, plan: lc.Plan, key: str, run: _Run | None = None) -> lc.Transition:
        """Carry out ``plan``'s lock operation and settle it with the answer."""
        action, backend = plan.action, self.unique_config.backend
        answer: Any = None
        if isinstance(action, lc.Take):
            answer = backend.acquire_or_owner(
                key, action.token, action.ttl, previous=action.predecessor
            )
        elif isinstance(action, lc.HandOver):
            assert run is not None and run.lock is not None  # only a run hands its lock over
            answer = run.lock.hand_over(action.token, action.ttl)
        elif isinstance(action, lc.Release):
            assert run is not None and run.lock is not None
            try:
                run.lock.release()
                answer = True
            except LockNotOwnedError:
                answer = False  # lost (expired, or taken over): nothing of ours to free
        elif isinstance(action, lc.ReleaseAny):
            prefix = action.task_id + RUN_SEPARATOR
            answer = backend.release(key, action.task_id, owner_prefix=prefix)
            if self.unique_config.policy.while_running:  # and the running twin, run or retry
                twin = backend.keys.running_lock(key)
                freed = backend.executor.execute(locks.release(twin, action.task_id, prefix))
                answer = answer or freed
        elif action is not None:
            raise lc.IllegalTransition(f"{action!r} is carried out at the start of a run")
        return plan.settle(answer)

    async def _aperform(self, backend: AsyncRedisBackend, plan: lc.Plan, key: str) -> lc.Transition:
        """:meth:`_perform` for a producer's plan, through ``backend``; a call cancelled while
        its lock operation is in flight frees what that took."""
        action = plan.action
        if not isinstance(action, lc.Take):
            raise lc.IllegalTransition(f"{action!r} is not a producer's operation")
        got = asyncio.get_running_loop().create_task(
            backend.acquire_or_owner(key, action.token, action.ttl, previous=action.predecessor)
        )
        try:
            answer = await asyncio.shield(got)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([got])
                if not got.cancelled() and got.exception() is None and got.result().acquired:
                    await backend.release(key, action.token)
            raise
        return plan.settle(answer)

    def _end(self, run: _Run, event: lc.Event) -> None:
        """The run is over (or requeued): release, keep, or hand back, as the plan says."""
        plan = lc.plan(run.state, event, self.unique_config.policy, run.task_id)
        transition = self._quietly(plan, run.key, run.task_id, run)
        if transition is not None:
            run.state = transition.state

    def _quietly(
        self, plan: lc.Plan, key: str, task_id: str, run: _Run | None = None
    ) -> lc.Transition | None:
        # The work is done or lost by now; a Redis failure must not turn it into an error.
        try:
            return self._perform(plan, key, run)
        except BackendError:
            logger.warning(
                "could not update the unique lock of %s[%s]; it expires within %.0f s",
                self.name,
                task_id,
                self.unique_config.policy.ttl if run is None else self.unique_config.policy.lease,
                exc_info=True,
            )
            return None

    def _free_later(self, key: str, task_id: str) -> None:
        # An acquire Redis never answered may have taken the key for the whole TTL.
        config = self.unique_config
        config.backend.lock(key, ttl=config.policy.ttl, token=task_id).release_in_background()

    def _lease_lost(self, run: _Run) -> None:
        plan = lc.plan(run.state, lc.LeaseLost(), self.unique_config.policy, run.task_id)
        run.state = plan.settle().state
        logger.error(
            "%s[%s] lost its unique lock while running: another instance may start",
            self.name,
            run.task_id,
        )
        signals.task_lock_lost.send(sender=self, task_id=run.task_id)

    def free_ended_instance(
        self, task_id: str, request: Any, args: Any, kwargs: Any, event: lc.Event
    ) -> None:
        """Free the key of an instance the main process saw revoked, expired or killed
        (it cannot tell a queued one from a running one: the rule frees either)."""
        super().free_ended_instance(task_id, request, args, kwargs, event)
        if not self._unique_enabled():  # enabled: see unique_setting("enabled")
            return
        key = getattr(request, KEY_HEADER, None) if request is not None else None
        if not key:
            try:
                key = self.unique_key(args or (), kwargs or {})
            except Exception:  # arguments that no longer bind: the lease frees the key
                return
        queued = isinstance(event, lc.Revoked | lc.Expired)
        state = lc.KeyState.QUEUED if queued else lc.KeyState.RUNNING
        self._quietly(lc.plan(state, event, self.unique_config.policy, task_id), key, task_id)

    def _ttl_left(self, request: Any) -> float:
        """Seconds until this instance's ``unique_ttl`` ends (from now if it never had one)."""
        hold = getattr(request, HOLD_HEADER, None)
        if not hold:  # sent around apply_async (send_task, beat): the TTL runs from now
            return self.unique_config.policy.ttl
        return float(hold) - float(self.app.now().timestamp())


def duplicate_message(task: RedisTask, holder: str, ttl: float | None) -> str:
    """Why a call was refused as a duplicate, and what to do about it."""
    left = "an unknown time" if ttl is None else f"{ttl:.1f} s"
    return (
        f"task {task.name!r} is already queued or running with the same unique key as "
        f"{holder}; its lock lasts {left} more. Use that result, or revoke it"
    )
