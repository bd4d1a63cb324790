"""A Redis Cluster of throwaway nodes, set up with plain CLUSTER commands (no redis-cli)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from ._server import RedisServer, config_line, wait_until
from ._wire import ReplyError

__all__ = ["ClusterServers", "redis_cluster", "running_cluster"]

SLOTS = 16384


@dataclass(frozen=True)
class _Node:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]  # inclusive ranges

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_nodes(text: str) -> list[_Node]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, master = line.split()[:4]
        # ip:port@bus[,hostname]; migrating slots show as [slot->-id] and are skipped.
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        ranges = []
        for item in line.split()[8:]:
            if item.startswith("["):
                continue
            low, _, high = item.partition("-")
            ranges.append((int(low), int(high or low)))
        nodes.append(
            _Node(
                id=node_id,
                port=port,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                slots=tuple(ranges),
            )
        )
    return nodes


class ClusterServers:
    """A running cluster, as yielded by :func:`running_cluster`; ``nodes`` in start order.

    Roles change with failovers, so :meth:`primaries`, :meth:`replicas` and
    :meth:`node_for_slot` ask the cluster (``CLUSTER NODES`` of a node that answers).
    """

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        """A URL of a running node: ``RedisCluster.from_url(url)`` discovers the rest."""
        return next((node for node in self.nodes if node.alive), self.nodes[0]).url

    def _answering(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.alive and not node.paused]

    def view(self, node: RedisServer | None = None) -> list[_Node]:
        """CLUSTER NODES as ``node`` sees it, or as the first node that answers does."""
        if node is not None:
            return _parse_nodes(str(node.command("CLUSTER", "NODES", timeout=1.0)))
        for asked in self._answering():
            view = self._view_or_none(asked)
            if view is not None:
                return view
        raise ConnectionError("no cluster node answered")

    def _view_or_none(self, node: RedisServer) -> list[_Node] | None:
        try:
            return self.view(node)
        except (OSError, ReplyError):
            return None

    def _server(self, entry: _Node) -> RedisServer:
        for node in self.nodes:
            if node.port == entry.port:
                return node
        raise LookupError(f"CLUSTER NODES names port {entry.port}, none of these servers")

    def primaries(self) -> list[RedisServer]:
        """The nodes the cluster holds as primaries (not flagged as failing), in start order."""
        ports = {e.port for e in self.view() if "master" in e.flags and not e.failing}
        return [node for node in self.nodes if node.port in ports]

    def replicas(self, of: RedisServer | None = None) -> list[RedisServer]:
        """The replicas (not flagged as failing), of ``of`` if given, in start order."""
        view = self.view()
        master_ids = {e.id for e in view if of is None or e.port == of.port}
        ports = {
            e.port
            for e in view
            if "slave" in e.flags and not e.failing and e.master_id in master_ids
        }
        return [node for node in self.nodes if node.port in ports]

    def node_for_slot(self, slot: int) -> RedisServer:
        """The primary serving ``slot`` (``redis.crc.key_slot(b"key")``)."""
        for entry in self.view():
            if any(low <= slot <= high for low, high in entry.slots):
                return self._server(entry)
        raise LookupError(f"no node serves slot {slot}")

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every answering node says ``cluster_state:ok`` and sees every slot
        served by a running, unpaused primary: after a kill, that is after the failover."""
        answering_ports = {node.port for node in self._answering()}

        def ok() -> bool:
            for node in self._answering():
                info = str(node.command("CLUSTER", "INFO", timeout=1.0))
                if "cluster_state:ok" not in info or f"cluster_slots_ok:{SLOTS}" not in info:
                    return False
                covered = 0
                for entry in self.view(node):
                    if entry.slots and (entry.failing or entry.port not in answering_ports):
                        return False
                    covered += sum(high - low + 1 for low, high in entry.slots)
                if covered != SLOTS:
                    return False
            return True

        wait_until("the cluster to be ok on every node", ok, timeout, interval=0.05)


def _replicas_synced(cluster: ClusterServers, masters: int, replicas: int) -> bool:
    for node in cluster.nodes:
        view = cluster.view(node)
        if sum("master" in e.flags and bool(e.slots) for e in view) != masters:
            return False
        if sum("slave" in e.flags for e in view) != masters * replicas:
            return False
    for node in cluster.replicas():
        role = node.command("ROLE")
        if not (isinstance(role, list) and role[3] == "connected"):
            return False
    return True


@contextmanager
def running_cluster(
    masters: int = 3,
    replicas: int = 1,
    *,
    node_timeout_ms: int = 1000,
    binary: str | None = None,
    args: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> Iterator[ClusterServers]:
    """Run a cluster of ``masters`` primaries, slots split evenly, ``replicas`` each.

    ::

        with running_cluster(3, 1) as cluster:
            primary = cluster.node_for_slot(key_slot(b"job"))
            primary.kill()
            cluster.wait_ok()          # its replica took over

    A replica is promoted some ``node_timeout_ms`` after its primary stops answering.
    Killed nodes restart with their identity (``nodes.conf`` stays in their folder).
    """
    config = (
        config_line("cluster-node-timeout", node_timeout_ms)
        # Any replica may take over, however long since it heard from its primary: tests
        # pause and kill nodes at will, and must not end with a cluster that stays down.
        + config_line("cluster-replica-validity-factor", 0)
    )
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(RedisServer(binary=binary, args=args, cluster=True, config=config))
            for _ in range(masters * (1 + replicas))
        ]
        cluster = ClusterServers(nodes)
        bounds = [round(i * SLOTS / masters) for i in range(masters + 1)]
        for node, low, high in zip(nodes, bounds, bounds[1:], strict=False):
            node.command("CLUSTER", "ADDSLOTS", *range(low, high))
        for node in nodes[1:]:
            node.command("CLUSTER", "MEET", nodes[0].host, nodes[0].port)

        def all_met() -> bool:
            return all(
                len(view := cluster.view(node)) == len(nodes)
                and not any(entry.failing for entry in view)
                for node in nodes
            )

        wait_until("the cluster nodes to meet", all_met, startup_timeout)
        ids = [str(node.command("CLUSTER", "MYID")) for node in nodes[:masters]]
        for index, node in enumerate(nodes[masters:]):
            node.command("CLUSTER", "REPLICATE", ids[index % masters])
        wait_until(
            "the replicas to sync",
            lambda: _replicas_synced(cluster, masters, replicas),
            startup_timeout,
        )
        cluster.wait_ok(startup_timeout)
        yield cluster


@contextmanager
def redis_cluster(
    masters: int = 3,
    replicas: int = 0,
    *,
    binary: str | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[str]:
    """Run a private Redis Cluster, slots split evenly over ``masters``; yields a node's URL.

    ``redis.cluster.RedisCluster.from_url(url)`` discovers the other nodes from it. See
    :func:`running_cluster` to kill, pause or restart nodes.
    """
    with running_cluster(
        masters, replicas, node_timeout_ms=2000, binary=binary, startup_timeout=startup_timeout
    ) as cluster:
        yield cluster.url
