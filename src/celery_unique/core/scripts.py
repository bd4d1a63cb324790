"""The Lua scripts, loaded once from package data, each with its SHA1 for EVALSHA."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "ACQUIRE",
    "EXTEND",
    "MOVE",
    "RELEASE",
    "SEMAPHORE_ACQUIRE",
    "SEMAPHORE_EXTEND",
    "SEMAPHORE_HOLDERS",
    "SEMAPHORE_RELEASE",
    "TOKEN_BUCKET",
    "Script",
    "command_at",
]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script: its name, source and the SHA1 Redis knows it by.

    ``idempotent``: running it twice with the same arguments has the effect and the answer of
    running it once, so an executor may send it again when a connection broke before the
    answer came (it never does for the others, whose second run would count twice).
    """

    name: str
    source: str = field(repr=False)
    sha: str = field(repr=False)
    idempotent: bool = False

    @classmethod
    def load(cls, name: str, *, idempotent: bool = False) -> Script:
        source = _read(f"{name}.lua")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest(), idempotent)


def _read(filename: str) -> str:
    # The wheel ships lua/ inside the package. A source checkout (editable install, running
    # from the repo) has it at the top level instead, three levels above this module.
    packaged = resources.files("celery_unique") / "lua" / filename
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[3] / "lua" / filename).read_text(encoding="utf-8")


# Acquiring again with the same token refreshes the TTL and keeps the fence; extending again
# sets the same TTL. Releasing twice answers 0 the second time, and a bucket counts twice.
ACQUIRE = Script.load("acquire", idempotent=True)
RELEASE = Script.load("release")
EXTEND = Script.load("extend", idempotent=True)
TOKEN_BUCKET = Script.load("token_bucket")
# Moving again for the same run finds the running lock its own: the TTL is refreshed.
MOVE = Script.load("move", idempotent=True)
# A semaphore's acquire with the same token renews its lease; extending twice sets one lease.
SEMAPHORE_ACQUIRE = Script.load("semaphore_acquire", idempotent=True)
SEMAPHORE_RELEASE = Script.load("semaphore_release")
SEMAPHORE_EXTEND = Script.load("semaphore_extend", idempotent=True)
SEMAPHORE_HOLDERS = Script.load("semaphore_holders", idempotent=True)

_ALL = (
    ACQUIRE,
    RELEASE,
    EXTEND,
    TOKEN_BUCKET,
    MOVE,
    SEMAPHORE_ACQUIRE,
    SEMAPHORE_RELEASE,
    SEMAPHORE_EXTEND,
    SEMAPHORE_HOLDERS,
)
_CALL = re.compile(r"redis\.p?call\('([A-Za-z]+)'")


def command_at(sha: str, line: int) -> tuple[str, str] | None:
    """``(script name, command)`` for the Redis command our script ``sha`` calls on ``line``
    (what an error from inside a script points at), or ``None`` if it is not one of ours."""
    for script in _ALL:
        if script.sha == sha:
            lines = script.source.splitlines()
            found = _CALL.search(lines[line - 1]) if 0 < line <= len(lines) else None
            return (script.name, found.group(1).lower()) if found else None
    return None
