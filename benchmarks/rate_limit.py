"""Rate limiter cost and accuracy: ours against the ``limits`` package (and celery-heimdall).

Run ``python -m benchmarks.rate_limit`` (about 80 s) or ``--quick`` (about 20 s); ``--json
PATH`` also writes the results, ``--url`` uses a running Redis instead of a private one. One
Redis serves both parts.

Part 1, cost: decisions per second and Redis commands per decision.

* Every variant calls its limiter's ``hit`` on one key, again and again, for a fixed time,
  and counts decisions per second. ``admit`` rows use a limit that never runs out
  (1,000,000/s), so every call is admitted; ``deny`` rows use 1 per hour after one hit, so
  every call is refused. Every decision's outcome is checked.
* Ours is ``RedisBackend.rate_limiter(...).hit(key)`` (sync) and ``AsyncRedisBackend``'s
  (async). Peers, each when importable (else a note says why not): ``limits``'
  ``FixedWindowRateLimiter`` and ``MovingWindowRateLimiter`` on its ``RedisStorage``, and the
  same on ``limits.aio`` (``async+redis://``); celery-heimdall's ``rate_limited_countdown``,
  sync only (it has no asyncio side). Each library runs on its own redis-py client.
* Async variants run at 1, 16 and 64 concurrent coroutines, all on the same key (callers of
  one limit), compared with ours at the same concurrency and outcome.
* Every run starts from a clean key (deleted, then for ``deny`` spent by one hit). This
  matters for limits' moving window, which stores one list entry per admitted hit (up to the
  limit) and so costs more the longer a key is hammered.

How to read it: a group is one API kind and concurrency, interleaved as
``benchmarks/_harness.py`` says; ``ours / this`` is the median of per-repetition ratios of
ours (same group, same outcome) to the row: 2.00x means ours decides twice as fast.
``Redis cmds/decision`` is what the client sent over a batch of decisions outside the timed
runs, seen by ``MONITOR``; the commands a Lua script ran are listed as "in Lua" and not
counted. The targets: sync ours >= 1.2x limits' fixed window; a lone async caller ours >= 1.0x
limits.aio's fixed window; at 64 concurrent callers ours
async >= 3x limits.aio.

Part 2, accuracy: four spawned OS processes (``--procs``) hammer one fresh key flat out,
hundreds of times the rate, for 2.5 s (``--quick``: 1.5 s; a whole number of 1 s windows
and a half, so that no window opens just as a run ends). The limit is 50/s. Elapsed time
runs from a Redis ``TIME`` read before any process's first decision to one read after every
process's last, so ``bound = burst + rate x elapsed`` holds for a token bucket that starts
full. ``admitted / bound`` near 1.00 means the limiter hands out all it promises; ``over``
is how many admissions exceeded the bound (ours must be 0).

* ``limits`` and celery-heimdall have no burst setting: "50 per second" lets 50 through at
  once, so they are held to the bound of ours' ``RateLimit("50/s")`` (burst 50). Ours also
  runs with ``burst=10``, against burst 10.
* A fixed window restarts its count when its key expires; admissions cluster at the start of
  each window, so from a fresh key it stays within the bound (and admits less than it, as
  does the moving window, which frees a slot only a whole window after it was used). Its
  weakness, up to twice the limit at once around a window boundary, needs traffic that
  arrives late in a window. The ``0.9 s after 1 hit`` runs (default mode only) make that
  happen: one hit opens a window, the crowd comes 0.1 s before it closes.
* ``peak burst`` is the most admitted in any interval beyond ``rate x its length`` (from the
  client clock of each admitted reply: a few ms of jitter, a fraction of a token). A token
  bucket keeps it at its burst; the fixed window's boundary shows here, as up to 2x.
* celery-heimdall's check is called as its task's ``__call__`` calls it, both at 50 per
  second and at 50 per minute (the notes say why).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import math
import multiprocessing
import os
import queue
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

import redis

from benchmarks import _harness as h
from celery_unique import AsyncRedisBackend, RateLimit, RedisBackend

FULL, QUICK = (0.3, 7), (0.06, 3)
ADMIT_RATE = 1_000_000  # per second: never runs out, so every decision admits
TARGET_CONCURRENCY, TARGET_RATIO = 64, 3.0
SYNC_TARGET = 1.2  # ours sync against limits' fixed window
LONE_TARGET = 1.0  # a lone async caller against limits.aio's fixed window
ACCURACY_RATE, ACCURACY_BURST = 50, 10  # the accuracy limit: 50/s, ours also with burst 10
START_LEAD = 0.2  # seconds between handing out an accuracy run and its start
LATE_START = 0.9  # a late start begins this long after one hit: near a 1 s window's end
OWN_COMMANDS = ("echo", "client", "hello", "auth", "select")  # the marker and connection set-up

SyncDecide = Callable[[], bool]
AsyncDecide = Callable[[], Awaitable[bool]]

LIMITS, HEIMDALL = "limits", "celery-heimdall"
OURS_SYNC, OURS_ASYNC = "ours RateLimiter", "ours AsyncRateLimiter"
FIXED, MOVING = "limits FixedWindowRateLimiter", "limits MovingWindowRateLimiter"
AIO_FIXED, AIO_MOVING = "limits.aio FixedWindowRateLimiter", "limits.aio MovingWindowRateLimiter"
HEIMDALL_NAME = "celery-heimdall rate_limited_countdown"


class Skip(Exception):
    """A peer is installed but cannot be measured; the message says why."""


# --- the limiters, as "decide once" callables ------------------------------------------------


def ours_sync(backend: RedisBackend, limit: RateLimit, key: str) -> SyncDecide:
    hit = backend.rate_limiter(limit).hit

    def decide() -> bool:
        return hit(key).allowed

    return decide


def ours_async(backend: AsyncRedisBackend, limit: RateLimit, key: str) -> AsyncDecide:
    hit = backend.rate_limiter(limit).hit

    async def decide() -> bool:
        return (await hit(key)).allowed

    return decide


class LimitsKit:
    """The ``limits`` package on one Redis: sync storage and strategies, async on request."""

    def __init__(self, url: str) -> None:
        self.items = importlib.import_module("limits")
        strategies = importlib.import_module("limits.strategies")
        self.storage = importlib.import_module("limits.storage").RedisStorage(url)
        self.strategies = {
            FIXED: strategies.FixedWindowRateLimiter(self.storage),
            MOVING: strategies.MovingWindowRateLimiter(self.storage),
        }
        self.url = url
        self.aio_storage: Any = None
        self.aio_strategies: dict[str, Any] = {}

    def start_async(self) -> None:
        """The limits.aio storage, on redis-py's asyncio client (see ``LIMITS_AIO_NOTE``)."""
        storage_module = importlib.import_module("limits.aio.storage")
        strategies = importlib.import_module("limits.aio.strategies")
        self.aio_storage = storage_module.RedisStorage(
            f"async+{self.url}", implementation="redispy"
        )
        self.aio_strategies = {
            AIO_FIXED: strategies.FixedWindowRateLimiter(self.aio_storage),
            AIO_MOVING: strategies.MovingWindowRateLimiter(self.aio_storage),
        }

    def item(self, amount: int, per: str) -> Any:
        """``amount`` per second or per hour."""
        if per == "second":
            return self.items.RateLimitItemPerSecond(amount)
        return self.items.RateLimitItemPerHour(amount)

    def sync(self, strategy: str, item: Any, key: str) -> SyncDecide:
        hit = self.strategies[strategy].hit

        def decide() -> bool:
            allowed: bool = hit(item, key)
            return allowed

        return decide

    def aio(self, strategy: str, item: Any, key: str) -> AsyncDecide:
        hit = self.aio_strategies[strategy].hit

        async def decide() -> bool:
            allowed: bool = await hit(item, key)
            return allowed

        return decide

    async def aclose(self) -> None:
        self.storage.get_connection().close()
        if self.aio_storage is not None:
            await self.aio_storage.bridge.get_connection().aclose()


