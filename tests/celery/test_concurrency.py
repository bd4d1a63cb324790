"""concurrency_limit through a real worker: never more than N at once fleet-wide per key, a run
over the limit deferred (not failed, no retry used), slots freed however a run ends."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from celery_unique import RedisBackend
from celery_unique.celery.store import backend_for
from tests.celery import app as t

pytestmark = pytest.mark.usefixtures("worker")


def holders(name: str) -> int:
    backend: RedisBackend = backend_for(t.app)
    return backend.semaphore(name, limit=1, ttl=1).holders()


def test_never_more_than_the_limit_run_at_once_and_every_run_succeeds() -> None:
    tag = uuid.uuid4().hex
    results = [t.concurrent.delay(tag) for _ in range(6)]
    assert [r.get(timeout=60) for r in results] == [0] * 6  # deferrals use no retry up
    assert t.runs(tag) == 6
    assert t.peak(tag) == 2  # the limit, and no more (four worker threads could run four)
    assert holders(tag) == 0  # every slot was given back


def test_the_limit_is_per_key() -> None:
    tag = uuid.uuid4().hex
    results = [t.one_per_customer.delay(customer, tag) for customer in (1, 2) for _ in range(3)]
    for result in results:
        result.get(timeout=60)
    assert t.peak(f"{tag}:1") == 1 and t.peak(f"{tag}:2") == 1  # one per customer
    assert t.runs(tag) == 6


def test_a_failed_run_frees_its_slot_at_once() -> None:
    tag = uuid.uuid4().hex
    with pytest.raises(ValueError, match="boom"):
        t.concurrent_fails.delay(tag).get(timeout=30)
    assert holders(tag) == 0  # not held until the 30 s lease ends


def test_with_unique_task_the_lock_is_kept_while_a_run_waits_for_a_slot() -> None:
    tag = uuid.uuid4().hex
    results = [t.unique_concurrent.delay(tag, n) for n in range(3)]
    # While they take turns, each instance still holds its unique key: a duplicate call
    # gets the same instance, whether it is running, queued or deferred.
    assert [t.unique_concurrent.delay(tag, n).id for n in range(3)] == [r.id for r in results]
    assert [r.get(timeout=60) for r in results] == [0, 0, 0]
    assert t.peak(tag) == 1
    assert t.runs(tag) == 3


def test_runs_turned_away_come_back_in_turn_not_as_a_herd(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    started = time.monotonic()
    results = [t.concurrent.delay(tag, 0.3) for _ in range(8)]
    for result in results:
        result.get(timeout=60)
    elapsed = time.monotonic() - started
    assert t.peak(tag) == 2 and t.runs(tag) == 8
    # 8 runs of 0.3 s, two at a time, need 1.2 s; the queue spaces the returns by how long
    # runs take, so the whole lot takes a few of those, not a lease (30 s) of waiting.
    assert elapsed < 15
