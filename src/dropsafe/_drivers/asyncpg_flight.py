"""asyncpg: the xid read, and BEGIN, in a statement's own flight (issue 27 item 3, issue 28).

(BEGIN: `Flight`'s docstring and `dropsafe._drivers.asyncpg_begin`; what follows is the xid
read's, and holds for BEGIN's Parse, Bind and Execute alike, their replies ParseComplete,
BindComplete and CommandComplete.)

SQLAlchemy's adapter sends each statement as asyncpg's prepared statement, named: Parse and
Describe once (ended by Flush, no Sync), then for each execution one write of Bind, Execute and
Sync (``protocol/coreproto.pyx``: ``_send_bind_message``). asyncpg takes one statement per
operation and has no way to add another, so dropsafe adds it on the wire: while the statement
is sent, the transport's ``write`` puts three messages in front of the first Bind of a named
statement, in the same write: Parse, Bind and Execute of the question's SELECT on the unnamed
statement and portal. The server runs them in order, in the app's transaction, before the app's
statement, and answers them first: ParseComplete, BindComplete, DataRow, CommandComplete. The
watch between the transport and asyncpg's protocol (`dropsafe._drivers.asyncpg`) takes those
four out of the stream, so asyncpg reads byte for byte what it reads without the question.

Why nothing the app sees changes: the app's own messages are sent unchanged; only a named
statement's Bind is prefixed, so the unnamed statement dropsafe parses replaces nothing asyncpg
will bind (asyncpg parses its unnamed statements right before binding them, in one operation);
a reply that is not one of the four expected (an ErrorResponse: the transaction was already
aborted, the backend was cancelled or terminated) ends the taking, and asyncpg reads it as the
reply to its own Bind, the one it would have read there (the server skips to Sync either way).

Why a broken stream ends the connection. Anything else where a reply is due (a type no server
sends there, a length no reply has: a pooler's garbage, a corrupted link) is never handed to
asyncpg: its parser loops forever in C on some malformed messages (a message whose type byte is
zero is never finished: ``ReadBuffer.finish_message`` returns early and ``take_message`` hands
it out again), with the event loop stuck and no timeout able to fire. The taking stops there,
``malformed`` says so, and the watch aborts the connection: the statement fails as on a
connection cut, and the pool discards it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from dropsafe._drivers.base import XidQuestion, XidReading

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BEGIN_REPLIES",
    "QUESTION_REPLIES",
    "Flight",
    "InFlightReplies",
    "question_messages",
    "unnamed_messages",
]

_HEADER = 5  # a message's type byte and its length
#: The replies to the question's Parse, Bind and Execute, in order.
QUESTION_REPLIES = b"12DC"
#: The replies to BEGIN's Parse, Bind and Execute (`begin_messages`), in order.
BEGIN_REPLIES = b"12C"
#: The reply to BEGIN put at the head of a simple Query's text (`Flight`): its CommandComplete.
BEGIN_IN_QUERY_REPLIES = b"C"
_DATA_ROW = ord("D")
#: Messages the server may send at any time (ParameterStatus, NotificationResponse,
#: NoticeResponse): asyncpg's, whatever it is doing, so passed on in order.
_ASYNCHRONOUS = frozenset(b"SAN")
#: A Bind's portal and statement names are short; look no further for the statement's.
_BIND_HEAD = 5 + 2 * 256
#: Where one of the four replies is due, the one other reply a server may send: the
#: ErrorResponse that ends them (passed on as asyncpg's own).
_ERROR = ord("E")
#: The longest each may be: ParseComplete and BindComplete have no body, the DataRow holds the
#: question's few short columns, the CommandComplete its tag, the error is the question's (or
#: the goodbye's). Longer, the length was read from garbage.
_LONGEST = {ord("1"): 4, ord("2"): 4, ord("D"): 1 << 16, ord("C"): 1 << 10, _ERROR: 1 << 16}
#: A notice may be as long as the server allows a message (MaxAllocSize).
_LONGEST_ASYNCHRONOUS = (1 << 30) - 1


def question_messages(question: XidQuestion) -> bytes:
    """Return Parse, Bind and Execute of the question's ``before`` read (unnamed, text results)."""
    return unnamed_messages(f"SELECT {question.before}")


