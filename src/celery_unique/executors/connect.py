"""Building a redis-py client from a URL, with defaults that bound every call.

``redis://``, ``rediss://`` (TLS; a ``ssl_cert_reqs`` in the query may use Celery's
``CERT_REQUIRED`` spellings) and ``unix://`` URLs; Celery's Sentinel form
``sentinel://h1:26379;sentinel://h2:26379/0`` with ``master_name=`` (and ``sentinel_kwargs=``
for the sentinels themselves); ``cluster=True`` for a Redis Cluster. The defaults, each
overridable by keyword:

* 2 s to connect and 2 s per reply (``socket_connect_timeout``, ``socket_timeout``): an
  operation on a hung or unreachable server fails within about 2 s;
* at most 64 connections per pool, which callers queue for (``max_connections``; a caller
  waits up to the socket timeout, ``timeout``), instead of failing with "Too many connections";
* RESP2 (``protocol=2``), so that the async executor can parse batches off the stream;
* a connection that broke is retried once, after a short pause; a timeout never is, so
  retries cannot multiply the deadline (the executors add the same rule for their commands).
  A cluster client retries nothing itself (its retries re-run the whole command, timeouts
  included): a failed node is one :class:`~celery_unique.BackendUnavailable`, and the
  client's next command finds the new layout;
* a sentinel gets as long to answer as a server gets to accept a connection.
"""

from __future__ import annotations

import inspect
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.exceptions as rex
import redis.retry
import redis.sentinel
from redis.backoff import EqualJitterBackoff, NoBackoff

from ..errors import ConfigurationError

__all__ = [
    "CLIENT_DEFAULTS",
    "SENTINEL_PORT",
    "async_client",
    "parse_sentinel_url",
    "sync_client",
]

CLIENT_DEFAULTS: dict[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 2.0,
    "max_connections": 64,
    # RESP2, whatever redis-py's default: the async executor parses a whole batch's replies
    # off the stream only on RESP2 connections (RESP3 may carry pushes for redis-py), and
    # redis-py 8 defaults to RESP3, which sends every reply through read_response.
    "protocol": 2,
}
SENTINEL_PORT = 26379


def _backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=0.1, base=0.01)


def _kwargs(redis_kw: dict[str, Any], retry: Any, *, pooled: bool) -> dict[str, Any]:
    kwargs = {**CLIENT_DEFAULTS, **redis_kw}
    kwargs.setdefault("retry", retry)  # a fresh one per client: redis-py counts in it
    if pooled:
        # Seconds a caller waits for a free pooled connection: no longer than for a reply.
        kwargs.setdefault("timeout", kwargs["socket_timeout"])
    return kwargs


# Celery's spellings of a certificate check (in a rediss:// URL's query, or
# redis_backend_use_ssl, where Celery's docs give ssl constants), as the short names every
# redis-py takes: redis-py 5's asyncio client fails on an ssl constant.
_CERT_REQS = {
    "cert_none": "none",
    "none": "none",
    "cert_optional": "optional",
    "optional": "optional",
    "cert_required": "required",
    "required": "required",
}
_CERT_CONSTANTS = {
    ssl.CERT_NONE: "none",
    ssl.CERT_OPTIONAL: "optional",
    ssl.CERT_REQUIRED: "required",
}