LIMITS_AIO_NOTE = (
    "limits.aio runs with implementation='redispy', on redis.asyncio like ours, so both sides "
    "use the same client library; its default client, coredis, is not measured."
)


class HeimdallKit:
    """celery-heimdall's rate-limit check, called the way its ``HeimdallTask.__call__`` calls
    it, without a worker: ``rate_limited_countdown(task, key, args, kwargs)`` is 0 when the
    task may run and a countdown to retry it after otherwise."""

    def __init__(self, url: str) -> None:
        module = importlib.import_module("celery_heimdall")
        task_module = importlib.import_module("celery_heimdall.task")
        try:
            self.countdown = task_module.rate_limited_countdown
            self.key_for = task_module.unique_key_for_task
        except AttributeError as exc:
            raise Skip(
                f"this version has no module-level rate-limit check ({exc}); its limit runs only "
                "inside HeimdallTask.__call__ on a worker, which retries the task when limited"
            ) from None
        celery = importlib.import_module("celery")
        # One client for every task, through the hook heimdall documents for choosing it.
        self.redis = redis.Redis.from_url(url)
        shared = self.redis

        def setup_redis(task: Any) -> redis.Redis:
            return shared

        self.base = type("BenchHeimdallTask", (module.HeimdallTask,), {"setup_redis": setup_redis})
        self.app = celery.Celery("bench-heimdall", set_as_current=False)

    def sync(self, key: str, times: int, per: int) -> SyncDecide:
        """A decider for ``times`` per ``per`` seconds; its Redis key is ``h-rate:<key>``."""
        name = f"bench.heimdall.{key}"

        def job() -> None:
            """The task body; never runs."""

        self.app.task(name=name, base=self.base, heimdall={"times": times, "per": per, "key": key})(
            job
        )
        task = self.app.tasks[name]
        countdown, key_for = self.countdown, self.key_for
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}

        def decide() -> bool:
            # What HeimdallTask.__call__ does before it runs the body (or retries when > 0).
            prefix = task.heimdall_config.rate_limit_prefix
            delay: int = countdown(task, key_for(task, args, kwargs, prefix=prefix), args, kwargs)
            return delay <= 0

        return decide

    def close(self) -> None:
        self.redis.close()
        self.app.close()


