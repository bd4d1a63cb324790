"""The chaos checker on small hand-written histories: what must pass passes, what must fail
fails and names the lines that show it. No Redis, no clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chaos.__main__ import main
from chaos.checker import Bounds, Violation, check
from chaos.history import Record

BOUNDS = Bounds(socket_timeout=1.0)


def numbered(*records: Record) -> list[tuple[int, Record]]:
    """Lines as the merged file numbers them: the header is line 1."""
    header: Record = {"p": "runner", "op": "config", "kind": "run", "socket_timeout": 1.0}
    return list(enumerate([header, *records], 1))


def acquire(
    p: str, t0: float, t1: float, token: str, fence: int | None = None, **more: Any
) -> Record:
    record: Record = {"p": p, "op": "acquire", "kind": "lock", "name": "L", "t0": t0, "t1": t1}
    record.update(result=True, token=token, fence=fence, ttl=1.0, renew=False, blocking=False)
    record.update(more)
    return record


def release(p: str, t0: float, t1: float, token: str, **more: Any) -> Record:
    record: Record = {"p": p, "op": "release", "kind": "lock", "name": "L", "t0": t0, "t1": t1}
    record.update(token=token, ttl=1.0, result=None, **more)
    return record


def checks(*records: Record, bounds: Bounds = BOUNDS) -> list[Violation]:
    return check(numbered(*records), bounds).violations


def test_a_clean_lock_history_passes() -> None:
    assert not checks(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        release("a", 0.5, 0.51, "t1"),
        acquire("b", 0.52, 0.53, "t2", fence=11),
        release("b", 0.9, 0.91, "t2"),
    )


def test_two_holders_within_a_live_lease_fail_naming_both_lines() -> None:
    found = checks(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        acquire("b", 0.2, 0.21, "t2", fence=11),
        release("a", 0.5, 0.51, "t1"),
        release("b", 0.6, 0.61, "t2"),
    )
    assert [v.check for v in found] == ["holders"]
    assert found[0].lines == (3, 2)


def test_an_overlap_after_the_lease_expired_needs_the_holder_told() -> None:
    told = checks(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        acquire("b", 1.5, 1.51, "t2", fence=11),  # a's lease (sent at 0.0, ttl 1) is over
        release("a", 2.0, 2.01, "t1", error="LockNotOwnedError", lib=True),
        release("b", 2.1, 2.11, "t2"),
    )
    assert told == []
    untold = checks(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        acquire("b", 1.5, 1.51, "t2", fence=11),
        release("a", 2.0, 2.01, "t1"),  # it went through: a never learnt
        release("b", 2.1, 2.11, "t2"),
    )
    assert [v.check for v in untold] == ["told"]
    assert set(untold[0].lines) == {2, 3}


def test_an_extend_moves_the_lease_and_a_renewed_holder_counts_on_lost() -> None:
    extended = checks(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        {
            "p": "a",
            "op": "extend",
            "kind": "lock",
            "name": "L",
            "t0": 0.8,
            "t1": 0.81,
            "token": "t1",
            "ttl": 1.0,
            "result": None,
        },
        acquire("b", 1.5, 1.51, "t2", fence=11),  # a's lease now lasts until 1.8
        release("a", 2.0, 2.01, "t1"),
        release("b", 2.1, 2.11, "t2"),
    )
    assert [v.check for v in extended] == ["holders"]


def test_a_renewed_holder_that_ran_hears_of_its_loss_before_a_successor_holds() -> None:
    def renewed(lost_at: float, *more: Record) -> list[Violation]:
        lost: Record = {
            "p": "a",
            "op": "lost",
            "kind": "lock",
            "name": "L",
            "t0": lost_at,
            "t1": lost_at,
            "token": "t1",
        }
        return checks(
            acquire("a", 0.0, 0.01, "t1", fence=10, renew=True),
            lost,
            acquire("b", 1.5, 1.51, "t2", fence=11),
            release("a", 2.0, 2.01, "t1", error="LockNotOwnedError", lib=True),
            release("b", 2.1, 2.11, "t2"),
            *more,
        )

    assert renewed(1.4) == []
    late = renewed(1.6)  # told after b held the lock, though a's process was running
    assert [v.check for v in late] == ["told"]
    assert set(late[0].lines) == {2, 4, 3}
    frozen: Record = {
        "p": "nemesis",
        "op": "stop-holder",
        "kind": "fault",
        "name": "a",
        "t0": 0.3,
        "t1": 1.55,
    }
    assert renewed(1.6, frozen) == []  # frozen: it could only hear of it once woken


def test_fences_must_increase_in_real_time_order_only() -> None:
    found = checks(
        acquire("a", 0.0, 0.01, "t1", fence=20),
        release("a", 0.1, 0.11, "t1"),
        acquire("b", 0.2, 0.21, "t2", fence=19),
        release("b", 0.3, 0.31, "t2"),
    )
    assert [v.check for v in found] == ["fence"]
    assert set(found[0].lines) == {2, 4}


def test_without_persistence_a_restart_excuses_what_it_forgot_but_not_the_fences() -> None:
    restart: Record = {
        "p": "nemesis",
        "op": "restart",
        "kind": "fault",
        "name": "redis",
        "t0": 0.2,
        "t1": 0.4,
    }

    def history(b_fence: int) -> list[Record]:
        return [
            acquire("a", 0.0, 0.01, "t1", fence=10),
            restart,
            acquire("b", 0.5, 0.51, "t2", fence=b_fence),  # a's lease (until 1.0) forgotten
            release("a", 0.8, 0.81, "t1", error="LockNotOwnedError", lib=True),
            release("b", 0.9, 0.91, "t2"),
        ]

    def volatile(records: list[Record]) -> list[Violation]:
        lines = numbered(*records)
        lines[0] = (1, {**lines[0][1], "persistent": False})
        return check(lines, BOUNDS).violations

    assert [v.check for v in checks(*history(11))] == ["holders"]  # persistent: none forgotten
    assert volatile(history(11)) == []
    assert [v.check for v in volatile(history(9))] == ["fence"]


def semaphore(p: str, t0: float, t1: float, token: str, op: str = "acquire") -> Record:
    record: Record = {"p": p, "op": op, "kind": "semaphore", "name": "S", "t0": t0, "t1": t1}
    record.update(result=True if op == "acquire" else None, token=token, ttl=1.0, limit=2)
    return record


def test_a_semaphore_admits_its_limit_and_no_more() -> None:
    two = [semaphore("a", 0.0, 0.01, "t1"), semaphore("b", 0.1, 0.11, "t2")]
    ends = [semaphore("a", 0.5, 0.51, "t1", "release"), semaphore("b", 0.5, 0.51, "t2", "release")]
    assert checks(*two, *ends) == []
    found = checks(*two, semaphore("c", 0.2, 0.21, "t3"), *ends)
    assert [v.check for v in found] == ["holders"]
    assert set(found[0].lines) == {2, 3, 4}


def hit(t0: float, t1: float, allowed: bool = True) -> Record:
    return {
        "p": "a",
        "op": "hit",
        "kind": "rate",
        "name": "R",
        "t0": t0,
        "t1": t1,
        "result": allowed,
        "rate": [5, 1.0, 5],
    }


def test_a_bucket_never_admits_more_than_burst_plus_rate_times_window() -> None:
    assert checks(*(hit(i * 0.01, i * 0.01 + 0.002) for i in range(5))) == []
    # 5/s, burst 5: one hit per 0.2 s is the rate itself, always within it.
    assert checks(*(hit(i * 0.2, i * 0.2 + 0.002) for i in range(20))) == []
    denied = [hit(0.05, 0.06, allowed=False)] * 3
    found = checks(*(hit(i * 0.01, i * 0.01 + 0.002) for i in range(6)), *denied)
    assert [v.check for v in found] == ["bucket"]
    assert set(found[0].lines) == {2, 7}


def test_deadlines_are_the_stated_promises() -> None:
    slow_release = release("a", 0.0, 1.6, "t1", error="BackendUnavailable", lib=True)
    timed = acquire("a", 0.0, 2.4, "t1", blocking=True, timeout=2.0, result=False)
    late = acquire("a", 0.0, 2.6, "t1", blocking=True, timeout=2.0, result=False)
    found = checks(slow_release, timed, late)
    assert [(v.check, v.lines) for v in found] == [("deadline", (2,)), ("deadline", (4,))]
    assert checks(slow_release, timed, bounds=Bounds(socket_timeout=1.0, lenient=True)) == []
    frozen: Record = {
        "p": "nemesis",
        "op": "stop-holder",
        "kind": "fault",
        "name": "a",
        "t0": 0.5,
        "t1": 1.5,
    }
    assert checks(slow_release, frozen) == []


def test_errors_outside_the_library_tree_and_stuck_processes_fail() -> None:
    bare = release("a", 0.0, 0.1, "t1", error="ConnectionError", lib=False)
    start: Record = {"p": "runner", "op": "start", "kind": "process", "name": "a", "t0": 0.0}
    stuck: Record = {
        "p": "runner",
        "op": "exit",
        "kind": "process",
        "name": "a",
        "t0": 9.0,
        "error": "stuck",
        "bound": 8.0,
    }
    left: Record = {
        "p": "runner",
        "op": "leftover",
        "kind": "keys",
        "name": "cu:lock:{L}",
        "t0": 9.0,
        "result": -1,
    }
    found = checks(bare, start, stuck, left)
    assert sorted(v.check for v in found) == ["error-tree", "leftover", "stuck"]
    assert checks(start) != []  # no exit at all


def task(op: str, t0: float, **more: Any) -> Record:
    return {"p": "w", "op": op, "kind": "task", "name": "k", "t0": t0, "t1": t0, **more}


def test_unique_tasks_never_run_twice_at_once_and_none_is_lost() -> None:
    applied = [
        task("apply", 0.0, t1=0.01, token="i1", result="i1"),
        task("apply", 0.1, t1=0.11, token="i2", result="i1"),  # the duplicate got the holder
    ]
    ran = [
        task("run-start", 1.0, run="r1", id="i1", worker="w1"),
        task("run-end", 2.0, run="r1", id="i1"),
    ]
    assert checks(*applied, *ran) == []
    twice = checks(*applied, *ran, task("run-start", 1.5, run="r2", id="i1", worker="w2"))
    assert [v.check for v in twice] == ["task-overlap"]
    lost = checks(*applied)
    assert [v.check for v in lost] == ["task-lost"]
    stranger = checks(*ran, task("apply", 0.0, t1=0.01, token="i3", result="zz"))
    assert [v.check for v in stranger] == ["task-holder"]
    # A holder that failed before its body ran: duplicates answered with it after are lost.
    failed = task("failed", 0.5, run="", id="i1", error="BackendUnavailable")
    dead = checks(applied[0], failed, task("apply", 0.6, t1=0.61, token="i4", result="i1"))
    assert sorted(v.check for v in dead) == ["task-holder", "task-lost"]
    # A run whose worker was killed ends there: a later run of its key is no overlap.
    killed = [
        task("run-start", 1.0, run="r1", id="i1", worker="w1"),
        {"p": "nemesis", "op": "killworker", "kind": "fault", "name": "w1", "t0": 1.2, "t1": 1.3},
        task("run-start", 2.0, run="r2", id="i1", worker="w2"),
    ]
    assert checks(applied[0], *killed) == []


def test_check_replays_a_saved_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = numbered(
        acquire("a", 0.0, 0.01, "t1", fence=10),
        acquire("b", 0.2, 0.21, "t2", fence=11),
    )
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for _, record in lines))
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FIGURE violations: 1" in out
    assert "VIOLATION holders" in out and "history lines 2, 3" in out


def test_an_applied_task_that_followed_a_holder_which_ran_is_answered() -> None:
    applied = task("apply", 0.0, t1=0.01, token="i1", result="i1")
    other = task("apply", 0.5, t1=0.51, token="i2", result="i2")
    ran = task("run-start", 1.0, run="r2", id="i2", worker="w1")
    followed = task("followed", 2.0, run="", id="i1", holder="i2", state="SUCCESS")
    assert checks(applied, other, ran, followed) == []
    unran = task("followed", 2.0, run="", id="i1", holder="i9", state="FAILURE")
    lost = checks(applied, other, ran, unran)
    assert [v.check for v in lost] == ["task-lost"] and "i9" in lost[0].message
