"""Distributed locks, live: what goes wrong without one, and what celery_unique.Lock guarantees.

Run ``python -m demo.locks`` from the repository root (or ``nox -s demo -- locks``); it
starts a private ``redis-server``
(``celery_unique.testing``) and takes under ten seconds. It shows, in four parts:

1. Without a lock, 8 processes doing read-modify-write increments of one Redis key lose updates.
2. With ``backend.lock("counter", ...)`` around each increment the count is exact, and the
   fencing tokens (``lock.fence``) strictly increase in the order the critical sections ran.
3. A holder killed with SIGKILL keeps the lock only until its TTL runs out, and its stale
   token cannot release the lock of the process that takes over.
4. 200 coroutines on one ``AsyncRedisBackend`` go through an ``async with`` lock one at a time.

Every claim is checked; the exit code is 1 if any check failed, so this is a smoke test too.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from typing import NamedTuple

import redis

from celery_unique import AsyncRedisBackend, RedisBackend
from celery_unique.testing import redis_server
from demo._report import Check, heading, say, summary

# spawn, not fork: every worker is a fresh interpreter with its own connections, like a
# process on another host would be.
CTX = multiprocessing.get_context("spawn")
WORKERS = 8
INCREMENTS = 25  # per worker
# The gap between GET and SET, where real work would sit. 2 ms is enough for the unlocked
# run to lose most of its updates, and short enough that 200 locked increments in turn
# take about a second.
RACE_WINDOW = 0.002
UNLOCKED_KEY = "demo:counter:unlocked"
LOCKED_KEY = "demo:counter:locked"
LOG_KEY = "demo:counter:log"
CRASH_LOCK = "report:42"
CRASH_TTL = 2.0
CRASH_SLACK = 0.5  # on top of the TTL: the waiter's polling and a busy machine
COROUTINES = 200
ASYNC_CONNECTIONS = 8  # far fewer than coroutines: they queue for the pool


# --- parts 1 and 2: processes racing on one counter ------------------------------------------


def increment(client: redis.Redis, key: str) -> int:
    """GET, work, SET: not atomic, so a write by another process in between is lost."""
    value = int(client.get(key) or 0) + 1
    time.sleep(RACE_WINDOW)
    client.set(key, value)
    return value


def count_without_lock(url: str, worker: int, start: Barrier) -> None:
    """Worker of part 1: ``INCREMENTS`` bare increments."""
    client = redis.Redis.from_url(url)
    start.wait()
    for _ in range(INCREMENTS):
        increment(client, UNLOCKED_KEY)


def count_with_lock(url: str, worker: int, start: Barrier) -> None:
    """Worker of part 2: the same increments, each inside the lock, logged with its fence."""
    backend = RedisBackend.from_url(url)
    client: redis.Redis = backend.client
    start.wait()
    for _ in range(INCREMENTS):
        with backend.lock("counter", ttl=5, timeout=10) as lock:
            value = increment(client, LOCKED_KEY)
            # Pushed inside the section, so the log is in the order the sections ran.
            client.rpush(LOG_KEY, f"{lock.fence} {worker} {value}")
        # Other work between increments; without it the releasing process would mostly
        # take the lock straight back while the others sleep between their attempts.
        time.sleep(RACE_WINDOW)


def race(url: str, target: Callable[[str, int, Barrier], None], key: str) -> bool:
    """Run ``target`` in ``WORKERS`` processes released together; whether all exited cleanly."""
    start = CTX.Barrier(WORKERS + 1)
    workers = [
        CTX.Process(target=target, args=(url, n, start), name=f"worker {n}", daemon=True)
        for n in range(WORKERS)
    ]
    for process in workers:
        process.start()
    # Interpreters take a while to start: the barrier lines them up so that they overlap.
    start.wait(timeout=30)
    say(f"{WORKERS} processes started together, {INCREMENTS} increments each")
    with redis.Redis.from_url(url) as client:
        pending = workers
        while pending:
            ended = wait([process.sentinel for process in pending])
            for process in [process for process in pending if process.sentinel in ended]:
                process.join()
                count = int(client.get(key) or 0)
                say(f"  {process.name} finished (exit code {process.exitcode}), counter = {count}")
            pending = [process for process in pending if process.sentinel not in ended]
    return all(process.exitcode == 0 for process in workers)


def without_lock(url: str) -> list[Check]:
    heading("1. without a lock")
    clean = race(url, count_without_lock, UNLOCKED_KEY)
    expected = WORKERS * INCREMENTS
    with redis.Redis.from_url(url) as client:
        actual = int(client.get(UNLOCKED_KEY) or 0)
    lost = expected - actual
    say(f"expected {expected}, got {actual}: {lost} updates lost ({lost / expected:.0%})")
    return [
        Check("without a lock: all processes ran to the end", clean),
        Check(f"without a lock: updates were lost ({actual} of {expected} survived)", lost > 0),
    ]


class Entry(NamedTuple):
    """One critical section of part 2, as logged by the worker that ran it."""

    fence: int
    worker: int
    value: int


def with_lock(url: str) -> list[Check]:
    heading('2. with backend.lock("counter", ttl=5, timeout=10)')
    clean = race(url, count_with_lock, LOCKED_KEY)
    expected = WORKERS * INCREMENTS
    with redis.Redis.from_url(url) as client:
        actual = int(client.get(LOCKED_KEY) or 0)
        log = [Entry(*map(int, raw.split())) for raw in client.lrange(LOG_KEY, 0, -1)]
    say(f"expected {expected}, got {actual}")
    per_worker = Counter(entry.worker for entry in log)
    say("acquisitions per process: " + ", ".join(f"{w}: {per_worker[w]}" for w in range(WORKERS)))
    # Consecutive sections by different processes: the lock really changed hands.
    handoffs = sum(a.worker != b.worker for a, b in itertools.pairwise(log))
    say(f"the lock changed hands between processes {handoffs} times")
    # A fence is max(previous + 1, Redis clock in microseconds), hence the large numbers.
    say(f"fences: {log[0].fence} ... {log[-1].fence}" if log else "fences: none logged")
    return [
        Check("with the lock: all processes ran to the end", clean),
        Check(f"with the lock: the count is exact ({actual} of {expected})", actual == expected),
        Check(
            "with the lock: every section saw the previous one's write",
            [entry.value for entry in log] == list(range(1, expected + 1)),
        ),
        Check(
            "with the lock: fences strictly increase in the order the sections ran",
            len(log) == expected and all(a.fence < b.fence for a, b in itertools.pairwise(log)),
        ),
        Check(
            f"with the lock: each process got its {INCREMENTS} acquisitions",
            all(per_worker[w] == INCREMENTS for w in range(WORKERS)),
        ),
    ]


# --- part 3: a holder that crashes -----------------------------------------------------------


@dataclass(frozen=True)
class Holding:
    """What a process reports once it holds ``CRASH_LOCK``."""

    token: str
    fence: int | None
    waited: float = 0.0


def hold_until_killed(url: str, reports: Queue[Holding]) -> None:
    """Take the lock and hang on to it; the main process kills us before we could release."""
    backend = RedisBackend.from_url(url)
    with backend.lock(CRASH_LOCK, ttl=CRASH_TTL) as lock:
        reports.put(Holding(lock.token, lock.fence))
        time.sleep(60)


def take_over(url: str, go: Event, done: Event, reports: Queue[Holding]) -> None:
    """Block on the lock once told to; hold it until the main process has tried to steal it."""
    backend = RedisBackend.from_url(url)
    backend.client.ping()  # connect now, so the wait measured below is the lock's alone
    go.wait()
    began = time.monotonic()
    with backend.lock(CRASH_LOCK, ttl=10, timeout=10) as lock:
        reports.put(Holding(lock.token, lock.fence, time.monotonic() - began))
        done.wait(timeout=10)


def crashed_holder(url: str) -> list[Check]:
    heading(f'3. a crashed holder of "{CRASH_LOCK}" (ttl={CRASH_TTL:g} s)')
    backend = RedisBackend.from_url(url)
    # A queue each: a put is written by a background thread under a lock shared by all the
    # queue's writers, and a SIGKILL can land before that thread lets go of it.
    held: Queue[Holding] = CTX.Queue()
    taken: Queue[Holding] = CTX.Queue()
    go, done = CTX.Event(), CTX.Event()
    # The successor starts first, so that it is ready and waiting for ``go`` by the crash.
    successor = CTX.Process(target=take_over, args=(url, go, done, taken), daemon=True)
    successor.start()
    holder = CTX.Process(target=hold_until_killed, args=(url, held), daemon=True)
    holder.start()
    dead = held.get(timeout=30)
    say(f"process {holder.pid} holds the lock (fence {dead.fence})")
    holder.kill()
    holder.join()
    say(f"process {holder.pid} killed with SIGKILL while holding it (exit code {holder.exitcode})")
    still_held = backend.lock(CRASH_LOCK, ttl=1).owner() == dead.token
    say(f"right after the crash the dead process still owns the lock: {still_held}")
    go.set()
    say(f"process {successor.pid} now blocks in acquire ...")
    new = taken.get(timeout=30)
    say(f"process {successor.pid} got the lock after {new.waited:.2f} s (fence {new.fence})")
    stale_released = backend.release(CRASH_LOCK, dead.token)
    say(f"backend.release({CRASH_LOCK!r}, <dead token>) -> {stale_released}")
    owner_kept = backend.lock(CRASH_LOCK, ttl=1).owner() == new.token
    say(f"process {successor.pid} still owns the lock: {owner_kept}")
    done.set()
    successor.join(timeout=30)
    say(f"process {successor.pid} released it and exited (exit code {successor.exitcode})")
    backend.close()
    return [
        Check("crash: the lock stayed held after its owner died", still_held),
        Check(
            f"crash: the next process got it {new.waited:.2f} s later (ttl {CRASH_TTL:g} s)",
            new.waited <= CRASH_TTL + CRASH_SLACK,
        ),
        Check("crash: the dead owner's token cannot release the new lock", not stale_released),
        Check("crash: the new owner still holds it after that attempt", owner_kept),
        Check(
            "crash: the new owner's fence is higher than the dead one's",
            (new.fence or 0) > (dead.fence or 0),
        ),
        Check("crash: the new owner released and exited cleanly", successor.exitcode == 0),
    ]


# --- part 4: coroutines ----------------------------------------------------------------------


@dataclass
class Section:
    """What the coroutines see inside the lock."""

    inside: int = 0
    most_inside: int = 0
    runs: int = 0


async def enter(abackend: AsyncRedisBackend, section: Section) -> None:
    async with abackend.lock("shared", ttl=5, timeout=30):
        section.inside += 1
        section.most_inside = max(section.most_inside, section.inside)
        # Yield to the loop while inside: a second coroutine let in would show up here.
        await asyncio.sleep(0.001)
        section.runs += 1
        section.inside -= 1
        if section.runs % 50 == 0:
            say(f"  {section.runs}/{COROUTINES} coroutines through the section")


async def coroutines(url: str) -> list[Check]:
    heading(f'4. {COROUTINES} coroutines, async with abackend.lock("shared"), one backend')
    section = Section()
    async with AsyncRedisBackend.from_url(url, max_connections=ASYNC_CONNECTIONS) as abackend:
        await asyncio.gather(*(enter(abackend, section) for _ in range(COROUTINES)))
    say(
        f"{section.runs} ran the section over {ASYNC_CONNECTIONS} connections; "
        f"at most {section.most_inside} inside at a time"
    )
    return [
        Check(f"async: all {COROUTINES} coroutines ran the section", section.runs == COROUTINES),
        Check("async: never more than one inside at a time", section.most_inside == 1),
    ]


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    with redis_server() as url:
        say(f"private redis-server up at {url}")
        checks = without_lock(url) + with_lock(url) + crashed_holder(url)
        checks += asyncio.run(coroutines(url))
    return summary(checks)


if __name__ == "__main__":
    sys.exit(main())
