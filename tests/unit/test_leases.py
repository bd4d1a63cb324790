"""The description of a lease, driven by hand: the decisions both drivers only carry out."""

from __future__ import annotations

from typing import Any

import pytest

from celery_unique import BackendError, BackendUnavailable, LockNotOwnedError, LockTimeout
from celery_unique.core.holding import loss_margin
from celery_unique.core.keys import KeySpace
from celery_unique.core.results import Acquisition, Slot
from celery_unique.core.scripts import ACQUIRE, EXTEND, RELEASE, SEMAPHORE_RELEASE
from celery_unique.core.steps import Eval, Sleep
from celery_unique.leases import Lease, LockKind, SemaphoreKind

KEYS = KeySpace("p:")
ACQUIRED = [1, b"me", 30000, 7]  # the acquire script's raw replies
REFUSED = [0, b"other", 12000]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def a_lock(clock: FakeClock | None = None, **options: Any) -> Lease[LockKind]:
    kind = LockKind(KEYS.lock("job"))
    return Lease(kind, "job", 30, face="the lock", clock=clock or FakeClock(), **options)


def unknown() -> BackendUnavailable:
    return BackendUnavailable("no answer", outcome_unknown=True)


@pytest.mark.parametrize(
    ("error", "in_flight", "freed"),
    [
        # A backend error: freed later only when the command may have run.
        (unknown(), None, "later"),
        (BackendError("refused"), None, None),
        (unknown(), [ACQUIRED], "later"),  # the error decides, not what was seen
        # Interrupted, by a driver that cannot tell what the command did: maybe taken.
        (KeyboardInterrupt(), None, "later"),
        # Cancelled, by a driver that saw the command in flight through (or saw none).
        (KeyboardInterrupt(), [], None),
        (KeyboardInterrupt(), [unknown()], "later"),
        (KeyboardInterrupt(), [BackendError("refused")], None),
        (KeyboardInterrupt(), [REFUSED], None),
        (KeyboardInterrupt(), [ACQUIRED], "now"),
    ],
)
def test_what_a_failed_acquire_frees_and_how(
    error: BaseException, in_flight: list[Any] | None, freed: str | None
) -> None:
    lease = a_lock()
    token = lease.token
    freeing = lease.after_failed_acquire(False, error, in_flight)
    if freed is None:
        assert freeing is None
        assert lease.token == token
    elif freed == "now":  # Redis answered: one release of that very token, at once
        assert freeing is not None and freeing.later is None and freeing.now is not None
        assert freeing.now.step == Eval(RELEASE, (lease.kind.key,), (token,))
        assert lease.token == token
    else:  # a clean-up off the caller's path, of the old token; the object gets a new one
        assert freeing is not None and freeing.now is None and freeing.later is not None
        assert next(freeing.later) == Eval(RELEASE, (lease.kind.key,), (token,))
        assert lease.token != token


def test_a_failed_re_acquire_frees_nothing_and_a_given_token_is_kept() -> None:
    lease = a_lock(token="mine")
    assert lease.after_failed_acquire(True, unknown(), None) is None
    freeing = lease.after_failed_acquire(False, unknown(), None)
    assert freeing is not None and freeing.later is not None
    assert lease.token == "mine"  # the caller named it: never replaced


def test_recording_attempts_starts_renewal_once_and_counts_the_lifetime() -> None:
    clock = FakeClock()
    lease = a_lock(clock, auto_renew=True, lifetime=100)
    assert not lease.record(Acquisition(False, "other", 12.0))
    assert lease.timeout_error().owner == "other"
    assert lease.record(Acquisition(True, lease.token, 30.0, 7))
    assert (lease.held, lease.kind.fence, lease.renew_until) == (True, 7, 1100.0)
    lease.start_renewal(clock.now)
    clock.now += 10
    assert not lease.record(Acquisition(True, lease.token, 30.0, 7))  # renewing already
    assert lease.renew_until == 1100.0  # counted from the first acquisition


