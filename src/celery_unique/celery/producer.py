"""A unique task's ``apply_async``, sync and async: take the key, then publish.

:func:`prepare` turns a call into its lifecycle event (``Apply`` from outside a run; from
inside its own delivery, ``Retry`` or ``Republish``: a retry or a deferral hands the key
back); the core decides what the answer means (publish, a duplicate, a replace, fail or fail
open); :func:`answer` and :func:`publish` carry that out. A duplicate of a queued holder
may first ask whether that holder was revoked (one read of its result): if so, the call
takes its place (``HolderRevoked``), so a revoke frees the key at once for the next call.
The sync path drives the lifecycle with :func:`~.plans.perform`, the async one with
:func:`~celery_unique.core.plans.through` on the running loop's backend, so a duplicate
touches neither the broker nor a thread (but for that one read, where it is asked for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from celery.result import AsyncResult, EagerResult
from celery.utils import uuid

from .. import signals
from ..backends import AsyncRedisBackend
from ..core import lifecycle as lc
from ..core.messages import HOLD_HEADER, KEY_HEADER, STATE_HEADER
from ..core.plans import plain, through
from ..errors import BackendError, LockNotOwnedError
from . import publishers, runs
from .base import delay_of, results_shared, revoked
from .follow import FOLLOW_TASK, follows, work_of
from .plans import Held, perform, quietly

if TYPE_CHECKING:
    from .unique import UniqueTask

__all__ = ["Call", "aapply", "answer", "apply", "prepare", "publish"]

logger = logging.getLogger("celery_unique")

#: Celery's own ``Task.apply_async`` (the next class's in the MRO), which publishes.
Publisher = Callable[..., AsyncResult]


class _Phantoms:
    """Ids of this process's calls whose take Redis never answered and which raised,
    publishing nothing, per key, until their TTL is over. Such an id may hold the key (the
    take ran, its answer was lost) and will never run: a later call of this process that
    finds it there takes its place instead of answering with it. (Its clean-up frees it
    too, but the next call may come first.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, dict[str, float]] = {}

    def add(self, key: str, task_id: str, ttl: float) -> None:
        now = time.monotonic()
        with self._lock:
            for known in list(self._ids):
                alive = {t: end for t, end in self._ids[known].items() if end > now}
                if alive:
                    self._ids[known] = alive
                else:
                    del self._ids[known]
            self._ids.setdefault(key, {})[task_id] = now + ttl

    def of(self, key: str) -> frozenset[str]:
        if not self._ids:  # the common case, without the lock
            return frozenset()
        with self._lock:
            return frozenset(self._ids.get(key, ()))


_phantoms = _Phantoms()


class _NotRevoked:
    """Queued holders whose result this process read lately and found not revoked: their
    duplicates are answered without reading it again for :data:`RECHECK` seconds, so a
    burst of duplicates of one holder costs one read, and a revoke still frees the key for
    the next call within that long (plus the read)."""

    #: Seconds a "not revoked" is believed.
    RECHECK = 0.25
    _MOST = 4096  # holders remembered; past that the memory starts afresh

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def recently(self, holder: str) -> bool:
        """Whether ``holder`` was found not revoked within the last :data:`RECHECK` s."""
        seen = self._seen.get(holder)
        return seen is not None and time.monotonic() - seen < self.RECHECK

    def found(self, holder: str) -> None:
        """``holder``'s result was just read and it is not revoked."""
        if len(self._seen) >= self._MOST:
            self._seen = {}
        self._seen[holder] = time.monotonic()


_not_revoked = _NotRevoked()


@dataclass(slots=True)
class Call:
    """One ``apply_async`` call, prepared: its instance and event, and what publishing
    needs (``ttl``: the key's, queue time included)."""

    held: Held
    event: lc.Event
    ttl: float
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    options: dict[str, Any]

    @property
    def task_id(self) -> str:
        return self.held.instance.task_id


