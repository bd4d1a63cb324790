"""Duplicates per second: ``adelay`` from concurrent asyncio tasks against ``delay`` from threads.

Run ``python -m benchmarks.adelay`` (about 25 s) or ``--quick`` (about 8 s); ``--json PATH``
also writes the results, ``--url`` uses a running Redis instead of a private one.

One ``UniqueTask`` instance is queued (its message stays in its queue: no worker runs), so
every further call with its arguments is a duplicate: one EVALSHA that finds the key held,
and the holder's ``AsyncResult`` back, nothing published. That is the producer side of a
web app turning away repeated requests.

* ``delay (threads)``: N threads, each calling ``task.delay(...)`` in a loop, on the task's
  sync backend (one redis-py pool of at most 64 connections): how a WSGI or thread-pool app
  would call it.
* ``adelay (asyncio)``: N tasks of one event loop, each awaiting ``task.adelay(...)`` in a
  loop, on the task's asyncio backend for that loop, which batches what the tasks send.
* ``bare async acquire_or_owner``: the same duplicate as N tasks of bare
  ``AsyncRedisBackend.acquire_or_owner`` calls on the held key (no key derivation, no task
  id, no ``AsyncResult``): the floor ``adelay`` pays its Celery-side work on top of.

N is 64 (the comparison asked for) and 1 (context: nothing to batch or to share).
"""

from __future__ import annotations

import os

from celery import Celery

from benchmarks import _harness as h
from celery_unique import UniqueTask
from celery_unique.celery.store import backends

FULL, QUICK = (0.5, 7), (0.15, 3)
TASKS = (64, 1)
DUPLICATE_ARG = -1
PREFIX = "bench-adelay:"
DELAY, ADELAY, BARE = "delay (threads)", "adelay (asyncio)", "bare async acquire_or_owner"


def job(n: int) -> int:
    """The body of the task; never runs (no worker)."""
    return n


async def run(url: str, chosen: h.Settings) -> h.Section:
    app = Celery("bench-adelay", broker=url, backend=url, set_as_current=False)
    app.conf.update(unique_key_prefix=PREFIX)
    app.task(name="bench.adelay", queue="bench.adelay", base=UniqueTask)(job)
    app.finalize(auto=True)
    task = app.tasks["bench.adelay"]
    sync_backend = task.unique_config.backend
    holder = task.apply_async((DUPLICATE_ARG,))
    name = task.unique_key((DUPLICATE_ARG,))
    abackend = task.async_redis_backend()
    assert abackend is not None

    def delay() -> None:
        if task.delay(DUPLICATE_ARG).id != holder.id:
            raise RuntimeError("delay: not a duplicate of the held key")

    async def adelay() -> None:
        if (await task.adelay(DUPLICATE_ARG)).id != holder.id:
            raise RuntimeError("adelay: not a duplicate of the held key")

    async def bare() -> None:
        token = os.urandom(16).hex()
        if (await abackend.acquire_or_owner(name, token, 3600)).acquired:
            raise RuntimeError("acquire_or_owner: the held key was free")

    def threads(n: int) -> h.Measure:
        async def measure(seconds: float) -> float:
            if n == 1:
                return h.sync_rate(delay, seconds)
            return h.threads_rate([delay] * n, seconds)

        return measure

    variants = []
    for n in TASKS:
        group = f"x{n}"
        variants += [
            h.Variant(DELAY, group, threads(n), n),
            h.Variant(ADELAY, group, h.timed_async([adelay] * n), n),
            h.Variant(BARE, group, h.timed_async([bare] * n), n),
        ]
    try:
        await h.interleave(variants, chosen.seconds, chosen.reps, label="adelay: ")
    finally:
        for key in sync_backend.executor.scan(f"{PREFIX}*"):
            sync_backend.executor.unlink([key])
        sync_backend.client.delete("bench.adelay")
        await backends.aclose(app)
        backends.close(app)
        app.close()
    return report(variants)


def report(variants: list[h.Variant]) -> h.Section:
    section = h.Section("adelay vs delay: duplicates per second (producer side, no worker)")
    rows, results = [], []
    for group in h.groups_of(variants):
        delay = group[0]
        bare = group[2]
        for v in group:
            to_delay, to_bare = h.ratio(v, delay), h.ratio(v, bare)
            callers = f"{v.concurrency} {'thread' if v.name == DELAY else 'task'}" + (
                "s" if v.concurrency > 1 else ""
            )
            rows.append([v.name, callers, h.rate(v.median), h.times(to_delay), h.times(to_bare)])
            results.append(h.variant_json(v, ratio_to_delay=to_delay, ratio_to_bare=to_bare))
    header = ["variant", "callers", "median duplicates/s", "ratio to delay", "ratio to bare"]
    section.blocks.append(h.table(header, rows))
    for group in h.groups_of(variants):
        delay, adelay = group[0], group[1]
        callers = f"{delay.concurrency} caller{'s' if delay.concurrency > 1 else ''}"
        lone = 0.9 if delay.concurrency == 1 else None  # the lone caller's target
        section.targets.append(h.Target(f"adelay / delay, {callers}", h.ratio(adelay, delay), lone))
    section.data["results"] = results
    return section


if __name__ == "__main__":
    h.main(run, __doc__, FULL, QUICK)
