"""Producer overhead: ``apply_async`` calls per second, plain Celery against unique tasks.

Run ``python -m benchmarks.apply_async`` (about 80 s) or ``--quick`` (about 15 s); ``--json
PATH`` also writes the results, ``--url`` uses a running Redis instead of a private one.
One Redis is broker, result backend and lock store for every variant. No worker runs: only
the producer side is measured. Messages pile up in one queue per variant, which is deleted (with the
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

* ``median calls/s`` and the ratios are made as ``benchmarks/_harness.py`` says: every
  variant is one group, interleaved; ``ratio to plain`` and ``ratio to EVALSHA+plain`` are
  medians of per-repetition ratios. Differences of a few percent are noise on a busy machine.
* Commands are counted over a batch of calls, outside the timed runs. ``Redis cmds/call`` is
  what the client sent (MULTI/EXEC included), seen by ``MONITOR``; ``server cmds/call`` is
  what ``INFO commandstats`` counted between ``CONFIG RESETSTAT`` and the end of the batch,
  which adds the commands each Lua script ran (listed as "in Lua"). A plain publish is LPUSH
  plus the SUBSCRIBE/UNSUBSCRIBE of Celery's Redis result backend (the ``AsyncResult``
  subscribes to its result channel and unsubscribes when dropped). ``extra over plain`` is
  the total minus a plain publish's commands, or the whole total for a duplicate, which
  publishes nothing: what the unique lock costs in commands. Ours must be 1 (one EVALSHA).
* The lines under the table check the targets: ours new key against the floor (>= 0.95x) and
  ours duplicate against celery-singleton's duplicate (>= 2.5x), then give the context: how
  close ours comes to the duplicate floor, and how far the floor itself is from singleton.

Celery sends SUBSCRIBE/UNSUBSCRIBE without reading their replies; between runs the benchmark
reads them (outside the timing), so they do not pile up in a socket over a long run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from celery.utils import uuid

from benchmarks import _harness as h
from celery_unique import RedisBackend, UniqueTask
from celery_unique.core.scripts import ACQUIRE

FULL, QUICK = (0.6, 9), (0.15, 3)
TTL = 3600  # seconds every lock is taken for; all are deleted long before
DUPLICATE_ARG = -1  # the argument of every duplicate call (new-key calls count up from 0)
PLAIN, FLOOR = "plain publish", "EVALSHA + plain publish"
DUP_FLOOR = "EVALSHA + AsyncResult (duplicate floor)"
OURS_NEW, OURS_DUP = "ours new key", "ours duplicate"
SINGLETON_DUP = "celery-singleton duplicate"
GROUP = "apply_async"

Call = Callable[[], object]


@dataclass
class Case:
    """One thing to measure: ``call()`` makes one ``apply_async`` call."""

    name: str
    call: Call
    queue: str  # the broker queue its messages go to (deleted after every run)
    lock_patterns: tuple[str, ...]  # SCAN patterns of the lock keys it leaves behind
    publishes: bool  # False for a duplicate: it publishes nothing
    prepare: Call | None = None  # run before every run: a duplicate needs a holder
    commands: dict[str, float] = field(default_factory=dict)  # sent per call, by command
    in_scripts: dict[str, float] = field(default_factory=dict)  # run by Lua, per call
    server_commands: float = 0.0  # per call, all INFO commandstats counted

    @property
    def total_commands(self) -> float:
        return sum(self.commands.values())


@dataclass
class Bench:
    """The cases and what the run needs to clean up after each of them."""

    client: redis.Redis
    apps: list[Celery]
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


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
    bench.cases += [
        Case(f"{label} new key", _new_key_call(new, itertools.count()), new.queue,
                lock_patterns, publishes=True),
        Case(f"{label} duplicate", _duplicate_call(dup, catch), dup.queue,
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

    bench.cases += [
        Case(PLAIN, _new_key_call(plain, itertools.count()), plain.queue, (), True),
        Case(FLOOR, floor_call, floor.queue, ("bench-raw:*",), True),
        Case(DUP_FLOOR, dup_floor_call, "bench.dup-floor", (), False, prepare=hold),
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


def cleanup(bench: Bench, case: Case) -> None:
    """Delete the case's queue and lock keys; read pending result-backend replies."""
    client = bench.client
    for pattern in (f"{case.queue}*", *case.lock_patterns):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(batch), 500):
            client.unlink(*batch[start : start + 500])
    _drain_result_replies(bench.apps)


def measure(bench: Bench, case: Case) -> h.Measure:
    """Calls per second of one run; the holder's set-up and the clean-up are not timed."""

    async def timed(seconds: float) -> float:
        if case.prepare is not None:
            case.prepare()
        try:
            return h.sync_rate(case.call, seconds)
        finally:
            cleanup(bench, case)

    return timed


def check(bench: Bench, case: Case) -> None:
    """A new-key call must publish one message, a duplicate none."""
    if case.prepare is not None:
        case.prepare()
    before = bench.client.llen(case.queue)
    case.call()
    published = bench.client.llen(case.queue) - before
    cleanup(bench, case)
    if published != int(case.publishes):
        raise RuntimeError(f"{case.name}: one call published {published} messages")


OWN_COMMANDS = ("config", "info", "echo", "hello")  # the measurement's own (and its connects)


