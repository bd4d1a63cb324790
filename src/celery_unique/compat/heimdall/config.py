"""celery-heimdall's settings: the task's ``heimdall`` option first, then ``heimdall_*``."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

__all__ = ["Config"]


class Config:
    """Settings of one task (or, with ``task=None``, of the app).

    Each is read from the task's ``heimdall={...}`` option first, then from
    ``app.conf.heimdall_<name>``, then a default.
    """

    def __init__(self, app: Celery, *, task: Task | None = None) -> None:
        self.app = app
        self.task = task

    def _from_task_or_app(self, key: str, default: Any) -> Any:
        if self.task is not None:
            value = (getattr(self.task, "heimdall", None) or {}).get(key)
            if value is not None:
                return value
        return self.app.conf.get(f"heimdall_{key}", default)

    @property
    def unique_timeout(self) -> float:
        """Seconds a unique task's lock lasts from queueing, even if it still runs (1 h)."""
        return float(self._from_task_or_app("unique_timeout", 60 * 60))

    @property
    def unique_raises(self) -> bool:
        """Raise :class:`AlreadyQueuedError` on a duplicate instead of returning its result."""
        return bool(self._from_task_or_app("unique_raises", False))

    @property
    def lock_prefix(self) -> str:
        """Prefix of unique lock names (``"h-lock:"``)."""
        return str(self._from_task_or_app("lock_prefix", "h-lock:"))

    @property
    def rate_limit_prefix(self) -> str:
        """Prefix of rate-limit bucket names (``"h-rate:"``)."""
        return str(self._from_task_or_app("rate_limit_prefix", "h-rate:"))

    @property
    def unique_lock_blocking(self) -> bool:
        """Read for compatibility only: a duplicate is refused at once, never waited for."""
        return bool(self._from_task_or_app("unique_lock_blocking", True))

    @property
    def unique_lock_timeout(self) -> float:
        """Read for compatibility only: a duplicate is refused at once, never waited for."""
        return float(self._from_task_or_app("unique_lock_timeout", 1))
