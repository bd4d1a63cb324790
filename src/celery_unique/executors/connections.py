"""What both executors need from a redis-py client: its pool, its encoding, its deadline.

Everything here is redis-py's public API (``ConnectionPool.get_connection``/``release``,
``Connection.send_packed_command``/``read_response``/``can_read``, ``connection_kwargs``);
what differs between the redis-py versions the library supports is decided once, here.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import redis
import redis.asyncio

from ..errors import ConfigurationError
from .wire import Packer

__all__ = [
    "DEFAULT_TIMEOUT",
    "aclose_client",
    "checkout",
    "checkout_async",
    "close_client",
    "deadline_of",
    "decoder",
    "direct_pool",
    "packer",
]

#: Seconds an operation may take when the client sets no ``socket_timeout`` of its own.
DEFAULT_TIMEOUT = 2.0


def _takes_no_command_name(method: Callable[..., Any]) -> bool:
    # redis-py >= 5.3 picks a pooled connection without a command name (and warns if given one).
    parameter = inspect.signature(method).parameters.get("command_name")
    return parameter is None or parameter.default is None


_SYNC_BARE = _takes_no_command_name(redis.ConnectionPool.get_connection)
_ASYNC_BARE = _takes_no_command_name(redis.asyncio.ConnectionPool.get_connection)


def checkout(pool: Any) -> Any:
    """A connected connection from a sync pool (waiting for one if all are busy)."""
    return pool.get_connection() if _SYNC_BARE else pool.get_connection("EVALSHA")


async def checkout_async(pool: Any) -> Any:
    """A connected connection from an asyncio pool (waiting for one if all are busy)."""
    return await (pool.get_connection() if _ASYNC_BARE else pool.get_connection("EVALSHA"))


def direct_pool(client: Any) -> Any | None:
    """The pool to take connections from, or ``None`` when commands must go through the
    client: a cluster routes each key to its node, and a single-connection client owns (and
    locks) its one connection."""
    if isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster):
        return None
    if getattr(client, "single_connection_client", False) or getattr(client, "connection", None):
        return None
    return client.connection_pool


def packer(pool: Any) -> Packer:
    """A packer that spells arguments in the pool's encoding, as redis-py's encoder would."""
    encoder = pool.get_encoder()
    return Packer(encoder.encoding, encoder.encoding_errors)


def decoder(pool: Any) -> Callable[[bytes], str] | None:
    """How replies read off the wire are decoded (``None``: kept as bytes), as redis-py would."""
    encoder = pool.get_encoder()
    if not encoder.decode_responses:
        return None
    encoding, errors = encoder.encoding, encoder.encoding_errors
    return lambda data: data.decode(encoding, errors)


def deadline_of(client: Any, timeout: float | None) -> float:
    """Seconds one operation may take: ``timeout`` if given, else the client's
    ``socket_timeout``, else :data:`DEFAULT_TIMEOUT`."""
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        return float(timeout)
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    configured = kwargs.get("socket_timeout")
    if configured is None and hasattr(client, "get_default_node"):
        node = client.get_default_node()  # a cluster: its nodes share the settings
        node_client = getattr(node, "redis_connection", None)
        if node_client is not None:
            configured = node_client.connection_pool.connection_kwargs.get("socket_timeout")
    return float(configured) if configured else DEFAULT_TIMEOUT


def _sentinels(client: Any) -> list[Any]:
    # A Sentinel client's pool keeps the Sentinel manager (public in redis-py), whose clients
    # of the sentinels themselves its close() leaves open.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    return list(getattr(manager, "sentinels", ()))


def close_client(client: Any) -> None:
    """Close a sync client and every socket it opened: a cluster's node pools (which
    ``RedisCluster.close()`` leaves open) and a Sentinel client's sentinel connections."""
    if isinstance(client, redis.RedisCluster):
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
    client.close()
    for sentinel in _sentinels(client):
        sentinel.close()


async def aclose_client(client: Any, nodes: Iterable[Any] = ()) -> None:
    """Close an asyncio client and every socket it opened (see :func:`close_client`), and
    ``nodes``: cluster nodes it routed to, some of which it may have dropped since."""
    await client.aclose()
    for sentinel in _sentinels(client):
        await sentinel.aclose()
    await asyncio.gather(*(node.disconnect() for node in nodes), return_exceptions=True)
