"""Looking at and clearing what the library keeps in Redis: held unique-task locks, rate-limit
buckets and concurrency slots. The ``celery unique`` command prints these; scripts may call
them too. Everything uses SCAN (never KEYS), on every primary of a cluster, and never shows
an argument value: lock names carry only their digest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery

from ..backends import RedisBackend
from ..core import buckets, locks, semaphores
from ..core.keys import ParsedKey, task_lock_start, task_of_lock
from ..core.lifecycle import RUN_SEPARATOR, holder_id
from ..core.rates import RateLimit
from .store import backend_for

if TYPE_CHECKING:
    from .unique import UniqueTask

__all__ = [
    "HeldLock",
    "LimitInUse",
    "clear_locks",
    "force_release",
    "free_holder",
    "held_locks",
    "holder_id",
    "limits_in_use",
    "unlink_locks",
]


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A lock held now: ``task`` (a unique task's name, ``None`` for other locks), its
    ``holder`` (task id, or the owner token of a plain lock), ``state`` (``queued`` or
    ``running`` for a task's lock, ``held`` otherwise), ``ttl`` (seconds left) and ``lock``
    (the lock's name: the task name and the digest of its arguments)."""

    task: str | None
    holder: str
    state: str
    ttl: float | None
    lock: str

    def as_dict(self) -> dict[str, Any]:
        """The fields, for ``--json``."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LimitInUse:
    """A limit in use now: ``kind`` (``rate`` or ``concurrency``), its ``key`` (the bucket or
    semaphore name), and ``remaining`` tokens (a rate bucket; negative while slots are
    booked ahead) or ``count`` live holders (concurrency)."""

    kind: str
    key: str
    remaining: int | None = None
    count: int | None = None
    limit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that apply, for ``--json``."""
        return {name: value for name, value in asdict(self).items() if value is not None}


def _keys(backend: RedisBackend, kind: str) -> Iterator[tuple[str, ParsedKey]]:
    for key in backend.executor.scan(backend.keys.pattern(kind)):
        parsed = backend.keys.parse(key)
        if parsed is not None and parsed.kind == kind:
            yield key, parsed


def held_locks(backend: RedisBackend, task: str | None = None) -> list[HeldLock]:
    """Every lock held under ``backend``'s prefix (only ``task``'s, if given)."""
    return _in_order(held for _, held in _held(backend, task))


def free_holder(backend: RedisBackend, task_id: str, task: str | None = None) -> list[HeldLock]:
    """Free every unique-task lock that instance ``task_id`` holds (queued or running; only
    ``task``'s, if given), owner-checked: a lock another instance took meanwhile stays.
    Returns those freed. The instance itself is not revoked: queued, it takes its key again
    when a worker starts it."""
    freed = []
    for key, held in _held(backend, task):
        if held.task is None or held.holder != task_id:
            continue
        release = locks.release(key, task_id, task_id + RUN_SEPARATOR)
        if backend.executor.execute(release):
            freed.append(held)
    return _in_order(freed)


def _in_order(found: Iterable[HeldLock]) -> list[HeldLock]:
    return sorted(found, key=lambda held: (held.task or "", held.lock, held.state))


def _held(backend: RedisBackend, task: str | None) -> Iterator[tuple[str, HeldLock]]:
    """Each lock held now (only ``task``'s, if given), with its Redis key."""
    execute = backend.executor.execute
    for key, parsed in _keys(backend, "lock"):
        name = task_of_lock(parsed.name)
        if task is not None and name != task:
            continue
        owner = execute(locks.owner(key))
        if owner is None:
            continue  # expired since the scan saw it
        ttl = execute(locks.ttl(key))
        if name is None:
            state = "held"
        else:
            running = parsed.part == "running" or RUN_SEPARATOR in owner
            state = "running" if running else "queued"
        holder = holder_id(owner) if name is not None else owner
        yield key, HeldLock(name, holder, state, ttl, parsed.name)


def limits_in_use(backend: RedisBackend) -> list[LimitInUse]:
    """The rate-limit buckets and concurrency semaphores in use under ``backend``'s prefix."""
    execute = backend.executor.execute
    found = []
    now = execute(buckets.time_us())
    for key, parsed in _keys(backend, "rate"):
        state = execute(buckets.stored(key))
        if state is not None:
            left = buckets.remaining(state, parsed.part, now)
            limit = str(RateLimit.from_spec(parsed.part))
            found.append(LimitInUse("rate", parsed.name, remaining=left, limit=limit))
    for key, parsed in _keys(backend, "sem"):
        if parsed.part:
            continue  # a semaphore's queue and hold time, not a semaphore of its own
        count = execute(semaphores.holders(key))
        if count:
            found.append(LimitInUse("concurrency", parsed.name, count=count))
    return sorted(found, key=lambda limit: (limit.kind, limit.key))


def clear_locks(app: Celery, task: UniqueTask | None = None) -> int:
    """Delete the unique-task locks of ``app`` (or of one ``task``); returns how many.

    Uses SCAN, so it never blocks Redis the way KEYS would.
    """
    if task is not None:
        return unlink_locks(task.unique_config.backend, task.name)
    return unlink_locks(backend_for(app))


def force_release(backend: RedisBackend, name: str) -> None:
    """Delete lock ``name`` whoever holds it: the old libraries' administrative reset."""
    backend.executor.unlink([backend.keys.lock(name)])


def unlink_locks(backend: RedisBackend, task: str | None = None) -> int:
    """UNLINK every unique-task lock of ``backend`` (only ``task``'s, if given; running twins
    included); returns how many."""
    deleted = 0
    batch: list[str] = []
    for key in backend.executor.scan(backend.keys.lock_pattern(task_lock_start(task))):
        batch.append(key)
        if len(batch) >= 500:
            deleted += backend.executor.unlink(batch)
            batch.clear()
    return deleted + backend.executor.unlink(batch)
