"""token_bucket.lua against its contract, called directly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique._scripts import TOKEN_BUCKET


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def bucket(r: redis.Redis, keys: list[str], cost: int, *limits: tuple[int, int, int]) -> Any:
    args = [cost] + [x for limit in limits for x in limit]
    return r.eval(TOKEN_BUCKET.source, len(keys), *keys, *args)


HOURLY = (3, 3_600_000_000, 3)  # 3 per hour, burst 3: nothing refills during a test


def test_admits_the_burst_then_denies_without_taking_anything(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    assert [bucket(r, [key], 1, HOURLY)[:2] for _ in range(3)] == [[1, 2], [1, 1], [1, 0]]
    state = r.get(key)
    denied = bucket(r, [key], 1, HOURLY)
    assert denied[:2] == [0, 0]
    assert 1_199_000_000 < denied[2] <= 1_200_000_000  # one token comes back in 20 min
    assert r.get(key) == state  # a denied request writes nothing


def test_cost_takes_several_tokens_at_once(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    assert bucket(r, [key], 2, HOURLY)[:2] == [1, 1]
    assert bucket(r, [key], 2, HOURLY)[0] == 0
    assert bucket(r, [key], 1, HOURLY)[:2] == [1, 0]


def test_every_limit_must_admit_and_none_is_charged_otherwise(r: redis.Redis, prefix: str) -> None:
    fast, slow = f"{prefix}{{k}}:fast", f"{prefix}{{k}}:slow"
    per_second = (1000, 1_000_000, 1000)
    one_per_hour = (1, 3_600_000_000, 1)
    assert bucket(r, [fast, slow], 1, per_second, one_per_hour)[:2] == [1, 0]
    fast_state = r.get(fast)
    assert bucket(r, [fast, slow], 1, per_second, one_per_hour)[0] == 0
    assert r.get(fast) == fast_state  # the per-second bucket was not charged either


def test_refills_and_expires_once_full_again(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    fast = (1000, 1_000_000, 10)  # 1000/s: refilled within milliseconds
    for _ in range(10):
        assert bucket(r, [key], 1, fast)[0] == 1
    assert 0 < r.pttl(key) <= 10  # full again within 10 ms, then gone
    deadline_checks = 0  # wait on Redis's own clock, not ours
    while r.exists(key):
        deadline_checks += 1
        assert deadline_checks < 10_000
    assert bucket(r, [key], 10, fast)[0] == 1  # a full bucket again


def test_never_admits_more_than_burst_plus_rate_times_elapsed(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    limit = (3, 1_000_000, 1)  # 3 per second, burst 1: rounding would show up quickly
    start = r.time()
    admitted = sum(bucket(r, [key], 1, limit)[0] for _ in range(3000))
    end = r.time()
    elapsed = (end[0] - start[0]) + (end[1] - start[1]) / 1e6
    assert admitted <= 1 + 3 * elapsed
