"""Revoke through real workers: a revoked queued instance frees its key at once, before any
worker reaches its message (prefetched by a busy worker, or still in the queue behind a
backlog), and never runs; a running one keeps its key unless terminated (the terminated case:
``test_worker_death.py``). On Celery before 5.6.2 the worker learns to mark the result
(``celery_unique.celery.revokes``): CI's floor session runs this file there."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
from celery.result import AsyncResult

from celery_unique.celery import revokes
from tests.celery import app as t
from tests.celery.conftest import worker_process
from tests.conftest import lock_owner
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("celery_app")

#: The promise: a new call gets a new id within this many seconds of the revoke.
AT_ONCE = 1.0


@pytest.fixture(scope="module")
def queue(redis_url: str, celery_app: Any) -> Iterator[str]:
    """One prefork worker, one process (prefetching 4 messages), on a queue of its own."""
    with worker_process(redis_url, concurrency=1) as (_, name):
        yield name


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def node(queue: str) -> str:
    """The worker's node name (``worker_process`` names it after its queue)."""
    return f"{queue}@{socket.gethostname()}"


def owner(client: redis.Redis, tag: str) -> str | None:
    return lock_owner(client, "cut:", t.slow.unique_key((tag, 0.0)))


def in_queue(client: redis.Redis, queue: str, task_id: str) -> bool:
    """Whether the message of ``task_id`` is still in the broker's list: no worker has it."""
    return any(task_id.encode() in message for message in client.lrange(queue, 0, -1))


@contextmanager
def occupied(queue: str) -> Iterator[Callable[[], None]]:
    """Keep the worker's one process busy until the function given is called (at the end of
    the block at the latest, so that a failed test leaves the worker free for the next)."""
    busy = uuid.uuid4().hex
    t.gated.apply_async((busy,), queue=queue)
    wait_until(lambda: t.runs(busy) == 1)
    opened = False

    def release() -> None:
        nonlocal opened
        if not opened:
            opened = True
            t.open_gate(busy)

    try:
        yield release
    finally:
        release()


def new_call_within(seconds: float, call: Callable[[], AsyncResult], old: str) -> AsyncResult:
    """Call until the answer is not ``old``'s id; fail if that takes ``seconds`` or more."""
    deadline = time.monotonic() + seconds
    while True:
        result = call()
        if result.id != old:
            return result
        assert time.monotonic() < deadline, f"still answered with the revoked {old}"
        time.sleep(0.01)


def revoke_by(how: str, result: AsyncResult) -> None:
    if how == "AsyncResult.revoke":
        result.revoke()
    else:
        t.app.control.revoke(result.id)


@pytest.mark.parametrize("how", ["AsyncResult.revoke", "control.revoke"])
@pytest.mark.parametrize("where", ["prefetched", "behind a backlog"])
def test_revoking_a_queued_instance_frees_its_key_at_once(
    queue: str, client: redis.Redis, how: str, where: str
) -> None:
    tag, later = uuid.uuid4().hex, f"later-{uuid.uuid4().hex[:8]}"
    with occupied(queue) as release:
        for _ in range(8 if where == "behind a backlog" else 0):
            t.slow.apply_async((uuid.uuid4().hex, 0.0), queue=queue)
        revoked = t.slow.apply_async((tag, 0.0), queue=queue)
        sentinel = t.slow.apply_async((uuid.uuid4().hex, 0.0), queue=queue)  # reached after it
        if where == "prefetched":
            wait_until(lambda: client.llen(queue) == 0)  # the worker holds both messages
        assert t.slow.apply_async((tag, 0.0), queue=queue).id == revoked.id  # a duplicate

        revoke_by(how, revoked)
        # The new instance goes to a queue no worker reads yet: it keeps its key while the
        # revoked message is reached, which must neither run nor touch that key.
        new = new_call_within(
            AT_ONCE, lambda: t.slow.apply_async((tag, 0.0), queue=later), revoked.id
        )
        assert owner(client, tag) == new.id
        assert in_queue(client, queue, revoked.id) == (where == "behind a backlog")
        assert t.runs(tag) == 0 and revoked.state == "REVOKED"
        release()
    sentinel.get(timeout=30)  # the revoked message was reached (one process, in order)
    assert t.runs(tag) == 0
    assert owner(client, tag) == new.id
    worker = [node(queue)]
    t.app.control.add_consumer(later, destination=worker, reply=True, timeout=10)
    try:
        assert new.get(timeout=30) == tag
    finally:
        t.app.control.cancel_consumer(later, destination=worker, reply=True, timeout=10)
    assert t.runs(tag) == 1 and revoked.state == "REVOKED"
    wait_until(lambda: owner(client, tag) is None)


