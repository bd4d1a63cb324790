"""Failovers under a stream of calls: a Sentinel master killed or demoted, a Cluster primary
killed or paused, a slot migrated live. Callers see nothing but BackendUnavailable (each
within its deadline), and everything works again within 10 s of the promotion."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from redis.crc import key_slot

from celery_unique.core.keys import KeySpace
from celery_unique.testing import (
    ClusterServers,
    RedisServer,
    SentinelServers,
    redis_sentinel,
    running_cluster,
    wait_until,
)
from tests.conftest import MakeBackend
from tests.faults.conftest import Outage, auntil_working, operations_on, report, streaming

pytestmark = pytest.mark.anyio

RECOVERY = 10.0  # seconds from the promotion until every kind of call works again
CALLERS = 4


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Sentinel and Cluster run on redis-py's clients (tests/integration checks that trio
    refuses them up front)."""
    return str(request.param)


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelServers]:
    with redis_sentinel(replicas=1, sentinels=3) as setup:
        yield setup


async def landed_on(backend: Any, server: RedisServer, since: float) -> float:
    """Seconds from ``since`` until a lock taken through ``backend`` is on ``server``."""
    with redis.Redis.from_url(server.url) as direct:
        while True:
            name = uuid.uuid4().hex
            if (await backend.acquire_or_owner(name, "probe", 30)).acquired:
                if direct.exists(KeySpace(backend.key_prefix).lock(name)):
                    return time.monotonic() - since
            assert time.monotonic() - since < RECOVERY, "still writing elsewhere"
            await anyio.sleep(0.02)


async def recovered(outage: Outage, operations: Any, since: float) -> float:
    """Seconds from ``since`` until every operation has worked once more."""
    for operation in operations.values():
        await auntil_working(outage, operation, RECOVERY)
    return time.monotonic() - since


@pytest.mark.parametrize("how", ["kill", "SENTINEL FAILOVER"])
async def test_a_sentinel_failover(
    make_backend: MakeBackend, sentinel_setup: SentinelServers, flavour: str, how: str
) -> None:
    backend = make_backend(sentinel_setup.url, master_name="mymaster")
    lock = backend.lock("held", ttl=60)
    assert await lock.acquire(blocking=False)
    fence_before = lock.fence
    operations = operations_on(backend, "job")
    outage, stop = Outage(deadline=2.5), anyio.Event()
    async with anyio.create_task_group() as group:
        for _ in range(CALLERS):
            group.start_soon(streaming, outage, operations, stop)
        started = time.monotonic()
        if how == "kill":
            sentinel_setup.master.kill()
        else:  # the old master is demoted, not dead: its connections must be let go
            sentinel_setup.sentinels[0].command("SENTINEL", "FAILOVER", "mymaster")
        promoted = await anyio.to_thread.run_sync(sentinel_setup.wait_for_failover)
        promoted_at = time.monotonic()
        took = await recovered(outage, operations, promoted_at)
        since = promoted_at
        if how != "kill":
            # The old master runs on, a master still, until the sentinels demote it (and
            # close its clients' connections): what callers write meanwhile is lost.
            old = sentinel_setup.master
            await anyio.to_thread.run_sync(
                lambda: wait_until("the demotion", lambda: "slave" in str(old.command("ROLE")), 30)
            )
            since = time.monotonic()
        landed = await landed_on(backend, promoted, since)
        stop.set()
    assert promoted is sentinel_setup.replicas[0]
    after = "the promotion" if how == "kill" else "the old master's demotion"
    report(
        f"Sentinel failover by {how}, {flavour}: promoted {promoted_at - started:.2f} s after; "
        f"every call working {took:.2f} s after the promotion, and writing to the promoted "
        f"server {landed:.2f} s after {after} ({since - promoted_at:.2f} s after the promotion); "
        f"{outage.errors} BackendUnavailable of {outage.calls} calls, no other error "
        f"(slowest call {outage.slowest:.2f} s)"
    )
    assert took <= RECOVERY and landed <= RECOVERY
    # A new lock on the promoted master gets a fence above any the old master gave out.
    relock = backend.lock("fenced", ttl=10)
    assert await relock.acquire(blocking=False)
    assert relock.fence is not None and fence_before is not None
    assert relock.fence > fence_before


@pytest.fixture
def cluster() -> Iterator[ClusterServers]:
    with running_cluster(3, 1, node_timeout_ms=1000) as running:
        yield running


def slot_of(prefix: str, name: str) -> int:
    return key_slot(KeySpace(prefix).lock(name).encode())


