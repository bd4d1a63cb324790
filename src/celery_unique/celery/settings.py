"""Task settings, resolved in one place for UniqueTask, RateLimitedTask and the compat layers.

A setting is looked up, in order, in what the task class answers for it (its options as
``@app.task(...)`` keywords, or a compat layer's own spellings), in ``app.conf`` (Django's
``CELERY_`` namespace included, as Celery maps it), then its default; then it is checked once,
here, with an error that names where the bad value came from. Where the locks live (the
lock store) is :mod:`.store`'s.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from kombu.utils.imports import symbol_by_name

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_TTL",
    "Setting",
    "check_choice",
    "check_count",
    "check_encoder",
    "check_flag",
    "check_seconds",
    "conf_setting",
    "from_task",
    "task_option",
]

DEFAULT_TTL = 3600.0
DEFAULT_LEASE = 30.0
DEFAULT_MAX_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class Setting:
    """A setting's value and where it was set (for the error if it is wrong)."""

    value: Any
    where: str


def task_option(task: Task, option: str) -> Any:
    """A task option as given to ``@app.task`` (a class attribute), ``None`` if unset.

    A function given as an option (``unique_on=lambda ...``) would come back bound to the
    task from plain attribute access: it is read as stored.
    """
    value = inspect.getattr_static(task, option, None)
    return value.__func__ if isinstance(value, staticmethod | classmethod) else value


def from_task(task: Task, option: str | None, conf_key: str | None) -> Setting | None:
    """The task option ``option``, else ``app.conf[conf_key]``; ``None`` if neither is set."""
    if option is not None:
        value = task_option(task, option)
        if value is not None:
            return Setting(value, f"the {option} option of task {task.name!r}")
    return None if conf_key is None else conf_setting(task.app, (conf_key,))


def check_seconds(found: Setting, *, allow_zero: bool = False) -> float:
    """A finite number of seconds > 0 (or >= 0)."""
    value = found.value
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"{found.where} must be a finite number of seconds {bound}, got {value!r}"
        )
    return float(value)


def check_count(found: Setting) -> int:
    """A whole number >= 1."""
    value = found.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{found.where} must be a whole number >= 1, got {value!r}")
    return value


def check_choice(found: Setting, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if found.value not in choices:
        raise ConfigurationError(
            f"{found.where} must be one of {list(choices)}, got {found.value!r}"
        )
    return str(found.value)


def check_encoder(found: Setting | None) -> type[json.JSONEncoder] | None:
    """A ``json.JSONEncoder`` subclass, or its dotted path."""
    if found is None:
        return None
    value = found.value
    encoder: object = symbol_by_name(value) if isinstance(value, str) else value  # type: ignore[no-untyped-call]
    if not (isinstance(encoder, type) and issubclass(encoder, json.JSONEncoder)):
        raise ConfigurationError(
            f"{found.where} must be a json.JSONEncoder subclass or its dotted path, got {value!r}"
        )
    return encoder


def check_flag(found: Setting | None) -> bool:
    """A boolean; unset is false."""
    return False if found is None else bool(found.value)


def conf_setting(app: Celery, keys: Sequence[str]) -> Setting | None:
    """The first of ``keys`` set in ``app.conf``, ``None`` if none is.

    ``app.conf.get`` maps a namespaced configuration (Django's ``CELERY_`` prefix) as Celery
    does; a layer that also read other spellings (``SINGLETON_KEY_PREFIX``) lists them too.
    """
    for key in keys:
        value = app.conf.get(key)
        if value is not None:
            return Setting(value, f"app.conf.{key}")
    return None
