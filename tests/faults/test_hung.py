"""A hung server (SIGSTOP: connections are accepted, nothing answers): every operation gives
BackendUnavailable within its deadline, 2.5 s with the defaults and T + 0.5 s with
``socket_timeout=T``, whether its connection was pooled before the hang or made after."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from celery_unique import BackendUnavailable, UniqueTask
from celery_unique.testing import RedisServer
from tests.conftest import MakeBackend
from tests.faults.conftest import report
from tests.integration.test_failures import OPERATIONS, Operation, failure_times

pytestmark = pytest.mark.anyio

EVERY: dict[str, Operation] = {
    **OPERATIONS,
    "semaphore acquire, non-blocking": lambda b: b.semaphore("s", 2, 10).acquire(blocking=False),
    "semaphore acquire, blocking": lambda b: b.semaphore("s", 2, 10).acquire(),
    "semaphore release": lambda b: b.semaphore("s", 2, 10).release(),
}


@pytest.mark.parametrize(
    ("options", "deadline"),
    [({}, 2.5), ({"socket_timeout": 0.5}, 0.5 + 0.5)],
    ids=["defaults", "T=0.5"],
)
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh"])
async def test_every_operation_on_a_hung_server_gives_up_within_its_deadline(
    make_backend: MakeBackend,
    server: RedisServer,
    flavour: str,
    options: dict[str, Any],
    deadline: float,
    pooled: bool,
) -> None:
    backend = make_backend(server.url, **options)
    if pooled:
        await backend.acquire_or_owner("warm-up", "me", 10)  # connections in the pool now
    server.pause()
    try:
        times = await failure_times(backend, EVERY)
    finally:
        server.resume()
    slowest = max(times.values())
    report(
        f"hung server, {flavour}, {'pooled' if pooled else 'fresh'} connections, "
        f"{'defaults' if not options else 'socket_timeout=0.5'}: {len(times)} operations, "
        f"slowest BackendUnavailable after {slowest:.2f} s (deadline {deadline} s); "
        + ", ".join(f"{name} {took:.2f}" for name, took in times.items())
    )
    assert slowest <= deadline, times


@pytest.mark.parametrize(("options", "deadline"), [({}, 2.5), ({"socket_timeout": 0.5}, 1.0)])
def test_apply_async_on_a_hung_lock_store_gives_up_within_its_deadline_unpublished(
    make_app: Any,
    server: RedisServer,
    redis_url: str,
    options: dict[str, Any],
    deadline: float,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app = make_app(
        broker_url=redis_url, unique_backend_url=server.url, unique_backend_options=options
    )

    @app.task(base=UniqueTask, shared=False, name=f"hung-{uuid.uuid4().hex[:6]}")
    def job(x: int) -> None: ...

    job.apply_async((0,), queue=queue)  # the pool has a connection now
    server.pause()
    try:
        # The first call times out on the pooled connection, the second on a fresh one.
        for connection in ("pooled", "fresh"):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                job.apply_async((1,), queue=queue)
            took = time.monotonic() - started
            report(
                f"hung lock store, {connection} connection: apply_async gave up after "
                f"{took:.2f} s (deadline {deadline} s)"
            )
            assert took <= deadline
    finally:
        server.resume()
    with redis.Redis.from_url(redis_url) as broker:
        assert broker.llen(queue) == 1  # the warm-up's message; nothing while hung
