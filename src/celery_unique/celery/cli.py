"""``celery -A proj unique ...``: look at and clear celery-unique's keys from the shell.

Installed through Celery's ``celery.commands`` entry point. It reads the app's own
``unique_*`` settings (the lock store and key prefix), uses SCAN (never KEYS), works on a
Redis Cluster (every primary), and never prints an argument value.

::

    celery -A proj unique list [--task NAME] [--json]   # held keys: task, holder, state, ttl
    celery -A proj unique clear [--task NAME] --yes     # delete them; says how many
    celery -A proj unique clear --holder ID [--json]    # free the key(s) one task id holds
    celery -A proj unique limits [--json]               # rate buckets and concurrency in use
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..backends import RedisBackend
from ..errors import CeleryUniqueError
from .admin import free_holder, held_locks, limits_in_use, unlink_locks
from .store import backend_for

__all__ = ["LOCK_COLUMNS", "unique"]

#: The columns of a held lock, as ``list`` and ``clear --holder`` print them.
LOCK_COLUMNS = ["task", "holder", "state", "ttl", "lock"]


def _backend(ctx: click.Context) -> RedisBackend:
    app = ctx.obj.app  # Celery's CLIContext: the app of -A
    prefix = ctx.meta.get("celery_unique.prefix")
    try:
        backend = backend_for(app)
    except CeleryUniqueError as exc:
        raise click.ClickException(str(exc)) from exc
    if prefix is not None and prefix != backend.key_prefix:
        return RedisBackend(backend.client, key_prefix=prefix)
    return backend


def _fail(exc: CeleryUniqueError) -> click.ClickException:
    return click.ClickException(str(exc))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [columns, *([_cell(row.get(c)) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _show(rows: list[dict[str, Any]], columns: list[str], as_json: bool, empty: str) -> None:
    if as_json:
        click.echo(json.dumps(rows))
    elif rows:
        click.echo(_table(rows, columns))
    else:
        click.echo(empty)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


@click.group(name="unique")
@click.option(
    "--prefix",
    default=None,
    help="Key prefix to look under (default: the app's unique_key_prefix, else 'cu:').",
)
@click.pass_context
def unique(ctx: click.Context, prefix: str | None) -> None:
    """Look at and clear celery-unique's keys: unique-task locks, rate limits, concurrency."""
    ctx.meta["celery_unique.prefix"] = prefix


@unique.command(name="list")
@click.option("--task", "task_name", default=None, help="Only the locks of this task.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@click.pass_context
def list_locks(ctx: click.Context, task_name: str | None, as_json: bool) -> None:
    """The locks held now: task, holder id, queued or running, seconds left."""
    try:
        rows = [held.as_dict() for held in held_locks(_backend(ctx), task_name)]
    except CeleryUniqueError as exc:
        raise _fail(exc) from exc
    _show(rows, LOCK_COLUMNS, as_json, "no locks held")


@unique.command()
@click.option("--task", "task_name", default=None, help="Only the locks of this task.")
@click.option(
    "--holder",
    default=None,
    metavar="ID",
    help="Only the lock(s) this task id holds (needs no --yes): frees its key, owner-checked.",
)
@click.option("--json", "as_json", is_flag=True, help="With --holder: the freed locks, as list.")
@click.option("--yes", is_flag=True, help="Really delete them.")
@click.pass_context
def clear(
    ctx: click.Context, task_name: str | None, holder: str | None, as_json: bool, yes: bool
) -> None:
    """Delete unique-task locks (all, one task's, or the one a task id holds): queued
    instances then run as new (``--holder`` does not revoke it: revoke it too to stop it)."""
    if holder is not None:
        try:
            freed = [held.as_dict() for held in free_holder(_backend(ctx), holder, task_name)]
        except CeleryUniqueError as exc:
            raise _fail(exc) from exc
        if freed and not as_json:
            click.echo(f"freed {len(freed)} lock{'' if len(freed) == 1 else 's'} held by {holder}:")
        _show(freed, LOCK_COLUMNS, as_json, f"no lock held by {holder}")
        return
    if as_json:
        raise click.UsageError("--json goes with --holder (clear alone says how many it deleted)")
    what = f"the locks of task {task_name!r}" if task_name else "every unique-task lock"
    if not yes:
        raise click.UsageError(f"this would delete {what}; add --yes to do it")
    try:
        deleted = unlink_locks(_backend(ctx), task_name)
    except CeleryUniqueError as exc:
        raise _fail(exc) from exc
    click.echo(f"deleted {deleted} lock{'' if deleted == 1 else 's'}")


@unique.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@click.pass_context
def limits(ctx: click.Context, as_json: bool) -> None:
    """The rate-limit buckets and concurrency slots in use now."""
    try:
        rows = [limit.as_dict() for limit in limits_in_use(_backend(ctx))]
    except CeleryUniqueError as exc:
        raise _fail(exc) from exc
    _show(rows, ["kind", "key", "remaining", "count", "limit"], as_json, "no limits in use")
