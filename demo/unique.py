"""Unique Celery tasks, live: a burst of identical requests, and the report runs once.

Run ``python -m demo.unique`` from the repository root (or ``nox -s demo``). It starts a
private ``redis-server``
(``celery_unique.testing``) and a real Celery worker (``celery -A demo.unique worker``,
prefork, 4 processes), stops both at the end, and takes about 10 seconds. It shows, in
three parts:

1. 8 threads and 4 processes ask for ``generate_report`` (a 2 s ``UniqueTask`` with
   ``unique_on=["customer_id"]``) 84 times, for customers 42, 7 and 13, spelled several
   ways. One message per customer is published, each report runs once, and every caller
   gets back the task id of the instance holding the lock. A line every half second
   shows the requests, messages, runs and the lock of customer 42 as they happen.
2. Once a report has run, its lock is free: a new burst for customer 42 runs it again,
   once, under a new task id.
3. With ``on_duplicate="raise"`` a duplicate raises ``DuplicateTaskError``, which names
   the holder (``.task_id``) and how long its lock lasts (``.ttl``).

Every claim is checked; the exit code is 1 if any check failed, so this is a smoke test too.
This module is also the worker's app: the worker imports it as ``demo.unique``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from typing import Any, NamedTuple

import redis
from celery import Celery, Task, signals

from celery_unique import DuplicateTaskError, RedisBackend, UniqueTask, clear_locks
from celery_unique.testing import redis_server
from demo._report import Check, heading, say, summary
from demo._worker import celery_worker, records, run, show_log, wait_until

# The worker runs in another process and learns the broker from its environment.
REDIS_URL_ENV = "CELERY_UNIQUE_DEMO_REDIS_URL"
LOCK_PREFIX = "demo:"
REPORT_SECONDS = 2.0
INVOICE_SECONDS = 1.0
THREADS = 8
PROCESSES = 4
# Between one caller's requests: a burst that lasts about a second, so that later requests
# meet the report while it runs, yet all of them come before it ends.
GAP = 0.12
TICK = 0.5  # seconds between live lines
# spawn, not fork: every caller process is a fresh interpreter with its own connections,
# like a web server process on another host would be.
CTX = multiprocessing.get_context("spawn")

# What happens, recorded in Redis so that every process (callers, worker) adds to it.
ASKED = "demo:asked"  # requests made
PUBLISHED = "demo:published"  # messages really sent to the broker
RUNS_STARTED = "demo:started"
RUNS = "demo:runs"  # one JSON record per finished run
REPLIES = "demo:replies"  # one JSON record per request: who asked, what came back
OVERLAPS = "demo:overlaps"  # runs that began while another for the same customer ran

# --- the Celery app: the worker imports this module and finds it here --------------------

app = Celery("celery_unique_demo")
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    unique_key_prefix=LOCK_PREFIX,
)


def configure(url: str) -> None:
    """Point the app at the demo's Redis: broker, results and locks."""
    app.conf.update(broker_url=url, result_backend=url)


if os.environ.get(REDIS_URL_ENV):
    configure(os.environ[REDIS_URL_ENV])


def store() -> redis.Redis:
    """This process's client for the demo's records (thread-safe: it has a pool)."""
    return records(app)


@dataclass(frozen=True)
class Run:
    """One real execution of ``generate_report``, as the worker recorded it."""

    customer: int
    fmt: str
    task_id: str
    pid: int


@dataclass(frozen=True)
class Reply:
    """One request, as the caller that made it recorded it."""

    wave: int
    caller: str
    request: str
    customer: int
    task_id: str


# Names are explicit: the caller knows this module as __main__, the worker as demo.unique,
# and the unique key starts with the task's name.
@app.task(base=UniqueTask, bind=True, name="demo.generate_report", unique_on=["customer_id"])
def generate_report(self: Task, customer_id: int, fmt: str = "pdf") -> str:
    """The expensive task: two seconds of work per customer, counted in Redis."""
    client = store()
    client.incr(RUNS_STARTED)
    # Only this process can be running customer_id's report if the lock does its job.
    if client.incr(f"demo:running:{customer_id}") > 1:
        client.incr(OVERLAPS)
    try:
        time.sleep(REPORT_SECONDS)
    finally:
        client.decr(f"demo:running:{customer_id}")
        run = Run(customer_id, fmt, self.request.id, os.getpid())
        client.rpush(RUNS, json.dumps(asdict(run)))
    return f"report-{customer_id}.{fmt}"