@dataclass
class Peers:
    limits: LimitsKit | None = None
    heimdall: HeimdallKit | None = None
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _try(peers: Peers, dist: str, module: str, make: Callable[[], Any]) -> Any:
    """``make()``, or None with a note saying why the peer is skipped."""
    try:
        built = make()
    except ImportError as exc:
        peers.notes.append(f"{dist} skipped: `import {module}` failed ({exc})")
        return None
    except Skip as exc:
        peers.notes.append(f"{dist} skipped: {exc}")
        return None
    peers.versions[dist] = importlib.metadata.version(dist)
    return built


def load_peers(url: str) -> Peers:
    peers = Peers()
    peers.limits = _try(peers, LIMITS, "limits", lambda: LimitsKit(url))
    peers.heimdall = _try(peers, HEIMDALL, "celery_heimdall", lambda: HeimdallKit(url))
    return peers


# --- part 1: cost ----------------------------------------------------------------------------


@dataclass
class Variant:
    """One limiter, one outcome, one concurrency; ``prime`` spends the limit of a ``deny``."""

    name: str
    kind: str  # "sync" or "async"
    concurrency: int
    outcome: str  # "admit" or "deny"
    ident: str  # every key it writes contains this
    decide: SyncDecide | None = None
    adecide: AsyncDecide | None = None
    prime: SyncDecide | None = None
    commands: dict[str, float] = field(default_factory=dict)  # sent per decision, by command
    in_scripts: dict[str, float] = field(default_factory=dict)  # run by Lua, per decision
    timed: h.Variant | None = None  # its rates, once measured

    @property
    def expected(self) -> bool:
        return self.outcome == "admit"

    @property
    def ours(self) -> bool:
        return self.name.startswith("ours")

    @property
    def group(self) -> str:
        return f"{self.kind} x{self.concurrency}"

    @property
    def total_commands(self) -> float:
        return sum(self.commands.values())

    async def decisions(self, per_caller: int) -> int:
        """``per_caller`` decisions by each caller, untimed; how many were made."""
        if self.decide is not None:
            for _ in range(per_caller):
                _check(self, self.decide())
            return per_caller
        adecide = self.adecide
        assert adecide is not None

        async def caller() -> None:
            for _ in range(per_caller):
                _check(self, await adecide())

        await asyncio.gather(*(caller() for _ in range(self.concurrency)))
        return per_caller * self.concurrency

    def measure(self, client: redis.Redis) -> h.Measure:
        """One timed run from a clean key (the reset is not timed); every outcome checked."""
        expected = self.expected
        if self.decide is not None:
            decide = self.decide

            def op() -> None:
                if decide() != expected:
                    raise _wrong(self)

            async def timed(seconds: float) -> float:
                _reset(client, self)
                return h.sync_rate(op, seconds)

            return timed
        adecide = self.adecide
        assert adecide is not None

        async def aop() -> None:
            if await adecide() != expected:
                raise _wrong(self)

        callers = [aop] * self.concurrency

        async def atimed(seconds: float) -> float:
            _reset(client, self)
            return await h.async_rate(callers, seconds)

        return atimed


