"""Carrying out a unique key's lifecycle: the one place its lock actions meet Redis.

The core decides (:class:`~celery_unique.core.lifecycle.Instance`); this module drives its
flows. :func:`perform` is the sync driver, used by ``apply_async`` and by the worker's run; a
run's own lock (taken over at the start, renewed while the body runs, handed back or released
at the end) is a :class:`~celery_unique.Lock` kept on the :class:`Held` instance. The async
producer drives the same flows through :func:`~celery_unique.core.plans.through` on an
:class:`~celery_unique.AsyncRedisBackend` (it never acts on a run's lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends import RedisBackend
from ..core import lifecycle as lc
from ..core.plans import steps_for, through
from ..core.steps import Flow
from ..errors import BackendError, LockNotOwnedError
from ..locks import Lock

__all__ = ["Held", "perform", "quietly"]

logger = logging.getLogger("celery_unique")


@dataclass(slots=True)
class Held:
    """One instance as this process follows it: the machine, its key, and (while a delivery
    runs) the run's lock. ``ends``: ``time.monotonic()`` when the instance's TTL ends, where
    that counts; ``on_lost``: what renewal calls when the run's lease is lost."""

    instance: lc.Instance
    key: str
    ends: float | None = None
    on_lost: Callable[[], object] = field(default=lambda: None)
    lock: Lock | None = None

    def ttl_left(self) -> float | None:
        """Seconds until the instance's TTL ends, where that counts."""
        return None if self.ends is None else self.ends - time.monotonic()


def perform(backend: RedisBackend, held: Held, event: lc.Event) -> lc.Outcome:
    """Feed ``event`` to the instance and carry out every action its rule asks for; an
    executor's error is thrown back into the rule (which fails, or fails open)."""
    flow = through(held.instance.handle(event), lambda action: _steps(backend, held, action))
    return backend.executor.run(flow)


def quietly(backend: RedisBackend, held: Held, event: lc.Event, what: str) -> None:
    """:func:`perform`, where the work is done or lost already: a Redis failure is logged
    (the key expires by itself), never raised. ``what`` names the instance for the log."""
    try:
        perform(backend, held, event)
    except BackendError:
        policy = held.instance.policy
        logger.warning(
            "could not update the unique lock of %s; it expires within %.0f s",
            what,
            policy.lease if held.lock is not None else policy.ttl,
            exc_info=True,
        )


def _steps(backend: RedisBackend, held: Held, action: lc.LockAction) -> Flow[Any]:
    if isinstance(action, lc.Take | lc.ReleaseAny):
        return steps_for(action, backend.keys, held.key)
    return _on_run_lock(backend, held, action)


def _on_run_lock(
    backend: RedisBackend, held: Held, action: lc.TakeOver | lc.HandOver | lc.Release
) -> Flow[Any]:
    # The run's lock does its own round trip (and renews): a flow of no steps of its own.
    if isinstance(action, lc.TakeOver):
        keys = backend.keys
        held.lock = Lock(
            backend.executor,
            keys,
            held.key,
            action.ttl,
            key=keys.running_lock(held.key) if action.running else None,
            token=action.token,
            auto_renew=True,
            lifetime=action.lifetime,
            on_lost=lambda _lock: held.on_lost(),
        )
        freeing = keys.lock(held.key) if action.running else None
        return held.lock.take_over(action.predecessor, freeing=freeing)
    lock = held.lock
    if lock is None:  # only a run acts on its own lock
        raise lc.IllegalTransition(f"{action!r} without a run's lock")
    if isinstance(action, lc.HandOver):
        return lock.hand_over(action.token, action.ttl)
    try:
        lock.release()
    except LockNotOwnedError:
        return False  # lost (expired, or taken over): nothing of ours to free
    return True
    yield  # a generator: the answer is its return value
