"""16 OS processes released by a barrier race for one name: exactly one wins, every trial."""

from __future__ import annotations

import multiprocessing
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import redis

from celery_unique import RedisBackend
from tests.conftest import lock_owner

PROCESSES = 16
TRIALS = 50


def _contender(url: str, prefix: str, barrier: Barrier, results: Queue[tuple[int, str]]) -> None:
    backend = RedisBackend.from_url(url, key_prefix=prefix)
    backend.acquire_or_owner("warm-up", "x", 1)  # connect before the first race
    for trial in range(TRIALS):
        lock = backend.lock(f"race:{trial}", ttl=60)
        barrier.wait(timeout=60)
        if lock.acquire(blocking=False):
            results.put((trial, lock.token))
    results.put((-1, ""))
    backend.close()


def test_exactly_one_of_16_processes_wins_each_of_50_races(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results: Queue[tuple[int, str]] = ctx.Queue()
    processes = [
        ctx.Process(target=_contender, args=(redis_url, prefix, barrier, results))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    winners: dict[int, list[str]] = {trial: [] for trial in range(TRIALS)}
    finished = 0
    while finished < PROCESSES:
        trial, token = results.get(timeout=120)
        if trial < 0:
            finished += 1
        else:
            winners[trial].append(token)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert {trial: len(tokens) for trial, tokens in winners.items()} == dict.fromkeys(
        range(TRIALS), 1
    )
    for trial, (token,) in winners.items():  # and Redis agrees on who won
        assert lock_owner(client, prefix, f"race:{trial}") == token