def _wrong(variant: Variant) -> RuntimeError:
    got = "denied" if variant.expected else "admitted"
    return RuntimeError(f"{variant.name} ({variant.outcome}) {got} a decision: stale key?")


def _check(variant: Variant, allowed: bool) -> None:
    if allowed != variant.expected:
        raise _wrong(variant)


Group = list[Variant]  # one kind and concurrency; compared within


def _reset(client: redis.Redis, variant: Variant) -> None:
    """Delete the variant's keys; spend the limit again if it is to deny."""
    keys = list(client.scan_iter(match=f"*{variant.ident}*", count=1000))
    if keys:
        client.unlink(*keys)
    if variant.prime is not None and not variant.prime():
        raise RuntimeError(f"{variant.name}: the hit that spends the limit was denied")


def sync_group(backend: RedisBackend, peers: Peers) -> Group:
    admit, deny = RateLimit(f"{ADMIT_RATE}/s"), RateLimit(1, per=3600)
    group: Group = []

    def add(name: str, outcome: str, make: Callable[[str], SyncDecide]) -> None:
        ident = f"bench-sync-{len(group)}"
        decide = make(ident)
        prime = decide if outcome == "deny" else None
        group.append(Variant(name, "sync", 1, outcome, ident, decide=decide, prime=prime))

    for outcome, limit in (("admit", admit), ("deny", deny)):
        add(OURS_SYNC, outcome, partial(ours_sync, backend, limit))
    if (kit := peers.limits) is not None:
        for outcome, item in (
            ("admit", kit.item(ADMIT_RATE, "second")),
            ("deny", kit.item(1, "hour")),
        ):
            for strategy in (FIXED, MOVING):
                add(strategy, outcome, partial(kit.sync, strategy, item))
    if (heimdall := peers.heimdall) is not None:
        for outcome, times, per in (("admit", ADMIT_RATE, 1), ("deny", 1, 3600)):
            add(HEIMDALL_NAME, outcome, partial(heimdall.sync, times=times, per=per))
    return group


def async_group(
    backend: RedisBackend, abackend: AsyncRedisBackend, peers: Peers, concurrency: int
) -> Group:
    admit, deny = RateLimit(f"{ADMIT_RATE}/s"), RateLimit(1, per=3600)
    group: Group = []

    def add(name: str, outcome: str, adecide: Callable[[str], AsyncDecide],
            prime: Callable[[str], SyncDecide]) -> None:  # fmt: skip
        # A deny's limit is spent by a sync twin: same key layout, so the same key.
        ident = f"bench-async{concurrency}-{len(group)}"
        group.append(Variant(name, "async", concurrency, outcome, ident, adecide=adecide(ident),
                             prime=prime(ident) if outcome == "deny" else None))  # fmt: skip

    for outcome, limit in (("admit", admit), ("deny", deny)):
        add(OURS_ASYNC, outcome, partial(ours_async, abackend, limit),
            partial(ours_sync, backend, limit))  # fmt: skip
    if (kit := peers.limits) is not None:
        for outcome, item in (
            ("admit", kit.item(ADMIT_RATE, "second")),
            ("deny", kit.item(1, "hour")),
        ):
            for strategy, sync_twin in ((AIO_FIXED, FIXED), (AIO_MOVING, MOVING)):
                add(strategy, outcome, partial(kit.aio, strategy, item),
                    partial(kit.sync, sync_twin, item))  # fmt: skip
    return group


