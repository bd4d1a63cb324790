"""Lock overhead: acquire+release pairs per second, ours against raw redis-py and others.

Run ``python -m benchmarks.locks`` (about 60 s) or ``--quick`` (about 10 s); ``--json PATH``
also writes the results, ``--url`` uses a running Redis instead of a private one.

Every variant takes a free lock and releases it, again and again, for a fixed time, and the
number of pairs per second is counted. Nothing contends: each task has its own lock name, so
what differs between variants is client-side overhead (plus the work of each Lua script).

* ``raw EVALSHA`` is redis-py calling ``client.evalsha`` with this library's own acquire.lua
  and release.lua on the very key ours uses (one key: ``<prefix>lock:{<name>}``), on the same
  client and pool. Ours runs the same scripts, so its ratio to raw is the price (below 1.00x)
  or the gain (above) of our layer against redis-py's generic command path.
* ``ours backend`` is ``backend.acquire_or_owner`` + ``backend.release``; ``ours Lock`` builds
  a lock object per pair and calls ``acquire(blocking=False)`` + ``release()``, as does each
  third-party lock (redis-py's ``redis.lock.Lock``, python-redis-lock's ``redis_lock.Lock``).
  Those send other commands (redis-py acquires with a plain ``SET NX``, no fence), so their
  ratio also reflects different server-side work, not only client overhead.
* Sync variants run in one thread; async ones at 1, 16 and 64 concurrent tasks. Raw async
  sends each command through redis-py on a connection of its own; ours batches what
  concurrent tasks send (one write and one read per batch), so above one task the ratio to
  raw is what batching gains, and ``AsyncLock`` is compared with the bare backend call.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import redis
import redis.asyncio
import redis_lock

from benchmarks import _harness as h
from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.core.scripts import ACQUIRE, RELEASE

FULL, QUICK = (0.5, 7), (0.15, 3)
TTL = 30  # seconds; no lock lives anywhere near that long here
RAW, BACKEND, LOCK = "raw EVALSHA", "ours backend", "ours Lock"
ALOCK = "ours AsyncLock"
REDIS_PY, PYTHON_REDIS_LOCK = "redis-py redis.lock.Lock", "python-redis-lock"
PYTHON_REDIS_LOCK_DIST = "python-redis-lock"


def _fail(what: str) -> RuntimeError:
    return RuntimeError(f"{what}: a lock that should have been free was not (stale key?)")


def _token() -> str:
    return os.urandom(16).hex()


def sync_variants(backend: RedisBackend) -> list[h.Variant]:
    client: redis.Redis = backend.client
    name = "bench-sync"
    lock_key = backend.keys.lock(name)  # the very key ours uses: both run identical scripts
    token, ttl_ms = _token(), TTL * 1000
    acquire, release = ACQUIRE.sha, RELEASE.sha

    def raw() -> None:
        if client.evalsha(acquire, 1, lock_key, token, ttl_ms)[0] != 1:
            raise _fail(RAW)
        if client.evalsha(release, 1, lock_key, token) != 1:
            raise _fail(RAW)

    def ours_backend() -> None:
        if not backend.acquire_or_owner(name, token, TTL).acquired:
            raise _fail(BACKEND)
        backend.release(name, token)

    def ours_lock() -> None:
        lock = backend.lock(name, ttl=TTL)
        if not lock.acquire(blocking=False):
            raise _fail(LOCK)
        lock.release()

    def redis_py_lock() -> None:
        lock = client.lock("bench-redis-py", timeout=TTL)
        if not lock.acquire(blocking=False):
            raise _fail(REDIS_PY)
        lock.release()

    def python_redis_lock() -> None:
        lock = redis_lock.Lock(client, "bench-python-redis-lock", expire=TTL)
        if not lock.acquire(blocking=False):
            raise _fail(PYTHON_REDIS_LOCK)
        lock.release()

    pairs: dict[str, Callable[[], None]] = {
        RAW: raw,
        BACKEND: ours_backend,
        LOCK: ours_lock,
        REDIS_PY: redis_py_lock,
        PYTHON_REDIS_LOCK: python_redis_lock,
    }
    return [h.Variant(label, "sync", h.timed_sync(pair)) for label, pair in pairs.items()]


def async_variants(backend: AsyncRedisBackend, concurrency: int) -> list[h.Variant]:
    client: redis.asyncio.Redis = backend.client
    acquire, release, ttl_ms = ACQUIRE.sha, RELEASE.sha, TTL * 1000

    def raw(name: str) -> h.AsyncOp:
        lock_key, token = backend.keys.lock(name), _token()

        async def pair() -> None:
            if (await client.evalsha(acquire, 1, lock_key, token, ttl_ms))[0] != 1:
                raise _fail(RAW)
            await client.evalsha(release, 1, lock_key, token)

        return pair

    def ours_backend(name: str) -> h.AsyncOp:
        token = _token()

        async def pair() -> None:
            if not (await backend.acquire_or_owner(name, token, TTL)).acquired:
                raise _fail(BACKEND)
            await backend.release(name, token)

        return pair

    def ours_lock(name: str) -> h.AsyncOp:
        async def pair() -> None:
            lock = backend.lock(name, ttl=TTL)
            if not await lock.acquire(blocking=False):
                raise _fail(ALOCK)
            await lock.release()

        return pair

    makers = {RAW: raw, BACKEND: ours_backend, ALOCK: ours_lock}
    return h.async_group(makers, concurrency)


def _find(variants: list[h.Variant], name: str, group: str) -> h.Variant | None:
    return next((v for v in variants if v.name == name and v.group == group), None)


async def run(url: str, chosen: h.Settings) -> h.Section:
    variants = await h.run_pairs(
        url, chosen, (ACQUIRE, RELEASE), sync_variants, async_variants, label="locks: "
    )
    return report(variants)


def report(variants: list[h.Variant]) -> h.Section:
    section = h.Section("Locks: acquire+release pairs per second")
    rows, results = [], []
    for members in h.groups_of(variants):
        baseline = members[0]
        backend = _find(members, BACKEND, baseline.group)
        for v in members:
            to_raw = h.ratio(v, baseline)
            to_backend = h.ratio(v, backend) if v.name in (LOCK, ALOCK) else None
            kind = "sync" if v.group == "sync" else "async"
            rows.append([f"{v.name} ({kind})", str(v.concurrency), h.rate(v.median),
                         h.times(to_raw), h.times(to_backend)])  # fmt: skip
            results.append(h.variant_json(v, ratio_to_raw=to_raw, ratio_to_backend=to_backend))
    header = ["variant", "tasks", "median pairs/s", "ratio to raw", "ratio to ours backend"]
    section.blocks.append(h.table(header, rows))
    lock, raw = _find(variants, LOCK, "sync"), _find(variants, RAW, "sync")
    redis_py = _find(variants, REDIS_PY, "sync")
    section.targets += [
        h.Target("sync Lock pair / raw redis-py EVALSHA pair", h.ratio(lock, raw), 1.3),
        h.Target("sync Lock pair / redis-py redis.lock.Lock", h.ratio(lock, redis_py), 1.3),
    ]
    lone, lone_raw = _find(variants, ALOCK, "async x1"), _find(variants, RAW, "async x1")
    section.targets.append(
        h.Target(
            "lone AsyncLock pair / raw redis.asyncio EVALSHA pair", h.ratio(lone, lone_raw), 0.95
        )
    )
    for concurrency in (16, 64):
        group_name = f"async x{concurrency}"
        alock = _find(variants, ALOCK, group_name)
        abackend = _find(variants, BACKEND, group_name)
        label = f"AsyncLock / bare async backend call, {concurrency} tasks"
        section.targets.append(h.Target(label, h.ratio(alock, abackend), 0.9))
    section.versions[PYTHON_REDIS_LOCK_DIST] = h.version(PYTHON_REDIS_LOCK_DIST) or "?"
    section.data["results"] = results
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK)
