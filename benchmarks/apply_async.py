"""Producer overhead: ``apply_async`` calls per second, plain Celery against unique tasks.

Run ``python benchmarks/apply_async.py`` (about 70 s) or ``--quick`` (about 10 s); ``--json
PATH`` also writes the results. One private ``redis-server`` (``celery_unique.testing``) is
broker, result backend and lock store for every variant. No worker runs: only the producer
side is measured. Messages pile up in one queue per variant, which is deleted (with the
variant's lock keys) after every run, so the server's memory does not grow.

Variants, each a loop of ``task.apply_async((n,))`` for a fixed time:

* ``plain publish``: a plain ``@app.task``; the baseline.
* ``EVALSHA + plain publish``: the call site runs this library's acquire.lua once with a raw
  ``client.evalsha`` (a client built like ours, same keys, token and TTL), then publishes the
  plain task. This is the floor for a unique task: one round trip plus a publish, nothing
  else. ``EVALSHA + AsyncResult (duplicate floor)`` is the floor for a duplicate: the same
  script on a lock another token holds, then the holder's ``AsyncResult`` from the reply.
* ``ours new key``: ``UniqueTask`` with a new argument (so a new lock) on every call.
* ``ours duplicate``: ``UniqueTask`` called with the arguments of an instance that already
  holds the lock: it publishes nothing and returns the holder's ``AsyncResult``.
* peers from PyPI, each new key and duplicate, when importable (else a note says why not):
  ``celery-singleton`` (``Singleton``; a duplicate returns the holder's ``AsyncResult``),
  ``celery-once`` (``QueueOnce``; a duplicate raises ``AlreadyQueued``, which the loop
  catches) and ``celery-heimdall`` (``HeimdallTask``). Heimdall's duplicate by default retries
  its lock for ``unique_lock_timeout`` (1 s); ``unique_raises=True`` does not change that.
  It runs with ``unique_lock_blocking=False``, its fastest setting: a duplicate fails at once
  and returns the holder's ``AsyncResult`` (its default, like ours and celery-singleton's).

How to read the table:

* ``median calls/s`` is the median over repetitions. Each repetition runs every variant once,
  in an order that turns from one repetition to the next; ``ratio to plain`` and ``ratio to
  EVALSHA+plain`` are medians of per-repetition ratios (each run against the baseline's run in
  the same repetition), which shrugs off slow drift in machine load. Client and server share
  this machine's CPUs, so absolute numbers mean little elsewhere; the ratios travel better.
  Differences of a few percent are within the noise of a busy machine (see the load average).
* Commands are counted over a batch of calls, outside the timed runs. ``Redis cmds/call`` is
  what the client sent (MULTI/EXEC included), seen by ``MONITOR``; ``server cmds/call`` is
  what ``INFO commandstats`` counted between ``CONFIG RESETSTAT`` and the end of the batch,
  which adds the commands each Lua script ran (listed as "in Lua"). A plain publish is LPUSH
  plus the SUBSCRIBE/UNSUBSCRIBE of Celery's Redis result backend (the ``AsyncResult``
  subscribes to its result channel and unsubscribes when dropped). ``extra over plain`` is
  the total minus a plain publish's commands, or the whole total for a duplicate, which
  publishes nothing: what the unique lock costs in commands. Ours must be 1 (one EVALSHA).
* The lines under the table check the targets: ours new key against the floor (>= 0.95x) and
  ours duplicate against celery-singleton's duplicate (>= 2x), then give the context: how
  close ours comes to the duplicate floor, and how far the floor itself is from singleton.

Celery sends SUBSCRIBE/UNSUBSCRIBE without reading their replies; between runs the benchmark
reads them (outside the timing), so they do not pile up in a socket over a long run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import redis
from celery import Celery
from celery.utils import uuid

from celery_unique import RedisBackend, UniqueTask
from celery_unique.core.scripts import ACQUIRE
from celery_unique.testing import redis_server

TTL = 3600  # seconds every lock is taken for; all are deleted long before
WARMUP_CALLS = 20  # before every timed run
DUPLICATE_ARG = -1  # the argument of every duplicate call (new-key calls count up from 0)
PLAIN, FLOOR = "plain publish", "EVALSHA + plain publish"
DUP_FLOOR = "EVALSHA + AsyncResult (duplicate floor)"
OURS_NEW, OURS_DUP = "ours new key", "ours duplicate"
SINGLETON_DUP = "celery-singleton duplicate"

Call = Callable[[], object]


@dataclass
class Variant:
    """One thing to measure: ``call()`` makes one ``apply_async`` call."""

    name: str
    call: Call
    queue: str  # the broker queue its messages go to (deleted after every run)
    lock_patterns: tuple[str, ...]  # SCAN patterns of the lock keys it leaves behind
    publishes: bool  # False for a duplicate: it publishes nothing
    prepare: Call | None = None  # run before every run: a duplicate needs a holder
    rates: list[float] = field(default_factory=list)  # calls/s, one per repetition
    to_plain: list[float] = field(default_factory=list)  # per-repetition ratios
    to_floor: list[float] = field(default_factory=list)
    commands: dict[str, float] = field(default_factory=dict)  # sent per call, by command
    in_scripts: dict[str, float] = field(default_factory=dict)  # run by Lua, per call
    server_commands: float = 0.0  # per call, all INFO commandstats counted

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def total_commands(self) -> float:
        return sum(self.commands.values())


@dataclass
class Bench:
    """The variants and what the run needs to clean up after each of them."""

    client: redis.Redis
    apps: list[Celery]
    variants: list[Variant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def job(n: int) -> int:
    """The body of every task; never runs (no worker)."""
    return n


def _app(name: str, url: str, **conf: Any) -> Celery:
    app = Celery(name, broker=url, backend=url, set_as_current=False)
    app.conf.update(conf)
    return app


def _register(app: Celery, name: str, **options: Any) -> None:
    app.task(name=name, queue=name, **options)(job)


def _task(app: Celery, name: str) -> Any:
    app.finalize(auto=True)
    return app.tasks[name]  # the task itself, not the lazy proxy @app.task returns


def _new_key_call(task: Any, counter: Iterator[int]) -> Call:
    def call() -> None:
        task.apply_async((next(counter),))

    return call


def _duplicate_call(task: Any, catch: type[BaseException] | None = None) -> Call:
    if catch is None:

        def call() -> None:
            task.apply_async((DUPLICATE_ARG,))

        return call

    def call_catching() -> None:
        try:
            task.apply_async((DUPLICATE_ARG,))
        except catch:
            pass

    return call_catching


def _pair(
    bench: Bench,
    label: str,
    app: Celery,
    lock_patterns: tuple[str, ...],
    catch: type[BaseException] | None = None,
) -> None:
    """The new-key and duplicate variants of one unique-task library."""
    slug = label.replace(" ", "-")
    new, dup = _task(app, f"bench.{slug}.new"), _task(app, f"bench.{slug}.dup")
    holder = _duplicate_call(dup, catch)  # the first such call takes the lock and publishes
    bench.variants += [
        Variant(f"{label} new key", _new_key_call(new, itertools.count()), new.queue,
                lock_patterns, publishes=True),
        Variant(f"{label} duplicate", _duplicate_call(dup, catch), dup.queue,
                lock_patterns, publishes=False, prepare=holder),
    ]  # fmt: skip
    bench.apps.append(app)


def _ours(bench: Bench, url: str) -> None:
    app = _app("bench-base", url, unique_key_prefix="bench-cu:")
    _register(app, "bench.plain")
    _register(app, "bench.floor")
    for kind in ("new", "dup"):
        _register(app, f"bench.ours.{kind}", base=UniqueTask)
    plain, floor = _task(app, "bench.plain"), _task(app, "bench.floor")

    # The floor: the very script, keys and client settings ours uses, called directly.
    client = RedisBackend.from_url(url).client
    if client.script_load(ACQUIRE.source) != ACQUIRE.sha:
        raise RuntimeError("SCRIPT LOAD of acquire.lua gave an unexpected SHA")
    counter = itertools.count()
    sha, ttl_ms = ACQUIRE.sha, TTL * 1000

    def floor_call() -> None:
        n = next(counter)
        token = uuid()
        reply = client.evalsha(sha, 1, f"bench-raw:lock:{{{n}}}", token, ttl_ms)
        if reply[0] != 1:
            raise RuntimeError("the floor found a lock taken that should have been free")
        floor.apply_async((n,), task_id=token)

    # The duplicate floor: the same script on a lock another token holds, and the holder's
    # AsyncResult built from its reply, which is all a duplicate has to do.
    held = "bench-raw:lock:{held}"

    def hold() -> None:
        client.evalsha(sha, 1, held, "bench-holder", ttl_ms)

    def dup_floor_call() -> None:
        reply = client.evalsha(sha, 1, held, uuid(), ttl_ms)
        if reply[0] != 0:
            raise RuntimeError("the duplicate floor took a lock that should have been held")
        app.AsyncResult(reply[1].decode())

    bench.variants += [
        Variant(PLAIN, _new_key_call(plain, itertools.count()), plain.queue, (), True),
        Variant(FLOOR, floor_call, floor.queue, ("bench-raw:*",), True),
        Variant(DUP_FLOOR, dup_floor_call, "bench.dup-floor", (), False, prepare=hold),
    ]
    _pair(bench, "ours", app, ("bench-cu:*",))


def _peer_singleton(bench: Bench, url: str) -> None:
    module = importlib.import_module("celery_singleton")
    app = _app("bench-singleton", url, singleton_key_prefix="bench-singleton:")
    for kind in ("new", "dup"):
        _register(app, f"bench.celery-singleton.{kind}", base=module.Singleton)
    _pair(bench, "celery-singleton", app, ("bench-singleton:*",))


def _peer_once(bench: Bench, url: str) -> None:
    module = importlib.import_module("celery_once")
    settings = {"url": url, "default_timeout": TTL}
    app = _app(
        "bench-once", url, ONCE={"backend": "celery_once.backends.Redis", "settings": settings}
    )
    for kind in ("new", "dup"):
        _register(app, f"bench.celery-once.{kind}", base=module.QueueOnce)
    # Its keys are "qo_<task name>_<arguments>", with no configurable prefix.
    _pair(bench, "celery-once", app, ("qo_bench.celery-once.*",), catch=module.AlreadyQueued)
    bench.notes.append("celery-once: a duplicate raises AlreadyQueued (its default); caught.")


def _peer_heimdall(bench: Bench, url: str) -> None:
    module = importlib.import_module("celery_heimdall")
    app = _app("bench-heimdall", url, heimdall_lock_prefix="bench-heimdall:")
    options = {"unique": True, "unique_timeout": TTL, "unique_lock_blocking": False}
    for kind in ("new", "dup"):
        _register(app, f"bench.celery-heimdall.{kind}", base=module.HeimdallTask, heimdall=options)
    _pair(bench, "celery-heimdall", app, ("bench-heimdall:*",))
    bench.notes.append(
        f"celery-heimdall runs with heimdall={options}: a duplicate fails at once and returns "
        "the holder's AsyncResult (by default it retries for unique_lock_timeout, ~1 s; "
        "unique_raises=True raises AlreadyQueuedError after the same wait)."
    )


PEERS: dict[str, tuple[str, Callable[[Bench, str], None]]] = {
    # distribution name: (module, set-up)
    "celery-singleton": ("celery_singleton", _peer_singleton),
    "celery-once": ("celery_once", _peer_once),
    "celery-heimdall": ("celery_heimdall", _peer_heimdall),
}


def _add_peer(bench: Bench, url: str, dist: str) -> None:
    module, setup = PEERS[dist]
    try:
        setup(bench, url)
    except ImportError as exc:
        bench.notes.append(f"{dist} skipped: `import {module}` failed ({exc})")
    else:
        bench.versions[dist] = importlib.metadata.version(dist)


def build(url: str) -> Bench:
    bench = Bench(redis.Redis.from_url(url), [])
    _ours(bench, url)
    for dist in PEERS:
        _add_peer(bench, url, dist)
    return bench


# --- running --------------------------------------------------------------------------------


def _drain_result_replies(apps: list[Celery]) -> None:
    """Read the SUBSCRIBE/UNSUBSCRIBE replies Celery's result backend never reads."""
    for app in apps:
        pubsub = getattr(getattr(app.backend, "result_consumer", None), "_pubsub", None)
        connection = getattr(pubsub, "connection", None)
        while pubsub is not None and connection is not None and connection.can_read(timeout=0):
            pubsub.get_message(timeout=0)