@app.task(
    base=UniqueTask,
    name="demo.send_invoice",
    unique_on=["customer_id"],
    unique_ttl=60,
    on_duplicate="raise",
)
def send_invoice(customer_id: int) -> str:
    time.sleep(INVOICE_SECONDS)
    return f"invoice-{customer_id}"


@app.task(name="demo.warm_up")
def warm_up() -> int:
    """A plain task: its answer tells that the worker consumes, runs and stores results."""
    return os.getpid()


@signals.after_task_publish.connect(weak=False, dispatch_uid="demo.count_published")
def _count_published(sender: str | None = None, **_: Any) -> None:
    # A duplicate returns before Celery publishes, so this counts the messages that exist.
    if sender == generate_report.name:
        store().incr(PUBLISHED)


# --- output ----------------------------------------------------------------------------------


def short(task_id: str) -> str:
    return task_id[:8]


# --- the worker ------------------------------------------------------------------------------


def wait_for_worker(process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Block until the worker has run a task; its pool process's pid."""
    probe = warm_up.delay()
    wait_until(probe.ready, [process], "the worker to run a warm-up task", timeout)
    pid: int = probe.get(timeout=5)
    return pid


# --- callers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One way of asking for a report."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def customer(self) -> int:
        return int(self.kwargs["customer_id"] if "customer_id" in self.kwargs else self.args[0])

    def __str__(self) -> str:
        spelled = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"delay({', '.join(spelled)})"


# What each caller asks for, in turn (each caller starts at another place in the list).
# Customer 42's spellings differ in how they pass it and in fmt, which is not part of the
# key: all of them are one report.
PLANS: dict[int, list[Request]] = {
    1: [
        Request((42,)),
        Request(kwargs={"customer_id": 42, "fmt": "csv"}),
        Request((42,)),
        Request((7,)),
        Request((42, "xlsx")),
        Request((13,), {"fmt": "csv"}),
        Request((42,)),
    ],
    2: [Request((42,)), Request(kwargs={"customer_id": 42, "fmt": "csv"}), Request((42,))],
}


def make_requests(caller: str, index: int, wave: int, start: Barrier) -> None:
    """Work of one caller: its wave's requests, recording what came back for each."""
    client = store()
    plan = PLANS[wave]
    turn = index % len(plan)
    start.wait(timeout=60)
    for request in plan[turn:] + plan[:turn]:
        client.incr(ASKED)
        result = generate_report.delay(*request.args, **request.kwargs)
        reply = Reply(wave, caller, str(request), request.customer, result.id)
        client.rpush(REPLIES, json.dumps(asdict(reply)))
        time.sleep(GAP)


def caller_process(url: str, caller: str, index: int, wave: int, start: Barrier) -> None:
    """Entry point of a caller process: a fresh interpreter, so configure the app first."""
    configure(url)
    make_requests(caller, index, wave, start)


@dataclass
class Callers:
    """The threads and processes of one wave, lined up behind a barrier."""

    threads: list[threading.Thread]
    processes: list[BaseProcess]
    start: Barrier

    @property
    def count(self) -> int:
        return len(self.threads) + len(self.processes)

    def done(self) -> bool:
        alive = [t.is_alive() for t in self.threads] + [p.is_alive() for p in self.processes]
        return not any(alive)

    def clean(self) -> bool:
        return all(process.exitcode == 0 for process in self.processes)


def line_up(url: str, wave: int, threads: int, processes: int) -> Callers:
    """Start the callers; they wait at the barrier until :func:`watch` releases them."""
    start = CTX.Barrier(threads + processes + 1)
    callers = Callers(
        [
            threading.Thread(
                target=make_requests, args=(f"thread {n}", n, wave, start), daemon=True
            )
            for n in range(threads)
        ],
        [
            CTX.Process(
                target=caller_process,
                args=(url, f"process {n}", threads + n, wave, start),
                daemon=True,
            )
            for n in range(processes)
        ],
        start,
    )
    for thread in callers.threads:
        thread.start()
    with sigint_ignored():
        for process in callers.processes:
            process.start()
    return callers


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Processes started in here ignore Ctrl-C from birth (an ignored signal stays ignored
    across exec). Ctrl-C reaches the whole foreground group: the demo alone handles it and
    ends the callers, rather than each of them printing a traceback."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- watching a wave -----------------------------------------------------------------------


class Tally(NamedTuple):
    """The counters of the demo at one moment, or their change over a wave."""

    asked: int
    published: int
    started: int
    finished: int
    replies: int

    def __sub__(self, other: Tally) -> Tally:
        return Tally(*(a - b for a, b in zip(self, other, strict=True)))


def tally(client: redis.Redis) -> Tally:
    # One round trip, so that the numbers on a line belong to one moment.
    pipe = client.pipeline()
    for key in (ASKED, PUBLISHED, RUNS_STARTED):
        pipe.get(key)
    for key in (RUNS, REPLIES):
        pipe.llen(key)
    return Tally(*(int(value or 0) for value in pipe.execute()))


def replies_of(client: redis.Redis, wave: int) -> list[Reply]:
    return [
        reply
        for reply in (Reply(**json.loads(raw)) for raw in client.lrange(REPLIES, 0, -1))
        if reply.wave == wave
    ]


def lock_state(lock_owner: str | None) -> str:
    """Who holds the lock: a queued instance's token is its task id, a running one's
    extends it with ``\\x1f`` and a run id."""
    if lock_owner is None:
        return "free"
    task_id, running, _ = lock_owner.partition("\x1f")
    return f"{'running' if running else 'queued'} {short(task_id)}"


def live_line(now: Tally, expected: int, replies: list[Reply], lock_owner: str | None) -> str:
    ids = {c: len({r.task_id for r in replies if r.customer == c}) for c in customers(replies)}
    handed = " ".join(f"{c}:{n}" for c, n in ids.items()) or "-"
    return (
        f"asked {now.asked:2}/{expected} | published {now.published} | "
        f"running {now.started - now.finished} | finished {now.finished} | "
        f"distinct ids handed out {handed} | lock of 42: {lock_state(lock_owner)}"
    )


def customers(replies: Sequence[Reply]) -> list[int]:
    return sorted({reply.customer for reply in replies}, key=lambda c: (c != 42, c))


def watch(client: redis.Redis, wave: int, callers: Callers, expected: int) -> Tally:
    """Release the callers and print a line per tick until every report asked for has run."""
    lock = RedisBackend(client, key_prefix=LOCK_PREFIX).lock(
        generate_report.unique_key((42,)), ttl=1
    )
    before = tally(client)
    callers.start.wait(timeout=60)  # processes take a while to start: wait for them all
    say(f"{callers.count} callers released together")
    deadline = time.monotonic() + 30
    while True:
        now = tally(client) - before
        say(live_line(now, expected, replies_of(client, wave), lock.owner()))
        if callers.done() and now.published and now.finished == now.published:
            return now
        if time.monotonic() > deadline:
            say("gave up waiting for the wave to end")
            return now
        time.sleep(TICK)


# --- the three parts -----------------------------------------------------------------------


def runs_since(client: redis.Redis, start: int) -> list[Run]:
    return [Run(**json.loads(raw)) for raw in client.lrange(RUNS, start, -1)]


def show_callers(replies: Sequence[Reply]) -> None:
    """One line per caller: the task ids it got back, per customer."""
    for caller in sorted({r.caller for r in replies}, key=lambda c: (c[0] == "p", c)):
        got = Counter((r.customer, r.task_id) for r in replies if r.caller == caller)
        parts = [f"{c} -> {short(t)} x{n}" for (c, t), n in sorted(got.items())]
        print(f"    {caller:10} " + "   ".join(parts), flush=True)


def report_customer(
    wave: int, customer: int, replies: Sequence[Reply], runs: Sequence[Run]
) -> list[Check]:
    """What one customer's requests got in one wave, and what ran for them; checked."""
    mine = [r for r in replies if r.customer == customer]
    ids = {r.task_id for r in mine}
    ran = [run for run in runs if run.customer == customer]
    spellings = Counter(r.request for r in mine)
    say(
        f"customer {customer}: {len(mine)} requests ("
        + ", ".join(f"{s} x{n}" for s, n in spellings.items())
        + f") -> {len(ids)} task id, {len(ran)} run"
        + "".join(f" (task {short(r.task_id)}, fmt={r.fmt}, pool pid {r.pid})" for r in ran)
    )
    result = app.AsyncResult(ran[0].task_id).get(timeout=10) if len(ran) == 1 else None
    if result is not None:
        say(f"  every caller's result.get() -> {result!r}")
    return [
        Check(
            f"wave {wave}, customer {customer}: ran exactly once for {len(mine)} requests",
            len(ran) == 1,
        ),
        Check(
            f"wave {wave}, customer {customer}: every request got the id of the task that ran",
            len(ran) == 1 and ids == {ran[0].task_id},
        ),
    ]


def wave(number: int, callers: Callers) -> tuple[list[Check], list[Run]]:
    """Fire a wave of lined-up callers, watch it, and check what ran."""
    client = store()
    expected = callers.count * len(PLANS[number])
    first_run = client.llen(RUNS)
    delta = watch(client, number, callers, expected)
    for process in callers.processes:
        process.join(timeout=10)
    replies = replies_of(client, number)
    runs = runs_since(client, first_run)
    heading(f"wave {number}: what each caller got back")
    show_callers(replies)
    heading(f"wave {number}: what ran")
    checks = [
        Check(
            f"wave {number}: all {callers.count} callers made their requests ({delta.asked})",
            callers.clean() and delta.asked == expected == len(replies),
        ),
        Check(
            f"wave {number}: one message published per customer ({delta.published})",
            delta.published == len(customers(replies)),
        ),
    ]
    for customer in customers(replies):
        checks += report_customer(number, customer, replies, runs)
    return checks, runs


def first_wave(callers: Callers) -> tuple[list[Check], str | None]:
    heading(
        f"1. {THREADS} threads and {PROCESSES} processes call generate_report.delay(...) "
        f"{len(PLANS[1])} times each, {GAP:g} s apart"
    )
    print(f"    each caller's requests, in its own rotation: {', '.join(map(str, PLANS[1]))}")
    checks, runs = wave(1, callers)
    ids = [run.task_id for run in runs if run.customer == 42]
    return checks, ids[0] if len(ids) == 1 else None


def second_wave(url: str, previous: str | None) -> list[Check]:
    heading(f"2. the report of 42 is done and its lock free: {THREADS} threads ask again")
    callers = line_up(url, 2, THREADS, 0)
    checks, runs = wave(2, callers)
    again = [run.task_id for run in runs if run.customer == 42]
    return [
        *checks,
        Check(
            "wave 2: customer 42 ran again, under a new task id",
            len(again) == 1 and previous is not None and again[0] != previous,
        ),
    ]


def raising() -> list[Check]:
    heading('3. on_duplicate="raise": send_invoice.delay(42) twice')
    first = send_invoice.delay(42)
    say(f"first  -> task {short(first.id)}")
    try:
        send_invoice.delay(42)
    except DuplicateTaskError as error:
        say(f"second -> DuplicateTaskError(task_id={short(error.task_id)}, ttl={error.ttl:.1f})")
        say(f"  {error}")
        caught: DuplicateTaskError | None = error
    else:
        say("second -> no error")
        caught = None
    say(f"first.get() -> {first.get(timeout=10)!r}")
    return [
        Check("raise: the duplicate raised DuplicateTaskError", caught is not None),
        Check(
            "raise: the error names the holder's task id",
            caught is not None and caught.task_id == first.id,
        ),
        Check(
            "raise: and how long its lock lasts",
            caught is not None and caught.ttl is not None and 0 < caught.ttl <= 60,
        ),
    ]


# --- main ------------------------------------------------------------------------------------


def leftovers(client: redis.Redis) -> list[Check]:
    overlaps = int(client.get(OVERLAPS) or 0)
    # A freed lock is deleted: nothing left to clear once every task has ended.
    stale = clear_locks(app)
    say(f"overlapping runs of one customer: {overlaps}; locks left over: {stale}")
    return [
        Check("no two runs for one customer ever overlapped", overlaps == 0),
        Check("every lock was freed once its task ended (clear_locks found none)", stale == 0),
    ]


def demo(url: str, worker: subprocess.Popen[bytes]) -> list[Check]:
    # Spawning interpreters takes a moment: the callers start while the worker boots.
    callers = line_up(url, 1, THREADS, PROCESSES)
    pid = wait_for_worker(worker)
    say(f"celery worker up (pid {worker.pid}; pool process {pid} ran a warm-up task)")
    checks, first_id = first_wave(callers)
    checks += second_wave(url, first_id)
    checks += raising()
    return checks + leftovers(store())


def main() -> int:
    with tempfile.TemporaryFile(prefix="celery-unique-demo-worker-") as log:
        try:
            with redis_server() as url:
                say(f"private redis-server up at {url}")
                configure(url)
                # The worker stops first: it needs Redis to shut down cleanly.
                with celery_worker(
                    "demo.unique", {REDIS_URL_ENV: url}, log, concurrency=4
                ) as worker:
                    say(f"celery worker starting (pid {worker.pid}, prefork, 4 processes)")
                    checks = demo(url, worker)
        except Exception:  # not on Ctrl-C: the user knows why it stopped
            show_log(log)
            raise
        status = summary(checks)
        if status:
            show_log(log)
        return status


if __name__ == "__main__":
    run(main)
