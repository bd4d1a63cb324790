"""Fleet-wide concurrency, live: at most 2 partner calls at once, and one queued plus one running.

Run ``python -m demo.concurrency`` from the repository root (or ``nox -s demo -- concurrency``).
It starts a private ``redis-server`` (``celery_unique.testing``) and two Celery workers on
it, ``alpha`` and ``bravo`` (``celery -A demo.concurrency worker -n alpha@%h``, prefork,
2 processes each), stops them all at the end, and takes about 15 seconds. It shows:

1. 16 calls of ``call_partner_api(n)``, a 0.5 s ``RateLimitedTask`` with
   ``concurrency_limit=2`` (the partner allows 2 connections, whichever worker opens them),
   enqueued at once (after 2 warm-up calls, from which the limit learns how long a call
   takes). Every run records its start and end (Redis ``TIME``, one clock for all processes)
   and its worker; a line every 0.25 s shows how many run at once, fleet-wide and per worker:
   never more than 2, though 4 pool processes are free. A run over the limit is not failed:
   it is deferred (same id, no retry used) to its turn in a first-come-first-served queue,
   turns spaced by how long calls typically take, so the waiting runs come back one after
   another, each deferred once or a few times, not as a herd polling for a slot. Every call
   succeeds.
   The contrast: the same call without the limit runs 4 at once, Celery's own concurrency
   (``--concurrency=2`` on each of two workers) being counted per worker.
2. ``rebuild_search_index(customer_id)``, a 1.5 s ``UniqueTask`` with
   ``unique_until="started", unique_while_running=True, unique_on=["customer_id"]``, which
   records the catalogue version it read when it started. Call 1 starts; while it runs the
   catalogue changes and call 2 is queued under a new id; further calls are duplicates of
   call 2, which starts only once call 1 has ended, and indexes the change. The contrast:
   with the default ``unique_until="executed"`` the call made during the run is a duplicate
   of the running instance, and the change is not indexed by anyone.

Every claim is checked; the exit code is 1 if any check failed, so this is a smoke test too.
This module is also the workers' app: they import it as ``demo.concurrency``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery import Celery, Task
from celery.result import AsyncResult

from celery_unique import RateLimitedTask, RedisBackend, UniqueTask
from celery_unique.celery.admin import held_locks
from celery_unique.signals import task_deferred
from demo._report import Check, heading, say
from demo._worker import announce_readiness, records, run, run_fleet, wait_until

# The workers run in other processes and learn the broker from their environment.
REDIS_URL_ENV = "CELERY_UNIQUE_CONCURRENCY_DEMO_REDIS_URL"
KEY_PREFIX = "demo:"
NODES = ("alpha", "bravo")
CONCURRENCY = 2  # pool processes per worker
PROCESSES = CONCURRENCY * len(NODES)
LIMIT = 2  # the partner's connections, fleet-wide
PARTNER = "partner-api"  # the concurrency key: one count for every call
CALLS = 16
CALL_SECONDS = 0.5
FREE_CALLS = 12  # the contrast: the same call without the limit
TICK = 0.25  # seconds between live lines
# A herd would bring all 14 waiting runs back at once; the queue brings them back one turn
# (a quarter second) after another: two or three arrive within 0.1 s at most.
CROWD_WINDOW = 0.1
CROWD_BOUND = 4
REBUILD_SECONDS = 1.5
CUSTOMER = 42
DUPLICATES = 3  # calls made after call 2 while call 1 runs

# What happens, recorded in Redis so that every process adds to it.
RUNS = "demo:runs"  # one JSON record per finished run of call_partner_api
FREE_RUNS = "demo:free-runs"  # the same for the call without the limit
RUNNING = "demo:running"  # a hash: node -> runs of call_partner_api in progress there
DEFERRALS = "demo:deferrals"  # one JSON record per task_deferred signal, any task
REBUILDS = "demo:rebuilds"  # one JSON record per start or end of a rebuild

# --- the Celery app: the workers import this module and find it here -----------------------

app = Celery("celery_unique_concurrency_demo")
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    unique_key_prefix=KEY_PREFIX,
    # A worker reserves as many messages as it has processes, not four times as many: the
    # calls spread over both workers rather than the first to poll taking 8 of them, so the
    # limit is tried from both at once.
    worker_prefetch_multiplier=1,
)


def configure(url: str) -> None:
    """Point the app at the demo's Redis: broker, results, locks and limits."""
    app.conf.update(broker_url=url, result_backend=url)


