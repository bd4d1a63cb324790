"""Task settings, resolved in one place for UniqueTask, RateLimitedTask and the compat layers.

A setting is looked up, in order, in what the task class answers for it (its options as
``@app.task(...)`` keywords, or a compat layer's own spellings), in ``app.conf`` (Django's
``CELERY_`` namespace included, as Celery maps it), then its default; then it is checked once,
here, with an error that names where the bad value came from. The lock store is the app's
(:func:`backend_for`), unless the task overrides ``redis_backend()``; where it is comes from
one resolver (:func:`lock_store`), which a compat layer hands the names of its own settings
(:class:`StoreSettings`).
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
    "UNIQUE_STORE",
    "LockStore",
    "Setting",
    "StoreSettings",
    "async_backend_for",
    "backend_for",
    "backends",
    "carried_over",
    "check_choice",
    "check_count",
    "check_encoder",
    "check_flag",
    "check_seconds",
    "conf_setting",
    "from_task",
    "key_prefix",
    "lock_store",
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
    """One backend per app and lock store (and per event loop for the asyncio ones), built on
    first use."""

    def __init__(self) -> None:
        self._made: weakref.WeakKeyDictionary[Celery, dict[str, RedisBackend]] = (
            weakref.WeakKeyDictionary()
        )
        self._async: weakref.WeakKeyDictionary[
            Celery,
            weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncRedisBackend]],
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
        name: str,
        build: Callable[[], AsyncRedisBackend],
    ) -> AsyncRedisBackend:
        """The asyncio backend ``name`` of ``app`` on ``loop``, built by ``build`` the first
        time."""
        with self._lock:
            made = self._async.setdefault(app, weakref.WeakKeyDictionary()).setdefault(loop, {})
            backend = made.get(name)
            if backend is None:
                backend = made[name] = build()
            return backend

    def close(self, app: Celery) -> None:
        """Close and forget every sync backend of ``app``."""
        with self._lock:
            made = self._made.pop(app, {})
        for backend in made.values():
            backend.close()

    async def aclose(self, app: Celery) -> None:
        """Close and forget ``app``'s asyncio backends on the running loop (an app serving
        an event loop that ends may call this; others are closed with their process)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            made = self._async.get(app, weakref.WeakKeyDictionary()).pop(loop, {})
        for backend in made.values():
            await backend.aclose()


#: The backends of every app in this process.
backends = _Backends()


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


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The names a layer gives the settings of its lock store, each in every spelling it
    reads (the first one is what error messages name), and what it falls back on.

    :data:`UNIQUE_STORE` is UniqueTask's and RateLimitedTask's; a compat layer with settings
    of its own (``singleton_backend_url``, ...) describes them in one of these and gets the
    same resolution (:func:`lock_store`) and the same one-per-app backends
    (:func:`backend_for`, :func:`async_backend_for`).
    """

    #: Which of an app's stores this is (one backend is built per app and name).
    name: str
    #: Who needs it, for the error when nothing names a Redis: ``"unique tasks"``.
    users: str
    url: tuple[str, ...]
    options: tuple[str, ...]
    prefix: tuple[str, ...]
    default_prefix: str = DEFAULT_PREFIX


#: The lock store of UniqueTask and RateLimitedTask: ``unique_backend_url``,
#: ``unique_backend_options`` and ``unique_key_prefix``.
UNIQUE_STORE = StoreSettings(
    name="unique",
    users="unique tasks",
    url=("unique_backend_url",),
    options=("unique_backend_options",),
    prefix=("unique_key_prefix",),
)


@dataclass(frozen=True, slots=True)
class LockStore:
    """Where a lock store is: its ``url``, the keywords for ``from_url`` and its key
    ``prefix``; see :func:`lock_store`."""

    url: str
    options: dict[str, Any]
    prefix: str

    def connect(self, backend_class: type[RedisBackend] = RedisBackend) -> RedisBackend:
        """A new (sync) backend on it."""
        return backend_class.from_url(self.url, key_prefix=self.prefix, **self.options)

    def aconnect(self) -> AsyncRedisBackend:
        """A new asyncio backend on it (for the running loop: an asyncio client has one)."""
        return AsyncRedisBackend.from_url(self.url, key_prefix=self.prefix, **self.options)


def key_prefix(app: Celery, names: StoreSettings = UNIQUE_STORE) -> str:
    """The key prefix of ``app``'s lock store ``names`` (its default when unset or empty)."""
    found = conf_setting(app, names.prefix)
    return str(found.value) if found is not None and found.value else names.default_prefix


def lock_store(app: Celery, names: StoreSettings = UNIQUE_STORE) -> LockStore:
    """Where ``app``'s lock store ``names`` is, read from ``app.conf``: its URL setting, else
    the result backend, else the broker, if Redis, with their own Sentinel and TLS settings
    (:func:`carried_over`); its options setting (keywords for ``from_url``, which win over
    what was carried over); its key prefix (:func:`key_prefix`)."""
    url = conf_setting(app, names.url)
    carried: dict[str, Any] = {}
    if url is None or not url.value:
        found = carried_over(app)
        if found is None:
            raise ConfigurationError(
                f"{names.users} need Redis: set app.conf.{names.url[0]} "
                "(e.g. 'redis://localhost:6379/0'); neither the result backend nor the "
                "broker is a Redis URL"
            )
        address, carried = found
    else:
        address = url.value
    options = conf_setting(app, names.options)
    given = {} if options is None else options.value or {}
    if not isinstance(given, dict):
        assert options is not None
        raise ConfigurationError(
            f"{options.where} must be a dict of keywords for RedisBackend.from_url "
            f"(socket_timeout=..., ...), got {given!r}"
        )
    # What is set for the lock store itself wins over what came with Celery's own Redis.
    return LockStore(address, carried | given, key_prefix(app, names))


def backend_for(
    app: Celery,
    names: StoreSettings = UNIQUE_STORE,
    backend_class: type[RedisBackend] = RedisBackend,
) -> RedisBackend:
    """The backend ``app``'s unique and rate-limited tasks use (or, with ``names``, the lock
    store a compat layer names), built once per app from ``app.conf``: see
    :func:`lock_store`. ``backend_class`` is what builds it (a subclass of RedisBackend)."""
    return backends.get(app, names.name, lambda: lock_store(app, names).connect(backend_class))


def async_backend_for(app: Celery, names: StoreSettings = UNIQUE_STORE) -> AsyncRedisBackend:
    """The asyncio twin of :func:`backend_for` for the running event loop (an asyncio client
    belongs to one loop): one per app, lock store and loop, built on first use."""
    loop = asyncio.get_running_loop()
    return backends.get_async(app, loop, names.name, lambda: lock_store(app, names).aconnect())
