"""Distributed locks: :class:`Lock` (threads) and :class:`AsyncLock` (asyncio), side by side.

Both keep their state and decisions in :class:`_LockBase` and run the core's flows through
their backend; they differ only in how they wait and how renewal runs (a thread, a task).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from . import _core
from ._core import Flow
from ._exceptions import LockNotOwnedError, LockTimeout
from ._models import Acquisition

if TYPE_CHECKING:
    from types import TracebackType

    from ._backend import AsyncRedisBackend, RedisBackend

__all__ = ["AsyncLock", "Lock"]

logger = logging.getLogger("celery_unique")

B = TypeVar("B", "RedisBackend", "AsyncRedisBackend")
Self = TypeVar("Self", bound="_LockBase[Any]")


class _LockBase(Generic[B]):
    """State and decisions shared by :class:`Lock` and :class:`AsyncLock`."""

    def __init__(
        self,
        backend: B,
        name: str,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_renew: bool = False,
        token: str | None = None,
        on_lost: Callable[[Any], object] | None = None,
    ) -> None:
        _core.to_ms(ttl)
        _core.check_timeout(blocking, timeout)
        self._backend: B = backend
        self._keys = backend._keys.lock(name)
        self.name = name
        self.ttl = float(ttl)
        self.blocking = blocking
        self.timeout = timeout
        self.auto_renew = auto_renew
        # 128 random bits, like uuid4 but a fifth of its cost on this hot path.
        self.token = token if token is not None else os.urandom(16).hex()
        self.on_lost = on_lost
        self.fence: int | None = None
        self.lost = False
        self._held = False
        self._last: Acquisition | None = None
        # A time.monotonic() moment auto-renewal never extends past (a unique task's hard
        # TTL): the lock then expires on its own, which is not a loss.
        self._renew_until: float | None = None

    def __repr__(self) -> str:
        state = "held" if self._held else "lost" if self.lost else "not held"
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl:g} {state}>"

    def _acquire_flow(self, blocking: bool, timeout: float | None) -> Flow[Acquisition]:
        return _core.acquire(
            self._keys,
            self.token,
            self.ttl,
            blocking=blocking,
            timeout=timeout,
            clock=time.monotonic,
        )

    def _record(self, result: Acquisition) -> bool:
        self._last = result
        if result.acquired:
            self._held = True
            self.lost = False
            self.fence = result.fence
        return result.acquired

    def _timeout_error(self) -> LockTimeout:
        last = self._last
        owner = None if last is None or last.acquired else last.owner
        ttl = None if last is None or last.acquired else last.ttl
        return LockTimeout(
            f"could not acquire lock {self.name!r} in time; it is held by another owner "
            f"for {ttl if ttl is not None else 'an unknown number of'} more seconds: "
            "wait longer (timeout=) or let the holder finish",
            key=self.name,
            owner=owner,
            ttl=ttl,
        )

    def _not_owned(self, action: str) -> LockNotOwnedError:
        self._held = False
        return LockNotOwnedError(
            f"cannot {action} lock {self.name!r}: this owner no longer holds it (its TTL ran "
            "out or another owner took it); use a longer ttl or auto_renew=True",
            key=self.name,
        )

    def _lost_on_exit(self, lost: LockNotOwnedError, body_error: BaseException | None) -> None:
        if body_error is None:
            raise lost
        # The block's own error matters more; do not hide it behind this one.
        logger.error("lock %r was no longer held when its block raised", self.name)

    def _renew_flow(self) -> Flow[str]:
        return _core.renew(
            self._keys, self.token, self.ttl, clock=time.monotonic, until=self._renew_until
        )

    def _renewal_stopped(self, reason: str) -> None:
        if reason == "until":
            return  # it expires at the moment it was meant to; held until then
        self._held = False
        self.lost = True
        logger.error(
            "lock %r was lost while held (%s): another owner may now hold it",
            self.name,
            "Redis unreachable for a whole TTL" if reason == "unreachable" else "expired or taken",
        )
        if self.on_lost is not None:
            self.on_lost(self)


class _Stopped(Exception):
    """Raised inside the renewal thread's sleep when the lock is released."""


