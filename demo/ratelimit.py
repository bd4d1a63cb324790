"""Fleet-wide rate limits, live: two Celery workers share one limit of 5 calls a second.

Run ``python -m demo.ratelimit`` from the repository root (or ``nox -s demo -- ratelimit``).
It starts a private ``redis-server`` (``celery_unique.testing``) and two Celery workers on
it, ``alpha`` and ``bravo`` (``celery -A demo.ratelimit worker -n alpha@%h``, prefork,
2 processes each), stops them all at the end, and takes about 12 seconds. It shows:

1. 40 calls of ``call_partner_api(n)``, a ``RateLimitedTask`` with
   ``global_rate_limit=RateLimit("5/s", burst=5)``, enqueued at once. Every run records its
   start (Redis ``TIME``, one clock for all processes) and the worker that ran it. A line
   per second shows the runs in that second across the fleet and by worker: the burst of 5
   (plus the tokens refilled meanwhile) in the first second, then 5 a second, however the
   two workers share them. An over-limit run is not failed: it books the next free slot in
   the bucket and is deferred (re-queued with a countdown) to exactly that moment, when it
   runs without a second check. Every call succeeds in the end, each deferred at most once.
2. The contrast: Celery's own ``rate_limit="5/s"`` on the same two workers. Each worker
   counts for itself, so the fleet runs 10 a second.

Every claim is checked, among them the token bucket's bound (at most ``burst + rate x w``
runs in any window of ``w`` seconds, so at most 10 in any second); the exit code is 1 if
any check failed, so this is a smoke test too.
This module is also the workers' app: they import it as ``demo.ratelimit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.result import AsyncResult

from celery_unique import RateLimit, RateLimitedTask
from demo._report import Check, heading, say
from demo._worker import announce_readiness, records, run, run_fleet, wait_until

# The workers run in other processes and learn the broker from their environment.
REDIS_URL_ENV = "CELERY_UNIQUE_RATELIMIT_DEMO_REDIS_URL"
NODES = ("alpha", "bravo")
CONCURRENCY = 2  # per worker
LIMIT = RateLimit("5/s", burst=5)
CALLS = 40
CELERY_CALLS = 20  # the contrast: about 2 s at Celery's 5/s per worker, two workers
CALL_SECONDS = 0.1  # the partner API's answer time
# Start times are recorded by the task a Redis round trip after the bucket admitted it, and
# a busy machine can delay one recording more than another: the bound per window is checked
# with this much leeway (measured windows are typically within 3 ms of it). That is a
# quarter of the 0.2 s between two tokens, so one run too many, or a second bucket, shows.
CLOCK_SLACK = 0.05

# What happens, recorded in Redis so that every process adds to it.
RUNS = "demo:runs"  # one JSON record per run of call_partner_api
CELERY_RUNS = "demo:celery-runs"  # the same for the task limited by Celery's rate_limit
DEFERRALS = "demo:deferrals"  # over-limit runs put back in the queue

# --- the Celery app: the workers import this module and find it here -----------------------

app = Celery("celery_unique_ratelimit_demo")
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    unique_key_prefix="demo:",
)


def configure(url: str) -> None:
    """Point the app at the demo's Redis: broker, results and rate limits."""
    app.conf.update(broker_url=url, result_backend=url)


if os.environ.get(REDIS_URL_ENV):
    configure(os.environ[REDIS_URL_ENV])


def store() -> redis.Redis:
    """This process's client for the demo's records."""
    return records(app)


@dataclass(frozen=True)
class Run:
    """One execution, as the worker that ran it recorded it."""

    n: int
    at_us: int  # Redis TIME when it started, in microseconds
    node: str  # the worker's name, alpha@host
    pid: int  # the pool process that ran it

    @property
    def worker(self) -> str:
        return self.node.partition("@")[0]


def record(key: str, n: int, node: str) -> None:
    """Note a run's start on Redis's clock: the workers' own clocks need not agree."""
    client = store()
    seconds, micros = client.time()
    client.rpush(key, json.dumps(asdict(Run(n, seconds * 1_000_000 + micros, node, os.getpid()))))


# Names are explicit: the demo knows this module as __main__, the workers as demo.ratelimit.
@app.task(base=RateLimitedTask, bind=True, name="demo.call_partner_api", global_rate_limit=LIMIT)
def call_partner_api(self: Task, n: int) -> int:
    """A call to a partner that allows 5 a second, from whichever worker: one bucket in Redis."""
    record(RUNS, n, self.request.hostname)
    time.sleep(CALL_SECONDS)
    return n


@app.task(bind=True, name="demo.call_partner_api_celery_limit", rate_limit="5/s")
def call_with_celery_limit(self: Task, n: int) -> int:
    """The same call under Celery's own rate_limit, which each worker counts on its own."""
    record(CELERY_RUNS, n, self.request.hostname)
    time.sleep(CALL_SECONDS)
    return n


