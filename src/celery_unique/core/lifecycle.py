"""The life of a unique task's key, as an explicit state machine: no I/O, no Celery.

One instance of a unique task (one task id) owns its key through these states:

==============  =====================================================================
``NEW``         not applied yet; a duplicate stays here (it never held the key)
``QUEUED``      held by the task id while the message waits for a worker
``RUNNING``     held by a run token (task id + run id) for a lease, renewed by the worker
``HANDED_BACK`` held by the task id again: a retry, a deferral or a requeue is queued
``KEPT``        held by the task id after the run, until its ``unique_ttl`` ends
``RELEASED``    freed, or expired in Redis; nothing of the instance's holds the key
==============  =====================================================================

h11's way: an :class:`Instance` owns its state, and :data:`TRANSITIONS`, one literal table,
says which rule each (state, event) pair follows; any other pair raises
:class:`IllegalTransition`. ``instance.handle(event)`` is a flow: it yields the lock actions
to carry out (:class:`Take`, :class:`TakeOver`, :class:`HandOver`, :class:`Release`,
:class:`ReleaseAny`), is sent each answer (or thrown the :class:`BackendUnavailable` it met),
moves the instance to its next state, and returns what the caller gets (:class:`Publish`, a
:class:`Duplicate`, :class:`Run`, :class:`Skip`, a :class:`Deferral`, :class:`Done`, or
:class:`Fail`). What only Celery knows (whether a result says ``REVOKED``, or ``SUCCESS``)
the outcome asks for (``Duplicate.unless_revoked``, ``Run.unless_done``), and the answer
comes back as the next event (:class:`HolderRevoked`, :class:`RanElsewhere`). Everything
that shapes a decision is the :class:`Policy`'s or the event's: ``on_duplicate`` (a replace
is the machine's second take), fail-open, what an unanswered take leaves behind, the kind of
a deferral and the headers its copy carries. The Celery layer translates hooks into events
and carries the actions out; it decides nothing.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendUnavailable
from .messages import DEFERRED_HEADER, UNREACHABLE_HEADER, WAITED_HEADER
from .results import Acquisition

__all__ = [
    "RESULT_GRACE",
    "RUN_SEPARATOR",
    "TRANSITIONS",
    "Apply",
    "Deferral",
    "DeferralKind",
    "Done",
    "Duplicate",
    "EagerDone",
    "Event",
    "Expired",
    "Fail",
    "Failure",
    "HandOver",
    "HolderRevoked",
    "Ignored",
    "IllegalTransition",
    "Instance",
    "KeyState",
    "LeaseLost",
    "LockAction",
    "LostChild",
    "Outcome",
    "Policy",
    "Publish",
    "PublishFailed",
    "RanElsewhere",
    "Rejected",
    "Release",
    "ReleaseAny",
    "Republish",
    "Requeue",
    "Retry",
    "Revoked",
    "Run",
    "Skip",
    "Start",
    "Success",
    "Take",
    "TakeOver",
    "TimeLimit",
    "follower_takes_over",
    "holder_id",
    "run_token",
]

#: Seconds a queued instance first waits for the running one (``Policy.while_running``);
#: each further wait doubles, up to the running one's lease.
WAIT_FIRST = 0.5

#: Seconds a delivery that found its lock store unreachable first waits; each further wait
#: doubles, up to the last.
UNREACHABLE_FIRST, UNREACHABLE_MAX = 1.0, 30.0

#: Separates the task id from the run id in a running instance's token.
RUN_SEPARATOR = "\x1f"


def run_token(task_id: str, run_id: str) -> str:
    """The token a run of ``task_id`` holds its key with."""
    return f"{task_id}{RUN_SEPARATOR}{run_id}"


def holder_id(token: str) -> str:
    """The task id in a token (a queued token is the id, a run token extends it)."""
    return token.partition(RUN_SEPARATOR)[0]


class KeyState(enum.Enum):
    """Where one instance stands with its key; see the module docstring."""

    NEW = "new"
    QUEUED = "queued"
    RUNNING = "running"
    HANDED_BACK = "handed back"
    KEPT = "kept"
    RELEASED = "released"


class DeferralKind(enum.Enum):
    """Why a run is put back for later (``task_deferred``'s ``reason`` is the value)."""

    RATE_LIMIT = "rate_limit"
    CONCURRENCY = "concurrency"
    RUNNING_ELSEWHERE = "running_elsewhere"  # another delivery of this very instance runs
    WHILE_RUNNING = "while_running"  # another instance runs (``Policy.while_running``)
    UNREACHABLE = "unreachable"  # the lock store did not answer as the delivery started


@dataclass(frozen=True, slots=True)
class Policy:
    """A task's settings that shape its lifecycle.

    ``until``: ``"executed"`` (held queued and running), ``"started"`` (freed when the run
    starts) or ``"expired"`` (kept until ``ttl`` after publishing). ``hard_ttl``: ``ttl``
    bounds the key's whole life, the run included (the compat layers' promise).
    ``while_running`` (with ``until="started"``): a run holds the key's running twin, so at
    most one instance is queued and one runs; a queued one starts once the running one ended.
    ``on_duplicate``: ``"return"``, ``"raise"`` or ``"replace"`` (a call finding a queued
    holder takes its place). ``fail_open``: with Redis unreachable, publish (or run) without
    the key instead of failing.
    """

    ttl: float
    lease: float
    until: str = "executed"
    hard_ttl: bool = False
    while_running: bool = False
    on_duplicate: str = "return"
    fail_open: bool = False

    @property
    def tracks_ttl_end(self) -> bool:
        """Whether an instance's messages must carry the moment its TTL ends."""
        return self.hard_ttl or self.until == "expired"


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apply:
    """``apply_async`` from outside a run: take the key for ``ttl`` seconds (queue time
    included) or learn its holder. ``phantoms``: ids of this process's own earlier calls
    whose take Redis never answered and whose message was never published: found holding
    the key, such a holder will never run, and the call takes its place. ``sees_revokes``:
    a revoke shows in the holder's result (``REVOKED``, in a result backend this process
    reads), so a duplicate of a queued holder asks for it (``Duplicate.unless_revoked``)."""

    ttl: float
    phantoms: frozenset[str] = frozenset()
    sees_revokes: bool = False


@dataclass(frozen=True, slots=True)
class HolderRevoked:
    """A call answered as a duplicate of a queued ``holder`` learnt that the holder was
    revoked (its result says ``REVOKED``): it will never run, so the call takes its place,
    for ``ttl`` seconds, from that very token only."""

    holder: str
    ttl: float


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """Publishing the message failed after the key was taken: nothing will run."""


@dataclass(frozen=True, slots=True)
class EagerDone:
    """In eager mode the instance ran inline, inside ``apply_async``, and is over."""


@dataclass(frozen=True, slots=True)
class Start:
    """A worker starts a delivery of the instance. ``ttl_left``: seconds until the
    instance's TTL ends, when that counts (:attr:`Policy.tracks_ttl_end`); ``deferred``: this
    copy was deferred because another delivery ran; ``waited``: how many times this instance
    was deferred already because another instance was running (``Policy.while_running``);
    ``unreachable``: how often it found the lock store unreachable as it started;
    ``applied``: it was published by ``apply_async`` (not sent around it, by ``send_task`` or
    beat), so callers may wait on its id."""

    run_id: str
    ttl_left: float | None = None
    deferred: bool = False
    waited: int = 0
    unreachable: int = 0
    applied: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """The run re-publishes its instance for ``ttl`` seconds (queue time and countdown
    included): ``self.retry()``, ``autoretry_for``, or a deferral (a rate or concurrency
    limit: the same hand-back, using none of ``max_retries``)."""

    ttl: float


@dataclass(frozen=True, slots=True)
class Republish:
    """A delivery that does not hold the key re-publishes its instance: it was deferred
    before it ran (another delivery of it was running), or its key was freed when it started
    (``unique_until="started"``) and it retries."""

    ttl: float


@dataclass(frozen=True, slots=True)
class Requeue:
    """``Reject(requeue=True)``: the message goes back to the queue."""


@dataclass(frozen=True, slots=True)
class _Ended:
    """The run is over. ``ttl_left`` as for :class:`Start`."""

    ttl_left: float | None = None


@dataclass(frozen=True, slots=True)
class Success(_Ended):
    """The run returned."""


@dataclass(frozen=True, slots=True)
class Failure(_Ended):
    """The run raised and will not be retried."""


@dataclass(frozen=True, slots=True)
class Ignored(_Ended):
    """The run raised ``Ignore``."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """``Reject(requeue=False)``: the message is dropped."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """Revoked, expired before it ran, or terminated; seen by the worker's main process,
    which does not know whether the instance was queued or running."""


@dataclass(frozen=True, slots=True)
class Expired:
    """The message's ``expires`` passed before a worker ran it (seen by the main process)."""


@dataclass(frozen=True, slots=True)
class TimeLimit:
    """The hard time limit killed the run (seen by the main process)."""


@dataclass(frozen=True, slots=True)
class LostChild:
    """The pool process running it died (seen by the main process)."""


@dataclass(frozen=True, slots=True)
class RanElsewhere:
    """A deferred copy, holding the key now, learnt that the delivery it waited for ran the
    instance to success: the copy does not run it again."""


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """Renewal found the run's key gone or taken: the lease expired (a stalled worker, a
    Redis outage longer than a lease) or someone cleared it."""


Event = (
    Apply
    | HolderRevoked
    | PublishFailed
    | EagerDone
    | Start
    | Retry
    | Republish
    | Requeue
    | Success
    | Failure
    | Ignored
    | Rejected
    | Revoked
    | Expired
    | TimeLimit
    | LostChild
    | RanElsewhere
    | LeaseLost
)

# -- lock actions the rules ask for ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Take:
    """Acquire the key for ``token`` (or learn its holder): one ``acquire`` call; with
    ``predecessor``, also when that token holds it (it passes to ``token``). Answer: an
    :class:`Acquisition`."""

    token: str
    ttl: float
    predecessor: str | None = None


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Acquire the key for ``token``, taking it from ``predecessor`` if that holds it, and
    renew it every ``ttl / 3`` (never past ``lifetime`` seconds from now, if given).
    ``running``: take the key's running twin instead, and free the queued key (if
    ``predecessor`` holds it) in the same step. Answer: an :class:`Acquisition`."""

    token: str
    ttl: float
    predecessor: str
    lifetime: float | None = None
    running: bool = False


@dataclass(frozen=True, slots=True)
class HandOver:
    """Pass the run's lock to ``token`` for ``ttl`` seconds (it stops being renewed).
    Answer: an :class:`Acquisition`."""

    token: str
    ttl: float


@dataclass(frozen=True, slots=True)
class Release:
    """Release the run's lock (owner-checked). Answer: whether it was still held."""


