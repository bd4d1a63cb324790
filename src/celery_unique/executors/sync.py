"""The synchronous executor: the core's steps on a ``redis.Redis`` (or ``RedisCluster``).

One operation is one write and one read on one pooled connection: the command is packed
once per script and argument tuple (:mod:`.wire`) and sent with redis-py's
``send_packed_command``, the reply read with ``read_response``. Most of a redis-py call is its
generic command machinery, not the round trip, so this is what makes a lock call cheap.

Every operation follows the send policy of :mod:`.policy`: one budget (the client's
``socket_timeout``, or a sooner deadline a step asks for) covers taking a connection
(connecting and the handshake included), the write, the read, a NOSCRIPT reload and the one
resend. A lock's release and extend go as the server's owner-checked commands where it has
them (found by probes the first command takes along), with the scripts as the fallback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import redis.exceptions as rex

from ..core.native import PROBE_KEY
from ..core.steps import WITHDRAWN, Call, Eval, Flow, Gate, Op, is_idempotent
from ..errors import BackendError
from .connections import checkout, close_client, deadline_of, direct_pool, packer
from .driving import drive
from .errors import (
    CLOSED_UNDER_US,
    backend_error,
    closed_under_us,
    native_refusal,
    refused_by_replica,
)
from .policy import Budget, EvictionCheck, NativeCommands

__all__ = ["RedisExecutor"]

T = TypeVar("T")
_BROKEN = (rex.ConnectionError, rex.TimeoutError, OSError)
_FAILED: tuple[type[Exception], ...] = (*_BROKEN, *CLOSED_UNDER_US)
# How far past its deadline a read may end rather than pay for a bounded wait (``can_read``).
_SLACK = 0.05
# Helper threads per executor that take connections from the pool (see _checkout).
_CONNECTORS = 8
# Connections an executor keeps between operations instead of handing them back to the pool:
# a pool checkout and release (its lock, queue, metrics and unread-data check, three
# syscalls) cost more than the rest of a lock call's Python.
_IDLE_MAX = 8


class RedisExecutor:
    """Carries out the core's operations and flows on a sync redis-py client.

    ``timeout``: seconds one operation may take, connecting included (default: the client's
    ``socket_timeout``, else 2 s). ``probe_key``: the key the probes for owner-checked
    commands name (never written; a backend gives one under its prefix). Implements
    :class:`~.protocol.Executor`.
    """

    def __init__(
        self, client: Any, *, timeout: float | None = None, probe_key: str = PROBE_KEY
    ) -> None:
        self.client = client
        self.timeout = deadline_of(client, timeout)
        # The first command takes the eviction check along in its own write (a cluster's
        # asks after it), once.
        self._eviction = EvictionCheck()
        self._pool = direct_pool(client)
        # So do the probes for owner-checked commands, where this executor writes its own
        # commands (a cluster client's routing would split them from it).
        self._native = NativeCommands(
            enabled=self._pool is not None, key=probe_key, refusal=native_refusal
        )
        # Threads that take connections from the pool for callers (see _checkout).
        self._connect_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._connect_pid = 0
        if self._pool is not None:
            self._packer = packer(self._pool)
            self._policy_query = self._packer.command(EvictionCheck.step.args)
            self._probe_queries = [self._pack(c) for c in self._native.steps]
            kwargs = self._pool.connection_kwargs
            socket_timeout = kwargs.get("socket_timeout")
            # Connections whose own socket timeout is at most the deadline need no extra
            # bound on a read that starts with the whole deadline left.
            self._read_bound = socket_timeout if socket_timeout else float("inf")
            self._idle: list[Any] = []
            # Callers between entering an operation and holding a connection: while any is
            # waiting, a finished one goes back to the pool, where a waiter may be blocked
            # (a bounded pool would otherwise starve it while a connection sits idle here).
            self._wanting = 0
            self._idle_lock = threading.Lock()
            self._pid = os.getpid()

    def execute(self, op: Op[T]) -> T:
        """Carry out a one-round-trip operation."""
        return op.parse(self._send_any(op.step))

    def run(self, flow: Flow[T], *, sleep: Callable[[float], object] = time.sleep) -> T:
        """Carry out ``flow``; errors of a step are thrown into it, where it may handle them.

        ``sleep`` waits out a :class:`~celery_unique.core.steps.Sleep` (renewal threads pass
        one that wakes up when the lock is released).
        """
        return drive(flow, self._send_any, sleep)

    def scan(self, match: str, count: int = 1000) -> Iterator[str]:
        """Every key matching the glob ``match`` (SCAN, never KEYS; every primary of a
        cluster), as text."""
        self._hand_back_idle()  # the client's own calls draw on the same pool
        try:
            for key in self.client.scan_iter(match=match, count=count):
                yield key.decode() if isinstance(key, bytes) else key
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    def unlink(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` (UNLINK: freed off Redis' main thread); returns how many existed."""
        if not keys:
            return 0
        self._hand_back_idle()
        try:
            return int(self.client.unlink(*keys))
        except rex.RedisError as exc:
            raise backend_error(exc) from exc

    def close(self) -> None:
        """Close the client and its connections (a cluster's nodes', a Sentinel client's
        sentinels' too)."""
        self._hand_back_idle()
        # A closed client still connects again when used (a renewal winding down after the
        # close, say), as redis-py's does: the next use starts helper threads afresh.
        connectors, self._connect_pool = self._connect_pool, None
        if connectors is not None:
            connectors.shutdown(wait=False, cancel_futures=True)
        close_client(self.client)

    def _hand_back_idle(self) -> None:
        if self._pool is not None:
            with self._idle_lock:
                idle, self._idle = self._idle, []
            for connection in idle:
                self._pool.release(connection)

    def _take(self, pool: Any, budget: Budget) -> Any:
        """A connection: one kept from an earlier operation if it is still sound, else the
        pool's (which checks a connection before it lends it)."""
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            with self._idle_lock:
                self._idle, self._wanting = [], 0
            self._pid = os.getpid()
        while True:
            with self._idle_lock:
                connection = self._idle.pop() if self._idle else None
                if connection is None:
                    self._wanting += 1
                    break
            if _quiet(connection):
                return connection
            connection.disconnect()  # closed by the server, or unread data: start afresh
            pool.release(connection)
        try:
            return self._checkout(pool, budget)
        finally:
            with self._idle_lock:
                self._wanting -= 1

    def _keep(self, pool: Any, connection: Any) -> None:
        with self._idle_lock:
            if not self._wanting and len(self._idle) < _IDLE_MAX:
                self._idle.append(connection)
                return
        pool.release(connection)

    def _checkout(self, pool: Any, budget: Budget) -> Any:
        """A connection from the pool within what is left of ``budget``.

        A checkout may connect: the TCP connect, TLS and the handshake run inside redis-py
        under the connection's own timeouts, which know nothing of this operation's deadline.
        So it runs on a helper thread and the caller waits only for what is left; a checkout
        that ends after its caller gave up hands its connection back to the pool.
        """
        left = budget.left(time.monotonic())
        if left <= 0:
            raise rex.TimeoutError("no time left to take a connection")
        future = self._connector().submit(checkout, pool)
        try:
            return future.result(timeout=left)
        except concurrent.futures.TimeoutError:
            if not future.cancel():  # under way: let it finish, and give its connection back
                future.add_done_callback(self._hand_back_late)
            raise rex.TimeoutError("Timeout connecting to Redis") from None

    def _connector(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._idle_lock:
            if self._connect_pool is None or self._connect_pid != os.getpid():
                # A forked child has none of its parent's threads: start its own.
                self._connect_pool = concurrent.futures.ThreadPoolExecutor(
                    _CONNECTORS, thread_name_prefix="celery-unique connect"
                )
                self._connect_pid = os.getpid()
            return self._connect_pool

    def _hand_back_late(self, future: concurrent.futures.Future[Any]) -> None:
        if self._pool is not None and not future.cancelled() and future.exception() is None:
            self._pool.release(future.result())

    def _policy_read(self, reply: Any) -> None:
        """Log the eviction warning if ``reply`` (or the error it was) says so."""
        self._eviction.answered(reply, unreachable=isinstance(reply, _BROKEN))

    def _send_any(self, step: Eval | Call) -> Any:
        """``step``'s reply, sent as the native command the policy picks where there is one."""
        alternative = self._native.pick(step)
        if alternative is not None:
            try:
                got: Any = self._send(self._native.command(step, alternative))
            except BackendError as exc:
                got = exc
            answer = self._native.settle(alternative, got)
            if answer is not None:
                return answer
        return self._send(step)

    def _send(self, step: Eval | Call) -> Any:
        """``step``'s reply, under the send policy; a gated step is written only while its
        gate is open (see :class:`~celery_unique.core.steps.Gate`)."""
        gate = step.gate
        if self._pool is None:
            # A cluster's client writes and reads in one call: the gate is looked at just
            # before (holding it to the answer would make a release wait for the extend).
            with _opened(gate) as open_:
                if not open_:
                    return WITHDRAWN
            return self._through_client(step)
        clock = time.monotonic
        budget = Budget(clock(), self.timeout, (step.timeout,))
        data = self._pack(step)
        while True:
            sent = False
            try:
                connection = self._take(self._pool, budget)
            except rex.RedisError as exc:
                # Nothing was sent. redis-py's own retry policy already covered the connect.
                unknown = budget.outcome_unknown()  # an earlier attempt's may have run
                raise backend_error(
                    exc, outcome_unknown=unknown, waited=budget.waited(clock())
                ) from exc
            except CLOSED_UNDER_US as exc:  # its health check met a socket closed meanwhile
                waited = budget.waited(clock())
                unknown = budget.outcome_unknown()
                raise backend_error(
                    closed_under_us(exc), outcome_unknown=unknown, waited=waited
                ) from exc
            if budget.spent(clock()):  # the wait for a free connection used it up
                self._pool.release(connection)
                raise backend_error(
                    rex.TimeoutError("no pooled connection in time"),
                    outcome_unknown=budget.outcome_unknown(),
                    waited=budget.waited(clock()),
                )
            checking = self._eviction.claim()
            probing = self._native.claim()
            try:
                if checking or probing:
                    along = [self._policy_query] if checking else []
                    along += self._probe_queries if probing else []
                    payload: tuple[bytes, ...] = (*along, data)
                else:
                    payload = (data,)
                if not _write(connection, payload, gate):
                    # Withdrawn before it was written: nothing was sent.
                    if checking:
                        self._eviction.unanswered()
                    if probing:
                        self._native.unanswered()
                    self._keep(self._pool, connection)
                    return WITHDRAWN
                sent = True
                if checking:
                    self._policy_read(self._reply_or_error(connection, budget.deadline))
                    checking = False
                if probing:
                    self._native.answered(
                        [
                            self._reply_or_error(connection, budget.deadline)
                            for _ in self._probe_queries
                        ]
                    )
                    probing = False
                try:
                    reply = self._read(connection, budget.deadline)
                except rex.NoScriptError:
                    reply = self._load_and_resend(connection, step, data, budget.deadline, gate)
            except rex.ResponseError as exc:
                if refused_by_replica(exc):
                    connection.disconnect()  # an old master: reconnect to the current one
                self._pool.release(connection)
                raise backend_error(exc) from exc
            except _FAILED as caught:
                broken = caught if isinstance(caught, _BROKEN) else closed_under_us(caught)
                connection.disconnect()
                self._pool.release(connection)
                if checking:
                    self._eviction.unanswered()  # its reply was never read: ask again later
                if probing:
                    self._native.unanswered()
                lost = isinstance(broken, rex.ConnectionError)
                if budget.resend(
                    clock(), sent=sent, connection_lost=lost, idempotent=is_idempotent(step)
                ):
                    continue
                replica = refused_by_replica(broken)
                unknown = budget.outcome_unknown(sent=sent, refused_by_replica=replica)
                raise backend_error(
                    broken, outcome_unknown=unknown, waited=budget.waited(clock())
                ) from caught
            except BaseException:
                if checking:
                    self._eviction.unanswered()
                if probing:
                    self._native.unanswered()
                # Interrupted mid-exchange (KeyboardInterrupt, a signal's exception): the
                # stream is in an unknown state, so the connection is not reused.
                connection.disconnect()
                self._pool.release(connection)
                raise
            self._keep(self._pool, connection)
            return reply

    def _read(self, connection: Any, deadline: float) -> Any:
        left = deadline - time.monotonic()
        # The connection's own socket timeout bounds the read; when less than that is left of
        # the deadline (a slow connect, a caller's sooner deadline), wait only for what is.
        if left + _SLACK < self._read_bound and not connection.can_read(timeout=max(left, 0.0)):
            raise rex.TimeoutError("Timeout reading from Redis")
        return connection.read_response()

    def _reply_or_error(self, connection: Any, deadline: float) -> Any:
        try:
            return self._read(connection, deadline)
        except rex.ResponseError as exc:  # an error reply, read whole: the stream is in step
            return exc

    def _load_and_resend(
        self, connection: Any, step: Eval | Call, data: bytes, deadline: float, gate: Gate | None
    ) -> Any:
        assert isinstance(step, Eval)  # only scripts answer NOSCRIPT
        load = self._packer.command(("SCRIPT", "LOAD", step.script.source))
        connection.send_packed_command((load,))
        self._read(connection, deadline)
        # The first send did not run: this one is the step's real send, gated like it.
        if not _write(connection, (data,), gate):
            return WITHDRAWN
        return self._read(connection, deadline)

    def _pack(self, step: Eval | Call) -> bytes:
        if isinstance(step, Eval):
            return self._packer.evalsha(step.script.sha, step.keys, step.args)
        return self._packer.command(step.args)

    def _through_client(self, step: Eval | Call) -> Any:
        client = self.client
        try:
            if isinstance(step, Call):
                reply = client.execute_command(*step.args)
            else:
                command = ("EVALSHA", step.script.sha, len(step.keys), *step.keys, *step.args)
                try:
                    reply = client.execute_command(*command)
                except rex.NoScriptError:
                    client.script_load(step.script.source)
                    reply = client.execute_command(*command)
        except rex.RedisError as exc:
            raise backend_error(exc) from exc
        except CLOSED_UNDER_US as exc:
            raise backend_error(closed_under_us(exc), outcome_unknown=True) from exc
        if self._eviction.claim():
            # A cluster routes each command itself: the policy check follows the first
            # answered command, on a cluster that has just answered.
            try:
                self._policy_read(client.execute_command(*EvictionCheck.step.args))
            except rex.RedisError as exc:
                self._policy_read(exc)
        return reply


@contextlib.contextmanager
def _opened(gate: Gate | None) -> Iterator[bool]:
    """Whether a step may be written now (always, without a gate), kept so meanwhile."""
    if gate is None:
        yield True
        return
    with gate.hold() as open_:
        yield open_


def _write(connection: Any, payload: tuple[bytes, ...], gate: Gate | None) -> bool:
    """Write ``payload`` unless ``gate`` is closed; whether it was written. (Most steps have
    no gate: they are written without entering a context manager.)"""
    if gate is None:
        connection.send_packed_command(payload)
        return True
    with gate.hold() as open_:
        if open_:
            connection.send_packed_command(payload)
        return open_


def _quiet(connection: Any) -> bool:
    """Whether a kept connection has nothing to read: no end of stream (the server closed
    it) and no stray bytes (redis-py's ``can_read`` with no wait: one read attempt, where the
    pool's own check on lending takes three syscalls and a few layers)."""
    try:
        return not connection.can_read(timeout=0)
    except (rex.RedisError, OSError, ValueError):
        return False
