"""What a transaction replay asks the server itself: the facts no reply of the app's carries.

Two questions, each a round trip that the healthy request never pays:

- At connect (the pool's ``connect`` event, on engines with ``replay_transaction`` on): the
  session's start as the server made it, `learn_session`. ``ALTER ROLE ... SET`` and
  ``ALTER DATABASE ... SET`` change only sessions made after them, and PostgreSQL before 18
  reports neither ``search_path`` nor most settings: a fresh connection can start in another
  schema, under other settings, and only the server can say so. Kept per driver connection;
  compared with the fresh connection's before anything is replayed.
- On the replay path, on the fresh connection before its transaction begins: whether the
  database holds a way for a statement to act outside its transaction (dblink, pg_background,
  adminpack, an untrusted language, a C function of no known extension, a function whose body
  names such a call or builds its SQL at run time), `outside_effects`; and the roles the
  session's user is a member of now (`membership_now`), against those it had at connect.

Why these and not less: docs/guarantees.md, "A transaction lost before its COMMIT is replayed".
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

from dropsafe._commit_truth.server_life import ServerLife, remember_server_life
from dropsafe._commit_truth.server_sql import LIFE, LIFE_AND_WAL, SERVER_LIFE_SQL
from dropsafe._dbapi import ask

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._engine_state import EngineState

__all__ = [
    "SAFE_EXTENSIONS",
    "forget_do_blocks",
    "learn_session",
    "learned_session",
    "may_run_do_blocks",
    "outside_effects",
]

# The roles the session's user is a member of, as one digest: a grant or a revoke changes it.
_MEMBERSHIP = (
    "md5(coalesce((SELECT string_agg(oid::text, ',' ORDER BY oid) FROM pg_roles "
    "WHERE pg_has_role(current_user, oid, 'MEMBER')), ''))"
)

# Every setting a role's or a database's default can give a session (contexts user, superuser,
# backend), as one digest; the transaction's own three are left out (the fresh connection's
# transaction may already be set up as SERIALIZABLE or READ ONLY, the lost one's was not at
# connect). A placeholder setting (``app.tenant``) is in no view of settings: the defaults
# that apply to the session (ALTER ROLE / DATABASE ... SET) are digested as they stand.
_SESSION_START = (
    "SELECT session_user::text, current_user::text, current_setting('search_path'), "  # noqa: S608 # constants only
    "md5(coalesce((SELECT string_agg(name || '=' || coalesce(setting, ''), E'\\n' "
    "ORDER BY name) FROM pg_settings WHERE context IN "
    "('user', 'superuser', 'backend', 'superuser-backend') AND name NOT IN "
    "('transaction_isolation', 'transaction_read_only', 'transaction_deferrable')), '') "
    "|| coalesce((SELECT string_agg(setdatabase || ':' || setrole || ':' "
    "|| array_to_string(setconfig, E'\\n'), E'\\n' ORDER BY setdatabase, setrole) "
    "FROM pg_db_role_setting WHERE setrole IN (0, (SELECT oid FROM pg_roles "
    "WHERE rolname = session_user)) AND setdatabase IN (0, (SELECT oid FROM pg_database "
    "WHERE datname = current_database()))), '')), "
    f"{_MEMBERSHIP}"
)
# Whether the session may run a DO block (plpgsql, and USAGE on it): psycopg2 reads a
# transaction's xid in a statement's flight with one (`dropsafe._engine.xid_in_flight`), and a
# DO block refused would fail the app's transaction. Asked with the session's start, kept apart.
# A DO block runs as the current role, which the app may change after this question: SET
# [LOCAL] ROLE in a transaction, set_config('role', ...), SET SESSION AUTHORIZATION, or its own
# connect listener (run after dropsafe's). So the leave is asked of every role the session's
# user may become: each role it is a member of (a superuser: every role). One without USAGE
# (``REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC``, then a tenant role) and no DO block is
# sent on the connection: the mark reads the xid instead. (With PUBLIC's USAGE, the default,
# every role has it.)
_DO_BLOCKS = (
    "EXISTS (SELECT FROM pg_language l WHERE l.lanname = 'plpgsql' "
    "AND NOT EXISTS (SELECT FROM pg_roles r WHERE pg_has_role(session_user, r.oid, 'MEMBER') "
    "AND NOT has_language_privilege(r.oid, l.oid, 'USAGE')))"
)
_SESSION_START_AND_DO = f"{_SESSION_START}, {_DO_BLOCKS}"
_SESSION_START_DO_AND_LIFE = f"{_SESSION_START_AND_DO}, {SERVER_LIFE_SQL}"

#: Extensions whose functions act inside the transaction only (reads, types, indexes, and
#: postgres_fdw: its remote transaction commits at the local COMMIT and aborts with the local
#: transaction, so a lost transaction's remote writes are rolled back with it). Any other
#: extension installed in the database (dblink, pg_background, adminpack, an untrusted
#: language, an unknown one) refuses the transaction replay.
SAFE_EXTENSIONS = frozenset(
    {
        "amcheck", "bloom", "btree_gin", "btree_gist", "citext", "cube", "dict_int",
        "dict_xsyn", "earthdistance", "fuzzystrmatch", "hstore", "intagg",
        "intarray", "isn", "lo", "ltree", "pageinspect", "pg_buffercache", "pg_prewarm",
        "pg_stat_statements", "pg_trgm", "pg_visibility", "pgcrypto", "pgrowlocks",
        "pgstattuple", "plpgsql", "postgis", "postgres_fdw", "seg", "sslinfo", "tablefunc",
        "tcn", "tsm_system_rows", "tsm_system_time", "unaccent", "uuid-ossp", "vector",
    }
)  # fmt: skip

# Calls that act outside the transaction, and dynamic SQL (which can hide any of them), as a
# function's body may name them; matched case-insensitively on whole words.
_OUTSIDE_CALLS = (
    "dblink\\w*|pg_background\\w*|pg_file_\\w+|lo_export|pg_logical_emit_message"
    "|pg_terminate_backend|pg_cancel_backend|pg_promote|pg_\\w*replication_\\w+|copy|execute"
)

_SAFE_ARRAY = "ARRAY[" + ", ".join(f"'{name}'" for name in sorted(SAFE_EXTENSIONS)) + "]"

_OUTSIDE_EFFECTS = f"""
WITH safe AS (
    SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
    WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass
      AND d.deptype = 'e' AND e.extname = ANY({_SAFE_ARRAY})
), own AS (
    SELECT p.oid, p.proname, p.prosrc, l.lanname, l.lanpltrusted FROM pg_proc p
    JOIN pg_language l ON l.oid = p.prolang
    WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
      AND p.oid NOT IN (SELECT objid FROM safe)
)
SELECT
    (SELECT string_agg(extname, ', ' ORDER BY extname) FROM pg_extension
     WHERE extname <> ALL({_SAFE_ARRAY})),
    (SELECT string_agg(DISTINCT lanname, ', ') FROM own
     WHERE lanname = 'c' OR (NOT lanpltrusted AND lanname <> 'internal')),
    (SELECT string_agg(DISTINCT proname || ' (' || lower(m[1]) || ')', ', ') FROM own,
     regexp_matches(prosrc, '\\m({_OUTSIDE_CALLS})\\M', 'gi') AS m
     WHERE lanname NOT IN ('c', 'internal')),
    {_MEMBERSHIP}
