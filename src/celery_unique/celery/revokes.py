"""A revoke shows in the result at once, on every supported Celery.

A queued unique instance that is revoked holds its key until its key is taken from it: a
call that finds it there reads its result and, on ``REVOKED``, takes its place
(:mod:`.producer`). So the result must say ``REVOKED`` as soon as the revoke is sent, not
when a worker reaches the message (minutes later behind a backlog).

Celery 5.6.2 and later do that: a worker that receives the revoke broadcast marks each id
it is not running ``REVOKED`` in the result backend (5.7 leaves a result that is final, or
``STARTED``, as it is). Earlier workers mark it only when they reach the message. There,
:func:`install` wraps the worker's ``revoke`` remote-control command, through Celery's
public registry of them (``celery.worker.control.control_command``), so that it marks the
results as 5.7 does, after Celery's own handling, which it leaves unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import celery
from celery import Celery
from celery import states as celery_states

__all__ = ["MARKED_AT_ONCE", "install", "mark_revoked", "marks_at_once"]

logger = logging.getLogger("celery_unique")

#: The first Celery whose workers mark a revoked id ``REVOKED`` when the revoke arrives.
MARKED_AT_ONCE = (5, 6, 2)
# The states a revoke may overwrite: the instance has not started anywhere (Celery 5.7's rule).
_NOT_STARTED = frozenset(
    {celery_states.PENDING, celery_states.RECEIVED, celery_states.RETRY, celery_states.REJECTED}
)
# Set on the command this module installed, so it is installed once.
_WRAPS = "celery_unique_marks_revoked"


def marks_at_once(version: Sequence[int | str]) -> bool:
    """Whether a worker of Celery ``version`` (``celery.VERSION``'s shape) marks revoked ids
    itself, as the revoke comes."""
    return tuple(int(part) for part in version[:3]) >= MARKED_AT_ONCE


def mark_revoked(
    app: Celery,
    task_ids: Iterable[str],
    running: Collection[str] = (),
    backends: Mapping[str, Any] | None = None,
) -> list[str]:
    """Mark each of ``task_ids`` ``REVOKED`` in its result backend (``backends`` names a
    task's own backend by id, where the worker holds its message; else the app's), unless it
    is ``running`` in this worker or its result says it started or ended; returns those
    marked. A backend that fails is logged, as Celery does."""
    marked = []
    for task_id in task_ids:
        if task_id in running:
            continue  # its run goes on: a revoke without terminate does not stop it
        backend = (backends or {}).get(task_id, app.backend)
        try:
            if backend.get_state(task_id) not in _NOT_STARTED:
                continue
            backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        except Exception as exc:
            logger.warning("could not mark %s revoked in the result backend: %s", task_id, exc)
            continue
        marked.append(task_id)
    return marked


def install(force: bool = False) -> bool:
    """On a Celery whose workers do not mark revoked ids at once (or with ``force``), make
    this process's ``revoke`` remote-control command do it; returns whether it is installed
    now. Only a worker reads the command; in any other process it is never called."""
    if marks_at_once(celery.VERSION) and not force:
        return False
    from celery.utils.functional import maybe_list
    from celery.worker import state as worker_state
    from celery.worker.control import Panel, control_command

    original = Panel.data["revoke"]
    if getattr(original, _WRAPS, False):
        return True
    meta = Panel.meta["revoke"]

    @functools.wraps(original)
    def revoke(state: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        answer = original(state, task_id, *args, **kwargs)
        ids = [str(one) for one in maybe_list(task_id) or ()]
        held = {request.id: request for request in list(worker_state.reserved_requests)}
        running = {request.id for request in list(worker_state.active_requests)}
        backends = {one: held[one].task.backend for one in ids if one in held}
        mark_revoked(state.app, ids, running, backends)
        return answer

    setattr(revoke, _WRAPS, True)
    control_command(
        name="revoke",
        alias=meta.alias,
        visible=meta.visible,
        default_timeout=meta.default_timeout,
        help=meta.help,
        signature=meta.signature,
        args=meta.args,
        variadic=meta.variadic,
    )(revoke)
    return True
