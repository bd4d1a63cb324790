"""A fault proxy: a TCP proxy to a real Redis that a test makes slow, choppy, cut or silent.

It runs on the test's own event loop, through anyio: the same proxy serves asyncio and trio
tests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _reset(stream: anyio.abc.SocketStream) -> None:
    """Drop ``stream``'s connection at once, as a broken link would: both ways shut, and its
    close (by whoever reads the end) sends a reset, not an orderly goodbye."""
    raw = stream.extra(SocketAttribute.raw_socket)
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.shutdown(socket.SHUT_RDWR)


class Proxy:
    """A TCP proxy to the test Redis; a test sets how replies come back through it."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.split("//")[1].split("/")[0].split(":")
        self.port = int(port)
        self.chunk: int | None = None  # pass replies on this many bytes at a time
        self.cut_after: int | None = None  # drop a connection after this many reply bytes
        self.hold = False  # pass commands on, never a reply
        self.delay = 0.0  # seconds each reply is held up on its way back (a slow link)
        self.url = ""
        self.sent = bytearray()  # every command that passed, as sent
        self._held: anyio.Event | None = None  # set: replies wait (hold_replies)
        self._open: list[anyio.abc.SocketStream] = []  # open now: what cut() resets
        self._every: list[anyio.abc.SocketStream] = []  # every one: what the teardown closes
        self._closing = False

    async def _replies(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
        passed = 0
        while True:
            try:
                data = await src.receive(65536)
            except _GONE:
                return
            if self.hold:
                continue
            if self.delay:
                await anyio.sleep(self.delay)
                if self.hold:  # silent by the time it would have arrived
                    continue
            while self._held is not None:
                await self._held.wait()
            if self.cut_after is not None and passed + len(data) > self.cut_after:
                await dst.send(data[: self.cut_after - passed])
                _reset(dst)
                return
            passed += len(data)
            step = self.chunk or len(data)
            for start in range(0, len(data), step):
                await dst.send(data[start : start + step])
                if self.chunk:
                    await anyio.sleep(0.0005)  # separate reads on the other side

    async def _commands(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
        while True:
            try:
                data = await src.receive(65536)
            except _GONE:
                return
            self.sent += data
            await dst.send(data)

    async def _serve(self, client: anyio.abc.SocketStream) -> None:
        try:
            upstream = await anyio.connect_tcp(self.host, self.port)
        except OSError:
            return
        self._every.append(upstream)
        self._open.append(upstream)
        try:
            async with anyio.create_task_group() as pumps:

                async def pump(direction: str) -> None:
                    try:
                        if direction == "up":
                            await self._commands(client, upstream)
                        else:
                            await self._replies(upstream, client)
                    except _GONE:
                        pass  # a write to a side that went away (a task group would wrap it)
                    pumps.cancel_scope.cancel()  # one side went away: so does the other

                pumps.start_soon(pump, "up")
                pumps.start_soon(pump, "down")
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(client)
                await anyio.aclose_forcefully(upstream)

    async def _accept(self, listener: anyio.abc.SocketListener, group: anyio.abc.TaskGroup) -> None:
        # The proxy's own accept loop, never cancelled: clients may connect as a test ends
        # (a resend, a background clean-up), and an accept cut short could drop the one it
        # had just taken. It ends at a connection of the teardown's own.
        while True:
            client = await listener.accept()
            self._every.append(client)
            if self._closing:
                return
            self._open.append(client)
            group.start_soon(self._serve, client)

    def hold_replies(self) -> None:
        """Keep every reply from here on until :meth:`pass_replies`: a test that has seen
        Redis run a command then knows its reply is still on the way, however slow the box."""
        if self._held is None:
            self._held = anyio.Event()

    def pass_replies(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.set()

    def cut(self) -> None:
        """Reset every connection open now, both ways (a dropped link); new ones still pass."""
        for stream in self._open:
            _reset(stream)
        self._open.clear()

    async def run(self) -> AsyncIterator[Proxy]:
        listeners = (await anyio.create_tcp_listener(local_host="127.0.0.1")).listeners
        listener = cast(anyio.abc.SocketListener, listeners[0])  # one: 127.0.0.1 only
        port = listener.extra(SocketAttribute.local_port)
        self.url = f"redis://127.0.0.1:{port}/0"
        try:
            async with anyio.create_task_group() as group:
                async with anyio.create_task_group() as accepting:
                    accepting.start_soon(self._accept, listener, group)
                    try:
                        yield self
                    finally:
                        self._closing = True
                        async with await anyio.connect_tcp("127.0.0.1", port):
                            pass  # the accept loop ends at it
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                for stream in self._every:
                    await anyio.aclose_forcefully(stream)