@dataclass(frozen=True, slots=True)
class ReleaseAny:
    """Release whichever token of the instance holds the key: the task id or any run;
    ``running_too``: the key's running twin as well. Answer: whether one was freed."""

    task_id: str
    running_too: bool = False


LockAction = Take | TakeOver | HandOver | Release | ReleaseAny

# -- what the caller gets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish the message: the key is the instance's (or, ``locked=False``, it goes without
    it); ``replaces``: the queued instance it took the place of (to be marked revoked);
    ``succeeds``: the revoked queued instance it took the key from (marked already);
    ``free_later``: a take that Redis never answered may hold the key, so free it off the
    caller's path."""

    locked: bool = True
    replaces: str | None = None
    succeeds: str | None = None
    free_later: bool = False


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Another instance holds the key: do not publish; ``holder`` is its task id, ``queued``
    whether it is still waiting for a worker (it holds the key with its task id).
    ``unless_revoked``: first read the holder's result; if it says ``REVOKED``, the holder
    will never run: that is :class:`HolderRevoked`."""

    holder: str
    ttl: float | None
    queued: bool = False
    unless_revoked: bool = False


@dataclass(frozen=True, slots=True)
class Run:
    """Run the body; ``locked``: under the key (else ``why`` says why not).
    ``unless_done``: first make sure the other delivery this copy waited for did not run the
    instance to success meanwhile (its result may be stored a moment after it freed the key);
    if it did, that is :class:`RanElsewhere`."""

    locked: bool = True
    why: str = ""
    unless_done: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    """Do not run: the key is held by another instance ``holder``, which does the work.
    ``follow``: this instance was applied (its id answered callers, duplicates included), so
    it yields the holder's result under its own id instead of none."""

    holder: str
    follow: bool = False


