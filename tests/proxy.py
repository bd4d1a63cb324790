"""A fault proxy: a TCP proxy to a real Redis that a test makes slow, choppy, cut or silent."""

from __future__ import annotations

import asyncio
import contextlib
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
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Known from the moment of accepting: a client may connect as the test ends (a
        # background clean-up), and the teardown closes what it has not finished with.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
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
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        async with server:
            yield self
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()
            for writer in self._writers:  # closed for good before the test's loop ends
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
