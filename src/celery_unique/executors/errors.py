"""From what went wrong on the wire to the library's errors, with what to do about it.

Two steps, one table each. An error *reply* read by the library itself becomes the public
``redis.exceptions`` class redis-py would raise for it (:func:`reply_error`), so both read paths
raise the same classes. Any redis-py error then becomes a :class:`BackendError` whose message
says what to change, or a :class:`BackendUnavailable` for a state that passes (loading, a
failover under way, a cluster reshaping): :func:`backend_error`.
"""

from __future__ import annotations

import re
import ssl

import redis.exceptions as rex

from ..core.native import missing
from ..core.scripts import command_at
from ..errors import BackendError, BackendUnavailable

__all__ = [
    "CLOSED_UNDER_US",
    "backend_error",
    "closed_under_us",
    "error_code",
    "native_refusal",
    "refused_by_replica",
    "reply_error",
]

#: What redis-py raises when another thread or task closed a connection while it was in use:
#: a Sentinel pool that found a new master, a cluster client that re-read the layout, both
#: close connections of others (the socket or stream is gone mid-call).
CLOSED_UNDER_US: tuple[type[Exception], ...] = (AttributeError, ValueError)


def closed_under_us(exc: BaseException) -> rex.ConnectionError:
    """``exc`` (one of :data:`CLOSED_UNDER_US`) as the broken connection it stands for."""
    return rex.ConnectionError(f"the connection was closed while in use ({exc!r})")


# Error replies by their first word, onto redis-py's public classes (a prefix redis-py knows
# is dropped from the message, as redis-py drops it).
_REPLIES: dict[str, type[rex.RedisError]] = {
    "NOSCRIPT": rex.NoScriptError,
    "OOM": rex.OutOfMemoryError,
    "NOPERM": rex.NoPermissionError,
    "READONLY": rex.ReadOnlyError,
    "LOADING": rex.BusyLoadingError,
    "WRONGPASS": rex.AuthenticationError,
    "NOAUTH": rex.AuthenticationError,
    "EXECABORT": rex.ExecAbortError,
    "TRYAGAIN": rex.TryAgainError,
    "CLUSTERDOWN": rex.ClusterDownError,
    "MASTERDOWN": rex.MasterDownError,
}
_MAX_CLIENTS = "max number of clients reached"


def reply_error(message: str) -> rex.RedisError:
    """The redis-py exception for an error reply ``message`` (``"NOSCRIPT No matching ..."``)."""
    code, _, rest = message.partition(" ")
    cls = _REPLIES.get(code)
    if cls is not None:
        return cls(rest)
    if code == "ERR" and rest.startswith(_MAX_CLIENTS):
        return rex.ConnectionError(rest)
    return rex.ResponseError(message)


# Passing server states: the command did not run, and will once the state is over.
_PASSING: tuple[tuple[type[Exception], str], ...] = (
    (rex.BusyLoadingError, "Redis is loading its data set into memory (LOADING)"),
    (
        rex.ReadOnlyError,
        "Redis answered READONLY: it is a replica now, so a failover is under way or the URL "
        "names a replica (point it, or the Sentinel settings, at the master)",
    ),
    (rex.MasterDownError, "the replica has lost its master (MASTERDOWN)"),
    (rex.TryAgainError, "the cluster is moving this key's slot (TRYAGAIN)"),
    (
        rex.ClusterDownError,
        "the cluster is down (CLUSTERDOWN): a primary failed and no replica has taken over yet",
    ),
    (rex.SlotNotCoveredError, "no cluster node serves this key's slot right now"),
    # The script cache was flushed again between loading the script and running it (SCRIPT
    # FLUSH twice within one call, a restart in between): the script did not run.
    (rex.NoScriptError, "Redis lost its scripts twice within one call (SCRIPT FLUSH, restarts)"),
    # redis-py's cluster client gives up with this once redirects (MOVED, ASK, TRYAGAIN) for
    # one command ran out: a slot is moving, or a failover is under way.
    (rex.ClusterError, "the cluster kept redirecting the command (a slot moving, a failover)"),
)
# The same states when they arrive as a plain ResponseError (older redis-py, or a cluster's).
_PASSING_CODES = {
    "LOADING": "Redis is loading its data set into memory (LOADING)",
    "READONLY": "Redis answered READONLY: a failover is under way or the URL names a replica",
    "MASTERDOWN": "the replica has lost its master (MASTERDOWN)",
    "TRYAGAIN": "the cluster is moving this key's slot (TRYAGAIN)",
    "CLUSTERDOWN": "the cluster is down (CLUSTERDOWN)",
    "BUSY": "Redis is busy running a slow script (BUSY)",
    "NOREPLICAS": "Redis has too few replicas to accept writes (NOREPLICAS)",
}
_RETRY = "; this passes on its own: retry shortly"

_OOM = (
    "Redis is out of memory (maxmemory reached) and refuses writes: give it more memory, or "
    "keep the locks on a Redis (or database) of their own with maxmemory-policy noeviction"
)
_NOPERM = (
    "the Redis user lacks a permission the library needs ({detail}): grant it the commands "
    'and key pattern of the library\'s ACL rule (README, "Deployment")'
)
_AUTH = (
    "Redis refused the credentials ({detail}): check the username and password in the URL "
    "or the username=/password= options"
)
# A command our script runs and the user may not (Redis 7.0: "... can't run this command or
# subcommand script: <sha>, on @user_script:<line>."; 6.2 words it differently).
_SCRIPT_NOPERM = re.compile(r"user executing the script can't run this command", re.IGNORECASE)
_SCRIPT_PLACE = re.compile(r"([0-9a-f]{40}).*?@user_script:\s*(\d+)", re.IGNORECASE)
_MISCONF = (
    "Redis cannot save to disk and refuses writes (MISCONF): fix its disk, or set "
    "stop-writes-on-bgsave-error no"
)