if os.environ.get(REDIS_URL_ENV):
    configure(os.environ[REDIS_URL_ENV])


def store() -> redis.Redis:
    """This process's client for the demo's records."""
    return records(app)


def redis_now_us(client: redis.Redis) -> int:
    """Redis's clock, in microseconds: one clock for every process of the demo."""
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


@dataclass(frozen=True)
class Run:
    """One execution, as the worker that ran it recorded it."""

    n: int
    task_id: str
    start_us: int  # Redis TIME
    end_us: int
    node: str  # the worker's name, alpha@host
    pid: int  # the pool process that ran it

    @property
    def worker(self) -> str:
        return worker_of(self.node)


def worker_of(node: str) -> str:
    """``alpha`` for ``alpha@host``."""
    return node.partition("@")[0]


def partner_call(self: Task, key: str, n: int) -> int:
    """The body of both partner calls: hold a connection for a while, recorded in ``key``."""
    client = store()
    node = self.request.hostname
    client.hincrby(RUNNING, node, 1)
    start = redis_now_us(client)
    try:
        time.sleep(CALL_SECONDS)
    finally:
        end = redis_now_us(client)
        client.hincrby(RUNNING, node, -1)
        run = Run(n, self.request.id, start, end, node, os.getpid())
        client.rpush(key, json.dumps(asdict(run)))
    # 0 however often it was deferred: a deferral is not a retry.
    return int(self.request.retries)


# Names are explicit: the demo knows this module as __main__, the workers as
# demo.concurrency, and unique keys start with the task's name.
@app.task(
    base=RateLimitedTask,
    bind=True,
    name="demo.call_partner_api",
    concurrency_limit=LIMIT,
    concurrency_key=lambda n: PARTNER,
)
def call_partner_api(self: Task, n: int) -> int:
    """A call to a partner that allows 2 connections at once, from the whole fleet."""
    return partner_call(self, RUNS, n)


@app.task(bind=True, name="demo.call_partner_api_unlimited")
def call_partner_api_unlimited(self: Task, n: int) -> int:
    """The same call limited only by Celery's own concurrency, which each worker counts."""
    return partner_call(self, FREE_RUNS, n)


@dataclass(frozen=True)
class Mark:
    """The start or the end of a rebuild, and the catalogue version it indexes."""

    what: str  # "start" or "end"
    task: str
    task_id: str
    at_us: int
    node: str
    version: int


def catalogue(customer_id: int) -> str:
    """The key of a customer's catalogue version: what a rebuild indexes."""
    return f"demo:catalogue:{customer_id}"


def rebuild(self: Task, customer_id: int) -> int:
    """The body of both rebuilds: read the catalogue at the start, index it for a while."""
    client = store()

    def mark(what: str, version: int) -> None:
        at = redis_now_us(client)
        found = Mark(what, self.name, self.request.id, at, self.request.hostname, version)
        client.rpush(REBUILDS, json.dumps(asdict(found)))

    version = int(client.get(catalogue(customer_id)) or 0)
    mark("start", version)
    time.sleep(REBUILD_SECONDS)
    mark("end", version)
    return version


@app.task(
    base=UniqueTask,
    bind=True,
    name="demo.rebuild_search_index",
    unique_on=["customer_id"],
    unique_until="started",
    unique_while_running=True,
)
def rebuild_search_index(self: Task, customer_id: int) -> int:
    """One queued and one running per customer: a change made during a run is not lost."""
    return rebuild(self, customer_id)


@app.task(
    base=UniqueTask,
    bind=True,
    name="demo.rebuild_search_index_until_executed",
    unique_on=["customer_id"],
)
def rebuild_until_executed(self: Task, customer_id: int) -> int:
    """The contrast: one instance per customer, queued or running (``unique_until="executed"``)."""
    return rebuild(self, customer_id)


@dataclass(frozen=True)
class Deferral:
    """A run put back for later, as ``task_deferred`` told the worker."""

    task: str
    task_id: str
    reason: str
    countdown: float
    at_us: int
    node: str


@task_deferred.connect(weak=False, dispatch_uid="demo.record_deferral")
def _record_deferral(
    sender: Any = None, task_id: str = "", reason: str = "", countdown: float = 0.0, **_: Any
) -> None:
    # Sent in the pool process that deferred the run, just before it re-publishes it.
    client = store()
    name, node = str(getattr(sender, "name", sender)), str(sender.request.hostname)
    found = Deferral(name, task_id, reason, countdown, redis_now_us(client), node)
    client.rpush(DEFERRALS, json.dumps(asdict(found)))