"""  # noqa: S608 # constants only, no input

# What each driver connection's session started as (`learn_session`), keyed weakly as the
# session marks are (`dropsafe._engine.session_state`): gone with the connection.
_LEARNED: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()
_DO_BLOCKS_ALLOWED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _ask_outside_a_transaction(dbapi_connection: DBAPIConnection, sql: str) -> tuple[Any, ...]:
    """Run one query in autocommit and return its row: the connection's transaction untouched.

    Autocommit, so that the connection is as idle afterwards as before (no BEGIN, no ROLLBACK
    to pay; a transaction the replay starts next may begin with SET TRANSACTION). Every
    supported driver's (and SQLAlchemy's async adapters') ``autocommit`` is set locally.
    """
    connection: Any = dbapi_connection
    was = connection.autocommit
    connection.autocommit = True
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(sql)  # no parameters: every driver's paramstyle alike
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        connection.autocommit = was
    return tuple(row)


def learn_session(
    dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry, state: EngineState
) -> None:
    """Read and keep what the new connection's session started as (a pool ``connect`` event).

    A connection whose start cannot be read keeps nothing: it is never replayed onto, nor is
    its transaction replayed (`learned_session` gives None). The server's life is read with
    it (`dropsafe._commit_truth.server_life`): a COMMIT lost later is resolved by its xid, and
    'committed' means something only on the same life. In the same question once a server of
    the engine answered it; until then on its own, so that a server that hides it (it needs
    no privilege on PostgreSQL, a managed service may still) fails that question alone.
    """
    native = entry.driver_connection
    if state.lives_answered:
        both = ask(
            lambda: _ask_outside_a_transaction(dbapi_connection, _SESSION_START_DO_AND_LIFE),
            unknown=None,
            what="a new session's user, search_path, settings and server life",
        )
        if both is not None:
            _keep_life(state, native, both[-2], both[-1])
            _keep_start(entry, both[:-2])
            return
    life = ask(
        lambda: _ask_outside_a_transaction(dbapi_connection, LIFE_AND_WAL),
        unknown=None,
        what="a new session's server life and WAL position",
    )
    if life is None:  # perhaps the WAL position alone is hidden
        life = ask(
            lambda: _ask_outside_a_transaction(dbapi_connection, LIFE),
            unknown=None,
            what="a new session's server life",
        )
    elif life[2] is not None:  # a primary answered it: the xid's reads in flight may ask it
        state.wal_readable = True
    if life is not None:
        _keep_life(state, native, life[0], life[1])
    start = ask(
        lambda: _ask_outside_a_transaction(dbapi_connection, _SESSION_START_AND_DO),
        unknown=None,
        what="a new session's user, search_path and settings",
    )
    _keep_start(entry, start)


def _keep_life(state: EngineState, native: DBAPIConnection, *columns: object) -> None:
    remember_server_life(state, native, ServerLife.read(columns[0], columns[1]))


def _keep_start(entry: ConnectionPoolEntry, answer: tuple[Any, ...] | None) -> None:
    """Keep the session's start, and apart from it whether it may run DO blocks (last)."""
    if answer is not None:
        start = answer[:-1]
        if answer[-1] is True:
            with contextlib.suppress(TypeError):  # not weakly referable: none run
                _DO_BLOCKS_ALLOWED[entry.driver_connection] = True
        try:
            _LEARNED[entry.driver_connection] = tuple(map(str, start))
        except TypeError:  # not weakly referable: unknown, so never replayed
            return