# Redis < 7 wraps an error raised inside a script ("Error running script (call to f_<sha>):
# @user_script:31: @user_script: 31: -READONLY You can't write ..."); Redis 7 passes it on.
_WRAPPED = re.compile(r"Error running script .*?: -([A-Z]+) ")


def error_code(exc: BaseException) -> str:
    """The error reply's code (``READONLY``, ``OOM``...), unwrapped from a script's error."""
    text = str(exc)
    wrapped = _WRAPPED.search(text)
    return wrapped.group(1) if wrapped else text.partition(" ")[0]


def refused_by_replica(exc: BaseException) -> bool:
    """Whether ``exc`` is a READONLY answer: the server is a replica (an old master after a
    failover) and the command did not run. A connection that got one must be dropped, so
    that the next one is made to the master; redis-py's Sentinel connections turn READONLY
    into a ``ConnectionError`` raised while handling it, which counts too."""
    if isinstance(exc, rex.ReadOnlyError):
        return True
    if isinstance(exc, rex.ConnectionError):
        return isinstance(exc.__context__, rex.ReadOnlyError)
    return isinstance(exc, rex.ResponseError) and error_code(exc) == "READONLY"


def native_refusal(error: BaseException) -> bool | None:
    """For the error a native command (:mod:`celery_unique.core.native`) got: ``None`` when
    the server did not answer with an error (a connection failure, raised as it is), else
    whether its error says the command is missing or not permitted."""
    cause = error.__cause__
    if not isinstance(cause, rex.ResponseError):
        return None
    return isinstance(cause, rex.NoPermissionError) or missing(f"{error_code(cause)} {cause}")


def backend_error(
    exc: BaseException, *, outcome_unknown: bool = False, waited: float | None = None
) -> BackendError:
    """The :class:`BackendError` for redis-py error ``exc`` (chain it: ``raise ... from exc``).

    ``outcome_unknown``: the command had been sent and no answer came (it may have run);
    ``waited``: seconds the caller waited before giving up, for the message.
    """
    if isinstance(exc, rex.ConnectionError) and refused_by_replica(exc):
        exc = exc.__context__  # type: ignore[assignment]  # a ReadOnlyError: checked just above
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = str(exc)
    code = error_code(exc)
    if isinstance(exc, rex.AuthenticationError) or code in ("WRONGPASS", "NOAUTH"):
        return BackendError(_AUTH.format(detail=detail))
    if _MAX_CLIENTS in text:
        return BackendUnavailable(
            "Redis refused the connection: max number of clients reached; raise its "
            "maxclients, or lower max_connections of the pools that share it" + _RETRY
        )
    # Before the connection errors: redis-py makes LOADING one of them.
    for cls, state in _PASSING:
        if isinstance(exc, cls):
            return BackendUnavailable(state + _RETRY)
    if code in _PASSING_CODES:
        return BackendUnavailable(_PASSING_CODES[code] + _RETRY)
    if isinstance(exc, rex.ConnectionError) and "No connection available" in text:
        return BackendUnavailable(
            "no pooled Redis connection came free in time: every one is busy (or stuck on an "
            "unresponsive server); raise max_connections, or find what holds them"
        )
    handshake = _tls_failure(exc)
    if handshake is not None:
        return BackendUnavailable(
            f"the TLS handshake with Redis failed ({handshake}): check ssl_ca_certs (the CA "
            "that signed the server's certificate), and ssl_certfile and ssl_keyfile where the "
            "server asks for a client certificate"
        )
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError):
        within = "" if waited is None else f" within {waited:.2f} s"
        return BackendUnavailable(
            f"Redis did not answer{within} ({detail}): check that the server is up and "
            "reachable at the configured address; a slower network needs a longer "
            "socket_timeout",
            outcome_unknown=outcome_unknown,
        )
    if isinstance(exc, rex.OutOfMemoryError) or code == "OOM":
        return BackendError(_OOM)
    if isinstance(exc, rex.NoPermissionError) or code == "NOPERM":
        return BackendError(_NOPERM.format(detail=text or detail))
    if _SCRIPT_NOPERM.search(text):
        return BackendError(_NOPERM.format(detail=_script_command(text)))
    if code == "MISCONF":
        return BackendError(_MISCONF)
    return BackendError(f"Redis answered with an error: {detail}")


# A TLS connection that merely closed (the server went away): not a handshake that failed.
_TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError)


def _tls_failure(exc: BaseException) -> str | None:
    """What the TLS layer said, where an ``ssl.SSLError`` caused ``exc`` (redis-py 5.0's
    asyncio client words it ``Error 1 connecting ...``, its cause only in the chain)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; a cycle in one must not hang us
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, _TLS_CLOSED):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _script_command(text: str) -> str:
    """Which command a script was refused, named from our script's source where we can."""
    place = _SCRIPT_PLACE.search(text)
    found = place and command_at(place.group(1).lower(), int(place.group(2)))
    if not found:
        return f"a command one of its scripts runs: {text}"
    script, command = found
    return f"the '{command}' command, which its {script} script runs"
