"""BEGIN armed on asyncpg's transport: what goes out at the next write, and what comes back out.

A logic test (the wire behaviour is proven on real servers in
tests/engine/test_begin_first_flight_asyncpg.py): `Flight` puts BEGIN's Parse, Bind and Execute
in front of a Parse or a named statement's Bind, BEGIN's text at the head of a simple Query,
nothing in front of a Terminate, and aborts the connection on anything else; with the xid
question in the same write, BEGIN first. The replies of BEGIN (and the question) are taken out
of the stream whatever way the loop cuts it, and a BEGIN refused is the error asyncpg reads.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from dropsafe._drivers import asyncpg_begin
from dropsafe._drivers.asyncpg_flight import (
    BEGIN_REPLIES,
    QUESTION_REPLIES,
    Flight,
    InFlightReplies,
    unnamed_messages,
)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


BEGIN = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY;"
NAMED_BIND = _message(b"B", b"\x00__asyncpg_stmt_1__\x00\x00\x00\x00\x00\x00\x00")
EXECUTE_SYNC = _message(b"E", b"\x00\x00\x00\x00\x00") + _message(b"S", b"")
UNNAMED_BIND = _message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
PARSE = _message(b"P", b"__asyncpg_stmt_2__\x00SELECT 1\x00\x00\x00")
QUERY = _message(b"Q", b"ROLLBACK;\x00")
TERMINATE = _message(b"X", b"")
CLOSE = _message(b"C", b"S__asyncpg_stmt_3__\x00") + _message(b"S", b"")
QUESTION = unnamed_messages("SELECT 1, 2")


class Transport:
    """What a flight needs of asyncio's transport: write, writelines, abort, a ``__dict__``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def writelines(self, buffers: Any) -> None:
        self.sent.append(b"".join(bytes(buffer) for buffer in buffers))

    def abort(self) -> None:
        self.aborted = True


def _armed(*, in_transaction: bool = False) -> tuple[Transport, Flight, list[InFlightReplies]]:
    transport = Transport()
    armed: list[InFlightReplies] = []
    flight = Flight.install(transport, armed.append, lambda: in_transaction)
    assert flight is not None
    flight.begin = BEGIN
    return transport, flight, armed


@pytest.mark.parametrize(
    "first", [PARSE, NAMED_BIND + EXECUTE_SYNC, CLOSE], ids=["parse", "bind", "close"]
)
@pytest.mark.parametrize("lines", [False, True], ids=["write", "writelines"])
def test_begin_goes_in_front_of_a_parse_or_a_named_bind(first: bytes, *, lines: bool) -> None:
    transport, _, armed = _armed()
    if lines:
        transport.writelines([first[:3], first[3:]])  # the hook replaced it: goes to the flight
    else:
        transport.write(first)
    assert transport.sent == [unnamed_messages(BEGIN) + first]
    assert b"S\x00\x00\x00\x04" not in unnamed_messages(BEGIN)  # no Sync between
    assert len(armed) == 1
    assert Flight.on(transport) is None  # removed: nothing more to send
    transport.write(first)
    assert transport.sent[-1] == first


def test_begin_at_the_head_of_a_query() -> None:
    transport, _, armed = _armed()
    transport.write(QUERY)
    assert transport.sent == [_message(b"Q", BEGIN.encode() + b" ROLLBACK;\x00")]
    assert len(armed) == 1
    passed = armed[0].take(_message(b"C", b"BEGIN\x00") + _message(b"C", b"ROLLBACK\x00"))
    assert passed == _message(b"C", b"ROLLBACK\x00")


def test_nothing_in_front_of_a_terminate() -> None:
    transport, _, armed = _armed()
    transport.write(TERMINATE)
    assert transport.sent == [TERMINATE]
    assert armed == []
    assert not transport.aborted


def test_anything_else_aborts_the_connection() -> None:
    """An unnamed statement's Bind: BEGIN's Parse would replace its statement; nothing goes."""
    transport, _, armed = _armed()
    transport.write(UNNAMED_BIND + EXECUTE_SYNC)
    assert transport.sent == []
    assert transport.aborted
    assert armed == []


