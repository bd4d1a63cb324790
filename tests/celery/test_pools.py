"""A unique task on every worker pool Celery offers beside prefork: solo, threads, gevent
and eventlet (subprocess workers, ``celery worker --pool=...``).

On each, a run longer than its lease keeps its key by renewal alone (renewal is a thread per
run; under gevent and eventlet, whose monkey-patching makes threads green, a greenlet),
duplicates applied meanwhile return the running holder, the key is freed at the end, and a
new instance runs after. On gevent and eventlet, a body that never yields outlasts its lease
(the limit docs/deployment.md states). The four workers start together and their runs go on
at once (a gevent or eventlet worker alone takes about 5 s to stop: Celery's own warm
shutdown); each pool's test then checks what was seen on it. ``nox -s pools`` runs this
module alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from subprocess import Popen
from typing import Any

import pytest
import redis

from celery_unique.celery.unique import RUN_SEPARATOR
from celery_unique.core.locks import parse_owner
from tests.celery import app as t
from tests.celery.conftest import worker_process
from tests.conftest import lock_key
from tests.helpers import wait_until

#: The pools, and the module of the ``time.sleep`` a task body runs with on each.
SLEEP_OF = {
    "solo": "time",
    "threads": "time",
    "gevent": "gevent.hub",
    "eventlet": "eventlet.greenthread",
}
HOLD = 5.0  # seconds t.pooled is kept running: more than two of its 2 s leases
LEASE = 2.0


def importable(pool: str) -> str | None:
    """Why ``pool`` cannot run on this Python (its package does not import), or ``None``.
    Tried in a fresh interpreter: importing it here could change this session."""
    if pool not in ("gevent", "eventlet"):
        return None
    tried = subprocess.run(
        [sys.executable, "-c", f"import {pool}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if tried.returncode == 0:
        return None
    last = (tried.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{pool} does not import on Python {sys.version_info[:2]} ({last}): pip install {pool}"


@dataclass
class Seen:
    """What one pool's worker did with ``t.pooled(tag)``."""

    first: str = ""
    first_returned: str = ""
    ran_for: float = 0.0
    holders: set[str | None] = field(default_factory=set)  # the key's owner while it ran
    pttls: list[int] = field(default_factory=list)  # the key's PTTL at each look
    duplicates: set[str] = field(default_factory=set)  # what calls during the run returned
    freed: bool = False
    second: str = ""
    second_returned: str = ""
    runs: int = 0
    peak: int = 0
    hog_holders: set[str | None] = field(default_factory=set)  # t.hogs's key while it ran


def exercise(client: redis.Redis, queue: str) -> Seen:
    """Keep ``t.pooled`` running for :data:`HOLD` s on the worker of ``queue``, looking at its
    key and applying duplicates all along, then let it end; then apply it once more."""
    seen, tag = Seen(), uuid.uuid4().hex
    key = lock_key("cut:", t.pooled.unique_key((tag,)))

    def still_running() -> bool:
        # The key is read first, then whether the body still runs: a key seen missing while
        # the body ran really was missing during the run.
        with client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            owner, pttl = pipe.execute()
        if int(client.get(f"running:{tag}") or 0) == 0:
            return False
        seen.holders.add(parse_owner(owner))
        seen.pttls.append(int(pttl))
        return True

    first = t.pooled.apply_async((tag, True), queue=queue)
    seen.first = first.id
    wait_until(lambda: t.runs(tag) == 1)
    started = time.monotonic()
    while time.monotonic() - started < HOLD:  # the body waits for let_go: all during the run
        assert still_running(), "the run ended before it was let go"
        seen.duplicates.add(t.pooled.apply_async((tag,), queue=queue).id)
        time.sleep(0.05)  # a polling interval, not a wait for the event
    t.let_go(tag)
    deadline = time.monotonic() + 60
    while still_running():
        assert time.monotonic() < deadline, "the run never ended"
        time.sleep(0.05)
    seen.ran_for = time.monotonic() - started
    seen.first_returned = first.get(timeout=30)
    seen.freed = bool(wait_until(lambda: not client.exists(key), timeout=10))
    second = t.pooled.apply_async((tag,), queue=queue)
    seen.second, seen.second_returned = second.id, second.get(timeout=30)
    seen.runs, seen.peak = t.runs(tag), t.peak(tag)
    return seen


