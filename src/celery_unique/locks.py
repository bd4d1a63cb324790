"""What is held for a lease: locks (:class:`Lock`, :class:`AsyncLock`) and semaphore slots
(:class:`Semaphore`, :class:`AsyncSemaphore`), each sync and asyncio twin side by side.

A lock and a slot are held alike (acquire with backoff, owner-checked release and extend,
renewal, clean-up after an unanswered acquire): that is :class:`_Lease`, with a sync and an
async flavour. What differs is only which of the core's operations they send.
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

from .core import locks, semaphores
from .core.holding import Attempt, stamped
from .core.keys import KeySpace
from .core.results import Acquisition, Slot
from .core.steps import Flow, Op, check_timeout, to_ms
from .errors import BackendError, LockNotOwnedError, LockTimeout
from .executors.protocol import AsyncExecutor, Executor

if TYPE_CHECKING:
    from types import TracebackType


__all__ = ["AsyncLock", "AsyncSemaphore", "Lock", "Semaphore"]

logger = logging.getLogger("celery_unique")

E = TypeVar("E")  # the executor: "Executor" for the sync flavour, "AsyncExecutor" for asyncio

# Background tasks of the asyncio flavour (clean-ups, renewals), kept referenced until they
# are done: the event loop itself keeps only weak references to tasks.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _in_background(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


def _new_token() -> str:
    # 128 random bits, like uuid4 but a fifth of its cost on this hot path.
    return os.urandom(16).hex()


class _Lease(Generic[E]):
    """State and decisions shared by every flavour of every held thing."""

    _what = "lock"  # how messages name it
    _renewal: _Renewal | None = None  # the renewal (a thread, or a task) while it runs

    def __init__(
        self,
        executor: E,
        key: str,
        name: str,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_renew: bool = False,
        token: str | None = None,
        on_lost: Callable[[Any], object] | None = None,
        lifetime: float | None = None,
    ) -> None:
        to_ms(ttl)
        check_timeout(blocking, timeout)
        if lifetime is not None:
            to_ms(lifetime, "lifetime")
        self._executor: E = executor
        self._key = key
        self.name = name
        self.ttl = float(ttl)
        self.blocking = blocking
        self.timeout = timeout
        self.auto_renew = auto_renew
        self._own_token = token is None
        self.token = _new_token() if token is None else token
        self.on_lost = on_lost
        self.lifetime = lifetime
        self.lost = False
        self._held = False
        self._last: Attempt | None = None
        self._renew_until: float | None = None  # time.monotonic() moment, from the lifetime

    # -- what each kind sends ---------------------------------------------------------------

    def _acquire_flow(self, blocking: bool, timeout: float | None) -> Flow[Any]:
        raise NotImplementedError

    def _parse_attempt(self, reply: Any) -> Attempt:
        raise NotImplementedError

    def _release_op(self, token: str) -> Op[bool]:
        raise NotImplementedError

    def _extend_op(self, ttl: float) -> Op[bool]:
        raise NotImplementedError

    def _renew_flow(self, since: float, stopped: Callable[[], bool]) -> Flow[str]:
        raise NotImplementedError

    def _cleanup_flow(self, token: str) -> Flow[bool]:
        raise NotImplementedError

    # -- shared decisions -------------------------------------------------------------------

    @property
    def renewing(self) -> bool:
        """Whether auto-renewal is extending the lease right now."""
        return self._renewal is not None

    def _stop_renewal(self) -> None:
        """Stop renewing, for sure and at once: from here no extend is sent (the renewal
        checks its stop before each), and nothing waits for the renewal to wind down, so a
        renewal stuck in a command (or one whose cancellation the runtime swallowed) cannot
        hold the release up. An extend already sent is owner-checked and harmless."""
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.stop.set()
            renewal.interrupt()

    def _renewal_ended(self, renewal: _Renewal, reason: str) -> None:
        """A renewal's flow returned ``reason``; report a loss unless it was stopped."""
        if reason == "stopped" or renewal.stop.is_set():
            return
        if self._renewal is renewal:
            self._renewal = None
        self._renewal_stopped(reason)

    def __repr__(self) -> str:
        state = "held" if self._held else "lost" if self.lost else "not held"
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl:g} {state}>"

    def _record(self, result: Attempt) -> bool:
        """Note an attempt's outcome; whether renewal should start now."""
        self._last = result
        if not result.acquired:
            return False
        started = not self._held
        self._held = True
        self.lost = False
        if started and self.lifetime is not None:
            self._renew_until = time.monotonic() + self.lifetime
        return self.auto_renew

    def _rotate_token(self) -> str:
        """The token a clean-up may still release: a generated token is replaced, so that
        the clean-up, landing late, cannot release what this object acquires next."""
        token = self.token
        if self._own_token:
            self.token = _new_token()
        return token

    def _timeout_error(self) -> LockTimeout:
        last = self._last
        owner = None if last is None or last.acquired else getattr(last, "owner", None)
        ttl = None if last is None or last.acquired else last.ttl
        return LockTimeout(
            f"could not acquire {self._what} {self.name!r} in time; the earliest holder's "
            f"lease ends in {ttl if ttl is not None else 'an unknown number of'} seconds: "
            "wait longer (timeout=) or let the holders finish",
            key=self.name,
            owner=owner,
            ttl=ttl,
        )

    def _not_owned(self, action: str) -> LockNotOwnedError:
        self._held = False
        return LockNotOwnedError(
            f"cannot {action} {self._what} {self.name!r}: this owner no longer holds it (its "
            "lease ran out or another owner took it); use a longer ttl or auto_renew=True",
            key=self.name,
        )

    def _lost_on_exit(self, lost: LockNotOwnedError, body_error: BaseException | None) -> None:
        if body_error is None:
            raise lost
        # The block's own error matters more; do not hide it behind this one.
        logger.error("%s %r was no longer held when its block raised", self._what, self.name)

    def _renewal_stopped(self, reason: str) -> None:
        if reason == "until":
            return  # it expires at the moment it was meant to; held until then
        self._held = False
        self.lost = True
        logger.error(
            "%s %r was lost while held (%s): another owner may now hold it",
            self._what,
            self.name,
            "Redis unreachable for a whole TTL" if reason == "unreachable" else "expired or taken",
        )
        if self.on_lost is not None:
            self.on_lost(self)

    def _cleanup_failed(self) -> None:
        logger.warning("could not free %s %r after an interrupted acquire", self._what, self.name)


