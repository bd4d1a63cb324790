"""Redis key layout: ``<prefix><kind>:{<name>}``.

The ``{...}`` hash tag makes every key one script touches land in one Redis Cluster slot.
A name that would break the tag (it contains a brace, or is empty) is tagged by its digest
instead and kept in full after the tag, so distinct names still give distinct keys.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_PREFIX", "KeySpace", "LockKeys", "hash_tag"]

DEFAULT_PREFIX = "cu:"


def hash_tag(name: str) -> str:
    """The ``{tag}`` part (plus any remainder) that places ``name``'s keys in one slot."""
    if name and "{" not in name and "}" not in name:
        return "{" + name + "}"
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return "{#" + digest + "}" + name


@dataclass(frozen=True, slots=True)
class LockKeys:
    """The two keys of one lock: the lock itself and its fence counter."""

    lock: str
    fence: str


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds the keys of one backend from its prefix."""

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

    def lock(self, name: str) -> LockKeys:
        if not isinstance(name, str):
            raise ConfigurationError(f"a lock name must be a str, got {type(name).__name__}")
        return _lock_keys(self.prefix, name)


@functools.lru_cache(maxsize=4096)
def _lock_keys(prefix: str, name: str) -> LockKeys:
    # Cached: the same few names are locked over and over, and this sits on every call.
    tag = hash_tag(name)
    return LockKeys(f"{prefix}lock:{tag}", f"{prefix}fence:{tag}")
