"""The Lua scripts, loaded once from package data, each with its SHA1 for EVALSHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["ACQUIRE", "EXTEND", "RELEASE", "TOKEN_BUCKET", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script: its name, source and the SHA1 Redis knows it by."""

    name: str
    source: str = field(repr=False)
    sha: str = field(repr=False)

    @classmethod
    def load(cls, name: str) -> Script:
        source = _read(f"{name}.lua")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


def _read(filename: str) -> str:
    # The wheel ships lua/ inside the package. A source checkout (editable install, running
    # from the repo) has it at the top level instead, two levels above this file's package.
    packaged = resources.files(__package__ or "celery_unique") / "lua" / filename
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "lua" / filename).read_text(encoding="utf-8")


ACQUIRE = Script.load("acquire")
RELEASE = Script.load("release")
EXTEND = Script.load("extend")
TOKEN_BUCKET = Script.load("token_bucket")
