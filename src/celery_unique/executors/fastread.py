"""The fast read: a whole batch's replies parsed straight off redis-py's asyncio stream.

What it touches: ``connection._reader``, the private :class:`asyncio.StreamReader` of a
``redis.asyncio.Connection``, read directly, and the connection's ``next_health_check``, set
as redis-py's own ``read_response`` sets it. This is the one place that reads redis-py's
private stream.

Why: at a few dozen concurrent callers, redis-py's per-reply timeout and parser pass were most
of the client's CPU time. Reading the stream's buffer in large chunks and parsing every reply of
a batch with :class:`~.wire.Reader` costs a fraction of that.

How it falls back: :func:`read_batch` reads nothing and answers ``None`` unless the connection
speaks RESP2 (RESP3's out-of-band pushes must reach redis-py's push handler) and its
``_reader`` is there and an ``asyncio.StreamReader``: other transports, or a redis-py that
changed its insides, are then read one reply at a time with redis-py's public
``read_response``, by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.exceptions as rex

from .wire import INCOMPLETE, Reader

__all__ = ["read_batch"]

_READ_SIZE = 65536  # bytes per read of a batch's replies


def _stream_of(connection: Any) -> asyncio.StreamReader | None:
    """The connection's stream, when a batch's replies can be parsed straight off it."""
    if str(getattr(connection, "protocol", 2)) != "2":
        return None
    reader = getattr(connection, "_reader", None)  # redis-py's own, checked before use
    return reader if isinstance(reader, asyncio.StreamReader) else None


async def read_batch(
    connection: Any, count: int, decode: Callable[[bytes], str] | None
) -> list[Any] | None:
    """``count`` replies read off ``connection``'s stream, error replies in place as redis-py
    exceptions (``decode``: how bulk strings are decoded, ``None`` to keep bytes); ``None``,
    with nothing read, where the stream cannot be read so (see the module docstring)."""
    stream = _stream_of(connection)
    if stream is None:
        return None
    parser = Reader(decode)
    answers: list[Any] = []
    while len(answers) < count:
        data = await stream.read(_READ_SIZE)
        if not data:
            raise rex.ConnectionError("Connection closed by server.")
        parser.feed(data)
        while (answer := parser.get()) is not INCOMPLETE:
            answers.append(answer)
    if len(answers) != count:
        raise rex.InvalidResponse(f"{len(answers)} replies to {count} commands")
    interval = getattr(connection, "health_check_interval", 0)
    if interval:  # what read_response does: a connection just heard from needs no PING
        connection.next_health_check = asyncio.get_running_loop().time() + interval
    return answers