class _Stopped(Exception):
    """Raised inside the renewal thread's sleep when the lease is given up."""


class _Renewal:
    """A running renewal: its stop flag, and how to cut its wait short (wake a thread's
    sleep, cancel a task)."""

    __slots__ = ("interrupt", "stop")

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.interrupt: Callable[[], object] = lambda: None


class _SyncLease(_Lease[Executor]):
    """The threads flavour: renewal and clean-ups run on daemon threads."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take it; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        was_held = self._held
        try:
            result, sent = self._executor.run(
                stamped(self._acquire_flow(blocking, timeout), time.monotonic)
            )
        except BackendError as exc:
            if exc.outcome_unknown and not was_held:
                self._release_later(self._rotate_token())
            raise
        except BaseException:
            # Interrupted, maybe while the script ran: free what we may have taken.
            if not was_held:
                self._release_later(self._rotate_token())
            raise
        if self._record(result):
            self._start_renewal(sent)
        return bool(result.acquired)

    def release(self) -> None:
        """Give it up; :class:`LockNotOwnedError` if this owner no longer holds it."""
        self._stop_renewal()
        if not self._executor.execute(self._release_op(self.token)):
            raise self._not_owned("release")
        self._held = False

    def release_in_background(self) -> None:
        """Give it up without waiting: a thread sends the release and, while Redis does not
        answer, tries again until the TTL is over (by then it has expired anyway). For
        clean-ups that must not hold their caller up, such as after an unanswered acquire."""
        self._stop_renewal()
        self._held = False
        self._release_later(self.token)

    def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the TTL) from now; raises if not the owner."""
        if not self._executor.execute(self._extend_op(self.ttl if ttl is None else ttl)):
            raise self._not_owned("extend")

    def abandon(self) -> None:
        """Stop renewing and forget it without releasing: it expires by its TTL."""
        self._stop_renewal()
        self._held = False

    def __enter__(self) -> Any:
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

    def _release_later(self, token: str) -> None:
        flow = self._cleanup_flow(token)

        def run() -> None:
            try:
                self._executor.run(flow)
            except Exception:
                self._cleanup_failed()

        threading.Thread(target=run, name=f"celery-unique free {self.name}", daemon=True).start()

    def _start_renewal(self, since: float) -> None:
        """Renew from a daemon thread, the lease counted from ``since`` (the acquire's send)."""
        if self._renewal is not None:
            return
        renewal = _Renewal()
        stop = renewal.stop

        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Stopped

        def run() -> None:
            try:
                reason = self._executor.run(self._renew_flow(since, stop.is_set), sleep=sleep)
            except _Stopped:
                return
            self._renewal_ended(renewal, reason)

        self._renewal = renewal
        name = f"celery-unique renew {self.name}"
        threading.Thread(target=run, name=name, daemon=True).start()


