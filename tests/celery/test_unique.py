"""UniqueTask through a real worker: duplicates, keys, and the lock's lifecycle."""

from __future__ import annotations

import logging
import pickle
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateTaskError,
    UniqueTask,
    clear_locks,
)
from celery_unique.celery.unique import RUN_SEPARATOR
from celery_unique.testing import free_port
from tests.celery import app as t
from tests.celery.conftest import MakeApp
from tests.celery.observe import deferrals, ends, publishes
from tests.conftest import lock_key as shared_lock_key
from tests.conftest import lock_owner
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def lock_key(task: UniqueTask, *args: Any, **kwargs: Any) -> str:
    return shared_lock_key("cut:", task.unique_key(args, kwargs))


def owner(client: redis.Redis, task: UniqueTask, *args: Any, **kwargs: Any) -> str | None:
    return lock_owner(client, "cut:", task.unique_key(args, kwargs))


# -- duplicates ----------------------------------------------------------------------------


def test_a_duplicate_returns_the_holders_result_and_runs_once(tag: str) -> None:
    first = t.slow.delay(tag)
    again = [t.slow.delay(tag), t.slow.apply_async((tag,)), t.slow.apply_async(kwargs={"tag": tag})]
    assert {r.id for r in again} == {first.id}
    assert first.get(timeout=10) == tag
    assert t.runs(tag) == 1


def test_spellings_of_one_call_share_a_key(tag: str) -> None:
    assert t.slow.unique_key((tag,)) == t.slow.unique_key((), {"tag": tag, "seconds": 0.3})
    assert t.slow.unique_key((tag, 0.3, None)) == t.slow.unique_key((tag,))
    assert t.slow.unique_key((tag, 0.5)) != t.slow.unique_key((tag,))
    first = t.slow.delay(tag, 0.3)
    assert t.slow.apply_async(kwargs={"seconds": 0.3, "tag": tag}).id == first.id
    first.get(timeout=10)


def test_on_duplicate_raise_names_the_holder_and_its_ttl(tag: str) -> None:
    first = t.raising.delay(tag)
    with pytest.raises(DuplicateTaskError) as caught:
        t.raising.delay(tag)
    error = caught.value
    assert error.task_id == first.id
    assert error.ttl is not None and 0 < error.ttl <= 3600
    assert tag not in str(error)  # argument values never appear in messages
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task_id, copy.ttl) == (error.task_id, error.ttl)
    first.get(timeout=10)
    assert t.runs(tag) == 1


def test_unique_on_a_subset_of_arguments(tag: str) -> None:
    first = t.customer.delay(7, tag=tag)
    assert t.customer.delay(7, fmt="csv", tag=tag).id == first.id  # fmt is not part of the key
    other = t.customer.delay(8, tag=tag)
    assert other.id != first.id
    assert first.get(timeout=10) == "pdf"
    other.get(timeout=10)
    assert t.runs(tag) == 2


def test_unique_on_empty_means_one_instance_of_the_task(tag: str) -> None:
    first = t.name_only.delay(tag)
    assert t.name_only.delay("something else").id == first.id
    first.get(timeout=10)
    assert t.runs(tag) == 1


def test_unique_on_callable_gets_the_task_arguments(tag: str) -> None:
    first = t.by_callable.delay(3, 1, tag)
    assert t.by_callable.delay(13, 2, tag).id == first.id  # 13 % 10 == 3 % 10
    other = t.by_callable.delay(4, 1, tag)
    assert other.id != first.id
    first.get(timeout=10)
    other.get(timeout=10)


def test_keys_never_carry_argument_values(tag: str) -> None:
    key = t.customer.unique_key((123456789,), {"tag": tag})
    assert "123456789" not in key and tag not in key
    assert key.startswith("task:t.customer:")


def test_a_non_serialisable_argument_fails_at_call_time_and_publishes_nothing(
    tag: str, client: redis.Redis
) -> None:
    queued = client.llen("celery")
    with publishes("t.slow", tag) as sent:
        with pytest.raises(ConfigurationError, match=r"'extra'.*unique_json_encoder"):
            t.slow.delay(tag, extra=object())
    assert client.llen("celery") == queued
    assert sent == []  # so nothing can run later either
    assert t.runs(tag) == 0


