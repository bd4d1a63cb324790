"""The Celery side of a chaos run: the app, its one unique task, and the task client.

The worker (``celery -A chaos.tasks worker``, started by the runner) and the task client
process configure the app from the environment the runner sets. The broker and result
backend are a Redis the nemesis leaves alone; the unique locks go through the fault proxy,
so the faults hit the library and not Celery's transport. Each run of the task writes its
start and end (and a lost key) into a history of its worker process, on a file, not Redis.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, signals

from celery_unique import CeleryUniqueError, UniqueTask
from celery_unique import signals as unique_signals

from .history import History, now

__all__ = ["KEYS", "TASK_LEASE", "TASK_TTL", "app", "configure", "run_client", "work"]

KEYS = ("K0", "K1", "K2")
#: The queued key's ttl and the running key's lease: short, so that the run's end can wait
#: them out (the leftover check) and a worker's death frees its key soon.
TASK_TTL = 8.0
TASK_LEASE = 3.0
#: Seconds before the broker hands a reserved but unacknowledged message (a killed worker's)
#: to another worker.
VISIBILITY = 6.0

app = Celery("chaos")


def configure(broker: str, locks: str, prefix: str, socket_timeout: float) -> None:
    """Point the app at the run's broker and (through the proxy) its lock Redis."""
    app.conf.update(
        broker_url=broker,
        result_backend=broker,
        broker_connection_retry_on_startup=True,
        # kombu looks for a dead worker's unacknowledged messages every 10th tick of 10 s by
        # default: every second here, so that they come back within the run.
        broker_transport_options={
            "visibility_timeout": VISIBILITY,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # The sweep's mutex outlives a worker killed while holding it (5 min by default):
            # no message would come back for that long.
            "unacked_mutex_expire": 5,
        },
        result_expires=600,
        # Acknowledged once run: a killed worker's task (running or reserved) is delivered
        # again, and the library must keep the second delivery from running beside the first.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        unique_backend_url=locks,
        unique_backend_options={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        },
        unique_key_prefix=prefix,
    )


if os.environ.get("CHAOS_BROKER_URL"):
    configure(
        os.environ["CHAOS_BROKER_URL"],
        os.environ["CHAOS_LOCK_URL"],
        os.environ["CHAOS_PREFIX"],
        float(os.environ["CHAOS_SOCKET_TIMEOUT"]),
    )

_histories: dict[int, History] = {}  # per process: prefork children each write their own
_runs: dict[str, str] = {}  # task id -> the run under way in this process


def _history() -> History:
    pid = os.getpid()
    if pid not in _histories:
        path = Path(os.environ["CHAOS_RUN_DIR"]) / f"worker-{pid}.jsonl"
        _histories[pid] = History(path, f"worker-{pid}")
    return _histories[pid]


def _mark(op: str, key: str, run: str, task_id: str, **fields: Any) -> None:
    t = now()
    worker = os.environ.get("CHAOS_WORKER", "")
    _history().write(op, "task", key, t0=t, t1=t, run=run, id=task_id, worker=worker, **fields)


@app.task(
    base=UniqueTask,
    bind=True,
    name="chaos.work",
    unique_on=["key"],
    unique_ttl=TASK_TTL,
    unique_lease=TASK_LEASE,
)
def work(self: UniqueTask, key: str, seconds: float) -> str:
    """Hold ``key``'s run for ``seconds``; its start and end go to the history."""
    task_id = str(self.request.id)
    run = uuid.uuid4().hex[:12]  # a redelivery is another run of the same id
    _runs[task_id] = run
    _mark("run-start", key, run, task_id)
    time.sleep(seconds)
    _mark("run-end", key, run, task_id)
    _runs.pop(task_id, None)
    return key


@unique_signals.task_lock_lost.connect(weak=False, dispatch_uid="chaos.lock_lost")
def _lock_lost(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    run = _runs.get(task_id or "")
    if run is not None:
        _mark("lock-lost", "", run, task_id or "")


@signals.task_prerun.connect(weak=False, dispatch_uid="chaos.prerun")
def _delivered(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    # Before the library's own start: a delivery that never reaches the body shows here.
    if getattr(sender, "name", None) == work.name:
        _mark("delivered", "", "", task_id or "")


@signals.task_postrun.connect(weak=False, dispatch_uid="chaos.followed")
def _followed(
    sender: Any = None, task_id: str | None = None, args: Any = (), state: Any = None, **_: Any
) -> None:
    # A delivery that found its key held by another instance follows it (the library's
    # follower task, under the same id): its outcome is the holder's.
    if getattr(sender, "name", None) == "celery_unique.follow" and args:
        _mark("followed", "", "", task_id or "", holder=str(args[0]), state=str(state))


@signals.task_failure.connect(weak=False, dispatch_uid="chaos.failure")
def _failed(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    # Why a published task may never have run its body: the checker quotes it.
    _mark("failed", "", _runs.get(task_id or "", ""), task_id or "", error=type(exception).__name__)


def run_client(history: History, seed: int, stop_at: float) -> None:
    """Apply duplicates while holders are queued and running, until ``stop_at``."""
    rng = random.Random(seed)
    while now() < stop_at:
        key, seconds = rng.choice(KEYS), round(rng.uniform(0.2, 1.5), 3)
        task_id = uuid.uuid4().hex
        t0 = now()
        fields: dict[str, Any] = {"token": task_id}
        try:
            fields["result"] = work.apply_async((key, seconds), task_id=task_id).id
        except Exception as exc:
            fields.update(
                error=type(exc).__name__,
                lib=isinstance(exc, CeleryUniqueError),
                message=str(exc)[:300],
            )
        history.write("apply", "task", key, t0=t0, t1=now(), **fields)
        time.sleep(rng.uniform(0.05, 0.4))