class _AsyncLease(_Lease[AsyncExecutor]):
    """The asyncio flavour: renewal and clean-ups run as tasks of the running loop; leaving
    ``async with`` is shielded, so a cancelled task still gives up what it held."""

    # timeout= mirrors the sync acquire (and threading.Lock): it answers False, never raises.
    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Take it; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        was_held = self._held
        in_flight: list[Any] = []
        try:
            result, sent = await self._executor.run(
                stamped(self._acquire_flow(blocking, timeout), time.monotonic),
                on_cancelled=in_flight.append,
            )
        except BackendError as exc:
            if exc.outcome_unknown and not was_held:
                self._release_later(self._rotate_token())
            raise
        except BaseException:
            # Cancelled while a command was in flight: it was seen through, so we know what
            # it did. Free what it took (Redis answered: one quick round trip).
            if not was_held and in_flight:
                outcome = in_flight[-1]
                if isinstance(outcome, BaseException):
                    if getattr(outcome, "outcome_unknown", False):
                        self._release_later(self._rotate_token())
                elif self._parse_attempt(outcome).acquired:
                    await self._release_quietly()
            raise
        if self._record(result):
            self._start_renewal(sent)
        return bool(result.acquired)

    async def release(self) -> None:
        """Give it up; :class:`LockNotOwnedError` if this owner no longer holds it."""
        self._stop_renewal()
        if not await self._executor.execute(self._release_op(self.token)):
            raise self._not_owned("release")
        self._held = False

    async def release_in_background(self) -> None:
        """Give it up without waiting: a task of the running loop sends the release; see
        :meth:`Lock.release_in_background`."""
        self._stop_renewal()
        self._held = False
        self._release_later(self.token)

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the TTL) from now; raises if not the owner."""
        if not await self._executor.execute(self._extend_op(self.ttl if ttl is None else ttl)):
            raise self._not_owned("extend")

    async def abandon(self) -> None:
        """Stop renewing and forget it without releasing: it expires by its TTL."""
        self._stop_renewal()
        self._held = False

    async def __aenter__(self) -> Any:
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
            await _shielded(self.release())
        except LockNotOwnedError as lost:
            self._lost_on_exit(lost, exc)

    async def _release_quietly(self) -> None:
        try:
            await _shielded(self._executor.execute(self._release_op(self.token)))
        except Exception:
            self._cleanup_failed()

    def _release_later(self, token: str) -> None:
        flow = self._cleanup_flow(token)

        async def run() -> None:
            try:
                await self._executor.run(flow)
            except Exception:
                self._cleanup_failed()

        _in_background(run())

    def _start_renewal(self, since: float) -> None:
        """Renew from a task of the running loop, the lease counted from ``since``."""
        if self._renewal is not None:
            return
        renewal = _Renewal()
        task = _in_background(self._renew(renewal, since))
        renewal.interrupt = task.cancel
        self._renewal = renewal

    async def _renew(self, renewal: _Renewal, since: float) -> None:
        reason = await self._executor.run(self._renew_flow(since, renewal.stop.is_set))
        self._renewal_ended(renewal, reason)


async def _shielded(coro: Any) -> Any:
    # anyio's shield stops a cancel scope from cancelling the release again at each await;
    # asyncio.shield lets it finish even if the task is cancelled natively once more.
    with anyio.CancelScope(shield=True):
        return await asyncio.shield(coro)


# -- locks ---------------------------------------------------------------------------------------


class _LockKind(_Lease[E]):
    """What makes a lease a lock: one owner at a time, and a fence per acquisition."""

    def __init__(
        self,
        executor: E,
        keys: KeySpace,
        name: str,
        ttl: float,
        *,
        key: str | None = None,
        **options: Any,
    ):
        super().__init__(executor, keys.lock(name) if key is None else key, name, ttl, **options)
        self.fence: int | None = None

    @property
    def key(self) -> str:
        """The Redis key the lock lives in."""
        return self._key

    def _take_over_op(self, predecessor: str, freeing: str | None) -> Op[Acquisition]:
        if freeing is None:
            return locks.acquire_once(self._key, self.token, self.ttl, predecessor)
        return locks.move(self._key, self.token, self.ttl, predecessor, freeing)

    def _record(self, result: Attempt) -> bool:
        if result.acquired:
            self.fence = getattr(result, "fence", None)
        return super()._record(result)

    def _acquire_flow(self, blocking: bool, timeout: float | None) -> Flow[Acquisition]:
        return locks.acquire(
            self._key,
            self.token,
            self.ttl,
            blocking=blocking,
            timeout=timeout,
            clock=time.monotonic,
        )

    def _parse_attempt(self, reply: Any) -> Acquisition:
        return locks.parse_acquire(reply)

    # The fence this object's acquire answered lets release and extend use the server's
    # owner-checked commands where it has them (same answers as the scripts).
    def _release_op(self, token: str) -> Op[bool]:
        return locks.release(self._key, token, fence=self.fence if token == self.token else None)

    def _extend_op(self, ttl: float) -> Op[bool]:
        return locks.extend(self._key, self.token, ttl, fence=self.fence)

    def _renew_flow(self, since: float, stopped: Callable[[], bool]) -> Flow[str]:
        return locks.renew(
            self._key,
            self.token,
            self.ttl,
            clock=time.monotonic,
            until=self._renew_until,
            since=since,
            stopped=stopped,
            fence=self.fence,
        )

    def _cleanup_flow(self, token: str) -> Flow[bool]:
        # Off the caller's path: Redis did not answer the acquire, and may not answer this.
        return locks.release_eventually(self._key, token, self.ttl, clock=time.monotonic)


class Lock(_LockKind[Executor], _SyncLease):
    """A distributed lock for threads and processes, shaped like ``threading.Lock``.

    ::

        with backend.lock("report:42", ttl=30, timeout=5) as lock:
            ...  # LockTimeout if not acquired in 5 s; lock.fence orders writes

    ``acquire`` is re-entrant for the same lock object (it refreshes the TTL). ``release`` and
    ``extend`` check ownership in Redis and raise :class:`LockNotOwnedError` when it was lost.
    With ``auto_renew=True`` a daemon thread extends the lock every ``ttl / 3`` while held
    (never past ``lifetime`` seconds after it was acquired, if given); if it is lost anyway,
    ``lock.lost`` becomes true, an error is logged and ``on_lost(lock)`` runs.

    Every call ends within the backend's deadline (about 2 s by default): a hung Redis raises
    :class:`~celery_unique.BackendUnavailable`, and ``acquire(timeout=T)`` gives up by T
    (plus at most 0.5 s for its last attempt) however Redis behaves.
    """

    def take_over(self, predecessor: str, *, freeing: str | None = None) -> Acquisition:
        """Acquire in one attempt, also when the lock is held by token ``predecessor`` (it
        passes to this lock): a hand-over between owners that know each other.

        With ``freeing`` (the :attr:`key` of another lock in the same hash slot), that lock
        is freed in the same atomic step if ``predecessor`` holds it. The returned
        :class:`Acquisition` names the holder when it was another token.
        """
        sent = time.monotonic()
        result = self._executor.execute(self._take_over_op(predecessor, freeing))
        if self._record(result):
            self._start_renewal(sent)
        return result

    def hand_over(self, token: str, ttl: float) -> Acquisition:
        """Pass the lock to ``token`` for ``ttl`` seconds in one atomic step, and stop holding
        it. Also takes the lock for ``token`` if it is free (this lock had expired). The
        result's ``acquired`` is false when another owner holds it: nothing was passed."""
        self._stop_renewal()
        self._held = False
        return self._executor.execute(locks.acquire_once(self._key, token, ttl, self.token))

    def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return self._executor.execute(locks.owner(self._key))

    def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return self.owner() is not None