def test_bad_options_are_named(celery_app: Celery) -> None:
    @celery_app.task(base=UniqueTask, name=f"t.bad.{uuid.uuid4().hex}", unique_on=["nope"])
    def bad(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="nope"):
        bad.delay(1)

    @celery_app.task(base=UniqueTask, name=f"t.bad.{uuid.uuid4().hex}", unique_until="never")
    def bad2(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="unique_until"):
        bad2.delay(1)


# -- lifecycle ------------------------------------------------------------------------------


def test_the_lock_is_freed_on_success_so_the_next_call_runs(tag: str, client: redis.Redis) -> None:
    first = t.slow.delay(tag, 0.05)
    first.get(timeout=10)
    wait_until(lambda: owner(client, t.slow, tag, 0.05) is None)
    second = t.slow.delay(tag, 0.05)
    assert second.id != first.id
    second.get(timeout=10)
    assert t.runs(tag) == 2


def test_held_while_queued_then_handed_to_the_run(tag: str, client: redis.Redis) -> None:
    result = t.slow.apply_async((tag, 1.0), countdown=0.5)
    assert owner(client, t.slow, tag, 1.0) == result.id  # queued: the task id
    wait_until(lambda: t.runs(tag) == 1)
    running = owner(client, t.slow, tag, 1.0)
    assert running is not None and running.startswith(result.id + RUN_SEPARATOR)
    pttl = client.pttl(lock_key(t.slow, tag, 1.0))
    assert 0 < pttl <= 30_000  # a renewed lease, not the hour-long queued TTL
    result.get(timeout=10)
    wait_until(lambda: owner(client, t.slow, tag, 1.0) is None)


def test_the_queued_ttl_covers_a_countdown(tag: str, client: redis.Redis) -> None:
    result = t.slow.apply_async((tag, 0.0), countdown=30)
    pttl = client.pttl(lock_key(t.slow, tag, 0.0))
    assert pttl > (3600 + 29) * 1000
    result.revoke()
    t.slow.clear_locks()


@pytest.mark.parametrize("task", [t.fails, t.ignores, t.rejects], ids=["error", "Ignore", "Reject"])
def test_the_lock_is_freed_when_the_task_ends_for_good(
    task: UniqueTask, tag: str, client: redis.Redis
) -> None:
    result = task.delay(tag)
    wait_until(lambda: t.runs(tag) == 1)
    wait_until(lambda: owner(client, task, tag) is None)
    assert task.delay(tag).id != result.id
    wait_until(lambda: t.runs(tag) == 2)


def test_retry_keeps_the_lock_and_the_task_really_runs_again(tag: str, client: redis.Redis) -> None:
    result = t.retrying.delay(tag, 2, 0.5)
    wait_until(lambda: t.runs(tag) == 1)
    # Between runs, a duplicate call gets the retrying instance, not a new one.
    wait_until(lambda: owner(client, t.retrying, tag, 2, 0.5) == result.id)
    assert t.retrying.delay(tag, 2, 0.5).id == result.id
    assert result.get(timeout=20) == 2
    assert result.state == "SUCCESS"
    assert t.runs(tag) == 3
    wait_until(lambda: owner(client, t.retrying, tag, 2, 0.5) is None)


def test_autoretry_for_keeps_the_lock_across_retries(tag: str, client: redis.Redis) -> None:
    result = t.autoretrying.delay(tag)
    wait_until(lambda: t.runs(tag) >= 1)
    assert t.autoretrying.delay(tag).id == result.id
    assert result.get(timeout=20) == 2
    assert t.runs(tag) == 3
    wait_until(lambda: owner(client, t.autoretrying, tag) is None)


def test_revoking_a_queued_task_frees_its_lock(tag: str, client: redis.Redis) -> None:
    result = t.slow.apply_async((tag, 0.0), countdown=1)
    result.revoke()
    wait_until(lambda: owner(client, t.slow, tag, 0.0) is None, timeout=15)
    assert t.runs(tag) == 0


def test_an_expired_message_frees_its_lock(tag: str, client: redis.Redis) -> None:
    result = t.slow.apply_async((tag, 0.0), countdown=1, expires=0.5)
    wait_until(lambda: owner(client, t.slow, tag, 0.0) is None, timeout=15)
    assert t.runs(tag) == 0
    assert result.state == "REVOKED"


