"""The client processes: each takes locks, semaphore slots and rate-limit decisions through
the fault proxy, in a seeded random order, and writes what it saw to its history.

What to do next is drawn as a :class:`Plan` (pure, from the process' own seeded ``Random``);
a sync process carries plans out on threads' terms, an async one (anyio, on asyncio or on
trio) on several tasks at once. Every call is recorded with its invocation and completion time.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from celery_unique import (
    AsyncLock,
    AsyncRedisBackend,
    AsyncSemaphore,
    CeleryUniqueError,
    Lock,
    RateLimit,
    RedisBackend,
    Semaphore,
)

from .history import History, now

__all__ = ["LOCKS", "RATES", "SEMAPHORES", "ClientConfig", "Plan", "draw", "main"]

LOCKS = ("L0", "L1")
SEMAPHORES = {"S0": 2, "S1": 3}  # name -> limit
RATES = {"R0": RateLimit("5/s"), "R1": RateLimit(10, per=1, burst=3)}
#: The longest ttl a client uses: every key of the run is gone this long after the last call.
MAX_TTL = 2.0


@dataclass(frozen=True)
class ClientConfig:
    """What a client process is told (picklable: processes are spawned)."""

    name: str
    flavour: str  # "sync" | "async" (asyncio) | "trio" | "tasks"
    url: str
    prefix: str
    seed: int
    run_dir: str
    start_at: float  # history clock
    stop_at: float
    socket_timeout: float
    tasks: int = 3  # concurrent tasks of an async process
    broker: str = ""  # the Celery broker of a task client


@dataclass(frozen=True)
class Plan:
    """One thing a client does next."""

    kind: str  # "lock" | "semaphore" | "rate"
    name: str
    ttl: float = 0.0
    blocking: bool = False
    timeout: float | None = None
    renew: bool = False
    section: float = 0.0  # seconds held
    extend_at: float | None = None  # seconds into the section an explicit extend is sent
    hits: int = 0


def draw(rng: random.Random) -> Plan:
    """The next plan. Renewed holders keep their section longer than the ttl (renewal must
    carry them); the others stay well inside it (only a fault should make them overrun)."""
    roll = rng.random()
    if roll < 0.25:
        return Plan("rate", rng.choice(sorted(RATES)), hits=rng.randint(1, 6))
    kind = "lock" if roll < 0.65 else "semaphore"
    name = rng.choice(LOCKS) if kind == "lock" else rng.choice(sorted(SEMAPHORES))
    blocking = rng.random() < 0.6
    timeout = round(rng.uniform(0.2, 2.0), 3) if blocking else None
    if rng.random() < 0.3:
        ttl = 1.5
        return Plan(kind, name, ttl, blocking, timeout, True, round(rng.uniform(0.5, 3.5), 3))
    ttl = rng.choice((1.0, 2.0))
    section = round(rng.uniform(0.01, 0.4) * ttl, 3)
    extend_at = round(section / 2, 3) if rng.random() < 0.3 else None
    return Plan(kind, name, ttl, blocking, timeout, False, section, extend_at)


class Recorder:
    """Writes each call's record: invocation, completion, result or error."""

    def __init__(self, history: History) -> None:
        self.history = history

    def done(
        self, op: str, plan: Plan, t0: float, result: Any, exc: Exception | None, **fields: Any
    ) -> None:
        if exc is not None:
            fields.update(
                error=type(exc).__name__,
                lib=isinstance(exc, CeleryUniqueError),
                message=str(exc)[:300],  # what to change, by the library's own words
            )
        else:
            fields["result"] = result
        if plan.kind == "rate":
            limit = RATES[plan.name]
            fields["rate"] = [limit.count, limit.per, limit.burst]
        else:
            fields.update(ttl=plan.ttl, renew=plan.renew)
            if plan.kind == "semaphore":
                fields["limit"] = SEMAPHORES[plan.name]
        self.history.write(op, plan.kind, plan.name, t0=t0, t1=now(), **fields)

    def call(self, op: str, plan: Plan, fn: Callable[[], Any], **fields: Any) -> Any:
        t0 = now()
        try:
            result = fn()
        except Exception as exc:
            self.done(op, plan, t0, None, exc, **fields)
            return None
        self.done(op, plan, t0, _plain(result), None, **fields)
        return result

    async def acall(
        self, op: str, plan: Plan, fn: Callable[[], Awaitable[Any]], **fields: Any
    ) -> Any:
        t0 = now()
        try:
            result = await fn()
        except Exception as exc:
            self.done(op, plan, t0, None, exc, **fields)
            return None
        self.done(op, plan, t0, _plain(result), None, **fields)
        return result

    def lost(self, plan: Plan, token: str) -> None:
        t = now()
        self.history.write("lost", plan.kind, plan.name, t0=t, t1=t, token=token)


def _plain(result: Any) -> Any:
    allowed = getattr(result, "allowed", None)  # a rate limiter's Decision
    return allowed if allowed is not None else result


# -- sync ------------------------------------------------------------------------------------