announce_readiness(store)


# --- measuring -----------------------------------------------------------------------------


def runs_of(client: redis.Redis, key: str) -> list[Run]:
    runs = (Run(**json.loads(raw)) for raw in client.lrange(key, 0, -1))
    return sorted(runs, key=lambda run: run.start_us)


def deferrals_of(client: redis.Redis, task: Task) -> list[Deferral]:
    found = (Deferral(**json.loads(raw)) for raw in client.lrange(DEFERRALS, 0, -1))
    return [deferral for deferral in found if deferral.task == task.name]


def marks_of(client: redis.Redis, task: Task) -> list[Mark]:
    found = (Mark(**json.loads(raw)) for raw in client.lrange(REBUILDS, 0, -1))
    return [mark for mark in found if mark.task == task.name]


def peak(runs: Sequence[Run], worker: str | None = None) -> int:
    """The most runs in progress at one moment (an end before a start at the same time)."""
    mine = [run for run in runs if worker is None or run.worker == worker]
    events = sorted([(r.start_us, 1) for r in mine] + [(r.end_us, -1) for r in mine])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def at_once(runs: Sequence[Run]) -> str:
    """The most at once on each worker."""
    return ", ".join(f"{node} {peak(runs, node)}" for node in NODES)


def by_worker(counts: Counter[str]) -> str:
    return ", ".join(f"{node} {counts[node]}" for node in NODES)


def side_by_side(runs: Sequence[Run]) -> float:
    """Seconds during which every worker was running a call."""
    events = sorted(
        [(r.start_us, 1, r.worker) for r in runs] + [(r.end_us, -1, r.worker) for r in runs]
    )
    now: Counter[str] = Counter()
    total, since = 0, 0
    for at, step, worker in events:
        if all(now[node] for node in NODES):
            total += at - since
        now[worker] += step
        since = at
    return total / 1e6


def busy_for(runs: Sequence[Run], count: int) -> float:
    """Seconds during which at least ``count`` runs were in progress."""
    events = sorted([(r.start_us, 1) for r in runs] + [(r.end_us, -1) for r in runs])
    now, since, total = 0, 0, 0
    for at, step in events:
        if now >= count and now + step < count:
            total += at - since
        if now < count <= now + step:
            since = at
        now += step
    return total / 1e6


def results_of(results: Sequence[AsyncResult], expected: Sequence[Any]) -> bool:
    """Whether every call succeeded, with the expected answer."""
    try:
        return [result.get(timeout=30) for result in results] == list(expected)
    except Exception as error:  # a failed call, or one that never ran
        say(f"a call did not succeed: {error!r}")
        return False


@contextmanager
def enqueued(task: Task, count: int) -> Iterator[list[AsyncResult]]:
    """``task.delay(n)`` for n below ``count``, all at once; their results, for a while.

    A result unsubscribes from Redis when it is collected: dropped on the way out, while
    Redis still runs (after an interruption the traceback would keep them past it).
    """
    results = [task.delay(n) for n in range(count)]
    try:
        yield results
    finally:
        results.clear()


def short(task_id: str) -> str:
    return task_id[:8]


# --- part 1: a concurrency limit held across two workers -----------------------------------


def bar(running: int) -> str:
    """The fleet's pool processes, those running a call filled in."""
    return "■" * running + "□" * max(0, PROCESSES - running)


def watch_calls(client: redis.Redis, workers: Sequence[subprocess.Popen[bytes]]) -> None:
    """A line per tick until every call has ended: what runs now, fleet-wide and per worker."""
    started = time.monotonic()
    deadline = started + 60
    tick = 0
    while True:
        pipe = client.pipeline()
        pipe.hgetall(RUNNING)
        pipe.llen(RUNS)
        pipe.llen(DEFERRALS)
        running_raw, done, deferred = pipe.execute()
        running = Counter({worker_of(node): int(n) for node, n in running_raw.items()})
        now = running.total()
        say(
            f"+{tick * TICK:4.2f} s  running {now} {bar(now)} ({by_worker(running)}) | "
            f"done {done:2}/{CALLS} | waiting {CALLS - done - now:2} | deferrals {deferred:2}"
        )
        if done >= CALLS:
            return
        if time.monotonic() > deadline:
            say("gave up waiting for every call to end")
            return
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"a worker (pid {worker.pid}) exited with {worker.returncode}")
        tick += 1
        time.sleep(max(0.0, started + tick * TICK - time.monotonic()))


