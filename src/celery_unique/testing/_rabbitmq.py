"""A throwaway RabbitMQ broker on free loopback ports, for tests of Celery on AMQP.

::

    from celery_unique.testing import running_rabbitmq

    with running_rabbitmq() as url:       # amqp://guest:guest@127.0.0.1:PORT//
        app.conf.broker_url = url

Debian's ``rabbitmq-server`` package (``apt-get install rabbitmq-server``) is run as is, with
everything it would share moved into a temporary folder: its node name, data, logs, config
file, enabled-plugins file and Erlang cookie. It listens on 127.0.0.1 only, on ports picked
here (AMQP, Erlang distribution) and talks to an ``epmd`` of its own on a port of its own,
started here first; no plugin is enabled. A system service the package may have started is
never relied on, nor touched. At the end the processes started here are stopped by their pid
(SIGTERM, then SIGKILL after a deadline) and the folder is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ._server import HOST, ServerStartError, free_port

__all__ = ["find_rabbitmq_server", "running_rabbitmq"]

#: Where Debian's package (and RabbitMQ's generic unix build, once on PATH) keeps the script
#: that runs the node in the foreground; /usr/sbin's wrapper would switch to the rabbitmq user.
_SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin",)


def find_rabbitmq_server() -> str:
    """The path of the ``rabbitmq-server`` script that runs a node in the foreground.

    Raises ``FileNotFoundError`` saying what to install.
    """
    for folder in _SCRIPT_DIRS:
        script = Path(folder) / "rabbitmq-server"
        if script.is_file() and os.access(script, os.X_OK):
            return str(script)
    found = shutil.which("rabbitmq-server")
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that logs to /var/log; skip it.
    if found is not None and not found.startswith("/usr/sbin/"):
        return found
    raise FileNotFoundError("no rabbitmq-server found: `apt-get install rabbitmq-server`")


def _epmd() -> str:
    found = shutil.which("epmd")
    if found is None:
        raise FileNotFoundError("no epmd on PATH (Erlang's): `apt-get install rabbitmq-server`")
    return found


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the process group we started (the script and the Erlang VM it runs), then
    SIGKILL if it has not exited within ``timeout``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _accepts_amqp(url: str) -> bool:
    # Imported here: the test helpers import nothing of Celery's until a broker is asked for.
    from kombu.connection import Connection

    connection: Any = Connection(url, connect_timeout=2)  # type: ignore[no-untyped-call]
    try:
        connection.connect()
        return True
    finally:
        connection.release()


@contextmanager
def running_rabbitmq(*, startup_timeout: float = 60.0, stop_timeout: float = 20.0) -> Iterator[str]:
    """Run a private RabbitMQ node for the block; yields its ``amqp://`` URL.

    It waits until the broker accepts an AMQP login (``guest``, allowed from loopback), for
    ``startup_timeout`` seconds at most (``ServerStartError`` with the log's tail after), and
    stops the node and its ``epmd`` when the block ends. Needs ``rabbitmq-server`` (see
    :func:`find_rabbitmq_server`) and Erlang's ``epmd``.
    """
    script, epmd = find_rabbitmq_server(), _epmd()
    with ExitStack() as stack:
        folder = Path(tempfile.mkdtemp(prefix="celery-unique-rabbitmq-"))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        amqp_port, dist_port, epmd_port = free_port(), free_port(), free_port()
        name = f"cu{uuid.uuid4().hex[:10]}@localhost"
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{amqp_port}\n"
            "loopback_users.guest = true\n"
            # A nearly full test disk must not block publishers (the default is 50 MB free).
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (folder / "enabled_plugins").write_text("[].\n")  # no management plugin, no other
        (folder / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        env = {
            **os.environ,
            "HOME": str(folder),  # the Erlang cookie is created there
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": HOST,
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),  # .conf is added
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            # The node must not start (and leave behind) an epmd of its own: ours runs.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false",
        }
        env.pop("RABBITMQ_ALLOW_INPUT", None)
        log = stack.enter_context(open(folder / "output.log", "wb"))

        epmd_process = subprocess.Popen(
            [epmd, "-port", str(epmd_port), "-address", HOST],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        stack.callback(_stop, epmd_process, stop_timeout)
        node = subprocess.Popen(
            [script],
            env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        stack.callback(_stop, node, stop_timeout)

        url = f"amqp://guest:guest@{HOST}:{amqp_port}//"
        deadline = time.monotonic() + startup_timeout
        last: BaseException | None = None
        while True:
            try:
                if _accepts_amqp(url):
                    break
            except Exception as exc:  # refused, reset, or not booted far enough to log in
                last = exc
            if node.poll() is not None or time.monotonic() >= deadline:
                log.flush()
                text = (folder / "output.log").read_text(errors="replace")
                for file in sorted((folder / "log").glob("*.log")):
                    text += f"\n--- {file.name} ---\n" + file.read_text(errors="replace")
                why = "exited" if node.poll() is not None else f"no AMQP in {startup_timeout} s"
                raise ServerStartError(f"rabbitmq-server {why} (last error: {last!r})", text)
            time.sleep(0.25)
        yield url