def holders_while_running(client: redis.Redis, tag: str, key: str) -> set[str | None]:
    """Who held ``key`` at each look while the run of ``tag`` went on (``None``: nobody)."""
    holders: set[str | None] = set()
    wait_until(lambda: t.runs(tag) == 1)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the run never ended"
        owner = client.get(key)  # first, as in exercise()
        if int(client.get(f"running:{tag}") or 0) == 0:
            return holders
        holders.add(parse_owner(owner))
        time.sleep(0.05)  # a polling interval, not a wait for the event


def hog(client: redis.Redis, queue: str) -> set[str | None]:
    """Who held ``t.hogs``'s key while its body held the CPU for 3 s, on a 1 s lease."""
    tag = uuid.uuid4().hex
    key = lock_key("cut:", t.hogs.unique_key((tag,)))
    result = t.hogs.apply_async((tag,), queue=queue)
    holders = holders_while_running(client, tag, key)
    result.get(timeout=30)
    return holders


Worker = AbstractContextManager[tuple[Popen[bytes], str]]


@pytest.fixture(scope="module")
def seen_on(redis_url: str, celery_app: Any) -> Iterator[dict[str, Future[Seen] | str]]:
    """Per pool, what :func:`exercise` saw there (a future), or why the pool cannot run."""
    skipped = {pool: why for pool in SLEEP_OF if (why := importable(pool)) is not None}
    pools = [pool for pool in SLEEP_OF if pool not in skipped]
    started: dict[str, tuple[Worker, str]] = {}

    def start(pool: str) -> tuple[Worker, str]:
        worker = worker_process(redis_url, pool=pool, concurrency=1 if pool == "solo" else 4)
        _, queue = worker.__enter__()
        return worker, queue

    def look(pool: str, queue: str) -> Seen:
        with redis.Redis.from_url(redis_url) as client:
            seen = exercise(client, queue)
            if SLEEP_OF[pool] != "time":  # green pools: a body that never yields
                seen.hog_holders = hog(client, queue)
            return seen

    with ThreadPoolExecutor(max_workers=len(pools)) as threads:
        starting = {pool: threads.submit(start, pool) for pool in pools}
        try:
            for pool, future in starting.items():
                started[pool] = future.result()
            results: dict[str, Future[Seen] | str] = dict(skipped)
            for pool, (_, queue) in started.items():
                results[pool] = threads.submit(look, pool, queue)
            for outcome in results.values():
                if isinstance(outcome, Future):
                    outcome.exception()  # every run over before any worker stops
            yield results
        finally:
            for pool, future in starting.items():  # the ones started, if another failed
                if pool not in started and future.exception() is None:
                    started[pool] = future.result()
            stops = [threads.submit(w.__exit__, None, None, None) for w, _ in started.values()]
            for stop in stops:
                stop.result()


@pytest.mark.parametrize("pool", list(SLEEP_OF))
def test_a_unique_task_keeps_its_key_by_renewal_and_frees_it_on_each_pool(
    pool: str, seen_on: dict[str, Future[Seen] | str]
) -> None:
    outcome = seen_on[pool]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    seen = outcome.result()
    assert seen.first_returned == SLEEP_OF[pool]  # it ran under that pool's patching

    assert seen.ran_for >= HOLD > 2 * LEASE  # only renewal can keep the key that long
    assert None not in seen.holders, "the key expired while its run went on"
    (holder,) = seen.holders
    assert holder is not None and holder.split(RUN_SEPARATOR)[0] == seen.first
    assert RUN_SEPARATOR in holder  # held by the run, on its lease
    assert 0 < max(seen.pttls) <= LEASE * 1000
    rises = [b - a for a, b in zip(seen.pttls, seen.pttls[1:], strict=False) if b > a + 100]
    assert len(rises) >= 2, seen.pttls  # extended again and again while the body ran
    assert seen.duplicates == {seen.first}  # every duplicate returned the running holder

    assert seen.freed  # at the end
    assert seen.second != seen.first
    assert seen.second_returned == SLEEP_OF[pool]
    assert (seen.runs, seen.peak) == (2, 1)


@pytest.mark.parametrize("pool", [pool for pool, sleep in SLEEP_OF.items() if sleep != "time"])
def test_on_a_green_pool_a_body_that_never_yields_loses_its_key(
    pool: str, seen_on: dict[str, Future[Seen] | str]
) -> None:
    """The limit docs/deployment.md states: renewal is a greenlet there, and runs only when
    the body yields; 3 s of CPU on a 1 s lease outlast the key."""
    outcome = seen_on[pool]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    holders = outcome.result().hog_holders
    assert None in holders, holders  # expired while the body ran