def unnamed_messages(text: str) -> bytes:
    """Return Parse, Bind and Execute of ``text`` on the unnamed statement and portal (text)."""
    query = text.encode() + b"\x00"
    parse = b"\x00" + query + b"\x00\x00"  # unnamed statement, query, no parameter types
    bind = b"\x00\x00" + b"\x00\x00" * 3  # unnamed portal and statement, no formats or values
    execute = b"\x00" + b"\x00\x00\x00\x00"  # unnamed portal, every row
    return b"".join(
        kind + struct.pack("!i", 4 + len(body)) + body
        for kind, body in ((b"P", parse), (b"B", bind), (b"E", execute))
    )


def _opens_named_bind(data: Any) -> bool:  # noqa: ANN401 - bytes, memoryview or bytearray
    """Whether ``data`` starts with a Bind of a named statement (asyncpg's execution write)."""
    head = bytes(memoryview(data)[:_BIND_HEAD])
    if head[:1] != b"B":
        return False
    portal_end = head.find(b"\x00", _HEADER)
    # The statement's name follows the portal's terminating zero; an empty one is a zero.
    return portal_end != -1 and head[portal_end + 1 : portal_end + 2] not in (b"", b"\x00")


class InFlightReplies:
    """Takes the replies to dropsafe's question out of what the server sends, the rest passed on."""

    __slots__ = ("_expected", "_held", "_step", "failed", "malformed", "values")

    def __init__(self, expected: bytes = QUESTION_REPLIES) -> None:
        #: The replies due, in order: the question's, or BEGIN's (`BEGIN_REPLIES`), or both.
        self._expected = expected
        self._held = bytearray()
        self._step = 0
        #: The DataRow's columns, as text (None for NULL), once read.
        self.values: tuple[str | None, ...] | None = None
        #: Something else came where a reply to the question was due (or the connection ended).
        self.failed = False
        #: What came is no message a server sends there: the stream is broken, and the
        #: connection must end before asyncpg reads any of it (`take` handed out none of it).
        self.malformed = False

    @property
    def done(self) -> bool:
        return self.failed or self._step == len(self._expected)

    def take(self, data: bytes) -> bytes:
        """Return what of ``data`` is asyncpg's: everything but the replies due, in order."""
        expected = self._expected
        held = self._held
        held += data
        passed = bytearray()
        while not self.done and len(held) >= _HEADER:
            kind = held[0]
            length = int.from_bytes(held[1:_HEADER], "big")
            if not _well_formed(kind, length, expected[self._step]):
                # Handed to asyncpg, it could loop forever: nothing of it is (the module's
                # docstring); what was passed before it was whole messages.
                self.failed = self.malformed = True
                held.clear()
                return bytes(passed)
            end = 1 + length
            if len(held) < end:
                break
            if kind in _ASYNCHRONOUS:
                passed += held[:end]
            elif kind == expected[self._step]:
                if kind == _DATA_ROW:
                    self.values = _columns(bytes(held[_HEADER:end]))
                self._step += 1
            else:
                # An ErrorResponse: the server skips to Sync, and asyncpg reads it as its own.
                self.failed = True
                break
            del held[:end]
        if self.done:
            passed += held
            held.clear()
        return bytes(passed)

    def lost(self) -> None:
        """Note that the connection ended: nothing more comes."""
        self.failed = True
        self._held.clear()


