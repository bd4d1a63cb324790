"""How a unique key's lock actions become Redis steps: the one translation that the sync
producer, the async producer and the worker share.

A lifecycle flow (``Instance.handle(event)``) yields lock actions; :func:`through` turns it
into a flow of Redis steps that any executor drives (``executor.run(through(...))``, with or
without ``await``), each action carried out by its ops, its answer sent back in, an
executor's error thrown back in (where the lifecycle decides: fail, or fail open). The
actions on a run's own lock (:class:`~.lifecycle.TakeOver`, :class:`~.lifecycle.HandOver`,
:class:`~.lifecycle.Release`) are renewed by a :class:`~celery_unique.Lock` of the worker's,
which carries them out; the worker asks :func:`steps_for` for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BackendError
from . import locks
from .keys import KeySpace
from .lifecycle import RUN_SEPARATOR, LockAction, Outcome, ReleaseAny, Take
from .lifecycle import Flow as LifecycleFlow
from .steps import Flow

__all__ = ["plain", "steps_for", "through"]


def steps_for(action: Take | ReleaseAny, keys: KeySpace, key: str) -> Flow[Any]:
    """The Redis steps of a lock action on key ``key`` (a lock name in ``keys``), returning
    its answer: an :class:`~.results.Acquisition` for a take, a bool for a release."""
    if isinstance(action, Take):
        op = locks.acquire_once(keys.lock(key), action.token, action.ttl, action.predecessor)
        return op.parse((yield op.step))
    # Whichever token of the instance holds it: the task id, or a run's (the id + a suffix).
    prefix = action.task_id + RUN_SEPARATOR
    release = locks.release(keys.lock(key), action.task_id, prefix)
    freed = release.parse((yield release.step))
    if action.running_too:
        twin = locks.release(keys.running_lock(key), action.task_id, prefix)
        freed = twin.parse((yield twin.step)) or freed
    return freed


def through(flow: LifecycleFlow, steps: Callable[[LockAction], Flow[Any]]) -> Flow[Outcome]:
    """``flow`` as a flow of Redis steps: each lock action it yields is carried out by the
    flow ``steps(action)`` returns (its answer sent back in); an executor's error met there
    is thrown into ``flow``, where the lifecycle decides (fail, or fail open)."""
    answer: Any = None
    error: BackendError | None = None
    while True:
        try:
            action = flow.send(answer) if error is None else flow.throw(error)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome
        answer, error = None, None
        try:
            answer = yield from steps(action)
        except BackendError as exc:  # the executor threw it in at one of the steps
            error = exc


def plain(keys: KeySpace, key: str) -> Callable[[LockAction], Flow[Any]]:
    """The ``steps`` of :func:`through` for a producer, whose actions never act on a run's
    lock: :func:`steps_for` on key ``key``."""

    def steps(action: LockAction) -> Flow[Any]:
        if not isinstance(action, Take | ReleaseAny):
            raise TypeError(f"{action!r} acts on a run's lock: carry it out with that lock")
        return steps_for(action, keys, key)

    return steps
