"""TLS (a CA, client certificates, a wrong CA) and the minimal ACL rule of the README, on
real servers: the core paths run as that user, and a missing permission is named."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest

from celery_unique import BackendError, BackendUnavailable
from celery_unique.testing import RedisServer, TLSFiles, running_redis
from tests.conftest import MakeBackend

pytestmark = pytest.mark.anyio


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tls: TLSFiles) -> Iterator[RedisServer]:
    with running_redis(tls=tls, tls_auth_clients="optional") as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tls: TLSFiles) -> Iterator[RedisServer]:
    with running_redis(tls=tls, tls_auth_clients="yes") as server:
        yield server


async def exercise(backend: object) -> None:
    b: object = backend
    lock = b.lock("job", ttl=10)  # type: ignore[attr-defined]
    assert await lock.acquire(blocking=False)
    await lock.release()
    semaphore = b.semaphore("pool", limit=2, ttl=10)  # type: ignore[attr-defined]
    assert await semaphore.acquire(blocking=False)
    await semaphore.release()
    assert (await b.rate_limiter("5/s").hit("k")).allowed  # type: ignore[attr-defined]


async def test_tls_with_the_ca(
    make_backend: MakeBackend, tls_server: RedisServer, tls: TLSFiles
) -> None:
    await exercise(make_backend(tls_server.url, **tls.client_kwargs(client_cert=False)))


async def test_tls_with_a_client_certificate(
    make_backend: MakeBackend, mtls_server: RedisServer, tls: TLSFiles
) -> None:
    await exercise(make_backend(mtls_server.url, **tls.client_kwargs()))


def connections_received(server: RedisServer) -> int:
    info = str(server.command("INFO", "stats"))
    return int(info.split("total_connections_received:")[1].split()[0])


async def test_a_wrong_ca_fails_fast_with_backend_unavailable(
    make_backend: MakeBackend, tls_server: RedisServer, tls: TLSFiles
) -> None:
    backend = make_backend(tls_server.url, ssl_ca_certs=str(tls.other_ca_cert))
    before = connections_received(tls_server)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="certificate verify failed"):
        await backend.acquire_or_owner("job", "me", 10)
    assert time.monotonic() - started < 1.0  # not the 2 s deadline, let alone retries of it
    # One connection and one retry of it, sent once more by the executor: no retry storm.
    assert connections_received(tls_server) - before <= 4


async def test_a_missing_client_certificate_is_backend_unavailable(
    make_backend: MakeBackend, mtls_server: RedisServer, tls: TLSFiles
) -> None:
    backend = make_backend(mtls_server.url, **tls.client_kwargs(client_cert=False))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.acquire_or_owner("job", "me", 10)
    assert time.monotonic() - started <= 2.5


# -- ACL --------------------------------------------------------------------------------------

PREFIX = "cu:"
# The README's rule, word for word (its Deployment section): the commands the library sends,
# those its scripts run, and what redis-py sends on connecting (its CLIENT SETINFO, Redis
# 7.2+, may be refused: redis-py ignores that).
LIBRARY_COMMANDS = (
    "+evalsha +script|load +get +ping +scan +unlink +config|get "
    "+del +set +pexpire +pexpireat +pttl +time "
    "+zadd +zcard +zcount +zrange +zrem +zremrangebyscore +zscore "
    "+hello +auth +select"
)
RULE = f"celery-unique on >s3cret resetkeys ~{PREFIX}* resetchannels -@all {LIBRARY_COMMANDS}"


@contextmanager
def acl_server(rule: str) -> Iterator[RedisServer]:
    """A server whose user ``celery-unique`` (password ``s3cret``) has ``rule``."""
    with running_redis(users=[rule], password="admin-pw") as server:
        yield server


@pytest.fixture(scope="module")
def limited_server() -> Iterator[RedisServer]:
    """A server whose library user has the README's minimal rule."""
    with acl_server(RULE) as server:
        yield server


def user_url(server: RedisServer, db: int = 0) -> str:
    """The URL that logs in as ``celery-unique``."""
    return f"redis://celery-unique:s3cret@{server.host}:{server.port}/{db}"


@pytest.mark.parametrize("db", [0, 1])
async def test_the_core_paths_run_as_the_minimal_user(
    make_backend: MakeBackend, limited_server: RedisServer, db: int
) -> None:
    backend = make_backend(user_url(limited_server, db), key_prefix=PREFIX + uuid.uuid4().hex)
    await exercise(backend)
    assert await backend.owner("job") is None
    limiter = backend.rate_limiter("1/h")
    assert (await limiter.reserve("r", max_wait=1)).reserved
    assert not (await limiter.hit("r")).allowed


MISSING = ["evalsha", "zadd", "get", "unlink"]


@pytest.mark.parametrize("command", MISSING)
async def test_a_missing_permission_is_a_backend_error_that_names_it(
    make_backend: MakeBackend, command: str, prefix: str
) -> None:
    rule = RULE.replace(f" +{command}", "")
    assert rule != RULE
    with acl_server(rule) as server:
        backend = make_backend(user_url(server), key_prefix=PREFIX + prefix)
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "evalsha": lambda: backend.acquire_or_owner("job", "me", 10),
            "zadd": lambda: backend.semaphore("pool", limit=2, ttl=10).acquire(blocking=False),
            "get": lambda: backend.owner("job"),
            "unlink": lambda: backend.executor.unlink([PREFIX + prefix + "x"]),
        }
        with pytest.raises(BackendError) as caught:
            await operations[command]()
        assert not isinstance(caught.value, BackendUnavailable)
        message = str(caught.value)
        assert f"'{command}'" in message, message  # which permission
        assert "ACL rule" in message  # and where the rule is
