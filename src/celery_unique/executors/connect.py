"""Building a redis-py client from a URL, with defaults that bound every call.

``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, and ``cluster=True`` for a Redis
Cluster. The defaults, each overridable by keyword:

* 2 s to connect and 2 s per reply (``socket_connect_timeout``, ``socket_timeout``): an
  operation on a hung or unreachable server fails within about 2 s;
* at most 64 connections per pool, which callers queue for (``max_connections``; a caller
  waits up to the socket timeout, ``timeout``), instead of failing with "Too many connections";
* RESP2 (``protocol=2``), so that the async executor can parse batches off the stream;
* a connection that broke is retried once, after a short pause; a timeout never is, so
  retries cannot multiply the deadline (the executors add the same rule for their commands).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions as rex
import redis.retry
from redis.backoff import EqualJitterBackoff

__all__ = ["CLIENT_DEFAULTS", "async_client", "sync_client"]

CLIENT_DEFAULTS: dict[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 2.0,
    "max_connections": 64,
    # RESP2, whatever redis-py's default: the async executor parses a whole batch's replies
    # off the stream only on RESP2 connections (RESP3 may carry pushes for redis-py), and
    # redis-py 8 defaults to RESP3, which sends every reply through read_response.
    "protocol": 2,
}


def _backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=0.1, base=0.01)


def _kwargs(redis_kw: dict[str, Any], retry: Any, *, pooled: bool) -> dict[str, Any]:
    kwargs = {**CLIENT_DEFAULTS, **redis_kw}
    kwargs.setdefault("retry", retry)  # a fresh one per client: redis-py counts in it
    if pooled:
        # Seconds a caller waits for a free pooled connection: no longer than for a reply.
        kwargs.setdefault("timeout", kwargs["socket_timeout"])
    return kwargs


def sync_client(url: str, *, cluster: bool = False, **redis_kw: Any) -> Any:
    """A ``redis.Redis`` (``redis.RedisCluster`` with ``cluster=True``) for ``url``."""
    retry = redis.retry.Retry(_backoff(), 1, supported_errors=(rex.ConnectionError,))
    if cluster:
        return redis.RedisCluster.from_url(url, **_kwargs(redis_kw, retry, pooled=False))
    pool = redis.BlockingConnectionPool.from_url(url, **_kwargs(redis_kw, retry, pooled=True))
    return redis.Redis.from_pool(pool)  # the client owns the pool: close() closes it


def async_client(url: str, *, cluster: bool = False, **redis_kw: Any) -> Any:
    """A ``redis.asyncio.Redis`` (``redis.asyncio.RedisCluster``) for ``url``."""
    retry = redis.asyncio.retry.Retry(_backoff(), 1, supported_errors=(rex.ConnectionError,))
    if cluster:
        return redis.asyncio.RedisCluster.from_url(url, **_kwargs(redis_kw, retry, pooled=False))
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, **_kwargs(redis_kw, retry, pooled=True)
    )
    return redis.asyncio.Redis.from_pool(pool)
