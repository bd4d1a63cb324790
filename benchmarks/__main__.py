"""Every benchmark in one run on one Redis: ``python -m benchmarks`` (``nox -s bench``).

``--quick`` for a short run (a few minutes), ``--only locks,adelay`` for some of them,
``--json PATH`` to also write every result; ``--url`` uses a running Redis instead of a
private one. The tables come one benchmark after another, then every target in one list,
then one footer: versions, CPUs, the load average before and after, and what
``redis-benchmark -c 1`` gets from the same server before and after (the physical limit
of one connection there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from types import ModuleType

from benchmarks import _harness as h
from benchmarks import adelay, apply_async, locks, native, rate_limit, semaphores, worker

BENCHMARKS: dict[str, ModuleType] = {
    "locks": locks,
    "semaphores": semaphores,
    "apply_async": apply_async,
    "rate_limit": rate_limit,
    "adelay": adelay,
    "worker": worker,
    "native": native,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", help=f"comma-separated, of: {', '.join(BENCHMARKS)}")
    rate_limit.add_arguments(parser)
    worker.add_arguments(parser)


def main() -> None:
    args = h.parser(__doc__, add_arguments).parse_args()
    chosen = list(BENCHMARKS) if not args.only else args.only.split(",")
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    environment = h.Environment()
    sections: list[h.Section] = []
    with h.serve(args.url) as url:
        environment.limit_before(url)
        for name in chosen:
            module = BENCHMARKS[name]
            unit = getattr(module, "UNIT", "s")  # what a run's size counts, if not seconds
            settings = h.settings(args, module.FULL, module.QUICK, unit)
            print(f"{name}: {settings.reps} reps of {settings.run}", file=sys.stderr)
            section: h.Section = asyncio.run(module.run(url, settings))
            section.settings = settings
            sections.append(section)
        environment.limit_after(url)
    for section in sections:
        print(section.text())
        print()
    targets = [t.line() for s in sections for t in s.targets if t.wanted is not None]
    if targets:
        print("## Targets")
        print()
        print("\n".join(targets))
        print()
    print(environment.footer(sections))
    if args.json is not None:
        document = {
            "meta": environment.json(sections),
            "sections": [s.json() for s in sections],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
