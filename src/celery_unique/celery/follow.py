"""A duplicate inside a canvas follows its holder, so no chord waits and no callback is lost.

A plain duplicate call publishes nothing and gets the holder's result. A duplicate that is a
member of a group or a chord header, or that carries callbacks (``link``, ``link_error``),
cannot be answered that way: Celery already counts its id in the group (a chord would wait
for it for ever) and its callbacks would never run. Such a duplicate publishes a *follower*
under its own id instead: a small task that waits (re-scheduling itself, never blocking a
worker) until the holder's result is ready, then returns that result or raises its error.
So the chord completes with the holder's result in the duplicate's place, and the
duplicate's callbacks run once, on the holder's outcome; the work itself still runs once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Task, shared_task
from celery.states import EXCEPTION_STATES, SUCCESS

__all__ = ["FOLLOW_TASK", "HolderFailed", "follow", "follows"]

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


@shared_task(name=FOLLOW_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def follow(self: Task, holder: str, until: float, wait: float = _FIRST) -> Any:
    """The holder's result, once it is ready (see the module docstring); ``until``: epoch
    seconds after which a holder still not done counts as lost."""
    result = self.app.AsyncResult(holder)
    state = result.state
    if state == SUCCESS:
        return result.result
    if state in EXCEPTION_STATES:
        error = result.result
        if isinstance(error, BaseException):
            raise error
        raise HolderFailed(f"the instance this call duplicated, {holder}, ended {state}")
    if time.time() > until:
        raise HolderFailed(
            f"the instance this call duplicated, {holder}, did not finish by its unique_ttl"
        )
    raise self.retry(args=(holder, until, min(wait * 2, _MOST)), countdown=wait)
