"""The RESP packer and reader on their own: bytes in, replies out, no Redis."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.connection import Connection

from celery_unique.executors.wire import INCOMPLETE, Packer, Reader


def read_all(data: bytes, chunk: int | None = None, **kwargs: Any) -> list[Any]:
    """Every reply in ``data``, fed whole or ``chunk`` bytes at a time."""
    reader = Reader(**kwargs)
    replies = []
    step = chunk or len(data)
    for start in range(0, len(data), step):
        reader.feed(data[start : start + step])
        while (reply := reader.get()) is not INCOMPLETE:
            replies.append(reply)
    return replies


# Replies as Redis sends them, and what redis-py returns for each (decode_responses=False).
REPLIES: list[tuple[bytes, Any]] = [
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),  # RESP2 nil (GET of a missing key)
    (b"*-1\r\n", None),  # RESP2 nil array
    (b"_\r\n", None),  # RESP3 null
    (b"+OK\r\n", b"OK"),
    (b"*3\r\n:1\r\n:99\r\n:0\r\n", [1, 99, 0]),  # what token_bucket.lua answers
    (b"*4\r\n:1\r\n$2\r\nme\r\n:5000\r\n:7\r\n", [1, b"me", 5000, 7]),  # acquire.lua
    (b"*3\r\n:0\r\n$-1\r\n:-2\r\n", [0, None, -2]),  # nil inside an array
    (b"*0\r\n", []),
    (b"*2\r\n*2\r\n:1\r\n:2\r\n*1\r\n$1\r\nx\r\n", [[1, 2], [b"x"]]),
    (b"%2\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n_\r\n", {b"a": 1, b"b": None}),
    (b"~2\r\n:1\r\n:2\r\n", [1, 2]),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",1.5\r\n", 1.5),
    (b"(12345678901234567890\r\n", 12345678901234567890),
    (b"=7\r\ntxt:abc\r\n", b"abc"),
    (b"|1\r\n+ttl\r\n:3\r\n:5\r\n", 5),  # attributes are dropped
]


@pytest.mark.parametrize(("data", "expected"), REPLIES, ids=[repr(d) for d, _ in REPLIES])
def test_each_reply_shape(data: bytes, expected: Any) -> None:
    assert read_all(data) == [expected]


def test_replies_split_at_every_byte_read_the_same() -> None:
    stream = b"".join(data for data, _ in REPLIES)
    expected = [reply for _, reply in REPLIES]
    for chunk in (1, 2, 3, 7, 64):
        assert read_all(stream, chunk) == expected


def test_a_reply_is_incomplete_until_its_last_byte() -> None:
    reader = Reader()
    data = b"*3\r\n:1\r\n$3\r\nabc\r\n:0\r\n"
    for i in range(len(data) - 1):
        reader.feed(data[i : i + 1])
        assert reader.get() is INCOMPLETE
    reader.feed(data[-1:])
    assert reader.get() == [1, b"abc", 0]
    assert reader.get() is INCOMPLETE


def test_error_replies_are_redis_py_exceptions_in_place() -> None:
    replies = read_all(
        b":1\r\n"
        b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        b"!21\r\nSYNTAX invalid syntax\r\n"
        b"*2\r\n:1\r\n-ERR inner\r\n"
        b":2\r\n"
    )
    assert replies[0] == 1
    assert isinstance(replies[1], redis.exceptions.NoScriptError)
    assert type(replies[2]) is redis.ResponseError
    assert "WRONGTYPE" in str(replies[2])
    assert isinstance(replies[3], redis.ResponseError)
    assert "invalid syntax" in str(replies[3])
    assert isinstance(replies[4][1], redis.ResponseError)
    assert replies[5] == 2


def test_error_classes_follow_redis_py() -> None:
    (loading,) = read_all(b"-LOADING Redis is loading the dataset in memory\r\n")
    assert isinstance(loading, redis.exceptions.BusyLoadingError)  # a ConnectionError


def test_a_push_is_a_protocol_error_since_pushes_belong_to_redis_py() -> None:
    # RESP3 connections, the only ones with pushes, are read through redis-py, whose push
    # handler must see them; one here would mean the stream is not what it should be.
    reader = Reader()
    reader.feed(b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n:0\r\n:5\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        reader.get()


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        (b"-NOSCRIPT No matching script.\r\n", redis.exceptions.NoScriptError),
        (b"-OOM command not allowed\r\n", redis.exceptions.OutOfMemoryError),
        (b"-NOPERM this user has no permissions\r\n", redis.exceptions.NoPermissionError),
        (b"-READONLY You can't write against a read only replica.\r\n",
         redis.exceptions.ReadOnlyError),
        (b"-MASTERDOWN Link with MASTER is down\r\n", redis.exceptions.MasterDownError),
        (b"-ERR max number of clients reached\r\n", redis.exceptions.ConnectionError),
        (b"-WRONGTYPE Operation against a key\r\n", redis.exceptions.ResponseError),
    ],
)  # fmt: skip
def test_error_replies_become_the_public_redis_py_classes(reply: bytes, cls: type) -> None:
    (error,) = read_all(reply)
    assert type(error) is cls


def test_decode_gives_str_where_redis_py_would() -> None:
    data = b"$3\r\nabc\r\n+OK\r\n*2\r\n:1\r\n$2\r\n\xc3\xa9\r\n:7\r\n"
    assert read_all(data, decode=bytes.decode) == ["abc", "OK", [1, "é"], 7]


def test_garbage_is_a_protocol_error() -> None:
    reader = Reader()
    reader.feed(b"?what\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        reader.get()


# -- packing ----------------------------------------------------------------------------------


def redis_py(*args: str | int) -> bytes:
    """How redis-py itself packs the command."""
    packed: list[bytes] = Connection().pack_command(*args)  # type: ignore[no-untyped-call]
    return b"".join(packed)


def test_commands_pack_byte_for_byte_like_redis_py() -> None:
    packer = Packer()
    for args in [("GET", "cu:lock:{job}"), ("SCRIPT", "LOAD", "return 1"), ("PING",)]:
        assert packer.command(args) == redis_py(*args)


def test_evalsha_packs_like_redis_py_with_cached_parts() -> None:
    packer = Packer()
    sha = "a" * 40
    calls = [
        (("k1",), (1, 0, 1, 1_000_000, 1)),
        (("k2",), (1, 0, 1, 1_000_000, 1)),  # same arguments, another key
        (("k1", "k2"), (1, 0, 1, 1_000_000, 1, 5, 60_000_000, 5)),
        (("lock", "fence"), ("tok-é", 30_000)),  # non-ASCII: length in bytes
        (("k1",), (-3, "x")),
    ]
    for _ in range(2):  # the second pass comes from the caches
        for keys, args in calls:
            packed = packer.evalsha(sha, keys, args)
            assert packed == redis_py("EVALSHA", sha, len(keys), *keys, *args)


def test_the_argument_cache_stays_bounded() -> None:
    packer = Packer()
    for i in range(5000):
        assert packer.evalsha("s", ("k",), (f"token{i}", 1)).endswith(
            b"$%d\r\ntoken%d\r\n$1\r\n1\r\n" % (len(f"token{i}"), i)
        )
    assert packer.cached <= 512


def test_the_client_encoding_is_used() -> None:
    assert Packer("latin-1").command(("GET", "é")) == b"*2\r\n$3\r\nGET\r\n$1\r\n\xe9\r\n"


def test_values_redis_would_misread_are_refused() -> None:
    with pytest.raises(TypeError):
        Packer().command(("SET", "k", True))
    with pytest.raises(TypeError):
        Packer().command(("SET", "k", 1.5))  # type: ignore[arg-type]
