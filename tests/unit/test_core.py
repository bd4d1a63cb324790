"""The sans-IO core, driven by hand: no Redis, an injected clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from celery_unique import Acquisition, BackendUnavailable, ConfigurationError
from celery_unique.core import holding
from celery_unique.core.holding import (
    ATTEMPT_FLOOR,
    BACKOFF_MAX,
    CLEANUP_FIRST,
    loss_margin,
    stamped,
)
from celery_unique.core.keys import KeySpace
from celery_unique.core.locks import (
    acquire,
    acquire_once,
    extend,
    owner,
    parse_acquire,
    parse_owner,
    release,
)
from celery_unique.core.scripts import ACQUIRE, EXTEND, RELEASE
from celery_unique.core.steps import Call, Eval, Flow, Sleep, to_ms
from celery_unique.executors.policy import Budget

KEYS = KeySpace("p:").lock("job")


def renew(key: str, token: str, ttl: float, **options: Any) -> Flow[str]:
    """A lock's renewal, as a lease builds it: its extend, answered within the lease."""

    def extend_step(span: float, within: float) -> Eval | Call:
        return replace(extend(key, token, span).step, timeout=within)

    return holding.renew(extend_step, ttl, **options)


def release_eventually(key: str, token: str, ttl: float, *, clock: FakeClock) -> Flow[bool]:
    """The clean-up of a lock an unanswered acquire may hold."""
    return holding.release_eventually(release(key, token).step, ttl, clock=clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finish(flow: Flow[Any], reply: object) -> Any:
    with pytest.raises(StopIteration) as done:
        flow.send(reply)
    return done.value.value


def finish_with_error(flow: Flow[Any]) -> Any:
    with pytest.raises(StopIteration) as done:
        flow.throw(BackendUnavailable("down"))
    return done.value.value


def test_acquire_once_builds_one_eval_and_parses_both_reply_kinds() -> None:
    op = acquire_once(KEYS, "tok", 1.5)
    assert op.step == Eval(ACQUIRE, ("p:lock:{job}",), ("tok", 1500))
    assert op.parse([1, b"tok", 1500, 17]) == Acquisition(True, "tok", 1.5, 17)
    assert op.parse([0, "other", 250]) == Acquisition(False, "other", 0.25, None)
    handover = acquire_once(KEYS, "run", 2, previous="tok")
    assert handover.step.args == ("run", 2000, "tok")


def test_parse_acquire_reports_a_key_without_expiry_as_unknown_ttl() -> None:
    assert parse_acquire([0, b"x", -1]) == Acquisition(False, "x", None)


@pytest.mark.parametrize(
    ("seconds", "ms"), [(1, 1000), (0.0001, 1), (2.5, 2500), (0.0015, 2), (3600, 3_600_000)]
)
def test_to_ms_rounds_up_to_whole_milliseconds(seconds: float, ms: int) -> None:
    assert to_ms(seconds) == ms


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), None, "10", True])
def test_to_ms_rejects_what_is_not_a_finite_positive_duration(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        to_ms(bad)


def test_non_blocking_acquire_makes_exactly_one_attempt() -> None:
    flow = acquire(KEYS, "tok", 10, blocking=False, clock=FakeClock())
    assert isinstance(next(flow), Eval)
    assert finish(flow, [0, "other", 5000]).acquired is False


@pytest.mark.parametrize(
    ("blocking", "timeout"), [(False, 1.0), (True, -1.0), (True, float("nan")), (True, "1")]
)
def test_acquire_rejects_bad_timeouts(blocking: bool, timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        next(acquire(KEYS, "tok", 10, blocking=blocking, timeout=timeout, clock=FakeClock()))


def test_blocking_acquire_backs_off_and_stops_at_the_deadline() -> None:
    clock = FakeClock()
    flow = acquire(KEYS, "tok", 10, timeout=2.0, clock=clock)
    step = next(flow)
    attempts, sleeps = 0, []
    while True:
        assert isinstance(step, Eval)
        attempts += 1
        try:
            step = flow.send([0, "other", 60_000])
        except StopIteration as done:
            result = done.value
            break
        assert isinstance(step, Sleep)
        sleeps.append(step.seconds)
        clock.now += step.seconds
        step = flow.send(None)
    assert result == Acquisition(False, "other", 60.0)
    assert sum(sleeps) == pytest.approx(2.0)
    # Doubling backoff: far fewer attempts than a busy loop, never a sleep over the cap.
    assert attempts < 25
    assert max(sleeps) <= BACKOFF_MAX
    assert sleeps[0] < sleeps[4]


def test_blocking_acquire_never_sleeps_past_the_holders_ttl() -> None:
    clock = FakeClock()
    flow = acquire(KEYS, "tok", 10, clock=clock)
    next(flow)
    for _ in range(8):  # let the backoff grow
        step = flow.send([0, "other", 60_000])
        assert isinstance(step, Sleep)
        flow.send(None)
    step = flow.send([0, "other", 3])  # the holder's lock ends in 3 ms
    assert isinstance(step, Sleep)
    assert step.seconds <= 0.004
    assert isinstance(flow.send(None), Eval)
    assert finish(flow, [1, "tok", 10_000, 5]).acquired


def test_release_extend_and_owner_steps() -> None:
    op = release(KEYS, "tok")
    assert op.step == Eval(RELEASE, ("p:lock:{job}",), ("tok",))
    assert op.parse(1) is True
    assert release(KEYS, "tok", "tok:").step == Eval(RELEASE, ("p:lock:{job}",), ("tok", "tok:"))
    op = extend(KEYS, "tok", 2)
    assert op.step == Eval(EXTEND, ("p:lock:{job}",), ("tok", 2000))
    assert op.parse(0) is False
    who = owner(KEYS)
    assert who.step == Call(("GET", "p:lock:{job}"))
    assert who.parse(b"1733000000000000:tok") == "tok"
    assert who.parse(None) is None


def test_a_lock_value_holds_its_fence_then_the_token_whatever_the_token_holds() -> None:
    assert parse_owner(b"17:task-id\x1frun:with:colons") == "task-id\x1frun:with:colons"
    assert parse_owner("17:") == ""
    assert parse_owner(None) is None


def test_attempts_of_a_timed_acquire_must_answer_by_its_deadline_but_get_a_floor() -> None:
    clock = FakeClock()
    flow = acquire(KEYS, "tok", 10, timeout=2.0, clock=clock)
    first = next(flow)
    assert isinstance(first, Eval) and first.timeout == pytest.approx(2.0)
    clock.now += 1.9  # the attempt itself took long: a slow or hung server
    sleep = flow.send([0, "other", 60_000])
    assert isinstance(sleep, Sleep) and sleep.seconds <= 0.1 + 1e-9
    clock.now += sleep.seconds
    last = flow.send(None)
    assert isinstance(last, Eval) and last.timeout == ATTEMPT_FLOOR  # 0 s left, still answered
    untimed = next(acquire(KEYS, "tok", 10, clock=clock))
    assert isinstance(untimed, Eval) and untimed.timeout is None  # the executor's own deadline


def test_a_renewal_waits_no_longer_than_the_moment_the_loss_must_be_told() -> None:
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock)
    next(flow)
    clock.now += 1.0
    step = flow.send(None)
    # Valid for 2 s more; the holder must hear of a loss a margin before that.
    assert isinstance(step, Eval) and step.timeout == pytest.approx(2.0 - loss_margin(3.0))


def test_a_lease_is_counted_from_the_acquires_send() -> None:
    clock = FakeClock()
    sent = clock.now
    clock.now += 0.4  # the acquire's reply came late
    flow = renew(KEYS, "tok", 3.0, clock=clock, since=sent)
    first = next(flow)
    assert isinstance(first, Sleep) and first.seconds == pytest.approx(0.6)  # ttl/3 from send
    clock.now += 0.6
    step = flow.send(None)
    assert isinstance(step, Eval) and step.timeout == pytest.approx(2.0 - loss_margin(3.0))
    clock.now += 2.0 - loss_margin(3.0)
    # Redis never answered: lost by the send's TTL less the margin, however late the reply.
    assert finish_with_error(flow) == "unreachable"
    assert clock.now == pytest.approx(sent + 3.0 - loss_margin(3.0))


def test_a_stopped_renewal_sends_no_extend_and_reports_no_loss() -> None:
    stopped = False
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock, stopped=lambda: stopped)
    next(flow)
    clock.now += 1.0
    assert isinstance(flow.send(None), Eval)
    stopped = True  # the release began while the extend was in flight...
    assert finish(flow, 0) == "stopped"  # ...so its "no" is the release's doing, not a loss
    flow = renew(KEYS, "tok", 3.0, clock=clock, stopped=lambda: stopped)
    next(flow)
    assert finish(flow, None) == "stopped"  # woken from its sleep: no extend at all


