"""What is held for a lease: locks (:class:`Lock`, :class:`AsyncLock`) and semaphore slots
(:class:`Semaphore`, :class:`AsyncSemaphore`), each sync and async twin side by side.

What a lock or a slot does, and every decision of holding one, is described once, in a
:class:`~.leases.Lease` (with its kind, :class:`~.leases.LockKind` or
:class:`~.leases.SemaphoreKind`). Each public object holds one, and is driven by one of two thin
drivers: :class:`_SyncDriver` (an executor's calls, daemon threads) and :class:`_AsyncDriver`
(awaited calls, tasks of the running loop). The drivers only move bytes and time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .background import shielded, spawn
from .core.keys import KeySpace
from .core.results import Acquisition
from .core.steps import Flow
from .deferred import call_at
from .errors import LockNotOwnedError
from .executors.protocol import AsyncExecutor, Executor
from .leases import Freeing, Kind, Lease, LockKind, Renewal, SemaphoreKind

if TYPE_CHECKING:
    from types import TracebackType


__all__ = ["AsyncLock", "AsyncSemaphore", "Lock", "Semaphore"]

E = TypeVar("E", Executor, AsyncExecutor)
K = TypeVar("K", bound=Kind)

# Seconds before its first extend is due that a renewal thread is started (it sleeps the rest).
_START_AHEAD = 0.05


class _Face(Generic[E, K]):
    """The public attributes every held thing shows: its lease's."""

    _executor: E
    _lease: Lease[K]

    @property
    def name(self) -> str:
        """The name it was made with."""
        return self._lease.name

    @property
    def ttl(self) -> float:
        """Seconds a lease lasts once acquired or extended."""
        return self._lease.ttl

    @property
    def token(self) -> str:
        """This owner's token."""
        return self._lease.token

    @property
    def lifetime(self) -> float | None:
        """Seconds after acquiring past which auto-renewal never extends it (``None``: no end)."""
        return self._lease.lifetime

    @property
    def lost(self) -> bool:
        """Whether auto-renewal found it lost while held."""
        return self._lease.lost

    @property
    def renewing(self) -> bool:
        """Whether auto-renewal is extending the lease right now."""
        return self._lease.renewing

    @property
    def blocking(self) -> bool:
        """Whether ``with`` waits for it."""
        return self._lease.blocking

    @blocking.setter
    def blocking(self, value: bool) -> None:
        self._lease.blocking = value

    @property
    def timeout(self) -> float | None:
        """Seconds ``with`` waits for it at most (``None``: no limit)."""
        return self._lease.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._lease.timeout = value

    @property
    def auto_renew(self) -> bool:
        """Whether it is extended every ``ttl / 3`` while held."""
        return self._lease.auto_renew

    @auto_renew.setter
    def auto_renew(self, value: bool) -> None:
        self._lease.auto_renew = value

    @property
    def on_lost(self) -> Callable[[Any], object] | None:
        """Called with this object when auto-renewal finds it lost."""
        return self._lease.on_lost

    @on_lost.setter
    def on_lost(self, value: Callable[[Any], object] | None) -> None:
        self._lease.on_lost = value

    def __repr__(self) -> str:
        return self._lease.describe(type(self).__name__)


class _Stopped(Exception):
    """Raised inside the renewal thread's sleep when the lease is given up."""