def _sync_hold(backend: RedisBackend, rec: Recorder, plan: Plan) -> None:
    held: Lock | Semaphore
    if plan.kind == "lock":
        held = backend.lock(
            plan.name, plan.ttl, auto_renew=plan.renew, on_lost=lambda h: rec.lost(plan, h.token)
        )
    else:
        held = backend.semaphore(
            plan.name,
            SEMAPHORES[plan.name],
            plan.ttl,
            auto_renew=plan.renew,
            on_lost=lambda h: rec.lost(plan, h.token),
        )
    token = held.token
    t0 = now()
    try:
        acquired = held.acquire(blocking=plan.blocking, timeout=plan.timeout)
    except Exception as exc:
        rec.done("acquire", plan, t0, None, exc, blocking=plan.blocking, timeout=plan.timeout)
        return
    fence = getattr(held, "fence", None)
    rec.done(
        "acquire",
        plan,
        t0,
        acquired,
        None,
        blocking=plan.blocking,
        timeout=plan.timeout,
        token=held.token,
        fence=fence,
    )
    if not acquired:
        return
    token = held.token
    if plan.extend_at is not None:
        time.sleep(plan.extend_at)
        rec.call("extend", plan, held.extend, token=token)
        time.sleep(plan.section - plan.extend_at)
    else:
        time.sleep(plan.section)
    t0 = now()
    try:
        held.release()
    except Exception as exc:
        rec.done("release", plan, t0, None, exc, token=token, lost=held.lost)
        held.abandon()  # stop a renewal a failed release left running
        return
    rec.done("release", plan, t0, None, None, token=token, lost=held.lost)


def _run_sync(config: ClientConfig, rec: Recorder) -> None:
    rng = random.Random(config.seed)
    with RedisBackend.from_url(
        config.url,
        key_prefix=config.prefix,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
    ) as backend:
        limiters = {name: backend.rate_limiter(limit) for name, limit in RATES.items()}
        _sleep_until(config.start_at)
        while now() < config.stop_at:
            plan = draw(rng)
            if plan.kind == "rate":
                for _ in range(plan.hits):
                    rec.call("hit", plan, functools.partial(limiters[plan.name].hit, plan.name))
            else:
                _sync_hold(backend, rec, plan)
            time.sleep(rng.uniform(0.0, 0.05))


# -- async -----------------------------------------------------------------------------------


async def _async_hold(backend: AsyncRedisBackend, rec: Recorder, plan: Plan) -> None:
    held: AsyncLock | AsyncSemaphore
    if plan.kind == "lock":
        held = backend.lock(
            plan.name, plan.ttl, auto_renew=plan.renew, on_lost=lambda h: rec.lost(plan, h.token)
        )
    else:
        held = backend.semaphore(
            plan.name,
            SEMAPHORES[plan.name],
            plan.ttl,
            auto_renew=plan.renew,
            on_lost=lambda h: rec.lost(plan, h.token),
        )
    t0 = now()
    try:
        acquired = await held.acquire(blocking=plan.blocking, timeout=plan.timeout)
    except Exception as exc:
        rec.done("acquire", plan, t0, None, exc, blocking=plan.blocking, timeout=plan.timeout)
        return
    fence = getattr(held, "fence", None)
    rec.done(
        "acquire",
        plan,
        t0,
        acquired,
        None,
        blocking=plan.blocking,
        timeout=plan.timeout,
        token=held.token,
        fence=fence,
    )
    if not acquired:
        return
    token = held.token
    if plan.extend_at is not None:
        await anyio.sleep(plan.extend_at)
        await rec.acall("extend", plan, held.extend, token=token)
        await anyio.sleep(plan.section - plan.extend_at)
    else:
        await anyio.sleep(plan.section)
    t0 = now()
    try:
        await held.release()
    except Exception as exc:
        rec.done("release", plan, t0, None, exc, token=token, lost=held.lost)
        await held.abandon()
        return
    rec.done("release", plan, t0, None, None, token=token, lost=held.lost)


async def _run_async(config: ClientConfig, rec: Recorder) -> None:
    backend = AsyncRedisBackend.from_url(
        config.url,
        key_prefix=config.prefix,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
    )
    limiters = {name: backend.rate_limiter(limit) for name, limit in RATES.items()}

    async def loop(index: int) -> None:
        rng = random.Random(config.seed * 100 + index)
        while now() < config.stop_at:
            plan = draw(rng)
            if plan.kind == "rate":
                for _ in range(plan.hits):
                    await rec.acall(
                        "hit", plan, functools.partial(limiters[plan.name].hit, plan.name)
                    )
            else:
                await _async_hold(backend, rec, plan)
            await anyio.sleep(rng.uniform(0.0, 0.05))

    await anyio.sleep(max(0.0, config.start_at - now()))
    try:
        async with anyio.create_task_group() as group:
            for index in range(config.tasks):
                group.start_soon(loop, index)
    finally:
        with anyio.move_on_after(5, shield=True):
            await backend.aclose()


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - now()))


def main(config: ClientConfig) -> None:
    """A client process' body (the target of a spawned ``multiprocessing.Process``)."""
    run_dir = Path(config.run_dir)
    # SIGUSR1 dumps every thread's stack: the runner sends it to a process stuck at the end.
    stacks = open(run_dir / f"stacks-{config.name}.txt", "w")  # open for good: faulthandler
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    # The library logs each lost lease; the run's output stays for the figures.
    logging.basicConfig(filename=run_dir / f"{config.name}.log", level=logging.WARNING)
    history = History(run_dir / f"{config.name}.jsonl", config.name)
    rec = Recorder(history)
    try:
        if config.flavour == "sync":
            _run_sync(config, rec)
        elif config.flavour == "tasks":
            from . import tasks  # (Celery is imported by task clients only)

            tasks.configure(config.broker, config.url, config.prefix, config.socket_timeout)
            _sleep_until(config.start_at)
            tasks.run_client(history, config.seed, config.stop_at)
        else:
            backend = "trio" if config.flavour == "trio" else "asyncio"
            anyio.run(_run_async, config, rec, backend=backend)
    finally:
        history.close()
