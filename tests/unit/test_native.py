"""Owner-checked native commands as alternatives to the release and extend scripts: what the
core builds, how the probes are read, and how the policy picks (no Redis)."""

from __future__ import annotations

import pytest
import redis.exceptions as rex

from celery_unique.core import locks, native
from celery_unique.core.results import Acquisition
from celery_unique.core.scripts import EXTEND, RELEASE
from celery_unique.core.steps import Call, Eval, is_idempotent
from celery_unique.errors import BackendError
from celery_unique.executors.errors import backend_error, native_refusal
from celery_unique.executors.policy import NativeCommands
from celery_unique.leases import Lease, LockKind

KEY = "p:lock:{job}"
UNKNOWN = rex.ResponseError("unknown command 'DELEX', with args beginning with: 'p:probe'")
# The replies to the probes DELIFEQ, DELEX IFEQ, SET IFEQ PX.
VALKEY_9_1 = (0, UNKNOWN, None)
REDIS_7 = (UNKNOWN, UNKNOWN, rex.ResponseError("syntax error"))
REDIS_8_4 = (UNKNOWN, 0, None)


def test_release_and_extend_carry_the_native_commands_when_the_fence_is_known() -> None:
    release = locks.release(KEY, "tok", fence=17).step
    assert isinstance(release, Eval) and release.script is RELEASE and release.args == ("tok",)
    assert [n.needs for n in release.natives] == [native.DELEX, native.DELIFEQ]
    assert [n.call.args for n in release.natives] == [
        ("DELEX", KEY, "IFEQ", "17:tok"),
        ("DELIFEQ", KEY, "17:tok"),
    ]
    # Deleting twice answers 0 the second time: never sent again blindly, as the script.
    assert not any(is_idempotent(n.call) for n in release.natives)
    extend = locks.extend(KEY, "tok", 1.5, fence=17).step
    assert isinstance(extend, Eval) and extend.script is EXTEND and extend.args == ("tok", 1500)
    (set_ifeq,) = extend.natives
    assert set_ifeq.needs == native.SET_IFEQ
    assert set_ifeq.call.args == ("SET", KEY, "17:tok", "IFEQ", "17:tok", "PX", 1500)
    assert is_idempotent(set_ifeq.call)


def test_without_a_fence_or_with_an_owner_prefix_only_the_script_is_sent() -> None:
    assert locks.release(KEY, "tok").step.natives == ()  # type: ignore[union-attr]
    assert locks.release(KEY, "tok", "task-", fence=17).step.natives == ()  # type: ignore[union-attr]
    assert locks.extend(KEY, "tok", 1.5).step.natives == ()  # type: ignore[union-attr]


def test_a_yes_is_the_scripts_yes_and_a_no_leaves_the_decision_to_the_script() -> None:
    delex, delifeq = locks.release(KEY, "tok", fence=17).step.natives  # type: ignore[union-attr]
    (set_ifeq,) = locks.extend(KEY, "tok", 1.5, fence=17).step.natives  # type: ignore[union-attr]
    assert delex.reply(1) == delifeq.reply(1) == 1
    assert delex.reply(0) is None and delifeq.reply(0) is None
    assert set_ifeq.reply(b"OK") == set_ifeq.reply("OK") == 1
    assert set_ifeq.reply(None) is None


def test_renewal_extends_natively_within_each_steps_deadline() -> None:
    now = [1000.0]
    lease = Lease(LockKind(KEY), "job", 3.0, face=None, token="tok", clock=lambda: now[0])
    lease.record(Acquisition(True, "tok", 3.0, fence=17))
    flow = lease.start_renewal(since=now[0]).flow
    next(flow)  # the first sleep
    now[0] += 1.0
    step = flow.send(None)
    assert isinstance(step, Eval) and step.timeout is not None
    (set_ifeq,) = step.natives
    sent = NativeCommands.command(step, set_ifeq)  # as an executor sends it
    assert sent.timeout == step.timeout  # answered within what is left of the lease
    assert sent.gate is step.gate is not None  # and never written once release began
    assert sent.args == ("SET", KEY, "17:tok", "IFEQ", "17:tok", "PX", 3000)