@signals.task_retry.connect(weak=False, dispatch_uid="demo.count_deferrals")
def _count_deferral(sender: Any = None, **_: Any) -> None:
    # A deferral ends the run with Retry (without using a retry up), so this sees each one.
    if getattr(sender, "name", None) == call_partner_api.name:
        store().incr(DEFERRALS)


announce_readiness(store)


# --- measuring -----------------------------------------------------------------------------


def runs_of(client: redis.Redis, key: str) -> list[Run]:
    return sorted((Run(**json.loads(raw)) for raw in client.lrange(key, 0, -1)), key=_at)


def _at(run: Run) -> int:
    return run.at_us


def redis_now_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def by_worker(runs: Sequence[Run], width: int = 0) -> str:
    counts = Counter(run.worker for run in runs)
    return ", ".join(f"{node} {counts[node]:{width}}" for node in NODES)


def busiest_second(runs: Sequence[Run]) -> int:
    """The most runs in any window [t, t + 1 s): one starting at a run is as busy as any."""
    times = [run.at_us for run in runs]
    return max((sum(t <= u < t + 1_000_000 for u in times) for t in times), default=0)


@dataclass(frozen=True)
class Window:
    """The runs from one start to a later one, and what the token bucket allows in it."""

    count: int
    seconds: float

    @property
    def bound(self) -> float:
        return LIMIT.burst + LIMIT.rate * self.seconds


def tightest_window(runs: Sequence[Run]) -> Window | None:
    """Of all windows from a run's start to another's, the one closest to (or over) its bound."""
    times = [run.at_us / 1e6 for run in runs]
    windows = [
        Window(j - i + 1, times[j] - times[i])
        for i in range(len(times))
        for j in range(i + 1, len(times))
    ]
    return min(windows, key=lambda w: w.bound - w.count, default=None)


def rate_after(runs: Sequence[Run], first: int) -> float:
    """Runs per second after the first ``first`` ones: what the limit lets through for long."""
    if len(runs) <= first:
        return 0.0
    span = (runs[-1].at_us - runs[0].at_us) / 1e6
    return (len(runs) - first) / span if span else float("inf")


# --- the two parts -------------------------------------------------------------------------


def watch(client: redis.Redis, start_us: int) -> None:
    """A line per second of Redis time from ``start_us`` on, until every call has run."""
    # This process's clock, read at ``start_us`` on Redis's: ticks follow Redis's seconds.
    started = time.monotonic() - (redis_now_us(client) - start_us) / 1e6
    deadline = started + 30
    second = 1
    while True:
        # A moment past the second's end, so the runs that started in it have been recorded.
        time.sleep(max(0.0, started + second + 0.1 - time.monotonic()))
        runs = runs_of(client, RUNS)
        end = start_us + second * 1_000_000
        so_far = [run for run in runs if run.at_us < end]
        this = [run for run in so_far if run.at_us >= end - 1_000_000]
        say(
            f"second {second:2}: {len(this):2} runs ({by_worker(this, 2)}) | "
            f"so far {len(so_far):2}/{CALLS} ({by_worker(so_far, 2)}) | "
            f"deferred so far {int(client.get(DEFERRALS) or 0)}"
        )
        if len(so_far) >= CALLS:
            return
        if time.monotonic() > deadline:
            say("gave up waiting for every call to run")
            return
        second += 1


def results_of(results: Sequence[AsyncResult], expected: Sequence[int]) -> bool:
    """Whether every call succeeded, with its own answer."""
    try:
        return [result.get(timeout=10) for result in results] == list(expected)
    except Exception as error:  # a failed call, or one that never ran
        say(f"a call did not succeed: {error!r}")
        return False


@contextmanager
def enqueued(task: Task, count: int) -> Iterator[list[AsyncResult]]:
    """``task.delay(n)`` for n below ``count``, all at once; their results, for a while.

    A result unsubscribes from Redis when it is collected. After an interruption the
    traceback keeps it until Redis is gone, and its failing to unsubscribe would be printed:
    so the results are dropped on the way out, while Redis still runs.
    """
    results = [task.delay(n) for n in range(count)]
    try:
        yield results
    finally:
        results.clear()


