"""Lock overhead: acquire+release pairs per second, ours against raw redis-py and others.

Run ``python benchmarks/locks.py`` (about 55 s) or ``--quick`` (about 10 s); ``--json PATH``
also writes the results. One private ``redis-server`` (``celery_unique.testing``) serves all.

Every variant takes a free lock and releases it, again and again, for a fixed time, and the
number of pairs per second is counted. Nothing contends: each task has its own lock name, so
what differs between variants is client-side overhead (plus the work of each Lua script).

* ``raw`` is the floor: EVALSHA of this library's own acquire.lua/release.lua straight on the
  redis-py client, nothing around it. Ours runs the same scripts on the same client (the same
  pool of at most 64 connections), so its ``ratio to raw`` is the price of our Python layer:
  1.00 is free, 0.90 costs 10 %.
* ``ours backend`` is ``acquire_or_owner`` + ``release``; ``ours Lock`` builds a lock object
  per pair and calls ``acquire(blocking=False)`` + ``release()``, as does each third-party
  lock (redis-py's ``redis.lock.Lock``, python-redis-lock's ``redis_lock.Lock``). Those send
  other commands (redis-py acquires with a plain SET NX, no fence), so their ratio also
  reflects different server-side work, not only client overhead.
* Sync variants run in one thread; async ones at 1, 16 and 64 concurrent tasks, each compared
  with raw async at the same concurrency. There ours batches the commands of concurrent tasks
  (one write and one read per batch, packed and parsed by the library, on connections of the
  same pool) where raw sends each through redis-py on its own: above 1 task the ratio is what
  the batching gains, not a price.

Each repetition runs every variant once, next to its baseline and in an order that turns
from one repetition to the next. ``median pairs/s`` is the median over repetitions;
``ratio to raw`` is the median of per-repetition ratios (each run against the baseline's run
in the same repetition), which shrugs off slow drift in machine load. Client and server share
this machine's CPUs, so absolute numbers mean little elsewhere; the ratios travel better.
Differences of a few percent are within the noise of a busy machine (see the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis_lock

from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.core.scripts import ACQUIRE, RELEASE
from celery_unique.testing import redis_server

ASYNC_CONCURRENCY = (1, 16, 64)
TTL = 30  # seconds; no lock lives anywhere near that long here
WARMUP_PAIRS = 20  # before every timed run, shared among its tasks (at least one each)


@dataclass
class Variant:
    """One thing to measure; ``run(seconds)`` returns (pairs done, seconds taken)."""

    name: str
    kind: str  # "sync" or "async"
    concurrency: int
    run: Callable[[float], Awaitable[tuple[int, float]]]
    rates: list[float] = field(default_factory=list)  # pairs/s, one per repetition
    ratios: list[float] = field(default_factory=list)  # to the raw baseline, per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


# A group is a raw baseline followed by the variants compared with it.
Group = list[Variant]


def _fail(what: str) -> RuntimeError:
    return RuntimeError(f"{what}: a lock that should have been free was not (stale key?)")


# --- sync -----------------------------------------------------------------------------------


def _timed_sync(pair: Callable[[], None], seconds: float) -> tuple[int, float]:
    for _ in range(WARMUP_PAIRS):
        pair()
    count = 0
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    while clock() < deadline:
        pair()
        count += 1
    return count, clock() - start


def _sync_pairs(backend: RedisBackend) -> dict[str, Callable[[], None]]:
    client: redis.Redis = backend.client
    name = "bench-sync"
    lock_key = backend.keys.lock(name)  # the very key ours uses: both run identical scripts
    token, ttl_ms = uuid.uuid4().hex, TTL * 1000

    def raw() -> None:
        if client.evalsha(ACQUIRE.sha, 1, lock_key, token, ttl_ms)[0] != 1:
            raise _fail("raw")
        client.evalsha(RELEASE.sha, 1, lock_key, token)

    def ours_backend() -> None:
        if not backend.acquire_or_owner(name, token, TTL).acquired:
            raise _fail("ours backend")
        backend.release(name, token)

    def ours_lock() -> None:
        lock = backend.lock(name, ttl=TTL)
        if not lock.acquire(blocking=False):
            raise _fail("ours Lock")
        lock.release()

    def redis_py_lock() -> None:
        lock = client.lock("bench-redis-py", timeout=TTL)
        if not lock.acquire(blocking=False):
            raise _fail("redis.lock.Lock")
        lock.release()

    def python_redis_lock() -> None:
        lock = redis_lock.Lock(client, "bench-python-redis-lock", expire=TTL)
        if not lock.acquire(blocking=False):
            raise _fail("redis_lock.Lock")
        lock.release()

    return {
        "raw EVALSHA (sync)": raw,
        "ours backend (sync)": ours_backend,
        "ours Lock (sync)": ours_lock,
        "redis-py redis.lock.Lock (sync)": redis_py_lock,
        "python-redis-lock (sync)": python_redis_lock,
    }


def sync_group(backend: RedisBackend) -> Group:
    def variant(name: str, pair: Callable[[], None]) -> Variant:
        async def run(seconds: float) -> tuple[int, float]:
            return _timed_sync(pair, seconds)  # blocks the (otherwise idle) loop on purpose

        return Variant(name, "sync", 1, run)

    return [variant(name, pair) for name, pair in _sync_pairs(backend).items()]


# --- async ----------------------------------------------------------------------------------

AsyncPair = Callable[[], Awaitable[None]]


async def _timed_async(pairs: list[AsyncPair], seconds: float) -> tuple[int, float]:
    async def warm(pair: AsyncPair) -> None:
        for _ in range(max(1, WARMUP_PAIRS // len(pairs))):
            await pair()

    await asyncio.gather(*(warm(pair) for pair in pairs))
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds

    async def loop(pair: AsyncPair) -> int:
        count = 0
        while clock() < deadline:
            await pair()
            count += 1
        return count

    counts = await asyncio.gather(*(loop(pair) for pair in pairs))
    return sum(counts), clock() - start


def _async_pair_makers(backend: AsyncRedisBackend) -> dict[str, Callable[[str], AsyncPair]]:
    client: redis.asyncio.Redis = backend.client

    def raw(name: str) -> AsyncPair:
        lock_key, token, ttl_ms = backend.keys.lock(name), uuid.uuid4().hex, TTL * 1000

        async def pair() -> None:
            reply = await client.evalsha(ACQUIRE.sha, 1, lock_key, token, ttl_ms)
            if reply[0] != 1:
                raise _fail("raw async")
            await client.evalsha(RELEASE.sha, 1, lock_key, token)

        return pair

    def ours_backend(name: str) -> AsyncPair:
        token = uuid.uuid4().hex

        async def pair() -> None:
            if not (await backend.acquire_or_owner(name, token, TTL)).acquired:
                raise _fail("ours backend async")
            await backend.release(name, token)

        return pair

    def ours_lock(name: str) -> AsyncPair:
        async def pair() -> None:
            lock = backend.lock(name, ttl=TTL)
            if not await lock.acquire(blocking=False):
                raise _fail("ours AsyncLock")
            await lock.release()

        return pair

    return {
        "raw EVALSHA (async)": raw,
        "ours backend (async)": ours_backend,
        "ours AsyncLock (async)": ours_lock,
    }


def async_groups(backend: AsyncRedisBackend) -> list[Group]:
    makers = _async_pair_makers(backend)
    groups = []
    for concurrency in ASYNC_CONCURRENCY:
        group = []
        for index, (label, make) in enumerate(makers.items()):
            pairs = [make(f"bench-async-{index}-{i}") for i in range(concurrency)]

            async def run(seconds: float, pairs: list[AsyncPair] = pairs) -> tuple[int, float]:
                return await _timed_async(pairs, seconds)

            group.append(Variant(label, "async", concurrency, run))
        groups.append(group)
    return groups


# --- driver ---------------------------------------------------------------------------------


async def measure(url: str, seconds: float, reps: int) -> tuple[list[Group], str]:
    backend = RedisBackend.from_url(url)
    abackend = AsyncRedisBackend.from_url(url)
    try:
        for script in (ACQUIRE, RELEASE):
            if backend.client.script_load(script.source) != script.sha:
                raise RuntimeError(f"SCRIPT LOAD of {script.name} gave an unexpected SHA")
        redis_version = str(backend.client.info("server")["redis_version"])
        groups = [sync_group(backend), *async_groups(abackend)]
        for group in groups:  # a longer first warm-up: fills the pools, settles caches
            for variant in group:
                await variant.run(seconds / 2)
        for rep in range(reps):
            for group in groups:
                # Each variant runs next to its baseline; the order turns every repetition.
                shift = rep % len(group)
                for variant in group[shift:] + group[:shift]:
                    pairs, elapsed = await variant.run(seconds)
                    variant.rates.append(pairs / elapsed)
                raw = group[0].rates[-1]
                for variant in group:
                    variant.ratios.append(variant.rates[-1] / raw)
            print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
        return groups, redis_version
    finally:
        await abackend.aclose()
        backend.close()


def table(variants: list[Variant]) -> str:
    lines = [
        "| variant | concurrency | median pairs/s | ratio to raw |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {v.name} | {v.concurrency} | {v.median:,.0f} | {v.ratio:.2f}x |" for v in variants
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="0.15 s runs, 3 repetitions")
    parser.add_argument("--seconds", type=float, help="length of one run (default 0.5)")
    parser.add_argument("--reps", type=int, help="repetitions (default 7)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    seconds, reps = (0.15, 3) if args.quick else (0.5, 7)
    seconds, reps = args.seconds or seconds, args.reps or reps

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with redis_server() as url:
        groups, redis_version = asyncio.run(measure(url, seconds, reps))
    total = time.perf_counter() - started
    variants = [variant for group in groups for variant in group]

    meta: dict[str, Any] = {
        "redis_server": redis_version,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "python_redis_lock": getattr(redis_lock, "__version__", "?"),
        "reps": reps,
        "seconds_per_run": seconds,
        "total_seconds": round(total, 1),
        "cpus": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(table(variants))
    print()
    print(
        f"Redis {meta['redis_server']}, Python {meta['python']}, redis-py {meta['redis_py']}, "
        f"python-redis-lock {meta['python_redis_lock']}; median of {reps} reps of "
        f"{seconds:g} s each; total {total:.0f} s; {meta['cpus']} CPUs, load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    )
    if args.json is not None:
        results = [
            {
                "variant": v.name,
                "kind": v.kind,
                "concurrency": v.concurrency,
                "median_pairs_per_s": round(v.median, 1),
                "ratio_to_raw": round(v.ratio, 4),
                "pairs_per_s": [round(rate, 1) for rate in v.rates],
                "ratios": [round(ratio, 4) for ratio in v.ratios],
            }
            for v in variants
        ]
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