def prepare(
    task: UniqueTask,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    task_id: str | None,
    options: dict[str, Any],
) -> Call:
    """Everything about a call that needs no I/O: its key, TTL, instance and event."""
    config = task.unique_config
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    headers = dict(options.pop("headers", None) or {})
    task_id = task_id or uuid()
    request = _request_of(task)
    # A retry or a deferral re-publishes the instance from inside its own delivery.
    inside = (
        request is not None
        and not request.called_directly
        and not request.is_eager
        and request.id == task_id
    )
    held = runs.current(request) if inside else None
    key = (
        headers.get(KEY_HEADER)
        or (getattr(request, KEY_HEADER, None) if inside else None)
        or config.key(args, kwargs)
    )
    ttl = config.policy.ttl + delay_of(task.app, options)
    event: lc.Event
    if held is not None and held.instance.state is lc.KeyState.RUNNING:
        event = lc.Retry(ttl)
    elif inside:
        if held is None:  # its delivery runs in another thread or process: a plain copy
            held = Held(lc.Instance(task_id, config.policy, lc.KeyState.QUEUED), key)
        event = lc.Republish(ttl)
    else:
        held = Held(lc.Instance(task_id, config.policy), key)
        event = lc.Apply(ttl, phantoms=_phantoms.of(key), sees_revokes=results_shared(task))
    return Call(held, event, ttl, args, kwargs, headers, options)


def _request_of(task: UniqueTask) -> Any:
    """The task's request context in this thread, or ``None`` while another thread is still
    binding the task: Celery binds a task on its first use and registers it before making
    its request stack, so a second thread can get it in between (no run of it is under way
    then; its ``request`` would raise ``AttributeError``)."""
    if task.request_stack is None:
        return None
    return task.request


def apply(task: UniqueTask, call: Call, publisher: Publisher) -> AsyncResult:
    """Take the key in one Redis call, then publish (or answer the duplicate)."""
    backend = task.unique_config.backend
    outcome = perform(backend, call.held, call.event)
    holder = _asks_revoked(outcome)
    if holder is not None and _holder_revoked(task, holder):
        outcome = perform(backend, call.held, lc.HolderRevoked(holder, call.ttl))
    answered = answer(task, call, outcome)
    if answered is not None:
        return answered
    assert isinstance(outcome, lc.Publish | lc.Duplicate)
    return publish(task, call, outcome, publisher)


async def aapply(
    task: UniqueTask, call: Call, backend: AsyncRedisBackend, publisher: Publisher
) -> AsyncResult:
    """:func:`apply` from async code: the key is taken on ``backend`` (a call cancelled
    meanwhile frees what it took), the message published from a publisher thread."""
    outcome = await _adecide(backend, call, call.event)
    holder = _asks_revoked(outcome)
    # Celery reads results synchronously only: off the loop, on this path alone.
    if holder is not None and await anyio.to_thread.run_sync(_holder_revoked, task, holder):
        outcome = await _adecide(backend, call, lc.HolderRevoked(holder, call.ttl))
    answered = answer(task, call, outcome)
    if answered is not None:
        return answered
    assert isinstance(outcome, lc.Publish | lc.Duplicate)
    # Not cancelled once under way: the message goes out or not, and the key follows it
    # (freed if publishing fails); a cancellation lands once it has.
    return await publishers.run_in_publisher(lambda: publish(task, call, outcome, publisher))


def _asks_revoked(outcome: lc.Outcome) -> str | None:
    """The holder whose result the core asks about before it answers a duplicate, if any
    (and not read lately: see :class:`_NotRevoked`)."""
    if isinstance(outcome, lc.Duplicate) and outcome.unless_revoked:
        if not _not_revoked.recently(outcome.holder):
            return outcome.holder
    return None


def _holder_revoked(task: UniqueTask, holder: str) -> bool:
    """Whether the queued ``holder``'s result says ``REVOKED``; a result backend that fails
    to answer leaves the duplicate answered as before (the holder's key expires or frees)."""
    try:
        if revoked(task, holder):
            return True
        _not_revoked.found(holder)
        return False
    except Exception:
        logger.warning("could not read the state of %s[%s]", task.name, holder, exc_info=True)
        return False


async def _adecide(backend: AsyncRedisBackend, call: Call, event: lc.Event) -> lc.Outcome:
    key, keys = call.held.key, backend.keys
    flow = through(call.held.instance.handle(event), plain(keys, key))
    in_flight: list[Any] = []  # what a command cut short by a cancellation got
    try:
        return await backend.executor.run(flow, on_cancelled=in_flight.append)
    except anyio.get_cancelled_exc_class():
        # Cut short, the take may have run. Its reply is in (the executor saw the command
        # through), so a release sent now cannot overtake it: a release with this call's own
        # id frees the key if the take got it and does nothing if not. With no reply (Redis
        # did not answer), the release goes on off this path, as for any unanswered take.
        if in_flight:
            ttl = call.held.instance.policy.ttl
            lock = backend.lock(key, ttl=ttl, token=call.task_id)
            with anyio.CancelScope(shield=True):
                if isinstance(in_flight[-1], BaseException):
                    await lock.release_in_background()
                    _phantoms.add(key, call.task_id, ttl)
                else:
                    try:
                        await lock.release()
                    except LockNotOwnedError:
                        pass  # not taken: a duplicate, say
                    except BackendError:
                        logger.warning("could not free the key of a cancelled call", exc_info=True)
        raise


