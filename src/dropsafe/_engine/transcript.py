"""What a transaction sent and what the app received from it: the record a replay is checked by.

Per transaction on a checkout: each statement (how to send it again) and, for each, the rowcount
and a digest of the rows the app fetched: hashed as they pass, never kept. A replay sends the
statements again on a fresh connection and compares (`Transcript.replay_onto`); any difference
and nothing of the replay is kept. Why that is enough, and what is refused: docs/guarantees.md,
"A transaction lost before its COMMIT is replayed".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pickle
import re
from typing import TYPE_CHECKING, Any

from dropsafe._drivers import tcp_bytes_sent
from dropsafe._engine.session_state import may_change_session

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from contextlib import AbstractContextManager

    from sqlalchemy.engine import ExecutionContext

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._dbapi import DBAPICursor, NativeConnection
    from dropsafe._engine.pinned_insert import PinnedInsert

    Row = Sequence[object]

__all__ = ["RecordingCursor", "Transcript", "recorded_size", "refusal_of_text", "rows_digest"]

# Statements a replay must not send again, or whose result cannot repeat, that the session-state
# whitelist admits (it marks the others: session SET, LISTEN, DECLARE, COPY, PREPARE, dblink,
# pg_advisory_lock, ...). A sequence's value is not rolled back: the app would get another one.
_NOT_REPEATABLE = re.compile(
    r"""\b(?:
        (?P<sequence>nextval|setval|currval|lastval)\s*\(
      | (?P<rollback_to>rollback\s+(?:transaction\s+|work\s+)?to)\b
      | (?P<two_phase>prepare\s+transaction|commit\s+prepared|rollback\s+prepared)\b
    )""",
    re.IGNORECASE | re.VERBOSE,
)

# Transaction control sent as a statement: a COMMIT (END) there ended the transaction on the
# server, and a replay would run its statements again in another one. Read after any leading
# comments; SAVEPOINT and RELEASE are not matched (replayed in order).
_TRANSACTION_CONTROL = re.compile(
    r"(?:\s|--[^\n\r]*|/\*.*?\*/)*(?:commit|end|abort|rollback|begin|start)\b",
    re.IGNORECASE | re.DOTALL,
)

_REASONS = {
    "sequence": "a sequence function (nextval, setval, currval, lastval): its value is not rolled "
    "back, a replay would hand the app another one",
    "rollback_to": "ROLLBACK TO a savepoint: what the app received is no longer the transaction's",
    "two_phase": "two-phase commit",
}


@functools.lru_cache(maxsize=1024)
def refusal_of_text(statement: str) -> str | None:
    """Why a statement with this text turns the transaction's replay off, or None (read once)."""
    if ";" in statement.strip().rstrip(";"):
        return "the text may hold several statements"
    found = _NOT_REPEATABLE.search(statement)
    if found is not None and found.lastgroup is not None:
        return _REASONS[found.lastgroup]
    if _TRANSACTION_CONTROL.match(statement):
        return "transaction control sent as a statement (COMMIT, ROLLBACK, BEGIN, END, ...)"
    if may_change_session(statement):
        return (
            "a statement that may change the session or act outside the transaction "
            "(session SET, advisory session lock, LISTEN, DECLARE, COPY, PREPARE, dblink, "
            "a function of the app's, ...)"
        )
    return None


def rows_digest(rows: Sequence[Sequence[object]], digest: bytes = b"") -> bytes:
    """Fold one fetch's ``rows`` into ``digest``: the values exactly, with their types, in order.

    Not Python's ``hash()``: it gives -1 and -2 alike, and ints alike modulo 2**61 - 1, so a value
    another transaction changed could pass as the one the app saw. The pickle of the values
    tells 1, 1.0, True and Decimal('1.00') apart; BLAKE2b folds it. One digest per fetch, not
    per row: the replay fetches in the same batches (`Statement.batches`). A value that cannot
    be pickled is digested by its repr: one whose repr is not its value (an address) makes the
    replay differ, and so refused, never wrongly accepted.
    """
    folded = hashlib.blake2b(digest, digest_size=16)
    values = tuple(map(tuple, rows))
    try:
        folded.update(pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - any value pickle refuses (a driver's own type)
        folded.update(repr(tuple(_plain(row) for row in values)).encode())
    return folded.digest()


def _plain(row: tuple[object, ...]) -> tuple[object, ...]:
    """``row`` with bytea as bytes (psycopg2 gives memoryviews), each value with its type."""
    return tuple(
        (type(value).__qualname__, bytes(value) if isinstance(value, memoryview) else value)
        for value in row
    )


class Statement:
    """One statement sent in the transaction, and what the app received from it."""

    __slots__ = (
        "batches",
        "digest",
        "fetched",
        "pin",
        "reader",
        "rowcount",
        "send",
        "transcript",
    )

    def __init__(
        self,
        transcript: Transcript,
        send: Callable[[Any], None],
        rowcount: int,
        pin: PinnedInsert | None,
    ) -> None:
        self.transcript = transcript
        self.send = send  # sends it again on a given cursor (its context and parameters kept)
        self.pin = pin  # an INSERT sent again with the generated key the app saw
        self.rowcount = rowcount
        self.fetched = 0
        self.batches: list[int] = []  # the size of each fetch the app made
        self.digest = b""
        self.reader: RecordingCursor | None = None  # what the app reads the result through

    def saw(self, rows: Sequence[Sequence[object]]) -> None:
        """Note ``rows`` as received by the app (past the cap, the replay is off)."""
        transcript = self.transcript
        if transcript.refused is not None or not rows:
            return
        count = len(rows)
        self.fetched += count
        transcript.rows += count
        if transcript.rows > transcript.max_rows:
            transcript.refuse(f"more than {transcript.max_rows} rows fetched (the cap)")
            return
        if self.pin is not None and not self.batches:
            self.pin.saw(rows[0])
        self.batches.append(count)
        self.digest = rows_digest(rows, self.digest)


class RecordingCursor:
    """The DBAPI cursor SQLAlchemy reads a result from, seen on the way: set as context.cursor.

    After a replay it reads from the replayed cursor, past the rows already fetched, so a result
    the app holds goes on where it was.
    """

    __slots__ = ("closed_by_app", "cursor", "statement")

    def __init__(self, cursor: DBAPICursor, statement: Statement) -> None:
        self.cursor = cursor
        self.statement = statement
        # SQLAlchemy closes the cursor when the app closes its result (``.first()``, a
        # result read to its end): a replay then keeps no cursor for it.
        self.closed_by_app = False

    @property
    def description(self) -> object:
        """The wrapped cursor's."""
        return self.cursor.description

    @property
    def rowcount(self) -> int:
        """The wrapped cursor's."""
        return int(self.cursor.rowcount)

    def fetchone(self) -> Any:  # noqa: ANN401 # the driver's row
        """Fetch one row and note it."""
        row = self.cursor.fetchone()
        if row is not None:
            self.statement.saw((row,))
        return row

    def fetchmany(self, size: int | None = None) -> Any:  # noqa: ANN401 # the driver's rows
        """Fetch some rows and note them."""
        rows = self.cursor.fetchmany() if size is None else self.cursor.fetchmany(size)
        self.statement.saw(rows)
        return rows

    def fetchall(self) -> Any:  # noqa: ANN401 # the driver's rows
        """Fetch the rest and note them."""
        rows = self.cursor.fetchall()
        self.statement.saw(rows)
        return rows

    def close(self) -> None:
        """Close the wrapped cursor; a replay will hold none for it."""
        self.closed_by_app = True
        self.cursor.close()

    def __iter__(self) -> Iterator[Row]:
        while (row := self.fetchone()) is not None:
            yield row

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 # the wrapped cursor's
        return getattr(self.cursor, name)


class Transcript:
    """One transaction's statements on one checkout, bounded; ``refused`` says why it is off."""

    __slots__ = (
        "bytes",
        "count_sent",
        "dropped",
        "fd",
        "max_bytes",
        "max_rows",
        "max_statements",
        "native",
        "notifies",
        "pending",
        "refused",
        "rows",
        "sent_after",
        "statements",
        "xid_wanted",
    )

    def __init__(
        self,
        native: NativeConnection,
        fd: int | None,
        caps: tuple[int, int, int],
    ) -> None:
        self.native = native  # the driver's connection the transaction runs on
        self.fd = fd  # its socket's
        self.statements: list[Statement] = []
        self.rows = 0
        self.bytes = 0
        # At most: statements, rows fetched, bytes of statements and parameters.
        self.max_statements, self.max_rows, self.max_bytes = caps
        self.refused: str | None = None
        self.sent_after: int | None = None  # the socket's bytes sent after the last statement
        #: Reads the bytes sent on a socket (``fd``): `tcp_bytes_sent`, or the connection's
        #: own counter (`SentBytes`, its socket object kept) while the transaction is on it.
        self.count_sent: Callable[[int], int | None] = tcp_bytes_sent
        #: The transaction's xid as read in a writing statement's flight (`dropsafe._engine.
        #: xid_in_flight`): a lost COMMIT reply is resolved by it. None: not read.
        self.pending: PendingCommit | None = None
        #: Reads dropped since (the server's transaction ended around SQLAlchemy): a lost
        #: COMMIT that did not commit asks about them too (`PendingCommit.earlier`).
        self.dropped: tuple[PendingCommit, ...] = ()
        #: Whether the next statement that may write reads the xid in its flight.
        self.xid_wanted = False
        #: Whether a statement of it may notify: a lost COMMIT is then resolved as one that
        #: may have waited for no WAL (`PendingCommit.unflushed`; `UnsentCommit`).
        self.notifies = False

    def refuse(self, reason: str) -> None:
        """Turn the replay off for this transaction; forget what was recorded."""
        if self.refused is None:
            self.refused = reason
            self.statements = []

    def record(
        self,
        send: Callable[[Any], None],
        cursor: DBAPICursor,
        size: int,
        pin: PinnedInsert | None = None,
    ) -> RecordingCursor | None:
        """Record a statement just sent on ``cursor``; the cursor to read its result through."""
        if self.refused is not None:
            return None
        self.bytes += size
        if len(self.statements) >= self.max_statements:
            self.refuse(f"more than {self.max_statements} statements (the cap)")
            return None
        if self.bytes > self.max_bytes:
            self.refuse(f"more than {self.max_bytes} bytes of statements (the cap)")
            return None
        statement = Statement(self, send, int(cursor.rowcount), pin)
        self.statements.append(statement)
        statement.reader = RecordingCursor(cursor, statement)
        return statement.reader

    def replay_onto(
        self,
        new_cursor: Callable[[], DBAPICursor],
        bound: Callable[[], AbstractContextManager[None]],
    ) -> str | None:
        """Send every statement again on fresh cursors; None if all results are the same.

        Else the first difference, in words. Each statement is sent inside ``bound()`` (the
        replay's deadline). The app's results are moved to the fresh cursors only when every
        one matched: never a partial replay. A result the app had closed gets no fresh cursor:
        its cursor is closed once compared, so that the replay holds no more results at once
        than the app did (ten ``.first()`` of large results: one at a time, not ten).
        """
        fresh: list[tuple[RecordingCursor, DBAPICursor]] = []
        try:
            for number, statement in enumerate(self.statements, 1):
                cursor = new_cursor()
                reader = statement.reader
                if reader is not None and not reader.closed_by_app:
                    fresh.append((reader, cursor))
                with bound():
                    pinned = False if statement.pin is None else statement.pin.send(cursor)
                    if not pinned:
                        statement.send(cursor)
                if isinstance(pinned, str):
                    return f"statement {number} cannot be sent again as the app saw it: {pinned}"
                difference = _compare(number, statement, cursor)
                if difference is not None:
                    return difference
                if reader is None or reader.closed_by_app:
                    cursor.close()
        except BaseException:
            _close_all(kept for _, kept in fresh)
            raise
        for reader, cursor in fresh:
            reader.cursor = cursor
        return None


def _compare(number: int, statement: Statement, cursor: DBAPICursor) -> str | None:
    """How a replayed statement's result differs from what the app received, or None."""
    rowcount = int(cursor.rowcount)
    if rowcount != statement.rowcount:
        return f"statement {number}'s rowcount was {statement.rowcount}, now {rowcount}"
    digest = b""
    for size in statement.batches:
        rows = cursor.fetchmany(size)
        if len(rows) != size:
            break
        digest = rows_digest(rows, digest)
    if digest != statement.digest:
        return f"statement {number}'s rows differ from those the app received"
    return None


def _close_all(cursors: Iterable[DBAPICursor]) -> None:
    """Close the cursors of a replay that did not succeed (its connection is closed next)."""
    for cursor in cursors:
        with contextlib.suppress(Exception):
            cursor.close()


def recorded_size(statement: str, context: ExecutionContext) -> int:
    """Estimate the bytes a recorded statement keeps: its text and its parameters."""
    size = len(statement)
    for parameters in getattr(context, "parameters", ()) or ():
        if not parameters:  # a statement without any (``[{}]``): no call for nothing
            continue
        values = parameters.values() if isinstance(parameters, dict) else parameters
        size += sum(map(_weight, values))
    return size


def _weight(value: object) -> int:
    """Estimate the bytes of one parameter: text and bytes by length, an array by its items.

    An array (a list of 200,000 ids for ``= ANY(:ids)``) is kept whole to be sent again: it
    counts item by item against ``replay_max_bytes``, not as one 8-byte scalar.
    """
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return 8 + sum(map(_weight, value))
    if isinstance(value, dict):  # JSON
        return 8 + sum(map(_weight, value)) + sum(map(_weight, value.values()))
    return 8
