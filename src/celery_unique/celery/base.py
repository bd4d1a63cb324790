"""What both task classes share: the lock store hook, the message headers, and deferral."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from celery import Celery, Task
from celery import signals as celery_signals
from celery.backends.base import DisabledBackend
from celery.backends.rpc import RPCBackend
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from celery.states import REVOKED

from .. import signals
from ..backends import RedisBackend
from ..core import admission
from ..core.arguments import ArgumentKey, UniqueOn
from ..core.lifecycle import Deferral, Event, Expired, LostChild, Revoked, TimeLimit
from . import revokes
from .store import backend_for

__all__ = [
    "RedisTask",
    "arguments_key",
    "defer",
    "delay_of",
    "results_shared",
    "revoked",
    "whole_seconds",
]

logger = logging.getLogger("celery_unique")


class RedisTask(Task):  # type: ignore[misc]
    """A Celery task whose locks and limits live in Redis."""

    def redis_backend(self) -> RedisBackend:
        """The backend this task's locks and limits live in: the app's (see
        :func:`~.store.backend_for`). Override to use another Redis."""
        return backend_for(self.app)

    def free_ended_instance(
        self, task_id: str, request: Any, args: Any, kwargs: Any, event: Event
    ) -> None:
        """The worker's main process saw ``event`` (Revoked, Expired, TimeLimit, LostChild)
        happen to instance ``task_id``, which its run may never see: free what it holds.
        Each class frees its own (its key, its slot) and calls ``super()``."""


def arguments_key(
    task: Task, on: UniqueOn = None
) -> Callable[[Sequence[Any], Mapping[str, Any]], str]:
    """The name of a call of ``task``: the task name and a digest of its arguments (those
    ``on`` names, as ``unique_on`` takes them), bound to its signature so that ``f(1)`` and
    ``f(x=1)`` give one name; no argument value appears in it."""
    return ArgumentKey(task.name, task.run, on)


def results_shared(task: Task) -> bool:
    """Whether any process can read ``task``'s results, a revoke's ``REVOKED`` included: it
    has a result backend, and not ``rpc://`` (whose results only their caller sees), outside
    ``task_always_eager`` (whose results are not stored)."""
    if task.app.conf.task_always_eager:
        return False
    return not isinstance(task.backend, DisabledBackend | RPCBackend)


def revoked(task: Task, task_id: str) -> bool:
    """Whether instance ``task_id``'s result says it was revoked (or replaced); ``False``
    without a result backend (nothing to learn it from)."""
    try:
        return bool(task.backend.get_state(task_id) == REVOKED)
    except NotImplementedError:
        return False


def delay_of(app: Celery, options: Mapping[str, Any]) -> float:
    """Seconds until an ETA/countdown message may run: a queued key must outlive it."""
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


def whole_seconds(app: Celery) -> bool:
    """Whether a countdown ``app`` publishes goes through RabbitMQ's native delayed delivery,
    which counts whole seconds only. Celery's own test (``Celery.send_task``, and the
    worker's ``DelayedDelivery`` step): an AMQP broker and a quorum queue among the app's
    queues (``task_default_queue_type="quorum"``, or a queue's ``x-queue-type`` argument)."""
    queues = app.amqp.queues
    if not any((q.queue_arguments or {}).get("x-queue-type") == "quorum" for q in queues.values()):
        return False
    # No network: the connection is never opened, its transport class is all we read.
    with app.connection_for_write() as connection:
        return bool(connection.transport.driver_type == "amqp")


def defer(task: Task, deferral: Deferral) -> NoReturn:
    """Put the running instance back in the queue for ``deferral.countdown`` seconds and stop
    this run, as the core decided (:mod:`~celery_unique.core.lifecycle`,
    :mod:`~celery_unique.core.admission`), in a countdown the transport can carry
    (:func:`~celery_unique.core.admission.fit`: whole seconds, rounded up, where
    :func:`whole_seconds`). The unique key's TTL covers it: ``apply_async`` adds the
    countdown.

    Same task id, same retry count (a deferral is not a retry: it uses none of
    ``max_retries`` up), options untouched, the deferral's headers added. Published through
    ``apply_async``, so a unique task hands its key back to the queued copy. The run ends as
    a retry (the result reads ``RETRY``), or, where the deferral stores no state, as
    ignored: a second delivery of an instance that runs elsewhere must not write over that
    run's state, its success included.
    """
    request = task.request
    deferral = admission.fit(deferral, whole_seconds(task.app))
    countdown, reason = deferral.countdown, deferral.kind.value
    logger.info("%s[%s] deferred by %.2f s: %s", task.name, request.id, countdown, deferral.why)
    signals.task_deferred.send(sender=task, task_id=request.id, reason=reason, countdown=countdown)
    copy = task.signature_from_request(
        request,
        request.args,
        request.kwargs,
        countdown=countdown,
        retries=request.retries,
        headers={**(request.headers or {}), **deferral.headers},
    )
    if deferral.bypass:  # Celery's own publish, past any lock call of this library's
        Task.apply_async(task, copy.args, copy.kwargs, **copy.options)
    else:
        copy.apply_async()
    if not deferral.stores_state:
        raise Ignore(deferral.why)
    raise Retry(deferral.why, when=countdown)


# -- what the worker's main process sees: a run killed there never sees its own end ------------


@celery_signals.task_revoked.connect(weak=False, dispatch_uid="celery_unique.revoked")  # type: ignore[untyped-decorator]
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """Revoked, expired or terminated (queued or running)."""
    if isinstance(sender, RedisTask) and request is not None:
        event = Expired() if expired else Revoked()
        sender.free_ended_instance(request.id, request, request.args, request.kwargs, event)


@celery_signals.task_failure.connect(weak=False, dispatch_uid="celery_unique.failure")  # type: ignore[untyped-decorator]
def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """A hard time limit, a lost worker child or a dropped Reject, seen by the main process
    (failures inside the run are the run's own business)."""
    from billiard.exceptions import WorkerLostError

    if not isinstance(sender, RedisTask) or task_id is None:
        return
    if isinstance(exception, TimeLimitExceeded):
        event: Event = TimeLimit()
    elif isinstance(exception, WorkerLostError | Reject):
        event = LostChild()
    else:
        return
    request = sender.request if sender.request.id == task_id else None
    sender.free_ended_instance(task_id, request, args, kwargs, event)


# A revoke must show in the result at once (see .revokes): workers of an older Celery learn to.
revokes.install()
