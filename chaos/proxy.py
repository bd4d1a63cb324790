"""The nemesis' proxy: every client reaches Redis through it, so the network can misbehave.

``tests/proxy.py`` holds, chunks and cuts replies for one test on the test's own loop. The
chaos run needs more (latency both ways, a blackhole, cutting every connection at once)
driven from another thread while client processes come and go, so this one runs its own
event loop on a thread of the runner and takes orders thread-safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future

__all__ = ["FaultProxy"]


class _Link:
    """One client connection and its upstream one."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.broken = False  # bytes were swallowed by a blackhole: the stream is out of step

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class FaultProxy:
    """A TCP proxy to ``(host, port)`` on a free loopback port, with faults to switch on.

    ::

        proxy = FaultProxy(("127.0.0.1", 6379)); proxy.start()
        proxy.latency = 0.2     # each chunk waits 200 ms, both ways
        proxy.chunk = 3         # data goes on 3 bytes at a time
        proxy.blackhole = True  # connections are accepted, nothing is answered
        proxy.blackhole = False # (the connections that lost bytes are cut then)
        proxy.cut()             # reset every connection now
        proxy.close()
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.latency = 0.0
        self.chunk = 0  # when set, pass data on this many bytes at a time (the parsers' turn)
        self._blackhole = False
        self.port = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos proxy")
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(self._start()).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def _call(self, coro: object) -> Future[asyncio.Server]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    @property
    def blackhole(self) -> bool:
        return self._blackhole

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self._blackhole = on
        if not on:
            # A connection that lost bytes in the hole would pair replies with the wrong
            # commands from now on: reset it, as a real network that lost packets would.
            self._loop.call_soon_threadsafe(self._abort, lambda link: link.broken)

    def cut(self) -> None:
        """Reset every connection (clients and upstream) at once."""
        self._loop.call_soon_threadsafe(self._abort, lambda link: True)

    def _abort(self, which: object) -> None:
        for link in list(self._links):
            if which(link):  # type: ignore[operator]
                link.abort()
                self._links.discard(link)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            pending = b""
            while self._blackhole:
                # Accepted, never answered: what a host that vanished behind a live path does.
                try:
                    pending = await asyncio.wait_for(reader.read(65536), 0.05)
                except asyncio.TimeoutError:
                    continue
                if not pending:
                    return
                if self._blackhole:
                    link.broken = True
                    await _drain_forever(reader)
                    return
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 2.0
            )
            link.upstream = upstream
            if pending:  # arrived as the hole closed
                upstream.write(pending)
            await asyncio.gather(
                self._pump(reader, upstream, link), self._pump(up_reader, writer, link)
            )
        except (OSError, asyncio.TimeoutError):
            pass  # a side went away (or Redis is down): the client sees a closed connection
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, link: _Link
    ) -> None:
        while data := await source.read(65536):
            if self._blackhole or link.broken:
                link.broken = True
                continue  # swallowed
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            step = self.chunk or len(data)
            for start in range(0, len(data), step):
                target.write(data[start : start + step])
                await target.drain()
                if step < len(data):
                    await asyncio.sleep(0.001)  # separate reads on the other side
        target.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._abort(lambda link: True)
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _drain_forever(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass
