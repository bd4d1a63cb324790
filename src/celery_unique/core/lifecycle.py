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

:func:`plan` takes the instance's state and an event (:class:`Apply`, :class:`Start`,
:class:`Retry`, :class:`Success`, :class:`Revoked`, ...) and returns a :class:`Plan`: the one
lock operation to perform (or none) and how its answer decides the next state and what the
caller gets (publish, a duplicate, run, skip, defer, ...). :data:`TRANSITIONS` lists every
legal (state, event) pair; any other raises :class:`IllegalTransition`. The Celery layer only
maps Celery's hooks and signals onto these events and carries the operations out.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .results import Acquisition

__all__ = [
    "RUN_SEPARATOR",
    "TRANSITIONS",
    "Apply",
    "Deferral",
    "Displace",
    "Done",
    "Duplicate",
    "EagerDone",
    "Event",
    "Expired",
    "Failure",
    "HandOver",
    "Ignored",
    "IllegalTransition",
    "KeyState",
    "LeaseLost",
    "LockAction",
    "LostChild",
    "Outcome",
    "Plan",
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
    "Transition",
    "holder_id",
    "plan",
    "run_token",
]

#: Seconds a queued instance first waits for the running one (``Policy.while_running``);
#: each further wait doubles, up to the running one's lease.
WAIT_FIRST = 0.5

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


@dataclass(frozen=True, slots=True)
class Policy:
    """A task's settings that shape its lifecycle.

    ``until``: ``"executed"`` (held queued and running), ``"started"`` (freed when the run
    starts) or ``"expired"`` (kept until ``ttl`` after publishing). ``hard_ttl``: ``ttl``
    bounds the key's whole life, the run included (the compat layers' promise).
    ``while_running`` (with ``until="started"``): a run holds the key's running twin, so at
    most one instance is queued and one runs; a queued one starts once the running one ended.
    """

    ttl: float
    lease: float
    until: str = "executed"
    hard_ttl: bool = False
    while_running: bool = False

    @property
    def tracks_ttl_end(self) -> bool:
        """Whether an instance's messages must carry the moment its TTL ends."""
        return self.hard_ttl or self.until == "expired"


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apply:
    """``apply_async`` from outside a run: take the key for ``ttl`` seconds (queue time
    included) or learn its holder."""

    ttl: float


@dataclass(frozen=True, slots=True)
class Displace:
    """A duplicate call with ``on_duplicate="replace"`` takes the place of ``holder``, still
    queued, for ``ttl`` seconds: the newest call wins, the holder never runs."""

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
    was deferred already because another instance was running (``Policy.while_running``)."""

    run_id: str
    ttl_left: float | None = None
    deferred: bool = False
    waited: int = 0


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
    | Displace
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

# -- lock operations the plans ask for ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Take:
    """Acquire the key for ``token`` (or learn its holder): one ``acquire`` call; with
    ``predecessor``, also when that token holds it (it passes to ``token``)."""

    token: str
    ttl: float
    predecessor: str | None = None


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Acquire the key for ``token``, taking it from ``predecessor`` if that holds it, and
    renew it every ``ttl / 3`` (never past ``lifetime`` seconds from now, if given).
    ``running``: take the key's running twin instead, and free the queued key (if
    ``predecessor`` holds it) in the same step."""

    token: str
    ttl: float
    predecessor: str
    lifetime: float | None = None
    running: bool = False


@dataclass(frozen=True, slots=True)
class HandOver:
    """Pass the run's lock to ``token`` for ``ttl`` seconds (it stops being renewed)."""

    token: str
    ttl: float


@dataclass(frozen=True, slots=True)
class Release:
    """Release the run's lock (owner-checked)."""


@dataclass(frozen=True, slots=True)
class ReleaseAny:
    """Release whichever token of the instance holds the key: the task id or any run."""

    task_id: str


LockAction = Take | TakeOver | HandOver | Release | ReleaseAny

# -- what the caller gets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish the message: the key is the instance's (or, ``locked=False``, it runs
    without it); ``replaces``: the queued instance it took the place of."""

    locked: bool = True
    replaces: str | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Another instance holds the key: do not publish; ``holder`` is its task id, ``queued``
    whether it is still waiting for a worker (it holds the key with its task id)."""

    holder: str
    ttl: float | None
    queued: bool = False


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
    """Do not run: the key is held by another instance ``holder``, which does the work."""

    holder: str


@dataclass(frozen=True, slots=True)
class Deferral:
    """Do not run now: another delivery of this very instance holds the key. Come back in
    ``countdown`` seconds (same id, no retry used up)."""

    countdown: float
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    """Nothing more to do for the caller."""

    why: str = ""


Outcome = Publish | Duplicate | Run | Skip | Deferral | Done


@dataclass(frozen=True, slots=True)
class Transition:
    """Where the instance stands now, and what its caller gets."""

    state: KeyState
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Plan:
    """The lock operation to perform (``None``: none) and how its answer decides."""

    action: LockAction | None
    decide: Callable[[Any], Transition] = field(repr=False)

    def settle(self, answer: Any = None) -> Transition:
        """The transition once the action's answer is in (an ``Acquisition`` for the taking
        actions, the released flag for the releasing ones, ``None`` without an action)."""
        return self.decide(answer)


class IllegalTransition(Exception):
    """An event that cannot happen in this state (a bug in the caller, never in Redis)."""


# -- the table -----------------------------------------------------------------------------------

_Rule = Callable[[Policy, str, Any], Plan]
TRANSITIONS: dict[tuple[KeyState, type[Any]], _Rule] = {}


def _rule(*pairs: tuple[KeyState, type[Any]]) -> Callable[[_Rule], _Rule]:
    def register(function: _Rule) -> _Rule:
        for pair in pairs:
            TRANSITIONS[pair] = function
        return function

    return register


def plan(state: KeyState, event: Event, policy: Policy, task_id: str) -> Plan:
    """What ``event`` does to instance ``task_id`` in ``state``; see :data:`TRANSITIONS`."""
    rule = TRANSITIONS.get((state, type(event)))
    if rule is None:
        raise IllegalTransition(f"{type(event).__name__} cannot happen to a {state.value} key")
    return rule(policy, task_id, event)


def _fixed(state: KeyState, outcome: Outcome) -> Callable[[Any], Transition]:
    return lambda _answer: Transition(state, outcome)


def _duplicate(got: Acquisition) -> Duplicate:
    holder = holder_id(got.owner)
    return Duplicate(holder, got.ttl, queued=got.owner == holder)


@_rule((KeyState.NEW, Apply))
def _apply(policy: Policy, task_id: str, event: Apply) -> Plan:
    def decide(got: Acquisition) -> Transition:
        if got.acquired:
            return Transition(KeyState.QUEUED, Publish())
        return Transition(KeyState.NEW, _duplicate(got))

    return Plan(Take(task_id, event.ttl), decide)


@_rule((KeyState.NEW, Displace))
def _displace(policy: Policy, task_id: str, event: Displace) -> Plan:
    def decide(got: Acquisition) -> Transition:
        if got.acquired:
            return Transition(KeyState.QUEUED, Publish(replaces=event.holder))
        # It started meanwhile (its token is a run's now), or another took its place first.
        return Transition(KeyState.NEW, _duplicate(got))

    return Plan(Take(task_id, event.ttl, event.holder), decide)


@_rule((KeyState.QUEUED, PublishFailed), (KeyState.HANDED_BACK, PublishFailed))
def _publish_failed(policy: Policy, task_id: str, event: PublishFailed) -> Plan:
    return Plan(ReleaseAny(task_id), _fixed(KeyState.RELEASED, Done("nothing was published")))


@_rule((KeyState.QUEUED, EagerDone))
def _eager_done(policy: Policy, task_id: str, event: EagerDone) -> Plan:
    if policy.until == "expired":
        return Plan(None, _fixed(KeyState.KEPT, Done("kept until its TTL")))
    # Ran inline already (no worker, no hand-over): the instance is done.
    return Plan(ReleaseAny(task_id), _fixed(KeyState.RELEASED, Done()))


@_rule((KeyState.QUEUED, Start), (KeyState.HANDED_BACK, Start))
def _start(policy: Policy, task_id: str, event: Start) -> Plan:
    if policy.until == "started" and not policy.while_running:
        # Free for the next instance from the moment the body starts.
        why = "unique_until='started' frees the key when the run starts"
        return Plan(ReleaseAny(task_id), _fixed(KeyState.RELEASED, Run(locked=False, why=why)))
    lease, lifetime = policy.lease, None
    if policy.hard_ttl and event.ttl_left is not None:
        if event.ttl_left <= 0:
            # The TTL promised the key to newer instances from this moment on.
            why = "its unique_ttl ended before it started"
            return Plan(None, _fixed(KeyState.RELEASED, Run(locked=False, why=why)))
        lease, lifetime = min(lease, event.ttl_left), event.ttl_left

    def decide(got: Acquisition) -> Transition:
        if not got.acquired:
            holder = holder_id(got.owner)
            if holder != task_id and policy.while_running:
                # Another instance runs: this one stays queued and comes back once that one
                # has ended, checking sooner at first (runs are often short), then less often,
                # never later than the other run's lease.
                backoff = min(WAIT_FIRST * 2**event.waited, got.ttl or policy.lease)
                countdown = backoff * random.uniform(1.0, 1.25)
                return Transition(KeyState.QUEUED, Deferral(countdown, "while_running"))
            if holder != task_id:
                return Transition(KeyState.RELEASED, Skip(holder))
            # Another delivery of this very instance runs (a broker redelivery), or died
            # less than a lease ago: never run beside it, come back when its lease is over.
            countdown = (got.ttl or policy.lease) + random.uniform(0.5, 2.0)
            return Transition(KeyState.QUEUED, Deferral(countdown, "running_elsewhere"))
        return Transition(KeyState.RUNNING, Run(unless_done=event.deferred))

    token = run_token(task_id, event.run_id)
    return Plan(TakeOver(token, lease, task_id, lifetime, policy.while_running), decide)


def _republished(task_id: str) -> Callable[[Acquisition], Transition]:
    """How a copy's take (or hand-over) decides: the key is the copy's now, or held by
    another delivery of this very instance (which the copy will wait for); else another
    instance holds it, and the copy would be a duplicate of that one (the run lost it)."""

    def decide(got: Acquisition) -> Transition:
        if got.acquired or holder_id(got.owner) == task_id:
            return Transition(KeyState.HANDED_BACK, Publish())
        return Transition(KeyState.RELEASED, _duplicate(got))

    return decide


@_rule((KeyState.RUNNING, Retry))
def _hand_back(policy: Policy, task_id: str, event: Retry) -> Plan:
    return Plan(HandOver(task_id, event.ttl), _republished(task_id))


@_rule(
    (KeyState.QUEUED, Republish), (KeyState.HANDED_BACK, Republish), (KeyState.RELEASED, Republish)
)
def _republish(policy: Policy, task_id: str, event: Republish) -> Plan:
    return Plan(Take(task_id, event.ttl), _republished(task_id))


@_rule((KeyState.RUNNING, Requeue))
def _requeue(policy: Policy, task_id: str, event: Requeue) -> Plan:
    return Plan(HandOver(task_id, policy.ttl), _fixed(KeyState.HANDED_BACK, Done("requeued")))


@_rule((KeyState.RUNNING, Success), (KeyState.RUNNING, Failure), (KeyState.RUNNING, Ignored))
def _end(policy: Policy, task_id: str, event: _Ended) -> Plan:
    left = event.ttl_left
    if policy.until == "expired" and left is not None and left > 0:
        return Plan(HandOver(task_id, left), _fixed(KeyState.KEPT, Done("kept until its TTL")))
    return Plan(Release(), _fixed(KeyState.RELEASED, Done()))


@_rule((KeyState.RUNNING, RanElsewhere))
def _ran_elsewhere(policy: Policy, task_id: str, event: RanElsewhere) -> Plan:
    return Plan(Release(), _fixed(KeyState.RELEASED, Done("its other delivery ran it")))


@_rule((KeyState.RUNNING, Rejected))
def _rejected(policy: Policy, task_id: str, event: Rejected) -> Plan:
    return Plan(Release(), _fixed(KeyState.RELEASED, Done()))


@_rule(
    (KeyState.QUEUED, Revoked),
    (KeyState.RUNNING, Revoked),
    (KeyState.HANDED_BACK, Revoked),
    (KeyState.QUEUED, Expired),
    (KeyState.HANDED_BACK, Expired),
    (KeyState.RUNNING, TimeLimit),
    (KeyState.RUNNING, LostChild),
)
def _killed(policy: Policy, task_id: str, event: Revoked | Expired | TimeLimit | LostChild) -> Plan:
    # Seen from the worker's main process, which cannot tell a queued instance from a
    # running one: free whichever token of the instance holds the key, never another's.
    return Plan(ReleaseAny(task_id), _fixed(KeyState.RELEASED, Done()))


@_rule(
    (KeyState.RELEASED, Success),
    (KeyState.RELEASED, Failure),
    (KeyState.RELEASED, Ignored),
    (KeyState.RELEASED, Rejected),
    (KeyState.RELEASED, Requeue),
)
def _ended_unprotected(policy: Policy, task_id: str, event: Any) -> Plan:
    # The run lost its lease while it ran: nothing of it holds the key to free or pass on.
    return Plan(None, _fixed(KeyState.RELEASED, Done("the key was lost during the run")))


@_rule((KeyState.RUNNING, LeaseLost))
def _lease_lost(policy: Policy, task_id: str, event: LeaseLost) -> Plan:
    # Nothing to free: the key is gone or another's. The run goes on, unprotected.
    return Plan(None, _fixed(KeyState.RELEASED, Done("lease lost")))