def holders(backend: RedisBackend) -> int:
    return backend.semaphore(PARTNER, limit=LIMIT, ttl=1).holders()


def typical_hold(client: redis.Redis, backend: RedisBackend) -> float | None:
    """How long a slot is typically held, as the semaphore learnt it from the releases."""
    raw = client.get(backend.keys.semaphore_queue(PARTNER)[2])
    return None if raw is None else int(raw) / 1000


def concurrency_limit(
    client: redis.Redis, backend: RedisBackend, workers: Sequence[subprocess.Popen[bytes]]
) -> list[Check]:
    heading(
        f"1. {CALLS} calls of call_partner_api ({CALL_SECONDS:g} s each), "
        f"concurrency_limit={LIMIT}, enqueued at once on {len(NODES)} workers x {CONCURRENCY}"
    )
    # The queue spaces turns by how long a slot is typically held, learnt from releases
    # (1 s assumed before the first): a fleet that has run the task before knows it.
    with enqueued(call_partner_api, LIMIT) as results:
        warm = results_of(results, [0] * LIMIT)
    hold = typical_hold(client, backend)
    say(
        f"warm-up: {LIMIT} calls ran, so the semaphore knows how long a call holds its slot "
        f"({'unknown' if hold is None else f'{hold:.2f} s'}); their records are dropped"
    )
    client.delete(RUNS)
    published_us = redis_now_us(client)
    with enqueued(call_partner_api, CALLS) as results:
        say(f"{CALLS} messages published; {PROCESSES} pool processes free; a line per {TICK} s")
        watch_calls(client, workers)
        succeeded = results_of(results, [0] * CALLS)
    runs = runs_of(client, RUNS)
    deferrals = [d for d in deferrals_of(client, call_partner_api) if d.reason == "concurrency"]

    heading("1. what ran")
    most = peak(runs)
    say(f"most at once, from the recorded spans: {most} fleet-wide ({at_once(runs)})")
    ran = Counter(run.worker for run in runs)
    first = min((run.start_us for run in runs), default=published_us)
    last = max((run.end_us for run in runs), default=published_us)
    span = (last - first) / 1e6
    ideal = CALLS * CALL_SECONDS / LIMIT
    say(
        f"runs by worker: {by_worker(ran)}; first start to last end {span:.2f} s "
        f"(at best {ideal:g} s); {LIMIT} at once for {busy_for(runs, LIMIT):.2f} s of it"
    )
    both = side_by_side(runs)
    turned = Counter(worker_of(d.node) for d in deferrals)
    say(
        f"alpha and bravo each ran a call at once for {both:.2f} s: the {LIMIT} slots are the "
        f"fleet's; deferred on: {by_worker(turned)}"
    )
    per_call = Counter(d.task_id for d in deferrals)
    spread = Counter(per_call.values())
    say(
        f"{len(deferrals)} deferrals for {len(per_call)} runs that waited: "
        + ", ".join(f"{n} deferred {times}x" for times, n in sorted(spread.items()))
    )
    # Each call's first deferral: the place in the queue it was given.
    turns = sorted({d.task_id: d.countdown for d in reversed(deferrals)}.values())
    hold = typical_hold(client, backend)
    say(f"turns handed out (s): {' '.join(f'{c:.2f}' for c in turns)}")
    if hold is not None:
        say(
            f"  in the order the runs were turned away, one every {hold / LIMIT:.2f} s: the "
            f"typical hold ({hold:.2f} s) / {LIMIT} slots"
        )
    crowd = crowd_back(runs, deferrals)
    say(
        f"the waiting runs came back one after another: at most {crowd} within any "
        f"{CROWD_WINDOW * 1000:.0f} ms (a herd brings every waiting run back at once)"
    )
    say(
        "why some were deferred more than once: a turn is a time, not a reserved slot, and the "
        "turns assume the runs holding the slots staggered, while these start and end in "
        "pairs: a run whose turn comes while both slots are still busy is queued again, a "
        "turn later"
    )
    left = holders(backend)
    waiting = CALLS - LIMIT
    # A herd (every waiting run back whenever slots free up) is turned away again each time.
    herd = sum(range(waiting, 0, -LIMIT))
    return [
        Check(
            f"every one of the {CALLS} calls succeeded, none using a retry up", warm and succeeded
        ),
        Check("each call ran exactly once", sorted(run.n for run in runs) == list(range(CALLS))),
        Check(
            f"never more than {LIMIT} runs at once fleet-wide ({most}), "
            f"though {PROCESSES} processes were free",
            most <= LIMIT,
        ),
        Check(f"and the limit was used: {LIMIT} ran at once", most == LIMIT),
        Check(
            f"one limit for the fleet: both workers ran calls ({by_worker(ran)}), side by side "
            f"for {both:.2f} s, and both were turned away ({by_worker(turned)})",
            all(ran[node] and turned[node] for node in NODES) and both > 0,
        ),
        Check(
            f"a few deferrals per waiting run, no polling: {len(deferrals)} for the {waiting} "
            f"runs that had to wait (a herd: {herd})",
            bool(deferrals) and len(deferrals) < herd,
        ),
        Check(
            f"not a herd: at most {crowd} waiting runs came back within "
            f"{CROWD_WINDOW * 1000:.0f} ms",
            crowd <= CROWD_BOUND,
        ),
        Check(
            f"turns spaced by how long calls take: all done in {span:.2f} s "
            f"(at best {ideal:g} s; a lease of waiting would be 30 s)",
            span <= 2 * ideal,
        ),
        Check(f"every slot was given back ({left} held at the end)", left == 0),
    ]