def _well_formed(kind: int, length: int, due: int) -> bool:
    """Whether a message of ``kind`` and ``length`` may come where the reply ``due`` is due."""
    if length < 4:  # noqa: PLR2004 - the length counts itself
        return False
    if kind in _ASYNCHRONOUS:
        return length <= _LONGEST_ASYNCHRONOUS
    return kind in (due, _ERROR) and length <= _LONGEST[kind]


def _columns(body: bytes) -> tuple[str | None, ...]:
    """Decode a DataRow's body: its columns as text (the Bind asked for text)."""
    count = int.from_bytes(body[:2], "big")
    values: list[str | None] = []
    at = 2
    for _ in range(count):
        length = int.from_bytes(body[at : at + 4], "big", signed=True)
        at += 4
        if length < 0:
            values.append(None)
            continue
        values.append(body[at : at + length].decode())
        at += length
    return tuple(values)


#: The first messages BEGIN's Parse, Bind and Execute may go in front of: a Parse (which
#: replaces the unnamed statement after BEGIN's ran), a Close (asyncpg's closing of statements
#: it let go, ended by its Sync).
_BEGIN_IN_FRONT = (b"P", b"C")
#: Where the flight on a transport is kept (asyncio's transports have a ``__dict__``).
_KEY = "_dropsafe_flight"