def test_unique_until_started_frees_the_key_when_the_body_starts(
    tag: str, client: redis.Redis
) -> None:
    first = t.started.delay(tag, 1.0)
    wait_until(lambda: t.runs(tag) == 1)
    assert owner(client, t.started, tag, 1.0) is None
    second = t.started.delay(tag, 1.0)
    assert second.id != first.id
    first.get(timeout=10)
    second.get(timeout=10)


def test_unique_until_expired_keeps_the_key_after_success(tag: str, client: redis.Redis) -> None:
    first = t.expired.delay(tag)
    first.get(timeout=10)
    assert t.expired.delay(tag).id == first.id
    pttl = client.pttl(lock_key(t.expired, tag))
    assert 20_000 < pttl <= 30_000
    assert t.runs(tag) == 1
    t.expired.clear_locks()


def test_a_second_delivery_never_runs_beside_the_first_nor_after_it(tag: str) -> None:
    with deferrals("t.gated", tag) as deferred, ends("t.gated", tag) as ended:
        first = t.gated.delay(tag)  # runs until its gate opens; a 2 s lease keeps deferrals short
        wait_until(lambda: t.runs(tag) == 1)
        # What a broker's redelivery looks like: the same message, same id, published again.
        key = t.gated.unique_key((tag,))
        super(UniqueTask, t.gated).apply_async(
            (tag,), task_id=first.id, headers={"celery_unique_key": key}
        )
        wait_until(lambda: deferred[first.id] == 1)  # it found the first running: deferred
        t.open_gate(tag)
        first.get(timeout=10)
        # Back after the lease and jitter, the copy finds the instance done and is dropped:
        # the last moment it could have run again is over.
        wait_until(lambda: (first.id, "IGNORED") in ended)
    assert t.peak(tag) == 1  # never beside the first...
    assert t.runs(tag) == 1  # ...and not again once the first had succeeded
    assert first.state == "SUCCESS"


def test_a_copy_that_takes_the_key_first_waits_for_the_result_of_its_twin(
    tag: str, client: redis.Redis
) -> None:
    # The moment the race lives in: the delivery a copy waited for has freed the key (its run
    # is over) but Celery has not stored its result yet. The copy takes the key; it must not
    # run the instance again once that result turns out to be a success.
    task_id = f"twin-{tag}"
    key = t.slow.unique_key((tag, 0.0))
    with ends("t.slow", tag) as ended:
        super(UniqueTask, t.slow).apply_async(
            (tag, 0.0),
            task_id=task_id,
            headers={"celery_unique_key": key, "celery_unique_deferred": True},
        )
        wait_until(lambda: owner(client, t.slow, tag, 0.0) is not None)  # the copy took it
        t.app.backend.mark_as_done(task_id, tag)  # the twin's result, stored a moment late
        wait_until(lambda: (task_id, "IGNORED") in ended)
    assert t.runs(tag) == 0  # the copy did not run it a second time
    assert owner(client, t.slow, tag, 0.0) is None  # and gave the key back


def test_direct_calls_take_no_lock(tag: str, client: redis.Redis) -> None:
    assert t.slow(tag, 0.0) == tag
    assert owner(client, t.slow, tag, 0.0) is None
    assert t.runs(tag) == 1


def test_clear_locks_uses_scan_and_frees_everything(tag: str, client: redis.Redis) -> None:
    t.slow.apply_async((tag, 0.0), countdown=60)
    t.customer.apply_async((1,), {"tag": tag}, countdown=60)
    assert t.slow.clear_locks() >= 1
    assert owner(client, t.slow, tag, 0.0) is None
    assert owner(client, t.customer, 1, tag=tag) is not None
    assert clear_locks(t.app) >= 1
    assert owner(client, t.customer, 1, tag=tag) is None


# -- configuration and failure --------------------------------------------------------------