def crowd_back(runs: Sequence[Run], deferrals: Sequence[Deferral]) -> int:
    """The most comebacks of deferred runs within any ``CROWD_WINDOW``: a comeback is a
    deferred run's next deferral, or its start."""
    started = {run.task_id: run.start_us for run in runs}
    mine: dict[str, list[int]] = {}
    for deferral in deferrals:
        mine.setdefault(deferral.task_id, []).append(deferral.at_us)
    back = sorted(
        t
        for task_id, ats in mine.items()
        for t in [*sorted(ats)[1:], *([started[task_id]] if task_id in started else [])]
    )
    window = int(CROWD_WINDOW * 1e6)
    return max((sum(t <= u < t + window for u in back) for t in back), default=0)


def celery_concurrency(client: redis.Redis) -> list[Check]:
    heading(
        f"1. the contrast: {FREE_CALLS} calls without concurrency_limit, only Celery's "
        f"--concurrency={CONCURRENCY} per worker"
    )
    with enqueued(call_partner_api_unlimited, FREE_CALLS) as results:
        succeeded = results_of(results, [0] * FREE_CALLS)
    runs = runs_of(client, FREE_RUNS)
    most = peak(runs)
    say(
        f"most at once: {most} fleet-wide ({at_once(runs)}): Celery limits each worker, "
        f"so {len(NODES)} workers x {CONCURRENCY} = {PROCESSES} connections to the partner"
    )
    return [
        Check(
            f"without the limit more than {LIMIT} ran at once ({most}), at most "
            f"{CONCURRENCY} per worker",
            succeeded and most > LIMIT and all(peak(runs, n) <= CONCURRENCY for n in NODES),
        ),
    ]


# --- part 2: one queued and one running ----------------------------------------------------

# What a deferral of a rebuild means, by task_deferred's reason.
WHY = {
    "while_running": "another instance is running",
    "running_elsewhere": "this instance runs elsewhere",
}


