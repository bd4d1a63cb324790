"""RESP on the wire: commands packed to bytes, and replies parsed.

redis-py packs every command through several layers of generic machinery; for a lock call that,
not Redis, is most of the client's time. Our commands have few shapes (EVALSHA with a constant
script and, for a limiter, constant arguments; only the keys and tokens vary), so they pack from
cached pieces, and both executors send the bytes with redis-py's ``send_packed_command``. The
async executor may also parse the replies of a whole batch from one buffer (:class:`Reader`).
No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from redis.exceptions import InvalidResponse

from .errors import reply_error

__all__ = ["INCOMPLETE", "Packer", "Reader"]

_CACHE_SIZE = 512  # distinct argument tuples kept packed; cleared, not evicted, when full


class _Incomplete:
    """Returned by :meth:`Reader.get` until a whole reply has arrived."""

    def __repr__(self) -> str:
        return "INCOMPLETE"


INCOMPLETE: Final = _Incomplete()


class _NeedMore(Exception):
    """Raised inside the parser when the buffer ends mid-reply."""


class Packer:
    """Packs commands as RESP arrays of bulk strings, the way redis-py's encoder spells them
    (``str`` in the client's encoding, ``int`` in decimal)."""

    def __init__(self, encoding: str = "utf-8", errors: str = "strict") -> None:
        self._encoding = encoding
        self._errors = errors
        self._heads: dict[tuple[str, int, int], bytes] = {}
        self._tails: dict[tuple[str | int, ...], bytes] = {}

    def _bulk(self, value: str | int | bytes) -> bytes:
        if isinstance(value, str):
            data = value.encode(self._encoding, self._errors)
        elif isinstance(value, bytes):
            data = value
        elif type(value) is int:  # not a bool: Redis would take True for 1
            data = b"%d" % value
        else:
            raise TypeError(f"cannot send {type(value).__name__} to Redis")
        return b"$%d\r\n%s\r\n" % (len(data), data)

    @property
    def cached(self) -> int:
        """How many argument tuples are kept packed."""
        return len(self._tails)

    def command(self, args: tuple[str | int, ...]) -> bytes:
        """Any command, e.g. ``("GET", key)``."""
        return b"*%d\r\n" % len(args) + b"".join(map(self._bulk, args))

    def evalsha(self, sha: str, keys: tuple[str, ...], args: tuple[str | int, ...]) -> bytes:
        """``EVALSHA sha len(keys) *keys *args``; the head and the arguments come from caches,
        so a limiter's call packs only its key."""
        head = self._heads.get((sha, len(keys), len(args)))
        if head is None:
            count = 3 + len(keys) + len(args)
            head = b"*%d\r\n" % count + self._bulk("EVALSHA") + self._bulk(sha)
            head += self._bulk(len(keys))
            self._heads[sha, len(keys), len(args)] = head
        tail = self._tails.get(args)
        if tail is None:
            if len(self._tails) >= _CACHE_SIZE:
                self._tails.clear()  # lock tokens vary; keep the cache from growing for ever
            tail = self._tails[args] = b"".join(map(self._bulk, args))
        if len(keys) == 1:
            return head + self._bulk(keys[0]) + tail
        return head + b"".join(map(self._bulk, keys)) + tail


class Reader:
    """Parses RESP2 and RESP3 replies fed to it in pieces, as redis-py would return them:
    integers as ``int``, bulk and simple strings as ``bytes`` (``str`` with ``decode``), nil as
    ``None``, arrays and sets as lists, maps as dicts, and error replies as the redis-py
    exception instance (``NoScriptError``, ``ResponseError``, ...), returned, not raised.
    It reads RESP3's reply types too, but not its out-of-band pushes (``>``), which redis-py
    hands to its push handler: an executor reads RESP3 connections through redis-py, and a
    push here is a protocol error.

    ::

        reader.feed(data)
        while (reply := reader.get()) is not INCOMPLETE: ...
    """

    def __init__(self, decode: Callable[[bytes], str] | None = None) -> None:
        self._buffer = b""
        self._pos = 0
        self._decode = decode

    def feed(self, data: bytes) -> None:
        """Append bytes read from the connection."""
        if self._pos:
            self._buffer = self._buffer[self._pos :] + data
            self._pos = 0
        else:
            self._buffer += data

    def get(self) -> Any:
        """The next whole reply, or :data:`INCOMPLETE` until more has been fed."""
        try:
            reply, self._pos = self._parse(self._buffer, self._pos)
        except _NeedMore:
            return INCOMPLETE
        return reply

    def _parse(self, buffer: bytes, pos: int) -> tuple[Any, int]:
        """The reply starting at ``pos`` and where it ends."""
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            raise _NeedMore
        kind = buffer[pos]
        line = buffer[pos + 1 : eol]
        pos = eol + 2
        if kind == 42 or kind == 126:  # '*' array, '~' set
            size = int(line)
            if size < 0:
                return None, pos
            items = []
            for _ in range(size):
                # Our scripts answer arrays of integers: those are read inline.
                eol = buffer.find(b"\r\n", pos)
                if eol < 0:
                    raise _NeedMore
                if buffer[pos] == 58:  # ':'
                    items.append(int(buffer[pos + 1 : eol]))
                    pos = eol + 2
                else:
                    item, pos = self._parse(buffer, pos)
                    items.append(item)
            return items, pos
        if kind == 58 or kind == 40:  # ':' integer, '(' big number
            return int(line), pos
        if kind == 36 or kind == 61 or kind == 33:  # '$' bulk, '=' verbatim, '!' bulk error
            size = int(line)
            if size < 0:
                return None, pos
            end = pos + size
            if end + 2 > len(buffer):
                raise _NeedMore
            data = buffer[pos:end]
            if kind == 33:
                return self._error(data), end + 2
            if kind == 61:
                data = data[4:]  # drop the "txt:" format prefix
            return (data if self._decode is None else self._decode(data)), end + 2
        if kind == 43:  # '+' simple string
            return (line if self._decode is None else self._decode(line)), pos
        if kind == 45:  # '-' error
            return self._error(line), pos
        if kind == 95:  # '_' null
            return None, pos
        if kind == 35:  # '#' boolean
            return line == b"t", pos
        if kind == 44:  # ',' double
            return float(line), pos
        if kind == 37:  # '%' map
            mapping = {}
            for _ in range(int(line)):
                key, pos = self._parse(buffer, pos)
                mapping[key], pos = self._parse(buffer, pos)
            return mapping, pos
        if kind == 124:  # '|' attributes: metadata ahead of the real reply, dropped
            for _ in range(2 * int(line)):
                _, pos = self._parse(buffer, pos)
            return self._parse(buffer, pos)
        raise InvalidResponse(f"Protocol Error: {bytes([kind]) + line!r}")

    @staticmethod
    def _error(message: bytes) -> Exception:
        return reply_error(message.decode("utf-8", errors="replace"))