def _cert_reqs(url: str, kwargs: dict[str, Any]) -> str:
    """``url`` without its ``ssl_cert_reqs`` query (a keyword given wins over it), and that
    check in ``kwargs`` by its redis-py name (``"none"``, ``"optional"``, ``"required"``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in query if name == "ssl_cert_reqs"]
    if given:
        kwargs.setdefault("ssl_cert_reqs", given[-1])
        rest = urlencode([(name, value) for name, value in query if name != "ssl_cert_reqs"])
        url = urlunsplit(parts._replace(query=rest))
    value = kwargs.get("ssl_cert_reqs")
    if isinstance(value, str):
        if value.lower() not in _CERT_REQS:
            raise ConfigurationError(
                f"ssl_cert_reqs must be one of {sorted(set(_CERT_REQS))}, got {value!r}"
            )
        kwargs["ssl_cert_reqs"] = _CERT_REQS[value.lower()]
    elif value in _CERT_CONSTANTS:
        kwargs["ssl_cert_reqs"] = _CERT_CONSTANTS[value]
    return url


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' addresses and the master's ``db``/``username``/``password`` in
    Celery's form ``sentinel://[user:password@]host[:port][/db];sentinel://...``.

    The credentials and db are the data servers' (the sentinels' own password goes in
    ``sentinel_kwargs``); any part may name them, and parts that do must agree.
    """
    addresses: list[tuple[str, int]] = []
    found: dict[str, Any] = {}
    for part in filter(None, (chunk.strip() for chunk in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigurationError(
                f"a Sentinel URL is sentinel://host:port parts joined by ';', got {part!r}"
            )
        addresses.append((parsed.hostname, parsed.port or SENTINEL_PORT))
        given: dict[str, Any] = {}
        if parsed.username:
            given["username"] = unquote(parsed.username)
        if parsed.password:
            given["password"] = unquote(parsed.password)
        if parsed.path.strip("/"):
            try:
                given["db"] = int(parsed.path.strip("/"))
            except ValueError as exc:
                raise ConfigurationError(f"the db of a Sentinel URL is a number: {part!r}") from exc
        for name, value in given.items():
            if found.setdefault(name, value) != value:
                raise ConfigurationError(f"the parts of the Sentinel URL disagree on its {name}")
    if not addresses:
        raise ConfigurationError(f"no sentinel in the URL {url!r}")
    return addresses, found


def _sentinel_parts(
    url: str,
    master_name: str | None,
    sentinel_kwargs: dict[str, Any] | None,
    kwargs: dict[str, Any],
    no_retry: Any,
) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, Any], str]:
    if not master_name:
        raise ConfigurationError(
            "a sentinel:// URL needs master_name= (Celery: transport_options master_name): "
            "the name the sentinels monitor the master under"
        )
    addresses, found = parse_sentinel_url(url)
    wait = kwargs["socket_connect_timeout"]
    # One try per sentinel: the next sentinel is the retry.
    sentinels = {
        "socket_connect_timeout": wait,
        "socket_timeout": wait,
        "retry": no_retry,
        **(sentinel_kwargs or {}),
    }
    return addresses, sentinels, {**found, **kwargs}, master_name


# redis-py's Sentinel pools cannot queue callers for a connection; combined with the
# blocking pool they do, where the blocking pool's disconnect() takes the argument the
# Sentinel pool passes it (redis-py >= 5.1; older ones get the plain Sentinel pool, which
# fails a caller beyond max_connections at once, with BackendUnavailable).
class BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel-managed pool whose callers queue for a free connection (``timeout``)."""


class AsyncBlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """The asyncio twin of :class:`BlockingSentinelPool`."""


def _takes_inuse(pool_class: Any) -> bool:
    return "inuse_connections" in inspect.signature(pool_class.disconnect).parameters


def sentinel_pools_can_queue() -> tuple[bool, bool]:
    """Whether this redis-py's (sync, asyncio) Sentinel pools can queue callers for a
    connection: its blocking pool's ``disconnect`` takes what a Sentinel pool passes it."""
    return (
        _takes_inuse(redis.BlockingConnectionPool),
        _takes_inuse(redis.asyncio.BlockingConnectionPool),
    )


def sentinel_pool_classes(*, blocking: bool | None = None) -> tuple[type, type]:
    """The (sync, asyncio) pool classes for Sentinel clients: the queueing ones where this
    redis-py supports them (or ``blocking`` says so), else redis-py's own."""
    sync_ok, async_ok = sentinel_pools_can_queue() if blocking is None else (blocking, blocking)
    return (
        BlockingSentinelPool if sync_ok else redis.sentinel.SentinelConnectionPool,
        AsyncBlockingSentinelPool if async_ok else redis.asyncio.sentinel.SentinelConnectionPool,
    )


