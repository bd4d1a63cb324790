"""celery-unique: unique Celery tasks, distributed locks and fleet-wide rate limits on Redis.

::

    from celery_unique import RedisBackend

    backend = RedisBackend.from_url("redis://localhost:6379/0")
    with backend.lock("report:42", ttl=30, timeout=5):
        ...

Importing this package does not import Celery; the task classes load it when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backends import AsyncRedisBackend, RedisBackend
from .core.rates import RateLimit
from .core.results import Acquisition, Decision, Reservation
from .errors import (
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
from .limiters import AsyncRateLimiter, RateLimiter
from .locks import AsyncLock, AsyncSemaphore, Lock, Semaphore

# The Celery task classes load Celery, so they are imported on first use only: an asyncio
# web app that just wants AsyncRedisBackend does not pay for Celery.
_LAZY = {
    "UniqueTask": ".celery.unique",
    "RateLimitedTask": ".celery.ratelimited",
    "clear_locks": ".celery.unique",
}


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name == "signals":  # Celery's Signal type: it imports Celery
        value = importlib.import_module(".signals", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from . import signals  # noqa: F401  # loaded on first use, like the task classes
    from .celery.ratelimited import RateLimitedTask
    from .celery.unique import UniqueTask, clear_locks

__all__ = [
    "Acquisition",
    "AsyncLock",
    "AsyncRateLimiter",
    "AsyncRedisBackend",
    "AsyncSemaphore",
    "BackendError",
    "BackendUnavailable",
    "CeleryUniqueError",
    "ConfigurationError",
    "Decision",
    "DuplicateTaskError",
    "Lock",
    "LockError",
    "LockNotOwnedError",
    "LockTimeout",
    "RateLimit",
    "RateLimitExceeded",
    "RateLimitedTask",
    "RateLimiter",
    "RedisBackend",
    "Reservation",
    "Semaphore",
    "UniqueTask",
    "clear_locks",
]

# The one place the version is written: the build reads it from here (pyproject.toml's
# [tool.hatch.version]). CHANGELOG.md and docs/versioning.md say what a new one may change.
__version__ = "0.1.0.dev0"