class _SyncDriver(_Face[Executor, K]):
    """Drives a lease on threads: the executor's calls; renewal and clean-ups on daemon
    threads."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take it; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        lease = self._lease
        was_held = lease.held
        try:
            result, sent = self._executor.run(lease.acquire_flow(blocking, timeout))
        except BaseException as exc:
            # This driver cannot tell what an interruption cut short (in_flight=None).
            self._free(lease.after_failed_acquire(was_held, exc, None))
            raise
        self._renew_if(lease.record(result), sent)
        return bool(result.acquired)

    def release(self) -> None:
        """Give it up; :class:`LockNotOwnedError` if this owner no longer holds it."""
        self._lease.released(self._executor.execute(self._lease.releasing()))

    def release_in_background(self) -> None:
        """Give it up without waiting: a thread sends the release and, while Redis does not
        answer, tries again until the TTL is over (by then it has expired anyway). For
        clean-ups that must not hold their caller up, such as after an unanswered acquire."""
        self._free(Freeing(later=self._lease.let_go()))

    def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the TTL) from now; raises if not the owner."""
        self._lease.extended(self._executor.execute(self._lease.extend_op(ttl)))

    def abandon(self) -> None:
        """Stop renewing and forget it without releasing: it expires by its TTL."""
        self._lease.abandon()

    def __enter__(self) -> Any:
        if not self.acquire(self._lease.blocking, self._lease.timeout):
            raise self._lease.timeout_error()
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
            self._lease.lost_on_exit(lost, exc)

    def _free(self, freeing: Freeing | None) -> None:
        if freeing is None:
            return
        lease = self._lease
        if freeing.now is not None:
            try:
                self._executor.execute(freeing.now)
            except Exception:
                lease.cleanup_failed()
        if freeing.later is not None:
            flow = freeing.later

            def run() -> None:
                try:
                    self._executor.run(flow)
                except Exception:
                    lease.cleanup_failed()

            name = f"celery-unique free {lease.name}"
            threading.Thread(target=run, name=name, daemon=True).start()

    def _renew_if(self, renew: bool, sent: float) -> None:
        """Renew from a daemon thread if the lease says so, counted from ``sent``."""
        if not renew:
            return
        lease = self._lease
        renewal = lease.start_renewal(sent)
        stop = renewal.stop

        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Stopped

        def run() -> None:
            try:
                reason = self._executor.run(renewal.flow, sleep=sleep)
            except _Stopped:
                return
            lease.renewal_ended(renewal, reason)

        def start() -> None:
            if not stop.is_set():
                name = f"celery-unique renew {lease.name}"
                threading.Thread(target=run, name=name, daemon=True).start()

        # The first extend is due a third of the TTL after the acquire's send; most holds (a
        # short task's run) end before that, and so never start a thread (as costly as a
        # round trip). A release before then only cancels the timer's entry.
        due = sent + lease.ttl / 3 - min(lease.ttl / 30, _START_AHEAD)
        renewal.interrupt = call_at(due, start).cancel


class _AsyncDriver(_Face[AsyncExecutor, K]):
    """Drives a lease on asyncio or trio: awaited calls; renewal and clean-ups as tasks of
    the running loop; leaving ``async with`` is shielded, so a cancelled task still gives up what it
    held."""

    # timeout= mirrors the sync acquire (and threading.Lock): it answers False, never raises.
    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take it; ``False`` if it is held elsewhere (after ``timeout`` s if blocking)."""
        lease = self._lease
        was_held = lease.held
        in_flight: list[Any] = []  # what a command cut short by a cancellation answered
        try:
            result, sent = await self._executor.run(
                lease.acquire_flow(blocking, timeout), on_cancelled=in_flight.append
            )
        except BaseException as exc:
            await self._free(lease.after_failed_acquire(was_held, exc, in_flight))
            raise
        self._renew_if(lease.record(result), sent)
        return bool(result.acquired)

    async def release(self) -> None:
        """Give it up; :class:`LockNotOwnedError` if this owner no longer holds it."""
        self._lease.released(await self._executor.execute(self._lease.releasing()))

    async def release_in_background(self) -> None:
        """Give it up without waiting: a task of the running loop sends the release; see
        :meth:`Lock.release_in_background`."""
        await self._free(Freeing(later=self._lease.let_go()))

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the TTL) from now; raises if not the owner."""
        self._lease.extended(await self._executor.execute(self._lease.extend_op(ttl)))

    async def abandon(self) -> None:
        """Stop renewing and forget it without releasing: it expires by its TTL."""
        self._lease.abandon()

    async def __aenter__(self) -> Any:
        if not await self.acquire(self._lease.blocking, self._lease.timeout):
            raise self._lease.timeout_error()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await shielded(self.release())
        except LockNotOwnedError as lost:
            self._lease.lost_on_exit(lost, exc)

    async def _free(self, freeing: Freeing | None) -> None:
        if freeing is None:
            return
        lease = self._lease
        if freeing.now is not None:
            try:
                await shielded(self._executor.execute(freeing.now))
            except Exception:
                lease.cleanup_failed()
        if freeing.later is not None:
            spawn(self._quietly(freeing.later))

    async def _quietly(self, flow: Flow[bool]) -> None:
        try:
            await self._executor.run(flow)
        except Exception:
            self._lease.cleanup_failed()

    def _renew_if(self, renew: bool, sent: float) -> None:
        """Renew from a task of the running loop if the lease says so, counted from ``sent``."""
        if not renew:
            return
        renewal = self._lease.start_renewal(sent)
        renewal.interrupt = spawn(self._renew(renewal))

    async def _renew(self, renewal: Renewal) -> None:
        reason = await self._executor.run(renewal.flow)
        self._lease.renewal_ended(renewal, reason)


# -- locks ---------------------------------------------------------------------------------------


