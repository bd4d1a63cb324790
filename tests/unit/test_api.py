"""The public surface: exports, docstrings, sync/async parity, error tree, import cost."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys

import pytest
import redis
import redis.asyncio

import celery_unique
from celery_unique import (
    AsyncLock,
    AsyncRateLimiter,
    AsyncRedisBackend,
    AsyncSemaphore,
    BackendError,
    BackendUnavailable,
    CeleryUniqueError,
    ConfigurationError,
    DuplicateTaskError,
    Lock,
    LockError,
    LockNotOwnedError,
    LockTimeout,
    RateLimiter,
    RateLimitExceeded,
    RedisBackend,
    Semaphore,
)


def test_all_lists_every_public_name_and_each_has_a_docstring() -> None:
    for name in celery_unique.__all__:  # loads the lazy ones (the task classes) too
        assert inspect.getdoc(getattr(celery_unique, name)), f"{name} has no docstring"
    public = {
        name
        for name, value in vars(celery_unique).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and name not in {"annotations", "TYPE_CHECKING"}
    }
    assert set(celery_unique.__all__) == public


def test_the_version_is_the_installed_distributions() -> None:
    # __version__ is a dunder, so the check above leaves it out of __all__ on purpose.
    from importlib.metadata import version

    assert celery_unique.__version__ == version("celery-unique")


@pytest.mark.parametrize(
    "module",
    ["celery_unique.compat.singleton", "celery_unique.compat.heimdall", "celery_unique.celery"],
)
def test_each_migration_layer_and_the_hooks_it_uses_document_what_they_export(
    module: str,
) -> None:
    import importlib

    layer = importlib.import_module(module)
    assert inspect.getdoc(layer)
    for name in layer.__all__:
        assert inspect.getdoc(getattr(layer, name)), f"{module}.{name} has no docstring"


def test_importing_the_async_backend_does_not_import_celery() -> None:
    code = (
        "import sys; from celery_unique import AsyncRedisBackend; "
        "assert 'celery' not in sys.modules, sorted(m for m in sys.modules if 'celery' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _public(cls: type) -> dict[str, inspect.Signature | None]:
    members: dict[str, inspect.Signature | None] = {}
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") and name not in {"__enter__", "__exit__"}:
            continue
        name = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}.get(
            name, name
        )
        if callable(value) and not isinstance(value, type):
            sig = inspect.signature(value)
            # compare shapes, not annotations that name the flavour's own classes
            members[name] = sig.replace(
                parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                return_annotation=sig.empty,
            )
        else:
            members[name] = None
    return members


@pytest.mark.parametrize(
    ("sync", "async_"),
    [
        (Lock, AsyncLock),
        (Semaphore, AsyncSemaphore),
        (RedisBackend, AsyncRedisBackend),
        (RateLimiter, AsyncRateLimiter),
    ],
)
def test_sync_and_async_twins_have_the_same_names_and_parameters(sync: type, async_: type) -> None:
    sync_members, async_members = _public(sync), _public(async_)
    for name in ("__enter__", "__exit__"):
        async_members.setdefault(name, sync_members.get(name))
        sync_members.setdefault(name, async_members.get(name))
    assert sync_members == async_members


@pytest.mark.parametrize(
    ("sync", "async_", "method"),
    [
        *((Lock, AsyncLock, m) for m in ("owner", "locked", "take_over", "hand_over")),
        (Semaphore, AsyncSemaphore, "holders"),
        *(
            (sync, async_, m)
            for sync, async_ in ((Lock, AsyncLock), (Semaphore, AsyncSemaphore))
            for m in ("acquire", "release", "extend", "abandon", "__aenter__", "__aexit__")
        ),
    ],
)
def test_async_twins_methods_are_coroutines(sync: type, async_: type, method: str) -> None:
    assert inspect.iscoroutinefunction(getattr(async_, method))
    assert not inspect.iscoroutinefunction(getattr(sync, method.replace("__a", "__")))


def test_error_tree() -> None:
    assert issubclass(ConfigurationError, CeleryUniqueError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, TypeError)
    assert issubclass(LockTimeout, LockError)
    assert issubclass(LockNotOwnedError, LockError)
    assert issubclass(BackendUnavailable, BackendError)
    for error in (LockError, DuplicateTaskError, RateLimitExceeded, BackendError):
        assert issubclass(error, CeleryUniqueError)


@pytest.mark.parametrize(
    "error",
    [
        DuplicateTaskError("dup", task_id="abc", ttl=12.5),
        LockTimeout("busy", key="k", owner="o", ttl=1.0),
        LockNotOwnedError("lost", key="k"),
        RateLimitExceeded("slow down", retry_after=0.5),
    ],
)
def test_errors_survive_pickling_with_their_attributes(error: CeleryUniqueError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_a_client_of_the_wrong_flavour_is_refused_clearly() -> None:
    with pytest.raises(ConfigurationError, match="use AsyncRedisBackend"):
        RedisBackend(redis.asyncio.Redis())
    with pytest.raises(TypeError, match="use RedisBackend"):
        AsyncRedisBackend(redis.Redis())
    with pytest.raises(ConfigurationError, match=r"redis\.client\.Redis"):
        RedisBackend("redis://localhost")


def test_a_lock_with_a_bad_ttl_or_timeout_is_refused_before_any_io() -> None:
    backend = RedisBackend(redis.Redis(port=1))
    with pytest.raises(ConfigurationError, match="ttl"):
        backend.lock("x", ttl=0)
    with pytest.raises(ConfigurationError, match="ttl"):
        backend.lock("x", ttl=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="timeout"):
        backend.lock("x", ttl=1, blocking=False, timeout=3)
