"""Timing promises under faults, each where it once failed (found by a soak of combined faults):

* a call's deadline covers taking a connection: connecting and the handshake spend from it,
  in a fresh pool, after the server dropped the pool's connections, and on the one resend;
* release stops renewal for sure: no extend is sent once ``release()`` has returned, and
  release never waits on a renewal (Python 3.10 and 3.11 could swallow its cancellation);
* a lease is counted from the send of the acquire that took it, so the holder hears of its
  loss before a successor can take the name.

Faults come from the fault proxy: ``hold`` swallows every reply (a server that accepts and
never answers, handshakes included), ``cut()`` drops the open connections, ``delay`` slows
replies down.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio

from celery_unique import BackendUnavailable, LockNotOwnedError
from celery_unique.core.holding import loss_margin
from celery_unique.core.scripts import (
    ACQUIRE,
    EXTEND,
    RELEASE,
    SEMAPHORE_EXTEND,
    SEMAPHORE_RELEASE,
)
from celery_unique.executors import fastread, streams
from tests.conftest import MakeBackend
from tests.helpers import async_wait_until
from tests.proxy import Proxy

pytestmark = pytest.mark.anyio

# acquire(timeout=T) returns or raises within T + this (its last attempt's floor).
SLACK = 0.5


def _waited(error: BaseException) -> float:
    """The seconds an error's message says the call waited."""
    found = re.search(r"within (\d+\.\d+) s", str(error))
    assert found, str(error)
    return float(found.group(1))


@pytest.mark.parametrize("pool", ["fresh", "dropped"])
async def test_a_short_acquire_timeout_covers_connecting(
    make_backend: MakeBackend, proxy: Proxy, pool: str
) -> None:
    backend = make_backend(proxy.url)  # socket_timeout 2 s: far longer than the call's
    if pool == "dropped":
        await backend.lock("warm", ttl=5).owner()  # a pooled connection...
        proxy.cut()  # ...that the server dropped (CLIENT KILL, a restart)
    proxy.hold = True  # connections are accepted, the handshake never answered
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await backend.lock("job", ttl=5).acquire(timeout=0.2)
    took = time.monotonic() - started
    assert took <= 0.2 + SLACK, took
    assert _waited(raised.value) <= took + 0.01  # the message tells the time really waited


async def test_the_resend_after_a_broken_connection_stays_within_the_deadline(
    make_backend: MakeBackend, proxy: Proxy
) -> None:
    backend = make_backend(proxy.url, socket_timeout=1.0)
    await backend.lock("warm", ttl=5).owner()
    proxy.hold = True
    seen = len(proxy.sent)
    outcome: dict[str, Any] = {}

    async def call() -> None:
        started = time.monotonic()
        try:
            await backend.lock("job", ttl=5).acquire(blocking=False)
        except BackendUnavailable as exc:
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await async_wait_until(lambda: ACQUIRE.sha.encode() in proxy.sent[seen:])
        # Most of the deadline gone, the connection breaks: acquire may be sent again (it is
        # idempotent for its token), but only on what is left of the same second.
        await anyio.sleep(0.8)
        proxy.cut()
    assert isinstance(outcome.get("error"), BackendUnavailable), outcome
    assert outcome["took"] <= 1.0 + SLACK, outcome["took"]


