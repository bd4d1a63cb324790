"""Workers that die or kill their tasks: the lock must not outlive them (subprocess workers)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from subprocess import Popen

import pytest
import redis

from celery_unique.celery.unique import RUN_SEPARATOR
from celery_unique.core.keys import KeySpace
from celery_unique.core.locks import parse_owner
from celery_unique.testing import free_port, running_redis
from tests.celery import app as t
from tests.celery.conftest import worker_process
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("celery_app")


def key_of(task: object, *args: object) -> str:
    return f"cut:lock:{{{task.unique_key(args)}}}"  # type: ignore[attr-defined]


def wait_for_run(tag: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while t.runs(tag) < 1:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.02)


def seconds_until_gone(client: redis.Redis, key: str, timeout: float = 60) -> float:
    started = time.monotonic()
    while client.exists(key):
        assert time.monotonic() - started < timeout, "the lock was never freed"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def shared_worker(redis_url: str, celery_app: object) -> Iterator[tuple[Popen[bytes], str]]:
    with worker_process(redis_url, concurrency=2) as running:
        yield running


def test_sigkill_of_the_whole_worker_frees_the_lock_within_one_lease(
    redis_url: str, client: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    with worker_process(redis_url) as (process, queue):
        t.short_lease.apply_async((tag,), queue=queue)  # lease 2 s, body 60 s
        wait_for_run(tag)
        key = key_of(t.short_lease, tag, 60)
        time.sleep(3)  # longer than the lease: only renewal can have kept it
        held = parse_owner(client.get(key))
        assert held is not None and RUN_SEPARATOR in held
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # Nothing renews it now: what it has left is all it gets, and that is within a lease.
        assert client.pttl(key) <= 2000
        assert seconds_until_gone(client, key) < 10  # and no renewal came after


def test_a_hard_time_limit_frees_the_lock_at_once(
    shared_worker: tuple[Popen[bytes], str], client: redis.Redis
) -> None:
    _, queue = shared_worker
    tag = uuid.uuid4().hex
    result = t.hard_limit.apply_async((tag,), queue=queue)  # time_limit 1 s, lease 60 s
    wait_for_run(tag)
    assert seconds_until_gone(client, key_of(t.hard_limit, tag)) < 10  # not the 60 s lease
    assert result.state == "FAILURE"


def test_revoke_with_terminate_frees_the_lock_at_once(
    shared_worker: tuple[Popen[bytes], str], client: redis.Redis
) -> None:
    _, queue = shared_worker
    tag = uuid.uuid4().hex
    result = t.slow.apply_async((tag, 60), queue=queue)
    wait_for_run(tag)
    result.revoke(terminate=True, signal="SIGKILL")
    assert seconds_until_gone(client, key_of(t.slow, tag, 60)) < 10  # not the 30 s lease


def test_a_lost_worker_child_frees_the_lock_at_once(
    shared_worker: tuple[Popen[bytes], str], client: redis.Redis
) -> None:
    _, queue = shared_worker
    tag = uuid.uuid4().hex
    t.slow.apply_async((tag, 60), queue=queue)
    wait_for_run(tag)
    os.kill(t.pid(tag), signal.SIGKILL)  # the pool child only; the main process sees it die
    assert seconds_until_gone(client, key_of(t.slow, tag, 60)) < 10


def test_fail_open_lets_a_worker_run_a_task_when_its_lock_redis_is_down(
    redis_url: str, client: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    dead = {"CELERY_UNIQUE_TEST_DEAD_LOCKS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with worker_process(redis_url, env=dead) as (_, queue):
        # Published with the lock (this process reaches Redis); the worker cannot reach the
        # lock Redis at start and, failing open, runs the task anyway instead of failing it.
        result = t.slow.apply_async((tag, 0.0), queue=queue)
        assert result.get(timeout=30) == tag
    assert t.runs(tag) == 1
    client.delete(key_of(t.slow, tag, 0.0))  # the queued lock the worker could not free


def test_a_delivery_that_finds_its_lock_redis_unreachable_runs_once_it_answers(
    redis_url: str,
) -> None:
    """Failing closed is not failing the task: the delivery is put back, unchanged and
    without a lock call, until the lock store answers; then it runs, once."""
    tag = uuid.uuid4().hex
    with running_redis() as locks:
        env = {"CELERY_UNIQUE_TEST_LOCKS_URL": locks.url}
        with worker_process(redis_url, env=env) as (_, queue):
            locks.pause()
            try:
                # Sent around apply_async: the worker is the first to take the key.
                result = t.app.send_task("t.slow", (tag, 0.0), queue=queue)
                wait_until(lambda: result.state == "RETRY", timeout=60)  # put back
            finally:
                locks.resume()
            assert result.get(timeout=60) == tag
    assert t.runs(tag) == 1


# -- concurrency slots ----------------------------------------------------------------------------


def slot_key(tag: str) -> str:
    return KeySpace("cut:").semaphore(tag)


def test_a_hard_time_limit_frees_a_concurrency_slot_at_once(
    shared_worker: tuple[Popen[bytes], str], client: redis.Redis
) -> None:
    _, queue = shared_worker
    tag = uuid.uuid4().hex
    t.concurrent_hard_limit.apply_async((tag,), queue=queue)  # time_limit 1 s, lease 60 s
    wait_for_run(tag)
    assert client.zcard(slot_key(tag)) == 1
    assert seconds_until_gone(client, slot_key(tag)) < 10  # not the 60 s lease


def test_sigkill_of_the_whole_worker_frees_a_concurrency_slot_within_its_lease(
    redis_url: str, client: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    with worker_process(redis_url) as (process, queue):
        t.concurrent_short_lease.apply_async((tag,), queue=queue)  # lease 2 s, body 60 s
        wait_for_run(tag)
        time.sleep(3)  # longer than the lease: only renewal can have kept the slot
        assert client.zcard(slot_key(tag)) == 1
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert seconds_until_gone(client, slot_key(tag)) <= 2.0 + 0.5