class Lock(_LockBase["RedisBackend"]):
    """A distributed lock for threads and processes, shaped like ``threading.Lock``.

    ::

        with backend.lock("report:42", ttl=30, timeout=5) as lock:
            ...  # LockTimeout if not acquired in 5 s; lock.fence orders writes

    ``acquire`` is re-entrant for the same lock object (it refreshes the TTL). ``release`` and
    ``extend`` check ownership in Redis and raise :class:`LockNotOwnedError` when it was lost.
    With ``auto_renew=True`` a daemon thread extends the lock every ``ttl / 3`` while held; if
    it is lost anyway, ``lock.lost`` becomes true, an error is logged and ``on_lost(lock)`` runs.
    """

    _renewal: tuple[threading.Thread, threading.Event] | None = None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        was_held = self._held
        try:
            result = self._backend._run(self._acquire_flow(blocking, timeout))
        except BaseException:
            # The script may have run before we were interrupted: free what we may have taken.
            if not was_held:
                self._release_quietly()
            raise
        if self._record(result) and self.auto_renew and self._renewal is None:
            self._start_renewal()
        return result.acquired

    def release(self) -> None:
        """Release the lock; :class:`LockNotOwnedError` if this owner no longer holds it."""
        self._stop_renewal()
        if not self._backend._one(_core.release(self._keys, self.token)):
            raise self._not_owned("release")
        self._held = False

    def extend(self, ttl: float | None = None) -> None:
        """Reset the TTL to ``ttl`` (default: the lock's) from now; raises if not the owner."""
        if not self._backend._one(
            _core.extend(self._keys, self.token, self.ttl if ttl is None else ttl)
        ):
            raise self._not_owned("extend")

    def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return self._backend._one(_core.owner(self._keys))

    def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return self.owner() is not None

    def __enter__(self) -> Lock:
        if not self.acquire(self.blocking, self.timeout):
            raise self._timeout_error()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except LockNotOwnedError as lost:
            self._lost_on_exit(lost, exc)

    def _adopt(self, result: Acquisition) -> None:
        """Hold a lock acquired for this token elsewhere (a framework's hand-over)."""
        if self._record(result) and self.auto_renew and self._renewal is None:
            self._start_renewal()

    def _detach(self) -> None:
        """Stop renewing and forget the lock without releasing it (it was handed on)."""
        self._stop_renewal()
        self._held = False

    def _release_quietly(self) -> None:
        try:
            self._backend._one(_core.release(self._keys, self.token))
        except Exception:
            logger.warning("could not free lock %r after an interrupted acquire", self.name)

    def _start_renewal(self) -> None:
        stop = threading.Event()

        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Stopped

        def run() -> None:
            try:
                reason = self._backend._run(self._renew_flow(), sleep=sleep)
            except _Stopped:
                return
            self._renewal = None
            self._renewal_stopped(reason)

        thread = threading.Thread(target=run, name=f"celery-unique renew {self.name}", daemon=True)
        self._renewal = (thread, stop)
        thread.start()

    def _stop_renewal(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            thread, stop = renewal
            stop.set()
            if thread is not threading.current_thread():
                thread.join()


class AsyncLock(_LockBase["AsyncRedisBackend"]):
    """The asyncio twin of :class:`Lock`: same methods, awaited.

    ::

        async with abackend.lock("report:42", ttl=30, timeout=5):
            ...

    Leaving the block releases the lock even when the task is being cancelled, and an
    ``acquire`` cancelled mid-flight frees whatever it may have taken. ``auto_renew=True``
    renews from a task of the running loop.
    """

    _renewal: asyncio.Task[None] | None = None

    # timeout= mirrors Lock.acquire (and threading.Lock): it answers False, it does not raise.
    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Take the lock; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        was_held = self._held
        try:
            result = await self._backend._run(
                self._acquire_flow(blocking, timeout), see_through=True
            )
        except BaseException:
            # Cancelled (or failed) once the script may have run: free what we may have taken.
            # The in-flight acquire was seen through first, so this release cannot overtake it.
            if not was_held:
                await self._release_quietly()
            raise
        if self._record(result) and self.auto_renew and self._renewal is None:
            self._renewal = asyncio.get_running_loop().create_task(self._renew())
        return result.acquired

    async def release(self) -> None:
        """Release the lock; :class:`LockNotOwnedError` if this owner no longer holds it."""
        await self._stop_renewal()
        if not await self._backend._one(_core.release(self._keys, self.token)):
            raise self._not_owned("release")
        self._held = False

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the TTL to ``ttl`` (default: the lock's) from now; raises if not the owner."""
        if not await self._backend._one(
            _core.extend(self._keys, self.token, self.ttl if ttl is None else ttl)
        ):
            raise self._not_owned("extend")

    async def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return await self._backend._one(_core.owner(self._keys))

    async def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return await self.owner() is not None

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire(self.blocking, self.timeout):
            raise self._timeout_error()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._shielded(self.release())
        except LockNotOwnedError as lost:
            self._lost_on_exit(lost, exc)

    async def _release_quietly(self) -> None:
        try:
            await self._shielded(self._backend._one(_core.release(self._keys, self.token)))
        except Exception:
            logger.warning("could not free lock %r after an interrupted acquire", self.name)

    @staticmethod
    async def _shielded(coro: Any) -> Any:
        # anyio's shield stops a cancel scope from cancelling the release again at each await;
        # asyncio.shield lets it finish even if the task is cancelled natively once more.
        with anyio.CancelScope(shield=True):
            return await asyncio.shield(coro)

    async def _renew(self) -> None:
        reason = await self._backend._run(self._renew_flow())
        self._renewal = None
        self._renewal_stopped(reason)

    async def _stop_renewal(self) -> None:
        task, self._renewal = self._renewal, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
