"""celery-unique: unique Celery tasks, distributed locks and fleet-wide rate limits on Redis.

::

    from celery_unique import RedisBackend

    backend = RedisBackend.from_url("redis://localhost:6379/0")
    with backend.lock("report:42", ttl=30, timeout=5):
        ...

Importing this package does not import Celery; the task classes load it when first used.
"""

from __future__ import annotations

from ._backend import AsyncRedisBackend, RedisBackend
from ._exceptions import (
    BackendError,
    BackendUnavailable,
    CeleryUniqueError,
    ConfigurationError,
    DuplicateTaskError,
    LockError,
    LockNotOwnedError,
    LockTimeout,
    RateLimitExceeded,
)
from ._lock import AsyncLock, Lock
from ._models import Acquisition

__all__ = [
    "Acquisition",
    "AsyncLock",
    "AsyncRedisBackend",
    "BackendError",
    "BackendUnavailable",
    "CeleryUniqueError",
    "ConfigurationError",
    "DuplicateTaskError",
    "Lock",
    "LockError",
    "LockNotOwnedError",
    "LockTimeout",
    "RateLimitExceeded",
    "RedisBackend",
]

__version__ = "0.1.0.dev0"
