"""The guarantees, counted over many trials: each figure is printed (the run's summary) and
asserted.

* 32 racers x 1,000 trials of one lock: exactly one winner each;
* 16 processes x 200 trials of apply_async on one key: exactly one publish each;
* 500 duplicate deliveries of running task ids: no run beside another;
* 20 SIGKILLed workers: each key free within unique_lease + 1 s;
* a rate limit at 10x oversubscription, sync and async: never more than
  burst + rate x elapsed admitted, on Redis' clock from before the racers start.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
import uuid
import warnings
from collections import Counter
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
import redis

from celery_unique import AsyncRedisBackend, RateLimit, RedisBackend, UniqueTask
from celery_unique.core.keys import KeySpace
from celery_unique.testing import RedisServer, wait_until
from tests.celery import app as t
from tests.celery.conftest import worker_process
from tests.faults.conftest import redis_time_us, report

pytestmark = pytest.mark.anyio


# -- locks --------------------------------------------------------------------------------------

RACERS, TRIALS = 32, 1000


def test_32_racers_1000_trials_exactly_one_winner_each(server: RedisServer) -> None:
    wins: Counter[int] = Counter()
    barrier = threading.Barrier(RACERS)
    tally = threading.Lock()
    errors: list[BaseException] = []
    with RedisBackend.from_url(server.url) as backend:

        def racer(me: int) -> None:
            try:
                for trial in range(TRIALS):
                    barrier.wait(30)
                    if backend.acquire_or_owner(f"trial:{trial}", f"racer{me}", 60).acquired:
                        with tally:
                            wins[trial] += 1
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=racer, args=(me,)) for me in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    assert not errors, errors[:3]
    one = sum(1 for trial in range(TRIALS) if wins[trial] == 1)
    report(
        f"lock race: {RACERS} threads x {TRIALS} trials: {one} trials with exactly one winner, "
        f"{TRIALS - one} otherwise"
    )
    assert one == TRIALS


# -- apply_async ----------------------------------------------------------------------------------

PUBLISHERS, PUBLISH_TRIALS = 16, 200


def test_16_processes_200_trials_of_apply_async_exactly_one_publish_each(
    make_app: Any, server: RedisServer
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app = make_app(broker_url=server.url, result_backend=server.url, unique_key_prefix="race:")

    @app.task(base=UniqueTask, shared=False, name="race.job", unique_ttl=600)
    def job(trial: int) -> None: ...

    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(PUBLISHERS)
    results = context.Queue()

    def publisher(me: int) -> None:
        published = []
        try:
            for trial in range(PUBLISH_TRIALS):
                barrier.wait(60)
                mine = f"{trial}-{me}"
                if job.apply_async((trial,), task_id=mine, queue=queue).id == mine:
                    published.append(trial)
        finally:
            results.put((me, published))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        processes = [context.Process(target=publisher, args=(me,)) for me in range(PUBLISHERS)]
        for process in processes:
            process.start()
    got = dict(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0] * PUBLISHERS
    per_trial = Counter(trial for published in got.values() for trial in published)
    with redis.Redis.from_url(server.url) as broker:
        messages = broker.llen(queue)
    one = sum(1 for trial in range(PUBLISH_TRIALS) if per_trial[trial] == 1)
    report(
        f"apply_async race: {PUBLISHERS} processes x {PUBLISH_TRIALS} trials: {one} trials with "
        f"exactly one publish; {messages} messages in the queue"
    )
    assert one == PUBLISH_TRIALS and messages == PUBLISH_TRIALS


# -- a worker: redeliveries and SIGKILLs ----------------------------------------------------------

TAGS, DUPLICATES = 25, 20


def started_once(tag: str) -> bool:
    return t.runs(tag) == 1


def test_500_redeliveries_of_running_tasks_never_run_beside_them(
    redis_url: str, celery_app: Any
) -> None:
    with worker_process(redis_url, concurrency=TAGS + 8, pool="threads") as (_, queue):
        tags = [uuid.uuid4().hex for _ in range(TAGS)]
        firsts = [t.redelivered.apply_async((tag,), queue=queue) for tag in tags]
        wait_until("every first run to start", lambda: all(t.runs(tag) for tag in tags), 30)
        # What a broker's redelivery looks like: the same message, same id, published again.
        for tag, first in zip(tags, firsts, strict=True):
            key = t.redelivered.unique_key((tag,))
            for _ in range(DUPLICATES):
                super(UniqueTask, t.redelivered).apply_async(
                    (tag,), task_id=first.id, headers={"celery_unique_key": key}, queue=queue
                )
        # Every duplicate is delivered while its first runs (each is deferred), then the
        # first runs end.
        wait_until(
            "every duplicate to be delivered",
            lambda: all(t.deferred(tag) >= DUPLICATES for tag in tags),
            120,
        )
        for tag in tags:
            t.let_go(tag)
        for first in firsts:
            first.get(timeout=60)
        # Deferred copies come back after the run's lease; each ends once, without running.
        wait_until(
            "every delivery to end",
            lambda: all(t.settled(tag) == 1 + DUPLICATES for tag in tags),
            120,
        )
    # No copy wrote over the state of the run it was a copy of.
    assert [first.state for first in firsts] == ["SUCCESS"] * TAGS
    overlapping = sum(t.peak(tag) > 1 for tag in tags)
    # A deferred copy that comes back once the first run has ended finds the key free: it
    # runs only if the first did not succeed, which it learns from the result backend
    # (waiting out the instant between the key's release and the result's storing).
    reruns = sum(t.runs(tag) - 1 for tag in tags)
    report(
        f"redelivery: {TAGS * DUPLICATES} duplicate deliveries of {TAGS} running tasks: "
        f"{overlapping} overlapping runs; {reruns} runs after the first had ended"
    )
    assert overlapping == 0
    assert reruns == 0


KILLS, AT_ONCE, LEASE = 20, 4, 2.0


def test_20_sigkilled_workers_free_their_keys_within_the_lease(
    redis_url: str, celery_app: Any
) -> None:
    freed_after: list[float] = []
    with redis.Redis.from_url(redis_url) as client:
        for _ in range(KILLS // AT_ONCE):
            with ExitStack() as stack:
                workers = [stack.enter_context(worker_process(redis_url)) for _ in range(AT_ONCE)]
                keys = []
                for _, queue in workers:
                    tag = uuid.uuid4().hex
                    t.short_lease.apply_async((tag,), queue=queue)  # lease 2 s, body 60 s
                    wait_until("the run to start", functools.partial(started_once, tag), 30)
                    keys.append(KeySpace("cut:").lock(t.short_lease.unique_key((tag, 60))))
                assert all(client.exists(key) for key in keys)  # held by the runs
                killed = time.monotonic()
                for process, _ in workers:
                    os.killpg(process.pid, signal.SIGKILL)  # parent and child: nobody cleans up
                for process, _ in workers:
                    process.wait()
                pending = set(keys)
                while pending:
                    for key in [k for k in pending if not client.exists(k)]:
                        pending.discard(key)
                        freed_after.append(time.monotonic() - killed)
                    assert time.monotonic() - killed < 30, "a key outlived its worker"
                    time.sleep(0.01)
    report(
        f"worker SIGKILL: {len(freed_after)} kills, keys free after at most "
        f"{max(freed_after):.2f} s (lease {LEASE} s; bound {LEASE + 1} s)"
    )
    assert len(freed_after) == KILLS and max(freed_after) <= LEASE + 1.0


# -- rate limits --------------------------------------------------------------------------------

LIMIT = RateLimit(50, per=1, burst=10)
DEMAND = 10  # callers, each asking at the limit's whole rate: 10x oversubscribed
DURATION = 3.0


def check_bound(start_us: int, admitted_us: list[int], end_us: int, flavour: str) -> None:
    rate, burst = LIMIT.count / LIMIT.per, LIMIT.burst
    # Each admission's recorded time is after the admission itself: k admitted by then must
    # fit burst + rate x elapsed; so must all of them by the end.
    over = sum(
        1
        for k, at in enumerate(sorted(admitted_us), 1)
        if k > burst + rate * (at - start_us) / 1e6 + 1e-9
    )
    elapsed = (end_us - start_us) / 1e6
    bound = burst + rate * elapsed
    report(
        f"rate limit {LIMIT.count}/s burst {burst}, {flavour}, {DEMAND}x oversubscribed: "
        f"{len(admitted_us)} admitted in {elapsed:.2f} s (bound {bound:.1f}); {over} over it"
    )
    assert over == 0 and len(admitted_us) <= bound


def test_a_rate_limit_at_ten_times_oversubscription_sync(server: RedisServer) -> None:
    admitted: list[int] = []
    start = threading.Event()
    with RedisBackend.from_url(server.url) as backend, redis.Redis.from_url(server.url) as clock:
        limiter = backend.rate_limiter(LIMIT)

        def caller() -> None:
            start.wait(30)
            ends = time.monotonic() + DURATION
            while time.monotonic() < ends:
                if limiter.hit("k").allowed:
                    admitted.append(redis_time_us(clock))
                time.sleep(LIMIT.per / LIMIT.count)  # this caller's own rate: the limit's

        threads = [threading.Thread(target=caller) for _ in range(DEMAND)]
        for thread in threads:
            thread.start()
        start_us = redis_time_us(clock)  # before any caller can hit
        start.set()
        for thread in threads:
            thread.join(60)
        check_bound(start_us, admitted, redis_time_us(clock), "sync")


async def test_a_rate_limit_at_ten_times_oversubscription_async(server: RedisServer) -> None:
    admitted: list[int] = []
    backend = AsyncRedisBackend.from_url(server.url)
    clock = redis.asyncio.Redis.from_url(server.url)
    limiter = backend.rate_limiter(LIMIT)

    async def now() -> int:
        seconds, micros = await clock.time()
        return int(seconds) * 1_000_000 + int(micros)

    async def caller() -> None:
        ends = time.monotonic() + DURATION
        while time.monotonic() < ends:
            if (await limiter.hit("k")).allowed:
                admitted.append(await now())
            await anyio.sleep(LIMIT.per / LIMIT.count)

    try:
        start_us = await now()  # before any caller starts
        async with anyio.create_task_group() as group:
            for _ in range(DEMAND):
                group.start_soon(caller)
        check_bound(start_us, admitted, await now(), "async")
    finally:
        await clock.aclose()
        await backend.aclose()
