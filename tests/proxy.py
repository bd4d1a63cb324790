"""A fault proxy: a TCP proxy to a real Redis that a test makes slow, choppy, cut or silent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator


class Proxy:
    """A TCP proxy to the test Redis; a test sets how replies come back through it."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.split("//")[1].split("/")[0].split(":")
        self.port = int(port)
        self.chunk: int | None = None  # pass replies on this many bytes at a time
        self.replies = asyncio.Event()  # cleared: replies wait (hold_replies, pass_replies)
        self.replies.set()
        self.cut_after: int | None = None  # drop a connection after this many reply bytes
        self.hold = False  # pass commands on, never a reply
        self.delay = 0.0  # seconds each reply is held up on its way back (a slow link)
        self.url = ""
        self.sent = bytearray()  # every command that passed, as sent
        self._writers: list[asyncio.StreamWriter] = []  # open now: what cut() resets
        self._accepted: list[asyncio.StreamWriter] = []  # every one: what the teardown closes
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def _replies(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        passed = 0
        while data := await src.read(65536):
            if self.hold:
                continue
            if self.delay:
                await asyncio.sleep(self.delay)
                if self.hold:  # silent by the time it would have arrived
                    continue
            await self.replies.wait()
            if self.cut_after is not None and passed + len(data) > self.cut_after:
                dst.write(data[: self.cut_after - passed])
                await dst.drain()
                dst.transport.abort()
                return
            passed += len(data)
            step = self.chunk or len(data)
            for start in range(0, len(data), step):
                dst.write(data[start : start + step])
                await dst.drain()
                if self.chunk:
                    await asyncio.sleep(0.0005)  # separate reads on the other side
        dst.close()

    async def _commands(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            self.sent += data
            dst.write(data)
            await dst.drain()
        dst.close()

    async def _accept(self, listener: socket.socket) -> None:
        # The proxy's own accept loop: asyncio's server on Python 3.11 leaks a connection it
        # accepts as the server closes, and clients may connect as a test ends (a resend, a
        # background clean-up). Every connection accepted here is the teardown's to close.
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            if self._closing:
                conn.close()
                return
            reader, writer = await asyncio.open_connection(sock=conn)
            self._accepted.append(writer)
            self._writers.append(writer)
            task = loop.create_task(self._serve(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self._accepted.append(up_writer)
        self._writers.append(up_writer)
        try:
            await asyncio.gather(
                self._commands(reader, up_writer), self._replies(up_reader, writer)
            )
        except OSError:
            pass  # one side went away
        finally:
            writer.close()
            up_writer.close()

    def hold_replies(self) -> None:
        """Keep every reply from here on until :meth:`pass_replies`: a test that has seen
        Redis run a command then knows its reply is still on the way, however slow the box."""
        self.replies.clear()

    def pass_replies(self) -> None:
        self.replies.set()

    def cut(self) -> None:
        """Reset every connection open now, both ways (a dropped link); new ones still pass."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def run(self) -> AsyncIterator[Proxy]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            address = listener.getsockname()
            self.url = f"redis://127.0.0.1:{address[1]}/0"
            accepting = asyncio.get_running_loop().create_task(self._accept(listener))
            try:
                yield self
            finally:
                # The accept loop ends at a connection of our own: never cancelled, it cannot
                # drop one it has just accepted.
                self._closing = True
                with socket.create_connection(address):
                    await accepting
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._accepted:
            writer.close()
        for writer in self._accepted:  # closed for good before the test's loop ends
            with contextlib.suppress(OSError):
                await writer.wait_closed()
