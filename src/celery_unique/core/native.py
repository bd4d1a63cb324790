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

Which commands the server has is found by :data:`PROBES`, once per executor, along with its
first command: ``COMMAND INFO`` names the commands, and a ``SET ... IFEQ`` on a key that is
never there (nothing is written; were it there, ``PX 1`` would end it within a millisecond)
answers nil where the option exists and a syntax error where it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .steps import Call, Native

__all__ = [
    "DELEX",
    "DELIFEQ",
    "PROBES",
    "PROBE_KEY",
    "SET_IFEQ",
    "capabilities",
    "extend",
    "held_value",
    "missing",
    "release",
]

DELIFEQ = "DELIFEQ"
DELEX = "DELEX"
SET_IFEQ = "SET IFEQ"

#: The key the ``SET ... IFEQ`` probe names; it is never written (see the module docstring).
PROBE_KEY = "celery-unique:probe:set-ifeq"

#: What an executor sends along with its first command; :func:`capabilities` reads the replies.
PROBES: tuple[Call, ...] = (
    Call(("COMMAND", "INFO", DELIFEQ, DELEX)),
    Call(("SET", PROBE_KEY, "probe", "IFEQ", "never", "PX", 1)),
)


def capabilities(replies: Sequence[Any]) -> frozenset[str]:
    """The capabilities the replies to :data:`PROBES` show; an error reply (an exception)
    shows none."""
    info, probe = replies
    found: set[str] = set()
    if isinstance(info, list | tuple) and len(info) == 2:
        # One entry per name asked, nil for a command the server does not know.
        found.update(name for name, entry in zip((DELIFEQ, DELEX), info, strict=True) if entry)
    if not isinstance(probe, BaseException):  # nil (not set) or OK; a syntax error otherwise
        found.add(SET_IFEQ)
    return frozenset(found)


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
