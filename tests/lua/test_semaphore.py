"""The semaphore scripts called directly, against their contracts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique.core.keys import KeySpace
from celery_unique.core.scripts import (
    SEMAPHORE_ACQUIRE,
    SEMAPHORE_EXTEND,
    SEMAPHORE_HOLDERS,
    SEMAPHORE_RELEASE,
    Script,
)

SCRIPTS = (SEMAPHORE_ACQUIRE, SEMAPHORE_RELEASE, SEMAPHORE_EXTEND, SEMAPHORE_HOLDERS)


@pytest.fixture
def key(prefix: str) -> str:
    return KeySpace(prefix).semaphore("api")


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


def run(r: redis.Redis, script: Script, key: str, *args: Any) -> Any:
    return r.eval(script.source, 1, key, *args)


def test_every_script_opens_with_its_contract() -> None:
    for script in SCRIPTS:
        head = script.source.split("\nlocal ", 1)[0]
        assert head.startswith(f"-- {script.name}:")
        assert "KEYS[1]" in head and "returns" in head


def test_slots_are_given_up_to_the_limit_then_refused_with_the_wait(
    r: redis.Redis, key: str
) -> None:
    assert run(r, SEMAPHORE_ACQUIRE, key, "a", 2, 5000) == [1, 1, 5000]
    assert run(r, SEMAPHORE_ACQUIRE, key, "b", 2, 3000) == [1, 2, 3000]
    refused = run(r, SEMAPHORE_ACQUIRE, key, "c", 2, 5000)
    assert refused[:2] == [0, 2]
    assert 0 < refused[2] <= 3000  # when b's lease, the earliest, ends
    assert run(r, SEMAPHORE_ACQUIRE, key, "a", 2, 9000) == [1, 2, 9000]  # a renews its own
    assert run(r, SEMAPHORE_HOLDERS, key) == 2


def test_expired_holders_never_count(r: redis.Redis, key: str) -> None:
    run(r, SEMAPHORE_ACQUIRE, key, "a", 1, 5000)
    r.zadd(key, {"a": 1})  # as if a's lease had ended long ago (a crashed holder)
    assert run(r, SEMAPHORE_HOLDERS, key) == 0
    assert run(r, SEMAPHORE_ACQUIRE, key, "b", 1, 5000)[:2] == [1, 1]
    assert r.zrange(key, 0, -1) == ["b"]
    assert run(r, SEMAPHORE_EXTEND, key, "a", 5000) == 0  # an ended lease is never revived
    assert run(r, SEMAPHORE_RELEASE, key, "a") == 0


def test_release_and_extend_touch_only_the_callers_slot(r: redis.Redis, key: str) -> None:
    run(r, SEMAPHORE_ACQUIRE, key, "a", 3, 1000)
    run(r, SEMAPHORE_ACQUIRE, key, "b", 3, 1000)
    assert run(r, SEMAPHORE_RELEASE, key, "nobody") == 0
    assert run(r, SEMAPHORE_EXTEND, key, "b", 60_000) == 1
    assert r.pttl(key) > 59_000  # the key lives as long as its last lease
    assert run(r, SEMAPHORE_RELEASE, key, "b") == 1
    assert r.zrange(key, 0, -1) == ["a"]
    assert 0 < r.pttl(key) <= 1000  # and no longer than that once b is gone
    assert run(r, SEMAPHORE_RELEASE, key, "a") == 1
    assert r.exists(key) == 0


def test_nothing_is_written_without_an_expiry(r: redis.Redis, key: str) -> None:
    run(r, SEMAPHORE_ACQUIRE, key, "a", 2, 5000)
    assert 0 < r.pttl(key) <= 5000
    run(r, SEMAPHORE_ACQUIRE, key, "b", 2, 8000)
    assert 5000 < r.pttl(key) <= 8000