async def count_commands(client: redis.Redis, variant: Variant, decisions: int) -> None:
    """Commands sent per decision around a batch of about ``decisions``, seen by ``MONITOR``."""
    _reset(client, variant)
    per_caller = max(1, decisions // variant.concurrency)
    await variant.decisions(per_caller)  # warm-up: connections open, scripts loaded
    marker = f"bench-marker-{uuid.uuid4().hex}"
    sent: Counter[str] = Counter()
    in_scripts: Counter[str] = Counter()
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        made = await variant.decisions(per_caller)
        client.echo(marker)
        while True:
            entry = monitor.next_command()
            if marker in entry["command"]:
                break
            name = entry["command"].split(" ", 1)[0].lower()
            if name not in OWN_COMMANDS:
                (in_scripts if entry["client_type"] == "lua" else sent)[name] += 1
    variant.commands = {name: n / made for name, n in sorted(sent.items())}
    variant.in_scripts = {name: n / made for name, n in sorted(in_scripts.items())}


async def measure_cost(client: redis.Redis, groups: list[Group], chosen: h.Settings) -> None:
    timed = []
    for group in groups:
        for variant in group:
            variant.timed = h.Variant(variant.name, variant.group, variant.measure(client),
                                      variant.concurrency)  # fmt: skip
            timed.append(variant.timed)
    await h.interleave(timed, chosen.seconds, chosen.reps, label="rate_limit: ")


def _ours_of(group: Group, variant: Variant) -> Variant:
    return next(v for v in group if v.ours and v.outcome == variant.outcome)


def ours_over(group: Group, variant: Variant) -> float | None:
    """Median per-repetition ratio of ours (same group and outcome) to ``variant``."""
    return h.ratio(_ours_of(group, variant).timed, variant.timed)


# --- part 2: accuracy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One accuracy run: which limiter (``kind``), the bound it is held to, and how it starts:
    on a fresh key, or (``late``) ``LATE_START`` s after one hit, just before a window ends."""

    kind: str
    label: str
    limit: str
    rate: float  # tokens per second
    burst: int
    late: bool = False


def accuracy_cases(peers: Peers, late: bool) -> list[Case]:
    rate = ACCURACY_RATE
    cases = [
        Case("ours-burst", OURS_SYNC, f'RateLimit("{rate}/s", burst={ACCURACY_BURST})', rate,
             ACCURACY_BURST),
        Case("ours", OURS_SYNC, f'RateLimit("{rate}/s") (burst {rate})', rate, rate),
    ]  # fmt: skip
    if peers.limits is not None:
        cases += [
            Case("limits-fixed", FIXED, f"RateLimitItemPerSecond({rate})", rate, rate),
            Case("limits-moving", MOVING, f"RateLimitItemPerSecond({rate})", rate, rate),
        ]
    if peers.heimdall is not None:
        cases += [
            Case("heimdall", HEIMDALL_NAME, f"times={rate}, per=1", rate, rate),
            Case("heimdall-minute", HEIMDALL_NAME, f"times={rate}, per=60", rate / 60, rate),
        ]
    if late:
        cases += [
            Case(case.kind, case.label, case.limit, case.rate, case.burst, late=True)
            for case in cases
            if case.kind in ("ours", "limits-fixed", "limits-moving")
        ]
    return cases


def _case_decider(kind: str, url: str, key: str, cache: dict[str, Any]) -> SyncDecide:
    """The decider of ``kind`` on ``key``; clients are made once per process (``cache``)."""
    if kind in ("ours", "ours-burst"):
        if "ours" not in cache:
            cache["ours"] = RedisBackend.from_url(url)
        burst = ACCURACY_BURST if kind == "ours-burst" else None
        return ours_sync(cache["ours"], RateLimit(f"{ACCURACY_RATE}/s", burst=burst), key)
    if kind in ("limits-fixed", "limits-moving"):
        if "limits" not in cache:
            cache["limits"] = LimitsKit(url)
        kit: LimitsKit = cache["limits"]
        strategy = FIXED if kind == "limits-fixed" else MOVING
        return kit.sync(strategy, kit.item(ACCURACY_RATE, "second"), key)
    if kind in ("heimdall", "heimdall-minute"):
        if "heimdall" not in cache:
            cache["heimdall"] = HeimdallKit(url)
        heimdall: HeimdallKit = cache["heimdall"]
        return heimdall.sync(key, ACCURACY_RATE, 1 if kind == "heimdall" else 60)
    raise ValueError(f"unknown accuracy case {kind!r}")


def _redis_time_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def hammer_process(url: str, kinds: list[str], jobs: Queue[Any], results: Queue[Any]) -> None:
    """A spawned process: for each job, decide as fast as it can from the job's start to its
    end; report (admitted, attempts, TIME before the first, TIME after the last, the client
    clock of each admission)."""
    try:
        cache: dict[str, Any] = {}
        for kind in kinds:  # imports and clients now; no command is sent before a job
            _case_decider(kind, url, f"hammer-unused-{kind}", cache)
        clock = redis.Redis.from_url(url)
        results.put(("ready", os.getpid()))
        while (job := jobs.get()) is not None:
            kind, key, start_at, seconds = job
            decide = _case_decider(kind, url, key, cache)
            _case_decider(kind, url, f"{key}-warm", cache)()  # connect, load scripts
            clock.ping()
            time.sleep(max(0.0, start_at - time.time()))
            end = start_at + seconds
            admitted, attempts, stamps = 0, 0, []
            first = _redis_time_us(clock)
            while time.time() < end:
                attempts += 1
                if decide():
                    stamps.append(time.time())
                    admitted += 1
            last = _redis_time_us(clock)
            results.put(("done", admitted, attempts, first, last, stamps))
    except Exception:
        results.put(("error", traceback.format_exc()))


class Hammer:
    """``procs`` spawned processes that hammer one key together, run after run."""

    def __init__(self, url: str, procs: int, kinds: list[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.results: Queue[Any] = context.Queue()
        self.jobs: list[Queue[Any]] = [context.Queue() for _ in range(procs)]
        self.processes: list[BaseProcess] = [
            context.Process(target=hammer_process, args=(url, kinds, jobs, self.results),
                            daemon=True)
            for jobs in self.jobs
        ]  # fmt: skip
        for process in self.processes:
            process.start()
        self.ready = self.closed = False

    def _get(self, timeout: float) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = self.results.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError("a hammer process did not answer in time") from None
        if message[0] == "error":
            raise RuntimeError(f"a hammer process failed:\n{message[1]}")
        return message

    def wait_ready(self) -> None:
        if not self.ready:
            for _ in self.processes:
                self._get(timeout=120)
            self.ready = True

    def run(self, kind: str, key: str, start_at: float, seconds: float) -> list[tuple[Any, ...]]:
        self.wait_ready()
        for jobs in self.jobs:
            jobs.put((kind, key, start_at, seconds))
        return [self._get(timeout=start_at - time.time() + seconds + 60) for _ in self.processes]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for jobs in self.jobs:
            jobs.put(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()  # only our own children
                process.join(5)


@dataclass
class Accuracy:
    case: Case
    procs: int
    admitted: int
    attempts: int
    elapsed: float  # seconds, Redis TIME
    peak: float  # the most admitted in any interval beyond rate x its length

    @property
    def bound(self) -> float:
        return self.case.burst + self.case.rate * self.elapsed

    @property
    def over(self) -> int:
        return max(0, self.admitted - math.floor(self.bound))

    @property
    def oversubscription(self) -> float:
        return self.attempts / self.elapsed / self.case.rate


def peak_burst(stamps: list[float], rate: float) -> float:
    """max over i <= j of (admissions i..j) - rate x (t_j - t_i): a token bucket's burst."""
    peak, lowest = 0.0, math.inf
    origin = min(stamps, default=0.0)
    for k, stamp in enumerate(sorted(stamps)):
        level = k - rate * (stamp - origin)
        lowest = min(lowest, level)
        peak = max(peak, level - lowest + 1)
    return peak


def run_case(client: redis.Redis, hammer: Hammer, case: Case, seconds: float, url: str,
             cache: dict[str, Any]) -> Accuracy:  # fmt: skip
    key = f"bench-accuracy-{case.kind}-{uuid.uuid4().hex[:8]}"
    first, admitted, stamps = math.inf, 0, []
    start_at = time.time() + START_LEAD
    if case.late:  # one hit here, the crowd just before its window (if any) ends
        prime = _case_decider(case.kind, url, key, cache)
        _case_decider(case.kind, url, f"{key}-warm", cache)()
        first = _redis_time_us(client)
        if prime():
            admitted, stamps = 1, [time.time()]
        start_at = time.time() + LATE_START
    replies = hammer.run(case.kind, key, start_at, seconds)
    first = min(first, *(reply[3] for reply in replies))
    last = max(reply[4] for reply in replies)
    stamps += [stamp for reply in replies for stamp in reply[5]]
    for found in client.scan_iter(match=f"*{key}*", count=1000):
        client.unlink(found)
    return Accuracy(
        case, len(replies), admitted=admitted + sum(reply[1] for reply in replies),
        attempts=sum(reply[2] for reply in replies), elapsed=(last - first) / 1e6,
        peak=peak_burst(stamps, case.rate),
    )  # fmt: skip


# --- driver ----------------------------------------------------------------------------------


@dataclass
class Results:
    groups: list[Group]
    accuracy: list[Accuracy]
    versions: dict[str, str]
    notes: list[str]


async def measure(url: str, chosen: h.Settings, command_decisions: int,
                  accuracy_seconds: float, procs: int, late: bool) -> Results:  # fmt: skip
    client = redis.Redis.from_url(url)
    backend = RedisBackend.from_url(url)
    abackend = AsyncRedisBackend.from_url(url)
    peers = load_peers(url)
    cases = accuracy_cases(peers, late)
    # Spawned now: the processes import while the commands are counted (they send none).
    hammer = Hammer(url, procs, sorted({case.kind for case in cases}))
    try:
        if peers.limits is not None:
            peers.limits.start_async()
            peers.notes.append(LIMITS_AIO_NOTE)
        if peers.heimdall is not None:
            peers.notes.append(
                "celery-heimdall: its check, rate_limited_countdown(), is called directly as "
                "HeimdallTask.__call__ calls it (no worker); 0 means run now, more means the "
                "task would be retried after that many seconds (counted as denied). It counts "
                "in whole seconds: at times=50, per=1 the countdown it gives after a refusal "
                "grows by per // times = 0 s, so nearly every later call gets 0 and runs. At "
                "times=50, per=60 that arithmetic works; any excess there comes from reading "
                "the count (GET) and raising it (INCR) as separate commands while other "
                "processes do the same."
            )
        groups = [sync_group(backend, peers)]
        groups += [async_group(backend, abackend, peers, c) for c in h.CONCURRENCY]
        for group in groups:
            for variant in group:
                await count_commands(client, variant, command_decisions)
        cache: dict[str, Any] = {"ours": backend}  # the clients a late start's first hit uses
        if peers.limits is not None:
            cache["limits"] = peers.limits
        if peers.heimdall is not None:
            cache["heimdall"] = peers.heimdall
        if not late:
            peers.notes.append("late-start accuracy runs skipped (--quick)")
        accuracy = []
        for case in cases:
            accuracy.append(run_case(client, hammer, case, accuracy_seconds, url, cache))
            print(f"accuracy {case.kind}{' late' if case.late else ''} done", file=sys.stderr)
        hammer.close()  # before the cost runs: nothing else on these CPUs
        await measure_cost(client, groups, chosen)
        return Results(groups, accuracy, peers.versions, peers.notes)
    finally:
        hammer.close()
        if peers.limits is not None:
            await peers.limits.aclose()
        if peers.heimdall is not None:
            peers.heimdall.close()
        await abackend.aclose()
        backend.close()
        client.close()


def _spell(commands: dict[str, float]) -> str:
    return ", ".join(f"{name.upper()} {n:g}" for name, n in commands.items())


def cost_table(groups: list[Group]) -> str:
    header = ["limiter", "callers", "outcome", "median decisions/s", "ours / this",
              "Redis cmds/decision", "commands sent per decision"]  # fmt: skip
    rows = []
    for group in groups:
        for variant in sorted(group, key=lambda v: (v.outcome, not v.ours)):
            detail = _spell(variant.commands)
            if variant.in_scripts:
                detail += f" (in Lua: {_spell(variant.in_scripts)})"
            assert variant.timed is not None
            ratio = "—" if variant.ours else h.times(ours_over(group, variant))
            rows.append([variant.name, str(variant.concurrency), variant.outcome,
                         h.rate(variant.timed.median), ratio, f"{variant.total_commands:.2f}",
                         detail])  # fmt: skip
    return h.table(header, rows, left=(0, 2, 6))


def _start(case: Case) -> str:
    return f"{LATE_START:g} s after 1 hit" if case.late else "fresh key"


def accuracy_table(results: list[Accuracy]) -> str:
    lines = [
        "| limiter | limit | start | processes | attempts/s | oversubscription "
        "| elapsed s (Redis TIME) | admitted | bound = burst + rate x elapsed "
        "| admitted / bound | over | peak burst |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        (
            f"| {r.case.label} | {r.case.limit} | {_start(r.case)} | {r.procs} "
            f"| {r.attempts / r.elapsed:,.0f} | {r.oversubscription:,.0f}x | {r.elapsed:.3f} "
            f"| {r.admitted} | {r.case.burst} + {r.case.rate:.4g} x {r.elapsed:.3f} = "
            f"{r.bound:.1f} | {r.admitted / r.bound:.3f} | {r.over} "
            f"| {r.peak:.1f} (burst {r.case.burst}) |"
        )
        for r in results
    ]
    return "\n".join(lines)