class AsyncLock(_LockKind[AsyncExecutor], _AsyncLease):
    """The asyncio twin of :class:`Lock`: same methods, awaited.

    ::

        async with abackend.lock("report:42", ttl=30, timeout=5):
            ...

    Leaving the block releases the lock even when the task is being cancelled, and an
    ``acquire`` cancelled mid-flight frees whatever it took. ``auto_renew=True`` renews from a
    task of the running loop.
    """

    async def take_over(self, predecessor: str, *, freeing: str | None = None) -> Acquisition:
        """Acquire in one attempt, also when the lock is held by token ``predecessor``; see
        :meth:`Lock.take_over`."""
        sent = time.monotonic()
        result = await self._executor.execute(self._take_over_op(predecessor, freeing))
        if self._record(result):
            self._start_renewal(sent)
        return result

    async def hand_over(self, token: str, ttl: float) -> Acquisition:
        """Pass the lock to ``token`` for ``ttl`` seconds; see :meth:`Lock.hand_over`."""
        self._stop_renewal()
        self._held = False
        return await self._executor.execute(locks.acquire_once(self._key, token, ttl, self.token))

    async def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return await self._executor.execute(locks.owner(self._key))

    async def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return await self.owner() is not None


# -- semaphores ----------------------------------------------------------------------------------


