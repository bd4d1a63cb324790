"""The vocabulary of the core: steps, one-round-trip operations and flows.

An operation of one round trip is an :class:`Op`: the step to send (:class:`Eval` a script,
:class:`Call` a command) and the function that reads its reply. An ``Eval`` may carry
:class:`Native` alternatives: the same decision as one built-in command, which an executor
sends instead where the server has it (see :mod:`.native`). An operation of
several is a *flow*: a generator that yields steps (and :class:`Sleep`), is sent the raw reply
of each, and returns a result. The executors carry them out, one synchronously and one with
``await``; neither decides anything. An executor's error (``BackendError``) is thrown into the
flow, so a flow that can ride out an outage (lock renewal) decides that itself.

Durations are float seconds everywhere in Python and integer milliseconds only on the way to
Lua; the conversion happens in the core alone. Replies may be ``bytes`` or ``str``
(``decode_responses=True``): the parsers accept both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import ConfigurationError
from .scripts import Script

__all__ = [
    "Call",
    "Clock",
    "Eval",
    "Flow",
    "Native",
    "Op",
    "Sleep",
    "Step",
    "check_timeout",
    "decode",
    "flag",
    "is_idempotent",
    "to_ms",
]

T = TypeVar("T")

#: A monotonic clock in seconds (``time.monotonic``, or a fake one in tests).
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Call:
    """Run one Redis command, e.g. ``("GET", key)``.

    ``idempotent``: sending it twice has the effect and the answer of sending it once (true of
    every read); ``timeout`` as for :class:`Eval`.
    """

    args: tuple[str | int, ...]
    timeout: float | None = field(default=None, compare=False)
    idempotent: bool = field(default=True, compare=False)


@dataclass(frozen=True, slots=True)
class Native:
    """A script's decision as one built-in command, for servers that have it.

    ``needs``: the capability the server must have (:mod:`.native` names them); ``call``: the
    command; ``reply``: its reply as the script's reply, or ``None`` when it cannot tell
    (the script is then sent and decides).
    """

    needs: str
    call: Call
    reply: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Eval:
    """Run ``script`` with ``keys`` and ``args`` (EVALSHA; the executor handles NOSCRIPT).

    ``timeout``: the step must be answered within this many seconds (a caller's deadline),
    when that is sooner than the executor's own deadline; ``None`` for the executor's.
    ``natives``: alternatives to the script, in order of preference; an executor may send the
    first whose capability the server has (and the script where that cannot tell).
    """

    script: Script
    keys: tuple[str, ...]
    args: tuple[str | int, ...]
    timeout: float | None = field(default=None, compare=False)
    natives: tuple[Native, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next step."""

    seconds: float


Step = Eval | Call | Sleep
Flow = Generator[Step, Any, T]


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    """One round trip: the step to send and how to read its reply."""

    step: Eval | Call
    parse: Callable[[Any], T]


def is_idempotent(step: Eval | Call) -> bool:
    """Whether sending ``step`` twice has the effect and the answer of sending it once."""
    return step.idempotent if isinstance(step, Call) else step.script.idempotent


def flag(reply: Any) -> bool:
    """A script's 1/0 answer as a bool."""
    return int(reply) == 1


def decode(value: bytes | str) -> str:
    """A reply's text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def to_ms(seconds: float, what: str = "ttl") -> int:
    """Seconds (float) to the whole milliseconds Lua takes, rounding up; rejects nonsense."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{what} must be a finite number of seconds > 0, got {seconds!r}: "
            "locks always expire, so that a crashed owner cannot hold one for ever"
        )
    return max(1, math.ceil(seconds * 1000))


def check_timeout(blocking: bool, timeout: float | None) -> None:
    """Validate ``acquire(blocking, timeout)`` the way ``threading.Lock`` does."""
    if timeout is None:
        return
    if not blocking:
        raise ConfigurationError("timeout cannot be given with blocking=False")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigurationError(f"timeout must be a number of seconds, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ConfigurationError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