@pytest.mark.parametrize(
    ("replies", "found"),
    [
        (VALKEY_9_1, {native.DELIFEQ, native.SET_IFEQ}),
        (REDIS_7, set()),
        (REDIS_8_4, {native.DELEX, native.SET_IFEQ}),
        ((0, 0, b"OK"), {native.DELIFEQ, native.DELEX, native.SET_IFEQ}),
        # An ACL that allows SET on the key but not the others.
        ((rex.NoPermissionError("delifeq"), rex.NoPermissionError("delex"), None), {"SET IFEQ"}),
    ],
    ids=["valkey-9.1", "redis-7", "redis-8.4", "all", "acl"],
)
def test_the_probes_show_which_commands_the_server_has(
    replies: tuple[object, ...], found: set[str]
) -> None:
    assert native.capabilities(replies) == found


def test_the_probes_send_the_very_commands_on_a_key_never_written() -> None:
    delifeq, delex, set_ifeq = native.probes("p:probe")
    never = delifeq.args[2]
    assert delifeq.args == ("DELIFEQ", "p:probe", never)
    assert delex.args == ("DELEX", "p:probe", "IFEQ", never)
    # IFEQ on a key that is not there writes nothing; PX 1 bounds it if it ever were there.
    assert set_ifeq.args == ("SET", "p:probe", "probe", "IFEQ", never, "PX", 1)
    assert all(is_idempotent(probe) for probe in (delifeq, delex, set_ifeq))
    assert native.probes()[0].args[1] == native.PROBE_KEY


def test_the_policy_picks_only_what_the_probes_found_in_order_of_preference() -> None:
    commands = NativeCommands()
    step = locks.release(KEY, "tok", fence=17).step
    assert commands.claim() and not commands.claim()  # asked once
    assert commands.pick(step) is None  # not answered yet: the script
    commands.unanswered()
    assert commands.claim()
    commands.answered(VALKEY_9_1)
    picked = commands.pick(step)
    assert picked is not None and picked.needs == native.DELIFEQ
    commands.answered((0, 0, None))
    picked = commands.pick(step)
    assert picked is not None and picked.needs == native.DELEX
    assert commands.pick(Call(("GET", KEY))) is None
    assert commands.pick(locks.release(KEY, "tok").step) is None  # no fence: the script


def _error(cause: Exception) -> BackendError:
    error = backend_error(cause)
    error.__cause__ = cause
    return error


def test_a_command_the_server_turns_out_to_lack_is_not_offered_again() -> None:
    commands = NativeCommands(refusal=native_refusal)
    commands.answered(VALKEY_9_1)
    step = locks.release(KEY, "tok", fence=17).step
    picked = commands.pick(step)
    assert picked is not None
    assert commands.settle(picked, 1) == 1  # deleted: the script's yes
    assert commands.settle(picked, 0) is None  # no: the script decides
    wrongtype = _error(rex.ResponseError("WRONGTYPE Operation against a key"))
    assert commands.settle(picked, wrongtype) is None  # the script answers, with its error
    assert commands.pick(step) == picked
    unreachable = _error(rex.ConnectionError("Connection reset by peer"))
    with pytest.raises(BackendError) as raised:
        commands.settle(picked, unreachable)  # no answer: as the script's would be
    assert raised.value is unreachable
    assert commands.pick(step) == picked
    unknown = _error(rex.ResponseError("unknown command 'DELIFEQ'"))
    assert commands.settle(picked, unknown) is None  # e.g. a failover to an older server
    assert commands.pick(step) is None
    assert commands.found == {native.SET_IFEQ}


def test_a_cluster_executor_never_probes() -> None:
    commands = NativeCommands(enabled=False)
    assert not commands.pending and not commands.claim()
    assert commands.pick(locks.release(KEY, "tok", fence=17).step) is None


@pytest.mark.parametrize(
    ("cause", "refusal"),
    [
        (rex.ResponseError("unknown command 'DELIFEQ', with args beginning with: 'k'"), True),
        (rex.ResponseError("ERR unknown command 'DELEX'"), True),
        (rex.ResponseError("syntax error"), True),
        (rex.NoPermissionError("this user has no permissions to run the 'delifeq' command"), True),
        (rex.ResponseError("NOPERM this user has no permissions"), True),
        (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), False),
        (rex.ReadOnlyError("You can't write against a read only replica."), False),
        (rex.ConnectionError("Connection reset by peer"), None),
        (rex.TimeoutError("Timeout reading from socket"), None),
    ],
)
def test_which_errors_of_a_native_command_hand_over_to_the_script(
    cause: Exception, refusal: bool | None
) -> None:
    # None: no answer, raised as the script's would be; else the script is sent, and True
    # also stops offering the command.
    assert native_refusal(_error(cause)) is refusal
