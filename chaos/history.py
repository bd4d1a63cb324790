"""Histories: one JSON object per line, written by every process of a run, merged at the end.

Times are ``time.monotonic()`` seconds. On Linux that is CLOCK_MONOTONIC, one clock for the
whole system (not per process), so the times written by different processes compare as they
are; the suite runs on Linux only for that reason (and for SIGSTOP).

Fields (absent when they do not apply):

``p`` process, ``op`` what it did, ``kind`` (``lock``, ``semaphore``, ``rate``, ``task``,
``fault``, ``process``, ``keys``, ``run``), ``name`` the lock, semaphore, bucket or task key,
``t0`` invocation, ``t1`` completion, ``result``, ``error`` (the exception's class name),
``lib`` (whether it is a ``CeleryUniqueError``), ``fence``, ``token``; and per op: ``ttl``,
``timeout``, ``blocking``, ``renew``, ``limit``, ``rate`` (``[count, per, burst]``), ``lost``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["History", "Record", "merge", "now", "numbered", "read"]

Record = dict[str, Any]


def now() -> float:
    """The history clock: CLOCK_MONOTONIC, shared by every process on Linux."""
    return time.monotonic()


class History:
    """One process's history file; writes are whole lines, safe from several threads."""

    def __init__(self, path: Path, process: str) -> None:
        self.path = path
        self.process = process
        self._file: TextIO = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, op: str, kind: str, name: str = "", **fields: Any) -> Record:
        """Append one record (``p`` is this process); returns it."""
        record: Record = {"p": self.process, "op": op, "kind": kind, "name": name, **fields}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            # Flushed at once: a process killed by the nemesis must leave what it did behind.
            self._file.write(line)
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _parse(line: str) -> Record | None:
    try:
        record: Record = json.loads(line)
    except json.JSONDecodeError:
        return None  # torn: its writer was killed mid-line
    return record


def read(path: Path) -> Iterator[Record]:
    """The records of one file, in file order; a torn last line (a killed writer) is skipped."""
    with open(path, encoding="utf-8") as source:
        for line in source:
            record = _parse(line)
            if record is not None:
                yield record


def numbered(path: Path) -> list[tuple[int, Record]]:
    """The records of a merged history with their line numbers (from 1), as reports cite them."""
    with open(path, encoding="utf-8") as source:
        found = []
        for number, line in enumerate(source, 1):
            record = _parse(line)
            if record is not None:
                found.append((number, record))
        return found


def merge(parts: Iterable[Path], target: Path, header: Record) -> int:
    """Write ``header`` and every record of ``parts`` into ``target``, by invocation time;
    returns how many records. Line numbers in reports refer to this file."""
    records = [record for part in parts for record in read(part)]
    records.sort(key=lambda record: (record.get("t0", 0.0), record.get("t1") or 0.0))
    with open(target, "w", encoding="utf-8") as out:
        out.write(json.dumps(header, separators=(",", ":")) + "\n")
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    return len(records)
