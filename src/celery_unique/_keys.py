"""Redis key layout: ``<prefix><kind>:{<name>}``.

The ``{...}`` hash tag makes every key one script touches land in one Redis Cluster slot.
A name that would break the tag (it contains a brace, or is empty) is tagged by its digest
instead and kept in full after the tag, so distinct names still give distinct keys.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_PREFIX", "ArgumentKey", "KeySpace", "LockKeys", "canonical_json", "hash_tag"]

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
        _check_name(name, "a lock name")
        return _lock_keys(self.prefix, name)

    def rate(self, name: str, specs: Sequence[str]) -> tuple[str, ...]:
        """One bucket key per limit spec, all in the slot of ``name``."""
        _check_name(name, "a rate limit key")
        return _rate_keys(self.prefix, name, tuple(specs))


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str):
        raise ConfigurationError(f"{what} must be a str, got {type(name).__name__}")


@functools.lru_cache(maxsize=4096)
def _lock_keys(prefix: str, name: str) -> LockKeys:
    # Cached: the same few names are locked over and over, and this sits on every call.
    tag = hash_tag(name)
    return LockKeys(f"{prefix}lock:{tag}", f"{prefix}fence:{tag}")


@functools.lru_cache(maxsize=4096)
def _rate_keys(prefix: str, name: str, specs: tuple[str, ...]) -> tuple[str, ...]:
    # Cached like _lock_keys: a limiter decides for the same few keys over and over.
    tag = hash_tag(name)
    return tuple(f"{prefix}rate:{tag}:{spec}" for spec in specs)


def canonical_json(value: object, encoder: type[json.JSONEncoder] | None = None) -> str:
    """One spelling per value: sorted keys, no spaces; tuples and lists alike."""
    return json.dumps(value, cls=encoder, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


UniqueOn = Sequence[str] | Callable[..., object] | None


class ArgumentKey:
    """Derives a task's unique key from a call: its name plus a digest of its arguments.

    Arguments are bound to the task's signature first, so positional, keyword and defaulted
    spellings of one call give one key. ``unique_on`` picks argument names (``[]``: the name
    alone) or is a callable taking the task's arguments and returning a JSON-able value.
    Argument values never appear in the key: only their digest does.
    """

    def __init__(
        self,
        task_name: str,
        func: Callable[..., object],
        unique_on: UniqueOn = None,
        encoder: type[json.JSONEncoder] | None = None,
    ) -> None:
        self.task_name = task_name
        self._signature = inspect.signature(func)
        self._unique_on = unique_on
        self._encoder = encoder
        # One encoder, built once: json.dumps with options builds a new one per call.
        self._dumps = (encoder or json.JSONEncoder)(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode
        # The common signature (plain named parameters) binds without inspect's machinery.
        params = list(self._signature.parameters.values())
        plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._names = tuple(p.name for p in params) if plain else None
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        if unique_on is None or callable(unique_on):
            return
        if isinstance(unique_on, str) or not all(isinstance(n, str) for n in unique_on):
            raise ConfigurationError(
                f"unique_on of task {task_name!r} must be a list of argument names, [] or a "
                f"callable, got {unique_on!r}"
            )
        unknown = [n for n in unique_on if n not in self._signature.parameters]
        if unknown:
            raise ConfigurationError(
                f"unique_on of task {task_name!r} names {unknown}, which are not arguments of "
                f"the task; it takes {list(self._signature.parameters)}"
            )

    def __call__(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        unique_on = self._unique_on
        if callable(unique_on):
            value: object = unique_on(*args, **kwargs)
        else:
            arguments = self._bind(args, kwargs)
            if unique_on is not None:
                arguments = {name: arguments[name] for name in unique_on}
            value = arguments
        try:
            payload = self._dumps(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(self._not_serialisable(value)) from exc
        digest = hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()
        return f"task:{self.task_name}:{digest}"

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments by name, defaults filled in: ``Signature.bind`` + ``apply_defaults``."""
        names = self._names
        if names is None or len(args) > len(names) or not kwargs.keys() <= set(names):
            bound = self._signature.bind(*args, **kwargs)  # raises the usual TypeError
            bound.apply_defaults()
            return dict(bound.arguments)
        arguments = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name in arguments:
                raise TypeError(f"{self.task_name}() got multiple values for argument {name!r}")
            arguments[name] = value
        if len(arguments) < len(names):
            for name in names:
                if name not in arguments:
                    if name not in self._defaults:
                        raise TypeError(f"{self.task_name}() missing argument {name!r}")
                    arguments[name] = self._defaults[name]
        # In signature order, like Signature.bind, though canonical JSON sorts anyway.
        return {name: arguments[name] for name in names}

    def prefix(self) -> str:
        """The start every key of this task shares (for clearing its locks)."""
        return f"task:{self.task_name}:"

    def _serialisable(self, value: object) -> bool:
        try:
            canonical_json(value, self._encoder)
        except (TypeError, ValueError):
            return False
        return True

    def _not_serialisable(self, value: object) -> str:
        # Name the argument and its type, never its value (it may be a secret).
        culprit = "the value returned by unique_on"
        if isinstance(value, dict):
            bad = next((n for n, item in value.items() if not self._serialisable(item)), None)
            if bad is not None:
                culprit = f"argument {bad!r} ({type(value[bad]).__name__})"
        return (
            f"cannot build the unique key of task {self.task_name!r}: {culprit} is not "
            "JSON-serialisable; set unique_json_encoder to a json.JSONEncoder subclass that "
            "handles it, or leave it out with unique_on"
        )
