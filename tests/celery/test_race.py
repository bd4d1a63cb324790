"""16 OS processes call apply_async with the same arguments at once: one publish, one run."""

from __future__ import annotations

import multiprocessing
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from celery.result import AsyncResult

from tests.celery import app as t

PROCESSES = 16
TRIALS = 12

pytestmark = pytest.mark.usefixtures("worker")


def _caller(
    url: str, tags: list[str], barrier: Barrier, out: Queue[tuple[str, str] | None]
) -> None:
    t.configure(url)
    t.slow.unique_key(("warm-up",))  # connect and resolve settings before the first race
    t.slow.app.connection_for_write().ensure_connection()
    for tag in tags:
        barrier.wait(timeout=60)
        out.put((tag, t.slow.delay(tag, 0.2).id))
    out.put(None)


def test_sixteen_processes_racing_apply_async_publish_and_run_once_per_trial(
    redis_url: str,
) -> None:
    tags = [uuid.uuid4().hex for _ in range(TRIALS)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out: Queue[tuple[str, str] | None] = ctx.Queue()
    callers = [
        ctx.Process(target=_caller, args=(redis_url, tags, barrier, out)) for _ in range(PROCESSES)
    ]
    for caller in callers:
        caller.start()
    ids: dict[str, set[str]] = {tag: set() for tag in tags}
    done = 0
    while done < PROCESSES:
        item = out.get(timeout=120)
        if item is None:
            done += 1
        else:
            ids[item[0]].add(item[1])
    for caller in callers:
        caller.join(30)
        assert caller.exitcode == 0
    # Every caller of a trial got the same task id...
    assert {tag: len(found) for tag, found in ids.items()} == dict.fromkeys(tags, 1)
    for (task_id,) in ids.values():
        AsyncResult(task_id, app=t.app).get(timeout=30)
    # ...and the worker ran each trial exactly once (counted where it ran).
    assert {tag: t.runs(tag) for tag in tags} == dict.fromkeys(tags, 1)