def _pool_kwargs(pool_class: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    if issubclass(pool_class, redis.BlockingConnectionPool | redis.asyncio.BlockingConnectionPool):
        return kwargs
    return {name: value for name, value in kwargs.items() if name != "timeout"}


def _no_cluster_retries(client: Any) -> Any:
    # redis-py < 6 counts the cluster's retries here rather than in its retry object.
    if isinstance(getattr(client, "cluster_error_retry_attempts", None), int):
        client.cluster_error_retry_attempts = 0
    return client


@dataclass(frozen=True)
class _Flavour:
    """The redis-py classes one flavour builds its clients from."""

    client: Any
    cluster: Any
    pool: Any
    sentinel: Any
    retry: Any
    sentinel_pool: int  # its index in sentinel_pool_classes()


_SYNC = _Flavour(
    redis.Redis,
    redis.RedisCluster,
    redis.BlockingConnectionPool,
    redis.sentinel.Sentinel,
    redis.retry.Retry,
    0,
)
_ASYNC = _Flavour(
    redis.asyncio.Redis,
    redis.asyncio.RedisCluster,
    redis.asyncio.BlockingConnectionPool,
    redis.asyncio.sentinel.Sentinel,
    redis.asyncio.retry.Retry,
    1,
)


def _client(
    flavour: _Flavour,
    url: str,
    cluster: bool,
    master_name: str | None,
    sentinel_kwargs: dict[str, Any] | None,
    redis_kw: dict[str, Any],
) -> Any:
    redis_kw = dict(redis_kw)
    url = _cert_reqs(url, redis_kw)
    if cluster:
        _no_sentinel_options(master_name, sentinel_kwargs)
        kwargs = _kwargs(redis_kw, flavour.retry(NoBackoff(), 0), pooled=False)
        return _no_cluster_retries(flavour.cluster.from_url(url, **kwargs))
    retry = flavour.retry(_backoff(), 1, supported_errors=(rex.ConnectionError,))
    kwargs = _kwargs(redis_kw, retry, pooled=True)
    if url.startswith("sentinel://"):
        addresses, sentinels, kwargs, name = _sentinel_parts(
            url, master_name, sentinel_kwargs, kwargs, flavour.retry(NoBackoff(), 0)
        )
        pool_class = sentinel_pool_classes()[flavour.sentinel_pool]
        manager = flavour.sentinel(addresses, sentinel_kwargs=sentinels)
        return manager.master_for(
            name, connection_pool_class=pool_class, **_pool_kwargs(pool_class, kwargs)
        )
    _no_sentinel_options(master_name, sentinel_kwargs)
    pool = flavour.pool.from_url(url, **kwargs)
    return flavour.client.from_pool(pool)  # the client owns the pool: close() closes it


def sync_client(
    url: str,
    *,
    cluster: bool = False,
    master_name: str | None = None,
    sentinel_kwargs: dict[str, Any] | None = None,
    **redis_kw: Any,
) -> Any:
    """A ``redis.Redis`` (``redis.RedisCluster`` with ``cluster=True``) for ``url``; a
    ``sentinel://`` URL gives the master's client, found through the sentinels."""
    return _client(_SYNC, url, cluster, master_name, sentinel_kwargs, redis_kw)


def async_client(
    url: str,
    *,
    cluster: bool = False,
    master_name: str | None = None,
    sentinel_kwargs: dict[str, Any] | None = None,
    **redis_kw: Any,
) -> Any:
    """A ``redis.asyncio.Redis`` (``redis.asyncio.RedisCluster``) for ``url``; a
    ``sentinel://`` URL gives the master's client, found through the sentinels."""
    return _client(_ASYNC, url, cluster, master_name, sentinel_kwargs, redis_kw)


def _no_sentinel_options(master_name: str | None, sentinel_kwargs: dict[str, Any] | None) -> None:
    if master_name is not None or sentinel_kwargs is not None:
        raise ConfigurationError(
            "master_name and sentinel_kwargs apply to a sentinel:// URL only "
            "(sentinel://host:26379;sentinel://host2:26379/0)"
        )
