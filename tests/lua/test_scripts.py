"""The Lua scripts called directly, against their contracts (no library code in between)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from celery_unique.core.keys import KeySpace
from celery_unique.core.scripts import ACQUIRE, EXTEND, MOVE, RELEASE, Script


@pytest.fixture
def key(prefix: str) -> str:
    return KeySpace(prefix).lock("job")


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


def run(r: redis.Redis, script: Script, key: str, *args: Any) -> Any:
    return r.eval(script.source, 1, key, *args)


def owner(r: redis.Redis, key: str) -> str | None:
    value = r.get(key)
    return None if value is None else str(value).partition(":")[2]


def test_every_script_opens_with_its_contract() -> None:
    for script in (ACQUIRE, RELEASE, EXTEND, MOVE):
        head = script.source.splitlines()[:4]
        assert head[0].startswith(f"-- {script.name}:")
        assert any("KEYS[1]" in line for line in head)
        assert any("ARGV[1]" in line for line in head)
        assert "returns" in script.source.split("\n\n")[0] or "returns" in "".join(head)


def test_acquire_then_held_then_reacquire(r: redis.Redis, key: str) -> None:
    ok, token, ttl, fence = run(r, ACQUIRE, key, "a", 5000)
    assert (ok, token, ttl) == (1, "a", 5000)
    assert fence > 0
    assert r.get(key) == f"{fence}:a"  # one key: the fence, then the token

    held = run(r, ACQUIRE, key, "b", 5000)
    assert held[:2] == [0, "a"]
    assert 0 < held[2] <= 5000

    r.pexpire(key, 100)
    again = run(r, ACQUIRE, key, "a", 7000)
    assert again == [1, "a", 7000, fence]  # same token: TTL refreshed, same fence
    assert r.pttl(key) > 6000


def test_a_token_may_hold_the_separator(r: redis.Redis, key: str) -> None:
    token = "task:1\x1frun:2"
    assert run(r, ACQUIRE, key, token, 5000)[:2] == [1, token]
    assert run(r, ACQUIRE, key, "other", 5000)[:2] == [0, token]
    assert run(r, EXTEND, key, token, 6000) == 1
    assert run(r, RELEASE, key, token) == 1


def test_release_deletes_only_the_owners_lock(r: redis.Redis, key: str) -> None:
    run(r, ACQUIRE, key, "a", 5000)
    assert run(r, RELEASE, key, "b") == 0
    assert owner(r, key) == "a"
    assert run(r, RELEASE, key, "a") == 1
    assert r.exists(key) == 0
    assert run(r, RELEASE, key, "a") == 0


def test_extend_sets_the_ttl_only_for_the_owner(r: redis.Redis, key: str) -> None:
    run(r, ACQUIRE, key, "a", 1000)
    assert run(r, EXTEND, key, "b", 60_000) == 0
    assert r.pttl(key) <= 1000
    assert run(r, EXTEND, key, "a", 60_000) == 1
    assert r.pttl(key) > 59_000
    r.delete(key)
    assert run(r, EXTEND, key, "a", 60_000) == 0
    assert r.exists(key) == 0  # extend never resurrects a lock


def test_fence_strictly_increases_even_after_the_lock_expired(r: redis.Redis, key: str) -> None:
    fences = []
    for i in range(200):
        fences.append(run(r, ACQUIRE, key, f"t{i}", 5000)[3])
        if i % 2:  # handed on first: a new holder, a new fence
            fences.append(run(r, ACQUIRE, key, f"next{i}", 5000, f"t{i}")[3])
            run(r, RELEASE, key, f"next{i}")
        else:
            run(r, RELEASE, key, f"t{i}")  # gone, and its fence with it
    assert all(b > a for a, b in itertools.pairwise(fences))


def test_fence_survives_a_counter_ahead_of_the_clock(r: redis.Redis, key: str) -> None:
    # Far ahead of Redis time (year ~2128) but inside the 2**53 that Lua numbers hold exactly.
    r.set(key, f"{5 * 10**15}:a", px=5000)
    assert run(r, ACQUIRE, key, "b", 5000, "a")[3] == 5 * 10**15 + 1


def test_nothing_is_written_without_an_expiry(r: redis.Redis, key: str) -> None:
    run(r, ACQUIRE, key, "a", 5000)
    assert 0 < r.pttl(key) <= 5000
    run(r, EXTEND, key, "a", 9000)
    assert 0 < r.pttl(key) <= 9000
    run(r, ACQUIRE, key, "b", 3000, "a")
    assert 0 < r.pttl(key) <= 3000
    assert r.dbsize() >= 1 and set(r.scan_iter(match=key[: key.index("lock:")] + "*")) == {key}


def test_a_held_lock_is_one_key_of_at_most_200_bytes(r: redis.Redis) -> None:
    # The documented bound: default prefix, a name of up to 24 characters, a unique task's
    # run token (a task id, a separator and a run id).
    key = KeySpace().lock(f"report:{uuid.uuid4().hex[:17]}")
    token = f"{uuid.uuid4()}\x1f{uuid.uuid4().hex[:16]}"
    run(r, ACQUIRE, key, token, 30_000)

    # MEMORY USAGE adds the allocation size of the request's own copy of the key name, which
    # varies with how the server parsed that request: the least of a few readings is the key.
    usage = min(int(r.memory_usage(key) or 0) for _ in range(5))
    r.delete(key)
    assert usage <= 200, usage


def test_acquire_hands_over_from_the_named_predecessor_only(r: redis.Redis, key: str) -> None:
    fence = run(r, ACQUIRE, key, "queued", 5000)[3]
    assert run(r, ACQUIRE, key, "run-1", 1000, "someone-else")[:2] == [0, "queued"]
    taken = run(r, ACQUIRE, key, "run-1", 1000, "queued")
    assert taken[:3] == [1, "run-1", 1000]
    assert taken[3] > fence  # a new holder, a new fence
    assert run(r, ACQUIRE, key, "run-2", 1000, "queued")[:2] == [0, "run-1"]


def test_release_by_owner_prefix_frees_any_run_of_a_task(r: redis.Redis, key: str) -> None:
    run(r, ACQUIRE, key, "task-1\x1frun-a", 5000)
    assert run(r, RELEASE, key, "task-1", "task-2\x1f") == 0
    assert run(r, RELEASE, key, "task-1", "task-1\x1f") == 1
    assert r.exists(key) == 0


def test_move_takes_the_running_lock_and_frees_the_queued_one(r: redis.Redis, prefix: str) -> None:
    space = KeySpace(prefix)
    queued, running = space.lock("job"), space.running_lock("job")
    assert key_slot(queued.encode()) == key_slot(running.encode())
    run(r, ACQUIRE, queued, "task-1", 60_000)
    moved = r.eval(MOVE.source, 2, queued, running, "task-1", "task-1\x1fr1", 5000)
    assert moved[:3] == [1, "task-1\x1fr1", 5000] and moved[3] > 0
    assert r.exists(queued) == 0  # the next call can queue now
    assert owner(r, running) == "task-1\x1fr1"
    # Another instance, queued meanwhile, cannot move while the first runs: nothing changes.
    run(r, ACQUIRE, queued, "task-2", 60_000)
    refused = r.eval(MOVE.source, 2, queued, running, "task-2", "task-2\x1fr1", 5000)
    assert refused[:2] == [0, "task-1\x1fr1"]
    assert owner(r, queued) == "task-2" and owner(r, running) == "task-1\x1fr1"
    # The same run moving again keeps its fence; a retry handed back to task-1 is taken over.
    again = r.eval(MOVE.source, 2, queued, running, "task-1", "task-1\x1fr1", 5000)
    assert again == moved  # refreshed: same token, same fence
    run(r, ACQUIRE, running, "task-1", 60_000, "task-1\x1fr1")  # handed back for a retry
    retried = r.eval(MOVE.source, 2, queued, running, "task-1", "task-1\x1fr2", 5000)
    assert retried[0] == 1 and retried[3] > moved[3]
    assert owner(r, queued) == "task-2"  # never another instance's queued lock


def test_a_hand_over_reads_no_clock(r: redis.Redis, key: str) -> None:
    """The fence goes on from the predecessor's: one command (TIME) less on a worker's start."""

    def clock_reads() -> int:
        return int(r.info("commandstats").get("cmdstat_time", {}).get("calls", 0))

    first = run(r, ACQUIRE, key, "a", 5000)[3]
    before = clock_reads()
    assert run(r, ACQUIRE, key, "b", 5000, "a") == [1, "b", 5000, first + 1]
    assert clock_reads() == before