class Flight:
    """The transport's ``write`` and ``writelines`` while dropsafe has messages to send ahead.

    Two kinds, alone or together: a transaction's BEGIN not sent yet (``begin``: armed at the
    adapter's ``_start_transaction``, `dropsafe._drivers.asyncpg_begin`, and kept until the
    next write, whatever operation makes it), and the xid question (``question``: while one
    statement is sent, ahead of its first Bind of a named statement). ``arm`` is handed each
    replies' taker when they go out, before the server can answer; ``in_transaction`` says, when
    the Bind goes, whether the server has a transaction open (or BEGIN went ahead of it).

    Where BEGIN goes, by asyncpg's first write (an operation's first message):

    - a Parse, a Close, or a Bind of a named statement: BEGIN's Parse, Bind and Execute on the
      unnamed statement, in front, with no Sync between: if BEGIN fails, the server skips asyncpg's
      messages up to its Sync and asyncpg reads BEGIN's error as its own;
    - a simple Query (asyncpg's ``execute()`` without arguments, its COMMIT and ROLLBACK):
      BEGIN's text at the head of the query's, one Query: a BEGIN that fails runs nothing of it;
    - a Terminate: nothing (the connection ends; there was no transaction on the server);
    - anything else (a Bind of the unnamed statement, which BEGIN's Parse would replace; no
      such write follows the adapter's ``_start_transaction``): the connection is aborted, the
      operation fails as on a cut connection, and nothing runs outside a transaction.
    """

    __slots__ = (
        "_arm",
        "_begin_replies",
        "_in_transaction",
        "_transport",
        "_write",
        "_writelines",
        "begin",
        "begun",
        "question",
        "replies",
    )

    def __init__(
        self,
        transport: Any,  # noqa: ANN401 - asyncio's write transport (plain or TLS)
        arm: Callable[[InFlightReplies], None],
        in_transaction: Callable[[], bool],
    ) -> None:
        self._transport = transport
        self._arm = arm
        self._in_transaction = in_transaction
        self._write = transport.write
        self._writelines = transport.writelines
        self._begin_replies: InFlightReplies | None = None
        #: BEGIN's text (asyncpg's, ``;`` ended), until it is sent.
        self.begin: str | None = None
        #: BEGIN went (its replies are due or read): the server has the transaction open.
        self.begun = False
        #: The question's messages, while a statement that asks it is sent.
        self.question: bytes | None = None
        #: The question's replies, once it was sent.
        self.replies: InFlightReplies | None = None

    @classmethod
    def on(cls, transport: Any) -> Flight | None:  # noqa: ANN401
        """Return the flight on ``transport`` (None: none)."""
        found = getattr(transport, "__dict__", {}).get(_KEY)
        return found if isinstance(found, Flight) else None

    @classmethod
    def install(
        cls,
        transport: Any,  # noqa: ANN401
        arm: Callable[[InFlightReplies], None],
        in_transaction: Callable[[], bool],
    ) -> Flight | None:
        """Put a flight on ``transport``, or return its own (None: ``write`` cannot be replaced).

        uvloop's transports have no ``__dict__``; someone else's hook there is left alone.
        """
        found = cls.on(transport)
        if found is not None:
            return found
        if "write" in getattr(transport, "__dict__", ("write",)):
            return None  # not a plain Python transport, or someone else's hook is there
        flight = cls(transport, arm, in_transaction)
        transport.write = flight.write
        transport.writelines = flight.writelines
        vars(transport)[_KEY] = flight
        return flight

    def remove(self) -> None:
        """Give the transport its own ``write`` back."""
        found = vars(self._transport)
        if found.get(_KEY) is self:
            found.pop(_KEY, None)
            found.pop("write", None)
            found.pop("writelines", None)

    def settle(self) -> None:
        """Remove the flight once it has nothing more to send."""
        if self.begin is None and self.question is None:
            self.remove()

    def _ahead(self, data: Any) -> Any:  # noqa: ANN401 - what asyncpg writes
        """Return ``data`` with dropsafe's messages ahead (None: the connection was aborted)."""
        prefix = b""
        expected = b""
        begin = self.begin
        if begin is not None:
            self.begin = None
            kind = bytes(memoryview(data)[:1])
            if kind in _BEGIN_IN_FRONT or _opens_named_bind(data):
                prefix, expected = unnamed_messages(begin), BEGIN_REPLIES
            elif kind == b"Q":
                data = _begin_in_query(begin, bytes(data))
                expected = BEGIN_IN_QUERY_REPLIES
            elif kind != b"X":
                self._transport.abort()
                return None
            self.begun = kind != b"X"
        question = self.question
        if (
            question is not None
            and self.replies is None
            and _opens_named_bind(data)
            and (self.begun or self._in_transaction())
            and (expected or self._begin_replies is None or self._begin_replies.done)
        ):
            # (Never while BEGIN's replies, sent in an earlier write, are still due: the watch
            # takes one sequence at a time.)
            prefix += question
            expected += QUESTION_REPLIES
        if not expected:
            return data
        replies = InFlightReplies(expected)
        if expected.endswith(QUESTION_REPLIES):
            self.replies = replies
        else:
            self._begin_replies = replies
        self._arm(replies)
        return prefix + bytes(data) if prefix else data  # one write: one segment, one flight

    def write(self, data: Any) -> None:  # noqa: ANN401 - what asyncpg writes
        data = self._ahead(data)
        if data is not None:
            self._write(data)
        self.settle()

    def writelines(self, buffers: Any) -> None:  # noqa: ANN401
        buffers = list(buffers)
        if buffers and self.begin is not None:
            # BEGIN may rewrite a Query: whole, in one buffer (asyncpg's are few and small).
            buffers = [b"".join(bytes(buffer) for buffer in buffers)]
        if buffers:
            first = self._ahead(buffers[0])
            if first is None:
                return
            buffers[0] = first
        self._writelines(buffers)
        self.settle()

    def reading(self) -> XidReading | None:
        """Return what the question read, once the statement returned (None: not read)."""
        replies = self.replies
        if replies is None or not replies.done or replies.failed or replies.values is None:
            return None
        return XidReading(values=replies.values, assigned=True)


def _begin_in_query(begin: str, message: bytes) -> bytes:
    """Return a simple Query whose text is ``begin`` then the query's own (one message)."""
    length = int.from_bytes(message[1:_HEADER], "big")
    text = begin.encode() + b" " + message[_HEADER : 1 + length]
    return b"Q" + struct.pack("!i", 4 + len(text)) + text + message[1 + length :]
