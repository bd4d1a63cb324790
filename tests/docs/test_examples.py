"""Every ```python block of the docs (and of the README) runs against a real Redis, so the
docs cannot drift from the code (:mod:`tests.docs.examples` has the directives a block may
carry).

Each page runs in a process of its own: its examples make Celery apps current, connect
signal handlers and may start a worker, none of which may leak into the other tests. The
examples' ``redis://localhost:6379/0`` and ``/1`` become databases 14 and 15 of the session's
server (the ``redis_url`` fixture), which no other test uses, so the tests' own worker never
takes the examples' messages; both are emptied before each page, so pages never see each
other's locks, limits or queued tasks.
"""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.docs.examples import ROOT, Block, blocks, pages, substitute

DOCS_DBS = (14, 15)

BLOCKS = [block for page in pages() for block in blocks(page)]
RUN = sorted({block.page for block in BLOCKS if block.skip_reason() is None})
NOT_RUN = [block for block in BLOCKS if block.skip_reason() is not None]


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


@pytest.mark.parametrize("page", RUN)
def test_page(page: str, redis_url: str) -> None:
    urls = [with_db(redis_url, db) for db in DOCS_DBS]
    for url in urls:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs.examples", page, *urls],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{page}: an example failed\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("block", NOT_RUN, ids=[block.id for block in NOT_RUN])
def test_not_run(block: Block) -> None:
    reason = block.skip_reason()
    assert reason is not None
    pytest.skip(reason)


def test_the_docs_have_examples_and_few_are_not_run() -> None:
    assert len(RUN) >= 5
    # Shown only where they need what a test machine lacks (a Sentinel, a Cluster, TLS) or
    # what is still coming: keep it so.
    assert len(NOT_RUN) <= len(BLOCKS) // 4, [block.id for block in NOT_RUN]


def test_example_urls_become_the_test_servers() -> None:
    code = 'a("redis://localhost:6379/0"); b("redis://localhost:6379/1"); c("redis://localhost")'
    assert substitute(code, "X", "Y") == 'a("X"); b("Y"); c("redis://localhost")'
    assert substitute("redis://localhost:6379", "X", "Y") == "X"  # no db: db 0
    with pytest.raises(ValueError, match="databases 0 and 1"):
        substitute('"redis://localhost:6379/2"', "X", "Y")
