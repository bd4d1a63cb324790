"""A server killed mid-stream (SIGKILL) and restarted on its port, empty: callers see only
BackendUnavailable while it is down, and everything works again within 2 s of its first
answered PING, the scripts loaded anew (NOSCRIPT handled). And SCRIPT FLUSH before each of
thousands of operations costs no error at all."""

from __future__ import annotations

import threading
import uuid

import anyio
import anyio.lowlevel
import pytest
import redis

from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.testing import RedisServer
from tests.faults.conftest import Outage, auntil_working, report, until_working

pytestmark = pytest.mark.anyio

RECOVERY = 2.0  # seconds from the first answered PING


def sync_operations(backend: RedisBackend) -> dict[str, object]:
    name = uuid.uuid4().hex
    return {
        "acquire": lambda: backend.acquire_or_owner(name, "me", 10),
        "release": lambda: backend.release(name, "me"),
        # A holder of its own each time: a restarted server has forgotten the last one.
        "semaphore": lambda: backend.semaphore(name, limit=10**6, ttl=10).acquire(blocking=False),
        "hit": lambda: backend.rate_limiter("1000/s").hit(name),
    }


def test_sync_callers_ride_out_a_restart(server: RedisServer) -> None:
    with RedisBackend.from_url(server.url) as backend:
        operations = sync_operations(backend)
        outage = Outage(deadline=2.5)
        stop = threading.Event()
        failures: list[BaseException] = []

        def stream() -> None:  # operations keep coming throughout
            try:
                while not stop.is_set():
                    for operation in operations.values():
                        outage.call(operation)  # type: ignore[arg-type]
            except BaseException as exc:
                failures.append(exc)

        worker = threading.Thread(target=stream)
        worker.start()
        try:
            until_working(outage, operations["acquire"], 5)  # type: ignore[arg-type]
            server.kill()
            assert outage.wait_errors(20), "the stream never met the outage"
            assert not failures, failures
            server.start()  # returns once PING is answered
            outage.mark()
            took = {
                name: until_working(outage, op, RECOVERY)  # type: ignore[arg-type]
                for name, op in operations.items()
            }
        finally:
            stop.set()
            worker.join(30)
        assert not failures, failures
        assert max(took.values()) <= RECOVERY, took
        report(
            f"restart, sync: {outage.errors} BackendUnavailable of {outage.calls} calls, no other "
            f"error; every operation working {max(took.values()):.3f} s after the first PING "
            f"(slowest call {outage.slowest:.2f} s)"
        )


async def test_async_callers_ride_out_a_restart(server: RedisServer) -> None:
    backend = AsyncRedisBackend.from_url(server.url)
    name = uuid.uuid4().hex
    operations = {
        "acquire": lambda: backend.acquire_or_owner(name, "me", 10),
        "release": lambda: backend.release(name, "me"),
        "semaphore": lambda: backend.semaphore(name, limit=10**6, ttl=10).acquire(blocking=False),
        "hit": lambda: backend.rate_limiter("1000/s").hit(name),
    }
    outage = Outage(deadline=2.5)
    stop = anyio.Event()

    async def stream() -> None:
        while not stop.is_set():
            for operation in operations.values():
                await outage.acall(operation)
            await anyio.lowlevel.checkpoint()

    try:
        async with anyio.create_task_group() as group:
            for _ in range(8):  # concurrent callers: batches on the wire when it dies
                group.start_soon(stream)
            await auntil_working(outage, operations["acquire"], 5)
            server.kill()
            met = await anyio.to_thread.run_sync(outage.wait_errors, 40)
            assert met, "the callers never met the outage"
            await anyio.to_thread.run_sync(server.start)
            outage.mark()
            took = {
                name: await auntil_working(outage, op, RECOVERY) for name, op in operations.items()
            }
            stop.set()
    finally:
        await backend.aclose()
    assert max(took.values()) <= RECOVERY, took
    report(
        f"restart, async (8 callers): {outage.errors} BackendUnavailable of {outage.calls} calls, "
        f"no other error; every operation working {max(took.values()):.3f} s after the first "
        f"PING (slowest call {outage.slowest:.2f} s)"
    )


FLUSHES = 2000


def test_script_flush_before_every_operation_costs_no_error(server: RedisServer) -> None:
    with RedisBackend.from_url(server.url) as backend, redis.Redis.from_url(server.url) as admin:
        semaphore = backend.semaphore("pool", limit=2, ttl=10)
        limiter = backend.rate_limiter("1000000/s")
        for i in range(FLUSHES):
            admin.script_flush()
            kind = i % 4
            if kind == 0:
                assert backend.acquire_or_owner(f"job{i}", "me", 10).acquired
            elif kind == 1:
                assert backend.release(f"job{i - 1}", "me")
            elif kind == 2:
                assert semaphore.acquire(blocking=False)
                semaphore.release()
            else:
                assert limiter.hit("k").allowed
    report(f"SCRIPT FLUSH before each of {FLUSHES} sync operations: 0 errors")


async def test_script_flush_before_every_async_batch_costs_no_error(server: RedisServer) -> None:
    backend = AsyncRedisBackend.from_url(server.url)
    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        rounds, callers = 250, 8
        for round_ in range(rounds):
            await admin.script_flush()
            got: list[bool] = []

            async def one(i: int, round_: int = round_, got: list[bool] = got) -> None:
                got.append((await backend.acquire_or_owner(f"r{round_}:{i}", "me", 10)).acquired)

            async with anyio.create_task_group() as group:
                for i in range(callers):
                    group.start_soon(one, i)
            assert got == [True] * callers
    finally:
        await admin.aclose()
        await backend.aclose()
    report(
        f"SCRIPT FLUSH before each of {rounds} async batches ({rounds * callers} calls): 0 errors"
    )