class _SemaphoreKind(_Lease[E]):
    """What makes a lease a semaphore slot: up to ``limit`` holders at once."""

    _what = "semaphore"

    def __init__(
        self,
        executor: E,
        keys: KeySpace,
        name: str,
        limit: int,
        ttl: float,
        *,
        queue: bool = False,
        **options: Any,
    ):
        super().__init__(executor, keys.semaphore(name), name, ttl, **options)
        self.limit = semaphores.check_limit(limit)
        self.queue = queue
        self._keys = keys.semaphore_queue(name) if queue else (self._key,)
        #: After an acquire was turned away: seconds until this caller should try again (its
        #: turn in the queue, or when the earliest lease ends); ``None`` otherwise.
        self.retry_after: float | None = None
        self._since = 0.0  # time.monotonic() of the acquisition, for the typical hold time

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" limit={self.limit}>"

    def _record(self, result: Attempt) -> bool:
        if isinstance(result, Slot):
            self.retry_after = None if result.acquired else result.due
            if result.acquired and not self._held:
                self._since = time.monotonic()
        return super()._record(result)

    def _acquire_flow(self, blocking: bool, timeout: float | None) -> Flow[Slot]:
        return semaphores.acquire(
            self._keys,
            self.token,
            self.limit,
            self.ttl,
            blocking=blocking,
            timeout=timeout,
            clock=time.monotonic,
        )

    def _parse_attempt(self, reply: Any) -> Slot:
        return semaphores.parse_slot(reply)

    def _release_op(self, token: str) -> Op[bool]:
        if self.queue and self._held and token == self.token:
            # How long it was held teaches the queue how soon slots come free.
            return semaphores.release_held(self._keys, token, time.monotonic() - self._since)
        return semaphores.release(self._key, token)

    def _extend_op(self, ttl: float) -> Op[bool]:
        return semaphores.extend(self._key, self.token, ttl)

    def _renew_flow(self, since: float, stopped: Callable[[], bool]) -> Flow[str]:
        return semaphores.renew(
            self._key,
            self.token,
            self.ttl,
            clock=time.monotonic,
            until=self._renew_until,
            since=since,
            stopped=stopped,
        )

    def _cleanup_flow(self, token: str) -> Flow[bool]:
        return semaphores.release_eventually(self._key, token, self.ttl, clock=time.monotonic)


class Semaphore(_SemaphoreKind[Executor], _SyncLease):
    """A distributed semaphore: at most ``limit`` holders at once, fleet-wide.

    ::

        with backend.semaphore("partner-api", limit=5, ttl=30, timeout=10):
            ...  # LockTimeout if no slot came free in 10 s

    Each holder has a lease on Redis time (``ttl``); a holder that dies frees its slot when
    its lease ends, and expired holders never count. ``acquire``, ``release`` and ``extend``
    are one round trip each; a blocking acquire backs off (10 ms doubling to 250 ms, with
    jitter), never sleeping past the moment the earliest lease ends or the deadline.
    ``auto_renew``, ``on_lost``, ``lifetime`` and the deadlines are as on :class:`Lock`.

    With ``queue=True``, callers turned away by a non-blocking acquire are queued, first come
    first served, and ``retry_after`` tells each when its turn comes: one typical hold time
    (learnt from the releases) per ``limit`` callers apart, so they come back one after another
    rather than all at once.
    """

    def holders(self) -> int:
        """How many live holders the semaphore has now."""
        return self._executor.execute(semaphores.holders(self._key))


class AsyncSemaphore(_SemaphoreKind[AsyncExecutor], _AsyncLease):
    """The asyncio twin of :class:`Semaphore`: same methods, awaited; leaving ``async with``
    frees the slot even when the task is being cancelled."""

    async def holders(self) -> int:
        """How many live holders the semaphore has now."""
        return await self._executor.execute(semaphores.holders(self._key))
