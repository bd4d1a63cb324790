"""One chaos run: servers, proxy, client processes and the nemesis; then the history.

The run's folder (``chaos-runs/<seed>-<time>/``) keeps every process' history, the merged
``history.jsonl`` the checker reads (and ``--check`` re-reads), the worker logs and, for a
process stuck at the end, its stacks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from celery_unique.testing import RedisServer, running_redis

from . import clients
from .history import History, Record, merge, now, read
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
    asyncs: int = 1
    trios: int = 1  # async client processes under trio (the stream executor)
    tasks: bool = True
    #: Redis with an append-only file synced on every write: a restart loses nothing.
    persistent: bool = True
    socket_timeout: float = 1.0
    #: Seconds past the end a client process may take to finish its last call.
    stuck_after: float = 15.0
    #: Log every command Redis runs (MONITOR) into monitor.log, with the history clock.
    monitor: bool = False


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
        "persistent": options.persistent,
    }
    history = History(run_dir / "runner.jsonl", "runner")
    nemesis_history = History(run_dir / "nemesis.jsonl", "nemesis")
    with ExitStack() as stack:
        server = stack.enter_context(running_redis(config=PERSISTENT if options.persistent else ""))
        proxy = FaultProxy(server.address)
        proxy.start()
        stack.callback(proxy.close)
        target = Target(server, proxy)
        if options.monitor:
            stack.callback(_monitor(server, run_dir / "monitor.log"))
        workers: Workers | None = None
        broker = ""
        if options.tasks:
            broker = stack.enter_context(running_redis()).url
            env = {
                "CHAOS_BROKER_URL": broker,
                "CHAOS_LOCK_URL": proxy.url,
                "CHAOS_PREFIX": prefix,
                "CHAOS_SOCKET_TIMEOUT": str(options.socket_timeout),
                "CHAOS_RUN_DIR": str(run_dir),
            }
            workers = Workers(run_dir, env)
            workers.start()
            stack.callback(workers.stop)
            target.kill_worker = workers.kill
        start_at = now() + 4.0  # spawned interpreters (and the worker) need a moment
        stop_at = start_at + options.duration
        processes = _spawn_clients(
            options, target, run_dir, prefix, broker, start_at, stop_at, history
        )
        nemesis = Nemesis(target, options.faults, options.seed, nemesis_history)
        time.sleep(max(0.0, start_at - now()))
        thread = threading.Thread(target=nemesis.run, args=(stop_at,), name="nemesis")
        thread.start()
        thread.join()
        _join_clients(processes, stop_at + options.stuck_after, history)
        # Every key is gone a ttl after its last use: the clients' keys after their last
        # call, the tasks' queued keys TASK_TTL after the last apply, a running key a lease
        # after the last run.
        gone = now() + clients.MAX_TTL + 1.5
        if workers is not None:
            from .tasks import TASK_LEASE, TASK_TTL, VISIBILITY

            # A killed worker's message comes back after the visibility timeout (and a sweep
            # a second); a delivery put back while the lock store was down waits up to
            # 30 s (x 1.25, lifecycle.UNREACHABLE_MAX) before it runs.
            _drain(run_dir, now() + VISIBILITY + 40.0 + 10.0)
            workers.stop()
            gone = max(gone, stop_at + TASK_TTL + 1.0, now() + TASK_LEASE + 1.0)
        _leftovers(server, prefix, gone, history)
    history.close()
    nemesis_history.close()
    for stacks in run_dir.glob("stacks-*.txt"):
        if not stacks.stat().st_size:
            stacks.unlink()  # nobody was stuck
    parts = sorted(p for p in run_dir.glob("*.jsonl") if p.name != "history.jsonl")
    target_path = run_dir / "history.jsonl"
    merge(parts, target_path, header)
    return target_path


def _spawn_clients(
    options: Options,
    target: Target,
    run_dir: Path,
    prefix: str,
    broker: str,
    start_at: float,
    stop_at: float,
    history: History,
) -> dict[str, multiprocessing.process.BaseProcess]:
    context = multiprocessing.get_context("spawn")
    flavours = ["sync"] * options.sync + ["async"] * options.asyncs + ["trio"] * options.trios
    if options.tasks:
        flavours.append("tasks")
    processes: dict[str, multiprocessing.process.BaseProcess] = {}
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
            broker=broker,
        )
        # Daemonic: should the runner fail, its clients go with it.
        process = context.Process(
            target=clients.main, args=(config,), name=config.name, daemon=True
        )
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


class Workers:
    """The Celery worker of the run (prefork, two children), one at a time: the nemesis
    kills it (its whole process group) and a new one takes its place."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = env
        self.started = 0
        self.name = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.name = f"worker-{self.started}"
        self.started += 1
        with open(self.run_dir / f"{self.name}.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "chaos.tasks", "worker",
                    "--pool=prefork", "--concurrency=2", "-n", f"chaos-{self.name}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-l", "warning",
                ],
                env={**os.environ, **self.env, "CHAOS_WORKER": self.name},
                start_new_session=True,  # its own process group: killed with its children
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> str:
        """SIGKILL the worker and its children, start another; the killed one's name."""
        assert self.process is not None
        name = self.name
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.start()
        return name

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), SIGKILL if it takes longer than 15 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _drain(run_dir: Path, deadline: float) -> None:
    """Wait (until ``deadline``) for every published task to have run: a killed worker's
    reserved messages come back after the broker's visibility timeout."""
    while now() < deadline:
        published, ended = set(), set()
        for part in run_dir.glob("*.jsonl"):
            for record in read(part):
                if record.get("op") == "apply" and record.get("result") == record.get("token"):
                    published.add(record["token"])
                elif record.get("op") in ("run-start", "failed"):
                    ended.add(record.get("id"))  # ran, or failed before its body: done either way
        if published <= ended:
            return
        time.sleep(0.5)


def _monitor(server: RedisServer, path: Path) -> Callable[[], None]:
    """Copy MONITOR's stream into ``path`` (each line prefixed with the history clock) until
    the returned function is called; reconnects after a restart or CLIENT KILL. A diagnostic:
    it shows the order in which Redis really ran the commands, scripts' own calls included."""
    stop = threading.Event()

    def follow() -> None:
        with open(path, "a", encoding="utf-8") as out:
            while not stop.is_set():
                try:
                    with socket.create_connection(server.address, timeout=0.5) as sock:
                        sock.sendall(b"MONITOR\r\n")
                        reader = sock.makefile("rb")
                        while not stop.is_set():
                            try:
                                line = reader.readline()
                            except TimeoutError:
                                continue  # (paused, or quiet)
                            if not line:
                                break
                            out.write(f"{now():.6f} {line.decode(errors='replace').rstrip()}\n")
                except OSError:
                    time.sleep(0.05)

    thread = threading.Thread(target=follow, name="monitor", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(5)

    return finish


def _leftovers(server: RedisServer, prefix: str, when: float, history: History) -> None:
    """Every key of the run must be gone once the longest ttl has passed."""
    time.sleep(max(0.0, when - now()))
    if not server.alive:  # a restart the nemesis could not finish: its data is on disk
        server.start()
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
