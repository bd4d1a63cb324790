"""celery-singleton's spellings on celery-unique's :class:`~celery_unique.UniqueTask`.

Switch by changing the import::

    from celery_unique.compat.singleton import Singleton, clear_locks, DuplicateTaskError

    @app.task(base=Singleton, unique_on=["username"], raise_on_duplicate=True, lock_expiry=60)
    def do_something(username, otherarg=None): ...

Task options ``unique_on``, ``raise_on_duplicate`` and ``lock_expiry``; app settings
``singleton_backend_url``, ``singleton_key_prefix``, ``singleton_raise_on_duplicate``,
``singleton_lock_expiry``, ``singleton_json_encoder_class``, ``singleton_backend_class`` and
``singleton_backend_kwargs`` (also spelled ``CELERY_SINGLETON_*`` or ``SINGLETON_*``). The
other ``unique_*`` settings of ``app.conf`` (``unique_lease``, ``unique_fail_open``,
``unique_ttl``) apply too.

Code that imports ``celery_singleton`` keeps working with a two-line module of that name on
the import path (``celery_singleton.py``)::

    from celery_unique.compat.singleton import install_as

    install_as(__name__)
"""

from __future__ import annotations

from typing import Any, ClassVar

from celery import Celery
from kombu.utils.imports import symbol_by_name

from .. import AsyncRedisBackend, ConfigurationError, RedisBackend
from .. import DuplicateTaskError as BaseDuplicateTaskError
from ..celery import (
    Setting,
    StoreSettings,
    UniqueTask,
    async_backend_for,
    backend_for,
    conf_setting,
    force_release,
    from_task,
    holder_id,
    unlink_locks,
)
from . import install_modules

__all__ = ["DuplicateTaskError", "Singleton", "clear_locks", "install_as"]

#: celery-singleton's default key prefix, kept so its users' key layout stays recognisable.
DEFAULT_KEY_PREFIX = "SINGLETONLOCK_"
# What celery-singleton accepted as its own Redis backend (its README names the module
# ``backend``, the package ``backends``): all mean "the default", which here is ours.
_DEFAULT_BACKENDS = frozenset(
    {
        "celery_singleton.backends.redis.RedisBackend",
        "celery_singleton.backends.RedisBackend",
        "celery_singleton.backend.RedisBackend",
    }
)


def _spellings(name: str) -> tuple[str, ...]:
    """The keys celery-singleton read setting ``name`` from: ``app.conf.get`` already maps
    namespaced configs (``config_from_object(..., namespace="CELERY")``); uppercase keys set
    without a namespace are looked up as well."""
    return (f"singleton_{name}", f"CELERY_SINGLETON_{name.upper()}", f"SINGLETON_{name.upper()}")


#: Where ``Singleton`` tasks keep their locks: the ``singleton_*`` settings, else (as for
#: every unique task) the result backend's Redis, else the broker's.
STORE = StoreSettings(
    name="singleton",
    users="Singleton tasks",
    url=_spellings("backend_url"),
    options=_spellings("backend_kwargs"),
    prefix=_spellings("key_prefix"),
    default_prefix=DEFAULT_KEY_PREFIX,
)


class DuplicateTaskError(BaseDuplicateTaskError):
    """Raised by a duplicate ``delay()``/``apply_async()`` with ``raise_on_duplicate``.

    ``task_id`` is the instance already queued or running. Also a
    :class:`celery_unique.DuplicateTaskError`, so it carries the lock's remaining ``ttl`` too;
    built with celery-singleton's positional ``(message, task_id)``.
    """

    def __init__(self, message: str, task_id: str, ttl: float | None = None) -> None:
        super().__init__(message, task_id=task_id, ttl=ttl)


def config(app: Celery, name: str) -> Setting | None:
    """The setting ``singleton_<name>``, in any of the spellings celery-singleton read."""
    return conf_setting(app, _spellings(name))


def _value(found: Setting | None) -> Any:
    return None if found is None else found.value


def singleton_backend(app: Celery) -> RedisBackend:
    """The backend ``Singleton`` tasks of ``app`` use, built once from the singleton settings."""
    return backend_for(app, STORE, backend_class(_value(config(app, "backend_class"))))


def singleton_async_backend(app: Celery) -> AsyncRedisBackend | None:
    """The asyncio twin of :func:`singleton_backend` for the running loop; ``None`` with a
    ``singleton_backend_class`` of one's own (it has no asyncio twin)."""
    if backend_class(_value(config(app, "backend_class"))) is not RedisBackend:
        return None
    return async_backend_for(app, STORE)


def backend_class(value: object) -> type[RedisBackend]:
    """The backend class ``singleton_backend_class`` names: celery-singleton's own Redis
    backend (any of its spellings) means ours; a subclass of ours is taken as it is."""
    if value is None or value in _DEFAULT_BACKENDS:
        return RedisBackend
    found: object = symbol_by_name(value) if isinstance(value, str) else value  # type: ignore[no-untyped-call]
    if isinstance(found, type) and issubclass(found, RedisBackend):
        return found
    raise ConfigurationError(
        f"singleton_backend_class {value!r} is not supported: locks live in Redis and change "
        "only through celery-unique's atomic scripts. Remove the setting (and point "
        "singleton_backend_url at your Redis), or name a subclass of celery_unique.RedisBackend"
    )


