"""``python -m chaos``: run the chaos suite, or ``--check`` a saved history again."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from .checker import Bounds, check
from .history import numbered
from .nemesis import KINDS


def _kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}"
        )
    return kinds


def parser() -> argparse.ArgumentParser:
    faults = "\n".join(f"  {kind:12} {what}" for kind, what in KINDS.items())
    p = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Clients take locks, semaphore slots, rate-limit decisions and unique "
        "tasks through a fault proxy while a seeded nemesis breaks things; the histories are "
        "then checked. Exits 1 on any violation.",
        epilog=f"fault kinds:\n{faults}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=None, help="the nemesis' and clients' seed")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument(
        "--faults", type=_kinds, default=list(KINDS), help="comma-separated kinds (default: all)"
    )
    p.add_argument("--sync", type=int, default=2, help="sync client processes (default 2)")
    p.add_argument(
        "--async", dest="asyncs", type=int, default=1, help="async ones on asyncio (default 1)"
    )
    p.add_argument("--trio", dest="trios", type=int, default=1, help="async ones on trio (1)")
    p.add_argument("--no-tasks", action="store_true", help="no Celery worker and task client")
    p.add_argument(
        "--volatile",
        action="store_true",
        help="Redis without persistence: a restart forgets every holder (only the fences, "
        "seeded from Redis time, must still increase across it)",
    )
    p.add_argument(
        "--monitor",
        action="store_true",
        help="log every command Redis runs (MONITOR) into the run's monitor.log: a diagnostic",
    )
    p.add_argument("--out", type=Path, default=Path("chaos-runs"), help="where runs are kept")
    p.add_argument(
        "--check", type=Path, metavar="HISTORY", help="only check a saved history.jsonl again"
    )
    p.add_argument(
        "--lenient-deadlines",
        action="store_true",
        help="allow one more socket timeout per call (to compare with versions whose "
        "deadlines did not cover connecting)",
    )
    return p


def report(history: Path, lenient: bool) -> int:
    lines = numbered(history)
    header = lines[0][1] if lines and lines[0][1].get("kind") == "run" else {}
    bounds = Bounds(socket_timeout=float(header.get("socket_timeout", 1.0)), lenient=lenient)
    result = check(lines, bounds)
    for line in result.figures:
        print(line)
    for violation in result.violations:
        print(violation)
    print(f"chaos: {'OK' if result.ok else 'VIOLATIONS'}; history {history}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check is not None:
        return report(args.check, args.lenient_deadlines)
    from .runner import Options, run  # (the replay needs no server)

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    faults = args.faults
    if args.no_tasks and "killworker" in faults:
        faults = [kind for kind in faults if kind != "killworker"]
    print(
        f"chaos: seed {seed}, {args.duration:g} s, faults {','.join(faults)}; "
        f"replay with: python -m chaos --seed {seed} --duration {args.duration:g}",
        flush=True,
    )
    started = time.monotonic()
    options = Options(
        seed=seed,
        duration=args.duration,
        faults=faults,
        out=args.out,
        sync=args.sync,
        asyncs=args.asyncs,
        trios=args.trios,
        tasks=not args.no_tasks,
        persistent=not args.volatile,
        monitor=args.monitor,
    )
    history = run(options)
    print(f"chaos: ran in {time.monotonic() - started:.1f} s", flush=True)
    return report(history, args.lenient_deadlines)


if __name__ == "__main__":
    sys.exit(main())