class Follower:
    """Prints the starts, ends and deferrals of one task's runs as they are recorded, in the
    order of Redis time and stamped with it (seconds since ``origin_us``), between the lines
    about what the demo does; knows the calls' names for their task ids."""

    def __init__(self, client: redis.Redis, task: Task, origin_us: int) -> None:
        self.client, self.task, self.origin_us = client, task, origin_us
        self.names: dict[str, str] = {}
        self.marks: list[Mark] = []
        self.deferrals: list[Deferral] = []
        self.printed = 0  # Redis time of the last line printed

    def name(self, task_id: str) -> str:
        return self.names.get(task_id, short(task_id))

    def stamp(self, at_us: int) -> str:
        return f"+{(at_us - self.origin_us) / 1e6:4.2f} s"

    def now(self) -> int:
        return redis_now_us(self.client)

    def tell(self, message: str, at_us: int | None = None) -> None:
        """A line about what the demo did at ``at_us`` (now by default), after what the
        workers did before."""
        at_us = self.now() if at_us is None else at_us
        self.poll(before=at_us)
        say(f"{self.stamp(at_us)}  {message}")
        self.printed = max(self.printed, at_us)

    def poll(self, before: int | None = None) -> None:
        """Print what the workers recorded since the last line, up to ``before``."""
        self.marks = marks_of(self.client, self.task)
        self.deferrals = deferrals_of(self.client, self.task)
        lines = [
            (mark.at_us, f"{worker_of(mark.node)}: {self.name(mark.task_id)} " + (
                f"started, reads catalogue v{mark.version}" if mark.what == "start"
                else f"ended (indexed v{mark.version})"
            ))
            for mark in self.marks
        ] + [
            (d.at_us, f"{worker_of(d.node)}: {self.name(d.task_id)} deferred by "
             f"{d.countdown:.2f} s ({d.reason}: {WHY.get(d.reason, '?')})")
            for d in self.deferrals
        ]  # fmt: skip
        for at_us, line in sorted(lines):
            if self.printed < at_us and (before is None or at_us <= before):
                say(f"{self.stamp(at_us)}    {line}")
                self.printed = at_us

    def until(
        self,
        what: str,
        marked: Callable[[Mark], bool],
        workers: Sequence[subprocess.Popen[bytes]],
    ) -> bool:
        """Print what happens until a mark matches; whether one did in time."""

        def seen() -> bool:
            self.poll()
            return any(marked(mark) for mark in self.marks)

        try:
            wait_until(seen, workers, what, timeout=20)
        except RuntimeError as error:
            say(str(error))
            return False
        return True

    def span(self, task_id: str) -> tuple[int, int] | None:
        """When ``task_id``'s run started and ended, if it has."""
        at = {mark.what: mark.at_us for mark in self.marks if mark.task_id == task_id}
        return (at["start"], at["end"]) if {"start", "end"} <= at.keys() else None

    def versions(self) -> dict[str, int]:
        """The catalogue version each run indexed, by task id."""
        return {mark.task_id: mark.version for mark in self.marks if mark.what == "start"}


def key_states(backend: RedisBackend, task: Task, names: Follower) -> str:
    """Who holds the task's keys now, as ``celery unique`` would show them."""
    held = held_locks(backend, task.name)
    states = {lock.state: names.name(lock.holder) for lock in held}
    return ", ".join(f"{state} key: {states.get(state, 'free')}" for state in ("queued", "running"))


def call(task: Task, follower: Follower, number: int, first: str | None) -> AsyncResult:
    """``task.delay(CUSTOMER)``; say what it got back."""
    at = follower.now()
    result = task.delay(CUSTOMER)
    label = f"call {number}"
    if result.id not in follower.names:
        follower.names[result.id] = label
        got = "a new instance, queued" if number > 1 else "a new instance"
    elif result.id == first:
        got = "call 1's id: a duplicate of the running instance"
    else:
        got = f"{follower.name(result.id)}'s id: a duplicate of the queued instance"
    follower.tell(f"{label}: delay({CUSTOMER}) -> {short(result.id)}, {got}", at)
    return result


