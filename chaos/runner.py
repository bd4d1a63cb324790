"""One chaos run: servers, proxy, client processes and the nemesis; then the history.

The run's folder (``chaos-runs/<seed>-<time>/``) keeps every process' history, the merged
``history.jsonl`` the checker reads (and ``--check`` re-reads), the worker logs and, for a
process stuck at the end, its stacks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_unique.testing import RedisServer, running_redis

from . import clients
from .history import History, Record, merge, now
from .nemesis import Nemesis, Target
from .proxy import FaultProxy

__all__ = ["Options", "run"]

# Every acknowledged write survives a SIGKILL: a restart then loses nothing, so locks, fences
# and buckets must hold across it (without persistence a restart forgets every holder, which
# no lock on one Redis can survive; the fence alone then keeps order, being seeded from Redis
# time).
PERSISTENT = "appendonly yes\nappendfsync always\n"


@dataclass
class Options:
    """What a run does (the command line's options)."""

    seed: int
    duration: float
    faults: list[str]
    out: Path
    sync: int = 2
    asyncs: int = 2
    tasks: bool = True
    socket_timeout: float = 1.0
    #: Seconds past the end a client process may take to finish its last call.
    stuck_after: float = 15.0
    header: dict[str, Any] = field(default_factory=dict)


def run(options: Options) -> Path:
    """Run, merge the histories; returns the merged history's path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = options.out / f"{options.seed}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"chaos:{options.seed}:"
    header: Record = {
        "p": "runner",
        "op": "config",
        "kind": "run",
        "seed": options.seed,
        "duration": options.duration,
        "faults": options.faults,
        "socket_timeout": options.socket_timeout,
        "prefix": prefix,
        **options.header,
    }
    history = History(run_dir / "runner.jsonl", "runner")
    nemesis_history = History(run_dir / "nemesis.jsonl", "nemesis")
    with ExitStack() as stack:
        server = stack.enter_context(running_redis(config=PERSISTENT))
        proxy = FaultProxy(server.address)
        proxy.start()
        stack.callback(proxy.close)
        target = Target(server, proxy)
        start_at = now() + 3.0  # spawned interpreters need a moment to import
        stop_at = start_at + options.duration
        processes = _spawn_clients(options, target, run_dir, prefix, start_at, stop_at, history)
        nemesis = Nemesis(target, options.faults, options.seed, nemesis_history)
        time.sleep(max(0.0, start_at - now()))
        thread = threading.Thread(target=nemesis.run, args=(stop_at,), name="nemesis")
        thread.start()
        thread.join()
        _join_clients(processes, stop_at + options.stuck_after, history)
        last = now()
        _leftovers(server, prefix, last + clients.MAX_TTL + 1.5, history)
    history.close()
    nemesis_history.close()
    parts = sorted(p for p in run_dir.glob("*.jsonl") if p.name != "history.jsonl")
    target_path = run_dir / "history.jsonl"
    merge(parts, target_path, header)
    return target_path


def _spawn_clients(
    options: Options,
    target: Target,
    run_dir: Path,
    prefix: str,
    start_at: float,
    stop_at: float,
    history: History,
) -> dict[str, multiprocessing.process.BaseProcess]:
    context = multiprocessing.get_context("spawn")
    flavours = ["sync"] * options.sync + ["async"] * options.asyncs
    processes = {}
    for index, flavour in enumerate(flavours):
        config = clients.ClientConfig(
            name=f"{flavour}-{index}",
            flavour=flavour,
            url=target.proxy.url,
            prefix=prefix,
            seed=options.seed * 1000 + index,
            run_dir=str(run_dir),
            start_at=start_at,
            stop_at=stop_at,
            socket_timeout=options.socket_timeout,
        )
        process = context.Process(target=clients.main, args=(config,), name=config.name)
        process.start()
        assert process.pid is not None
        t = now()
        history.write("start", "process", config.name, t0=t, t1=t, pid=process.pid)
        processes[config.name] = process
        target.clients[config.name] = process.pid
    return processes


def _join_clients(
    processes: dict[str, multiprocessing.process.BaseProcess], deadline: float, history: History
) -> None:
    for name, process in processes.items():
        process.join(max(0.0, deadline - now()))
        t = now()
        if process.is_alive():
            assert process.pid is not None
            os.kill(process.pid, signal.SIGCONT)  # (in case it is stopped)
            os.kill(process.pid, signal.SIGUSR1)  # its stacks, into stacks-<name>.txt
            time.sleep(1.0)
            process.kill()
            process.join(5)
            history.write("exit", "process", name, t0=t, t1=t, error="stuck", bound=deadline)
        else:
            history.write("exit", "process", name, t0=t, t1=t, result=process.exitcode)


def _leftovers(server: RedisServer, prefix: str, when: float, history: History) -> None:
    """Every key of the run must be gone once the longest ttl has passed."""
    time.sleep(max(0.0, when - now()))
    cursor = "0"
    while True:
        reply = server.command("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000)
        assert isinstance(reply, list)
        cursor, keys = str(reply[0]), reply[1]
        assert isinstance(keys, list)
        for key in keys:
            t = now()
            pttl = server.command("PTTL", str(key))
            history.write("leftover", "keys", str(key), t0=t, t1=t, result=pttl)
        if cursor == "0":
            return
