"""The send policy, stated once for both executors: how long one operation may take, when a
command is sent again, and the one eviction check each executor makes.

Both loops (:mod:`.sync` and :mod:`.sender`) drive these objects and only move bytes:

* **One budget.** An operation has ``timeout`` seconds (the executor's, or a step's sooner
  deadline), counted from its start. Everything spends from it: waiting for a pooled
  connection, connecting, TLS, the handshake (AUTH, HELLO, SELECT, CLIENT SETINFO), the
  write, the read, a NOSCRIPT reload and the one resend.
* **One resend, only where safe.** A command is sent again at most once, within the same
  budget, and only when the first cannot have run (nothing was sent) or running it twice is
  harmless (an idempotent step whose connection broke; a timeout used the budget up).
* **NOSCRIPT** (a restarted or flushed server): the script is loaded and the command sent
  again on the same connection, within the same budget; not counted as the resend.
* **The outcome is unknown** when a command was sent and no answer came, unless a replica
  refused it (then it did not run).

Nothing here does I/O or imports redis-py; the clock is the caller's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from ..core.eviction import POLICY_CHECK, eviction_warning

__all__ = ["Budget", "EvictionCheck"]

logger = logging.getLogger("celery_unique")


class Budget:
    """One operation's time, and its one resend.

    ``now``: the clock at the operation's start; ``timeout``: the executor's deadline;
    ``sooner``: the deadlines its steps ask for (``None`` for the executor's).
    """

    __slots__ = ("deadline", "resend_left", "started", "total")

    def __init__(self, now: float, timeout: float, sooner: Iterable[float | None] = ()) -> None:
        self.started = now
        self.total = min([timeout, *(s for s in sooner if s is not None)])
        self.deadline = now + self.total
        self.resend_left = True

    def left(self, now: float) -> float:
        """Seconds left of the budget (negative once it is spent)."""
        return self.deadline - now

    def spent(self, now: float) -> bool:
        """Whether the budget is used up."""
        return now >= self.deadline

    def waited(self, now: float) -> float:
        """Seconds since the operation started, for the error message."""
        return now - self.started

    def resend(self, now: float, *, sent: bool, connection_lost: bool, idempotent: bool) -> bool:
        """Whether to send again after a failure; takes the one resend when it answers yes.

        ``sent``: the command had been written; ``connection_lost``: the connection broke (as
        opposed to the budget running out); ``idempotent``: running it twice is harmless.
        """
        if not self.resend_left or self.spent(now):
            return False
        if sent and not (connection_lost and idempotent):
            return False
        self.resend_left = False
        return True

    @staticmethod
    def outcome_unknown(*, sent: bool, refused_by_replica: bool) -> bool:
        """Whether a failed command may have run: it was sent, and no replica refused it."""
        return sent and not refused_by_replica


class EvictionCheck:
    """The server's eviction policy, read once per executor: the first command takes
    ``CONFIG GET maxmemory-policy`` along (no round trip of its own), and an evicting policy
    logs one warning. Unanswered, it is asked again at the next use; refused (an ACL without
    CONFIG), never again."""

    #: The command to send along.
    step = POLICY_CHECK.step

    def __init__(self) -> None:
        self.pending = True
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Whether this caller sends the check now: the first one to ask, once."""
        if not self.pending:  # the common case, without the lock
            return False
        with self._lock:
            claimed, self.pending = self.pending, False
            return claimed

    def unanswered(self) -> None:
        """The check's reply was never read: ask again at the next use."""
        self.pending = True

    def answered(self, reply: Any, *, unreachable: bool = False) -> None:
        """Read the check's ``reply``: a warning for an evicting policy. ``unreachable``: the
        reply is a connection error, so ask again; any other error reply (CONFIG refused)
        gives nothing to go on."""
        if unreachable:
            self.unanswered()
        elif not isinstance(reply, BaseException):
            policy = POLICY_CHECK.parse(reply)
            if policy is not None:
                logger.warning(eviction_warning(policy))
