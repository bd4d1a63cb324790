"""The library's errors: one tree, so ``except CeleryUniqueError`` catches all of them.

::

    CeleryUniqueError
    ├── ConfigurationError (also ValueError, TypeError)  bad ttl, option, wrong client flavour
    ├── LockError                                       .key
    │   ├── LockTimeout                                 .owner, .ttl
    │   └── LockNotOwnedError                           release/extend after losing the lock
    ├── DuplicateTaskError                              .task_id, .ttl; picklable
    ├── RateLimitExceeded                               .retry_after
    └── BackendError                                    refused by Redis; chained, .outcome_unknown
        └── BackendUnavailable                          refused, timed out, loading, failing over

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
    """Redis refused the command (out of memory, no permission, ...); the message says what to
    change and the redis-py exception is chained as ``__cause__``.

    ``outcome_unknown`` is true when the command had left for Redis and no answer came back:
    it may have run. A caller that cleans up after it (an interrupted acquire) must assume so.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild, (type(self), str(self), self.__dict__)


class BackendUnavailable(BackendError):
    """Redis did not answer in time or cannot serve now: refused, timed out, no free pooled
    connection, or a passing state (loading, failing over, cluster down). Retry later."""


def _rebuild(cls: type[BaseException], message: str, state: dict[str, object]) -> BaseException:
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    error.__dict__.update(state)
    return error
