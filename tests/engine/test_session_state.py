"""Which statements may change a connection's session state: the replay's whitelist, read as text.

A wrong "cannot change" lets a replay run under another session's state (issue 26, history 9);
a wrong "may change" only turns the replay off for that connection. So the cases that must mark
are listed with the ways their text can hide them (a comment, a string, a quoted name, a second
statement), and the cases that must not are what SQLAlchemy and the ORM send themselves.
"""

from __future__ import annotations

import pytest

from dropsafe._engine.session_state import _VERDICTS, may_change_session, session_differs

UNCHANGED = [
    # What the ORM and Core send.
    "INSERT INTO items (n) VALUES (%(n)s) RETURNING items.id",
    'INSERT INTO "Items" ("N", b) VALUES ($1, $2)',
    # A schema-qualified table whose name SQLAlchemy quotes (a reserved word, capitals).
    'INSERT INTO app."order" (user_id, total) VALUES (%(user_id)s, %(total)s) RETURNING app."order".id',  # noqa: E501
    'INSERT INTO "App"."Order" (n) VALUES ($1::INTEGER)',
    "UPDATE items SET n=%(n)s WHERE items.id = %(items_id)s",
    "DELETE FROM items WHERE items.id = %(id)s",
    "SELECT items.id, items.n FROM items WHERE items.n IN (%(p1)s, %(p2)s) FOR UPDATE",
    "SELECT count(*) AS count_1 FROM items",
    "SELECT CAST(%(n)s AS INTEGER) + 1",
    "SELECT x::numeric(10, 2), lower(name), coalesce(a, b), now() FROM t",
    "INSERT INTO t (n) VALUES (1) ON CONFLICT (n) DO UPDATE SET n = excluded.n",
    "WITH recent AS (SELECT * FROM t) SELECT * FROM recent",
    "SELECT nextval('items_id_seq')",
    "SELECT pg_catalog.version()",
    "select current_schema()",
    "show standard_conforming_strings",
    "/* a comment */ SELECT 1",
    "SELECT 'set_config(' AS looks_like_a_call",
    # Transaction control, and what lasts only as long as the transaction.
    "BEGIN",
    "COMMIT",
    "ROLLBACK TO SAVEPOINT sa_1",
    "RELEASE SAVEPOINT sa_1",
    "PREPARE TRANSACTION 'x'",
    "COMMIT PREPARED 'x'",
    "SET LOCAL search_path TO tenant",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT pg_advisory_xact_lock(1)",
    "NOTIFY channel",
    "LOCK TABLE items IN EXCLUSIVE MODE",
    # Keywords before a parenthesis, which only look like calls.
    "SELECT count(*) FILTER (WHERE n > 1), string_agg(a, ',') WITHIN GROUP (ORDER BY a) FROM t",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY (a + 1)) FROM t",
    "SELECT * FROM a JOIN (SELECT 1 AS x) AS s ON true WHERE a.b LIKE ('x' || a.c)",
    "INSERT INTO t (n) VALUES (1) ON CONFLICT (n) DO UPDATE SET (n) = ROW (excluded.n)",
    "SELECT $$it's$$, $tag$-- not a comment$tag$, 'done'",
]

CHANGED = [
    "SET search_path TO tenant",
    "set search_path = tenant",
    "SET SESSION search_path TO tenant",
    "SET ROLE tenant",
    "SET SESSION AUTHORIZATION tenant",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "RESET ALL",
    "DISCARD ALL",
    "LISTEN channel",
    "PREPARE p AS SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "CREATE TEMP TABLE x (a int)",
    "CREATE TABLE t (a int)",
    "SELECT 1 INTO TEMP x",
    "INSERT INTO pg_temp.x VALUES (1)",
    "DO $$ BEGIN PERFORM 1; END $$",
    "CALL my_procedure()",
    "SELECT set_config('search_path', 'tenant', false)",
    "SELECT pg_catalog.set_config('role', 'tenant', false)",
    "SELECT use_tenant(%(t)s)",
    "SELECT n FROM items WHERE n = my_schema.lower(%(n)s)",  # not pg_catalog's lower
    'SELECT "use_tenant"()',
    "SELECT pg_advisory_lock(1)",
    "SELECT currval('items_id_seq')",
    # Hidden from a reader that takes the first statement, or the wrong end of a string.
    "SELECT 1; SET search_path TO tenant",
    "-- a comment\nSET search_path TO tenant",
    "SELECT E'\\'', set_config('role', 'tenant', false)",
    "SELECT \"a--\", set_config('role', 'tenant', false)",
    "",
    # Read as PostgreSQL's lexer reads them (each ran use_tenant() on PostgreSQL 15, and was
    # read as unchanging before): a carriage return ends a "--" comment, block comments nest,
    # a dollar quote may have a tag, and a function of the app's may be named like a keyword.
    "SELECT 1 -- note\r, use_tenant()",
    "SELECT /* /* */ ' */ use_tenant(), 'a'",
    "SELECT $t$it's$t$, use_tenant(), 'done'",
    "SELECT $q$'$q$, set_config('search_path', 'tenant', false), $q$'$q$",
    "SELECT filter(1)",
    "SELECT a, conflict(1) FROM t",
    "SELECT * FROM t WHERE over(t.a) = 1",
    "SELECT DISTINCT set(1), (like(2))",
]


@pytest.mark.parametrize("statement", UNCHANGED)
def test_statements_that_cannot_change_session_state(statement):
    assert may_change_session(statement) is False


@pytest.mark.parametrize("statement", CHANGED)
def test_statements_that_may_change_session_state(statement):
    assert may_change_session(statement) is True


def test_verdicts_are_remembered_and_bounded():
    _VERDICTS.clear()
    for n in range(5000):
        may_change_session(f"SELECT {n}")
    assert 0 < len(_VERDICTS) <= 4096
    assert may_change_session("SET ROLE x") is True
    assert _VERDICTS["SET ROLE x"] is True


def test_an_unknown_state_never_counts_as_the_same():
    assert session_differs(None, None)
    assert session_differs(("read committed",), None)
    assert session_differs(("serializable",), ("read committed",))
    assert not session_differs(("read committed", "postgres"), ("read committed", "postgres"))


def test_a_long_text_is_read_but_not_kept():
    _VERDICTS.clear()
    bulk = "INSERT INTO items (n) VALUES " + ", ".join(f"({n})" for n in range(5000))
    assert may_change_session(bulk) is False
    assert bulk not in _VERDICTS
