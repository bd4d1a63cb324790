"""The checker: what a merged history must show, whatever the nemesis did.

Pure functions over records (no Redis, no clock), so that a saved history can be checked
again (``python -m chaos --check history.jsonl``) and the checks can be unit-tested on small
hand-written histories. Each check claims a violation only when the history proves it: an
operation's effect in Redis happened somewhere between its invocation (``t0``) and its
completion (``t1``), and the checks reason with those bounds, never with guesses.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import Record

__all__ = ["Bounds", "Hold", "Report", "Violation", "check"]

#: Operations that are calls into the library (they have a duration and a deadline).
CALLS = {
    "lock": {"acquire", "release", "extend"},
    "semaphore": {"acquire", "release", "extend"},
    "rate": {"hit"},
    "task": {"apply"},
}
NOT_OWNED = "LockNotOwnedError"
#: The longest window the bucket check looks at: a bucket that over-admits does so within
#: seconds (a lost or double-spent state), and longer windows would make a long run's check
#: quadratic in its hits.
WINDOW = 60.0


@dataclass(frozen=True)
class Violation:
    """One broken promise, with the history lines that show it."""

    check: str
    message: str
    lines: tuple[int, ...]

    def __str__(self) -> str:
        where = ", ".join(map(str, sorted(set(self.lines))))
        return f"VIOLATION {self.check}: {self.message} (history lines {where})"


@dataclass(frozen=True)
class Bounds:
    """The deadlines the library promises (README and DESIGN.md: "Behaviour users can count
    on"): a single call ends within the client's socket timeout, ``acquire(timeout=T)`` within
    T; each plus ``margin``. ``lenient`` adds one more socket timeout to each, for versions
    whose deadlines did not cover connecting (a second full timeout after a dropped
    connection)."""

    socket_timeout: float = 1.0
    margin: float = 0.5
    lenient: bool = False
    #: What ``apply_async`` may add for its publish, on a broker the nemesis leaves alone.
    publish: float = 1.0

    def deadline(self, record: Record) -> float | None:
        """Seconds the call may take, or ``None`` when it has no deadline (blocking, untimed)."""
        extra = self.socket_timeout if self.lenient else 0.0
        if record["op"] == "acquire" and record.get("blocking", False):
            timeout = record.get("timeout")
            return None if timeout is None else float(timeout) + self.margin + extra
        if record["op"] == "apply":
            return self.socket_timeout + self.margin + self.publish + extra
        return self.socket_timeout + self.margin + extra


@dataclass
class Hold:
    """One holder of a lock or a semaphore slot, as its process saw it: from its acquire's
    completion to its release's invocation."""

    kind: str
    name: str
    token: str
    process: str
    line: int
    t0: float  # the acquire's invocation
    start: float  # the acquire's completion
    ttl: float
    limit: int
    renew: bool
    fence: int | None
    #: The lease certainly lasts until here: the last successful acquire or extend was sent
    #: then, and Redis ran it later. Renewals (``auto_renew``) are not in the history, so for
    #: a renewed holder this is a lower bound only.
    lease_end: float
    end: float = math.inf
    end_line: int | None = None
    told: str | None = None  # how the holder learnt it lost the lease, if it did
    told_line: int | None = None
    told_at: float = math.inf

    def tell(self, how: str, line: int, at: float) -> None:
        if self.told is None:
            self.told, self.told_line, self.told_at = how, line, at


@dataclass
class Report:
    """What the checks found, and the figures of the run."""

    violations: list[Violation] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


Line = tuple[int, Record]


def check(lines: Sequence[Line], bounds: Bounds) -> Report:
    """Every check over one merged history (``(line number, record)`` pairs)."""
    report = Report()
    holds, tell_counts = collect_holds(lines)
    violations = report.violations
    violations += check_errors(lines)
    violations += check_deadlines(lines, bounds)
    explained: Counter[str] = Counter()
    # Without persistence a restart forgets every holder and bucket: what spans one is
    # excused (the fences must still increase: they are seeded from Redis time).
    header = lines[0][1] if lines else {}
    forgets = [] if header.get("persistent", True) else _kills(lines)
    violations += check_holders(holds, explained, forgets, _stops(lines))
    violations += check_fences(holds)
    violations += check_buckets(lines, forgets)
    violations += check_tasks(lines, forgets)
    violations += check_processes(lines)
    violations += check_leftovers(lines)
    report.figures = figures(lines, holds, tell_counts, violations)
    report.figures.insert(
        -1,
        f"FIGURE overlaps explained by an expired lease: {sum(explained.values())}"
        + (" (" + ", ".join(f"told by {h} {n}" for h, n in explained.most_common()) + ")")
        * bool(explained),
    )
    return report


# -- errors and deadlines --------------------------------------------------------------------


def _is_call(record: Record) -> bool:
    return record.get("op") in CALLS.get(record.get("kind", ""), ()) and "t1" in record


def check_errors(lines: Iterable[Line]) -> list[Violation]:
    """Every error a call raised is in the library's tree (a ``CeleryUniqueError``)."""
    return [
        Violation(
            "error-tree",
            f"{record['p']}: {record['kind']}.{record['op']} {record.get('name', '')!r} raised "
            f"{record['error']}, not a CeleryUniqueError",
            (line,),
        )
        for line, record in lines
        if _is_call(record) and record.get("error") and not record.get("lib", False)
    ]


Stops = dict[str, list[tuple[float, float]]]


def _stops(lines: Iterable[Line]) -> Stops:
    """When each process was stopped by the nemesis (SIGSTOP .. SIGCONT)."""
    stops: Stops = defaultdict(list)
    for _, record in lines:
        if record.get("kind") == "fault" and record.get("op") == "stop-holder":
            stops[record["name"]].append((record["t0"], record.get("t1") or math.inf))
    return stops


def _kills(lines: Iterable[Line]) -> list[float]:
    """When the server was killed (its data lost, without persistence)."""
    return sorted(
        r["t0"] for _, r in lines if r.get("kind") == "fault" and r.get("op") == "restart"
    )


def _between(moments: Sequence[float], start: float, end: float) -> bool:
    return any(start < moment <= end for moment in moments)


def _frozen(record: Record, stops: Stops) -> bool:
    return _frozen_during(stops, record["p"], record["t0"], record["t1"])


def _frozen_during(stops: Stops, process: str, start: float, end: float) -> bool:
    return any(s0 < end and s1 > start for s0, s1 in stops.get(process, ()))


def check_deadlines(lines: Sequence[Line], bounds: Bounds) -> list[Violation]:
    """Every call ended within its deadline, unless its own process was stopped meanwhile
    (a process the nemesis froze cannot keep time: that is the point of freezing it)."""
    stops = _stops(lines)
    found = []
    for line, record in lines:
        if not _is_call(record):
            continue
        limit = bounds.deadline(record)
        took = record["t1"] - record["t0"]
        if limit is None or took <= limit:
            continue
        if _frozen(record, stops):
            continue
        outcome = record.get("error") or f"result {record.get('result')!r}"
        found.append(
            Violation(
                "deadline",
                f"{record['p']}: {record['kind']}.{record['op']} {record.get('name', '')!r} "
                f"took {took:.3f} s, {1000 * (took - limit):.0f} ms past its {limit:.3f} s "
                f"deadline ({outcome})",
                (line,),
            )
        )
    return found


# -- holders: locks and semaphore slots ------------------------------------------------------


def collect_holds(lines: Iterable[Line]) -> tuple[list[Hold], Counter[str]]:
    """The holds of every lock and semaphore, each with how it ended; and how many holders
    were told of a loss, by how."""
    holds: dict[tuple[str, str, str], Hold] = {}
    for line, record in lines:
        kind = record.get("kind")
        if kind not in ("lock", "semaphore"):
            continue
        op, token = record.get("op"), record.get("token")
        key = (kind, record.get("name", ""), token or "")
        if op == "acquire":
            if record.get("result") is True and token:
                holds[key] = Hold(
                    kind=kind,
                    name=record["name"],
                    token=token,
                    process=record["p"],
                    line=line,
                    t0=record["t0"],
                    start=record["t1"],
                    ttl=float(record["ttl"]),
                    limit=int(record.get("limit", 1)),
                    renew=bool(record.get("renew", False)),
                    fence=record.get("fence"),
                    lease_end=record["t0"] + float(record["ttl"]),
                )
            continue
        hold = holds.get(key)
        if hold is None:
            continue
        if op == "extend":
            if record.get("error") is None:
                hold.lease_end = max(hold.lease_end, record["t0"] + float(record["ttl"]))
            elif record["error"] == NOT_OWNED:
                hold.tell("extend said not owned", line, record["t0"])
        elif op == "lost":
            hold.tell("on_lost", line, record["t0"])
        elif op == "release":
            hold.end, hold.end_line = record["t0"], line
            if record.get("error") == NOT_OWNED:
                hold.tell("release said not owned", line, record["t0"])
            elif record.get("lost"):
                hold.tell("lock.lost", line, record["t0"])
            elif record.get("error"):
                # Redis did not answer the release: the holder could not learn either way.
                # Not the library's fault; counted among the figures, not a violation.
                hold.tell("release unanswered", line, record["t0"])
    told = Counter(hold.told for hold in holds.values() if hold.told)
    return list(holds.values()), told


def _by_name(holds: Iterable[Hold]) -> dict[tuple[str, str], list[Hold]]:
    groups: dict[tuple[str, str], list[Hold]] = defaultdict(list)
    for hold in holds:
        groups[(hold.kind, hold.name)].append(hold)
    for group in groups.values():
        group.sort(key=lambda hold: hold.start)
    return groups


def _told_in_time(earlier: Hold, later: Hold, stops: Stops, forgets: Sequence[float] = ()) -> bool:
    """Whether ``earlier`` was told of its loss as promised. Renewal reports a loss before
    the lease can end (docs/locks.md, "Renewal"), so a renewed holder whose process ran must
    have heard (``on_lost``) before ``later`` took its place; a holder that renews nothing,
    or that the nemesis froze, or whose lease a restart forgot, can only hear of it
    afterwards, on its release or extend."""
    if earlier.told is None:
        return False
    if (
        not earlier.renew
        or _frozen_during(stops, earlier.process, earlier.start, later.start)
        or _between(forgets, earlier.t0, later.start)
    ):
        return True
    return earlier.told == "on_lost" and earlier.told_at < later.start


def check_holders(
    holds: Iterable[Hold],
    explained: Counter[str] | None = None,
    forgets: Sequence[float] = (),
    stops: Stops | None = None,
) -> list[Violation]:
    """At most ``limit`` holders of a name at once (a lock's limit is 1), beyond what expired
    leases explain; and a holder whose lease expired under another's feet was told.

    When holder H's acquire completes, every earlier holder G still in its critical section
    whose lease certainly lasted past that moment (``G.lease_end > H.start``) was live when
    Redis ran H's acquire: more than ``limit`` of those is a violation outright. An earlier
    holder whose lease may have expired explains the overlap only if it was told (its
    ``on_lost`` ran, ``lock.lost`` was set, or its release or extend said not owned), and a
    renewed one whose process ran, in time (see :func:`_told_in_time`)."""
    found = []
    for (kind, name), group in _by_name(holds).items():
        active: list[Hold] = []
        for hold in group:
            active = [g for g in active if g.end > hold.start]
            others = list(active)
            active.append(hold)
            if hold.t0 + hold.ttl <= hold.start:
                continue  # its acquire took a whole ttl: its own lease may be over already
            if len(others) + 1 <= hold.limit:
                continue
            live = [
                g
                for g in others
                if g.lease_end > hold.start and not _between(forgets, g.t0, hold.start)
            ]
            what = "lock" if kind == "lock" else f"semaphore (limit {hold.limit})"
            if len(live) + 1 > hold.limit:
                found.append(
                    Violation(
                        "holders",
                        f"{what} {name!r}: {hold.process} acquired while "
                        + ", ".join(f"{g.process} (line {g.line})" for g in live)
                        + " held live leases",
                        (hold.line, *(g.line for g in live)),
                    )
                )
                continue
            untold = [
                g
                for g in others
                if g not in live and not _told_in_time(g, hold, stops or {}, forgets)
            ]
            if len(live) + len(untold) + 1 <= hold.limit:
                if explained is not None:  # an overlap the expired leases account for
                    explained.update(
                        g.told or "none (within the limit)" for g in others if g not in live
                    )
            else:
                found.append(
                    Violation(
                        "told",
                        f"{what} {name!r}: {hold.process} acquired after the lease of "
                        + ", ".join(
                            f"{g.process} (line {g.line})"
                            + (
                                " (never told: no on_lost, no lock.lost, no LockNotOwnedError)"
                                if g.told is None
                                else f" (renewed, running, told only at line {g.told_line})"
                            )
                            for g in untold
                        )
                        + " may have expired mid-section",
                        (
                            hold.line,
                            *(g.line for g in untold),
                            *(g.told_line for g in untold if g.told_line is not None),
                        ),
                    )
                )
    return found


def check_fences(holds: Iterable[Hold]) -> list[Violation]:
    """A lock's fences increase strictly in acquisition order: an acquire that completed
    before another was invoked has the smaller fence (across restarts too: the fence is
    seeded from Redis time)."""
    found = []
    for (kind, name), group in _by_name(holds).items():
        if kind != "lock":
            continue
        fenced = [hold for hold in group if hold.fence is not None]
        by_completion = sorted(fenced, key=lambda hold: hold.start)
        ends = [hold.start for hold in by_completion]
        # best[i]: the hold with the largest fence among the first i + 1 to complete.
        best: list[Hold] = []
        for hold in by_completion:
            best.append(hold if not best or hold.fence > best[-1].fence else best[-1])  # type: ignore[operator]
        for hold in fenced:
            before = bisect.bisect_left(ends, hold.t0)  # completed before this one was invoked
            if before == 0:
                continue
            top = best[before - 1]
            if top.fence >= hold.fence:  # type: ignore[operator]
                found.append(
                    Violation(
                        "fence",
                        f"lock {name!r}: fence {hold.fence} ({hold.process}) is not above "
                        f"fence {top.fence} of an acquisition that completed before it began "
                        f"({top.process})",
                        (hold.line, top.line),
                    )
                )
    return found


# -- rate limits -----------------------------------------------------------------------------


def check_buckets(lines: Iterable[Line], forgets: Sequence[float] = ()) -> list[Violation]:
    """A bucket never admits more than ``burst + rate x window`` in any window.

    Admitted hits i..j (by invocation) all took their token within ``[t0_i, max t1]``, so
    ``j - i + 1`` of them there is a lower bound that the promise must cover. (The bucket
    runs on Redis' clock, the history on CLOCK_MONOTONIC; both tick at the same NTP-slewed
    rate, and a run is too short for their difference to matter.)"""
    admitted: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    specs: dict[str, tuple[float, float, int]] = {}
    for line, record in lines:
        if record.get("kind") == "rate" and record.get("op") == "hit":
            count, per, burst = record["rate"]
            specs[record["name"]] = (float(count), float(per), int(burst))
            if record.get("result") is True:
                admitted[record["name"]].append((record["t0"], record["t1"], line))
    found = []
    for name, hits in admitted.items():
        count, per, burst = specs[name]
        rate = count / per
        hits.sort()
        worst: tuple[float, int, int] | None = None  # (excess, i, j)
        for i in range(len(hits)):
            latest = -math.inf
            for j in range(i, len(hits)):
                latest = max(latest, hits[j][1])
                if latest - hits[i][0] > WINDOW or _between(forgets, hits[i][0], latest):
                    break
                excess = (j - i + 1) - (burst + rate * (latest - hits[i][0]))
                if excess > 1e-9 and (worst is None or excess > worst[0]):
                    worst = (excess, i, j)
        if worst is not None:
            excess, i, j = worst
            window = max(hits[k][1] for k in range(i, j + 1)) - hits[i][0]
            found.append(
                Violation(
                    "bucket",
                    f"bucket {name!r} ({count:g}/{per:g}s, burst {burst}): {j - i + 1} admitted "
                    f"within {window:.3f} s, more than {burst + rate * window:.2f}",
                    (hits[i][2], hits[j][2]),
                )
            )
    return found


# -- unique tasks ----------------------------------------------------------------------------


def check_tasks(lines: Sequence[Line], forgets: Sequence[float] = ()) -> list[Violation]:
    """Unique tasks: never two runs of one key at once (unless the earlier run was told its
    key was lost, or its worker was killed before the later one began), and every applied id
    either ran or was answered with a holder's id that was itself applied."""
    found: list[Violation] = []
    runs: dict[str, dict[str, Any]] = {}  # run id (task id + delivery) -> its marks
    kills: list[tuple[float, str]] = []  # (when, worker process) a worker was SIGKILLed
    for line, record in lines:
        kind, op = record.get("kind"), record.get("op")
        if kind == "fault" and op == "killworker":
            kills.append((record["t0"], record["name"]))
        if kind != "task":
            continue
        if op == "run-start":
            runs[record["run"]] = {"start": record["t0"], "line": line, "rec": record}
        elif op == "run-end" and record["run"] in runs:
            runs[record["run"]]["end"] = record["t0"]
        elif op == "lock-lost" and record["run"] in runs:
            runs[record["run"]]["lost"] = line
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs.values():
        if "end" not in run:
            # Its worker died under it: it ran until the kill of that worker at the latest.
            worker = run["rec"].get("worker")
            later = [t for t, name in kills if name == worker and t >= run["start"]]
            run["end"] = min(later) if later else math.inf
        by_key[run["rec"]["name"]].append(run)
    for key, group in by_key.items():
        group.sort(key=lambda run: run["start"])
        for a, b in itertools.pairwise(group):
            forgot = _between(forgets, a["start"], b["start"])
            if b["start"] < a["end"] and "lost" not in a and not forgot:
                found.append(
                    Violation(
                        "task-overlap",
                        f"task key {key!r}: {b['rec']['id']} started while {a['rec']['id']} "
                        "still ran (and was never told its key was lost)",
                        (a["line"], b["line"]),
                    )
                )
    applied: dict[str, int] = {}
    unanswered: dict[str, int] = {}  # ids whose apply raised: maybe locked, never published
    answered: list[tuple[int, Record]] = []
    failures: dict[str, tuple[int, str, float]] = {}  # id -> (line, error, when)
    followed: dict[str, tuple[int, str]] = {}  # id -> (line, the holder it followed)
    deliveries: dict[str, tuple[int, str]] = {}  # the last delivery of each id, and to whom
    for line, record in lines:
        if record.get("kind") != "task":
            continue
        if record.get("op") == "failed":
            failures.setdefault(record["id"], (line, record.get("error", "?"), record["t0"]))
        elif record.get("op") == "followed":
            followed[record["id"]] = (line, record.get("holder", ""))
        elif record.get("op") == "delivered":
            deliveries[record["id"]] = (line, record.get("worker", ""))
        if record.get("op") != "apply":
            continue
        if record.get("error"):
            unanswered[record["token"]] = line
        elif record.get("result") == record.get("token"):
            applied[record["token"]] = line
        else:
            answered.append((line, record))
    ran = {run["rec"]["id"] for run in runs.values()}
    for task_id, line in applied.items():
        if task_id in ran:
            continue
        why, lost_at = "", [line]
        if task_id in followed:
            # It found its key held by another instance and yielded that one's outcome: it is
            # answered with the holder, which must have run.
            followed_at, leader = followed[task_id]
            if leader in ran:
                continue
            why = f": it followed {leader}, which never ran either"
            lost_at.append(followed_at)
        elif task_id in failures:
            failed_at, error, _ = failures[task_id]
            why = (
                f": its worker failed it with {error} before its body ran (unique_fail_open="
                "False: a missed run rather than a possible duplicate)"
            )
            lost_at.append(failed_at)
        elif task_id in deliveries:
            delivered_at, worker = deliveries[task_id]
            killed = any(name == worker for _, name in kills)
            why = f": delivered to {worker}" + (
                ", which was killed, and not delivered again" if killed else ", body never ran"
            )
            lost_at.append(delivered_at)
        else:
            why = ": never delivered"
        found.append(
            Violation("task-lost", f"task {task_id} was published but never ran{why}", (*lost_at,))
        )
    for line, record in answered:
        holder = record.get("result")
        if holder in failures and holder not in ran:
            failed_at, error, when = failures[holder]
            if when < record["t0"]:
                found.append(
                    Violation(
                        "task-holder",
                        f"apply of {record.get('name')!r} was answered with {holder!r}, which "
                        f"had already failed ({error}) without running: its key outlived it",
                        (line, failed_at),
                    )
                )
                continue
        if holder in applied:
            continue
        why, where = "an id nobody published", [line]
        if holder in unanswered:
            why = "the id of an apply that raised (its key taken, nothing published)"
            where.append(unanswered[holder])
        found.append(
            Violation(
                "task-holder",
                f"apply of {record.get('name')!r} was answered with {holder!r}, {why}",
                (*where,),
            )
        )
    return found


# -- processes and keys ----------------------------------------------------------------------


def check_processes(lines: Iterable[Line]) -> list[Violation]:
    """Every client process ended by itself, in time, with exit code 0."""
    started: dict[str, int] = {}
    exits: dict[str, tuple[int, Record]] = {}
    for line, record in lines:
        if record.get("kind") == "process":
            if record.get("op") == "start":
                started[record["name"]] = line
            elif record.get("op") == "exit":
                exits[record["name"]] = (line, record)
    found = []
    for name, line in started.items():
        if name not in exits:
            found.append(Violation("stuck", f"{name} never reported its exit", (line,)))
            continue
        exit_line, record = exits[name]
        if record.get("error") == "stuck":
            found.append(
                Violation(
                    "stuck",
                    f"{name} was still running {record.get('bound', '?')} s after the end "
                    "and was killed (its stacks are in the run folder)",
                    (line, exit_line),
                )
            )
        elif record.get("result") != 0:
            found.append(
                Violation("crash", f"{name} exited with {record.get('result')}", (exit_line,))
            )
    return found


def check_leftovers(lines: Iterable[Line]) -> list[Violation]:
    """No key of the run is left once every ttl has passed."""
    return [
        Violation(
            "leftover",
            f"key {record['name']!r} still there after every ttl (pttl {record.get('result')})",
            (line,),
        )
        for line, record in lines
        if record.get("kind") == "keys" and record.get("op") == "leftover"
    ]


# -- figures ---------------------------------------------------------------------------------


def figures(
    lines: Sequence[Line], holds: Sequence[Hold], told: Counter[str], found: Sequence[Violation]
) -> list[str]:
    """The ``FIGURE`` lines: operations, faults, slowest calls, violations."""
    ops: Counter[str] = Counter()
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    slowest: dict[str, tuple[float, int]] = {}
    faults: Counter[str] = Counter()
    stops = _stops(lines)
    for line, record in lines:
        kind, op = record.get("kind", ""), record.get("op", "")
        if kind == "fault":
            faults[op] += 1
        if not _is_call(record):
            continue
        what = f"{kind}.{op}"
        ops[what] += 1
        outcome = record.get("error") or (
            "ok" if record.get("result") in (None, True) else "refused"
        )
        if kind == "task":
            outcome = record.get("error") or (
                "queued" if record.get("result") == record.get("token") else "duplicate"
            )
        outcomes[what][outcome] += 1
        took = record["t1"] - record["t0"]
        if _frozen(record, stops):
            continue  # its process was stopped: its time says nothing of the library
        if what not in slowest or took > slowest[what][0]:
            slowest[what] = (took, line)
    lines_out = [
        f"FIGURE operations: {sum(ops.values())} calls; "
        + "; ".join(
            f"{what} {ops[what]} ("
            + ", ".join(f"{k} {v}" for k, v in outcomes[what].most_common())
            + ")"
            for what in sorted(ops)
        ),
        "FIGURE faults: "
        + (", ".join(f"{kind} {n}" for kind, n in sorted(faults.items())) or "none"),
        "FIGURE slowest (processes the nemesis froze left out): "
        + ", ".join(
            f"{what} {took:.3f} s (line {line})" for what, (took, line) in sorted(slowest.items())
        ),
        f"FIGURE holds: {len(holds)}; told of a loss: "
        + (", ".join(f"{how} {n}" for how, n in told.most_common()) or "none"),
        f"FIGURE violations: {len(found)}"
        + (
            " (" + ", ".join(f"{c} {n}" for c, n in Counter(v.check for v in found).items()) + ")"
            if found
            else ""
        ),
    ]
    return lines_out