@pytest.mark.anyio
async def test_an_async_call_also_takes_a_revoked_holders_place(queue: str) -> None:
    tag = uuid.uuid4().hex
    with occupied(queue):
        revoked = await t.slow.aapply_async((tag, 0.0), queue=queue)
        assert (await t.slow.aapply_async((tag, 0.0), queue=queue)).id == revoked.id
        revoked.revoke()
        deadline = time.monotonic() + AT_ONCE
        while (new := await t.slow.aapply_async((tag, 0.0), queue=queue)).id == revoked.id:
            assert time.monotonic() < deadline, f"still answered with the revoked {revoked.id}"
            await anyio.sleep(0.01)
    assert await anyio.to_thread.run_sync(lambda: new.get(timeout=30)) == tag
    assert t.runs(tag) == 1 and revoked.state == "REVOKED"


def test_a_running_instance_keeps_its_key_when_revoked_without_terminate(
    queue: str, client: redis.Redis
) -> None:
    tag = uuid.uuid4().hex
    running = t.gated.apply_async((tag,), queue=queue)
    try:
        wait_until(lambda: t.runs(tag) == 1)
        worker = [node(queue)]
        replies = t.app.control.revoke(running.id, destination=worker, reply=True, timeout=10)
        assert replies, "the worker did not answer the revoke"
        # Answered with the running holder however often asked: its run keeps the key.
        for _ in range(20):
            assert t.gated.apply_async((tag,), queue=queue).id == running.id
            time.sleep(0.01)
    finally:
        t.open_gate(tag)
    # Its result is not waited for: Celery 5.6.2 and 5.6.3 mark even a running id REVOKED.
    wait_until(lambda: lock_owner(client, "cut:", t.gated.unique_key((tag,))) is None)
    assert t.runs(tag) == 1


def test_a_worker_wrapped_as_on_an_older_celery_answers_and_marks_the_revoke(
    redis_url: str,
) -> None:
    """The revoke command as ``revokes.install`` wraps it, on whatever Celery is installed:
    it still answers (Celery's own reply) and the queued instance's key is free at once."""
    tag = uuid.uuid4().hex
    forced = {"CELERY_UNIQUE_TEST_MARK_REVOKES": "1"}
    with worker_process(redis_url, env=forced) as (_, name):
        with occupied(name):
            revoked = t.slow.apply_async((tag, 0.0), queue=name)
            worker = [node(name)]
            replies = t.app.control.revoke(revoked.id, destination=worker, reply=True, timeout=10)
            assert [set(reply[worker[0]]) for reply in replies] == [{"ok"}]
            new = new_call_within(
                AT_ONCE, lambda: t.slow.apply_async((tag, 0.0), queue=name), revoked.id
            )
        assert new.get(timeout=30) == tag
    assert t.runs(tag) == 1 and revoked.state == "REVOKED"


# -- marking a revoke, as workers of Celery before 5.6.2 learn to -----------------------------


def test_the_version_from_which_celery_marks_revokes_itself() -> None:
    assert not revokes.marks_at_once((5, 5, 3))
    assert not revokes.marks_at_once((5, 6, 1))
    assert revokes.marks_at_once((5, 6, 2))
    assert revokes.marks_at_once((5, 7, 0, "final", ""))


def test_only_an_instance_that_has_not_started_is_marked_revoked() -> None:
    backend = t.app.backend
    queued, running, done, started = (uuid.uuid4().hex for _ in range(4))
    backend.store_result(done, 42, "SUCCESS")
    backend.store_result(started, None, "STARTED")
    marked = revokes.mark_revoked(t.app, [queued, running, done, started], running={running})
    assert marked == [queued]
    states = [backend.get_state(one) for one in (queued, running, done, started)]
    assert states == ["REVOKED", "PENDING", "SUCCESS", "STARTED"]
