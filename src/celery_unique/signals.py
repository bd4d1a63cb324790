"""Signals of unique and limited tasks, of Celery's own ``Signal`` type: connect to them as to
Celery's (``@task_duplicate.connect``). Each is sent where the event happens.

* :data:`task_duplicate`: ``apply_async``/``aapply_async`` found the key held (the producer);
  ``sender`` the task, ``task_id`` the holder's id, ``ttl`` seconds left on its key.
* :data:`task_deferred`: a run was put back for later (the worker); ``task_id``, ``reason``
  (``"rate_limit"``, ``"concurrency"``, ``"running_elsewhere"`` or ``"while_running"``) and
  ``countdown`` (seconds).
* :data:`task_lock_lost`: renewal found a running instance's key gone or taken (the worker;
  sent from the renewal thread); ``task_id``.

::

    from celery_unique.signals import task_duplicate

    @task_duplicate.connect
    def count(sender, task_id, ttl, **_):
        DUPLICATES.labels(task=sender.name).inc()

Importing this module imports Celery.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["DEFERRAL_REASONS", "task_deferred", "task_duplicate", "task_lock_lost"]

#: Why a run was deferred (``task_deferred``'s ``reason``).
DEFERRAL_REASONS = (
    "rate_limit",
    "concurrency",
    "running_elsewhere",
    "while_running",
    "unreachable",
)

task_duplicate = Signal(name="task_duplicate")
"""A call found its key held: nothing was published. ``sender=task, task_id, ttl``."""

task_deferred = Signal(name="task_deferred")
"""A run was put back for later, under the same id. ``sender=task, task_id, reason, countdown``."""

task_lock_lost = Signal(name="task_lock_lost")
"""A running instance lost its key (renewal found it gone). ``sender=task, task_id``."""