#: Seconds an instance that freed its key may take to store its result: Celery stores it a
#: moment after the run ends (a copy waiting on it, a follower of it, wait this long).
RESULT_GRACE = 2.0


def follower_takes_over(
    holds_key: bool, unseen_since: float | None, now: float
) -> tuple[bool, float | None]:
    """Whether the follower of a holder with no result yet runs the work itself, and since
    when the holder has been missing (``unseen_since``, to carry to the next look).

    A holder that holds its key (queued or running) is on its way; one that holds none and
    has no result for :data:`RESULT_GRACE` never will have one (it was never published: its
    producer's take was answered too late, or its message was lost), and the callers of the
    follower's id must not wait for ever."""
    if holds_key:
        return False, None
    if unseen_since is None:
        return False, now
    return now - unseen_since >= RESULT_GRACE, unseen_since


@dataclass(frozen=True, slots=True)
class Deferral:
    """Do not run now: come back in ``countdown`` seconds, same id, no retry used up, the
    copy carrying ``headers``. ``stores_state``: the run ends as a retry (``RETRY``); false
    for a second delivery of a run under way, which must not write over that run's state."""

    countdown: float
    kind: DeferralKind
    why: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    stores_state: bool = True
    #: Published as it is, without a lock call (the lock store is unreachable): the copy
    #: finds the key as its instance left it.
    bypass: bool = False


@dataclass(frozen=True, slots=True)
class Done:
    """Nothing more to do for the caller."""

    why: str = ""


@dataclass(frozen=True, slots=True)
class Fail:
    """Redis did not answer and the policy does not fail open: raise ``error``;
    ``free_later`` as for :class:`Publish`."""

    error: BackendUnavailable
    free_later: bool = False


Outcome = Publish | Duplicate | Run | Skip | Deferral | Done | Fail
#: What ``Instance.handle`` returns: yields lock actions, is sent their answers.
Flow = Generator[LockAction, Any, Outcome]


class IllegalTransition(Exception):
    """An event that cannot happen in this state (a bug in the caller, never in Redis)."""


class Instance:
    """One instance of a unique task (one task id), as one process follows it: its state,
    and the rules of :data:`TRANSITIONS`."""

    __slots__ = ("policy", "state", "task_id")

    def __init__(self, task_id: str, policy: Policy, state: KeyState = KeyState.NEW) -> None:
        self.task_id = task_id
        self.policy = policy
        self.state = state

    def __repr__(self) -> str:
        return f"<Instance {self.task_id} {self.state.value}>"

    def handle(self, event: Event) -> Flow:
        """The flow of what ``event`` does to this instance; see the module docstring."""
        rule = TRANSITIONS.get((self.state, type(event)))
        if rule is None:
            raise IllegalTransition(
                f"{type(event).__name__} cannot happen to a {self.state.value} key"
            )
        return rule(self, event)


# -- the rules -----------------------------------------------------------------------------------


def _duplicate(got: Acquisition, sees_revokes: bool = False) -> Duplicate:
    holder = holder_id(got.owner)
    queued = got.owner == holder
    # Only a queued holder is asked about: a revoke without terminate leaves a run be, and
    # its key with it.
    return Duplicate(holder, got.ttl, queued=queued, unless_revoked=queued and sees_revokes)


def _unreachable(it: Instance, error: BackendUnavailable, fallback: Publish | Run) -> Outcome:
    """Redis did not answer a take: fail, or (``fail_open``) go on without the key."""
    if it.policy.fail_open:
        return fallback
    return Fail(error, free_later=isinstance(fallback, Publish) and error.outcome_unknown)


def _apply(it: Instance, event: Apply) -> Flow:
    holder: str | None = None
    try:
        got = yield Take(it.task_id, event.ttl)
        if not got.acquired:
            found = _duplicate(got)
            phantom = found.queued and found.holder in event.phantoms
            if not phantom and (it.policy.on_duplicate != "replace" or not found.queued):
                return _duplicate(got, event.sees_revokes)
            # Take a queued holder's place (a replace, or a holder never published): only
            # from that very token, so a holder that started meanwhile is not displaced.
            holder = None if phantom else found.holder
            got = yield Take(it.task_id, event.ttl, found.holder)
            if not got.acquired:
                return _duplicate(got)
    except BackendUnavailable as error:
        free = Publish(locked=False, free_later=error.outcome_unknown)
        return _unreachable(it, error, free)
    it.state = KeyState.QUEUED
    return Publish(replaces=holder)


def _succeed(it: Instance, event: HolderRevoked) -> Flow:
    # From the revoked token only: if its run started meanwhile (a revoke that came too late
    # for the worker), or another call took its place first, this call is their duplicate.
    try:
        got = yield Take(it.task_id, event.ttl, event.holder)
    except BackendUnavailable as error:
        return _unreachable(it, error, Publish(locked=False, free_later=error.outcome_unknown))
    if not got.acquired:
        return _duplicate(got)
    it.state = KeyState.QUEUED
    return Publish(succeeds=event.holder)


def _republished(it: Instance, got: Acquisition) -> Outcome:
    # The key is the copy's now, or held by another delivery of this very instance (which
    # the copy will wait for); else another instance holds it: the run had lost it.
    if got.acquired or holder_id(got.owner) == it.task_id:
        it.state = KeyState.HANDED_BACK
        return Publish()
    it.state = KeyState.RELEASED
    return _duplicate(got)


# A deferral's or a retry's copy is the same instance, already admitted: with Redis not
# answering its hand-back it is published all the same (never failed: the work would be
# lost), without the key. Whatever holds the key meanwhile is this instance's own (a run
# token expires within a lease; a take that ran is the copy's), so no duplicate comes of it.


def _republish(it: Instance, event: Republish) -> Flow:
    try:
        got = yield Take(it.task_id, event.ttl)
    except BackendUnavailable:
        return Publish(locked=False)
    return _republished(it, got)


def _hand_back(it: Instance, event: Retry) -> Flow:
    try:
        got = yield HandOver(it.task_id, event.ttl)
    except BackendUnavailable:
        return Publish(locked=False)
    return _republished(it, got)


def _start_unreachable(it: Instance, event: Start) -> Outcome:
    """The lock store did not answer as a delivery started: run without the key (fail open),
    or put the delivery back, unchanged, for when it answers: the instance is never failed
    (nor run twice) for a passing outage. Sooner at first, then less often."""
    if it.policy.fail_open:
        return Run(locked=False, why="Redis unreachable (unique_fail_open)")
    backoff = min(UNREACHABLE_FIRST * 2**event.unreachable, UNREACHABLE_MAX)
    return Deferral(
        backoff * random.uniform(1.0, 1.25),
        DeferralKind.UNREACHABLE,
        "its lock store did not answer",
        {UNREACHABLE_HEADER: event.unreachable + 1},
        bypass=True,
    )


def _start(it: Instance, event: Start) -> Flow:
    policy = it.policy
    if policy.until == "started" and not policy.while_running:
        try:
            yield ReleaseAny(it.task_id)
        except BackendUnavailable:
            return _start_unreachable(it, event)
        it.state = KeyState.RELEASED
        return Run(locked=False, why="unique_until='started' frees the key when the run starts")
    lease, lifetime = policy.lease, None
    if policy.hard_ttl and event.ttl_left is not None:
        if event.ttl_left <= 0:
            it.state = KeyState.RELEASED  # the TTL promised the key to newer instances
            return Run(locked=False, why="its unique_ttl ended before it started")
        lease, lifetime = min(lease, event.ttl_left), event.ttl_left
    token = run_token(it.task_id, event.run_id)
    try:
        got = yield TakeOver(token, lease, it.task_id, lifetime, policy.while_running)
    except BackendUnavailable:
        return _start_unreachable(it, event)
    if got.acquired:
        it.state = KeyState.RUNNING
        return Run(unless_done=event.deferred)
    holder = holder_id(got.owner)
    if holder != it.task_id and policy.while_running:
        # Another instance runs: this one stays queued and comes back once that one has
        # ended, checking sooner at first (runs are often short), then less often, never
        # later than the other run's lease.
        backoff = min(WAIT_FIRST * 2**event.waited, got.ttl or policy.lease)
        return Deferral(
            backoff * random.uniform(1.0, 1.25),
            DeferralKind.WHILE_RUNNING,
            "another instance is running",
            {WAITED_HEADER: event.waited + 1},
        )
    if holder != it.task_id:
        it.state = KeyState.RELEASED
        return Skip(holder, follow=event.applied)
    # Another delivery of this very instance runs (a broker redelivery), or died less than a
    # lease ago: never run beside it, come back when its lease is over. Ignored, not a retry:
    # its RETRY could land over that run's SUCCESS, and a later copy would run it again.
    return Deferral(
        (got.ttl or policy.lease) + random.uniform(0.5, 2.0),
        DeferralKind.RUNNING_ELSEWHERE,
        "already running elsewhere",
        {DEFERRED_HEADER: True},
        stores_state=False,
    )


