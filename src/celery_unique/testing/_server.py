"""One throwaway server process that a test can pause, kill and restart on its port."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

from ._binaries import find_redis_server, find_tls_redis_server
from ._tls import TLSFiles
from ._wire import Reply, ReplyError, call

__all__ = [
    "RedisServer",
    "ServerStartError",
    "free_port",
    "redis_server",
    "running_redis",
    "wait_until",
]

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server exited or did not answer PING in time; ``.log`` holds its output."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- server log (tail) ---\n{log[-3000:]}")
        self.log = log


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    # A cluster node also listens on port + 10000 (its bus), so both must be free and the
    # port at most 55535: the kernel's ephemeral range does not guarantee either.
    for _ in range(200):
        port = random.randrange(20000, 45000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_until(
    what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.02
) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout``.

    The predicate may raise ``OSError`` or :class:`ReplyError` while the state settles.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except (OSError, ReplyError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            raise TimeoutError(f"{what}: not within {timeout} s{detail}")
        time.sleep(interval)


def config_line(*words: str | int | os.PathLike[str]) -> str:
    # Quote every word: paths may hold spaces, and `save ""` needs an explicit empty one.
    def quoted(word: str | int | os.PathLike[str]) -> str:
        text = str(word).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    return " ".join([str(words[0]), *map(quoted, words[1:])]) + "\n"


class _Resources:
    """What must not outlive a server: its process and its folder (also run at exit)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None

    def release(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class RedisServer:
    """A private ``redis-server`` (or Valkey, or a sentinel) on a loopback port.

    ::

        with RedisServer(password="s3cret") as server:
            server.pause()      # SIGSTOP: connections are accepted, nothing answers
            server.resume()
            server.kill()       # SIGKILL, like a crashed host
            server.start()      # the same port, args and data folder; waits for PING

    ``users`` are ACL rules as in ``redis.conf`` without the ``user`` word
    (``"alice on >pw ~* +@all"``); ``acl_file`` is a path given as ``aclfile``. ``auth`` is
    what this helper and :attr:`url` log in with (default: the ``password``). With ``tls``
    the server listens on a TLS port only and :attr:`url` is ``rediss://``. ``config`` is
    raw ``redis.conf`` text; ``args`` are extra command-line options. Nothing is persisted
    across runs: the data folder is a temporary one, removed by :meth:`close`.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
        password: str | None = None,
        users: Sequence[str] = (),
        acl_file: str | os.PathLike[str] | None = None,
        auth: tuple[str, str] | None = None,
        tls: TLSFiles | None = None,
        tls_auth_clients: Literal["yes", "no", "optional"] = "optional",
        cluster: bool = False,
        sentinel: bool = False,
        config: str = "",
        startup_timeout: float = 10.0,
    ) -> None:
        if binary is None:
            binary = find_tls_redis_server() if tls is not None else find_redis_server()
        self.binary = binary
        self.tls = tls
        self.cluster = cluster
        self.sentinel = sentinel
        self.startup_timeout = startup_timeout
        self._args = tuple(args)
        self._auth: tuple[str, ...] = auth or ((password,) if password is not None else ())
        self._fixed_port = port is not None
        self._port = port or (_free_cluster_port() if cluster else free_port())
        self._paused = False
        self._started = False  # answered PING once: its port is its own from then on
        self._options = ""
        if password is not None:
            self._options += config_line("requirepass", password)
            if not sentinel:  # a replica, or a master demoted by a failover, logs in with it
                self._options += config_line("masterauth", password)
        for rule in users:
            self._options += config_line("user", *rule.split())
        if acl_file is not None:
            self._options += config_line("aclfile", os.fspath(acl_file))
        if tls is not None:
            self._options += (
                config_line("tls-cert-file", tls.server_cert)
                + config_line("tls-key-file", tls.server_key)
                + config_line("tls-ca-cert-file", tls.ca_cert)
                + config_line("tls-auth-clients", tls_auth_clients)
            )
        if cluster:
            self._options += config_line("cluster-enabled", "yes")
        self._options += config if config.endswith("\n") or not config else config + "\n"
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)

    # -- what tests connect to ---------------------------------------------------------------

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """The port (the TLS port for a TLS server); kept across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://[user:password@]127.0.0.1:port/0`` (``rediss://`` with TLS)."""
        userinfo = ""
        if self._auth:
            *user, password = self._auth
            userinfo = f"{quote(user[0], safe='') if user else ''}:{quote(password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{userinfo}{HOST}:{self._port}/0"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return HOST, self._port

    @property
    def pid(self) -> int | None:
        """The process id of the latest start (``None`` before the first)."""
        process = self._resources.process
        return process.pid if process else None

    @property
    def alive(self) -> bool:
        """Whether the process runs (a paused one does)."""
        process = self._resources.process
        return process is not None and process.poll() is None

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` stopped it and nothing resumed it since."""
        return self._paused and self.alive

    @property
    def directory(self) -> Path | None:
        """Its data folder (config, log, ``nodes.conf``), while it exists."""
        return self._resources.directory

    def log(self) -> str:
        """What the server printed so far, over all its starts."""
        folder = self._resources.directory
        if folder is None or not (folder / "server.log").exists():
            return ""
        return (folder / "server.log").read_text(errors="replace")

    def command(self, *args: str | int, timeout: float = 2.0) -> Reply:
        """Run one command on a connection of its own (logged in, over TLS if need be).

        ``server.command("CONFIG", "SET", "maxmemory", "1mb")``
        """
        return call(self._port, *args, auth=self._auth, tls=self.tls, timeout=timeout)

    # -- the process -------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the process and wait until it answers PING.

        Retries while the port is still held (say, by a just-killed process's socket); a
        first start on a port picked here moves to another free port instead.
        """
        if self.alive:
            raise RuntimeError(f"the server on port {self._port} is already running")
        if not self._finalizer.alive:
            raise RuntimeError("this RedisServer was closed: make a new one")
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        folder = self._resources.directory
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="celery-unique-redis-"))
            self._resources.directory = folder
        config = folder / ("sentinel.conf" if self.sentinel else "redis.conf")
        log_file = folder / "server.log"
        while True:
            if not config.exists() or not self._started:
                # Written once: a sentinel rewrites its config and a restart must keep that.
                config.write_text(self._base_config(folder) + self._options)
            log_start = log_file.stat().st_size if log_file.exists() else 0
            self._spawn(config, log_file)
            if self._wait_answering(deadline):
                self._started = True
                self._paused = False
                return
            self._reap()
            with open(log_file, "rb") as log:
                log.seek(log_start)
                output = log.read().decode(errors="replace")
            if "Address already in use" not in output:
                hint = ""
                if self.tls is not None:
                    hint = " (a build without TLS? `apt-get install redis-server`)"
                message = f"{self.binary} did not start on port {self._port}{hint}"
                raise ServerStartError(message, output)
            if time.monotonic() >= deadline:
                raise ServerStartError(f"port {self._port} stayed in use", output)
            if self._fixed_port or self._started:
                time.sleep(0.05)  # our own port: wait for the old socket to go
            else:
                self._port = _free_cluster_port() if self.cluster else free_port()

    def _base_config(self, folder: Path) -> str:
        lines = (
            config_line("bind", HOST) + config_line("dir", folder) + config_line("daemonize", "no")
        )
        if self.tls is not None:
            lines += config_line("port", 0) + config_line("tls-port", self._port)
        else:
            lines += config_line("port", self._port)
        if not self.sentinel:
            lines += config_line("save", "") + config_line("appendonly", "no")
            # Redis 7 syncs a new replica diskless after waiting 5 s for more replicas to join.
            lines += config_line("repl-diskless-sync-delay", 0)
        return lines

    def _spawn(self, config: Path, log_file: Path) -> None:
        command = [self.binary, str(config), *self._args]
        if self.sentinel:
            command.append("--sentinel")
        # The log goes to a file, not a pipe: a chatty server must never block on a full pipe.
        with open(log_file, "ab") as log:
            self._resources.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_answering(self, deadline: float) -> bool:
        interval = 0.005
        while self.alive:
            try:
                self.command("PING", timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                return True
            except ReplyError as exc:
                if not str(exc).startswith("LOADING"):
                    return True  # it answers: NOAUTH, NOPERM and the like are the test's affair
            except OSError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
            interval = min(interval * 2, 0.05)
        return False

    def _reap(self) -> None:
        process = self._resources.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server answers nothing."""
        process = self._running()
        process.send_signal(signal.SIGSTOP)
        # Wait for the stop itself, so that the very next command meets a hung server.
        _, status = os.waitpid(process.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            process.returncode = os.waitstatus_to_exitcode(status)
            raise RuntimeError(f"the server on port {self._port} died instead of pausing")
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._running().send_signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL, and reap the process: no shutdown of any kind, like a crashed host."""
        process = self._running()
        process.kill()
        process.wait()
        self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait for the exit (SIGKILL after ``timeout``); no-op if not running."""
        process = self._resources.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        if self._paused:
            process.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM once woken
            self._paused = False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, timeout: float | None = None) -> None:
        """:meth:`stop` if running, then :meth:`start` on the same port with the same args."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the process and remove the data folder; the object is spent."""
        try:
            self.stop(timeout=5.0)
        finally:
            self._finalizer()

    def _running(self) -> subprocess.Popen[bytes]:
        process = self._resources.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"the server on port {self._port} is not running")
        return process

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.alive else "stopped"
        return f"<RedisServer {self.url} pid={self.pid} {state}>"


@contextmanager
def running_redis(
    *,
    binary: str | None = None,
    port: int | None = None,
    args: Sequence[str] = (),
    password: str | None = None,
    users: Sequence[str] = (),
    acl_file: str | os.PathLike[str] | None = None,
    auth: tuple[str, str] | None = None,
    tls: TLSFiles | None = None,
    tls_auth_clients: Literal["yes", "no", "optional"] = "optional",
    config: str = "",
    startup_timeout: float = 10.0,
) -> Iterator[RedisServer]:
    """Run a :class:`RedisServer` for the block; it is stopped and its folder removed after.

    ::

        with running_redis(password="pw") as server:
            client = redis.Redis.from_url(server.url)
    """
    with RedisServer(
        binary=binary,
        port=port,
        args=args,
        password=password,
        users=users,
        acl_file=acl_file,
        auth=auth,
        tls=tls,
        tls_auth_clients=tls_auth_clients,
        config=config,
        startup_timeout=startup_timeout,
    ) as server:
        yield server


@contextmanager
def redis_server(
    *,
    binary: str | None = None,
    args: Sequence[str] = (),
    startup_timeout: float = 10.0,
    cluster_node: bool = False,
) -> Iterator[str]:
    """Run a private ``redis-server`` for the duration of the block; yields its URL.

    ``args`` are extra server options; ``cluster_node=True`` starts a Redis Cluster node (see
    :func:`~celery_unique.testing.running_cluster`). See :class:`RedisServer` for more.
    """
    if cluster_node:
        args = ("--cluster-node-timeout", "2000", *args)
    server = RedisServer(
        binary=binary, args=args, cluster=cluster_node, startup_timeout=startup_timeout
    )
    with server:
        yield server.url