class _LockFace(_Face[E, LockKind]):
    """What a lock shows besides a lease's attributes, and how one is made (``options``: those
    of :class:`~.leases.Lease`)."""

    def __init__(
        self,
        executor: E,
        keys: KeySpace,
        name: str,
        ttl: float,
        *,
        key: str | None = None,
        **options: Any,
    ) -> None:
        self._executor = executor
        kind = LockKind(keys.lock(name) if key is None else key)
        self._lease = Lease(kind, name, ttl, face=self, **options)

    @property
    def key(self) -> str:
        """The Redis key the lock lives in."""
        return self._lease.kind.key

    @property
    def fence(self) -> int | None:
        """The fencing token of the last acquisition: strictly increasing per name."""
        return self._lease.kind.fence


class Lock(_SyncDriver[LockKind], _LockFace[Executor]):
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

    For the Celery layer, which makes its locks directly (``Lock(executor, keys, name, ttl,
    ...)``): ``key=`` puts the lock in a key other than the name's own (a task's running
    lock), ``lifetime=`` ends auto-renewal that many seconds after acquiring; ``take_over``
    acquires from a known predecessor, ``hand_over`` passes the lock on, ``abandon`` stops
    holding without releasing. Each goes through the lock's one :class:`~.leases.Lease`, as
    ``acquire`` and ``release`` do.
    """

    def take_over(self, predecessor: str, *, freeing: str | None = None) -> Acquisition:
        """Acquire in one attempt, also when the lock is held by token ``predecessor`` (it
        passes to this lock): a hand-over between owners that know each other.

        With ``freeing`` (the :attr:`key` of another lock in the same hash slot), that lock
        is freed in the same atomic step if ``predecessor`` holds it. The returned
        :class:`Acquisition` names the holder when it was another token.
        """
        op, sent = self._lease.take_over_op(predecessor, freeing)
        result = self._executor.execute(op)
        self._renew_if(self._lease.record(result), sent)
        return result

    def hand_over(self, token: str, ttl: float) -> Acquisition:
        """Pass the lock to ``token`` for ``ttl`` seconds in one atomic step, and stop holding
        it. Also takes the lock for ``token`` if it is free (this lock had expired). The
        result's ``acquired`` is false when another owner holds it: nothing was passed."""
        return self._executor.execute(self._lease.hand_over_op(token, ttl))

    def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return self._executor.execute(self._lease.kind.owner())

    def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return self.owner() is not None


class AsyncLock(_AsyncDriver[LockKind], _LockFace[AsyncExecutor]):
    """The async twin of :class:`Lock` (asyncio or trio): same methods, awaited.

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
        op, sent = self._lease.take_over_op(predecessor, freeing)
        result = await self._executor.execute(op)
        self._renew_if(self._lease.record(result), sent)
        return result

    async def hand_over(self, token: str, ttl: float) -> Acquisition:
        """Pass the lock to ``token`` for ``ttl`` seconds; see :meth:`Lock.hand_over`."""
        return await self._executor.execute(self._lease.hand_over_op(token, ttl))

    async def owner(self) -> str | None:
        """The token of the current holder, or ``None`` when the lock is free."""
        return await self._executor.execute(self._lease.kind.owner())

    async def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return await self.owner() is not None


# -- semaphores ----------------------------------------------------------------------------------


class _SemaphoreFace(_Face[E, SemaphoreKind]):
    """What a semaphore shows besides a lease's attributes, and how one is made (``options``:
    those of :class:`~.leases.Lease`)."""

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
    ) -> None:
        self._executor = executor
        kind = SemaphoreKind(keys, name, limit, queue=queue)
        self._lease = Lease(kind, name, ttl, face=self, **options)

    @property
    def limit(self) -> int:
        """How many holders it admits at once."""
        return self._lease.kind.limit

    @property
    def queue(self) -> bool:
        """Whether callers turned away are queued (see :attr:`retry_after`)."""
        return self._lease.kind.queue

    @property
    def retry_after(self) -> float | None:
        """After an acquire was turned away: seconds until this caller should try again (its
        turn in the queue, or when the earliest lease ends); ``None`` otherwise."""
        return self._lease.kind.retry_after


class Semaphore(_SyncDriver[SemaphoreKind], _SemaphoreFace[Executor]):
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
        return self._executor.execute(self._lease.kind.holders())


class AsyncSemaphore(_AsyncDriver[SemaphoreKind], _SemaphoreFace[AsyncExecutor]):
    """The async twin of :class:`Semaphore` (asyncio or trio): same methods, awaited;
    leaving ``async with`` frees the slot even when the task is being cancelled."""

    async def holders(self) -> int:
        """How many live holders the semaphore has now."""
        return await self._executor.execute(self._lease.kind.holders())
