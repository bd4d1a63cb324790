"""A duplicate inside a canvas follows its holder, so no chord waits and no callback is lost.

A plain duplicate call publishes nothing and gets the holder's result. A duplicate that is a
member of a group or a chord header, or that carries callbacks (``link``, ``link_error``),
cannot be answered that way: Celery already counts its id in the group (a chord would wait
for it for ever) and its callbacks would never run. Such a duplicate publishes a *follower*
under its own id instead: a small task that waits (re-scheduling itself, never blocking a
worker) until the holder's result is ready, then returns that result or raises its error.
So the chord completes with the holder's result in the duplicate's place, and the
duplicate's callbacks run once, on the holder's outcome; the work itself still runs once.

A holder may never run: a producer whose take Redis answered too late told its caller so
and never published it, yet the key named it until the clean-up freed it. A follower that
knows the work it stands for (``work``) therefore also looks at the key: a holder that
holds no key and has no result for a while (:func:`~celery_unique.core.lifecycle.
follower_takes_over`) is lost, and the follower applies the work itself under its own id,
so the callers of that id get a result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore
from celery.states import FAILURE, REVOKED, SUCCESS

from ..core import locks
from ..core.lifecycle import follower_takes_over, holder_id
from ..errors import CeleryUniqueError

__all__ = ["FOLLOW_TASK", "HolderFailed", "follow", "follows", "work_of"]

#: The follower's task name (registered on every app, as a shared task).
FOLLOW_TASK = "celery_unique.follow"
# Seconds between looks at the holder's result: soon at first, then less often.
_FIRST, _MOST = 0.2, 5.0


class HolderFailed(Exception):
    """The instance a duplicate followed ended without a result (revoked, or its result
    was lost): the duplicate fails with it."""


def follows(options: Mapping[str, Any]) -> bool:
    """Whether a duplicate call with these ``apply_async`` options must publish a follower:
    it is a group member or a chord's header member, or it has callbacks."""
    return any(options.get(name) for name in ("group_id", "chord", "link", "link_error"))


def work_of(task: Task, key: str, args: Any, kwargs: Any) -> dict[str, Any]:
    """What a follower of ``task``'s call (``args``, ``kwargs``, unique lock ``key``) needs
    to apply the work itself should its holder be lost."""
    return {"task": task.name, "key": key, "args": list(args or ()), "kwargs": dict(kwargs or {})}


@shared_task(name=FOLLOW_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def follow(
    self: Task,
    holder: str,
    until: float,
    wait: float = _FIRST,
    work: dict[str, Any] | None = None,
    unseen: float | None = None,
) -> Any:
    """The holder's result, once it is ready (see the module docstring). ``until``: epoch
    seconds after which a holder still not done counts as lost, for a follower without
    ``work`` (:func:`work_of`); ``unseen``: since when (epoch) the holder holds no key."""
    result = self.app.AsyncResult(holder)
    state = result.state
    if state == SUCCESS:
        return result.result
    if state in (FAILURE, REVOKED):  # RETRY is on its way: it runs again
        error = result.result
        if isinstance(error, BaseException):
            raise error
        raise HolderFailed(f"the instance this call duplicated, {holder}, ended {state}")
    if work is None:
        if time.time() > until:
            raise HolderFailed(
                f"the instance this call duplicated, {holder}, did not finish by its unique_ttl"
            )
    else:
        take_over, unseen = follower_takes_over(_holds(self, work, holder), unseen, time.time())
        if take_over:
            _apply_work(self, work)
    raise self.retry(
        args=(holder, until, min(wait * 2, _MOST)),
        kwargs={"work": work, "unseen": unseen},
        countdown=wait if unseen is None else min(wait, 0.5),
    )


def _holds(follower: Task, work: Mapping[str, Any], holder: str) -> bool:
    """Whether ``holder`` holds the work's unique key (queued, or running); an unreachable
    lock store counts as yes: nothing is taken over on a guess."""
    backend = follower.app.tasks[work["task"]].unique_config.backend
    try:
        for key in (backend.keys.lock(work["key"]), backend.keys.running_lock(work["key"])):
            owner = backend.executor.execute(locks.owner(key))
            if owner is not None and holder_id(owner) == holder:
                return True
    except CeleryUniqueError:
        return True
    return False


def _apply_work(follower: Task, work: Mapping[str, Any]) -> None:
    """Apply the work under the follower's own id, in the follower's place (raises
    :class:`Ignore` once it is published, or a retry that follows its new holder)."""
    task = follower.app.tasks[work["task"]]
    request = follower.request
    if request.group or request.chord or request.callbacks or request.errbacks:
        # Celery's replace carries the group, the chord and the callbacks over; a new holder
        # by now makes the producer publish a follower of it under this same id.
        follower.replace(task.si(*work["args"], **work["kwargs"]))
    applied = task.apply_async(work["args"], work["kwargs"], task_id=request.id)
    if applied.id == request.id:
        raise Ignore()  # the work's own run answers this id
    raise follower.retry(args=(applied.id, 0.0, _FIRST), kwargs={"work": dict(work)}, countdown=0)
