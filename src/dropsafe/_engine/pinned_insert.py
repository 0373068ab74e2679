"""An INSERT whose generated key the app saw, sent again by the replay with that very key.

The ORM learns each new row's id from ``INSERT ... RETURNING id``, the id drawn from the
table's sequence (or identity). Replayed as sent, the INSERT draws the next value: the app's
object holds an id the database no longer has, and the replay's comparison refuses it, so every
ORM write lost before its COMMIT failed the request. Oracle's Application Continuity keeps
sequence values on replay for the same reason (``KEEP SEQUENCES``).

Sending the INSERT with the key the app saw stores the row the lost transaction would have
stored: that transaction did not commit (the replay runs only then), the value was drawn by it
and a sequence never draws a value twice, and a row's defaults are set before any trigger sees
it, so a trigger sees the same row. Should the value be taken all the same (a sequence reset,
a row inserted with an explicit key), the primary key refuses the row and the replay fails with
the original error. Everything else is compared as before: any other returned column that
differs refuses the replay.

Only where that holds plainly: one row (not executemany, not a batch of rows), SQLAlchemy's own
compiled ``Insert`` sent as compiled (no schema translation), the table's autoincrement integer
key not given by the app and returned, an integer with no conversion on its way to the driver.
And only while the key's sequence is past the key: a crash restart can give the key back to the
sequence (its advance was still in WAL buffers), and the next INSERT would draw it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.sql.dml import Insert

if TYPE_CHECKING:
    from sqlalchemy.engine import ExecutionContext
    from sqlalchemy.sql.compiler import SQLCompiler
    from sqlalchemy.sql.schema import Column

    from dropsafe._dbapi import DBAPICursor

__all__ = ["PinnedInsert", "pinned_insert"]


class PinnedInsert:
    """How to send one recorded INSERT again with the key it returned to the app."""

    __slots__ = ("_column", "_compiled", "_context", "_sent", "index", "value")

    def __init__(
        self, context: ExecutionContext, compiled: SQLCompiler, column: Column[Any], index: int
    ) -> None:
        self._context = context
        self._compiled = compiled
        self._column = column
        self._sent: Any = context.parameters[0]  # as the driver was given them
        #: The key's place in each returned row, and the value the app received there.
        self.index = index
        self.value: int | None = None

    def saw(self, row: Any) -> None:  # noqa: ANN401 # the driver's row
        """Keep the key from the first row the app received (an integer, or nothing)."""
        value = row[self.index]
        if type(value) is int:
            self.value = value

    def send(self, cursor: DBAPICursor) -> bool | str:
        """Send the INSERT with the kept key on ``cursor``: True if sent.

        False (nothing sent) where it cannot be pinned: the INSERT is then sent as it was. A
        reason (nothing sent) where the key must not be kept: the replay is refused.
        """
        value = self.value
        if value is None:
            return False
        compiled, key = self._compiled, self._column.key
        variant = self._variant()
        if variant is None:
            return False
        order, before = variant.positiontup, compiled.positiontup
        parameters: Any
        if order is None and before is None and isinstance(self._sent, dict):
            if f"%({key})s" not in variant.string:  # the key's bind is named otherwise
                return False
            parameters = {**self._sent, key: value}
        elif order is not None and before is not None and key in order:
            by_name = {**dict(zip(before, self._sent, strict=True)), key: value}
            parameters = type(self._sent)(by_name[name] for name in order)
        else:
            return False
        if not self._sequence_past(cursor, value):
            return (
                f"the sequence of {self._column} is not past the key the app holds, {value} "
                "(a crash restart lost its advance): kept, it would be drawn again"
            )
        cursor.execute(variant.string, parameters)
        return True

    def _sequence_past(self, cursor: DBAPICursor, value: int) -> bool:
        """Whether the key's sequence has moved past ``value`` (one value is drawn to see).

        A crash restart loses a sequence's advance still in WAL buffers: it then draws the
        lost transaction's key again, and a row kept with that key fails the next INSERT.
        Past it, the advance is in WAL that this replay's COMMIT flushes. No sequence of its
        own (a key set by a trigger, a default of another sequence): not past.
        """
        table = self._context.dialect.identifier_preparer.format_table(self._column.table)
        names = (_literal(table), _literal(self._column.name))
        if None in names:
            return False
        cursor.execute(  # no parameters: the values are in the text, quoted
            f"SELECT nextval(pg_get_serial_sequence({names[0]}, {names[1]})) > {int(value)}"
        )
        row = cursor.fetchone()
        return row is not None and row[0] is True

    def _variant(self) -> SQLCompiler | None:
        """Compile the INSERT with the key among its columns, returning what it returned.

        The ORM's INSERT returns the key only because the key is not given (the compiler's
        implicit RETURNING, or ``return_defaults()`` for a server default such as an identity
        column): given, it must be asked for. Both are compiled by one dialect, so the same
        columns read the same: the RETURNING clauses must be equal, word for word. Where the
        statement cannot take ``returning()`` (``return_defaults()``), a plain INSERT of its
        table returning those columns stands in, only if it compiles, without the key, to the
        very text that was sent.
        """
        compiled, key = self._compiled, self._column.key
        statement = compiled.statement
        assert isinstance(statement, Insert)  # noqa: S101 # pinned_insert() checked it
        given = list(compiled.column_keys or ())
        returned = list(compiled.effective_returning or ())
        dialect = self._context.dialect
        returning = _returning(compiled.string)
        variant: Any = statement.compile(dialect=dialect, column_keys=[*given, key])
        if _returning(variant.string) != returning:
            try:
                asking = statement.returning(*returned)
            except InvalidRequestError:  # return_defaults(): the plain INSERT, if the same
                asking = insert(statement.table).returning(*returned)
                same = asking.compile(dialect=dialect, column_keys=given)
                if same.string != compiled.string:
                    return None
            variant = asking.compile(dialect=dialect, column_keys=[*given, key])
        if returning is None or _returning(variant.string) != returning:
            return None
        return variant  # type: ignore[no-any-return]


def _literal(text: str) -> str | None:
    """``text`` as an SQL string literal; None where quoting alone may not do (a backslash)."""
    if "\\" in text:
        return None
    return "'" + text.replace("'", "''") + "'"


def _returning(sql: str) -> str | None:
    """Return the RETURNING clause of a compiled INSERT, or None."""
    before, found, after = sql.rpartition(" RETURNING ")
    return after if found and before else None


def pinned_insert(context: ExecutionContext, statement: str) -> PinnedInsert | None:
    """Return the recorded INSERT's pinned form, or None where a plain replay is all there is.

    Called for INSERTs only (``context.isinsert``): the rest of the healthy path pays nothing.
    """
    compiled: Any = context.compiled
    insert = getattr(compiled, "statement", None)
    given: list[dict[str, object]] = getattr(context, "compiled_parameters", [])
    if (
        not isinstance(insert, Insert)
        or context.executemany
        or len(given) != 1
        or statement != compiled.string
        or compiled.escaped_bind_names
        or context.execution_options.get("schema_translate_map")
    ):
        return None
    column = getattr(insert.table, "autoincrement_column", None)
    if column is None or given[0].get(column.key) is not None:
        return None
    places = [i for i, each in enumerate(compiled.effective_returning or ()) if each is column]
    if len(places) != 1:
        return None
    dialect = context.dialect
    if column.type.dialect_impl(dialect).bind_processor(dialect) is not None:
        return None
    return PinnedInsert(context, compiled, column, places[0])
