"""Where a layer's locks live (its lock store), resolved once per app and configuration.

``unique_backend_url`` (with ``unique_backend_options`` and ``unique_key_prefix``), else
Celery's own Redis: the result backend's, else the broker's, read as Celery reads them
(environment variables included), with their TLS and Sentinel settings carried over. One
resolver (:func:`lock_store`) serves the Celery layer and the compat layers, which hand it the
names of their own settings (:class:`StoreSettings`); :func:`backend_for` and
:func:`async_backend_for` build the backend once per app (and per event loop).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from ..backends import AsyncRedisBackend, RedisBackend
from ..background import current_run
from ..core.keys import DEFAULT_PREFIX
from ..errors import ConfigurationError
from .settings import conf_setting

__all__ = [
    "UNIQUE_STORE",
    "LockStore",
    "StoreSettings",
    "async_backend_for",
    "backend_for",
    "backends",
    "carried_over",
    "key_prefix",
    "lock_store",
    "redis_url",
]


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
            weakref.WeakKeyDictionary[object, dict[str, AsyncRedisBackend]],
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
        loop: object,
        name: str,
        build: Callable[[], AsyncRedisBackend],
    ) -> AsyncRedisBackend:
        """The async backend ``name`` of ``app`` on ``loop`` (or trio run), built by
        ``build`` the first time."""
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
        """Close and forget ``app``'s async backends on the running loop (an app serving
        an event loop that ends may call this; others are closed with their process)."""
        loop = current_run()
        with self._lock:
            made = self._async.get(app, weakref.WeakKeyDictionary()).pop(loop, {})
        for backend in made.values():
            await backend.aclose()


#: The backends of every app in this process.
backends = _Backends()


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
    """The async twin of :func:`backend_for` for the running event loop or trio run (a
    connection belongs to one): one per app, lock store and loop, built on first use."""
    loop = current_run()
    return backends.get_async(app, loop, names.name, lambda: lock_store(app, names).aconnect())