def _end(it: Instance, event: Success | Failure | Ignored) -> Flow:
    left = event.ttl_left
    if it.policy.until == "expired" and left is not None and left > 0:
        yield HandOver(it.task_id, left)
        it.state = KeyState.KEPT
        return Done("kept until its TTL")
    yield Release()
    it.state = KeyState.RELEASED
    return Done()


def _release_run(it: Instance, event: Rejected | RanElsewhere) -> Flow:
    yield Release()
    it.state = KeyState.RELEASED
    return Done("its other delivery ran it" if isinstance(event, RanElsewhere) else "")


def _requeue(it: Instance, event: Requeue) -> Flow:
    yield HandOver(it.task_id, it.policy.ttl)
    it.state = KeyState.HANDED_BACK
    return Done("requeued")


def _free_any(it: Instance, event: Event) -> Flow:
    # Killed, revoked or expired, seen from the worker's main process (which cannot tell a
    # queued instance from a running one), or nothing was published, or an eager run ended:
    # free whichever token of the instance holds the key, never another instance's.
    if isinstance(event, EagerDone) and it.policy.until == "expired":
        it.state = KeyState.KEPT
        return Done("kept until its TTL")
    yield ReleaseAny(it.task_id, running_too=it.policy.while_running)
    it.state = KeyState.RELEASED
    return Done("nothing was published" if isinstance(event, PublishFailed) else "")


def _nothing_held(it: Instance, event: Event) -> Flow:
    # The lease was lost (now, or during the run): nothing of the run holds the key to free
    # or pass on, and the run goes on, unprotected.
    it.state = KeyState.RELEASED
    return Done("lease lost" if isinstance(event, LeaseLost) else "the key was lost earlier")
    yield  # a flow with no action  # pragma: no cover


_Rule = Callable[[Instance, Any], Flow]
NEW, QUEUED, RUNNING = KeyState.NEW, KeyState.QUEUED, KeyState.RUNNING
HANDED_BACK, RELEASED = KeyState.HANDED_BACK, KeyState.RELEASED

#: Every legal (state, event) pair and the rule it follows (docs/lifecycle.md, row by row).
TRANSITIONS: dict[tuple[KeyState, type[Any]], _Rule] = {
    (NEW, Apply): _apply,
    (NEW, HolderRevoked): _succeed,
    (QUEUED, PublishFailed): _free_any,
    (HANDED_BACK, PublishFailed): _free_any,
    (QUEUED, EagerDone): _free_any,
    (QUEUED, Start): _start,
    (HANDED_BACK, Start): _start,
    (QUEUED, Republish): _republish,
    (HANDED_BACK, Republish): _republish,
    (RELEASED, Republish): _republish,
    (RUNNING, Retry): _hand_back,
    (RUNNING, Requeue): _requeue,
    (RUNNING, Success): _end,
    (RUNNING, Failure): _end,
    (RUNNING, Ignored): _end,
    (RUNNING, Rejected): _release_run,
    (RUNNING, RanElsewhere): _release_run,
    (QUEUED, Revoked): _free_any,
    (RUNNING, Revoked): _free_any,
    (HANDED_BACK, Revoked): _free_any,
    (QUEUED, Expired): _free_any,
    (HANDED_BACK, Expired): _free_any,
    (RUNNING, TimeLimit): _free_any,
    (RUNNING, LostChild): _free_any,
    (RUNNING, LeaseLost): _nothing_held,
    (RELEASED, Success): _nothing_held,
    (RELEASED, Failure): _nothing_held,
    (RELEASED, Ignored): _nothing_held,
    (RELEASED, Rejected): _nothing_held,
    (RELEASED, Requeue): _nothing_held,
}
