"""The Celery layer: glue from Celery's hooks and signals to the core's decisions.

:class:`~.unique.UniqueTask`, :class:`~.ratelimited.RateLimitedTask` and the settings they
read (:mod:`.settings`). The only place, with :mod:`celery_unique.compat`, that imports Celery.

The names below are what a layer built on these tasks (the compat layers, or a project's own
task base) may use; the modules' other names may change with the layer's internals:

* the task classes and their override points: :class:`UniqueTask` (``unique_setting``, whose
  ``"enabled"`` turns uniqueness off, ``unique_key_function``, ``redis_backend``,
  ``async_redis_backend``, ``duplicate_error``, ``skipped_result``),
  :class:`RateLimitedTask` (``rate_setting``), their base :class:`RedisTask`, and
  :func:`arguments_key` (a call's name from its arguments);
* settings: :class:`Setting`, :func:`from_task`, :func:`conf_setting`, and the lock store
  (:class:`StoreSettings` names a layer's own settings of it; :func:`backend_for`,
  :func:`async_backend_for` build it once per app; :func:`key_prefix`);
* locks seen from outside a task: :func:`holder_id` (the task id in a lock's owner token),
  :func:`force_release`, :func:`unlink_locks`.
"""

from __future__ import annotations

from .admin import force_release, holder_id, unlink_locks
from .base import RedisTask, arguments_key
from .ratelimited import RateLimitedTask
from .settings import Setting, conf_setting, from_task
from .store import StoreSettings, async_backend_for, backend_for, key_prefix
from .unique import UniqueTask

__all__ = [
    "RateLimitedTask",
    "RedisTask",
    "Setting",
    "StoreSettings",
    "UniqueTask",
    "arguments_key",
    "async_backend_for",
    "backend_for",
    "conf_setting",
    "force_release",
    "from_task",
    "holder_id",
    "key_prefix",
    "unlink_locks",
]