def while_running(
    client: redis.Redis, backend: RedisBackend, workers: Sequence[subprocess.Popen[bytes]]
) -> list[Check]:
    task = rebuild_search_index
    heading(
        f"2. rebuild_search_index({CUSTOMER}), {REBUILD_SECONDS:g} s a run: unique_until="
        '"started", unique_while_running=True'
    )
    client.set(catalogue(CUSTOMER), 1)
    follower = Follower(client, task, redis_now_us(client))
    first = call(task, follower, 1, None)
    started = follower.until("call 1 to start", lambda m: m.task_id == first.id, workers)
    follower.tell(
        f"{key_states(backend, task, follower)} (call 1 moved to the running key as it started)"
    )
    version = client.incr(catalogue(CUSTOMER))
    follower.tell(f"the catalogue of {CUSTOMER} changes: now v{version}, after call 1 read it")
    second = call(task, follower, 2, first.id)
    follower.tell(key_states(backend, task, follower))
    more = []
    for number in range(3, 3 + DUPLICATES):
        time.sleep(0.1)
        more.append(call(task, follower, number, first.id))

    def second_ended(mark: Mark) -> bool:
        return mark.task_id == second.id and mark.what == "end"

    follower.until("call 2 to end", second_ended, workers)
    answers = results_of([first, second], [1, version]) if started else False
    spans = follower.span(first.id), follower.span(second.id)
    seen = follower.versions()
    waits = [d for d in follower.deferrals if d.task_id == second.id]
    runs = [mark for mark in follower.marks if mark.what == "start"]
    heading("2. what ran")
    say(
        f"{1 + 1 + DUPLICATES} calls, {len({first.id, second.id, *(r.id for r in more)})} "
        f"instances, {len(runs)} runs; call 1 indexed v{seen.get(first.id)}, call 2 "
        f"v{seen.get(second.id)}; call 2 was deferred {len(waits)}x while call 1 ran"
    )
    one, two = spans
    if one and two:
        say(
            f"call 2 started {(two[0] - one[1]) / 1e3:.0f} ms after call 1 ended: a queued "
            "instance that meets a running one checks back after 0.5 s, then twice as long "
            "each time (never longer than the running one's lease)"
        )
    return [
        Check("call 1 started and both runs succeeded", answers),
        Check(
            "call 2, made while call 1 ran, is a new instance: the change is not a duplicate",
            second.id != first.id,
        ),
        Check(
            f"the {DUPLICATES} calls after it returned call 2's id (duplicates of the queued one)",
            all(result.id == second.id for result in more),
        ),
        Check(f"{2 + DUPLICATES} calls, exactly 2 runs", len(runs) == 2),
        Check(
            "call 2 started only once call 1 had ended",
            one is not None and two is not None and two[0] >= one[1],
        ),
        Check(
            f"call 1 indexed v1, call 2 the change made during call 1 (v{version})",
            seen.get(first.id) == 1 and seen.get(second.id) == version,
        ),
        Check(
            "call 2 waited by deferral (while_running), not by failing or retrying",
            bool(waits) and all(d.reason == "while_running" for d in waits) and answers,
        ),
    ]


def until_executed(
    client: redis.Redis, backend: RedisBackend, workers: Sequence[subprocess.Popen[bytes]]
) -> list[Check]:
    task = rebuild_until_executed
    heading('2. the contrast: the same with unique_until="executed" (the default)')
    client.set(catalogue(CUSTOMER), 1)
    follower = Follower(client, task, redis_now_us(client))
    first = call(task, follower, 1, None)
    started = follower.until("call 1 to start", lambda m: m.task_id == first.id, workers)
    version = client.incr(catalogue(CUSTOMER))
    follower.tell(f"the catalogue of {CUSTOMER} changes: now v{version}, after call 1 read it")
    second = call(task, follower, 2, first.id)
    follower.until("call 1 to end", lambda m: m.what == "end", workers)
    answer = results_of([first], [1]) if started else False
    runs = [mark for mark in follower.marks if mark.what == "start"]
    current = int(client.get(catalogue(CUSTOMER)) or 0)
    say(
        f"{len(runs)} run, which indexed v{follower.versions().get(first.id)}; the catalogue "
        f"is at v{current}: the change waits for someone to call again"
    )
    return [
        Check(
            'with unique_until="executed" the call made during the run got the running '
            "instance's id",
            answer and second.id == first.id,
        ),
        Check(
            f"so the change was lost: one run, which indexed v1 of v{current}",
            len(runs) == 1 and follower.versions().get(first.id) == 1 and current == version,
        ),
    ]


# --- main ------------------------------------------------------------------------------------


def leftovers(backend: RedisBackend) -> list[Check]:
    locks = held_locks(backend)
    slots = holders(backend)
    say(f"locks held at the end: {len(locks)}; partner connections held: {slots}")
    # clear_locks would hide a leak from the next demo run; this Redis is private anyway.
    return [
        Check(
            "nothing left held: every lock and slot was freed when its run ended",
            not locks and slots == 0,
        )
    ]


def demo(workers: Sequence[subprocess.Popen[bytes]]) -> list[Check]:
    client = store()
    backend = RedisBackend(client, key_prefix=KEY_PREFIX)
    checks = concurrency_limit(client, backend, workers)
    checks += celery_concurrency(client)
    checks += while_running(client, backend, workers)
    checks += until_executed(client, backend, workers)
    return checks + leftovers(backend)


def main() -> int:
    return run_fleet(
        "demo.concurrency",
        REDIS_URL_ENV,
        configure,
        store,
        demo,
        nodes=NODES,
        concurrency=CONCURRENCY,
    )


if __name__ == "__main__":
    run(main)
