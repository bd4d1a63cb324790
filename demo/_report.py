"""What the demos print: time-stamped progress lines and a summary of checked claims."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

STARTED = time.monotonic()


class Check(NamedTuple):
    """A claim the demo made, and whether it held."""

    claim: str
    ok: bool


def say(message: str) -> None:
    """Print one progress line, stamped with the seconds since the demo started."""
    print(f"[{time.monotonic() - STARTED:5.2f}s] {message}", flush=True)


def heading(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def summary(checks: Sequence[Check]) -> int:
    """Print every check; the exit code is 1 if any failed, so a demo is a smoke test too."""
    heading("summary")
    for check in checks:
        print(f"  {'✓' if check.ok else '✗'} {check.claim}")
    failed = sum(not check.ok for check in checks)
    verdict = "all checks passed" if not failed else f"{failed} check(s) FAILED"
    print(f"\n{verdict} in {time.monotonic() - STARTED:.1f} s", flush=True)
    return 1 if failed else 0