async def test_a_cluster_primary_killed(
    make_backend: MakeBackend, cluster: ClusterServers, flavour: str, prefix: str
) -> None:
    backend = make_backend(cluster.url, cluster=True)
    operations = operations_on(backend, "job")
    await auntil_working(Outage(2.5), operations["lock"], 5)
    primary = cluster.node_for_slot(slot_of(prefix, "job"))
    outage, stop = Outage(deadline=2.5), anyio.Event()
    async with anyio.create_task_group() as group:
        for _ in range(CALLERS):
            group.start_soon(streaming, outage, operations, stop)
        started = time.monotonic()
        primary.kill()
        await anyio.to_thread.run_sync(cluster.wait_ok)  # its replica has taken over
        promoted_at = time.monotonic()
        took = await recovered(outage, operations, promoted_at)
        stop.set()
    assert cluster.node_for_slot(slot_of(prefix, "job")) is not primary
    report(
        f"Cluster primary killed, {flavour}: replica promoted {promoted_at - started:.2f} s "
        f"after; every call working {took:.2f} s after the promotion; {outage.errors} "
        f"BackendUnavailable of {outage.calls} calls, no other error "
        f"(slowest call {outage.slowest:.2f} s)"
    )
    assert took <= RECOVERY


async def test_a_live_slot_migration(
    make_backend: MakeBackend, cluster: ClusterServers, flavour: str, prefix: str
) -> None:
    backend = make_backend(cluster.url, cluster=True)
    held = backend.lock("job", ttl=60)
    assert await held.acquire(blocking=False)
    semaphore = backend.semaphore("job", limit=5, ttl=60)
    assert await semaphore.acquire(blocking=False)
    slot = slot_of(prefix, "job")
    source = cluster.node_for_slot(slot)
    target = next(node for node in cluster.primaries() if node is not source)
    source_id, target_id = (str(n.command("CLUSTER", "MYID")) for n in (source, target))
    operations = operations_on(backend, "job")
    outage, stop = Outage(deadline=2.5), anyio.Event()

    async def calls(count: int) -> None:  # let the callers meet each state of the slot
        assert await anyio.to_thread.run_sync(outage.wait_calls, count)

    async with anyio.create_task_group() as group:
        for _ in range(CALLERS):
            group.start_soon(streaming, outage, operations, stop)
        await calls(20)
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        await calls(50)  # ASK for keys no longer (or not yet) on the source
        moved = 0
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            assert isinstance(keys, list)
            names = [str(key) for key in keys]
            source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *names)
            moved += len(keys)
            await calls(20)
        for node in [
            target,
            source,
            *(n for n in cluster.primaries() if n not in (source, target)),
        ]:
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await calls(50)  # MOVED: the clients learn the new owner
        stop.set()
    assert cluster.node_for_slot(slot) is target and moved >= 2
    assert await held.owner() == held.token  # the lock moved with its slot, still held
    await semaphore.extend()  # and the semaphore's slot too (LockNotOwnedError if lost)
    for operation in operations.values():
        await auntil_working(outage, operation, RECOVERY)
    report(
        f"live slot migration, {flavour}: {moved} keys moved under {outage.calls} calls; "
        f"{outage.errors} BackendUnavailable, no other error (slowest call {outage.slowest:.2f} s)"
    )


@pytest.mark.parametrize(
    ("options", "deadline"), [({}, 2.5), ({"socket_timeout": 0.5}, 1.0)], ids=["defaults", "T=0.5"]
)
async def test_a_paused_cluster_primary_keeps_every_deadline(
    make_backend: MakeBackend,
    cluster: ClusterServers,
    flavour: str,
    prefix: str,
    options: dict[str, Any],
    deadline: float,
) -> None:
    backend = make_backend(cluster.url, cluster=True, **options)
    operations = operations_on(backend, "job")
    await auntil_working(Outage(deadline), operations["lock"], 5)
    primary = cluster.node_for_slot(slot_of(prefix, "job"))
    primary.pause()
    times: dict[str, float] = {}
    try:
        outage = Outage(deadline=deadline)

        async def timed(name: str) -> None:
            started = time.monotonic()
            assert not await outage.acall(operations[name])
            times[name] = time.monotonic() - started

        async with anyio.create_task_group() as group:
            for name in operations:
                group.start_soon(timed, name)
    finally:
        primary.resume()
    setting = "defaults" if not options else "socket_timeout=0.5"
    report(
        f"Cluster primary paused, {flavour}, {setting}: "
        f"slowest BackendUnavailable after {max(times.values()):.2f} s (deadline {deadline} s)"
    )
    assert max(times.values()) <= deadline
