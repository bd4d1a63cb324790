"""The fast paths: a batch written and its replies parsed straight on redis-py's asyncio
streams, and a connection kept between batches.

What it touches: ``connection._reader`` and ``connection._writer``, the private
:class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` of a
``redis.asyncio.Connection``, and the connection's ``next_health_check``, set as redis-py's
own ``read_response`` sets it. This is the one place that touches redis-py's private streams.

Why: at a few dozen concurrent callers, redis-py's per-reply timeout and parser pass were most
of the client's CPU time. Reading the stream's buffer in large chunks and parsing every reply of
a batch with :class:`~.wire.Reader` costs a fraction of that. A lone caller pays for the rest:
``send_packed_command`` starts a task for its ``wait_for`` on every write, and the pool's
checkout and release (a lock, a health look, metrics) cost about as much as the round trip's
own work on the client; :func:`write_batch` and :func:`sound` spare both.

How it falls back: :func:`read_batch` reads nothing and answers ``None``, :func:`write_batch`
writes nothing and answers ``False``, and :func:`sound` answers ``False`` (the connection goes
back to the pool, whose checkout looks at it), unless the connection speaks RESP2 (RESP3's
out-of-band pushes must reach redis-py's push handler) and its streams are there and asyncio's
own: other transports, or a redis-py that changed its insides, go through redis-py's public
``send_packed_command``, ``read_response`` and pool, by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import redis.exceptions as rex

from .wire import INCOMPLETE, Reader

__all__ = ["Progress", "Streams", "read_batch", "sound", "streams", "write_batch"]

_READ_SIZE = 65536  # bytes per read of a batch's replies


def _stream_of(connection: Any) -> asyncio.StreamReader | None:
    """The connection's stream, when a batch's replies can be parsed straight off it."""
    protocol = getattr(connection, "protocol", 2)
    if protocol != 2 and protocol != "2":
        return None
    reader = getattr(connection, "_reader", None)  # redis-py's own, checked before use
    return reader if isinstance(reader, asyncio.StreamReader) else None


class Streams(NamedTuple):
    """A connection's two streams, found once for a batch by :func:`streams`."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def streams(connection: Any) -> Streams | None:
    """The connection's streams, when a batch can be written straight onto it and its
    replies read off it: RESP2, asyncio's own streams, and no health check due on use
    (``health_check_interval``: redis-py's write would PING first); else ``None``."""
    reader = _stream_of(connection)
    if reader is None or getattr(connection, "health_check_interval", None):
        return None
    writer = getattr(connection, "_writer", None)  # redis-py's own, checked before use
    return Streams(reader, writer) if isinstance(writer, asyncio.StreamWriter) else None


async def write_batch(found: Streams, data: bytes) -> bool:
    """Write ``data`` onto the stream at once; ``False``, with nothing written, when its
    transport is closing (the connection is going)."""
    transport = found.writer.transport
    if transport.is_closing():
        return False
    found.writer.write(data)
    if transport.get_write_buffer_size():  # the socket took less than all: wait
        await found.writer.drain()
    return True


def sound(found: Streams | None) -> bool:
    """Whether a connection whose last batch's replies were all read can take the next one
    as it is: its streams (see :func:`streams`) neither ended nor failed nor closing."""
    if found is None:
        return False
    reader = found.reader
    return not (reader.at_eof() or reader.exception() or found.writer.transport.is_closing())


class Progress:
    """What a batch's read has got so far (the parser and the replies it gave), kept by the
    caller so that a read cut short (its caller cancelled) can be carried on elsewhere."""

    __slots__ = ("answers", "parser")

    def __init__(self, decode: Callable[[bytes], str] | None) -> None:
        self.parser = Reader(decode)
        self.answers: list[Any] = []


async def read_batch(
    connection: Any,
    count: int,
    decode: Callable[[bytes], str] | None,
    progress: Progress | None = None,
) -> list[Any] | None:
    """``count`` replies read off ``connection``'s stream, error replies in place as redis-py
    exceptions (``decode``: how bulk strings are decoded, ``None`` to keep bytes); ``None``,
    with nothing read, where the stream cannot be read so (see the module docstring).
    ``progress``: where the read keeps what it got (and goes on from)."""
    stream = _stream_of(connection)
    if stream is None:
        return None
    if progress is None:
        progress = Progress(decode)
    parser, answers = progress.parser, progress.answers
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
