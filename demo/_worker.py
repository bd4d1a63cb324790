"""Real Celery workers for the demos: started in a process group of their own, always killed.

::

    with celery_worker("demo.unique", {"SOME_URL_ENV": url}, log, concurrency=4) as worker:
        wait_until(probe.ready, [worker], "the worker to run a warm-up task")
        ...

    with celery_workers(app, env, logs, concurrency=2, nodes=["alpha@%h", "bravo@%h"]) as ws:
        ...

A worker is ``python -m celery -A <module> worker`` (prefork), run from the repository root
so that ``<module>`` imports, with its output going to ``log`` for :func:`show_log` to print
when something went wrong.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

import redis
from celery import signals

from celery_unique.testing import redis_server
from demo._report import Check, heading, say, summary

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def records(app: Any) -> redis.Redis:
    """This process's client for a demo's records, on the app's broker (it has a pool)."""
    return _client(str(app.conf.broker_url))


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the whole group is gone already
        pass


@contextmanager
def celery_worker(
    app: str,
    env: Mapping[str, str],
    log: IO[bytes],
    *,
    concurrency: int,
    node: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``celery -A <app> worker`` in its own process group; always kill the group.

    ``env`` is added to this process's environment: the worker runs in another process and
    learns the broker from it. ``node`` is the worker's ``-n`` name (``alpha@%h``).
    """
    with celery_workers(app, env, [log], concurrency=concurrency, nodes=[node]) as (worker,):
        yield worker


@contextmanager
def celery_workers(
    app: str,
    env: Mapping[str, str],
    logs: Sequence[IO[bytes]],
    *,
    concurrency: int,
    nodes: Sequence[str | None],
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run a worker per node name, each as :func:`celery_worker` does; stop them together.

    Workers sharing a broker need distinct node names. Stopping them together takes as long
    as the slowest warm shutdown, not the sum of them.
    """
    workers: list[subprocess.Popen[bytes]] = []
    finished = False
    try:
        for node, log in zip(nodes, logs, strict=True):
            workers.append(_start(app, env, log, concurrency, node))
        yield workers
        finished = True
    finally:
        stop_workers(workers, graceful=finished)


def _start(
    app: str, env: Mapping[str, str], log: IO[bytes], concurrency: int, node: str | None
) -> subprocess.Popen[bytes]:
    environ = dict(os.environ, **env)
    # ``-A <app>`` is imported from the repository root, wherever the demo runs from.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool=prefork", f"--concurrency={concurrency}", "--loglevel=warning",
        # A private broker: nobody to sync with or gossip to, so start faster.
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        *(["-n", node] if node else []),
    ]  # fmt: skip
    # A session of its own: Ctrl-C in the terminal reaches the demo only, whose ``finally``
    # then stops the worker and its pool processes together.
    return subprocess.Popen(
        command, cwd=REPO, env=environ, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def stop_workers(workers: Sequence[subprocess.Popen[bytes]], *, graceful: bool) -> None:
    """After a full run, a warm shutdown (nothing runs by then, so it is quick); in any case
    SIGKILL for what is left. After a failure or Ctrl-C, no waiting for the tasks they run."""
    try:
        if graceful:
            for worker in workers:
                _signal_group(worker.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            for worker in workers:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            # Even after a clean exit: a pool process the main one left behind dies here too.
            _signal_group(worker.pid, signal.SIGKILL)
            worker.wait()


def wait_until(
    ready: Callable[[], bool],
    workers: Sequence[subprocess.Popen[bytes]],
    what: str,
    timeout: float = 60.0,
) -> None:
    """Block until ``ready()`` holds; raise if a worker exits or ``timeout`` s pass first.

    Polled rather than a blocking call: a worker that dies while starting is seen at once.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"a worker (pid {worker.pid}) exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def show_log(log: IO[bytes], title: str = "the worker's log") -> None:
    """Print the last lines a worker wrote: shown when the demo failed, to say why."""
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-30:]
    heading(f"{title} (last lines)")
    print("\n".join(tail) or "(empty)", flush=True)


READY = "demo:ready"  # the node names of a fleet demo's workers that are consuming


def announce_readiness(store: Callable[[], redis.Redis]) -> None:
    """Connect a fleet demo's worker-side signals to its records (``store``): each pool
    process connects before its first task, so no run's record is late by a connection's
    setup, and each worker's main process adds its node name to :data:`READY` once its pool
    is up and it consumes."""

    def connect_early(**_: Any) -> None:
        store().ping()

    def worker_ready(sender: Any = None, **_: Any) -> None:
        store().sadd(READY, sender.hostname)

    uid = store.__module__
    signals.worker_process_init.connect(connect_early, weak=False, dispatch_uid=f"{uid}.early")
    signals.worker_ready.connect(worker_ready, weak=False, dispatch_uid=f"{uid}.ready")


def _wait_for_fleet(
    workers: Sequence[subprocess.Popen[bytes]],
    store: Callable[[], redis.Redis],
    nodes: Sequence[str],
    concurrency: int,
) -> None:
    # Every worker consumes before the demo starts, so that its calls meet all of them.
    pids = ", ".join(f"{node} pid {w.pid}" for node, w in zip(nodes, workers, strict=True))
    say(f"celery workers starting ({pids}; prefork, {concurrency} processes each)")
    client = store()
    wait_until(lambda: client.scard(READY) == len(nodes), workers, "every worker to be ready")
    say(f"all consuming: {', '.join(sorted(map(str, client.smembers(READY))))}")


def run_fleet(
    app: str,
    url_env: str,
    configure: Callable[[str], None],
    store: Callable[[], redis.Redis],
    demo: Callable[[list[subprocess.Popen[bytes]]], list[Check]],
    *,
    nodes: Sequence[str],
    concurrency: int,
) -> int:
    """Start a private redis-server and one worker of ``app`` per node on it, wait until
    every worker consumes (see :func:`announce_readiness`), run ``demo`` against them and
    print its checks' summary (the workers' logs too, when one failed or
    the demo raised); the exit status."""
    with ExitStack() as logs_stack:
        logs = [
            logs_stack.enter_context(tempfile.TemporaryFile(prefix=f"{app}-{node}-"))
            for node in nodes
        ]
        try:
            with redis_server() as url:
                say(f"private redis-server up at {url}")
                configure(url)
                # The workers stop first: they need Redis to shut down cleanly.
                with celery_workers(
                    app,
                    {url_env: url},
                    logs,
                    concurrency=concurrency,
                    nodes=[f"{node}@%h" for node in nodes],
                ) as workers:
                    _wait_for_fleet(workers, store, nodes, concurrency)
                    checks = demo(workers)
        except Exception:  # not on Ctrl-C: the user knows why it stopped
            for node, log in zip(nodes, logs, strict=True):
                show_log(log, f"worker {node}'s log")
            raise
        status = summary(checks)
        if status:
            for node, log in zip(nodes, logs, strict=True):
                show_log(log, f"worker {node}'s log")
        return status


def _terminated(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception, so the ``finally`` blocks stop the workers and Redis.
    raise SystemExit(128 + signum)


def run(main: Callable[[], int]) -> NoReturn:
    """Run a demo's ``main`` as a program: its return value is the exit code, and SIGTERM
    or Ctrl-C still stop every worker and redis-server it started."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: workers and redis-server stopped", file=sys.stderr)
        sys.exit(130)
