"""The Lua scripts called directly, against their contracts (no library code in between)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique._keys import KeySpace, LockKeys
from celery_unique._scripts import ACQUIRE, EXTEND, RELEASE, Script


@pytest.fixture
def keys(prefix: str) -> LockKeys:
    return KeySpace(prefix).lock("job")


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


def run(r: redis.Redis, script: Script, keys: list[str], *args: Any) -> Any:
    return r.eval(script.source, len(keys), *keys, *args)


def test_every_script_opens_with_its_contract() -> None:
    for script in (ACQUIRE, RELEASE, EXTEND):
        head = script.source.splitlines()[:4]
        assert head[0].startswith(f"-- {script.name}:")
        assert any("KEYS[1]" in line for line in head)
        assert any("ARGV[1]" in line for line in head)
        assert "returns" in script.source.split("\n\n")[0] or "returns" in "".join(head)


def test_acquire_then_held_then_reacquire(r: redis.Redis, keys: LockKeys) -> None:
    k = [keys.lock, keys.fence]
    ok, token, ttl, fence = run(r, ACQUIRE, k, "a", 5000)
    assert (ok, token, ttl) == (1, "a", 5000)
    assert fence > 0

    held = run(r, ACQUIRE, k, "b", 5000)
    assert held[:2] == [0, "a"]
    assert 0 < held[2] <= 5000

    r.pexpire(keys.lock, 100)
    again = run(r, ACQUIRE, k, "a", 7000)
    assert again == [1, "a", 7000, fence]  # same token: TTL refreshed, same fence
    assert r.pttl(keys.lock) > 6000


def test_release_deletes_only_the_owners_lock(r: redis.Redis, keys: LockKeys) -> None:
    run(r, ACQUIRE, [keys.lock, keys.fence], "a", 5000)
    assert run(r, RELEASE, [keys.lock], "b") == 0
    assert r.get(keys.lock) == "a"
    assert run(r, RELEASE, [keys.lock], "a") == 1
    assert r.exists(keys.lock) == 0
    assert run(r, RELEASE, [keys.lock], "a") == 0


def test_extend_sets_the_ttl_only_for_the_owner(r: redis.Redis, keys: LockKeys) -> None:
    run(r, ACQUIRE, [keys.lock, keys.fence], "a", 1000)
    assert run(r, EXTEND, [keys.lock], "b", 60_000) == 0
    assert r.pttl(keys.lock) <= 1000
    assert run(r, EXTEND, [keys.lock], "a", 60_000) == 1
    assert r.pttl(keys.lock) > 59_000
    r.delete(keys.lock)
    assert run(r, EXTEND, [keys.lock], "a", 60_000) == 0
    assert r.exists(keys.lock) == 0  # extend never resurrects a lock


def test_fence_strictly_increases_even_after_its_counter_expired(
    r: redis.Redis, keys: LockKeys
) -> None:
    k = [keys.lock, keys.fence]
    fences = []
    for i in range(200):
        fences.append(run(r, ACQUIRE, k, f"t{i}", 5000)[3])
        run(r, RELEASE, [keys.lock], f"t{i}")
        if i % 50 == 0:
            r.delete(keys.fence)  # as if it had expired while the name was idle
    assert all(b > a for a, b in itertools.pairwise(fences))


def test_fence_survives_a_counter_ahead_of_the_clock(r: redis.Redis, keys: LockKeys) -> None:
    # Far ahead of Redis time (year ~2128) but inside the 2**53 that Lua numbers hold exactly.
    r.set(keys.fence, str(5 * 10**15))
    assert run(r, ACQUIRE, [keys.lock, keys.fence], "a", 5000)[3] == 5 * 10**15 + 1


def test_nothing_is_written_without_an_expiry(r: redis.Redis, keys: LockKeys) -> None:
    run(r, ACQUIRE, [keys.lock, keys.fence], "a", 5000)
    run(r, EXTEND, [keys.lock], "a", 9000)
    for key in (keys.lock, keys.fence):
        assert 0 < r.pttl(key) <= 9000
    run(r, RELEASE, [keys.lock], "a")
    assert 0 < r.pttl(keys.fence) <= 5000  # the counter goes within one ttl of release


def test_a_held_lock_costs_under_200_bytes(r: redis.Redis) -> None:
    # The documented bound: default prefix, a name of up to 24 characters.
    keys = KeySpace().lock(f"report:{uuid.uuid4().hex[:17]}")
    token = uuid.uuid4().hex
    run(r, ACQUIRE, [keys.lock, keys.fence], token, 30_000)

    # MEMORY USAGE adds the allocation size of the request's own copy of the key name, which
    # varies with how the server parsed that request: the least of a few readings is the key.
    def usage(key: str) -> int:
        return min(int(r.memory_usage(key) or 0) for _ in range(5))

    total = usage(keys.lock) + usage(keys.fence)
    r.delete(keys.lock, keys.fence)
    assert total <= 200, total


def test_acquire_hands_over_from_the_named_predecessor_only(r: redis.Redis, keys: LockKeys) -> None:
    k = [keys.lock, keys.fence]
    fence = run(r, ACQUIRE, k, "queued", 5000)[3]
    assert run(r, ACQUIRE, k, "run-1", 1000, "someone-else")[:2] == [0, "queued"]
    taken = run(r, ACQUIRE, k, "run-1", 1000, "queued")
    assert taken[:3] == [1, "run-1", 1000]
    assert taken[3] > fence  # a new holder, a new fence
    assert run(r, ACQUIRE, k, "run-2", 1000, "queued")[:2] == [0, "run-1"]


def test_release_by_owner_prefix_frees_any_run_of_a_task(r: redis.Redis, keys: LockKeys) -> None:
    run(r, ACQUIRE, [keys.lock, keys.fence], "task-1\x1frun-a", 5000)
    assert run(r, RELEASE, [keys.lock], "task-1", "task-2\x1f") == 0
    assert run(r, RELEASE, [keys.lock], "task-1", "task-1\x1f") == 1
    assert r.exists(keys.lock) == 0