def cleanup(bench: Bench, variant: Variant) -> None:
    """Delete the variant's queue and lock keys; read pending result-backend replies."""
    client = bench.client
    for pattern in (f"{variant.queue}*", *variant.lock_patterns):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(batch), 500):
            client.unlink(*batch[start : start + 500])
    _drain_result_replies(bench.apps)


def timed(bench: Bench, variant: Variant, seconds: float) -> float:
    """Calls per second of one run, warm-up and clean-up excluded."""
    if variant.prepare is not None:
        variant.prepare()
    call = variant.call
    for _ in range(WARMUP_CALLS):
        call()
    count = 0
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    while clock() < deadline:
        call()
        count += 1
    elapsed = clock() - start
    cleanup(bench, variant)
    return count / elapsed


def check(bench: Bench, variant: Variant) -> None:
    """A new-key call must publish one message, a duplicate none."""
    if variant.prepare is not None:
        variant.prepare()
    before = bench.client.llen(variant.queue)
    variant.call()
    published = bench.client.llen(variant.queue) - before
    cleanup(bench, variant)
    if published != int(variant.publishes):
        raise RuntimeError(f"{variant.name}: one call published {published} messages")


OWN_COMMANDS = ("config", "info", "echo", "hello")  # the measurement's own (and its connects)


