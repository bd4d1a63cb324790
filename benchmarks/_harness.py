"""What every benchmark shares: timing loops, interleaved repetitions, medians and ratios,
markdown tables, the command line, one Redis for the run, and the environment footer.

A benchmark is a module with ``run(url, settings) -> Section``; its ``main()`` is
``harness.main(run, __doc__)``. ``python -m benchmarks`` runs them all on one Redis.

How numbers are made, for every table:

* A variant is one thing to measure; ``measure(seconds)`` does one timed run (after its own
  untimed warm-up and set-up) and returns operations per second.
* Variants of one group are compared with each other. Each repetition runs every variant of
  a group once, back to back, in an order that turns from one repetition to the next.
* ``median`` is the median rate over repetitions; a ratio between two variants of a group is
  the median of their per-repetition ratios (each run against the other's run in the same
  repetition), which shrugs off slow drift in machine load. Client and server share this
  machine's CPUs, so absolute rates mean little elsewhere: quote the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery_unique import AsyncRedisBackend, RedisBackend

WARMUP = 20  # untimed operations before every timed run, shared among concurrent callers
CONCURRENCY = (1, 16, 64)  # async tasks the async variants run at

Measure = Callable[[float], Awaitable[float]]
SyncOp = Callable[[], object]
AsyncOp = Callable[[], Awaitable[object]]


# --- timing loops ----------------------------------------------------------------------------


def sync_rate(op: SyncOp, seconds: float, warmup: int = WARMUP) -> float:
    """Calls of ``op`` per second over ``seconds``, in this thread."""
    for _ in range(warmup):
        op()
    clock = time.perf_counter
    count = 0
    start = clock()
    deadline = start + seconds
    while clock() < deadline:
        op()
        count += 1
    return count / (clock() - start)


async def async_rate(ops: Sequence[AsyncOp], seconds: float, warmup: int = WARMUP) -> float:
    """Calls per second of ``len(ops)`` concurrent tasks, each awaiting its op in a loop."""

    async def warm(op: AsyncOp) -> None:
        for _ in range(max(1, warmup // len(ops))):
            await op()

    await asyncio.gather(*(warm(op) for op in ops))
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds

    async def loop(op: AsyncOp) -> int:
        count = 0
        while clock() < deadline:
            await op()
            count += 1
        return count

    counts = await asyncio.gather(*(loop(op) for op in ops))
    return sum(counts) / (clock() - start)


def threads_rate(ops: Sequence[SyncOp], seconds: float, warmup: int = WARMUP) -> float:
    """Calls per second of ``len(ops)`` threads, each calling its op in a loop; timed from
    the moment all of them are warm and released together."""
    window: list[float] = []
    errors: list[BaseException] = []

    def opened() -> None:  # runs in one thread once all have arrived, before any is released
        start = time.perf_counter()
        window[:] = [start, start + seconds]

    barrier = threading.Barrier(len(ops), action=opened)
    counts = [0] * len(ops)

    def worker(index: int, op: SyncOp) -> None:
        try:
            for _ in range(max(1, warmup // len(ops))):
                op()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        clock, deadline, count = time.perf_counter, window[1], 0
        try:
            while clock() < deadline:
                op()
                count += 1
        except BaseException as exc:
            errors.append(exc)
        counts[index] = count

    threads = [threading.Thread(target=worker, args=(i, op)) for i, op in enumerate(ops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - window[0]) if window else 0.0


def timed_sync(op: SyncOp) -> Measure:
    """A measure of ``op`` in the loop's thread (the loop is idle meanwhile, on purpose)."""

    async def measure(seconds: float) -> float:
        return sync_rate(op, seconds)

    return measure


def timed_async(ops: Sequence[AsyncOp]) -> Measure:
    """A measure of ``ops`` as concurrent tasks."""

    async def measure(seconds: float) -> float:
        return await async_rate(ops, seconds)

    return measure


# --- variants, repetitions, ratios -----------------------------------------------------------


@dataclass
class Variant:
    """One thing to measure, in one group of things compared with each other."""

    name: str
    group: str
    measure: Measure
    concurrency: int = 1
    rates: list[float] = field(default_factory=list)  # operations/s, one per repetition
    extra: dict[str, Any] = field(default_factory=dict)  # what a benchmark adds (commands...)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def ratio(numerator: Variant | None, denominator: Variant | None) -> float | None:
    """Median of per-repetition ratios, or ``None`` if either variant did not run."""
    if numerator is None or denominator is None or not numerator.rates:
        return None
    pairs = zip(numerator.rates, denominator.rates, strict=True)
    return statistics.median(a / b for a, b in pairs)


def groups_of(variants: Sequence[Variant]) -> list[list[Variant]]:
    """The variants by group, groups and members in the order given."""
    found: dict[str, list[Variant]] = {}
    for variant in variants:
        found.setdefault(variant.group, []).append(variant)
    return list(found.values())


async def interleave(
    variants: Sequence[Variant], seconds: float, reps: int, *, label: str = ""
) -> None:
    """Run every variant ``reps`` times (after one half-length warm-up run each), group by
    group, each repetition in a turned order; rates are appended to each variant."""
    groups = groups_of(variants)
    for group in groups:  # a longer first warm-up: fills the pools, settles caches
        for variant in group:
            await variant.measure(seconds / 2)
    for rep in range(reps):
        for group in groups:
            shift = rep % len(group)
            for variant in group[shift:] + group[:shift]:
                variant.rates.append(await variant.measure(seconds))
        print(f"{label}rep {rep + 1}/{reps} done", file=sys.stderr)


def async_group(makers: Mapping[str, Callable[[str], AsyncOp]], concurrency: int) -> list[Variant]:
    """One variant per maker, each run by ``concurrency`` tasks on names of their own
    (``makers`` maps a label to a function making one task's operation for a name)."""
    return [
        Variant(
            label,
            f"async x{concurrency}",
            timed_async([make(f"bench-a{concurrency}-{n}-{i}") for i in range(concurrency)]),
            concurrency,
        )
        for n, (label, make) in enumerate(makers.items())
    ]


async def run_pairs(
    url: str,
    chosen: Settings,
    scripts: Sequence[Any],
    sync_variants: Callable[[Any], list[Variant]],
    async_variants: Callable[[Any, int], list[Variant]],
    *,
    label: str,
) -> list[Variant]:
    """Load ``scripts`` (whose raw variants call them by SHA), build the sync variants on a
    sync backend and the async ones on an async backend at each of :data:`CONCURRENCY`, and
    interleave them all; the measured variants."""
    backend = RedisBackend.from_url(url)
    abackend = AsyncRedisBackend.from_url(url)
    try:
        for script in scripts:
            if backend.client.script_load(script.source) != script.sha:
                raise RuntimeError(f"SCRIPT LOAD of {script.name} gave an unexpected SHA")
        variants = sync_variants(backend)
        for concurrency in CONCURRENCY:
            variants += async_variants(abackend, concurrency)
        await interleave(variants, chosen.seconds, chosen.reps, label=label)
    finally:
        await abackend.aclose()
        backend.close()
    return variants


# --- what a benchmark reports ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A ratio the library must reach, or (``wanted`` None) context to read one by."""

    label: str
    value: float | None
    wanted: float | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None or self.wanted is None:
            return None
        return self.value >= self.wanted

    def line(self) -> str:
        if self.value is None:
            shown = "n/a (a variant was skipped)"
        else:
            shown = f"{self.value:.2f}x"
        if self.wanted is None:
            return f"- {self.label}: {shown}"
        verdict = "n/a" if self.met is None else "met" if self.met else "MISSED"
        return f"- {self.label}: {shown} (target >= {self.wanted:g}x: {verdict})"


@dataclass
class Section:
    """One benchmark's results: its tables and lines, what it ran, and its JSON."""

    title: str
    blocks: list[str] = field(default_factory=list)  # markdown tables and bullet lists
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # the peers measured
    data: dict[str, Any] = field(default_factory=dict)
    settings: Settings | None = None  # how it was run (set by the driver)

    @property
    def short(self) -> str:
        return self.title.split(":", 1)[0]

    def text(self) -> str:
        parts = [f"## {self.title}", *self.blocks]
        lines = [target.line() for target in self.targets]
        lines += [f"- {note}" for note in self.notes]
        if lines:
            parts.append("\n".join(lines))
        return "\n\n".join(parts)

    def json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "targets": [
                {"ratio": t.label, "value": _round(t.value), "target": t.wanted, "met": t.met}
                for t in self.targets
            ],
            "notes": self.notes,
            "peers": self.versions,
            "reps": None if self.settings is None else self.settings.reps,
            "seconds_per_run": None
            if self.settings is None or self.settings.unit != "s"
            else self.settings.seconds,
            "run": None if self.settings is None else self.settings.run,
            **self.data,
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int | Sequence[int] = 1
) -> str:
    """A markdown table; the first ``left`` columns (or those listed) are left-aligned, the
    others right."""
    lefts = range(left) if isinstance(left, int) else left
    align = ["---" if i in lefts else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def rate(value: float) -> str:
    return f"{value:,.0f}"


def times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def variant_json(variant: Variant, **ratios: float | None) -> dict[str, Any]:
    """A variant's rates and the ratios given, for the JSON output."""
    return {
        "variant": variant.name,
        "group": variant.group,
        "concurrency": variant.concurrency,
        "median_per_s": round(variant.median, 1),
        "per_s": [round(r, 1) for r in variant.rates],
        **{name: _round(value) for name, value in ratios.items()},
        **variant.extra,
    }


def version(dist: str) -> str | None:
    """The installed version of ``dist``, or ``None``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the command line and the run ------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long to measure: ``seconds`` per run, ``reps`` repetitions; ``quick`` for a smoke
    run (each benchmark scales its own extras by it); ``args``: the whole command line.

    A benchmark whose runs are a fixed amount of work rather than a time (the worker's: N
    tasks) has that amount in ``seconds`` and names it in ``unit`` (``"tasks"``)."""

    seconds: float
    reps: int
    quick: bool
    args: argparse.Namespace = field(default_factory=argparse.Namespace, compare=False)
    unit: str = "s"

    @property
    def run(self) -> str:
        """One run's size, spelled: ``0.5 s``, ``300 tasks``."""
        return f"{self.seconds:g} {self.unit}"


Extend = Callable[[argparse.ArgumentParser], None]


def parser(doc: str | None, extend: Extend | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes, plus what ``extend`` adds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="short runs, 3 repetitions")
    parser.add_argument("--seconds", type=float, help="length of one timed run")
    parser.add_argument("--reps", type=int, help="repetitions")
    parser.add_argument("--url", help="an existing Redis to use (default: a private one)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    if extend is not None:
        extend(parser)
    return parser


def settings(
    args: argparse.Namespace,
    full: tuple[float, int],
    quick: tuple[float, int],
    unit: str = "s",
) -> Settings:
    """``full`` or ``quick`` (seconds, reps), unless the command line says otherwise; for
    another ``unit``, (amount, reps), overridden by the ``--<unit>`` option."""
    size, reps = quick if args.quick else full
    given = args.seconds if unit == "s" else getattr(args, unit, None)
    return Settings(given or size, args.reps or reps, bool(args.quick), args, unit)


@contextlib.contextmanager
def serve(url: str | None) -> Iterator[str]:
    """``url``, or a private ``redis-server`` for the run (see ``celery_unique.testing``)."""
    if url is not None:
        yield url
        return
    from celery_unique.testing import redis_server

    with redis_server() as started:
        yield started


Run = Callable[[str, Settings], Coroutine[Any, Any, Section]]


def main(
    run: Run,
    doc: str | None,
    full: tuple[float, int],
    quick: tuple[float, int],
    extend: Extend | None = None,
    unit: str = "s",
) -> None:
    """One benchmark on its own: its tables, then the footer."""
    args = parser(doc, extend).parse_args()
    chosen = settings(args, full, quick, unit)
    environment = Environment()
    with serve(args.url) as url:
        environment.limit_before(url)
        section = asyncio.run(run(url, chosen))
        section.settings = chosen
        environment.limit_after(url)
    print(section.text())
    print()
    print(environment.footer([section]))
    if args.json is not None:
        document = {"meta": environment.json([section]), "sections": [section.json()]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


# --- the environment: versions, load, the server's own limit ---------------------------------


PING = "PING"  # redis-benchmark's ping_mbulk: PING as a RESP array, the way redis-py sends it
LIMIT_REQUESTS = 20000


class Environment:
    """What the footer reports: versions, CPUs, load before and after, and what
    ``redis-benchmark -c 1`` gets from the same server (one client, one command at a time:
    the most any single connection can do there)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.load_before = os.getloadavg()
        self.binary = shutil.which("redis-benchmark")
        self.binary_version = "?"
        if self.binary is not None:
            found = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=30
            ).stdout.split()
            self.binary_version = " ".join(found[:2]) if found else "?"
        self.limits: dict[str, list[float]] = {}
        self.server = "?"

    def limit_before(self, url: str) -> None:
        self._limit(url)

    def limit_after(self, url: str) -> None:
        self._limit(url)

    def _limit(self, url: str) -> None:
        import redis

        from celery_unique.core.scripts import ACQUIRE

        client = redis.Redis.from_url(url)
        try:
            self.server = str(client.info("server")["redis_version"])
            client.script_load(ACQUIRE.source)
        finally:
            client.close()
        if self.binary is None:
            return
        parts = urlsplit(url)
        base = [self.binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        base += ["-c", "1", "-n", str(LIMIT_REQUESTS), "-q"]
        # The acquire script on one key with one token: every run after the first takes the
        # re-acquire branch (GET, PEXPIRE), about what one lock call costs the server.
        commands = {
            PING: ["-t", "ping_mbulk"],
            "EVALSHA acquire.lua": ["EVALSHA", ACQUIRE.sha, "1", "bench-limit", "t", "30000"],
        }
        for name, extra in commands.items():
            out = subprocess.run(
                [*base, *extra], capture_output=True, text=True, timeout=120, check=True
            ).stdout
            found = re.findall(r"([\d.]+) requests per second", out)
            if found:
                self.limits.setdefault(name, []).append(float(found[-1]))
        client = redis.Redis.from_url(url)
        try:
            client.delete("bench-limit")
        finally:
            client.close()

    def limit_text(self) -> str:
        if self.binary is None:
            return "redis-benchmark not on PATH: the server's own limit was not measured"
        spelled = [
            f"{name} {' / '.join(rate(v) for v in values)}/s"
            for name, values in self.limits.items()
        ]
        evalsha = self.limits.get("EVALSHA acquire.lua")
        pair = (
            f": {' / '.join(rate(v / 2) for v in evalsha)} lock pairs/s at most" if evalsha else ""
        )
        return (
            f"`redis-benchmark -c 1 -n 20000 -q` ({self.binary_version}, {self.binary}) on the "
            "same server, before / after: "
            + ", ".join(spelled)
            + f" (one client, one command at a time; a lock pair is two round trips{pair})"
        )

    def footer(self, sections: Sequence[Section]) -> str:
        import redis

        peers = {k: v for section in sections for k, v in section.versions.items()}
        load_after = os.getloadavg()
        spelled = ", ".join(f"{dist} {v}" for dist, v in peers.items()) or "none"
        celery = version("celery")
        return (
            f"Redis {self.server}, Python {platform.python_version()}, redis-py "
            f"{redis.__version__}, Celery {celery or 'absent'}, celery-unique "
            f"{version('celery-unique') or '?'}; peers: {spelled}. Medians of "
            f"{_runs(sections)}; total {time.perf_counter() - self.started:.0f} s. "
            f"{os.cpu_count()} CPUs, load average "
            f"(1/5/15 min) {_load(self.load_before)} before, {_load(load_after)} after. "
            f"{self.limit_text()}."
        )

    def json(self, sections: Sequence[Section]) -> dict[str, Any]:
        import redis

        return {
            "redis_server": self.server,
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "celery": version("celery"),
            "peers": {k: v for section in sections for k, v in section.versions.items()},
            "total_seconds": round(time.perf_counter() - self.started, 1),
            "cpus": os.cpu_count(),
            "load_average_before": list(self.load_before),
            "load_average_after": list(os.getloadavg()),
            "redis_benchmark": self.binary,
            "redis_benchmark_version": self.binary_version,
            "redis_benchmark_c1_per_s": self.limits,
        }


def _runs(sections: Sequence[Section]) -> str:
    spelled = [
        f"{s.short} {s.settings.reps} x {s.settings.run}"
        for s in sections
        if s.settings is not None
    ]
    return "; ".join(spelled) + " repetitions per variant"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)
