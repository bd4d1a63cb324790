"""A unique task's delivery in the worker: Celery's run and its endings, as lifecycle events.

:func:`run` starts a delivery (a ``Start`` event: the key is taken over by a run token and
renewed), carries out what the core answers (run, skip, defer, run without the key) and turns
the body's end into the matching event (``Success``, ``Failure``, ``Ignored``, ``Rejected``,
``Requeue``; a retry hands the key back from ``apply_async``). :func:`free_ended` does the
same for what only the worker's main process sees (revoked, expired, killed).

A delivery under way is kept on Celery's own request context (:func:`current`), where
``apply_async`` from inside the run (a retry, a deferral) finds it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry
from celery.states import READY_STATES, SUCCESS

from .. import signals
from ..core import lifecycle as lc
from ..core.messages import (
    DEFERRED_HEADER,
    HOLD_HEADER,
    KEY_HEADER,
    STATE_HEADER,
    UNREACHABLE_HEADER,
    WAITED_HEADER,
)
from .base import defer, revoked
from .follow import FOLLOW_TASK, work_of
from .plans import Held, perform, quietly

if TYPE_CHECKING:
    from .unique import UniqueTask

__all__ = ["current", "free_ended", "run"]

logger = logging.getLogger("celery_unique")

# The request context's attribute that holds the delivery under way.
_HELD = "celery_unique_held"
# The states a message can say its instance is in as it reaches a worker.
_ARRIVING = {state.value: state for state in (lc.KeyState.QUEUED, lc.KeyState.HANDED_BACK)}


def current(request: Any) -> Held | None:
    """The delivery of this request's instance under way in this worker, if any."""
    held: Held | None = getattr(request, _HELD, None)
    return held


def run(
    task: UniqueTask, args: tuple[Any, ...], kwargs: dict[str, Any], body: Callable[[], Any]
) -> Any:
    """Run ``body`` (the task's own ``__call__``) as the core says: under the key, without
    it, not at all (the key is another instance's), or later (deferred)."""
    request = task.request
    config = task.unique_config
    policy = config.policy
    left = ttl_left(task, request) if policy.tracks_ttl_end else None
    deferred = bool(getattr(request, DEFERRED_HEADER, None))
    carried = getattr(request, KEY_HEADER, None)  # published by apply_async with its key
    held = Held(
        lc.Instance(request.id, policy, _arriving_state(request, deferred)),
        carried or config.key(args, kwargs),
        ends=None if left is None else time.monotonic() + left,
    )
    held.on_lost = lambda: _lease_lost(task, held)
    waited = int(getattr(request, WAITED_HEADER, None) or 0)
    unreachable = int(getattr(request, UNREACHABLE_HEADER, None) or 0)
    start = lc.Start(
        os.urandom(8).hex(),
        ttl_left=left,
        deferred=deferred,
        waited=waited,
        unreachable=unreachable,
        applied=carried is not None,
    )
    outcome = perform(config.backend, held, start)
    if isinstance(outcome, lc.Fail):
        raise outcome.error
    if isinstance(outcome, lc.Skip):
        # Its callers wait on its id: it yields the holder's result; unless its callers were
        # told it is over (REVOKED: revoked, or replaced by a newer call).
        if outcome.follow and not revoked(task, request.id):
            policy = config.policy
            follower = task.app.tasks[FOLLOW_TASK].s(
                outcome.holder,
                time.time() + policy.ttl + policy.lease,
                work=work_of(task, held.key, args, kwargs),
            )
            follower.set(serializer=task.serializer)  # the work's arguments, as they came
            logger.info(
                "%s[%s] follows %s, which holds its unique key",
                task.name,
                request.id,
                outcome.holder,
            )
            return task.replace(follower)
        return task.skipped_result(outcome.holder)
    setattr(request, _HELD, held)  # a retry or a deferral publishes from here on
    try:
        if isinstance(outcome, lc.Deferral):
            defer(task, outcome)
        assert isinstance(outcome, lc.Run), outcome
        if not outcome.locked:
            logger.info(
                "%s[%s] runs without its unique lock: %s", task.name, request.id, outcome.why
            )
            return body()
        if outcome.unless_done and _ran_elsewhere(task, request.id):
            quietly(config.backend, held, lc.RanElsewhere(), f"{task.name}[{request.id}]")
            raise Ignore()
        return _locked(task, held, body)
    finally:
        setattr(request, _HELD, None)
        if held.lock is not None:
            held.lock.abandon()  # whatever happened, renewal stops with the run


