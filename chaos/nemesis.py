"""The nemesis: seeded random faults, several at once, each healed after a random time.

Every choice (which fault, when, how long, whom) comes from one seeded ``Random`` on the
nemesis' own thread, so a seed gives the same schedule of faults; the clients' timing (and so
what the faults hit) varies with the machine. Each fault runs on a thread of its own and
writes one record when healed: ``t0`` when it began, ``t1`` when it was healed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_unique.testing import RedisServer

from .history import History, now
from .proxy import FaultProxy

__all__ = ["KINDS", "Nemesis", "Target"]

#: Every fault kind, and what it does (docs/chaos.md says the same at length).
KINDS = {
    "pause": "SIGSTOP the Redis server, SIGCONT after a while (a hung server)",
    "restart": "SIGKILL the Redis server, start it again on its port (data kept: AOF)",
    "cut": "reset every client connection at the proxy",
    "blackhole": "the proxy swallows everything, never answers (connections reset after)",
    "slow": "the proxy delays every chunk, both ways, by 50-500 ms",
    "chunk": "the proxy passes data on 1-7 bytes at a time, both ways, for 1-4 s",
    "flush": "SCRIPT FLUSH (the scripts must be loaded again: NOSCRIPT)",
    "clientkill": "CLIENT KILL TYPE normal (every client connection closed by Redis)",
    "clientpause": "CLIENT PAUSE 0.2-2.5 s (Redis holds every command)",
    "stop-holder": "SIGSTOP a client process (a long GC pause), SIGCONT after 0.3-4 s",
    "killworker": "SIGKILL a Celery worker (its whole process group) and start a new one",
}
#: How often each kind is drawn, relative to the others (default 1): a new worker takes
#: seconds of CPU to start, so killing it as often as the rest would starve the clients.
WEIGHTS = {"killworker": 0.3, "restart": 0.6}
SERVER_SIGNALS = {"pause", "restart"}  # one at a time: they act on the one server process
COMMANDS = {"flush", "clientkill", "clientpause"}  # need the server up and answering


@dataclass
class Target:
    """What the nemesis acts on."""

    server: RedisServer
    proxy: FaultProxy
    clients: dict[str, int] = field(default_factory=dict)  # process name -> pid
    #: Kill the Celery worker and start another; returns the killed worker's name.
    kill_worker: Callable[[], str] | None = None


class Nemesis:
    """Starts faults until ``stop_at`` (history clock), at most ``max_active`` at once."""

    def __init__(
        self,
        target: Target,
        kinds: list[str],
        seed: int,
        history: History,
        *,
        max_active: int = 3,
    ) -> None:
        self.target = target
        self.kinds = kinds
        self.rng = random.Random(seed)
        self.history = history
        self.max_active = max_active
        self._weights = [WEIGHTS.get(kind, 1.0) for kind in kinds]
        self._active: dict[str, threading.Thread] = {}  # fault slot -> its thread
        self._mutex = threading.Lock()
        self._server_busy = False

    def run(self, stop_at: float) -> None:
        """Start faults until ``stop_at``, then wait for every one to be healed."""
        threads: list[threading.Thread] = []
        while True:
            gap = self.rng.uniform(0.3, 2.0)
            if now() + gap >= stop_at - 0.5:
                break
            time.sleep(gap)
            kind = self.rng.choices(self.kinds, self._weights)[0]
            slot, action = self._prepare(kind, stop_at)
            with self._mutex:
                if slot in self._active or len(self._active) >= self.max_active:
                    continue
                if kind in COMMANDS and self._server_busy:
                    continue  # it would only wait for the paused or dead server
                if kind in SERVER_SIGNALS:
                    if self._server_busy:
                        continue
                    self._server_busy = True
                thread = threading.Thread(target=self._run, args=(slot, kind, action))
                self._active[slot] = thread
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def _prepare(self, kind: str, stop_at: float) -> tuple[str, Callable[[], dict[str, Any]]]:
        """Draw the fault's parameters now (on this thread, in seed order); returns its slot
        (two faults of one slot never overlap) and the action, which heals before returning.
        No fault outlasts ``stop_at`` by more than its heal."""
        rng, target = self.rng, self.target
        left = max(0.1, stop_at - now())

        def lasting(low: float, high: float) -> float:
            return min(round(rng.uniform(low, high), 3), left)

        if kind == "pause":
            seconds = lasting(0.3, 3.0)
            return "server", lambda: self._pause(seconds)
        if kind == "restart":
            seconds = lasting(0.2, 2.0)
            return "server", lambda: self._restart(seconds)
        if kind == "cut":
            return "cut", self._cut
        if kind == "blackhole":
            seconds = lasting(0.3, 3.0)
            return "blackhole", lambda: self._blackhole(seconds)
        if kind == "slow":
            seconds, latency = lasting(1.0, 5.0), round(rng.uniform(0.05, 0.5), 3)
            return "slow", lambda: self._slow(seconds, latency)
        if kind == "chunk":
            seconds, size = lasting(1.0, 4.0), rng.randint(1, 7)
            return "chunk", lambda: self._chunk(seconds, size)
        if kind == "flush":
            return "flush", lambda: self._command("SCRIPT", "FLUSH")
        if kind == "clientkill":
            return "clientkill", lambda: self._command("CLIENT", "KILL", "TYPE", "normal")
        if kind == "clientpause":
            ms = int(lasting(0.2, 2.5) * 1000)
            return "clientpause", lambda: self._client_pause(ms)
        if kind == "stop-holder":
            names = sorted(target.clients)
            name = rng.choice(names) if names else ""
            seconds = lasting(0.3, 4.0)
            return f"stop:{name}", lambda: self._stop_holder(name, seconds)
        if kind == "killworker":
            return "killworker", self._kill_worker
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")

    def _run(self, slot: str, kind: str, action: Callable[[], dict[str, Any]]) -> None:
        t0 = now()
        fields: dict[str, Any]
        try:
            fields = action()
        except Exception as exc:  # a fault that could not be made is recorded, not fatal
            fields = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            with self._mutex:
                self._active.pop(slot, None)
                if kind in SERVER_SIGNALS:
                    self._server_busy = False
        fields.setdefault("name", "redis")
        self.history.write(kind, "fault", t0=t0, t1=now(), **fields)

    # -- the faults ------------------------------------------------------------------------

    def _pause(self, seconds: float) -> dict[str, Any]:
        self.target.server.pause()
        try:
            time.sleep(seconds)
        finally:
            self.target.server.resume()
        return {"seconds": seconds}

    def _restart(self, seconds: float) -> dict[str, Any]:
        if self.target.server.alive:  # (not after a start that failed: start it again)
            self.target.server.kill()
        time.sleep(seconds)
        self.target.server.start()  # back once it answers PING (the AOF loaded)
        return {"seconds": seconds}

    def _cut(self) -> dict[str, Any]:
        self.target.proxy.cut()
        return {}

    def _blackhole(self, seconds: float) -> dict[str, Any]:
        self.target.proxy.blackhole = True
        try:
            time.sleep(seconds)
        finally:
            self.target.proxy.blackhole = False
        return {"seconds": seconds}

    def _slow(self, seconds: float, latency: float) -> dict[str, Any]:
        self.target.proxy.latency = latency
        try:
            time.sleep(seconds)
        finally:
            self.target.proxy.latency = 0.0
        return {"seconds": seconds, "latency": latency}

    def _chunk(self, seconds: float, size: int) -> dict[str, Any]:
        self.target.proxy.chunk = size
        try:
            time.sleep(seconds)
        finally:
            self.target.proxy.chunk = 0
        return {"seconds": seconds, "bytes": size}

    def _command(self, *args: str | int) -> dict[str, Any]:
        return {"result": self.target.server.command(*args)}

    def _client_pause(self, ms: int) -> dict[str, Any]:
        self.target.server.command("CLIENT", "PAUSE", ms)
        time.sleep(ms / 1000)
        return {"seconds": ms / 1000}

    def _stop_holder(self, name: str, seconds: float) -> dict[str, Any]:
        pid = self.target.clients[name]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return {"name": name, "seconds": seconds}

    def _kill_worker(self) -> dict[str, Any]:
        if self.target.kill_worker is None:
            return {"error": "no worker"}
        return {"name": self.target.kill_worker()}