def count_commands(bench: Bench, case: Case, calls: int) -> None:
    """Commands per call around ``calls`` calls, from ``INFO commandstats`` and ``MONITOR``.

    ``INFO commandstats`` counts the commands a Lua script runs as well as the EVALSHA that ran
    it; ``MONITOR`` tells the two apart (a script's commands come from client "lua").
    """
    client = bench.client
    if case.prepare is not None:
        case.prepare()
    for _ in range(h.WARMUP):
        case.call()
    _drain_result_replies(bench.apps)
    marker = f"bench-marker-{uuid()}"
    sent: Counter[str] = Counter()
    in_scripts: Counter[str] = Counter()
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        client.config_resetstat()
        for _ in range(calls):
            case.call()
        stats: dict[str, Any] = client.info("commandstats")
        client.echo(marker)
        while True:
            entry = monitor.next_command()
            if marker in entry["command"]:
                break
            name = entry["command"].split(" ", 1)[0].lower()
            if name not in OWN_COMMANDS:
                (in_scripts if entry["client_type"] == "lua" else sent)[name] += 1
    cleanup(bench, case)
    case.commands = {name: n / calls for name, n in sorted(sent.items())}
    case.in_scripts = {name: n / calls for name, n in sorted(in_scripts.items())}
    counted = sum(
        value["calls"]
        for key, value in stats.items()
        if key.removeprefix("cmdstat_").split("|")[0] not in OWN_COMMANDS
    )
    case.server_commands = counted / calls
    if counted != sent.total() + in_scripts.total():
        bench.notes.append(
            f"{case.name}: INFO commandstats counted {counted} commands, MONITOR saw "
            f"{sent.total()} sent + {in_scripts.total()} in scripts"
        )


async def run(url: str, chosen: h.Settings) -> h.Section:
    bench = build(url)
    command_calls = 50 if chosen.quick else 200
    try:
        for case in bench.cases:
            check(bench, case)
            count_commands(bench, case, command_calls)
        variants = [h.Variant(case.name, GROUP, measure(bench, case)) for case in bench.cases]
        await h.interleave(variants, chosen.seconds, chosen.reps, label="apply_async: ")
    finally:
        bench.client.close()
        for app in bench.apps:
            app.close()
    return report(bench, variants)


# --- reporting ------------------------------------------------------------------------------


def lock_commands(case: Case, plain: Case) -> float:
    """Commands a case sends beyond a plain publish (all of them if it publishes none)."""
    return case.total_commands - (plain.total_commands if case.publishes else 0.0)


def _spell(commands: dict[str, float]) -> str:
    return ", ".join(f"{name.upper()} {n:g}" for name, n in commands.items())


def report(bench: Bench, variants: list[h.Variant]) -> h.Section:
    section = h.Section("Unique tasks: apply_async calls per second (producer side, no worker)")
    found = {v.name: v for v in variants}
    cases = {case.name: case for case in bench.cases}
    plain, floor = found[PLAIN], found[FLOOR]
    rows, results = [], []
    for v in variants:
        case = cases[v.name]
        detail = _spell(case.commands)
        if case.in_scripts:
            detail += f" (in Lua: {_spell(case.in_scripts)})"
        to_plain, to_floor = h.ratio(v, plain), h.ratio(v, floor)
        rows.append([
            v.name, h.rate(v.median), h.times(to_plain), h.times(to_floor),
            f"{case.total_commands:.2f}", f"{lock_commands(case, cases[PLAIN]):+.2f}",
            f"{case.server_commands:.2f}", detail,
        ])  # fmt: skip
        extra = {
            "redis_commands_per_call": round(case.total_commands, 3),
            "extra_commands_over_plain": round(lock_commands(case, cases[PLAIN]), 3),
            "server_commands_per_call": round(case.server_commands, 3),
            "commands_sent": case.commands,
            "commands_in_lua": case.in_scripts,
        }
        results.append({**h.variant_json(v, ratio_to_plain=to_plain, ratio_to_floor=to_floor),
                        **extra})  # fmt: skip
    header = ["variant", "median calls/s", "ratio to plain", "ratio to EVALSHA+plain",
              "Redis cmds/call", "extra over plain", "server cmds/call",
              "commands sent per call"]  # fmt: skip
    section.blocks.append(h.table(header, rows, left=(0, 7)))
    ours_new, ours_dup = found.get(OURS_NEW), found.get(OURS_DUP)
    singleton_dup, dup_floor = found.get(SINGLETON_DUP), found.get(DUP_FLOOR)
    section.targets += [
        h.Target("apply_async new key / (one raw EVALSHA + plain publish)",
                 h.ratio(ours_new, floor), 0.95),
        h.Target("apply_async duplicate / celery-singleton duplicate",
                 h.ratio(ours_dup, singleton_dup), 2.5),
        h.Target("ours duplicate / duplicate floor", h.ratio(ours_dup, dup_floor)),
        h.Target("duplicate floor / celery-singleton duplicate (the best one round trip can do)",
                 h.ratio(dup_floor, singleton_dup)),
    ]  # fmt: skip
    dup_commands = cases[OURS_DUP].commands
    section.notes.append(
        f"ours duplicate sends {sum(dup_commands.values()):g} Redis command(s) per call ("
        + ("exactly one EVALSHA: as required" if dup_commands == {"evalsha": 1.0} else
           "NOT one EVALSHA")
        + ")"
    )  # fmt: skip
    section.notes += bench.notes
    section.versions.update(bench.versions)
    section.data["results"] = results
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK)
