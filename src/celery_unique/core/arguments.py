"""A unique task's key from its call: arguments bound to the signature, canonical JSON, a digest.

Argument values never appear in a key, a log line or an error: only their digest does.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError
from .keys import task_lock_name

__all__ = ["ArgumentKey", "UniqueOn", "canonical_json"]


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
        return task_lock_name(self.task_name, digest)

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