def clear_locks(app: Celery) -> int:
    """Delete every ``Singleton`` lock of ``app``; returns how many (SCAN, never KEYS).

    With celery-unique, locks of dead workers expire on their own within a lease, so this is
    no longer needed at worker start; it stays for scripts and tests.
    """
    return unlink_locks(singleton_backend(app))


class Singleton(UniqueTask):
    """celery-singleton's task base: one instance per task name and arguments.

    * ``unique_on``: argument names (a list, or one name as a string) the key uses; ``[]``
      for the task name alone; ``None`` (default) for all arguments;
    * ``raise_on_duplicate``: raise :class:`DuplicateTaskError` instead of returning the
      running instance's ``AsyncResult`` (default ``app.conf.singleton_raise_on_duplicate``);
    * ``lock_expiry``: seconds from queueing after which the lock is gone even if the task
      still runs (default ``app.conf.singleton_lock_expiry``). Unset, a queued lock lasts
      ``unique_ttl`` (1 h) and a running one as long as the run, renewed by a lease.

    A duplicate returns the holder's result (``a == b``); the lock is freed when the task
    ends for good (success, final failure, revoke), is kept across retries, and a dead
    worker's lock expires within ``unique_lease`` seconds.
    """

    unique_on: ClassVar[Any] = None
    raise_on_duplicate: ClassVar[bool | None] = None
    lock_expiry: ClassVar[float | None] = None

    def unique_setting(self, name: str) -> Setting | None:
        """celery-singleton's spellings first: ``lock_expiry`` (a hard TTL),
        ``raise_on_duplicate``, ``unique_on`` as one name, the ``singleton_*`` settings."""
        app = self.app
        if name == "on":
            found = from_task(self, "unique_on", None)
            if found is not None and isinstance(found.value, str):
                return Setting([found.value], found.where)
            return found
        if name in ("ttl", "hard_ttl"):
            expiry = from_task(self, "lock_expiry", None) or config(app, "lock_expiry")
            if expiry is None:
                return super().unique_setting(name)
            return expiry if name == "ttl" else Setting(True, expiry.where)
        if name == "on_duplicate":
            raises = from_task(self, "raise_on_duplicate", None) or config(
                app, "raise_on_duplicate"
            )
            if raises is None:
                return super().unique_setting(name)
            return Setting("raise" if raises.value else "return", raises.where)
        if name == "until":
            return Setting("executed", "celery-singleton's behaviour")
        if name == "json_encoder":
            return config(app, "json_encoder_class") or super().unique_setting(name)
        return super().unique_setting(name)

    def redis_backend(self) -> RedisBackend:
        """The Redis of the ``singleton_*`` settings (see :func:`singleton_backend`)."""
        return singleton_backend(self.app)

    def async_redis_backend(self) -> AsyncRedisBackend | None:
        """Its asyncio twin (see :func:`singleton_async_backend`)."""
        return singleton_async_backend(self.app)

    def duplicate_error(self, holder: str, ttl: float | None) -> DuplicateTaskError:
        """celery-singleton's own :class:`DuplicateTaskError`."""
        return DuplicateTaskError(str(super().duplicate_error(holder, ttl)), holder, ttl)

    def generate_lock(
        self,
        task_name: str | None = None,
        task_args: Any = None,
        task_kwargs: Any = None,
    ) -> str:
        """The lock name of a call with these arguments (``task_name`` is this task's)."""
        return self.unique_key(task_args, task_kwargs)

    def get_existing_task_id(self, lock: str) -> str | None:
        """The id of the instance holding ``lock`` (from :meth:`generate_lock`), or ``None``."""
        owner = self.unique_config.backend.owner(lock)
        return None if owner is None else holder_id(owner)

    def unlock(self, lock: str) -> None:
        """Delete ``lock`` whoever holds it: an administrative reset, like celery-singleton's."""
        force_release(self.unique_config.backend, lock)

    def release_lock(self, task_args: Any = None, task_kwargs: Any = None) -> None:
        """Delete the lock of the call with these arguments, whoever holds it."""
        self.unlock(self.generate_lock(self.name, task_args, task_kwargs))


def install_as(name: str = "celery_singleton") -> None:
    """Serve this module as ``name`` and its submodules (``name.singleton``, ...).

    For a shim module ``celery_singleton.py``: ``from celery_unique.compat.singleton import
    install_as; install_as(__name__)``.
    """
    import sys

    module = sys.modules[__name__]
    install_modules(
        name,
        {
            sub: module
            for sub in ("", "singleton", "exceptions", "backends", "backends.redis", "config")
        },
    )
