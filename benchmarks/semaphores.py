"""Semaphore overhead: acquire+release pairs per second, ours against raw redis-py EVALSHA.

Run ``python -m benchmarks.semaphores`` (about 50 s) or ``--quick`` (about 10 s); ``--json
PATH`` also writes the results, ``--url`` uses a running Redis instead of a private one.

Every variant takes a slot of a free semaphore (limit 4, nobody else holding) and gives it
back, again and again, for a fixed time. Each task has its own semaphore name.

* ``raw EVALSHA`` is redis-py's ``client.evalsha`` running this library's own
  semaphore_acquire.lua and semaphore_release.lua on the very key ours uses
  (``<prefix>sem:{<name>}``), with the same arguments, on the same client and pool.
* ``ours executor`` sends the core's ``semaphores.acquire_once`` and ``release`` operations
  straight through the backend's executor: the cost of the I/O layer without the object.
* ``ours Semaphore`` / ``ours AsyncSemaphore`` builds a semaphore object per pair and calls
  ``acquire(blocking=False)`` + ``release()``: what an application does.
* Sync variants run in one thread; async ones at 1, 16 and 64 concurrent tasks, where ours
  batches what concurrent tasks send and raw sends each command on a connection of its own.
"""

from __future__ import annotations

import os

import redis
import redis.asyncio

from benchmarks import _harness as h
from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.core import semaphores
from celery_unique.core.scripts import SEMAPHORE_ACQUIRE, SEMAPHORE_RELEASE

FULL, QUICK = (0.5, 7), (0.15, 3)
TTL, LIMIT = 30, 4
RAW, EXECUTOR, SEMAPHORE, ASEMAPHORE = (
    "raw EVALSHA",
    "ours executor",
    "ours Semaphore",
    "ours AsyncSemaphore",
)


def _fail(what: str) -> RuntimeError:
    return RuntimeError(f"{what}: a semaphore that should have had a free slot had none")


def _token() -> str:
    return os.urandom(16).hex()


def sync_variants(backend: RedisBackend) -> list[h.Variant]:
    client: redis.Redis = backend.client
    executor = backend.executor
    name = "bench-sync"
    key, token, ttl_ms = backend.keys.semaphore(name), _token(), TTL * 1000
    acquire, release = SEMAPHORE_ACQUIRE.sha, SEMAPHORE_RELEASE.sha

    def raw() -> None:
        if client.evalsha(acquire, 1, key, token, LIMIT, ttl_ms)[0] != 1:
            raise _fail(RAW)
        if client.evalsha(release, 1, key, token) != 1:
            raise _fail(RAW)

    def ours_executor() -> None:
        if not executor.execute(semaphores.acquire_once(key, token, LIMIT, TTL)).acquired:
            raise _fail(EXECUTOR)
        executor.execute(semaphores.release(key, token))

    def ours_semaphore() -> None:
        semaphore = backend.semaphore(name, LIMIT, TTL)
        if not semaphore.acquire(blocking=False):
            raise _fail(SEMAPHORE)
        semaphore.release()

    pairs = {RAW: raw, EXECUTOR: ours_executor, SEMAPHORE: ours_semaphore}
    return [h.Variant(label, "sync", h.timed_sync(pair)) for label, pair in pairs.items()]


def async_variants(backend: AsyncRedisBackend, concurrency: int) -> list[h.Variant]:
    client: redis.asyncio.Redis = backend.client
    executor = backend.executor
    acquire, release, ttl_ms = SEMAPHORE_ACQUIRE.sha, SEMAPHORE_RELEASE.sha, TTL * 1000

    def raw(name: str) -> h.AsyncOp:
        key, token = backend.keys.semaphore(name), _token()

        async def pair() -> None:
            if (await client.evalsha(acquire, 1, key, token, LIMIT, ttl_ms))[0] != 1:
                raise _fail(RAW)
            await client.evalsha(release, 1, key, token)

        return pair

    def ours_executor(name: str) -> h.AsyncOp:
        key, token = backend.keys.semaphore(name), _token()

        async def pair() -> None:
            slot = await executor.execute(semaphores.acquire_once(key, token, LIMIT, TTL))
            if not slot.acquired:
                raise _fail(EXECUTOR)
            await executor.execute(semaphores.release(key, token))

        return pair

    def ours_semaphore(name: str) -> h.AsyncOp:
        async def pair() -> None:
            semaphore = backend.semaphore(name, LIMIT, TTL)
            if not await semaphore.acquire(blocking=False):
                raise _fail(ASEMAPHORE)
            await semaphore.release()

        return pair

    makers = {RAW: raw, EXECUTOR: ours_executor, ASEMAPHORE: ours_semaphore}
    return h.async_group(makers, concurrency)


async def run(url: str, chosen: h.Settings) -> h.Section:
    variants = await h.run_pairs(
        url,
        chosen,
        (SEMAPHORE_ACQUIRE, SEMAPHORE_RELEASE),
        sync_variants,
        async_variants,
        label="semaphores: ",
    )
    return report(variants)


def report(variants: list[h.Variant]) -> h.Section:
    section = h.Section(f"Semaphores: acquire+release pairs per second (limit {LIMIT})")
    rows, results = [], []
    for group in h.groups_of(variants):
        raw, executor = group[0], group[1]
        for v in group:
            to_raw = h.ratio(v, raw)
            to_executor = h.ratio(v, executor) if v.name in (SEMAPHORE, ASEMAPHORE) else None
            kind = "sync" if v.group == "sync" else "async"
            rows.append([f"{v.name} ({kind})", str(v.concurrency), h.rate(v.median),
                         h.times(to_raw), h.times(to_executor)])  # fmt: skip
            results.append(h.variant_json(v, ratio_to_raw=to_raw, ratio_to_executor=to_executor))
    header = ["variant", "tasks", "median pairs/s", "ratio to raw", "ratio to ours executor"]
    section.blocks.append(h.table(header, rows))
    for group in h.groups_of(variants):
        raw, ours = group[0], group[2]
        section.targets.append(
            h.Target(f"{ours.name} / raw EVALSHA, {ours.group}", h.ratio(ours, raw))
        )
    section.data["results"] = results
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK)
