"""What each Redis failure becomes: transient states are BackendUnavailable, refusals are
BackendError with what to change; never a bare redis-py exception."""

from __future__ import annotations

import ssl

import pytest
import redis.exceptions as rex

from celery_unique import BackendError, BackendUnavailable
from celery_unique.executors.errors import backend_error, refused_by_replica, reply_error


@pytest.mark.parametrize(
    "reply",
    [
        "LOADING Redis is loading the dataset in memory",
        "READONLY You can't write against a read only replica.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
        "NOREPLICAS Not enough good replicas to write.",
        "ERR max number of clients reached",
    ],
)
def test_passing_server_states_are_backend_unavailable(reply: str) -> None:
    for exc in (reply_error(reply), rex.ResponseError(reply)):  # ours, or as a plain reply
        error = backend_error(exc)
        assert isinstance(error, BackendUnavailable), (reply, exc)
        assert "retry shortly" in str(error)


@pytest.mark.parametrize(
    ("exc", "advice"),
    [
        (rex.ConnectionError("Connection refused"), "check that the server is up"),
        (rex.TimeoutError("Timeout reading from socket"), "check that the server is up"),
        (TimeoutError(), "check that the server is up"),
        (rex.ConnectionError("No connection available."), "raise max_connections"),
    ],
)
def test_unreachable_servers_are_backend_unavailable(exc: BaseException, advice: str) -> None:
    error = backend_error(exc, outcome_unknown=True)
    assert isinstance(error, BackendUnavailable)
    assert advice in str(error)


@pytest.mark.parametrize(
    ("reply", "advice"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "maxmemory-policy noeviction"),
        (
            "NOPERM User cu has no permissions to run the 'evalsha' command",
            "'evalsha' command",  # the missing permission is named
        ),
        ("WRONGPASS invalid username-password pair or user is disabled.", "password"),
        ("MISCONF Redis is configured to save RDB snapshots", "stop-writes-on-bgsave-error"),
    ],
)
def test_refusals_are_backend_errors_that_say_what_to_change(reply: str, advice: str) -> None:
    error = backend_error(reply_error(reply))
    assert type(error) is BackendError
    assert advice in str(error)


def test_an_unknown_error_reply_keeps_its_text() -> None:
    error = backend_error(reply_error("WRONGTYPE Operation against a key holding the wrong kind"))
    assert type(error) is BackendError
    assert "WRONGTYPE" in str(error)


def test_outcome_unknown_is_only_set_where_a_command_went_unanswered() -> None:
    assert backend_error(rex.TimeoutError("x"), outcome_unknown=True).outcome_unknown
    assert not backend_error(rex.ConnectionError("refused")).outcome_unknown
    assert not backend_error(reply_error("OOM no")).outcome_unknown


def test_a_command_refused_inside_our_script_is_named_from_the_scripts_source() -> None:
    from celery_unique.core.scripts import SEMAPHORE_ACQUIRE, TOKEN_BUCKET

    line = next(
        n for n, text in enumerate(SEMAPHORE_ACQUIRE.source.splitlines(), 1) if "'ZADD'" in text
    )
    refused = rex.ResponseError(
        "The user executing the script can't run this command or subcommand script: "
        f"{SEMAPHORE_ACQUIRE.sha}, on @user_script:{line}."
    )
    error = backend_error(refused)
    assert type(error) is BackendError
    assert "'zadd' command, which its semaphore_acquire script runs" in str(error)
    assert "ACL rule" in str(error)
    # A script that is not ours, or a line without a call: the server's words, as they are.
    unknown = rex.ResponseError(
        "The user executing the script can't run this command or subcommand script: "
        f"{'0' * 40}, on @user_script:3."
    )
    assert "script: " + "0" * 40 in str(backend_error(unknown))
    assert TOKEN_BUCKET.sha not in str(backend_error(unknown))


@pytest.mark.parametrize(
    "error", [rex.ClusterError("TTL exhausted."), rex.SlotNotCoveredError("slot 5 not covered")]
)
def test_a_cluster_reshaping_is_backend_unavailable(error: rex.RedisError) -> None:
    assert isinstance(backend_error(error), BackendUnavailable)


@pytest.mark.parametrize(
    ("wrapped", "expected", "says"),
    [
        ("-READONLY You can't write against a read only replica.", BackendUnavailable, "READONLY"),
        ("-OOM command not allowed when used memory > 'maxmemory'.", BackendError, "out of memory"),
    ],
)
def test_an_error_inside_a_script_of_redis_6_is_unwrapped(
    wrapped: str, expected: type[BackendError], says: str
) -> None:
    # Redis 6.2 wraps what a script's call raised; 7 passes it on as it is.
    place = "@user_script:31: @user_script: 31:"
    text = f"ERR Error running script (call to f_{'a' * 40}): {place} {wrapped}"
    for error in (rex.ResponseError(text), reply_error(text)):
        mapped = backend_error(error)
        assert type(mapped) is expected and says in str(mapped)
    assert refused_by_replica(rex.ResponseError(text)) == (expected is BackendUnavailable)


def test_a_connection_closed_under_a_call_is_backend_unavailable() -> None:
    from celery_unique.executors.errors import closed_under_us

    # What redis-py raises when another thread closed the connection mid-call.
    error = backend_error(closed_under_us(AttributeError("'NoneType' has no 'readline'")))
    assert isinstance(error, BackendUnavailable) and "closed while in use" in str(error)


def _raised_from(cause: BaseException) -> rex.ConnectionError:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise rex.ConnectionError("Error 1 connecting to 127.0.0.1:6380. 1.") from exc
    except rex.ConnectionError as wrapped:
        return wrapped


def test_a_failed_tls_handshake_is_named_from_the_ssl_error_it_came_from() -> None:
    # redis-py 5.0's asyncio client words it "Error 1 connecting": the cause says more.
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    error = backend_error(_raised_from(cause))
    assert isinstance(error, BackendUnavailable)
    assert "TLS handshake" in str(error) and "certificate verify failed" in str(error)
    assert "ssl_ca_certs" in str(error)


def test_a_tls_connection_that_closed_is_not_called_a_failed_handshake() -> None:
    error = backend_error(_raised_from(ssl.SSLEOFError(8, "EOF occurred")))
    assert isinstance(error, BackendUnavailable)
    assert "TLS handshake" not in str(error) and "did not answer" in str(error)