def targets(groups: list[Group]) -> list[h.Target]:
    """Ours sync against limits' fixed window, ours async against limits.aio at 64 callers."""
    found = []
    for group in groups:
        for variant in group:
            if variant.kind == "sync" and variant.name == FIXED:
                found.append(h.Target(f"sync {OURS_SYNC}.hit / {FIXED}, {variant.outcome}",
                                      ours_over(group, variant), SYNC_TARGET))  # fmt: skip
            if variant.kind == "async" and variant.concurrency == 1 and variant.name == AIO_FIXED:
                label = f"lone {OURS_ASYNC}.hit / {variant.name}, {variant.outcome}"
                found.append(h.Target(label, ours_over(group, variant), LONE_TARGET))
            if variant.kind == "async" and variant.concurrency == TARGET_CONCURRENCY:
                if variant.name in (AIO_FIXED, AIO_MOVING):
                    label = (f"{OURS_ASYNC} / {variant.name}, {variant.outcome}, "
                             f"{TARGET_CONCURRENCY} callers")  # fmt: skip
                    found.append(h.Target(label, ours_over(group, variant), TARGET_RATIO))
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accuracy-seconds", type=float, help="one accuracy run (default 2.5)")
    parser.add_argument("--procs", type=int, default=4, help="hammer processes (default 4)")


