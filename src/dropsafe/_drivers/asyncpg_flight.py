"""asyncpg: the transaction's xid read in a statement's own flight (issue 27 item 3, issue 28).

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

__all__ = ["InFlightReplies", "QuestionFlight", "question_messages"]

_HEADER = 5  # a message's type byte and its length
#: The replies to dropsafe's Parse, Bind and Execute, in order.
_EXPECTED = b"12DC"
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
    query = f"SELECT {question.before}".encode() + b"\x00"
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

    __slots__ = ("_held", "_step", "failed", "malformed", "values")

    def __init__(self) -> None:
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
        return self.failed or self._step == len(_EXPECTED)

    def take(self, data: bytes) -> bytes:
        """Return what of ``data`` is asyncpg's: everything but the four replies, in order."""
        held = self._held
        held += data
        passed = bytearray()
        while not self.done and len(held) >= _HEADER:
            kind = held[0]
            length = int.from_bytes(held[1:_HEADER], "big")
            if not _well_formed(kind, length, _EXPECTED[self._step]):
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
            elif kind == _EXPECTED[self._step]:
                if kind == _EXPECTED[2]:
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


class QuestionFlight:
    """The transport's ``write`` and ``writelines`` while one statement is sent (then restored).

    ``arm`` is handed the replies' taker when the question goes out, before the server can
    answer it; ``in_transaction`` says, when the Bind goes, whether there is a transaction.
    """

    __slots__ = (
        "_arm",
        "_in_transaction",
        "_messages",
        "_transport",
        "_write",
        "_writelines",
        "replies",
    )

    def __init__(
        self,
        transport: Any,  # noqa: ANN401 - asyncio's write transport (plain or TLS)
        messages: bytes,
        arm: Callable[[InFlightReplies], None],
        in_transaction: Callable[[], bool],
    ) -> None:
        self._transport = transport
        self._messages = messages
        self._arm = arm
        self._in_transaction = in_transaction
        self._write = transport.write
        self._writelines = transport.writelines
        #: The question's replies, once it was sent.
        self.replies: InFlightReplies | None = None

    @classmethod
    def install(
        cls,
        transport: Any,  # noqa: ANN401
        messages: bytes,
        arm: Callable[[InFlightReplies], None],
        in_transaction: Callable[[], bool],
    ) -> QuestionFlight | None:
        """Put the flight on ``transport`` (None: its ``write`` cannot be replaced, uvloop's)."""
        if "write" in getattr(transport, "__dict__", ("write",)):
            return None  # not a plain Python transport, or someone else's hook is there
        flight = cls(transport, messages, arm, in_transaction)
        transport.write = flight.write
        transport.writelines = flight.writelines
        return flight

    def remove(self) -> None:
        """Give the transport its own ``write`` back."""
        vars(self._transport).pop("write", None)
        vars(self._transport).pop("writelines", None)

    def _question_first(self, first: Any) -> bool:  # noqa: ANN401
        if self.replies is not None or not _opens_named_bind(first) or not self._in_transaction():
            return False
        self.replies = InFlightReplies()
        self._arm(self.replies)
        return True

    def write(self, data: Any) -> None:  # noqa: ANN401 - what asyncpg writes
        if self._question_first(data):
            data = self._messages + bytes(data)  # one write: one segment, one flight
        self._write(data)

    def writelines(self, buffers: Any) -> None:  # noqa: ANN401
        buffers = list(buffers)
        if buffers and self._question_first(buffers[0]):
            buffers[0] = self._messages + bytes(buffers[0])
        self._writelines(buffers)

    def reading(self) -> XidReading | None:
        """Return what the question read, once the statement returned (None: not read)."""
        replies = self.replies
        if replies is None or not replies.done or replies.failed or replies.values is None:
            return None
        return XidReading(values=replies.values, assigned=True)
