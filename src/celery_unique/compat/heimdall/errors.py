"""celery-heimdall's exception, as a :class:`celery_unique.DuplicateTaskError`."""

from __future__ import annotations

from ... import DuplicateTaskError

__all__ = ["AlreadyQueuedError"]


class AlreadyQueuedError(DuplicateTaskError):
    """A unique task is already queued or running (``heimdall={"unique_raises": True}``).

    ``likely_culprit`` is the id of the instance holding the lock (read in the same atomic
    call that found it held, so unlike celery-heimdall's it is never a guess) and
    ``expires_in`` the lock's remaining whole seconds. Also a
    :class:`celery_unique.DuplicateTaskError`, with ``task_id`` and ``ttl``.
    """

    def __init__(self, *, expires_in: int | None = None, likely_culprit: str | None = None) -> None:
        left = "an unknown time" if expires_in is None else f"{expires_in} s"
        super().__init__(
            f"task {likely_culprit} is already queued or running with this unique key; its "
            f"lock expires in {left}",
            task_id=likely_culprit or "",
            ttl=None if expires_in is None else float(expires_in),
        )
        self.likely_culprit = likely_culprit
        self.expires_in = expires_in

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(likely_culprit={self.likely_culprit!r}, "
            f"expires_in={self.expires_in!r})"
        )