def test_a_renewal_that_ends_reports_a_loss_unless_stopped_or_due() -> None:
    seen: list[object] = []
    lease = a_lock(auto_renew=True, on_lost=seen.append)
    lease.record(Acquisition(True, lease.token, 30.0, 7))
    renewal = lease.start_renewal(0.0)
    lease.stop_renewal()
    lease.renewal_ended(renewal, "lost")  # a "no" after release began is not a loss
    assert (lease.lost, seen, renewal.stop.is_set()) == (False, [], True)
    renewal = lease.start_renewal(0.0)
    lease.renewal_ended(renewal, "until")
    assert (lease.held, lease.lost, lease.renewing) == (True, False, False)
    renewal = lease.start_renewal(0.0)
    lease.renewal_ended(renewal, "unreachable")
    assert (lease.held, lease.lost, seen) == (False, True, ["the lock"])


def test_answers_of_release_and_extend() -> None:
    lease = a_lock()
    lease.record(Acquisition(True, lease.token, 30.0, 7))
    lease.extended(True)
    with pytest.raises(LockNotOwnedError):
        lease.extended(False)
    assert not lease.held
    lease.released(True)
    with pytest.raises(LockNotOwnedError):
        lease.lost_on_exit(lease.not_owned("release"), None)
    lease.lost_on_exit(lease.not_owned("release"), ValueError())  # the block's error wins
    assert isinstance(lease.timeout_error(), LockTimeout)


def test_a_queued_semaphore_teaches_its_queue_how_long_a_slot_was_held() -> None:
    clock = FakeClock()
    kind = SemaphoreKind(KEYS, "api", 2, queue=True)
    lease = Lease(kind, "api", 30, face=None, clock=clock)
    assert lease.record(Slot(False, 2, 1.0, 0.5)) is False
    assert kind.retry_after == 0.5
    lease.record(Slot(True, 1, 30.0))
    assert kind.retry_after is None
    clock.now += 2.5
    held = Eval(SEMAPHORE_RELEASE, (kind.keys[0], kind.keys[2]), (lease.token, 2500))
    assert lease.releasing().step == held
    # After an acquire that failed (not held): the plain release.
    lease.held = False
    freeing = lease.after_failed_acquire(False, KeyboardInterrupt(), [[1, 1, 30000]])
    assert freeing is not None and freeing.now is not None
    assert freeing.now.step == Eval(SEMAPHORE_RELEASE, (kind.key,), (lease.token,))


def test_a_lock_is_taken_over_and_handed_over_through_its_lease() -> None:
    clock = FakeClock()
    lease = a_lock(clock, token="run")
    op, sent = lease.take_over_op("queued", None)
    assert (op.step, sent) == (Eval(ACQUIRE, (lease.kind.key,), ("run", 30000, "queued")), 1000.0)
    lease.record(op.parse(ACQUIRED))
    hand = lease.hand_over_op("next", 5)
    assert hand.step == Eval(ACQUIRE, (lease.kind.key,), ("next", 5000, "run"))
    assert not lease.held


def test_renewal_and_clean_ups_send_the_kinds_own_extend_and_release() -> None:
    clock = FakeClock()
    lease = a_lock(clock, auto_renew=True)
    lease.record(Acquisition(True, lease.token, 30.0, 7))
    renewal = lease.start_renewal(clock.now)
    assert isinstance(next(renewal.flow), Sleep)
    clock.now += 10
    step = renewal.flow.send(None)
    assert step == Eval(EXTEND, (lease.kind.key,), (lease.token, 30000))
    assert isinstance(step, Eval) and step.timeout == pytest.approx(20 - loss_margin(30))
    assert next(lease.let_go()) == Eval(RELEASE, (lease.kind.key,), (lease.token,))
    assert renewal.stop.is_set() and not lease.held