@pytest.mark.parametrize("flavour", ["async"])  # the sync executor's deadline never cancels
async def test_a_deadline_holds_when_redis_py_swallows_its_cancellation(
    make_backend: MakeBackend, proxy: Proxy
) -> None:
    """Python 3.11's ``asyncio.wait_for``, which redis-py writes with, swallows a
    cancellation that lands as the write completes: the deadline's one cancellation is then
    lost, and a read of a server that never answers must not wait on regardless. (RESP3: the
    executor writes through redis-py then; on RESP2 it writes onto the stream itself.)"""
    swallowed: list[float] = []

    class Swallowing(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            await super().send_packed_command(command, check_health)
            if ACQUIRE.sha.encode() in _joined(command):
                try:
                    await anyio.sleep(5)  # a write that completes just as the deadline lands
                except BaseException:
                    swallowed.append(time.monotonic())  # and whose cancellation is lost

    backend = make_backend(proxy.url, socket_timeout=1.0, connection_class=Swallowing, protocol=3)
    await backend.lock("warm", ttl=5).owner()
    proxy.hold = True  # and nothing is answered any more
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await backend.lock("job", ttl=5).acquire(blocking=False)
    took = time.monotonic() - started
    assert swallowed, "the deadline's cancellation never reached the write"
    assert took <= 1.0 + SLACK, took
    assert _waited(raised.value) <= took + 0.01


Written = list[bytes]


def _scripts(written: Written) -> list[bytes]:
    """Every script call written, in order, whole (a batch writes several at once)."""
    return b"".join(written).split(b"$7\r\nEVALSHA\r\n")[1:]


def _joined(command: Any) -> bytes:
    """What ``send_packed_command`` was given, as the bytes written."""
    return command if isinstance(command, bytes) else b"".join(command)


def _recording(flavour: str, written: Written) -> type[Any]:
    """A redis-py connection class that notes every write, in the order they happen."""

    if flavour == "sync":

        class Recording(redis.Connection):
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                written.append(_joined(command))
                super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call, unused-ignore]

        return Recording

    class AsyncRecording(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            written.append(_joined(command))
            await super().send_packed_command(command, check_health)

    return AsyncRecording


def _recording_stream_writes(monkeypatch: pytest.MonkeyPatch, written: Written) -> None:
    """Note the async executor's own writes onto redis-py's streams too (its fast path), and
    the trio executor's."""
    write_batch = fastread.write_batch

    async def recorded(found: fastread.Streams, data: bytes) -> bool:
        wrote = await write_batch(found, data)
        if wrote:
            written.append(data)
        return wrote

    monkeypatch.setattr(fastread, "write_batch", recorded)
    # And the trio executor's, on anyio streams.
    write = streams.StreamConnection.write

    async def recorded_stream(connection: streams.StreamConnection, data: bytes, gate: Any) -> bool:
        wrote = await write(connection, data, gate)
        if wrote:
            written.append(data)
        return wrote

    monkeypatch.setattr(streams.StreamConnection, "write", recorded_stream)


@pytest.mark.parametrize("kind", ["lock", "semaphore"])
async def test_no_extend_is_written_once_release_has_begun(
    make_backend: MakeBackend,
    proxy: Proxy,
    flavour: str,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hundreds of releases landing at every phase of renewal, through a slow link; every
    write the client makes is noted in order, so no scheduling of this test can blur it."""
    written: Written = []
    _recording_stream_writes(monkeypatch, written)
    backend = make_backend(proxy.url, connection_class=_recording(flavour, written))
    proxy.delay = 0.02
    tokens: list[bytes] = []
    lost = 0
    rng = random.Random(16)
    ttl = 0.6

    async def trials(n: int) -> None:
        nonlocal lost
        for _ in range(n):
            if kind == "lock":
                held: Any = backend.lock(f"r{rng.random()}", ttl=ttl, auto_renew=True)
            else:
                held = backend.semaphore("r", limit=1000, ttl=ttl, auto_renew=True)
            await held.acquire()
            await anyio.sleep(rng.uniform(0, ttl))  # any phase of the renewal cycle
            with anyio.fail_after(3):  # a release held up by its renewal fails here
                try:
                    await held.release()
                except LockNotOwnedError:
                    lost += 1  # a saturated box stalled a renewal past its lease: told so
            tokens.append(held.token.encode())

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(trials, 10)
    assert len(tokens) == 200
    assert lost < 100, f"{lost} of 200 leases lost: renewal did not run"
    # Long enough for a renewal that would go on to write its next extend.
    await anyio.sleep(ttl / 3 + 0.1)
    extend = (SEMAPHORE_EXTEND if kind == "semaphore" else EXTEND).sha.encode()
    release = (SEMAPHORE_RELEASE if kind == "semaphore" else RELEASE).sha.encode()
    calls = _scripts(written)
    late = []
    for token in tokens:
        mine = [call for call in calls if token in call]
        released = max(i for i, call in enumerate(mine) if call.startswith(b"$40\r\n" + release))
        if any(call.startswith(b"$40\r\n" + extend) for call in mine[released:]):
            late.append(token)
    assert late == [], f"{len(late)} of 200 renewals wrote an extend after their release"


async def test_a_lease_is_counted_from_the_send_of_its_acquire(
    make_backend: MakeBackend, proxy: Proxy
) -> None:
    ttl = 1.0
    holder = make_backend(proxy.url)
    successor = make_backend()  # straight to Redis
    await holder.lock("warm", ttl=5).owner()  # a pooled connection: no handshake below
    proxy.delay = 0.4  # replies come 0.4 s late: Redis ran the acquire long before we knew
    lost_at: list[float] = []
    lock = holder.lock(
        "job", ttl=ttl, auto_renew=True, on_lost=lambda _: lost_at.append(time.monotonic())
    )
    sent = time.monotonic()
    assert await lock.acquire(blocking=False)
    proxy.hold = True  # then silence: no renewal gets through
    taken_at = None
    deadline = sent + 5
    while time.monotonic() < deadline:
        if await successor.lock("job", ttl=ttl).acquire(blocking=False):
            taken_at = time.monotonic()
            break
        await anyio.sleep(0.01)
    assert taken_at is not None, "the lease never ran out"
    await async_wait_until(lambda: bool(lost_at))
    # Told a margin before its lease could end where Redis counts it (from the send)...
    assert lost_at[0] - sent <= ttl - loss_margin(ttl) / 2, lost_at[0] - sent
    # ...so before anyone else could take the name.
    assert lost_at[0] <= taken_at
    assert lock.lost
