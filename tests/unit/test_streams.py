"""The trio client's address: read off the redis.asyncio client ``from_url`` builds, and the
handshake it opens each connection with (no Redis here: tests/integration runs it)."""

from __future__ import annotations

import ssl

import pytest
import redis.asyncio
from redis.credentials import UsernamePasswordCredentialProvider

from celery_unique import ConfigurationError
from celery_unique.executors.streams import Address
from celery_unique.executors.wire import Packer


def test_the_address_is_the_clients() -> None:
    client = redis.asyncio.Redis.from_url(
        "redis://user:pw@cache.internal:6380/3", client_name="web", max_connections=9
    )
    address = Address.of(client)
    assert (address.host, address.port, address.db) == ("cache.internal", 6380, 3)
    assert (address.username, address.password, address.client_name) == ("user", "pw", "web")
    assert address.max_connections == 9
    assert address.tls is None and address.path is None


def test_the_handshake_authenticates_selects_and_names() -> None:
    address = Address(username="user", password="pw", db=3, client_name="web")
    assert address.handshake(Packer()) == [
        Packer().command(("AUTH", "user", "pw")),
        Packer().command(("SELECT", 3)),
        Packer().command(("CLIENT", "SETNAME", "web")),
    ]
    assert Address(password="pw").handshake(Packer()) == [Packer().command(("AUTH", "pw"))]
    assert Address().handshake(Packer()) == []  # db 0, no password: nothing to say


def test_a_credential_provider_is_asked_at_each_handshake() -> None:
    provider = UsernamePasswordCredentialProvider("user", "rotated")
    address = Address(credential_provider=provider)
    assert address.handshake(Packer()) == [Packer().command(("AUTH", "user", "rotated"))]


def test_a_rediss_url_carries_its_certificate_check() -> None:
    client = redis.asyncio.Redis.from_url("rediss://cache.internal:6380/0?ssl_cert_reqs=none")
    address = Address.of(client)
    assert address.tls is not None
    assert address.tls.verify_mode == ssl.CERT_NONE and not address.tls.check_hostname
    assert address.tls_hostname == "cache.internal"


def test_a_unix_socket_url_is_kept() -> None:
    address = Address.of(redis.asyncio.Redis.from_url("unix:///run/redis.sock?db=2"))
    assert address.path == "/run/redis.sock" and address.db == 2


def test_a_cluster_client_is_refused_with_what_is_supported() -> None:
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=7000)
    with pytest.raises(ConfigurationError, match="Cluster and Sentinel run on asyncio"):
        Address.of(client)