async def run(url: str, chosen: h.Settings) -> h.Section:
    # Accuracy runs last a whole number of windows and a half: whether a window opens just
    # before the end would otherwise decide what a windowed limiter admits.
    accuracy_seconds, command_decisions = (1.5, 64) if chosen.quick else (2.5, 200)
    accuracy_seconds = getattr(chosen.args, "accuracy_seconds", None) or accuracy_seconds
    procs: int = getattr(chosen.args, "procs", None) or 4
    results = await measure(url, chosen, command_decisions, accuracy_seconds, procs,
                            late=not chosen.quick)  # fmt: skip
    groups, accuracy = results.groups, results.accuracy
    section = h.Section("Rate limiting: decisions per second on one key, and accuracy")
    section.blocks.append("Cost: decisions per second, one key")
    section.blocks.append(cost_table(groups))
    ours_commands = {
        f"{v.name} {v.outcome} x{v.concurrency}": v.commands
        for group in groups
        for v in group
        if v.ours
    }
    one_evalsha = all(commands == {"evalsha": 1.0} for commands in ours_commands.values())
    section.blocks.append(
        "- ours sends "
        + ("exactly one EVALSHA per decision in every row" if one_evalsha else
           f"NOT one EVALSHA per decision: {ours_commands}")
    )  # fmt: skip
    section.blocks.append(f"Accuracy: {procs} spawned processes on one key, flat out, "
                          f"{accuracy_seconds:g} s per limiter")  # fmt: skip
    section.blocks.append(accuracy_table(accuracy))
    lines = []
    ours_over_bound = [r.over for r in accuracy if r.case.label == OURS_SYNC]
    lines.append(f"- ours over the bound: {', '.join(map(str, ours_over_bound))} (required 0: "
                 f"{'met' if not any(ours_over_bound) else 'MISSED'})")  # fmt: skip
    slow = [r.case.label for r in accuracy if r.oversubscription < 10]
    if slow:
        lines.append(f"- under 10x oversubscription (the run says little): {', '.join(slow)}")
    section.blocks.append("\n".join(lines))
    if not any(v.name == FIXED for group in groups for v in group):
        section.notes.append("targets against limits: n/a, limits was not measured")
    section.targets += targets(groups)
    section.notes += results.notes
    section.versions.update(results.versions)
    section.data["cost"] = [
        {
            "limiter": v.name,
            "kind": v.kind,
            "concurrency": v.concurrency,
            "outcome": v.outcome,
            "median_decisions_per_s": round(v.timed.median, 1) if v.timed else None,
            "ours_over_this": None if v.ours else ours_over(group, v),
            "redis_commands_per_decision": round(v.total_commands, 3),
            "commands_sent": v.commands,
            "commands_in_lua": v.in_scripts,
            "decisions_per_s": [round(r, 1) for r in v.timed.rates] if v.timed else [],
        }
        for group in groups
        for v in group
    ]
    section.data["accuracy"] = [
        {
            "limiter": r.case.label,
            "limit": r.case.limit,
            "burst": r.case.burst,
            "rate_per_s": r.case.rate,
            "start": _start(r.case),
            "processes": r.procs,
            "attempts": r.attempts,
            "elapsed_s": round(r.elapsed, 6),
            "admitted": r.admitted,
            "bound": round(r.bound, 3),
            "admitted_over_bound": round(r.admitted / r.bound, 4),
            "over": r.over,
            "peak_burst": round(r.peak, 2),
        }
        for r in accuracy
    ]
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK, add_arguments)