def answer(task: UniqueTask, call: Call, outcome: lc.Outcome) -> AsyncResult | None:
    """What a call that is not to be published gets: the duplicate's holder's result (or
    ``DuplicateTaskError``), or Redis' error; ``None`` when it is to be published (a new
    instance, or a duplicate's follower: see :mod:`.follow`)."""
    if isinstance(outcome, lc.Publish | lc.Fail) and outcome.free_later:
        # A take Redis never answered may hold the key for its whole TTL.
        config = task.unique_config
        lock = config.backend.lock(call.held.key, ttl=config.policy.ttl, token=call.task_id)
        lock.release_in_background()
    if isinstance(outcome, lc.Fail):
        if outcome.free_later:
            _phantoms.add(call.held.key, call.task_id, call.held.instance.policy.ttl)
        raise outcome.error
    if isinstance(outcome, lc.Publish) and not outcome.locked:
        logger.warning(
            "Redis unreachable: publishing %s[%s] without its unique lock",
            task.name,
            call.task_id,
        )
    if not isinstance(outcome, lc.Duplicate):
        return None
    logger.info("%s[%s] is a duplicate of %s", task.name, call.task_id, outcome.holder)
    signals.task_duplicate.send(sender=task, task_id=outcome.holder, ttl=outcome.ttl)
    policy = call.held.instance.policy
    if policy.on_duplicate == "raise":
        raise task.duplicate_error(outcome.holder, outcome.ttl)
    if follows(call.options):
        return None  # in a group or chord, or with callbacks: it publishes a follower
    return task.AsyncResult(outcome.holder)


def publish(
    task: UniqueTask, call: Call, outcome: lc.Publish | lc.Duplicate, publisher: Publisher
) -> AsyncResult:
    """Publish the call's message (the key is taken; free it if that fails), or a duplicate's
    follower under the call's own id."""
    if isinstance(outcome, lc.Duplicate):
        policy = call.held.instance.policy
        follower = task.app.tasks[FOLLOW_TASK]
        until = time.time() + policy.ttl + policy.lease
        work = work_of(task, call.held.key, call.args, call.kwargs)
        options = {"serializer": task.serializer, **call.options}  # the work's arguments
        result: AsyncResult = follower.apply_async(
            (outcome.holder, until),
            {"work": work},
            task_id=call.task_id,
            headers=call.headers,
            **options,
        )
        return result
    instance = call.held.instance
    state = instance.state if instance.state is lc.KeyState.HANDED_BACK else lc.KeyState.QUEUED
    headers = {**call.headers, KEY_HEADER: call.held.key, STATE_HEADER: state.value}
    if instance.policy.tracks_ttl_end:
        headers[HOLD_HEADER] = task.app.now().timestamp() + call.ttl
    backend, what = task.unique_config.backend, f"{task.name}[{call.task_id}]"
    try:
        result = publisher(
            call.args, call.kwargs, task_id=call.task_id, headers=headers, **call.options
        )
    except BaseException:
        if outcome.locked:
            quietly(backend, call.held, lc.PublishFailed(), what)
        raise
    if outcome.replaces is not None:
        _replaced(task, outcome.replaces, call.task_id)
    if outcome.succeeds is not None:
        logger.info("%s[%s] took the key of %s, revoked", task.name, call.task_id, outcome.succeeds)
    if isinstance(result, EagerResult) and instance.state is lc.KeyState.QUEUED:
        quietly(backend, call.held, lc.EagerDone(), what)
    return result


def _replaced(task: UniqueTask, holder: str, by: str) -> None:
    # The replaced instance never runs (its key is not its own any more: a worker skips it);
    # its result says so.
    logger.info("%s[%s] replaced by %s", task.name, holder, by)
    try:
        task.backend.mark_as_revoked(holder, reason=f"replaced by {by}")
    except Exception:
        logger.warning("could not mark %s[%s] revoked", task.name, holder, exc_info=True)
