"""What is held for a lease, described once: a lock or a semaphore slot and every decision of
holding it. :mod:`.locks` holds one :class:`Lease` in each public object, and its sync and async
drivers only move bytes (through an executor) and time (threads, or tasks of the running loop).

* A *kind* (:class:`LockKind`, :class:`SemaphoreKind`) names which of the core's ops acquire,
  release and extend it, and how to read their answers: the one place per kind that says
  which command releases or extends it (renewal sends the kind's extend, a clean-up its
  release).
* A :class:`Lease` holds the state (token, held, lost, the last attempt, the renewal) and the
  decisions: record an attempt, rotate the token, what to free after a failed or interrupted
  acquire and how, the timeout and not-owned errors, a loss found on leaving a block, a
  renewal that ended or was stopped.

No I/O here: every method returns the op or flow to send, or reads an answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from .core import holding, locks, semaphores
from .core.holding import Attempt, stamped
from .core.keys import KeySpace
from .core.results import Acquisition, Slot
from .core.steps import Call, Clock, Eval, Flow, Op, check_timeout, to_ms
from .errors import BackendError, LockNotOwnedError, LockTimeout

__all__ = ["Freeing", "Kind", "Lease", "LockKind", "Renewal", "SemaphoreKind", "StopFlag"]

logger = logging.getLogger("celery_unique")


def new_token() -> str:
    """A fresh owner token: 128 random bits, like uuid4 but a fifth of its cost."""
    return os.urandom(16).hex()


class Kind(Protocol):
    """Which ops and flows hold one kind of lease; see the module docstring."""

    #: How messages name it ("lock", "semaphore").
    what: str

    def acquire(
        self, token: str, ttl: float, blocking: bool, timeout: float | None, clock: Clock
    ) -> Flow[Attempt]:
        """Acquire, waiting with backoff when ``blocking``."""

    def parse(self, reply: Any) -> Attempt:
        """An acquire's raw reply, read."""

    def record(self, result: Attempt) -> None:
        """Note what an attempt answered that only this kind keeps."""

    def release(self, token: str, held_for: float | None) -> Op[bool]:
        """Free ``token``'s hold (``held_for``: seconds this owner held it, when it did)."""

    def extend(self, token: str, ttl: float) -> Op[bool]:
        """Set ``token``'s lease to ``ttl`` seconds from now, if it still holds it."""

    def describe(self) -> str:
        """What a repr adds for this kind."""


class LockKind:
    """What makes a lease a lock: one owner at a time, and a fence per acquisition.

    The ops that release and extend a lock are named here (:meth:`release`, :meth:`extend`)
    and nowhere else: renewal and clean-ups send these too.
    """

    what = "lock"

    def __init__(self, key: str) -> None:
        #: The Redis key the lock lives in.
        self.key = key
        #: The fencing token of the last acquisition (``None`` before one).
        self.fence: int | None = None
        self._fenced: str | None = None  # the token the fence was answered to

    def acquire(
        self, token: str, ttl: float, blocking: bool, timeout: float | None, clock: Clock
    ) -> Flow[Acquisition]:
        """Acquire, waiting with backoff when ``blocking``."""
        return locks.acquire(self.key, token, ttl, blocking=blocking, timeout=timeout, clock=clock)

    def parse(self, reply: Any) -> Acquisition:
        """An acquire's raw reply, read."""
        return locks.parse_acquire(reply)

    def record(self, result: Attempt) -> None:
        """Keep the fence of an acquisition, and the token it was acquired with."""
        if result.acquired:
            self.fence = getattr(result, "fence", None)
            self._fenced = getattr(result, "owner", None)

    def _fence_of(self, token: str) -> int | None:
        # The fence an acquire answered lets release and extend use the server's owner-checked
        # commands where it has them (same answers as the scripts), for that token only.
        return self.fence if token == self._fenced else None

    def release(self, token: str, held_for: float | None) -> Op[bool]:
        """Delete the lock if ``token`` owns it."""
        return locks.release(self.key, token, fence=self._fence_of(token))

    def extend(self, token: str, ttl: float) -> Op[bool]:
        """Set the lock's TTL if ``token`` owns it."""
        return locks.extend(self.key, token, ttl, fence=self._fence_of(token))

    def describe(self) -> str:
        """Nothing: a lock's repr says it all."""
        return ""

    # -- for the Celery layer ------------------------------------------------------------------

    def take_over(
        self, token: str, ttl: float, predecessor: str, freeing: str | None
    ) -> Op[Acquisition]:
        """One attempt for ``token``, also when ``predecessor`` holds it (and, with
        ``freeing``, that lock freed in the same step if ``predecessor`` holds it)."""
        if freeing is None:
            return locks.acquire_once(self.key, token, ttl, predecessor)
        return locks.move(self.key, token, ttl, predecessor, freeing)

    def hand_over(self, holder: str, token: str, ttl: float) -> Op[Acquisition]:
        """Pass the lock from ``holder`` to ``token`` for ``ttl`` seconds."""
        return locks.acquire_once(self.key, token, ttl, holder)

    def owner(self) -> Op[str | None]:
        """The token holding the lock, or ``None``."""
        return locks.owner(self.key)


