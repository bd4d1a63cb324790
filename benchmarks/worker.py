"""Worker side: tasks per second end to end through one real prefork worker, plain Celery
against unique and rate-limited tasks and the peers, with the Redis commands each task costs.

Run ``python -m benchmarks.worker`` (300 tasks per run, 15 repetitions: about 90 s) or
``--quick`` (60 tasks, 3 repetitions: about 15 s); ``--tasks N`` sets the run's size.
One Redis (the harness's) is broker, result backend and every lock store. One worker,
``celery -A benchmarks.worker_tasks worker --pool=prefork -c 2``, runs in a process group of
its own and is stopped by its id whatever happens (an error, Ctrl-C, SIGTERM).

Variants, each its own task in ``benchmarks/worker_tasks.py`` with the same trivial body:
plain ``@app.task`` (the baseline), ``UniqueTask``, ``RateLimitedTask`` with a
``global_rate_limit`` far above what the worker reaches (100000/s) and with a
``concurrency_limit`` above its concurrency (8 > 2), so nothing is ever deferred, then
celery-singleton's ``Singleton`` and celery-once's ``QueueOnce`` when they import.

One run of a variant: ``apply_async((n,))`` for N distinct ``n``, then ``get()`` on every
result; the clock runs from the first publish to the last result in. Runs are interleaved
and ratios are medians of per-repetition ratios, as ``benchmarks/_harness.py`` says.

Commands are counted on the server, so both sides (producer and worker) are in:

* ``Redis cmds/task``: ``INFO commandstats`` read before and after every timed run (after
  the server has gone quiet, so a release that follows a result is counted with its run),
  summed over the runs and divided by the tasks. Redis counts the commands a Lua script runs
  there too, under their own names, beside the EVALSHA that ran them.
* Then one more run per variant, untimed, under ``MONITOR``, which tells a script's commands
  (client "lua") from those clients sent, and this process's connections (the producer) from
  the worker's. ``in Lua/task`` comes from it; ``round trips/task`` counts what clients sent,
  a ``MULTI``...``EXEC`` block once (redis-py writes a transaction in one go). The two counts
  are compared command for command, and a note says whether they agree.
* ``CPU ms/task``: user + system time per task of each side (this process, the worker's
  process group, redis-server), the median over the timed runs. Time spent waiting for a CPU
  is not in it, so it moves less than tasks/s with the machine's other load.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout

from benchmarks import _harness as h
from benchmarks import worker_tasks as wt
from celery_unique.celery.store import backends

FULL, QUICK = (300, 15), (60, 3)  # (tasks per run, repetitions)
UNIT = "tasks"  # what the first number of FULL and QUICK counts
CONCURRENCY = 2  # the worker's pool processes
GROUP = "worker"
ROOT = Path(__file__).resolve().parent.parent
OWN_COMMANDS = frozenset({"info", "config", "echo", "monitor"})  # the measurement's own
SETTLE = 0.05  # seconds without a command (but BRPOP's idle polls) that mean quiet
RESULT_TIMEOUT = 120.0  # seconds a run may take before it counts as stuck


@dataclass(frozen=True)
class Cpu:
    """CPU seconds (user + system) one run cost each side: this process, the worker's whole
    process group (main process and pool), and redis-server. Less sensitive than tasks/s to
    what else the machine runs, since time spent waiting for a CPU is not counted."""

    producer: float
    worker: float | None  # None where /proc cannot be read
    redis: float

    def __sub__(self, other: Cpu) -> Cpu:
        worker = None if self.worker is None or other.worker is None else self.worker - other.worker
        return Cpu(self.producer - other.producer, worker, self.redis - other.redis)


@dataclass
class Case:
    """One variant: its task, and what was counted while it ran."""

    label: str
    task: Any
    runs: list[tuple[int, Counter[str]]] = field(default_factory=list)  # tasks, commandstats
    cpu: list[Cpu] = field(default_factory=list)  # one per run, as runs
    sent_by_producer: Counter[str] = field(default_factory=Counter)  # MONITOR run, per task
    sent_by_worker: Counter[str] = field(default_factory=Counter)
    in_scripts: Counter[str] = field(default_factory=Counter)
    trips_producer: float = 0.0  # round trips per task, MONITOR run
    trips_worker: float = 0.0
    monitored: int = 0  # commands INFO commandstats counted during the MONITOR run
    monitor_saw: int = 0  # and MONITOR saw (sent + in scripts)
    monitor_differs: str = ""  # the commands the two counted differently

    @property
    def per_task(self) -> Counter[str]:
        """Commands per task by name over the timed runs (the warm-up run left out)."""
        timed = self.runs[1:] or self.runs
        total: Counter[str] = Counter()
        for _, counted in timed:
            total.update(counted)
        tasks = sum(n for n, _ in timed) or 1
        return Counter({name: calls / tasks for name, calls in total.items()})

    @property
    def cpu_per_task(self) -> Cpu | None:
        """CPU seconds per task by side, the median over the timed runs (one slow run on a
        busy machine moves it little); ``None`` without /proc."""
        pairs = list(zip((n for n, _ in self.runs), self.cpu, strict=True))
        timed = pairs[1:] or pairs
        if not timed or any(used.worker is None for _, used in timed):
            return None
        return Cpu(
            statistics.median(used.producer / n for n, used in timed),
            statistics.median((used.worker or 0.0) / n for n, used in timed),
            statistics.median(used.redis / n for n, used in timed),
        )

    @property
    def commands(self) -> float:
        return sum(self.per_task.values())

    @property
    def lua(self) -> float:
        return sum(self.in_scripts.values())


# --- the worker ------------------------------------------------------------------------------


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, signum)


@contextlib.contextmanager
def running_worker(url: str, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``celery worker`` on ``url`` in a session of its own (Ctrl-C in a terminal reaches
    this process only); its process group is stopped on the way out, however we leave."""
    env = {**os.environ, wt.URL_ENV: url}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "celery", "-A", "benchmarks.worker_tasks", "worker",
        "--pool=prefork", f"--concurrency={CONCURRENCY}", "-Q", wt.QUEUE,
        "-n", f"bench-worker-{os.getpid()}@%h", "--loglevel=warning",
        # Nobody to sync with or gossip to: start faster, and no idle traffic in the counts.
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        # Warm shutdown first (nothing runs by now); then SIGKILL for whatever is left of the
        # group, the pool processes included, even if their parent has already gone.
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _log_tail(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


class _Terminated(SystemExit):
    """SIGTERM, turned into an exception so that the worker is stopped on the way out."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(128 + signum)


# --- counting --------------------------------------------------------------------------------


def commandstats(client: redis.Redis) -> Counter[str]:
    """Calls per command since the server started (subcommands as ``client|setinfo``)."""
    stats: dict[str, Any] = client.info("commandstats")
    return Counter({key.removeprefix("cmdstat_"): int(v["calls"]) for key, v in stats.items()})


def _others(counted: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in counted.items() if k.split("|")[0] not in OWN_COMMANDS})


def settle(client: redis.Redis, timeout: float = 5.0) -> None:
    """Wait until the server has gone quiet: what a run sets off after its last result (a
    lock released after the result is stored) is counted with that run, not the next."""
    deadline = time.monotonic() + timeout
    last = _others(commandstats(client))
    while time.monotonic() < deadline:
        time.sleep(SETTLE)
        now = _others(commandstats(client))
        # The worker's BRPOP, re-sent every second while the queue is empty, is not activity.
        if set((now - last).keys()) <= {"brpop"}:
            return
        last = now


def group_cpu(pgid: int) -> float | None:
    """CPU seconds used so far by the live processes of group ``pgid`` (Linux's /proc)."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # After "(comm)": state, ppid, pgrp, ..., utime and stime (fields 14 and 15).
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_now(client: redis.Redis, worker: int) -> Cpu:
    """CPU used so far by this process, the worker group ``worker`` and redis-server."""
    server: dict[str, Any] = client.info("cpu")
    used = float(server["used_cpu_user"]) + float(server["used_cpu_sys"])
    return Cpu(time.process_time(), group_cpu(worker), used)


def _own_ports() -> set[str] | None:
    """Local TCP ports of this process's sockets (from Linux's /proc): MONITOR names each
    command's client by its address, and these are the producer's. ``None`` elsewhere."""
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        ports = set()
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            with open(table) as lines:
                for line in itertools.islice(lines, 1, None):
                    fields = line.split()
                    if fields[9] in inodes:
                        ports.add(str(int(fields[1].rsplit(":", 1)[1], 16)))
    except OSError:
        return None
    return ports


# --- running ---------------------------------------------------------------------------------


class Bench:
    """The worker's tasks, a client for the counts, and distinct arguments for every call."""

    def __init__(self, url: str, log: IO[bytes], process: subprocess.Popen[bytes]) -> None:
        self.client = redis.Redis.from_url(url)
        # MONITOR and the marker that ends it on connections of their own, opened now: one
        # opened while MONITOR runs would have its handshake counted with the tasks.
        self.watcher = redis.Redis.from_url(url)
        self.marker = redis.Redis.from_url(url, single_connection_client=True)
        self.client.ping()
        self.marker.ping()
        self.log = log
        self.process = process
        self.worker = process.pid  # also the id of its process group
        self.arguments = itertools.count()
        self.cases = [Case(label, wt.task(label)) for label in wt.TASKS]
        self.split = False  # whether MONITOR's commands could be told producer from worker

    def batch(self, case: Case, tasks: int) -> float:
        """Publish ``tasks`` calls and wait for every result; seconds from the first
        publish to the last result in."""
        start = time.perf_counter()
        results = [case.task.apply_async((next(self.arguments),)) for _ in range(tasks)]
        deadline = start + RESULT_TIMEOUT
        try:
            for result in results:
                # A second at a time, to notice a worker that died instead of waiting it out.
                while True:
                    try:
                        result.get(timeout=1.0)
                        break
                    except CeleryTimeout:
                        if self.process.poll() is not None:
                            raise RuntimeError("the worker has exited") from None
                        if time.perf_counter() > deadline:
                            raise
        except Exception as exc:
            raise RuntimeError(
                f"{case.label}: a task did not complete ({exc!r}); the worker's log ends:\n"
                + _log_tail(self.log)
            ) from exc
        return time.perf_counter() - start

    def measure(self, case: Case) -> h.Measure:
        """Tasks per second of one run of ``size`` tasks; commands counted around it."""

        async def timed(size: float) -> float:
            tasks = max(1, int(size))
            before, cpu = commandstats(self.client), cpu_now(self.client, self.worker)
            elapsed = self.batch(case, tasks)
            settle(self.client)
            case.cpu.append(cpu_now(self.client, self.worker) - cpu)
            case.runs.append((tasks, _others(commandstats(self.client) - before)))
            return tasks / elapsed

        return timed

    def monitor(self, case: Case, tasks: int) -> None:
        """One untimed run under MONITOR: commands by side, in scripts, round trips."""
        marker = f"bench-marker-{os.getpid()}-{next(self.arguments)}"
        settle(self.client)
        with self.watcher.monitor() as monitor:  # type: ignore[no-untyped-call]
            before = commandstats(self.client)
            self.batch(case, tasks)
            settle(self.client)
            counted = _others(commandstats(self.client) - before)
            ours = _own_ports()
            self.marker.echo(marker)
            producer: Counter[str] = Counter()
            worker: Counter[str] = Counter()
            lua: Counter[str] = Counter()
            trips: Counter[str] = Counter()
            in_multi: set[str] = set()  # clients inside MULTI...EXEC
            while True:
                entry = monitor.next_command()
                if marker in entry["command"]:
                    break
                name = entry["command"].split(" ", 1)[0].lower()
                if name in OWN_COMMANDS:
                    continue
                if entry["client_type"] == "lua":
                    lua[name] += 1
                    continue
                client = f"{entry['client_address']}:{entry['client_port']}"
                side = "producer" if ours is not None and entry["client_port"] in ours else "worker"
                (producer if side == "producer" else worker)[name] += 1
                # A transaction travels in one write: count its MULTI as the round trip.
                if name == "multi":
                    in_multi.add(client)
                    trips[side] += 1
                elif name == "exec" or name == "discard":
                    in_multi.discard(client)
                elif client not in in_multi:
                    trips[side] += 1
        case.sent_by_producer = Counter({k: v / tasks for k, v in producer.items()})
        case.sent_by_worker = Counter({k: v / tasks for k, v in worker.items()})
        case.in_scripts = Counter({k: v / tasks for k, v in lua.items()})
        case.trips_producer = trips["producer"] / tasks
        case.trips_worker = trips["worker"] / tasks
        case.monitored = counted.total()
        seen = producer + worker + lua
        case.monitor_saw = seen.total()
        case.monitor_differs = ", ".join(
            f"{name.upper()} {counted[name]} / {seen[name]}"
            for name in sorted(set(counted) | set(seen))
            if counted[name] != seen[name]
        )
        self.split = ours is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, help="tasks per run of the worker benchmark")


async def run(url: str, chosen: h.Settings) -> h.Section:
    wt.configure(url)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with tempfile.TemporaryFile() as log, running_worker(url, log) as process:
            bench = Bench(url, log, process)
            try:
                bench.batch(bench.cases[0], 1)  # waits for the worker to be up
                variants = [h.Variant(c.label, GROUP, bench.measure(c)) for c in bench.cases]
                await h.interleave(variants, chosen.seconds, chosen.reps, label="worker: ")
                for case in bench.cases:
                    bench.monitor(case, int(chosen.seconds))
            finally:
                for client in (bench.client, bench.watcher, bench.marker):
                    client.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
        backends.close(wt.app)  # the lock stores' connections, which app.close() leaves
        wt.app.close()
    return report(bench, variants)


# --- reporting ------------------------------------------------------------------------------


def _spell_cpu(cpu: Cpu | None) -> str:
    if cpu is None or cpu.worker is None:
        return "n/a"
    return f"{cpu.producer * 1e3:.2f} / {cpu.worker * 1e3:.2f} / {cpu.redis * 1e3:.3f}"


def _cpu_json(cpu: Cpu | None) -> dict[str, float | None] | None:
    if cpu is None:
        return None
    spent = {"producer": cpu.producer, "worker": cpu.worker, "redis": cpu.redis}
    return {side: None if v is None else round(v * 1e3, 4) for side, v in spent.items()}


def _spell(commands: Counter[str]) -> str:
    return ", ".join(f"{name.upper()} {n:.3g}" for name, n in sorted(commands.items()) if n)


def report(bench: Bench, variants: list[h.Variant]) -> h.Section:
    section = h.Section(
        f"Worker side: tasks per second through one prefork worker (-c {CONCURRENCY}), "
        "publish to last result"
    )
    found = {v.name: v for v in variants}
    cases = {case.label: case for case in bench.cases}
    plain_case, plain = cases[wt.PLAIN], found[wt.PLAIN]
    rows, by_name, results = [], [], []
    for v in variants:
        case = cases[v.name]
        to_plain = h.ratio(v, plain)
        trips = case.trips_producer + case.trips_worker
        rows.append([
            v.name, h.rate(v.median), h.times(to_plain), f"{case.commands:.2f}",
            f"{case.commands - plain_case.commands:+.2f}", f"{case.lua:.2f}",
            f"{case.commands - case.lua:.2f}", f"{trips:.2f}",
            f"{case.trips_producer:.2f} / {case.trips_worker:.2f}", _spell_cpu(case.cpu_per_task),
        ])  # fmt: skip
        by_name.append([
            v.name, _spell(case.sent_by_producer), _spell(case.sent_by_worker),
            _spell(case.in_scripts),
        ])  # fmt: skip
        results.append({
            **h.variant_json(v, ratio_to_plain=to_plain),
            "redis_commands_per_task": round(case.commands, 3),
            "commands_per_task": {k: round(n, 3) for k, n in sorted(case.per_task.items())},
            "in_lua_per_task": {k: round(n, 3) for k, n in sorted(case.in_scripts.items())},
            "producer_sent_per_task": dict(sorted(case.sent_by_producer.items())),
            "worker_sent_per_task": dict(sorted(case.sent_by_worker.items())),
            "round_trips_per_task": {"producer": round(case.trips_producer, 3),
                                     "worker": round(case.trips_worker, 3)},
            "cpu_ms_per_task": _cpu_json(case.cpu_per_task),
        })  # fmt: skip
    header = ["variant", "median tasks/s", "ratio to plain", "Redis cmds/task",
              "extra over plain", "in Lua/task", "client cmds/task", "round trips/task",
              "producer / worker trips", "CPU ms/task: producer / worker / Redis"]  # fmt: skip
    section.blocks.append(h.table(header, rows))
    section.blocks.append(
        "Commands per task by name (the MONITOR run): sent by the producer, sent by the "
        "worker, run inside Lua scripts\n\n"
        + h.table(["variant", "producer sends", "worker sends", "in Lua"], by_name, left=4)
    )
    unique, singleton = found.get(wt.UNIQUE), found.get(wt.SINGLETON)
    section.targets += [
        h.Target("UniqueTask / plain Celery, end to end", h.ratio(unique, plain), 0.9),
        h.Target("UniqueTask / celery-singleton, end to end", h.ratio(unique, singleton), 1.0),
        h.Target("RateLimitedTask global_rate_limit / plain Celery, end to end",
                 h.ratio(found.get(wt.RATE), plain), 0.95),
        h.Target("RateLimitedTask concurrency_limit / plain Celery, end to end",
                 h.ratio(found.get(wt.CONCURRENCY), plain), 0.95),
        h.Target("celery-singleton / plain Celery", h.ratio(singleton, plain)),
        h.Target("celery-once / plain Celery", h.ratio(found.get(wt.ONCE), plain)),
    ]  # fmt: skip
    section.notes.append(
        "Redis cmds/task: INFO commandstats over the timed runs (warm-up left out), Lua's "
        "commands included; in Lua/task: from the MONITOR run; client cmds/task = the two "
        "subtracted; round trips/task: what clients sent in the MONITOR run, a MULTI...EXEC "
        "block counted once (other pipelining, if any, still counts per command); CPU "
        "ms/task: user + system time, the median over the timed runs, of this process, the "
        "worker's process group (main process and pool, from /proc) and redis-server (INFO "
        "cpu)" + ("" if bench.split else "; the producer/worker split needs Linux's /proc")
    )
    if all(not case.monitor_differs for case in bench.cases):
        section.notes.append(
            "INFO commandstats and MONITOR (sent + in Lua) agreed command for command in "
            "every MONITOR run: Redis counts a script's commands under their own names"
        )
    for case in bench.cases:
        if case.monitor_differs:
            section.notes.append(
                f"{case.label}: during the MONITOR run INFO commandstats counted "
                f"{case.monitored} commands, MONITOR saw {case.monitor_saw} (by name: "
                f"{case.monitor_differs})"
            )
        if case.sent_by_worker.get("lpush"):
            section.notes.append(
                f"{case.label}: the worker published messages (deferred or retried runs)"
            )
    section.notes += [f"{label} skipped: {why}" for label, why in wt.SKIPPED.items()]
    for dist, label in wt.PEERS.items():
        installed = h.version(dist)
        if label in wt.TASKS and installed is not None:
            section.versions[dist] = installed
    section.data["results"] = results
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK, add_arguments, unit=UNIT)
