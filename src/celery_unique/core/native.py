"""Owner-checked commands some servers have built in, as alternatives to the release and
extend scripts (one command costs the server less than a script call).

* ``DELIFEQ key value`` (Valkey 9.0+) and ``DELEX key IFEQ value`` (Redis 8.4+, Valkey 9.2+):
  delete the key if it holds ``value``; 1 if deleted, else 0.
* ``SET key value IFEQ value PX ms`` (Redis 8.4+, Valkey 8.1+): rewrite the key with a new
  TTL if it holds ``value``; ``OK`` if set, nil if not.

They compare the whole stored value, ``<fence>:<token>``, where the scripts compare only the
token: so only a holder that knows its fence (a lock object after it acquired) offers them,
and a "no" is never final. A fence it knows may be stale (the same token acquired again by
another object, which got a new fence), so on "no" the script is sent and decides: the answer
is always the script's, and only the common "yes" is cheaper.

Which commands the server has is found by :func:`probes`, once per executor, along with its
first command: each command, exactly as it would be sent, on a key that is never there
(nothing is deleted or written; were it there, ``PX 1`` would end it within a millisecond).
A server that has it answers 0 or nil; one that lacks it an error (unknown command, syntax
error), as does an ACL that does not allow it: then the scripts are used. Probing the very
syntax, rather than reading the version or ``COMMAND INFO``, also holds for forks and for a
command that exists without the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .steps import Call, Native

__all__ = [
    "DELEX",
    "DELIFEQ",
    "PROBE_KEY",
    "SET_IFEQ",
    "capabilities",
    "extend",
    "held_value",
    "missing",
    "probes",
    "release",
]

DELIFEQ = "DELIFEQ"
DELEX = "DELEX"
SET_IFEQ = "SET IFEQ"

#: The key the probes name when none is given (a backend gives one under its key prefix,
#: which an ACL user may write); it is never written (see the module docstring).
PROBE_KEY = "celery-unique:probe"
_NEVER = "celery-unique: a value never stored"
_PROBED = (DELIFEQ, DELEX, SET_IFEQ)


def probes(key: str = PROBE_KEY) -> tuple[Call, ...]:
    """What an executor sends along with its first command, one probe per capability, in the
    order of :func:`capabilities`' replies."""
    return (
        Call(("DELIFEQ", key, _NEVER), idempotent=True),
        Call(("DELEX", key, "IFEQ", _NEVER), idempotent=True),
        Call(("SET", key, "probe", "IFEQ", _NEVER, "PX", 1)),
    )


def capabilities(replies: Sequence[Any]) -> frozenset[str]:
    """The capabilities the replies to :func:`probes` show: an answer (0, nil) shows the
    command there, an error reply (an exception) shows it missing or not allowed."""
    answered = zip(_PROBED, replies, strict=True)
    return frozenset(name for name, reply in answered if not isinstance(reply, BaseException))


def missing(message: str) -> bool:
    """Whether an error reply to a native command says the server lacks it (an old server
    after a failover) or refuses it (an ACL without it): stop offering it."""
    text = message.lower()
    return "unknown command" in text or "syntax error" in text or "noperm" in text


def held_value(fence: int, token: str) -> str:
    """A held lock's stored value (``lua/acquire.lua`` writes the fence as a whole number)."""
    return f"{fence}:{token}"


def _deleted(reply: Any) -> int | None:
    return 1 if reply == 1 else None


def _set(reply: Any) -> int | None:
    return 1 if reply in (b"OK", "OK") else None


def release(key: str, value: str, timeout: float | None = None) -> tuple[Native, ...]:
    """The release script's alternatives: delete ``key`` if it holds ``value``."""
    # Deleting twice answers 0 the second time: not to be sent again blindly, as the script.
    return (
        Native(DELEX, Call(("DELEX", key, "IFEQ", value), timeout, idempotent=False), _deleted),
        Native(DELIFEQ, Call(("DELIFEQ", key, value), timeout, idempotent=False), _deleted),
    )


def extend(key: str, value: str, ttl_ms: int, timeout: float | None = None) -> tuple[Native, ...]:
    """The extend script's alternative: a TTL of ``ttl_ms`` from now if ``key`` holds
    ``value`` (rewriting the same value)."""
    call = Call(("SET", key, value, "IFEQ", value, "PX", ttl_ms), timeout)
    return (Native(SET_IFEQ, call, _set),)