def test_stamped_returns_a_flows_result_with_the_time_of_its_last_command() -> None:
    clock = FakeClock()
    flow = stamped(acquire(KEYS, "tok", 10, clock=clock), clock)
    assert isinstance(next(flow), Eval)
    clock.now += 0.05
    assert isinstance(flow.send([0, "other", 50]), Sleep)
    clock.now += 0.05
    assert isinstance(flow.send(None), Eval)  # the second attempt, handed out at +0.1
    clock.now += 0.4
    result, sent = finish(flow, [1, "tok", 10_000, 7])
    assert result.acquired and sent == pytest.approx(1000.1)
    errors = stamped(renew(KEYS, "tok", 3.0, clock=clock), clock)
    next(errors)
    clock.now += 1.0
    errors.send(None)
    assert isinstance(errors.throw(BackendUnavailable("down")), Sleep)  # thrown through


def test_renew_extends_every_third_of_the_ttl_until_the_lock_is_lost() -> None:
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock)
    for _ in range(3):
        step = next(flow) if clock.now == 1000.0 else flow.send(1)
        assert step == Sleep(1.0)
        clock.now += 1.0
        assert flow.send(None) == Eval(EXTEND, ("p:lock:{job}",), ("tok", 3000))
    assert finish(flow, 0) == "lost"


