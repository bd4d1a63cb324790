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


def test_callers_turned_away_queue_one_typical_hold_per_limit_apart(
    r: redis.Redis, prefix: str
) -> None:
    keys = KeySpace(prefix).semaphore_queue("api")

    def acquire(token: str, limit: int = 2) -> Any:
        return r.eval(SEMAPHORE_ACQUIRE.source, 3, *keys, token, limit, 60_000)

    assert acquire("a")[0] == 1 and acquire("b")[0] == 1
    # No hold time known yet: 1 s per slot, so 0.5 s apart at a limit of 2.
    dues = [acquire(token)[3] for token in ("c", "d", "e")]
    assert [round(due, -2) for due in dues] == [500, 1000, 1500]
    assert r.zrange(keys[1], 0, -1) == ["c", "d", "e"]  # first come, first served
    # a held its slot 4 s: the typical hold becomes 4 s, so a newcomer queues 2 s after e.
    assert r.eval(SEMAPHORE_RELEASE.source, 2, keys[0], keys[2], "a", 4000) == 1
    assert r.get(keys[2]) == "4000"
    assert acquire("c")[0] == 1  # a's slot went to c, which leaves the queue
    assert r.zrange(keys[1], 0, -1) == ["d", "e"]
    assert 3000 <= acquire("f")[3] <= 3600  # after e (~1.5 s), one 2 s step further
    again = acquire("d")  # back and still turned away: it queues near the front again
    assert again[0] == 0 and again[3] <= 2000
    assert 0 < r.pttl(keys[1]) <= 60_000 + 3600  # the queue expires a lease after its last


def test_a_caller_that_never_comes_back_leaves_the_queue(r: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix).semaphore_queue("api")
    r.eval(SEMAPHORE_ACQUIRE.source, 3, *keys, "holder", 1, 1000)
    r.zadd(keys[1], {"gone": 1})  # due long ago, more than a lease: revoked, say
    assert r.eval(SEMAPHORE_ACQUIRE.source, 3, *keys, "new", 1, 1000)[0] == 0
    assert r.zrange(keys[1], 0, -1) == ["new"]
