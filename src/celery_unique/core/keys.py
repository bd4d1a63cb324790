"""The Redis key layout, in one place: ``<prefix><kind>:{<name>}``.

* a lock: ``<prefix>lock:{<name>}``, one key whose value is ``<fence>:<token>``;
* a semaphore: ``<prefix>sem:{<name>}``, a sorted set of holders scored by lease end;
* a rate limit: ``<prefix>rate:{<name>}:<spec>``, one bucket per limit;
* a unique task's lock is the lock named ``task:<task name>:<digest of its arguments>``.

The ``{...}`` hash tag puts every key one script touches in one Redis Cluster slot. A name
that would break the tag (it contains a brace, or is empty) is tagged by its digest instead
and kept in full after the tag, so distinct names still give distinct keys.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_PREFIX",
    "RUNNING_SUFFIX",
    "KeySpace",
    "ParsedKey",
    "glob_escape",
    "hash_tag",
    "task_lock_name",
    "task_lock_start",
    "task_of_lock",
]

DEFAULT_PREFIX = "cu:"
#: What a running twin's key adds to its lock's key (after the hash tag: the same slot).
RUNNING_SUFFIX = ":running"
# The parts a key of each kind may end with, after its name.
_PARTS = {"lock": ("running",), "sem": ("queue", "hold")}
_TASK = "task:"


def hash_tag(name: str) -> str:
    """The ``{tag}`` part (plus any remainder) that places ``name``'s keys in one slot."""
    if name and "{" not in name and "}" not in name:
        return "{" + name + "}"
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return "{#" + digest + "}" + name


def task_lock_name(task_name: str, digest: str) -> str:
    """The lock name of a unique task's instance: its task name and its arguments' digest."""
    return f"{_TASK}{task_name}:{digest}"


def task_lock_start(task_name: str | None = None) -> str:
    """What the lock names of one task (or, with ``None``, of every task) start with."""
    return _TASK if task_name is None else f"{_TASK}{task_name}:"


def task_of_lock(name: str) -> str | None:
    """The task whose lock :func:`task_lock_name` named ``name``; ``None`` for another lock."""
    if not name.startswith(_TASK):
        return None
    # A task name may hold colons, a digest never does.
    return name[len(_TASK) :].rpartition(":")[0] or None


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` glob."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key of the library read back: ``kind`` (``lock``, ``rate``, ``sem``), the ``name``
    it was made for, and ``part`` (``running`` for a lock's running twin, the limit spec of a
    rate bucket, ``queue``/``hold`` for a semaphore's queue keys; empty otherwise)."""

    kind: str
    name: str
    part: str = ""


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds (and reads back) the keys of one backend from its prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str):
            raise ConfigurationError(f"key_prefix must be a str, got {type(self.prefix).__name__}")
        if "{" in self.prefix or "}" in self.prefix:
            # A brace here would become the key's hash tag and scatter one lock's keys
            # over several cluster slots.
            raise ConfigurationError(
                "key_prefix must not contain '{' or '}': they are reserved for the hash tag"
            )

    def lock(self, name: str) -> str:
        """The key of lock ``name``."""
        _check_name(name, "a lock name")
        return _lock_key(self.prefix, name)

    def running_lock(self, name: str) -> str:
        """The key of lock ``name``'s running twin (a unique task with one queued and one
        running instance): the same hash slot as :meth:`lock`."""
        return f"{self.lock(name)}{RUNNING_SUFFIX}"

    def probe(self) -> str:
        """The key an executor's probes for owner-checked commands name: under the prefix,
        where an ACL user may write, and never written (see :mod:`.native`)."""
        return f"{self.prefix}probe"

    def semaphore(self, name: str) -> str:
        """The key of semaphore ``name``."""
        _check_name(name, "a semaphore name")
        return f"{self.prefix}sem:{hash_tag(name)}"

    def semaphore_queue(self, name: str) -> tuple[str, str, str]:
        """The keys of semaphore ``name`` with a queue of callers turned away: the holders,
        the queue, and the typical hold time (one cluster slot)."""
        key = self.semaphore(name)
        return key, f"{key}:{_PARTS['sem'][0]}", f"{key}:{_PARTS['sem'][1]}"

    def rate(self, name: str, specs: Sequence[str]) -> tuple[str, ...]:
        """One bucket key per limit spec, all in the slot of ``name``."""
        _check_name(name, "a rate limit key")
        return _rate_keys(self.prefix, name, tuple(specs))

    def lock_pattern(self, start: str = "") -> str:
        """A ``SCAN MATCH`` glob for the keys of every lock whose name starts with ``start``.

        Names tagged by their digest (with braces in them) are not matched by a non-empty
        ``start``; task lock names never hold braces.
        """
        return glob_escape(f"{self.prefix}lock:{{{start}") + "*"

    def lock_name(self, key: str | bytes) -> str | None:
        """The lock name a key of :meth:`lock` (or :meth:`running_lock`) was made for;
        ``None`` for any other key."""
        parsed = self.parse(key)
        return parsed.name if parsed is not None and parsed.kind == "lock" else None

    def pattern(self, kind: str) -> str:
        """A ``SCAN MATCH`` glob for every key of ``kind`` (``lock``, ``rate``, ``sem``)."""
        return glob_escape(f"{self.prefix}{kind}:") + "*"

    def parse(self, key: str | bytes) -> ParsedKey | None:
        """What a key of this space holds: its kind, name and part; ``None`` for a key of
        another prefix or layout."""
        text = key.decode() if isinstance(key, bytes) else key
        if not text.startswith(self.prefix):
            return None
        kind, _, rest = text[len(self.prefix) :].partition(":")
        if kind not in ("lock", "rate", "sem") or not rest.startswith("{"):
            return None
        if rest.startswith("{#"):  # tagged by the digest: the name follows the tag, whole
            tail = rest[rest.index("}") + 1 :]
            if kind == "rate":
                name, _, part = tail.rpartition(":")  # a spec holds no colon
                return ParsedKey(kind, name, part)
            for part in _PARTS[kind]:
                if tail.endswith(f":{part}"):
                    return ParsedKey(kind, tail[: -len(part) - 1], part)
            return ParsedKey(kind, tail)
        close = rest.find("}")
        if close < 0:
            return None
        name, part = rest[1:close], rest[close + 2 :]
        return ParsedKey(kind, name, part)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str):
        raise ConfigurationError(f"{what} must be a str, got {type(name).__name__}")


@functools.lru_cache(maxsize=4096)
def _lock_key(prefix: str, name: str) -> str:
    # Cached: the same few names are locked over and over, and this sits on every call.
    return f"{prefix}lock:{hash_tag(name)}"


@functools.lru_cache(maxsize=4096)
def _rate_keys(prefix: str, name: str, specs: tuple[str, ...]) -> tuple[str, ...]:
    # Cached like _lock_key: a limiter decides for the same few keys over and over.
    tag = hash_tag(name)
    return tuple(f"{prefix}rate:{tag}:{spec}" for spec in specs)
