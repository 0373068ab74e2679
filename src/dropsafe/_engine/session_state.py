"""Whether a fresh connection is in the session state a lost one was in: the replay's proof.

Three facts, none of them a round trip: what the lost connection ran since it was made (each
distinct statement text read once against a short whitelist, `may_change_session`; anything
else marks the connection for life), the transaction characteristics its driver begins with
(`Driver.transaction_characteristics`), and the parameters the server reports on its own
(ParameterStatus). What each catches, and what none can see: docs/guarantees.md, "A
transaction's first statement is replayed, once" (the same session state, or no replay).
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any

from dropsafe._dbapi import ask
from dropsafe._verdicts import kept_by_text

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers import Driver

__all__ = [
    "VERDICTS",
    "give_characteristics",
    "mark_connection",
    "may_change_session",
    "session_changed",
    "session_differs",
    "session_used",
    "snapshot",
]

# What each DBAPI connection has run, kept here and not in the pool entry's ``info`` (the
# user's dictionary: dropsafe adds no key there). Keyed weakly by the driver's connection, which
# lives exactly as long as the DBAPI connection: a reconnect starts with no marks.
# ``_USED``: the connection has run a statement; even the whitelist's set the session's sequence
# state (``nextval``, and so every INSERT into a serial column, sets ``currval`` / ``lastval``),
# which a statement the whitelist does not admit may read. ``_CHANGED``: a statement may have
# changed its session state.
_USED = 1
_CHANGED = 2
_MARKS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def mark_connection(driver_connection: object, *, changes: bool) -> None:
    """Note that ``driver_connection`` ran a statement, and one that ``changes`` its session."""
    try:
        marks = _MARKS.get(driver_connection, 0)
    except TypeError:  # not weakly referable: never proven unchanged, so never replayed onto
        return
    _MARKS[driver_connection] = marks | _USED | (_CHANGED if changes else 0)


def session_changed(driver_connection: object) -> bool:
    """Whether a statement on ``driver_connection`` may have changed its session state."""
    try:
        return bool(_MARKS.get(driver_connection, 0) & _CHANGED)
    except TypeError:
        return True


def session_used(driver_connection: object) -> bool:
    """Whether ``driver_connection`` has run any statement since it was made."""
    try:
        return bool(_MARKS.get(driver_connection, 0) & _USED)
    except TypeError:
        return True


# Statements whose first words are these change no session state (the rest of the text is
# still read for function calls and temporary tables).
_PLAIN = frozenset({"select", "insert", "update", "delete", "merge", "with", "values", "table"})
# Transaction control, and what lasts only as long as the transaction.
_TRANSACTIONAL = frozenset(
    {
        "abort", "begin", "commit", "end", "lock", "notify", "release", "rollback", "savepoint",
        "show", "start",
    }
)  # fmt: skip
_TRANSACTIONAL_SET = re.compile(r"set\s+(local|transaction|constraints)\b")
_PREPARE_TRANSACTION = re.compile(r"prepare\s+transaction\b")

# Words SQL puts before a parenthesis that are not function names.
_NOT_FUNCTIONS = frozenset(
    {
        "all", "and", "any", "array", "as", "between", "by", "case", "cast", "conflict",
        "distinct", "else", "except", "exists", "filter", "from", "group", "having", "in",
        "intersect", "into", "is", "join", "lateral", "like", "limit", "not", "offset", "on",
        "or", "over", "recursive", "returning", "row", "select", "set", "some", "then", "union",
        "using", "values", "when", "where", "with", "within",
    }
)  # fmt: skip
# Of those, the ones PostgreSQL also takes as the name of a function of the app's, called
# unquoted (each tried on PostgreSQL 15): a call where an expression starts (_KEYWORD_CALL).
_KEYWORDS_THAT_NAME_FUNCTIONS = frozenset(
    {"by", "conflict", "filter", "is", "join", "like", "over", "recursive", "set", "within"}
)
# What comes right before a call, and never right before these words used as keywords.
_KEYWORD_CALL = re.compile(
    r"(?:[,(=<>+\-*/%|&!~^@#\[]|\b(?:select|distinct|all|where|and|or|then|else|when|case"
    r"|returning|having|by))\s*$"
)
# Built-in functions (and type names with a modifier) that read or compute, and change no
# session state. Those of dropsafe's own reads are here too. Not here: ``set_config``,
# ``pg_advisory_lock`` (held by the session), ``currval`` / ``lastval`` (read the session),
# ``dblink_connect``, and every function of the app's.
_SAFE_FUNCTIONS = frozenset(
    {
        "abs", "age", "array_agg", "array_length", "array_position", "avg", "bit", "bool_and",
        "bool_or", "btrim", "ceil", "ceiling", "char", "char_length", "character",
        "character_length", "clock_timestamp", "coalesce", "concat", "concat_ws", "count",
        "current_database", "current_schema", "current_schemas", "current_setting",
        "date_part", "date_trunc", "decimal", "dense_rank", "every", "extract", "first_value",
        "float", "floor", "format", "gen_random_uuid", "generate_series", "greatest", "int4",
        "int8", "interval", "json_agg", "json_build_array", "json_build_object",
        "jsonb_agg", "jsonb_build_array", "jsonb_build_object", "jsonb_set", "lag",
        "last_value", "lead", "least", "left", "length", "lower", "ltrim", "make_interval",
        "max", "md5", "min", "mod", "nextval", "now", "ntile", "nullif", "numeric",
        "octet_length", "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
        "pg_backend_pid", "pg_control_system", "pg_current_xact_id",
        "pg_current_xact_id_if_assigned", "pg_is_in_recovery", "pg_notify",
        "pg_postmaster_start_time", "pg_try_advisory_xact_lock", "pg_xact_status", "position",
        "power", "random", "rank",
        "regexp_replace", "replace", "right", "round", "row_number", "rtrim", "sign", "split_part",
        "sqrt", "statement_timestamp", "string_agg", "strpos", "substr", "substring", "sum",
        "time", "timestamp", "timestamptz", "to_char", "to_date", "to_json", "to_jsonb",
        "to_number", "to_timestamp", "transaction_timestamp", "trim", "trunc", "txid_current",
        "unnest", "upper", "varbit", "varchar", "version",
        # SQLAlchemy's reflection (Inspector, autoload_with, automap).
        "array_remove", "cardinality", "col_description", "format_type", "generate_subscripts",
        "obj_description", "pg_collation_is_visible", "pg_get_constraintdef", "pg_get_expr",
        "pg_get_indexdef", "pg_get_serial_sequence", "pg_get_viewdef", "pg_table_is_visible",
        "pg_type_is_visible", "row_to_json",
    }
)  # fmt: skip

# Comments, string literals, dollar-quoted strings and quoted names, in one left-to-right scan
# (a "--" in a string is no comment), read as PostgreSQL's lexer reads them: a "--" comment ends
# at a carriage return too, a dollar quote may carry a tag (case-sensitive: matched before the
# text is lowercased) and is not one after a name character. Block comments nest in PostgreSQL
# and not in a regular expression: a nested one makes the reading unsure (_classify). A DO body
# or a function's is blanked with its quotes: their statements' first words mark them anyway.
_COMMENT_STRING_OR_NAME = re.compile(
    r"--[^\n\r]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
    r"|(?<![\w$])\$((?:[^\W\d]\w*)?)\$.*?\$\1\$",
    re.DOTALL,
)
# A table or alias that a column list follows: INSERT INTO t (a, b), AS t (a, b), with its
# schema, either name quoted (read as quoted_name, spaces around it): INTO app."order" (a).
_COLUMN_LIST = re.compile(r"\b(into|as)\s+(?:[\w$]+\s*\.\s*)*[\w$]+\s*\(")
# A name before a parenthesis, with its schema if qualified.
_CALL = re.compile(r"(?:([\w$]+)\s*\.\s*)?([a-z_][\w$]*)\s*\(")
_TEMPORARY = re.compile(r"\b(temp|temporary|pg_temp\w*)\b")
_FIRST_WORDS = re.compile(r"[\s(]*([a-z_]+)")

# Verdicts by statement text: an app sends few distinct texts, so each is read once. Bounded
# in entries (texts with literals inlined would grow it without end) and in the length of a
# text kept (a bulk INSERT's megabytes are read each time rather than held).
_VERDICTS: dict[str, bool] = {}
#: The verdicts by text, read by the replay's ``_send`` before it calls `may_change_session`
#: (a dictionary read where a call per statement costs a Python frame). Cleared in place.
VERDICTS = _VERDICTS


@kept_by_text(_VERDICTS)
def may_change_session(statement: str) -> bool:
    """Whether ``statement`` may change its connection's session state (True when unsure).

    Called for every statement an engine that replays sends; a dictionary look-up once a text
    has been seen.
    """
    return _classify(statement)


def _blank(match: re.Match[str]) -> str:
    """Read a comment or a string as a space, a quoted name as a name that no list holds.

    A block comment that opens another inside is kept whole, so that _classify sees it unsure.
    """
    token = match.group()
    if token.startswith("/*") and "/*" in token[2:]:
        return token
    return " quoted_name " if token.startswith('"') else " "


def _classify(statement: str) -> bool:
    if "\\" in statement:  # E'\'' strings: the scan below could not tell where they end
        return True
    text = _COMMENT_STRING_OR_NAME.sub(_blank, statement).lower()
    first = _FIRST_WORDS.match(text)
    # Several statements (each would need a verdict), or a nested comment (where it ends,
    # only PostgreSQL's lexer knows).
    if first is None or ";" in text.strip().rstrip(";") or "/*" in text:
        return True
    word = first.group(1)
    rest = text[first.start(1) :]
    if word in _TRANSACTIONAL:
        return False
    if word == "set":
        return _TRANSACTIONAL_SET.match(rest) is None
    if word == "prepare":
        return _PREPARE_TRANSACTION.match(rest) is None
    return word not in _PLAIN or _TEMPORARY.search(text) is not None or _calls_unknown(text)


def _calls_unknown(text: str) -> bool:
    """Whether ``text`` (normalised) calls a function that `_SAFE_FUNCTIONS` does not hold."""
    text = _COLUMN_LIST.sub(r"\1 (", text)
    for call in _CALL.finditer(text):
        schema, name = call.group(1) or "", call.group(2)
        if name in _NOT_FUNCTIONS and not schema:
            if name not in _KEYWORDS_THAT_NAME_FUNCTIONS or not _KEYWORD_CALL.search(
                text, 0, call.start()
            ):
                continue
            return True
        if name not in _SAFE_FUNCTIONS or schema not in {"", "pg_catalog"}:
            return True
    return False


# ParameterStatus values that a session can change (SET, set_config, SET ROLE, SET SESSION
# AUTHORIZATION, SET SESSION CHARACTERISTICS), and whether the server is a hot standby; other
# server facts (version, encoding) are left out.
_REPORTED = (
    "session_authorization",
    "is_superuser",
    "search_path",
    "default_transaction_read_only",
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "application_name",
    "client_encoding",
    "standard_conforming_strings",
    "scram_iterations",
    # A fresh connection that reached a hot standby (PostgreSQL 14+ reports it) is not the
    # lost one's server: a write replayed there fails as read-only, not with the original error.
    "in_hot_standby",
)


def snapshot(driver: Driver, dbapi_connection: DBAPIConnection) -> tuple[object, ...] | None:
    """Return what of the session state is read without a round trip; None if unknown.

    Readable on a connection found lost (before it is closed): the driver keeps both.
    """

    def read() -> tuple[object, ...] | None:
        characteristics = driver.transaction_characteristics(dbapi_connection)
        if characteristics is None:
            return None
        reported = tuple(driver.reported_parameter(dbapi_connection, name) for name in _REPORTED)
        return (*characteristics, *reported)

    # A state that cannot be read is not the same state.
    return ask(read, unknown=None, what="a connection's session state")


def session_differs(lost: tuple[object, ...] | None, fresh: tuple[object, ...] | None) -> bool:
    """Whether the fresh connection's snapshot may differ from the lost one's."""
    return lost is None or fresh is None or lost != fresh


# Execution options that set something on the driver's connection when the SQLAlchemy
# Connection is made: a fresh connection gets them the same way before a replay (a SERIALIZABLE
# or READ ONLY transaction must not go on as something else).
_CONNECTION_CHARACTERISTICS = frozenset(
    {"isolation_level", "postgresql_readonly", "postgresql_deferrable"}
)


def give_characteristics(
    dialect: Dialect, connection: Connection, fresh: PoolProxiedConnection
) -> bool:
    """Set ``connection``'s isolation level, read only, deferrable options on ``fresh``.

    SQLAlchemy set them on the lost connection when the Connection was made
    (``execution_options(isolation_level=...)``, ``postgresql_readonly``, an engine's
    options), and resets them as the connection goes back to the pool, by a callback on its
    pool entry. The same is done for ``fresh``, with the dialect's own characteristic
    objects (``DefaultDialect.connection_characteristics``); the reset callback goes on
    ``fresh``'s pool entry (private: ``_connection_record.finalize_callback``). False
    where this SQLAlchemy lacks either: no replay.
    """
    options = connection.get_execution_options()
    names = sorted(_CONNECTION_CHARACTERISTICS.intersection(options))
    if not names:
        return True
    known = getattr(dialect, "connection_characteristics", None)
    record = getattr(fresh, "_connection_record", None)
    finalize = getattr(record, "finalize_callback", None)
    if known is None or finalize is None or not all(name in known for name in names):
        return False
    characteristics = [known[name] for name in names]

    def reset(dbapi_connection: DBAPIConnection) -> None:
        for characteristic in characteristics:
            characteristic.reset_characteristic(dialect, dbapi_connection)

    finalize.append(reset)  # first: a set that fails half-way is undone as well
    for name, characteristic in zip(names, characteristics, strict=True):
        characteristic.set_characteristic(dialect, fresh.dbapi_connection, options[name])
    return True