def test_renew_never_extends_past_until_and_stops_there() -> None:
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock, until=1004.5)
    assert next(flow) == Sleep(1.0)
    clock.now += 1.0  # 1001: a full TTL still ends (1004) before the cap
    assert flow.send(None) == Eval(EXTEND, ("p:lock:{job}",), ("tok", 3000))
    assert flow.send(1) == Sleep(1.0)
    clock.now += 1.0  # 1002: the extend is cut to end exactly at the cap
    assert flow.send(None) == Eval(EXTEND, ("p:lock:{job}",), ("tok", 2500))
    assert finish(flow, 1) == "until"


def test_renew_with_until_inside_the_first_ttl_never_extends() -> None:
    flow = renew(KEYS, "tok", 3.0, clock=FakeClock(), until=1002.0)
    with pytest.raises(StopIteration) as done:
        next(flow)
    assert done.value.value == "until"


def test_renew_rides_out_errors_while_the_lock_can_still_be_valid() -> None:
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock)
    assert next(flow) == Sleep(1.0)
    clock.now += 1.0
    flow.send(None)
    step = flow.throw(BackendUnavailable("down"))
    assert isinstance(step, Sleep)
    assert step.seconds < 1.0  # retried sooner than the normal interval
    waited = 0.0
    result = None
    while result is None:
        assert isinstance(step, Sleep)
        clock.now += step.seconds
        waited += step.seconds
        try:
            assert isinstance(flow.send(None), Eval)
            step = flow.throw(BackendUnavailable("down"))
        except StopIteration as done:  # given up on the error, or before the next try
            result = done.value
    # It gives up only once the lock's TTL (counted from the last good extend) is about to
    # run out: a margin before, so that the holder knows before a successor can take it.
    assert result == "unreachable"
    assert 1000.0 + 3.0 - loss_margin(3.0) <= clock.now < 1000.0 + 3.0


def test_renew_recovers_when_redis_comes_back() -> None:
    clock = FakeClock()
    flow = renew(KEYS, "tok", 3.0, clock=clock)
    next(flow)
    clock.now += 1.0
    flow.send(None)
    step = flow.throw(BackendUnavailable("down"))
    assert isinstance(step, Sleep)
    clock.now += step.seconds
    flow.send(None)
    assert flow.send(1) == Sleep(1.0)  # back to the normal rhythm


def test_an_unanswered_acquire_is_released_eventually_or_left_to_expire() -> None:
    clock = FakeClock()
    flow = release_eventually(KEYS, "tok", 10.0, clock=clock)
    assert next(flow) == Eval(RELEASE, ("p:lock:{job}",), ("tok",))
    step = flow.throw(BackendUnavailable("down"))
    assert isinstance(step, Sleep) and step.seconds <= CLEANUP_FIRST
    clock.now += step.seconds
    assert isinstance(flow.send(None), Eval)  # tried again
    assert finish(flow, 1) is True

    flow = release_eventually(KEYS, "tok", 10.0, clock=clock)
    next(flow)
    waited = 0.0
    while True:
        try:
            step = flow.throw(BackendUnavailable("down"))
        except StopIteration as done:
            assert done.value is False
            break
        assert isinstance(step, Sleep)
        clock.now += step.seconds
        waited += step.seconds
        flow.send(None)
    assert waited == pytest.approx(10.0)  # gives up once the lock would have expired anyway


def test_a_resend_that_cannot_connect_leaves_the_first_sends_outcome_unknown() -> None:
    budget = Budget(0.0, 2.0)
    assert budget.resend(0.5, sent=True, connection_lost=True, idempotent=True)
    # The resend's checkout then fails: nothing was sent this time, but the first send may
    # have run (a take: the key may be held), so the caller must clean up.
    assert budget.outcome_unknown()
    fresh = Budget(0.0, 2.0)
    assert fresh.resend(0.5, sent=False, connection_lost=True, idempotent=False)
    assert not fresh.outcome_unknown()
    assert not budget.outcome_unknown(refused_by_replica=True)
