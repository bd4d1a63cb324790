"""A master, its replicas and the sentinels that watch them, each a :class:`RedisServer`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from urllib.parse import quote

from ._server import HOST, RedisServer, config_line, wait_until
from ._wire import Reply, ReplyError

__all__ = ["SentinelServers", "redis_sentinel"]


def _fields(reply: Reply) -> dict[str, str]:
    # RESP2 gives SENTINEL MASTER and each entry of SENTINEL REPLICAS as a flat key/value list.
    assert isinstance(reply, list)
    return {str(key): str(value) for key, value in zip(reply[::2], reply[1::2], strict=True)}


def _entries(reply: Reply) -> list[dict[str, str]]:
    assert isinstance(reply, list)
    return [_fields(entry) for entry in reply]


class SentinelServers:
    """A running Sentinel set-up, as yielded by :func:`redis_sentinel`.

    ``master`` and ``replicas`` are the servers in the roles they started in; after a
    failover :meth:`current_master` names the master.
    """

    def __init__(
        self,
        *,
        master: RedisServer,
        replicas: list[RedisServer],
        sentinels: list[RedisServer],
        master_name: str,
        password: str | None,
    ) -> None:
        self.master = master
        self.replicas = replicas
        self.sentinels = sentinels
        self.master_name = master_name
        self.password = password
        self._master_port = master.port  # the latest master known here, for failovers

    @property
    def servers(self) -> list[RedisServer]:
        """The data servers: the first master and its replicas."""
        return [self.master, *self.replicas]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``[(host, port), ...]`` of the sentinels, for ``redis.sentinel.Sentinel``."""
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def url(self) -> str:
        """Celery's form: ``sentinel://127.0.0.1:p1;sentinel://127.0.0.1:p2;.../0``.

        It carries the data servers' password, if any; the sentinels' own goes in
        ``sentinel_kwargs``. ``master_name`` goes in the transport options.
        """
        userinfo = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{userinfo}{h}:{p}" for h, p in self.sentinel_addresses) + "/0"

    def _answering_sentinels(self) -> list[RedisServer]:
        return [sentinel for sentinel in self.sentinels if sentinel.alive and not sentinel.paused]

    def _by_port(self, port: int) -> RedisServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"the sentinels name 127.0.0.1:{port}, which is none of these servers")

    def _reported_ports(self) -> list[int]:
        ports = []
        for sentinel in self._answering_sentinels():
            reply = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            assert isinstance(reply, list)
            ports.append(int(str(reply[1])))
        return ports

    def current_master(self) -> RedisServer:
        """The server a sentinel (the first that answers) names as the master."""
        errors: list[BaseException] = []
        for sentinel in self._answering_sentinels():
            try:
                reply = sentinel.command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name, timeout=1.0
                )
            except (OSError, ReplyError) as exc:
                errors.append(exc)
                continue
            assert isinstance(reply, list)
            return self._by_port(int(str(reply[1])))
        raise ConnectionError(f"no sentinel answered: {errors}")

    def wait_for_failover(self, timeout: float = 20.0) -> RedisServer:
        """Wait until every answering sentinel names a new master that says it is one.

        "New" is relative to the master before: the first one, or the last one this method
        returned. Returns the promoted server.
        """
        promoted: list[RedisServer] = []

        def done() -> bool:
            ports = set(self._reported_ports())
            if len(ports) != 1 or self._master_port in ports:
                return False
            server = self._by_port(ports.pop())
            role = server.command("ROLE", timeout=0.5)
            if not (isinstance(role, list) and role[0] == "master"):
                return False
            promoted.append(server)
            return True

        wait_until(f"a failover of {self.master_name!r}", done, timeout, interval=0.05)
        self._master_port = promoted[0].port
        return promoted[0]

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until every answering sentinel sees the master up, every replica linked and
        every other sentinel."""
        expected_replicas = len(self.servers) - 1
        expected_peers = len(self.sentinels) - 1

        def ready() -> bool:
            for sentinel in self._answering_sentinels():
                master = _fields(sentinel.command("SENTINEL", "MASTER", self.master_name))
                replicas = _entries(sentinel.command("SENTINEL", "REPLICAS", self.master_name))
                peers = _entries(sentinel.command("SENTINEL", "SENTINELS", self.master_name))
                if (
                    master.get("flags") != "master"
                    or len(replicas) != expected_replicas
                    or any(r.get("flags") != "slave" for r in replicas)
                    or any(r.get("master-link-status") != "ok" for r in replicas)
                    or len(peers) != expected_peers
                    or any(p.get("flags") != "sentinel" for p in peers)
                ):
                    return False
            return True

        wait_until("the sentinels to see the master, replicas and each other", ready, timeout)


def _replicas_linked(master: RedisServer, replicas: list[RedisServer]) -> bool:
    info = master.command("INFO", "replication")
    assert isinstance(info, str)
    if f"connected_slaves:{len(replicas)}" not in info:
        return False
    for replica in replicas:
        role = replica.command("ROLE")
        if not (isinstance(role, list) and role[0] == "slave" and role[3] == "connected"):
            return False
    return True


@contextmanager
def redis_sentinel(
    *,
    replicas: int = 1,
    sentinels: int = 3,
    master_name: str = "mymaster",
    quorum: int | None = None,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    password: str | None = None,
    sentinel_password: str | None = None,
    binary: str | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[SentinelServers]:
    """Run a master, ``replicas`` replicas and ``sentinels`` sentinels; yields them.

    ::

        with redis_sentinel() as setup:
            setup.master.kill()
            promoted = setup.wait_for_failover()

    ``password`` protects the data servers (``requirepass``/``masterauth``, and the
    sentinels' ``auth-pass``); ``sentinel_password`` the sentinels themselves, as redis-py's
    ``sentinel_kwargs={"password": ...}`` expects. A short ``failover_timeout_ms`` keeps a
    retried election (after a split vote sentinels wait twice this long) quick. Yields once
    every sentinel sees the master, every replica and every other sentinel.
    """
    quorum = sentinels // 2 + 1 if quorum is None else quorum
    with ExitStack() as stack:

        def run(server: RedisServer) -> RedisServer:
            return stack.enter_context(server)

        master = run(RedisServer(binary=binary, password=password))
        replica_config = config_line("replicaof", HOST, master.port)
        data_replicas = [
            run(RedisServer(binary=binary, password=password, config=replica_config))
            for _ in range(replicas)
        ]
        # Sentinels learn of replicas from the master's INFO, read at once on connecting and
        # then every 10 s: start them only once the replicas show there.
        wait_until(
            "the replicas to link to the master",
            lambda: _replicas_linked(master, data_replicas),
            startup_timeout,
        )
        name = master_name
        config = (
            config_line("sentinel", "monitor", name, HOST, master.port, quorum)
            + config_line("sentinel", "down-after-milliseconds", name, down_after_ms)
            + config_line("sentinel", "failover-timeout", name, failover_timeout_ms)
            + config_line("sentinel", "parallel-syncs", name, 1)
        )
        if password is not None:
            config += config_line("sentinel", "auth-pass", name, password)
        if sentinel_password is not None:
            # password= makes it requirepass; sentinel-pass is what a sentinel gives its peers.
            config += config_line("sentinel", "sentinel-pass", sentinel_password)
        watchers = [
            run(
                RedisServer(binary=binary, sentinel=True, password=sentinel_password, config=config)
            )
            for _ in range(sentinels)
        ]
        setup = SentinelServers(
            master=master,
            replicas=data_replicas,
            sentinels=watchers,
            master_name=master_name,
            password=password,
        )
        setup.wait_ready(startup_timeout)
        yield setup