class SemaphoreKind:
    """What makes a lease a semaphore slot: up to ``limit`` holders at once, and with
    ``queue``, callers turned away told when their turn comes.

    The ops that release and extend a slot are named here and nowhere else: renewal and
    clean-ups send these too.
    """

    what = "semaphore"

    def __init__(self, keys: KeySpace, name: str, limit: int, *, queue: bool = False) -> None:
        self.key = keys.semaphore(name)
        self.limit = semaphores.check_limit(limit)
        self.queue = queue
        self.keys: Sequence[str] = keys.semaphore_queue(name) if queue else (self.key,)
        #: After an acquire was turned away: seconds until this caller should try again (its
        #: turn in the queue, or when the earliest lease ends); ``None`` otherwise.
        self.retry_after: float | None = None

    def acquire(
        self, token: str, ttl: float, blocking: bool, timeout: float | None, clock: Clock
    ) -> Flow[Slot]:
        """Take a slot, waiting with backoff when ``blocking``."""
        return semaphores.acquire(
            self.keys, token, self.limit, ttl, blocking=blocking, timeout=timeout, clock=clock
        )

    def parse(self, reply: Any) -> Slot:
        """An acquire's raw reply, read."""
        return semaphores.parse_slot(reply)

    def record(self, result: Attempt) -> None:
        """Keep when to come back after being turned away."""
        if isinstance(result, Slot):
            self.retry_after = None if result.acquired else result.due

    def release(self, token: str, held_for: float | None) -> Op[bool]:
        """Give up ``token``'s slot."""
        if self.queue and held_for is not None:
            # How long it was held teaches the queue how soon slots come free.
            return semaphores.release_held(self.keys, token, held_for)
        return semaphores.release(self.key, token)

    def extend(self, token: str, ttl: float) -> Op[bool]:
        """Renew ``token``'s lease if its slot is live."""
        return semaphores.extend(self.key, token, ttl)

    def describe(self) -> str:
        """The limit."""
        return f" limit={self.limit}"

    def holders(self) -> Op[int]:
        """How many live holders the semaphore has."""
        return semaphores.holders(self.key)


K = TypeVar("K", bound=Kind)


class StopFlag:
    """``threading.Event``'s ``is_set``, ``set`` and ``wait``, for a renewal's stop: most
    renewals end before anything waits on it (a short hold never starts its thread), so the
    event a wait needs is made by the first wait, and raising the flag costs an attribute
    write until then."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        """Whether the flag is up."""
        return self._set

    def set(self) -> None:
        """Raise the flag and wake whoever waits on it."""
        self._set = True
        event = self._event  # read after the write: a wait made its event, or sees the flag
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is up (``timeout`` seconds at most); whether it is."""
        with _EVENTS:
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if self._set:  # raised before the event was there to be set
            return True
        return event.wait(timeout)


_EVENTS = threading.Lock()  # makes a StopFlag's one event


class Renewal:
    """A running renewal: its flow, its stop flag, and how the driver cuts its wait short
    (wake a thread's sleep, cancel a task).

    It is the gate of its extends (:class:`~celery_unique.core.steps.Gate`): an executor
    writes one only while the flag is down, holding :attr:`writing` from that look to the end
    of the write, and :meth:`end` raises the flag under the same lock. So once a release has
    begun no extend is written, and the release waits at most for one write already under
    way (never for a connection, a handshake or a reply)."""

    __slots__ = ("flow", "interrupt", "stop", "writing")

    def __init__(self, flow: Callable[[Renewal], Flow[str]]) -> None:
        self.stop = StopFlag()
        self.writing = threading.Lock()
        self.interrupt: Callable[[], object] = lambda: None
        self.flow = flow(self)  # made last: its extends are gated by this renewal

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Whether an extend may be written now, kept so until the block ends."""
        with self.writing:
            yield not self.stop.is_set()

    def end(self) -> None:
        """No extend is written from here on; cut the renewal's wait short."""
        with self.writing:
            self.stop.set()
        self.interrupt()


@dataclass(frozen=True, slots=True)
class Freeing:
    """What to free after a failed or interrupted acquire, and how: ``now``, one release
    awaited before the error goes on (Redis answered the acquire), or ``later``, a clean-up
    run off the caller's path (Redis did not answer it, and may not answer this either)."""

    now: Op[bool] | None = None
    later: Flow[bool] | None = None


class Lease(Generic[K]):
    """A lock or a semaphore slot, and every decision of holding it; see the module docstring.

    ``face`` is the public object (``on_lost`` is called with it).
    """

    def __init__(
        self,
        kind: K,
        name: str,
        ttl: float,
        *,
        face: object,
        blocking: bool = True,
        timeout: float | None = None,
        auto_renew: bool = False,
        token: str | None = None,
        on_lost: Callable[[Any], object] | None = None,
        lifetime: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        to_ms(ttl)
        check_timeout(blocking, timeout)
        if lifetime is not None:
            to_ms(lifetime, "lifetime")
        self.kind = kind
        self.name = name
        self.ttl = float(ttl)
        self.face = face
        self.blocking = blocking
        self.timeout = timeout
        self.auto_renew = auto_renew
        self.own_token = token is None
        self.token = new_token() if token is None else token
        self.on_lost = on_lost
        self.lifetime = lifetime
        self.clock = clock
        self.lost = False
        self.held = False
        self.last: Attempt | None = None
        self.since = 0.0  # clock() when it was acquired (after not being held)
        self.renew_until: float | None = None  # clock() moment, from the lifetime
        self.renewal: Renewal | None = None  # while a renewal runs

    def __repr__(self) -> str:
        return self.describe(type(self).__name__)

    def describe(self, cls: str) -> str:
        """The public object's repr, ``cls`` its class name."""
        state = "held" if self.held else "lost" if self.lost else "not held"
        return f"<{cls} {self.name!r} ttl={self.ttl:g} {state}{self.kind.describe()}>"

    # -- acquiring ---------------------------------------------------------------------------

    def acquire_flow(self, blocking: bool, timeout: float | None) -> Flow[tuple[Attempt, float]]:
        """The acquire, and when its last command was sent (the lease counts from there)."""
        flow = self.kind.acquire(self.token, self.ttl, blocking, timeout, self.clock)
        return stamped(flow, self.clock)

    def record(self, result: Attempt) -> bool:
        """Note an attempt's outcome; whether the driver should start renewing now."""
        self.kind.record(result)
        self.last = result
        if not result.acquired:
            return False
        if not self.held:
            self.held = True
            self.since = self.clock()
            if self.lifetime is not None:
                self.renew_until = self.since + self.lifetime
        self.lost = False
        return self.auto_renew and self.renewal is None

    def after_failed_acquire(
        self, was_held: bool, error: BaseException, in_flight: Sequence[Any] | None
    ) -> Freeing | None:
        """An acquire raised ``error``: what it may have taken, and how to free it.

        ``in_flight``: what the command in flight when the acquire was interrupted answered
        (its reply or its error), as a driver that sees commands through reports it (empty:
        none was in flight); ``None`` from a driver that cannot tell. A re-acquire of a held
        lease frees nothing: it is still held.
        """
        if was_held:
            return None
        if isinstance(error, BackendError):
            outcome: Any = error
        elif in_flight is None:  # interrupted, maybe while the script ran
            return Freeing(later=self.clean_up(self.rotate_token()))
        elif not in_flight:  # nothing on the wire: nothing taken
            return None
        else:
            outcome = in_flight[-1]
        if isinstance(outcome, BaseException):
            if getattr(outcome, "outcome_unknown", False):
                return Freeing(later=self.clean_up(self.rotate_token()))
            return None
        if self.kind.parse(outcome).acquired:  # Redis answered: one quick round trip
            return Freeing(now=self.release_op(self.token))
        return None

    def rotate_token(self) -> str:
        """The token a clean-up may still release: a generated token is replaced, so that
        the clean-up, landing late, cannot release what this object acquires next."""
        token = self.token
        if self.own_token:
            self.token = new_token()
        return token

    def timeout_error(self) -> LockTimeout:
        """The error of a ``with`` that could not acquire in time."""
        last = self.last
        owner = None if last is None or last.acquired else getattr(last, "owner", None)
        ttl = None if last is None or last.acquired else last.ttl
        return LockTimeout(
            f"could not acquire {self.kind.what} {self.name!r} in time; the earliest holder's "
            f"lease ends in {ttl if ttl is not None else 'an unknown number of'} seconds: "
            "wait longer (timeout=) or let the holders finish",
            key=self.name,
            owner=owner,
            ttl=ttl,
        )

    # -- releasing and extending -------------------------------------------------------------

    def release_op(self, token: str) -> Op[bool]:
        """The op that frees ``token``'s hold."""
        held_for = self.clock() - self.since if self.held and token == self.token else None
        return self.kind.release(token, held_for)

    def clean_up(self, token: str) -> Flow[bool]:
        """Free what an unanswered acquire (or a release in the background) may hold for
        ``token``, off the caller's path: the kind's release, sent until answered or the TTL
        is over (see :func:`.core.holding.release_eventually`)."""
        release = self.kind.release(token, None).step
        return holding.release_eventually(release, self.ttl, clock=self.clock)

    def releasing(self) -> Op[bool]:
        """Stop renewing and give it up: the op to send, its answer for :meth:`released`."""
        self.stop_renewal()
        return self.release_op(self.token)

    def released(self, answer: bool) -> None:
        """Read the release's answer: :class:`LockNotOwnedError` if it was no longer held."""
        if not answer:
            raise self.not_owned("release")
        self.held = False

    def extend_op(self, ttl: float | None) -> Op[bool]:
        """The op that resets the lease to ``ttl`` (default: the TTL) from now."""
        return self.kind.extend(self.token, self.ttl if ttl is None else ttl)

    def extended(self, answer: bool) -> None:
        """Read the extend's answer: :class:`LockNotOwnedError` if it was no longer held."""
        if not answer:
            raise self.not_owned("extend")

    def let_go(self) -> Flow[bool]:
        """Stop holding it at once; the clean-up that releases it off the caller's path."""
        self.abandon()
        return self.clean_up(self.token)

    def abandon(self) -> None:
        """Stop renewing and forget it without releasing: it expires by its TTL."""
        self.stop_renewal()
        self.held = False

    def not_owned(self, action: str) -> LockNotOwnedError:
        """It was no longer held when ``action`` reached Redis."""
        self.held = False
        return LockNotOwnedError(
            f"cannot {action} {self.kind.what} {self.name!r}: this owner no longer holds it (its "
            "lease ran out or another owner took it); use a longer ttl or auto_renew=True",
            key=self.name,
        )

    def lost_on_exit(self, lost: LockNotOwnedError, body_error: BaseException | None) -> None:
        """Leaving a block found it lost: raise that, unless the block raised its own."""
        if body_error is None:
            raise lost
        # The block's own error matters more; do not hide it behind this one.
        logger.error("%s %r was no longer held when its block raised", self.kind.what, self.name)

    def cleanup_failed(self) -> None:
        """A clean-up (after an interrupted acquire, or in the background) did not get through."""
        logger.warning(
            "could not free %s %r after an interrupted acquire", self.kind.what, self.name
        )

    # -- for the Celery layer ------------------------------------------------------------------

    def take_over_op(
        self: Lease[LockKind], predecessor: str, freeing: str | None
    ) -> tuple[Op[Acquisition], float]:
        """One attempt that also takes the lock from ``predecessor``, and when it is sent;
        its answer goes to :meth:`record` like an acquire's."""
        return self.kind.take_over(self.token, self.ttl, predecessor, freeing), self.clock()

    def hand_over_op(self: Lease[LockKind], token: str, ttl: float) -> Op[Acquisition]:
        """Stop holding the lock and pass it to ``token`` for ``ttl`` seconds in one step."""
        self.abandon()
        return self.kind.hand_over(self.token, token, ttl)

    # -- renewal -----------------------------------------------------------------------------

    @property
    def renewing(self) -> bool:
        """Whether auto-renewal is extending the lease right now."""
        return self.renewal is not None

    def start_renewal(self, since: float) -> Renewal:
        """A renewal to run, the lease counted from ``since`` (the acquire's send); the driver
        runs its flow and sets how to interrupt it."""
        kind, token = self.kind, self.token

        def flow(renewal: Renewal) -> Flow[str]:
            def extend(span: float, within: float) -> Eval | Call:
                # The kind's own extend, answered within what is left of the lease, and
                # written only while the renewal goes on.
                return replace(kind.extend(token, span).step, timeout=within, gate=renewal)

            return holding.renew(
                extend,
                self.ttl,
                clock=self.clock,
                until=self.renew_until,
                since=since,
                stopped=renewal.stop.is_set,
            )

        self.renewal = renewal = Renewal(flow)
        return renewal

    def stop_renewal(self) -> None:
        """Stop renewing, for sure and at once: from here no extend is sent (the renewal
        checks its stop before each), and nothing waits for the renewal to wind down, so a
        renewal stuck in a command (or one whose cancellation the runtime swallowed) cannot
        hold the release up. An extend already sent is owner-checked and harmless."""
        renewal, self.renewal = self.renewal, None
        if renewal is not None:
            renewal.end()

    def renewal_ended(self, renewal: Renewal, reason: str) -> None:
        """A renewal's flow returned ``reason``; report a loss unless it was stopped."""
        if reason == "stopped" or renewal.stop.is_set():
            return
        if self.renewal is renewal:
            self.renewal = None
        if reason == "until":
            return  # it expires at the moment it was meant to; held until then
        self.held = False
        self.lost = True
        logger.error(
            "%s %r was lost while held (%s): another owner may now hold it",
            self.kind.what,
            self.name,
            "Redis unreachable for a whole TTL" if reason == "unreachable" else "expired or taken",
        )
        if self.on_lost is not None:
            self.on_lost(self.face)
