"""on_duplicate="replace" (the newest call wins; a trailing debounce with countdown) and
aapply_async/adelay for async code, through a real worker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis

from celery_unique import UniqueTask
from celery_unique.celery import publishers
from celery_unique.celery.store import backends
from tests.celery import app as t
from tests.celery.conftest import MakeApp
from tests.conftest import lock_owner
from tests.helpers import async_wait_until, wait_until
from tests.proxy import Proxy

pytestmark = [pytest.mark.usefixtures("worker")]


# -- replace ----------------------------------------------------------------------------------


def test_a_burst_of_calls_with_a_countdown_runs_only_the_last() -> None:
    key, tag = uuid.uuid4().hex, uuid.uuid4().hex
    calls = [t.debounced.apply_async((key, n, tag), countdown=1.0) for n in range(5)]
    assert len({call.id for call in calls}) == 5  # each took the place of the one before
    assert calls[-1].get(timeout=30) == 4  # the newest arguments won
    for replaced in calls[:-1]:
        assert replaced.state == "REVOKED"
    # The replaced messages were delivered too (a worker held them until their ETA): they
    # are over once the last one's run is, and none of them ran.
    assert t.runs(tag) == 1
    assert t.values(tag) == [4]


def test_while_the_holder_runs_a_replacing_call_returns_it() -> None:
    key, tag = uuid.uuid4().hex, uuid.uuid4().hex
    first = t.debounced.delay(key, 1, tag, seconds=1.0)
    wait_until(lambda: t.runs(tag) >= 1)
    again = t.debounced.delay(key, 2, tag)
    assert again.id == first.id  # a running holder is not replaced
    assert first.get(timeout=30) == 1
    assert t.values(tag) == [1]


# -- aapply_async -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call that went to a worker thread from the async API (recorded, then run)."""
    calls: list[Any] = []
    real = publishers.run_in_publisher

    async def recorded(function: Any) -> Any:
        calls.append(function)
        return await real(function)

    monkeypatch.setattr(publishers, "run_in_publisher", recorded)
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_adelay_publishes_off_the_loop_and_a_duplicate_touches_no_thread(
    threads: list[Any],
) -> None:
    tag = uuid.uuid4().hex
    try:
        first = await t.slow.adelay(tag, 0.5)
        assert len(threads) == 1  # the publish, in a worker thread
        duplicates: list[Any] = []

        async def duplicate() -> None:
            duplicates.append(await t.slow.adelay(tag, 0.5))

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(duplicate)
        assert {d.id for d in duplicates} == {first.id}
        assert len(threads) == 1  # no duplicate went to a thread (nor to the broker)
        assert await anyio.to_thread.run_sync(lambda: first.get(timeout=30)) == tag
        assert t.runs(tag) == 1
    finally:
        await backends.aclose(t.app)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_aapply_async_raises_for_a_duplicate_like_apply_async() -> None:
    from celery_unique import DuplicateTaskError

    tag = uuid.uuid4().hex
    try:
        first = await t.raising.aapply_async((tag,))
        with pytest.raises(DuplicateTaskError) as caught:
            await t.raising.aapply_async((tag,))
        assert caught.value.task_id == first.id
        await anyio.to_thread.run_sync(lambda: first.get(timeout=30))
    finally:
        await backends.aclose(t.app)


@pytest.mark.anyio
async def test_a_call_cancelled_before_its_publish_frees_its_key(
    make_app: MakeApp, redis_url: str, proxy: Proxy, client: redis.Redis, threads: list[Any]
) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}:"
    app = make_app(broker_url=redis_url, unique_backend_url=proxy.url, unique_key_prefix=prefix)

    @app.task(base=UniqueTask, shared=False, name=f"cancelled-{uuid.uuid4().hex[:6]}")
    def job(x: int) -> None: ...

    try:
        await job.aapply_async((0,), queue="nowhere")  # connected, so the next is one trip
        proxy.hold_replies()  # the acquire reaches Redis at once; its answer waits
        call = asyncio.get_running_loop().create_task(job.aapply_async((1,), queue="nowhere"))
        name = job.unique_key((1,))
        await async_wait_until(lambda: lock_owner(client, prefix, name))
        call.cancel()  # the key is taken in Redis; the publish has not begun
        proxy.pass_replies()
        await asyncio.wait([call])
        assert call.cancelled()
        assert lock_owner(client, prefix, name) is None  # freed before the cancel completed
        assert len(threads) == 1  # the first call's publish: this one never went to a thread
    finally:
        await backends.aclose(app)
