"""The fault suite's helpers: servers it starts and kills itself, outages watched call by call,
and the figures it measures, printed at the end of the run (``nox -s faults``)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from celery_unique import BackendUnavailable
from celery_unique.testing import RedisServer, running_redis
from tests.celery.conftest import celery_app, make_app  # noqa: F401  (fixtures used here too)

FIGURES: list[str] = []


def report(line: str) -> None:
    """Record a measured figure; every one is printed in the run's summary."""
    FIGURES.append(line)
    print(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault suite figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Collect the garbage after each test: a socket it left open is reported against it,
    not against whichever later test the collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of this test's own, to pause, kill and restart."""
    with running_redis() as running:
        yield running


class Outage:
    """What callers saw while a server was down: every error must be BackendUnavailable,
    each call must end within ``deadline`` seconds; ``worked_at`` is when a call first
    succeeded after :meth:`mark` (monotonic seconds)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.errors = 0
        self.calls = 0
        self.slowest = 0.0
        self.marked: float | None = None
        self.worked_at: float | None = None
        self._counted = threading.Condition()

    def mark(self) -> None:
        """From now on, the first success counts as the recovery."""
        self.marked = time.monotonic()
        self.worked_at = None

    def record(self, started: float, error: BaseException | None) -> None:
        took = time.monotonic() - started
        with self._counted:
            self.calls += 1
        self.slowest = max(self.slowest, took)
        assert took <= self.deadline, f"a call took {took:.2f} s, past its {self.deadline} s"
        if error is not None:
            if not isinstance(error, BackendUnavailable):
                raise AssertionError(f"not BackendUnavailable: {error!r}") from error
            with self._counted:
                self.errors += 1
        elif self.marked is not None and self.worked_at is None:
            self.worked_at = time.monotonic()
        with self._counted:
            self._counted.notify_all()

    def wait_errors(self, more: int, timeout: float = 10.0) -> bool:
        """Wait (on a thread) until ``more`` errors beyond those so far were seen: callers
        have met the outage, for a while."""
        with self._counted:
            target = self.errors + more
            return self._counted.wait_for(lambda: self.errors >= target, timeout)

    def wait_calls(self, more: int, timeout: float = 10.0) -> bool:
        """Wait (on a thread) until ``more`` calls beyond those so far have ended."""
        with self._counted:
            target = self.calls + more
            return self._counted.wait_for(lambda: self.calls >= target, timeout)

    def call(self, operation: Callable[[], object]) -> bool:
        started = time.monotonic()
        try:
            operation()
        except Exception as exc:
            self.record(started, exc)
            return False
        self.record(started, None)
        return True

    async def acall(self, operation: Callable[[], Awaitable[object]]) -> bool:
        started = time.monotonic()
        try:
            await operation()
        except Exception as exc:
            self.record(started, exc)
            return False
        self.record(started, None)
        return True


def until_working(outage: Outage, operation: Callable[[], object], within: float) -> float:
    """Call ``operation`` until it works (errors checked by ``outage``); seconds it took."""
    started = time.monotonic()
    while not outage.call(operation):
        assert time.monotonic() - started < within, f"still failing after {within} s"
        time.sleep(0.02)
    return time.monotonic() - started


async def auntil_working(
    outage: Outage, operation: Callable[[], Awaitable[object]], within: float
) -> float:
    """The asyncio twin of :func:`until_working`."""
    started = time.monotonic()
    while not await outage.acall(operation):
        assert time.monotonic() - started < within, f"still failing after {within} s"
        await anyio.sleep(0.02)
    return time.monotonic() - started


def redis_time_us(client: Any) -> int:
    """Redis' clock in µs (``TIME``), through a redis-py client."""
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


Operations = dict[str, Callable[[], Awaitable[object]]]


def operations_on(backend: Any, name: str) -> Operations:
    """One call of each kind on ``name`` (a backend, or a sync one seen through the async
    surface of ``make_backend``)."""
    return {
        "lock": lambda: backend.acquire_or_owner(name, "me", 30),
        "owner": lambda: backend.owner(name),
        # A holder of its own each time: a server that lost its data forgot the last one.
        "semaphore": lambda: backend.semaphore(name, limit=10**6, ttl=30).acquire(blocking=False),
        "hit": lambda: backend.rate_limiter("100000/s").hit(name),
    }


async def streaming(outage: Outage, operations: Operations, stop: anyio.Event) -> None:
    """Call every operation in turn until ``stop`` is set (errors checked by ``outage``)."""
    while not stop.is_set():
        for operation in operations.values():
            await outage.acall(operation)
        await anyio.lowlevel.checkpoint()