def _locked(task: UniqueTask, held: Held, body: Callable[[], Any]) -> Any:
    def end(event: lc.Event) -> None:
        quietly(task.unique_config.backend, held, event, f"{task.name}[{task.request.id}]")

    try:
        retval = body()
    except Retry:
        raise  # apply_async handed the key back to the queued copy
    except Reject as reject:
        end(lc.Requeue() if reject.requeue else lc.Rejected())
        raise
    except Ignore:
        end(lc.Ignored(held.ttl_left()))
        raise
    except BaseException:
        end(lc.Failure(held.ttl_left()))
        raise
    end(lc.Success(held.ttl_left()))
    return retval


def free_ended(
    task: UniqueTask, task_id: str, request: Any, args: Any, kwargs: Any, event: lc.Event
) -> None:
    """Free the key of an instance the main process saw revoked, expired or killed (it
    cannot tell a queued one from a running one: the rule frees either)."""
    key = getattr(request, KEY_HEADER, None) if request is not None else None
    if not key:
        try:
            key = task.unique_key(args or (), kwargs or {})
        except Exception:  # arguments that no longer bind: the lease frees the key
            return
    queued = isinstance(event, lc.Revoked | lc.Expired)
    state = lc.KeyState.QUEUED if queued else lc.KeyState.RUNNING
    held = Held(lc.Instance(task_id, task.unique_config.policy, state), key)
    quietly(task.unique_config.backend, held, event, f"{task.name}[{task_id}]")


def ttl_left(task: UniqueTask, request: Any) -> float:
    """Seconds until this instance's ``unique_ttl`` ends (from now if it never had one)."""
    hold = getattr(request, HOLD_HEADER, None)
    if not hold:  # sent around apply_async (send_task, beat): the TTL runs from now
        return task.unique_config.policy.ttl
    return float(hold) - float(task.app.now().timestamp())


def _arriving_state(request: Any, deferred: bool) -> lc.KeyState:
    # The message says where its instance stands; one sent by an older version (or around
    # apply_async) does not: then a retried or deferred copy was handed back.
    said = _ARRIVING.get(getattr(request, STATE_HEADER, None) or "")
    if said is not None:
        return said
    return lc.KeyState.HANDED_BACK if request.retries or deferred else lc.KeyState.QUEUED


def _ran_elsewhere(task: UniqueTask, task_id: str) -> bool:
    """Whether the delivery this copy waited for ran the instance to success. It frees the
    key a moment before Celery stores its result: a result not final yet is waited for
    (``RESULT_GRACE`` at most; a delivery that died leaves none)."""
    deadline = time.monotonic() + lc.RESULT_GRACE
    while True:
        try:
            state = task.AsyncResult(task_id).state
        except NotImplementedError:  # no result backend: nothing to learn it from
            return False
        if state in READY_STATES or time.monotonic() >= deadline:
            return bool(state == SUCCESS)
        time.sleep(0.05)


def _lease_lost(task: UniqueTask, held: Held) -> None:
    perform(task.unique_config.backend, held, lc.LeaseLost())  # no action: the state only
    task_id = held.instance.task_id
    logger.error(
        "%s[%s] lost its unique lock while running: another instance may start",
        task.name,
        task_id,
    )
    signals.task_lock_lost.send(sender=task, task_id=task_id)
