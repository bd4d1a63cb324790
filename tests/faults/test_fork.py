"""A backend made (and used) before a fork, as Celery's prefork pool forks its children after
the app is loaded: each child works, on connections of its own, never on its parent's."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import uuid
import warnings
from collections.abc import Callable

import pytest

from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.celery import publishers
from celery_unique.testing import RedisServer
from tests.faults.conftest import report

CHILDREN = 4


def connections_received(server: RedisServer) -> int:
    info = str(server.command("INFO", "stats"))
    return int(info.split("total_connections_received:")[1].split()[0])


def sync_child(backend: RedisBackend) -> bool:
    name, token = uuid.uuid4().hex, f"child-{os.getpid()}"
    got = backend.acquire_or_owner(name, token, 10)
    return got.acquired and backend.owner(name) == token and backend.release(name, token)


async def async_use(backend: AsyncRedisBackend) -> bool:
    name, token = uuid.uuid4().hex, f"child-{os.getpid()}"
    got = await backend.acquire_or_owner(name, token, 10)
    return got.acquired and await backend.owner(name) == token


def in_children(how: str, body: Callable[[], bool]) -> list[int]:
    """Run ``body`` in CHILDREN forked processes; their exit codes (0: it returned True)."""

    def child() -> None:
        try:
            # Free now what the fork hooks let go of, as the child's collector may at any
            # moment: freeing a parent's connection must not break it for the parent.
            gc.collect()
            ok = body()
        except BaseException:
            os._exit(2)
        os._exit(0 if ok else 1)

    with warnings.catch_warnings():
        # Python 3.12+ warns of fork() in a process with threads (pytest's, anyio's).
        warnings.simplefilter("ignore", DeprecationWarning)
        if how == "os.fork":
            pids = []
            for _ in range(CHILDREN):
                pid = os.fork()
                if pid == 0:
                    child()
                pids.append(pid)
            return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        context = multiprocessing.get_context("fork")
        processes = [context.Process(target=child) for _ in range(CHILDREN)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        codes = [-1 if process.exitcode is None else process.exitcode for process in processes]
        for process in processes:
            if process.exitcode is None:
                process.kill()  # one that did not end: a failure, not a pass
        return codes


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_sync_backend_made_before_the_fork_works_in_every_child(
    server: RedisServer, how: str
) -> None:
    with RedisBackend.from_url(server.url) as backend:
        assert sync_child(backend)  # the parent has a pooled connection now
        before = connections_received(server)
        assert in_children(how, lambda: sync_child(backend)) == [0] * CHILDREN
        assert connections_received(server) - before >= CHILDREN  # each opened its own
        assert sync_child(backend)  # and the parent's own connection still works
    report(f"fork ({how}), sync: {CHILDREN} children each on a connection of its own, 0 errors")


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_an_async_backend_made_before_the_fork_works_in_every_child(
    server: RedisServer, how: str
) -> None:
    loop = asyncio.new_event_loop()  # the parent's, kept for its own use after the fork
    backend = AsyncRedisBackend.from_url(server.url)
    try:
        assert loop.run_until_complete(async_use(backend))  # a pooled connection, on it
        before = connections_received(server)
        # Each child runs a loop of its own, as it must (the parent's is no use to it).
        assert in_children(how, lambda: asyncio.run(async_use(backend))) == [0] * CHILDREN
        assert connections_received(server) - before >= CHILDREN
        assert loop.run_until_complete(async_use(backend))  # the parent's still works
    finally:
        loop.run_until_complete(backend.aclose())
        loop.close()
    report(f"fork ({how}), async: {CHILDREN} children each on a connection of its own, 0 errors")


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_the_async_apis_publisher_threads_start_afresh_in_a_child(how: str) -> None:
    # The parent's threads are not in the child: its pool of them must not wait for them.
    assert asyncio.run(publishers.run_in_publisher(lambda: os.getpid())) == os.getpid()
    answered = in_children(
        how, lambda: asyncio.run(publishers.run_in_publisher(os.getpid)) == os.getpid()
    )
    assert answered == [0] * CHILDREN