def test_begin_then_the_question_in_one_write() -> None:
    transport, flight, armed = _armed()
    flight.question = QUESTION
    transport.write(PARSE)  # a first use: BEGIN rides the Parse, the question waits for the Bind
    assert armed[0].take(BEGIN_OK) == b""  # asyncpg awaits its Parse's replies: BEGIN's first
    transport.write(NAMED_BIND + EXECUTE_SYNC)
    flight.question = None
    flight.settle()
    assert transport.sent == [unnamed_messages(BEGIN) + PARSE, QUESTION + NAMED_BIND + EXECUTE_SYNC]
    # BEGIN's replies still due (a Parse and a Bind written in one step): no question then,
    # the watch taking one sequence at a time.
    transport, flight, armed = _armed()
    flight.question = QUESTION
    transport.write(PARSE)
    transport.write(NAMED_BIND + EXECUTE_SYNC)
    assert transport.sent == [unnamed_messages(BEGIN) + PARSE, NAMED_BIND + EXECUTE_SYNC]
    assert len(armed) == 1
    transport, flight, armed = _armed()
    flight.question = QUESTION
    transport.write(NAMED_BIND + EXECUTE_SYNC)
    assert transport.sent == [unnamed_messages(BEGIN) + QUESTION + NAMED_BIND + EXECUTE_SYNC]
    assert len(armed) == 1
    assert flight.replies is armed[0]


def test_the_question_alone_needs_a_transaction() -> None:
    transport = Transport()
    armed: list[InFlightReplies] = []
    flight = Flight.install(transport, armed.append, lambda: False)
    assert flight is not None
    flight.question = QUESTION
    transport.write(NAMED_BIND + EXECUTE_SYNC)
    assert transport.sent == [NAMED_BIND + EXECUTE_SYNC]  # autocommit: nothing to read


BEGIN_OK = _message(b"1", b"") + _message(b"2", b"") + _message(b"C", b"BEGIN\x00")
ROW = _message(b"D", struct.pack("!h", 1) + struct.pack("!i", 3) + b"742")
QUESTION_OK = _message(b"1", b"") + _message(b"2", b"") + ROW + _message(b"C", b"SELECT 1\x00")
THEIRS = _message(b"2", b"") + _message(b"C", b"SELECT 1\x00") + _message(b"Z", b"T")
ERROR = _message(b"E", b'SERROR\x00C42601\x00Msyntax error at or near "BOGUS"\x00\x00')
READY_IDLE = _message(b"Z", b"I")


@pytest.mark.parametrize(
    ("expected", "stream", "mine", "values"),
    [
        (BEGIN_REPLIES, BEGIN_OK + THEIRS, THEIRS, None),
        (BEGIN_REPLIES + QUESTION_REPLIES, BEGIN_OK + QUESTION_OK + THEIRS, THEIRS, ("742",)),
        (BEGIN_REPLIES, ERROR + READY_IDLE, ERROR + READY_IDLE, None),
        (BEGIN_REPLIES + QUESTION_REPLIES, ERROR + READY_IDLE, ERROR + READY_IDLE, None),
    ],
    ids=["begin", "begin and question", "begin refused", "begin refused, question asked"],
)
def test_every_split_hands_asyncpg_its_own_bytes(
    expected: bytes, stream: bytes, mine: bytes, values: tuple[str, ...] | None
) -> None:
    for cut in range(len(stream) + 1):
        replies = InFlightReplies(expected)
        passed = replies.take(stream[:cut])
        passed += replies.take(stream[cut:]) if not replies.done else stream[cut:]
        assert passed == mine, cut
        assert replies.done
        assert replies.values == values
        assert replies.failed == (values is None and stream.startswith(b"E"))


def test_the_adapters_slots_are_read_through_dropsafes_subclass() -> None:
    """SQLAlchemy 2.0's adapter keeps a ``_started`` flag in its slots; dropsafe's subclass of it
    (`asyncpg_begin`) has none of its own. Read from the class alone, the flag was missed: the
    ROLLBACK not awaited left ``_started`` True, and on SQLAlchemy 2.0.59 every transaction
    after a connection's first ran with no BEGIN at all (found by hand: the second statement of
    a transaction saw no xid). The slots are read over the bases."""
    from dropsafe._drivers import asyncpg_rollback

    class Adapter:
        __slots__ = ("_connection", "_started", "_transaction")

    class Subclass(Adapter):
        __slots__ = ()

    assert "_started" in asyncpg_rollback._slots(Subclass())
    assert "_started" in asyncpg_begin._slots(Subclass)
