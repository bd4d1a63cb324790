"""The send policy, stated once for both executors: how long one operation may take, when a
command is sent again, the one eviction check each executor makes, and which of the server's
owner-checked commands it sends instead of a script.

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
* **Native commands** (:class:`NativeCommands`): a script step that carries an alternative the
  server has is sent as that command; where its answer cannot tell (a "no"), or the server
  answers it with an error, the script is sent and its answer (or error) is the caller's.

Nothing here does I/O or imports redis-py; the clock is the caller's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from ..core import native
from ..core.eviction import POLICY_CHECK, eviction_warning
from ..core.steps import WITHDRAWN, Call, Eval, Native

__all__ = ["Budget", "EvictionCheck", "FirstUse", "NativeCommands"]

logger = logging.getLogger("celery_unique")


class Budget:
    """One operation's time, and its one resend.

    ``now``: the clock at the operation's start; ``timeout``: the executor's deadline;
    ``sooner``: the deadlines its steps ask for (``None`` for the executor's).
    """

    __slots__ = ("deadline", "resend_left", "sent_before", "started", "total")

    def __init__(self, now: float, timeout: float, sooner: Iterable[float | None] = ()) -> None:
        self.started = now
        total = timeout
        for deadline in sooner:
            if deadline is not None and deadline < total:
                total = deadline
        self.total = total
        self.deadline = now + self.total
        self.resend_left = True
        #: An earlier attempt had written the command: whatever the next attempt meets, the
        #: command may have run (a resend that cannot even connect leaves that so).
        self.sent_before = False

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
        self.sent_before = self.sent_before or sent
        return True

    def outcome_unknown(self, *, sent: bool = False, refused_by_replica: bool = False) -> bool:
        """Whether a failed command may have run: this attempt or an earlier one sent it, and
        no replica refused it."""
        return (sent or self.sent_before) and not refused_by_replica


class FirstUse:
    """A question put to the server once per executor, along with its first command (no
    round trip of its own); unanswered (the connection failed), it is asked again next time."""

    #: The commands to send along.
    steps: tuple[Eval | Call, ...] = ()

    def __init__(self, *, enabled: bool = True) -> None:
        self.pending = enabled
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Whether this caller sends the question now: the first one to ask, once."""
        if not self.pending:  # the common case, without the lock
            return False
        with self._lock:
            claimed, self.pending = self.pending, False
            return claimed

    def unanswered(self) -> None:
        """The replies were never read: ask again at the next use."""
        self.pending = True


class EvictionCheck(FirstUse):
    """The server's eviction policy, read once per executor: the first command takes
    ``CONFIG GET maxmemory-policy`` along, and an evicting policy logs one warning. Refused
    (an ACL without CONFIG), it is never asked again."""

    #: The command to send along.
    step = POLICY_CHECK.step
    steps = (step,)

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


class NativeCommands(FirstUse):
    """Which owner-checked commands the server has (:mod:`celery_unique.core.native`), found
    once per executor by probes on ``key`` that the first command takes along; until they are
    answered, and where they cannot be sent along (a cluster client routes each command
    itself: ``enabled=False``), the scripts are used.

    An executor sends a step as :meth:`pick` says, and hands what the native command got to
    :meth:`settle`. ``refusal`` reads an error the command got: ``None`` when the server did
    not answer (raised, as the script's would be), else whether the error says the command is
    missing or not permitted (a failover to an older server, an ACL): that stops its use.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        key: str = native.PROBE_KEY,
        refusal: Callable[[BaseException], bool | None] = lambda error: None,
    ) -> None:
        super().__init__(enabled=enabled)
        self.steps = native.probes(key)
        self._refusal = refusal
        #: The capabilities found (names from :mod:`celery_unique.core.native`).
        self.found: frozenset[str] = frozenset()

    def answered(self, replies: Sequence[Any]) -> None:
        """Read the probes' replies (error replies as exceptions)."""
        self.found = native.capabilities(replies)

    def pick(self, step: Eval | Call) -> Native | None:
        """The alternative to send instead of ``step``, or ``None`` for ``step`` itself."""
        if not self.found or not isinstance(step, Eval):  # the common cases, first
            return None
        for alternative in step.natives:
            if alternative.needs in self.found:
                return alternative
        return None

    @staticmethod
    def command(step: Eval | Call, alternative: Native) -> Call:
        """``alternative``'s command as it is sent for ``step``: under the step's deadline
        (a renewal's extend must be answered within what is left of the lease) and gate."""
        timeout = alternative.call.timeout if step.timeout is None else step.timeout
        return replace(alternative.call, timeout=timeout, gate=step.gate)

    def settle(self, alternative: Native, got: Any) -> Any:
        """The script's reply from what ``alternative`` ``got`` (its reply, or the error it
        raised), or ``None``: send the script, whose answer or error is the caller's. A gated
        step withdrawn before it was written stays withdrawn (no script either)."""
        if got is WITHDRAWN:
            return got
        if not isinstance(got, BaseException):
            return alternative.reply(got)
        missing = self._refusal(got)
        if missing is None:
            raise got
        if missing:
            self.found = self.found - {alternative.needs}
        return None