def fleet_limit(client: redis.Redis, workers: Sequence[subprocess.Popen[bytes]]) -> list[Check]:
    heading(
        f"1. {CALLS} calls of call_partner_api, global_rate_limit={LIMIT}, "
        f"enqueued at once on {len(NODES)} workers"
    )
    published_us = redis_now_us(client)
    with enqueued(call_partner_api, CALLS) as results:
        say(f"{CALLS} messages published")
        wait_until(lambda: client.llen(RUNS) > 0, workers, "the first call to run")
        # Seconds count from the first run, so that the first one holds the whole burst
        # however long the messages took to reach a worker.
        start_us = runs_of(client, RUNS)[0].at_us
        refilled = int(LIMIT.rate) - 1  # tokens that come back before the first second ends
        say(
            f"first run {(start_us - published_us) / 1000:.0f} ms after publishing; "
            "the seconds below count from it, on Redis's clock"
        )
        say(
            f"expect {LIMIT.burst + refilled} runs in the first (the burst of {LIMIT.burst}, "
            f"plus {refilled} tokens refilled meanwhile), then {LIMIT.rate:g} a second"
        )
        watch(client, start_us)
        succeeded = results_of(results, range(CALLS))
    runs = runs_of(client, RUNS)
    deferrals = int(client.get(DEFERRALS) or 0)

    heading("1. what ran")
    per_second = Counter((run.at_us - start_us) // 1_000_000 for run in runs)
    seconds = range(max(per_second, default=-1) + 1)
    say(f"runs per second across the fleet: {' '.join(str(per_second[s]) for s in seconds)}")
    for node in sorted({r.node for r in runs}):
        pids = Counter(r.pid for r in runs if r.node == node)
        say(
            f"{node}: {pids.total()} runs, by pool process "
            + ", ".join(f"{pid} x{count}" for pid, count in sorted(pids.items()))
        )
    steady = rate_after(runs, LIMIT.burst)
    span = (runs[-1].at_us - runs[0].at_us) / 1e6 if runs else 0.0
    say(
        f"{len(runs)} runs in {span:.2f} s: the burst of {LIMIT.burst}, then "
        f"{len(runs) - LIMIT.burst} at {steady:.2f}/s (the limit: {LIMIT.rate:g}/s)"
    )
    busiest = busiest_second(runs)
    one_second = LIMIT.burst + LIMIT.rate
    say(f"busiest 1-second window: {busiest} runs (bound: burst + rate x 1 s = {one_second:g})")
    tight = tightest_window(runs)
    if tight is not None:
        say(
            f"closest to the bound burst + rate x w: {tight.count} runs within "
            f"{tight.seconds * 1000:.1f} ms; the bucket allows that many from "
            f"{(tight.count - LIMIT.burst) / LIMIT.rate * 1000:.1f} ms on"
        )
    say(
        f"{deferrals} deferrals for {CALLS} calls: an over-limit run books the next free slot "
        "and goes back to the queue until then, once; it is not checked again on its return"
    )
    ran = Counter(run.n for run in runs)
    return [
        Check(f"every one of the {CALLS} calls succeeded", succeeded),
        Check(
            "each call ran exactly once (a deferred run does not run before coming back)",
            sorted(ran) == list(range(CALLS)) and set(ran.values()) == {1},
        ),
        Check(
            f"at most {one_second:g} runs (burst + rate) in any 1-second window ({busiest})",
            busiest <= one_second,
        ),
        Check(
            f"at most burst + rate x w runs in any window of w seconds "
            f"(give or take {CLOCK_SLACK * 1000:g} ms of recording)",
            tight is None or tight.count <= tight.bound + LIMIT.rate * CLOCK_SLACK,
        ),
        Check(
            f"the fleet kept close to the limit after the burst ({steady:.2f}/s)",
            # Not far below: deferred calls come back when their slot is due. (Low bar: a
            # busy machine may stall the workers for a moment.)
            0.6 * LIMIT.rate <= steady <= LIMIT.rate * 1.05,
        ),
        Check(
            f"each call was deferred at most once: {deferrals} deferrals for {CALLS} calls",
            deferrals <= CALLS - LIMIT.burst,
        ),
        Check(
            f"both workers ran calls: one limit shared by the fleet ({by_worker(runs)})",
            {r.worker for r in runs} == set(NODES),
        ),
    ]


def celery_limit(client: redis.Redis) -> list[Check]:
    heading(f'2. the contrast: Celery\'s own rate_limit="5/s", {CELERY_CALLS} calls')
    with enqueued(call_with_celery_limit, CELERY_CALLS) as results:
        succeeded = results_of(results, range(CELERY_CALLS))
    runs = runs_of(client, CELERY_RUNS)
    span = (runs[-1].at_us - runs[0].at_us) / 1e6 if runs else 0.0
    # Celery's bucket holds one token per worker: one run each at once, then 5/s each.
    rate = rate_after(runs, len(NODES))
    say(
        f"{len(runs)} runs in {span:.2f} s ({by_worker(runs)}): {rate:.1f}/s across the "
        f"fleet, {busiest_second(runs)} in the busiest second"
    )
    say(f"Celery counts per worker: 5/s each, {5 * len(NODES)}/s for {len(NODES)} workers")
    return [
        Check(
            f'Celery\'s rate_limit="5/s" let about 5/s per worker through ({rate:.1f}/s)',
            succeeded and rate > 1.5 * LIMIT.rate,
        ),
    ]


# --- main ------------------------------------------------------------------------------------


def demo(workers: list[subprocess.Popen[bytes]]) -> list[Check]:
    """Both demos, once both workers consume; their checks."""
    return fleet_limit(store(), workers) + celery_limit(store())


def main() -> int:
    return run_fleet(
        "demo.ratelimit",
        REDIS_URL_ENV,
        configure,
        store,
        demo,
        nodes=NODES,
        concurrency=CONCURRENCY,
    )


if __name__ == "__main__":
    run(main)
