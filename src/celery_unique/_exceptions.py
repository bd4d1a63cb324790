"""The library's errors: one tree, so ``except CeleryUniqueError`` catches all of them.

::

    CeleryUniqueError
    ├── ConfigurationError (also ValueError, TypeError)  bad ttl, option, wrong client flavour
    ├── LockError                                       .key
    │   ├── LockTimeout                                 .owner, .ttl
    │   └── LockNotOwnedError                           release/extend after losing the lock
    ├── DuplicateTaskError                              .task_id, .ttl; picklable
    ├── RateLimitExceeded                               .retry_after
    └── BackendError                                    chained from the redis error
        └── BackendUnavailable                          connection refused, timeout

Context travels on attributes, never argument values (they may be secrets); every message
says what to do next.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CeleryUniqueError",
    "ConfigurationError",
    "DuplicateTaskError",
    "LockError",
    "LockNotOwnedError",
    "LockTimeout",
    "RateLimitExceeded",
]


class CeleryUniqueError(Exception):
    """Base class of every error raised by celery-unique."""


class ConfigurationError(CeleryUniqueError, ValueError, TypeError):
    """A setting, argument or client is wrong; the message names it and what is accepted."""


class LockError(CeleryUniqueError):
    """A lock operation failed; ``key`` is the lock's name."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild, (type(self), str(self), self.__dict__)


class LockTimeout(LockError):
    """The lock could not be acquired in time; ``owner`` holds it for ``ttl`` more seconds."""

    def __init__(self, message: str, *, key: str, owner: str | None, ttl: float | None) -> None:
        super().__init__(message, key=key)
        self.owner = owner
        self.ttl = ttl


class LockNotOwnedError(LockError):
    """Release or extend by a caller that no longer owns the lock (it expired or was taken)."""


class DuplicateTaskError(CeleryUniqueError):
    """An instance of the task with the same key is already queued or running.

    ``task_id`` is the holder's task id; ``ttl`` the lock's remaining seconds (``None`` if unknown).
    """

    def __init__(self, message: str, *, task_id: str, ttl: float | None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.ttl = ttl

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only attributes do not survive the default pickling of exceptions
        # (it replays ``args`` only); results backends pickle errors, so rebuild by hand.
        return _rebuild, (type(self), str(self), self.__dict__)


class RateLimitExceeded(CeleryUniqueError):
    """The rate limit did not admit the call in time; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild, (type(self), str(self), self.__dict__)


class BackendError(CeleryUniqueError):
    """Redis answered with an error; the redis-py exception is chained as ``__cause__``."""


class BackendUnavailable(BackendError):
    """Redis could not be reached in time (refused, timed out, pool exhausted)."""


def _rebuild(cls: type[BaseException], message: str, state: dict[str, object]) -> BaseException:
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    error.__dict__.update(state)
    return error
