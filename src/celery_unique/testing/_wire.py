"""A one-command RESP2 client for driving test servers, on the standard library only.

The helpers must run where redis-py is absent or mid-upgrade, and each call closes its own
socket at once, so a strict test run never sees a socket left for the garbage collector.
"""

from __future__ import annotations

import socket
import ssl
from typing import BinaryIO, TypeAlias

from ._tls import TLSFiles

__all__ = ["Reply", "ReplyError", "call"]

Reply: TypeAlias = "str | int | list[Reply] | None"


class ReplyError(RuntimeError):
    """The server answered with an error (``-ERR ...``, ``-LOADING ...``)."""


def call(
    port: int,
    *args: str | int,
    host: str = "127.0.0.1",
    auth: tuple[str, ...] = (),
    tls: TLSFiles | None = None,
    timeout: float = 2.0,
) -> Reply:
    """Send one command (after ``AUTH *auth`` if given) and return the decoded reply.

    Raises ``OSError`` (``TimeoutError``, ``ConnectionRefusedError``...) when the server
    does not answer and :class:`ReplyError` when it answers with an error.
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = raw
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca_cert))
            context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
            sock = context.wrap_socket(raw, server_hostname=host)
        with sock, sock.makefile("rb") as reader:
            payload = _pack("AUTH", *auth) if auth else b""
            sock.sendall(payload + _pack(*args))
            if auth:
                _read(reader)
            return _read(reader)


def _pack(*args: str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read(reader: BinaryIO) -> Reply:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionResetError("the server closed the connection mid-reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise ReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        return None if size < 0 else reader.read(size + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read(reader) for _ in range(count)]
    raise ConnectionError(f"not a RESP2 reply: {line[:80]!r}")
