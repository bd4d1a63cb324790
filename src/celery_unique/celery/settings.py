"""Task settings, resolved in one place for UniqueTask, RateLimitedTask and the compat layers.

A setting is looked up, in order, in what the task class answers for it (its options as
``@app.task(...)`` keywords, or a compat layer's own spellings), in ``app.conf`` (Django's
``CELERY_`` namespace included, as Celery maps it), then its default; then it is checked once,
here, with an error that names where the bad value came from. The lock store is the app's
(:func:`backend_for`), unless the task overrides ``redis_backend()``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from kombu.utils.imports import symbol_by_name

from ..backends import AsyncRedisBackend, RedisBackend
from ..core.keys import DEFAULT_PREFIX
from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_TTL",
    "Setting",
    "async_backend_for",
    "backend_for",
    "backends",
    "carried_over",
    "check_choice",
    "check_count",
    "check_encoder",
    "check_seconds",
    "from_task",
    "redis_url",
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
    if conf_key is not None:
        value = task.app.conf.get(conf_key)
        if value is not None:
            return Setting(value, f"app.conf.{conf_key}")
    return None


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


def redis_url(url: object) -> bool:
    """Whether ``url`` names a Redis server this library can keep its keys in (``sentinel://``
    included: the master the sentinels name)."""
    return isinstance(url, str) and url.split("://", 1)[0] in (
        "redis",
        "rediss",
        "unix",
        "sentinel",
    )


# Where each of Celery's Redis users keeps its own transport and TLS settings.
_CARRIED = {
    "result_backend": ("result_backend_transport_options", "redis_backend_use_ssl"),
    "broker_url": ("broker_transport_options", "broker_use_ssl"),
}
# What of those settings concerns the connection (not, say, a visibility timeout).
_SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs")


def carried_over(app: Celery) -> tuple[str, dict[str, Any]] | None:
    """The result backend's URL when it is Redis, else the broker's, with the ``from_url``
    keywords its own settings imply: Sentinel's ``master_name``/``sentinel_kwargs`` from its
    transport options, TLS from ``redis_backend_use_ssl``/``broker_use_ssl``. ``None`` when
    neither is Redis."""
    conf = app.conf
    for setting, (transport_key, ssl_key) in _CARRIED.items():
        url = _first_url(getattr(conf, setting, None))
        if not redis_url(url):
            continue
        assert isinstance(url, str)
        options: dict[str, Any] = {}
        transport = conf.get(transport_key) or {}
        if url.startswith("sentinel://"):
            options |= {k: transport[k] for k in _SENTINEL_OPTIONS if k in transport}
        use_ssl = conf.get(ssl_key)
        if use_ssl:
            if url.startswith("sentinel://"):
                options["ssl"] = True  # the master's connections: redis-py's SSL ones
            elif url.startswith("redis://"):
                url = "rediss://" + url.removeprefix("redis://")  # as Celery and kombu do
            if isinstance(use_ssl, dict):
                options |= use_ssl
        return url, options
    return None


def _first_url(value: object) -> object:
    """A Celery URL setting as Celery resolves it (read as ``conf.broker_url``, so that
    ``CELERY_BROKER_URL`` and the other environment variables Celery honours count), the
    first of a failover list: ``[url, ...]`` or ``"url;url"`` (but a ``sentinel://`` URL's
    ``;`` separates the sentinels of one URL)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, str) and ";" in value and not value.startswith("sentinel://"):
        value = value.split(";", 1)[0].strip()
    return value


class _Backends:
    """One backend per app and configuration (and per event loop for the asyncio ones),
    built on first use."""

    def __init__(self) -> None:
        self._made: weakref.WeakKeyDictionary[Celery, dict[str, RedisBackend]] = (
            weakref.WeakKeyDictionary()
        )
        self._async: weakref.WeakKeyDictionary[
            Celery, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRedisBackend]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, app: Celery, name: str, build: Callable[[], RedisBackend]) -> RedisBackend:
        """The backend ``name`` of ``app``, built by ``build`` the first time."""
        with self._lock:
            made = self._made.setdefault(app, {})
            backend = made.get(name)
            if backend is None:
                backend = made[name] = build()
            return backend

    def get_async(
        self,
        app: Celery,
        loop: asyncio.AbstractEventLoop,
        build: Callable[[], AsyncRedisBackend],
    ) -> AsyncRedisBackend:
        """The asyncio backend of ``app`` on ``loop``, built by ``build`` the first time."""
        with self._lock:
            made = self._async.setdefault(app, weakref.WeakKeyDictionary())
            backend = made.get(loop)
            if backend is None:
                backend = made[loop] = build()
            return backend

    def close(self, app: Celery) -> None:
        """Close and forget every sync backend of ``app``."""
        with self._lock:
            made = self._made.pop(app, {})
        for backend in made.values():
            backend.close()

    async def aclose(self, app: Celery) -> None:
        """Close and forget ``app``'s asyncio backend on the running loop (an app serving
        an event loop that ends may call this; others are closed with their process)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            backend = self._async.get(app, weakref.WeakKeyDictionary()).pop(loop, None)
        if backend is not None:
            await backend.aclose()


#: The backends of every app in this process.
backends = _Backends()


def _source(app: Celery) -> tuple[str, dict[str, Any], str]:
    """Where ``app``'s lock store is: its URL, ``from_url`` keywords and key prefix."""
    conf = app.conf
    url = conf.get("unique_backend_url")
    carried: dict[str, Any] = {}
    if not url:
        found = carried_over(app)
        if found is None:
            raise ConfigurationError(
                "unique tasks need Redis: set app.conf.unique_backend_url "
                "(e.g. 'redis://localhost:6379/0'); neither the result backend nor the "
                "broker is a Redis URL"
            )
        url, carried = found
    options = conf.get("unique_backend_options") or {}
    if not isinstance(options, dict):
        raise ConfigurationError(
            "app.conf.unique_backend_options must be a dict of keywords for "
            f"RedisBackend.from_url (socket_timeout=..., ...), got {options!r}"
        )
    # What is set for the lock store itself wins over what came with Celery's own Redis.
    return url, carried | options, conf.get("unique_key_prefix") or DEFAULT_PREFIX


def backend_for(app: Celery) -> RedisBackend:
    """The backend ``app``'s unique and rate-limited tasks use, built once from ``app.conf``:
    ``unique_backend_url`` (else the result backend, else the broker, if Redis, with their
    own Sentinel and TLS settings: :func:`carried_over`), ``unique_backend_options``
    (keywords for ``from_url``, which win) and ``unique_key_prefix``."""

    def build() -> RedisBackend:
        url, options, prefix = _source(app)
        return RedisBackend.from_url(url, key_prefix=prefix, **options)

    return backends.get(app, "unique", build)


def async_backend_for(app: Celery) -> AsyncRedisBackend:
    """The asyncio twin of :func:`backend_for` for the running event loop (an asyncio client
    belongs to one loop): one per app and loop, built on first use."""
    loop = asyncio.get_running_loop()

    def build() -> AsyncRedisBackend:
        url, options, prefix = _source(app)
        return AsyncRedisBackend.from_url(url, key_prefix=prefix, **options)

    return backends.get_async(app, loop, build)