def test_an_unreachable_redis_raises_backend_unavailable_and_publishes_nothing(
    redis_url: str, client: redis.Redis, make_app: MakeApp
) -> None:
    app = make_app(broker_url=redis_url, unique_backend_url=f"redis://127.0.0.1:{free_port()}/0")

    @app.task(base=UniqueTask, name="cfg.down")
    def down(x: int) -> None: ...

    queued = client.llen("celery")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        down.delay(1)
    assert time.monotonic() - started < 5
    assert client.llen("celery") == queued


def test_fail_open_publishes_without_the_lock_and_warns(
    redis_url: str, client: redis.Redis, caplog: pytest.LogCaptureFixture, make_app: MakeApp
) -> None:
    queue = f"q{uuid.uuid4().hex}"
    app = make_app(
        broker_url=redis_url,
        unique_backend_url=f"redis://127.0.0.1:{free_port()}/0",
        unique_fail_open=True,
    )

    @app.task(base=UniqueTask, name="cfg.open")
    def open_(x: int) -> None: ...

    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        open_.apply_async((1,), queue=queue)
    assert client.llen(queue) == 1
    assert "without its unique lock" in caplog.text
    client.delete(queue)


def test_the_backend_defaults_to_the_redis_result_backend_then_the_broker(
    redis_url: str, make_app: MakeApp
) -> None:
    from celery_unique.celery.store import backend_for

    assert "127.0.0.1" in repr(
        backend_for(make_app(result_backend=redis_url, broker_url="memory://"))
    )
    assert "127.0.0.1" in repr(backend_for(make_app(broker_url=redis_url)))
    with pytest.raises(ConfigurationError, match="unique_backend_url"):
        backend_for(make_app(broker_url="memory://"))


def test_eager_mode_runs_inline_and_leaves_no_lock(
    redis_url: str, client: redis.Redis, make_app: MakeApp
) -> None:
    app = make_app(broker_url=redis_url, task_always_eager=True, unique_key_prefix="eager:")
    ran: list[int] = []

    @app.task(base=UniqueTask, name="cfg.eager")
    def eager(x: int) -> int:
        ran.append(x)
        return x * 2

    assert eager.delay(21).get() == 42
    assert eager.delay(21).get() == 42
    assert ran == [21, 21]
    assert client.keys("eager:lock:*") == []


def test_a_call_while_another_thread_still_binds_the_task_goes_through(
    make_app: MakeApp, redis_url: str, client: redis.Redis, prefix: str
) -> None:
    """Celery binds a task on its first use, and registers it before making its request
    stack: a second thread calling it meanwhile gets it half bound (on Celery 5.5 four
    threads each starting a worker hit that every time). Such a call is from outside any
    run of it, and must be taken and published as one."""
    app = make_app(broker_url="memory://", unique_backend_url=redis_url, unique_key_prefix=prefix)
    binding, may_finish = threading.Event(), threading.Event()

    class SlowToBind(UniqueTask):
        @classmethod
        def annotate(cls) -> None:  # Celery's bind() calls it just before the request stack
            binding.set()
            may_finish.wait(30)
            super().annotate()

    @app.task(base=SlowToBind, name=f"t.half_bound.{prefix}")
    def half_bound(x: int) -> int:
        return x

    binder = threading.Thread(target=lambda: half_bound.name)  # the first use: binds it
    binder.start()
    try:
        assert binding.wait(30)
        result = half_bound.delay(1)  # gets the task registered, its request stack not made
    finally:
        may_finish.set()
        binder.join(30)
    assert lock_owner(client, prefix, half_bound.unique_key((1,))) == result.id
    assert half_bound.delay(1).id == result.id  # and, bound now, a duplicate


# -- every way of publishing goes through the lock ------------------------------------------


def test_signatures_chains_and_explicit_ids_all_take_the_lock(tag: str) -> None:
    from celery import chain

    first = t.slow.apply_async((tag, 0.3), task_id=f"mine-{tag}")
    assert first.id == f"mine-{tag}"
    assert t.slow.s(tag, 0.3).delay().id == first.id
    assert t.slow.si(tag, 0.3).apply_async().id == first.id
    other = uuid.uuid4().hex
    # A chain's second step is published by the worker once the first is done.
    chained = chain(t.slow.si(other, 0.0), t.slow.si(other, 0.0)).apply_async()
    first.get(timeout=10)
    chained.get(timeout=10)
    assert t.runs(tag) == 1
    assert t.runs(other) == 2
