"""Every statement dropsafe sends to the server of its own, and the one runner that sends them.

The server's life, the mark before COMMIT, the xid's status and the SyncRep wait, the fence, the
failover audit's question: the PostgreSQL-version switch is written once (`_at_least`), and each
statement is sent by `one_row` on a cursor of its own. What each one proves is in
docs/guarantees.md; tests/units/test_commit_truth.py checks them on real servers.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from dropsafe._drivers.base import XidQuestion
from dropsafe._drivers.deadline import bounded

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sqlalchemy.engine import Dialect
    from sqlalchemy.pool import PoolProxiedConnection

__all__ = [
    "ASYNCHRONOUS",
    "LIFE",
    "LIFE_AND_WAL",
    "SERVER_LIFE_SQL",
    "SERVER_QUESTION",
    "UNFLUSHED",
    "WAL_POSITION_SQL",
    "Row",
    "audit_question",
    "fence_statement",
    "mark_statement",
    "one_row",
    "status_statement",
    "xid_question",
]

#: One row as the driver returns it (a tuple, a list, asyncpg's record): read by position.
Row: TypeAlias = "Sequence[Any]"


# The PostgreSQL releases that brought what a statement uses.
_XID8 = 13  # pg_current_xact_id(), pg_xact_status(), pg_current_snapshot(): txid_* before
_TERMINATE_WAITS = 14  # pg_terminate_backend(pid, timeout)


def _at_least(dialect: Dialect, major: int) -> bool:
    """Whether the server is PostgreSQL ``major`` or newer; not known yet (no connection): yes."""
    version: tuple[int, ...] = getattr(dialect, "server_version_info", None) or ()
    return not version or version[0] >= major


# -- the server's life (dropsafe._commit_truth.server_life) ---------------------------------

#: Two columns that identify a server's life, for a SELECT list (`ServerLife.read` parses
#: them): the system identifier, and ``stats_reset|postmaster start|checkpointer pid|timeline``.
SERVER_LIFE_SQL = (
    "(SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()), "
    "pg_catalog.concat((SELECT stats_reset FROM pg_catalog.pg_stat_bgwriter), '|', "
    "pg_catalog.pg_postmaster_start_time(), '|', (SELECT pg_catalog.min(pid) "
    "FROM pg_catalog.pg_stat_get_activity(NULL) WHERE datid IS NULL AND usesysid IS NULL), "
    "'|', GREATEST((SELECT timeline_id FROM pg_catalog.pg_control_checkpoint()), "
    "(SELECT min_recovery_end_timeline FROM pg_catalog.pg_control_recovery())))"
)

#: The WAL insert position, for a SELECT list: a lower bound of a coming commit record's LSN.
#: A standby has none (the function would raise there).
WAL_POSITION_SQL = (
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
    "ELSE pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text END"
)

#: A connection's first read: its server's life and WAL position; the life alone where the
#: server hides the position.
LIFE_AND_WAL = f"SELECT {SERVER_LIFE_SQL}, {WAL_POSITION_SQL}"
LIFE = f"SELECT {SERVER_LIFE_SQL}"

# -- the mark before COMMIT (dropsafe._unit.recording) ---------------------------------------

#: What follows an xid that the mark assigned with ``synchronous_commit`` off.
ASYNCHRONOUS = " async"
#: What follows an xid the transaction had, when its COMMIT waits for no WAL flush either
#: (``synchronous_commit`` off: the app's ``SET LOCAL``, or its role's, database's, server's).
UNFLUSHED = " unflushed"


def _xid_expression(modern: bool) -> str:
    """Return the mark's first column: the xid as text, assigning one where there is none.

    The xid already assigned (the transaction wrote: its COMMIT flushes), or on a primary a new
    one, marked `ASYNCHRONOUS`: PostgreSQL flushes no commit record of a transaction that
    wrote no WAL before it (``RecordTransactionCommit``), and ``synchronous_commit`` off makes
    that hold too for one that wrote WAL without an xid (a read that pruned a page). A NOTIFY's
    COMMIT in a transaction that wrote nothing else never waited for a flush either. (CASE
    evaluates lazily: a standby never assigns.) An xid the transaction had is marked
    `UNFLUSHED` when its COMMIT will not wait for a flush either: listeners hear its NOTIFYs
    before a crash may lose its commit record.
    """
    current = "pg_catalog." + ("pg_current_xact_id" if modern else "txid_current")
    assigned = f"{current}_if_assigned()"
    return (
        f"CASE WHEN {assigned} IS NOT NULL THEN {assigned}::pg_catalog.text || "
        "CASE WHEN pg_catalog.current_setting('synchronous_commit') = 'off' "
        f"THEN '{UNFLUSHED}' ELSE '' END "
        "WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
        "WHEN pg_catalog.set_config('synchronous_commit', 'off', true) = 'off' "
        f"THEN {current}()::pg_catalog.text || '{ASYNCHRONOUS}' END"
    )


# The backend's pid is read in the mark, not once per connection: behind a transaction-mode
# pooler each transaction may run on another backend, and the resolver fences that one.
# Built once: [PostgreSQL 13+][read the server's life][read the WAL insert position, only on
# engines whose server answered it before]. (xid8 functions arrived in PostgreSQL 13.)
_MARKS = {
    (modern, with_life, with_wal): (
        f"SELECT {_xid_expression(modern)}, pg_catalog.pg_backend_pid()"
        + (f", {SERVER_LIFE_SQL}" if with_life else "")
        + (f", {WAL_POSITION_SQL}" if with_wal else "")
    )
    for modern in (True, False)
    for with_life in (True, False)
    for with_wal in (True, False)
}


def mark_statement(dialect: Dialect, *, with_life: bool, with_wal: bool) -> str:
    """Return the mark: xid, backend pid[, the server's life (two columns)][, WAL position]."""
    return _MARKS[_at_least(dialect, _XID8), with_life, with_wal]


# -- the xid read in a statement's own flight (a plain transaction's COMMIT) ----------------

#: Its columns: the xid as text (NULL: none), ``synchronous_commit`` and the backend's pid (the
#: server's, as the mark reads it: behind a pooler the driver knows only the pooler's, which
#: the resolver's fence would miss). The read before the statement gives the transaction its
#: xid (the statement may write: it would take one anyway);
#: a standby assigns none (the statement then fails there on its own). The server's life is not
#: read here: it is learned at connect (`dropsafe._engine.server_facts`), and a read that failed
#: in flight (a server that hides it) would fail the app's transaction.
# Read inside the app's own session: every name is schema-qualified, so that an app's function
# or type of the same name earlier on its search_path (``SET search_path = app, pg_catalog``)
# cannot answer in PostgreSQL's place (a wrong xid would resolve another transaction's COMMIT).
_IN_FLIGHT = (
    "{xid}::pg_catalog.text, pg_catalog.current_setting('synchronous_commit'::pg_catalog.text), "
    "pg_catalog.pg_backend_pid()"
)
_IN_FLIGHT_WAL = (
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
    "ELSE pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text END"
)


def xid_question(dialect: Dialect, *, with_wal: bool = False) -> XidQuestion:
    """Return what a driver reads of the transaction in a statement's flight (`XidQuestion`).

    ``with_wal``: the WAL insert position too (a fourth column), where the engine's servers
    were seen at connect to answer it: a lower bound of the COMMIT record's position.
    """
    current = "pg_catalog." + (
        "pg_current_xact_id" if _at_least(dialect, _XID8) else "txid_current"
    )
    wal = f", {_IN_FLIGHT_WAL}" if with_wal else ""
    return XidQuestion(
        before=_IN_FLIGHT.format(
            xid=f"(CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE {current}() END)"
        )
        + wal,
        after=_IN_FLIGHT.format(xid=f"{current}_if_assigned()") + wal,
    )


# -- the resolution of a lost COMMIT (dropsafe._commit_truth.resolution) --------------------

#: Which server answers: its life, whether it is a standby, and its last checkpoint's redo
#: position (after a crash, at most where the recovery of its WAL ended: docs/guarantees.md).
_REDO = "(SELECT redo_lsn::pg_catalog.text FROM pg_catalog.pg_control_checkpoint())"
SERVER_QUESTION = f"SELECT {SERVER_LIFE_SQL}, pg_catalog.pg_is_in_recovery(), {_REDO}"

# The second column: whether the backend still waits for a synchronous standby to confirm
# this transaction's commit record (its xid stays in the backend's row until the wait ends).
_SYNC_WAITING = (
    "EXISTS (SELECT FROM pg_catalog.pg_stat_activity "
    "WHERE pid = {pid} AND wait_event = 'SyncRep' "
    "AND coalesce(backend_xid::pg_catalog.text::bigint, {xid32}) = {xid32})"
)
# Our own new xid is beyond every xid handed out so far: ours is "future" if not below it.
_STATUS = (
    "SELECT CASE WHEN '{xid}'::pg_catalog.xid8 < pg_catalog.pg_current_xact_id() "
    "THEN pg_catalog.pg_xact_status('{xid}'::pg_catalog.xid8) ELSE 'future' END, " + _SYNC_WAITING
)
_STATUS_BEFORE_13 = (
    "SELECT CASE WHEN {xid} < pg_catalog.txid_current() "
    "THEN pg_catalog.txid_status({xid}) ELSE 'future' END, " + _SYNC_WAITING
)
# Never a backend in SyncRep; a running one only where no synchronous standby is configured.
_FENCE = (
    "SELECT pg_catalog.pg_terminate_backend(pid{wait}) FROM pg_catalog.pg_stat_activity "
    "WHERE pid = {pid} AND backend_xid::pg_catalog.text::bigint = {xid32} "
    "AND wait_event IS DISTINCT FROM 'SyncRep' AND {state}"
)
_IDLE = "state <> 'active'"
_IDLE_OR_NO_SYNC_STANDBY = (
    "(state <> 'active' OR pg_catalog.current_setting('synchronous_standby_names') = '')"
)


# Whether code in the database may notify, or turn synchronous_commit off, where no statement
# of the app names it: a function's body or its own settings (a trigger's, an INSTEAD OF
# trigger's), a rule's action. Where it may, a COMMIT may not have waited for its WAL (off, or
# no WAL written: a transaction that only notifies) though the xid read said otherwise, and its
# notification is delivered at once: a crash may then lose a commit that was already heard.
# 'notif', not 'notify': contrib's tcn trigger is a C function named triggered_change_notification;
# and a body's EXECUTE, whose SQL (built at run time) may be either; and the setting as a new
# session of the app's role and database gets it now.
_SERVER_CODE_MAY_NOTIFY = (
    "EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace NOT IN "
    "('pg_catalog'::regnamespace, 'information_schema'::regnamespace) "
    "AND (prosrc ~* '(notif|synchronous_commit|\\mexecute\\M)' "
    "OR pg_catalog.array_to_string(proconfig, ' ') ~* 'synchronous_commit')) "
    "OR EXISTS (SELECT FROM pg_catalog.pg_rules WHERE definition ~* 'notif') "
    # A reload (ALTER SYSTEM, the role's or database's default) that turned it off: a backend
    # applies a reload before its next statement, even inside a transaction, naming nothing.
    "OR pg_catalog.current_setting('synchronous_commit') = 'off'"
)


def status_statement(
    dialect: Dialect, *, xid: int, backend_pid: int, asks_server_code: bool = False
) -> str:
    """Return the question: the xid's status (or ``future``), and does it wait in SyncRep.

    ``asks_server_code``: a third column, whether the database's own code may notify or turn
    synchronous_commit off (asked only after a crash may have lost the commit record).
    """
    template = _STATUS if _at_least(dialect, _XID8) else _STATUS_BEFORE_13
    statement = template.format(xid=xid, pid=backend_pid, xid32=xid % 2**32)
    return f"{statement}, {_SERVER_CODE_MAY_NOTIFY}" if asks_server_code else statement


def fence_statement(
    dialect: Dialect, *, xid: int, backend_pid: int, wait_ms: int, any_state: bool
) -> str:
    """Terminate the backend if it still holds the xid: idle only, or any state (see above).

    ``wait_ms``: how long the server waits for it to exit (PostgreSQL 14+; older: no wait).
    """
    return _FENCE.format(
        pid=backend_pid,
        xid32=xid % 2**32,
        wait=f", {wait_ms}" if _at_least(dialect, _TERMINATE_WAITS) else "",
        state=_IDLE_OR_NO_SYNC_STANDBY if any_state else _IDLE,
    )


# -- the failover audit's question (dropsafe._unit.failover_audit) ---------------------------

# A status is read only below the first unassigned xid (pg_xact_status raises for a future
# one); an xid too old to know reads NULL.
_STATUSES = (
    "SELECT pg_catalog.array_to_string(ARRAY(SELECT CASE "
    "WHEN x < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) "
    "THEN coalesce(pg_catalog.pg_xact_status(x), 'too old') ELSE 'future' END "
    "FROM pg_catalog.unnest('{{{xids}}}'::pg_catalog.xid8[]) WITH ORDINALITY AS t(x, n) "
    "ORDER BY n), ',')"
)
_STATUSES_BEFORE_13 = (
    "SELECT pg_catalog.array_to_string(ARRAY(SELECT CASE "
    "WHEN x < pg_catalog.txid_snapshot_xmax(pg_catalog.txid_current_snapshot()) "
    "THEN coalesce(pg_catalog.txid_status(x), 'too old') ELSE 'future' END "
    "FROM pg_catalog.unnest('{{{xids}}}'::bigint[]) WITH ORDINALITY AS t(x, n) "
    "ORDER BY n), ',')"
)
_AUDIT = (
    f"SELECT {SERVER_LIFE_SQL}, pg_catalog.pg_is_in_recovery(), "
    "pg_catalog.pg_last_wal_replay_lsn()::pg_catalog.text, ({statuses})"
)


def audit_question(dialect: Dialect, xids: Iterable[int]) -> str:
    """Return the question: life, recovery, replay LSN, each xid's status (comma-separated)."""
    template = _STATUSES if _at_least(dialect, _XID8) else _STATUSES_BEFORE_13
    # Numbers we read ourselves, inlined: no driver's parameter style to follow.
    statuses = template.format(xids=",".join(str(int(xid)) for xid in xids))
    return _AUDIT.format(statuses=statuses)


# -- the runner ----------------------------------------------------------------------------

#: After the row: no rollback (the app's transaction goes on), a rollback that may fail (the
#: caller drops the connection then), or one whatever happened, its failure ignored.
Rollback = Literal["none", "after", "quietly"]


def one_row(
    connection: PoolProxiedConnection,
    statement: str,
    *,
    rollback: Rollback = "none",
    deadline: float | None = None,
) -> Row:
    """Run ``statement`` on a cursor of its own, return its first row (``()``: none), close it.

    ``deadline`` (a `time.monotonic` value): the connection's socket is shut down if the
    statement, or its rollback, still runs then (`dropsafe._drivers.deadline.bounded`).
    """
    with (
        contextlib.nullcontext()
        if deadline is None
        else bounded(connection.dbapi_connection, deadline)
    ):
        try:
            row = _fetch_one(connection, statement)
        except BaseException:
            if rollback == "quietly":
                with contextlib.suppress(Exception):
                    connection.rollback()
            raise
        if rollback == "quietly":
            with contextlib.suppress(Exception):
                connection.rollback()
        elif rollback == "after":
            connection.rollback()
        return row


def _fetch_one(connection: PoolProxiedConnection, statement: str) -> Row:
    cursor = connection.cursor()
    try:
        cursor.execute(statement)
        row: Row | None = cursor.fetchone()
    except BaseException:
        with contextlib.suppress(Exception):  # its connection may be gone: the error says so
            cursor.close()
        raise
    cursor.close()
    return () if row is None else row