def count_commands(bench: Bench, variant: Variant, calls: int) -> None:
    """Commands per call around ``calls`` calls, from ``INFO commandstats`` and ``MONITOR``.

    ``INFO commandstats`` counts the commands a Lua script runs as well as the EVALSHA that ran
    it; ``MONITOR`` tells the two apart (a script's commands come from client "lua").
    """
    client = bench.client
    if variant.prepare is not None:
        variant.prepare()
    for _ in range(WARMUP_CALLS):
        variant.call()
    _drain_result_replies(bench.apps)
    marker = f"bench-marker-{uuid()}"
    sent: Counter[str] = Counter()
    in_scripts: Counter[str] = Counter()
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        client.config_resetstat()
        for _ in range(calls):
            variant.call()
        stats: dict[str, Any] = client.info("commandstats")
        client.echo(marker)
        while True:
            entry = monitor.next_command()
            if marker in entry["command"]:
                break
            name = entry["command"].split(" ", 1)[0].lower()
            if name not in OWN_COMMANDS:
                (in_scripts if entry["client_type"] == "lua" else sent)[name] += 1
    cleanup(bench, variant)
    variant.commands = {name: n / calls for name, n in sorted(sent.items())}
    variant.in_scripts = {name: n / calls for name, n in sorted(in_scripts.items())}
    counted = sum(
        value["calls"]
        for key, value in stats.items()
        if key.removeprefix("cmdstat_") not in OWN_COMMANDS
    )
    variant.server_commands = counted / calls
    if counted != sent.total() + in_scripts.total():
        bench.notes.append(
            f"{variant.name}: INFO commandstats counted {counted} commands, MONITOR saw "
            f"{sent.total()} sent + {in_scripts.total()} in scripts"
        )


