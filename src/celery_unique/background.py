"""Work off the caller's path, on asyncio or trio alike: background tasks (renewals,
clean-ups), steps that a cancellation must not cut short, and a thread's result awaited.

anyio gives every task a parent (a task group); a renewal outlives the call that started it,
so it runs as a task of the loop itself: an asyncio task, or a trio system task (cancelled
when the run ends, like an asyncio task left at ``asyncio.run``'s end).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio

from .errors import ConfigurationError

__all__ = ["current_run", "seen_through", "shielded", "spawn"]

T = TypeVar("T")
logger = logging.getLogger("celery_unique")

# asyncio's loop keeps only weak references to tasks: these are kept until done.
_TASKS: set[asyncio.Task[Any]] = set()


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current_run() -> object:
    """The running asyncio event loop, or trio's run (its token): what a connection belongs
    to. A :class:`ConfigurationError` that says what to do outside either."""
    loop = _asyncio_loop()
    if loop is not None:
        return loop
    try:
        import trio

        return trio.lowlevel.current_trio_token()
    except (ImportError, RuntimeError):
        raise ConfigurationError(
            "celery_unique's async objects run under asyncio or trio (through anyio), and "
            "this call came from outside any event loop they know: await it from a coroutine "
            "that anyio.run(), asyncio.run() or trio.run() runs, or use the sync RedisBackend"
        ) from None


def spawn(coro: Coroutine[Any, Any, Any]) -> Callable[[], object]:
    """Run ``coro`` as a task of the running event loop; a callable that cancels it. An
    exception it raises is logged (no caller is there to get it)."""
    loop = _asyncio_loop()
    if loop is not None:
        task = loop.create_task(coro)
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)
        return task.cancel
    import trio  # the only other backend anyio runs

    scope = trio.CancelScope()

    async def system_task() -> None:
        # A trio system task that raises crashes the run: what fails is logged here.
        with scope:
            try:
                await coro
            except Exception:
                logger.exception("a background task of celery_unique failed")

    trio.lowlevel.spawn_system_task(system_task)
    return scope.cancel


async def shielded(awaitable: Awaitable[T]) -> T:
    """``awaitable`` awaited to its end whatever cancellation lands meanwhile (a release
    on leaving ``async with``): anyio's shield holds off a cancel scope's cancellation at
    each await, and on asyncio a native ``task.cancel()`` is held off as well."""
    if _asyncio_loop() is not None:
        awaitable = asyncio.shield(awaitable)
    with anyio.CancelScope(shield=True):
        result = await awaitable
    return result


async def seen_through(future: Future[T]) -> T:
    """The result of a thread's ``future``; a cancellation waits for the thread to finish
    and is raised then, so that what it did is done when the caller learns of it."""
    loop = _asyncio_loop()
    if loop is not None:
        wrapped = asyncio.wrap_future(future, loop=loop)
        try:
            return await asyncio.shield(wrapped)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([wrapped])
            raise
    import trio

    done = anyio.Event()
    token = trio.lowlevel.current_trio_token()
    future.add_done_callback(lambda _: token.run_sync_soon(done.set))
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await done.wait()
        raise
    return future.result()