def forget_do_blocks(native: DBAPIConnection) -> None:
    """Take back the connection's leave to run DO blocks: one was refused (42501)."""
    with contextlib.suppress(TypeError):
        _DO_BLOCKS_ALLOWED.pop(native, None)


def may_run_do_blocks(native: DBAPIConnection) -> bool:
    """Whether the connection's session was seen at connect to be allowed DO blocks."""
    try:
        return _DO_BLOCKS_ALLOWED.get(native, False)
    except TypeError:
        return False


def learned_session(checkout: PoolProxiedConnection) -> tuple[str, ...] | None:
    """Return what ``checkout``'s session started as, or None if it was not learned."""
    try:
        return _LEARNED.get(checkout.driver_connection)
    except TypeError:
        return None


def outside_effects(fresh: PoolProxiedConnection, lost: tuple[str, ...]) -> str | None:
    """Return why the database may let a replayed statement act outside its transaction.

    Asked on ``fresh`` before the replay sends anything (one round trip, the replay's only).
    None if nothing may. Also compares the session user's role membership now with
    ``lost``'s at its connect.
    """
    connection = fresh.dbapi_connection
    if connection is None:
        return "no connection"
    extensions, languages, calls, membership = _ask_outside_a_transaction(
        connection, _OUTSIDE_EFFECTS
    )
    if extensions:
        return f"the database has extensions that may act outside a transaction: {extensions}"
    if languages:
        return f"the database has functions in an untrusted language or C: {languages}"
    if calls:
        return (
            "the database has functions that may act outside a transaction or build their "
            f"SQL at run time: {calls}"
        )
    if membership != lost[-1]:
        return "the session user's role membership changed since the lost connection was made"
    return None