def measure(bench: Bench, seconds: float, reps: int, command_calls: int) -> None:
    variants = bench.variants
    plain, floor = bench.get(PLAIN), bench.get(FLOOR)
    assert plain is not None and floor is not None
    for variant in variants:
        check(bench, variant)
        count_commands(bench, variant, command_calls)
    for variant in variants:  # a longer first warm-up: fills pools, settles caches
        timed(bench, variant, seconds / 2)
    for rep in range(reps):
        shift = rep % len(variants)  # the order turns every repetition
        for variant in variants[shift:] + variants[:shift]:
            variant.rates.append(timed(bench, variant, seconds))
        for variant in variants:
            variant.to_plain.append(variant.rates[-1] / plain.rates[-1])
            variant.to_floor.append(variant.rates[-1] / floor.rates[-1])
        print(f"rep {rep + 1}/{reps} done", file=sys.stderr)


# --- reporting ------------------------------------------------------------------------------


def lock_commands(variant: Variant, plain: Variant) -> float:
    """Commands a variant sends beyond a plain publish (all of them if it publishes none)."""
    return variant.total_commands - (plain.total_commands if variant.publishes else 0.0)


def table(bench: Bench) -> str:
    plain = bench.get(PLAIN)
    assert plain is not None
    lines = [
        "| variant | median calls/s | ratio to plain | ratio to EVALSHA+plain "
        "| Redis cmds/call | extra over plain | server cmds/call | commands sent per call |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in bench.variants:
        detail = _spell(v.commands)
        if v.in_scripts:
            detail += f" (in Lua: {_spell(v.in_scripts)})"
        lines.append(
            f"| {v.name} | {v.median:,.0f} | {statistics.median(v.to_plain):.2f}x "
            f"| {statistics.median(v.to_floor):.2f}x | {v.total_commands:.2f} "
            f"| {lock_commands(v, plain):+.2f} | {v.server_commands:.2f} | {detail} |"
        )
    return "\n".join(lines)


def _spell(commands: dict[str, float]) -> str:
    return ", ".join(f"{name.upper()} {n:g}" for name, n in commands.items())


def ratio(numerator: Variant | None, denominator: Variant | None) -> float | None:
    """Median of per-repetition ratios, or None if either variant did not run."""
    if numerator is None or denominator is None:
        return None
    return statistics.median(a / b for a, b in zip(numerator.rates, denominator.rates, strict=True))


def targets(bench: Bench) -> list[tuple[str, float | None, float | None]]:
    """(what, median ratio, target): the targets, then the context to read them in."""
    ours_new, ours_dup, floor = bench.get(OURS_NEW), bench.get(OURS_DUP), bench.get(FLOOR)
    singleton_dup, dup_floor = bench.get(SINGLETON_DUP), bench.get(DUP_FLOOR)
    return [
        ("ours new key / (EVALSHA + plain publish)", ratio(ours_new, floor), 0.95),
        ("ours duplicate / celery-singleton duplicate", ratio(ours_dup, singleton_dup), 2.0),
        ("ours duplicate / duplicate floor", ratio(ours_dup, dup_floor), None),
        ("duplicate floor / celery-singleton duplicate (the best one round trip can do)",
         ratio(dup_floor, singleton_dup), None),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="0.15 s runs, 3 repetitions")
    parser.add_argument("--seconds", type=float, help="length of one run (default 0.6)")
    parser.add_argument("--reps", type=int, help="repetitions (default 9)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    seconds, reps, command_calls = (0.15, 3, 50) if args.quick else (0.6, 9, 200)
    seconds, reps = args.seconds or seconds, args.reps or reps

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with redis_server() as url:
        bench = build(url)
        try:
            measure(bench, seconds, reps, command_calls)
            redis_version = str(bench.client.info("server")["redis_version"])
        finally:
            bench.client.close()
    total = time.perf_counter() - started
    plain = bench.get(PLAIN)
    ours_dup = bench.get(OURS_DUP)
    assert plain is not None and ours_dup is not None

    print(table(bench))
    print()
    for label, value, target in targets(bench):
        wanted = "" if target is None else f"target >= {target:g}x"
        if value is None:
            print(f"- {label}: n/a (a variant was skipped){'; ' if wanted else ''}{wanted}")
        elif target is None:
            print(f"- {label}: {value:.2f}x")
        else:
            print(f"- {label}: {value:.2f}x ({wanted}: {'met' if value >= target else 'MISSED'})")
    dup_evalsha_only = ours_dup.commands == {"evalsha": 1.0}
    print(
        f"- ours duplicate sends {ours_dup.total_commands:g} Redis command(s) per call "
        f"({'exactly one EVALSHA: as required' if dup_evalsha_only else 'NOT one EVALSHA'})"
    )
    for note in bench.notes:
        print(f"- {note}")
    peers = ", ".join(f"{dist} {version}" for dist, version in bench.versions.items())
    print()
    print(
        f"Redis {redis_version}, Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}; peers: {peers or 'none'}; median of {reps} reps of "
        f"{seconds:g} s each; total {total:.0f} s; {os.cpu_count()} CPUs, load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    )
    if args.json is not None:
        meta: dict[str, Any] = {
            "redis_server": redis_version,
            "python": platform.python_version(),
            "celery": celery.__version__,
            "redis_py": redis.__version__,
            "peers": bench.versions,
            "notes": bench.notes,
            "reps": reps,
            "seconds_per_run": seconds,
            "total_seconds": round(total, 1),
            "cpus": os.cpu_count(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        results = [
            {
                "variant": v.name,
                "median_calls_per_s": round(v.median, 1),
                "ratio_to_plain": round(statistics.median(v.to_plain), 4),
                "ratio_to_floor": round(statistics.median(v.to_floor), 4),
                "redis_commands_per_call": round(v.total_commands, 3),
                "extra_commands_over_plain": round(lock_commands(v, plain), 3),
                "server_commands_per_call": round(v.server_commands, 3),
                "commands_sent": v.commands,
                "commands_in_lua": v.in_scripts,
                "calls_per_s": [round(rate, 1) for rate in v.rates],
            }
            for v in bench.variants
        ]
        checks = [
            {"ratio": label, "value": None if value is None else round(value, 4), "target": target}
            for label, value, target in targets(bench)
        ]
        document = {"meta": meta, "results": results, "targets": checks}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
