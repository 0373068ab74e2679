"""The taking of the xid question's replies out of asyncpg's stream, split at every byte.

A logic test (the wire behaviour is proven on real servers in test_asyncpg_xid_in_flight*.py):
whatever way the loop cuts the stream into reads, asyncpg is handed exactly the bytes that are
not the question's four replies, in order, and the DataRow is decoded whole.
"""

from __future__ import annotations

import struct

import pytest

from dropsafe._drivers.asyncpg_flight import InFlightReplies, _opens_named_bind, question_messages
from dropsafe._drivers.base import XidQuestion


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


def _data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return _message(b"D", body)


OURS = (
    _message(b"1", b"")
    + _message(b"2", b"")
    + _data_row(b"742", b"on", None)
    + _message(b"C", b"SELECT 1\x00")
)
NOTICE = _message(b"N", b"SWARNING\x00Mhello\x00\x00")
THEIRS = _message(b"2", b"") + _data_row(b"1", b"b") + _message(b"C", b"UPDATE 1\x00")
READY = _message(b"Z", b"T")
ERROR = _message(b"E", b"SERROR\x00C25P02\x00Mcurrent transaction is aborted\x00\x00")


def _feed(stream: bytes, cuts: list[int]) -> tuple[bytes, InFlightReplies]:
    replies = InFlightReplies()
    passed = b""
    start = 0
    for end in [*cuts, len(stream)]:
        chunk = stream[start:end]
        start = end
        if replies.malformed:
            continue  # the watch ends the connection: nothing more is read
        passed += replies.take(chunk) if not replies.done else chunk
    return passed, replies


@pytest.mark.parametrize(
    ("stream", "expected", "values"),
    [
        (OURS + THEIRS + READY, THEIRS + READY, ("742", "on", None)),
        (NOTICE + OURS[:5] + NOTICE + OURS[5:] + THEIRS + READY, NOTICE * 2 + THEIRS + READY, None),
        (ERROR + READY, ERROR + READY, None),
        (OURS[:10] + ERROR + READY, ERROR + READY, None),
    ],
    ids=["replies", "notices between", "error first", "error after two"],
)
def test_every_split_hands_asyncpg_its_own_bytes(
    stream: bytes, expected: bytes, values: tuple[str | None, ...] | None
) -> None:
    for cut in range(len(stream) + 1):
        passed, replies = _feed(stream, [cut])
        assert passed == expected, cut
        assert replies.done
        if values is not None:
            assert replies.values == values
            assert not replies.failed
    # And a byte at a time.
    passed, replies = _feed(stream, list(range(1, len(stream))))
    assert passed == expected


def test_the_question_rides_only_in_front_of_a_named_statements_bind() -> None:
    named = _message(b"B", b"\x00__asyncpg_stmt_1__\x00\x00\x00\x00\x00\x00\x00")
    unnamed = _message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    assert _opens_named_bind(memoryview(named))
    assert not _opens_named_bind(unnamed)
    assert not _opens_named_bind(_message(b"Q", b"BEGIN\x00"))
    messages = question_messages(XidQuestion(before="1, 2", after="3, 4"))
    assert messages.startswith(b"P")
    assert b"SELECT 1, 2\x00" in messages


# What a pooler's garbage or a corrupted link may put where a reply is due (PgBouncer 1.18 once
# sent 16 KB of its heap, starting with a zero byte, then a FATAL). asyncpg loops forever in C
# on a message whose type byte is zero: none of these may reach it.
GARBAGE = {
    "type zero": b"\x00\x00\x00\x00\x01\x00\x00\x00A\x00\x00\x00\x00",
    "length below four": _message(b"1", b"")[:1] + struct.pack("!i", 2) + b"\x00" * 8,
    "a reply never due here": _message(b"Z", b"T"),
    "ParseComplete with a body": _message(b"1", b"\x00" * 4),
    "a DataRow's length from garbage": b"D" + struct.pack("!i", 1 << 24) + b"\x00" * 8,
    "an error's length from garbage": b"E" + struct.pack("!i", 1 << 24) + b"\x00" * 8,
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("at", [0, 1, 2, 3], ids=["for Parse", "for Bind", "for row", "for tag"])
def test_a_broken_stream_is_never_handed_to_asyncpg(garbage: str, at: int) -> None:
    """In place of any of the four replies, at any split: asyncpg gets the whole messages
    before it (a notice), none of the garbage, and the taking says the stream is broken."""
    boundaries = [0, 5, 10, 10 + len(_data_row(b"742", b"on", None)), len(OURS)]
    stream = NOTICE + OURS[: boundaries[at]] + GARBAGE[garbage] + THEIRS + READY
    for cut in range(len(stream) + 1):
        passed, replies = _feed(stream, [cut])
        assert passed == NOTICE, cut
        assert replies.done
        assert replies.malformed
        assert replies.failed
    passed, replies = _feed(stream, list(range(1, len(stream))))
    assert passed == NOTICE
    assert replies.malformed


def test_an_error_in_place_of_a_reply_is_not_malformed() -> None:
    passed, replies = _feed(OURS[:5] + ERROR + READY, [])
    assert passed == ERROR + READY
    assert replies.failed
    assert not replies.malformed
