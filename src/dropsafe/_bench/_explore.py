"""The explorer: each catalog shape run healthy, then with each fault at each flight, checked.

Every shape is run once healthy to count its flights, then once per fault and flight, and the
server is checked after each history (shared/DESIGN.md point 8).

A history is (shape, driver, fault, step, read). Its id, ``shape:driver:fault:step``, or
``shape:driver:fault:step:flight`` when the unit's xid is read in the flight of its first write
(`dropsafe.PoolPolicy.read_xid_in_flight`; without the fifth field, by the mark),
replays it: ``python benchmarks/explore.py --replay <id>``. The checker's rules:

* a healthy run (no fault) of a shape that promises effects: acknowledged;
* acknowledged: every effect exactly once (rows per database and schema, notifications heard
  by a LISTENer on a direct connection), every row written as the app's role;
* `dropsafe.ConfigurationError`: a refused shape, correct when nothing was written;
* `dropsafe.CommitOutcomeUnknown`: counted as an unknown; all effects or none, never twice;
  one that says the app committed part of the work itself (its reason `APP_COMMITTED`: the
  DBAPI connection's commit() inside the unit), any part of them, never twice;
* any other error: no effect at all. Outside a unit (the zero-code shapes) an error raised
  after a COMMIT was sent may leave the effects: it is counted with the unknowns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import select
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, final

import dropsafe
from dropsafe._bench._flights import FlightProxy, Strike
from dropsafe._bench._pooler import ROUTES, Pooler, Route, driver_kw, pgbouncer_missing
from dropsafe._bench._shapes import (
    APP_ROLE,
    BARE_ROLE,
    BARE_SHAPES,
    CATALOG,
    DRIVERS,
    OTHER_ROLE,
    TENANT,
    Context,
    Effects,
    Shape,
)
from dropsafe._bench._shapes import run_shape as _run_shape
from dropsafe._commit_truth.resolution import APP_COMMITTED, APP_ENDED_UNKNOWN
from dropsafe._drivers import driver_named
from dropsafe.testing._server import PostgresServer, ServerError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import psycopg2.extensions

    from dropsafe._bench._flights import Phase, Then

__all__ = [
    "FAULTS",
    "READS",
    "Explorer",
    "Fault",
    "History",
    "Outcome",
    "Verdict",
    "check",
    "parse_history",
]

DATABASES = {"a": "explore_a", "b": "explore_b", "q": "explore_quiet"}
#: The databases with no code of their own that notifies (`_NOTIFYING_SQL` is left out): after
#: a crash the resolver asks whether the database's code may notify, and where it may, a lost
#: COMMIT ends unknown; issue 28's crash histories need a database where it may not.
QUIET = ("q",)
_DRY = Context({}, dropsafe.Policy(), "")
_SCHEMAS = (APP_ROLE, TENANT, "public")
_WAIT_S = 15.0
HOLD_S = 1.0
#: How long the ``outage`` fault keeps the server down: as long as a fast restart here, and as
#: long as the bench's PgBouncer turns clients away after a failed server login.
OUTAGE_S = 1.0
UNIT_DEADLINE_S = 4.0
#: How a verified unit reads its xid: ``mark`` (a statement of its own before COMMIT:
#: ``read_xid_in_flight=False``) or ``flight`` (in its first write's flight, the default since
#: session 14: ``read_xid_in_flight=True``; in a plugin URL, ``dropsafe_read_xid_in_flight``).
#: A history id names ``flight`` in a fifth field; an id of four fields is a ``mark`` history
#: (the ids before the axis).
READS = ("mark", "flight")


@dataclass(frozen=True)
class History:
    """One run of a shape on a driver with a fault at query flight ``step``."""

    shape: str
    driver: str
    fault: str
    step: int
    #: How a verified unit reads its xid (`READS`).
    read: str = "mark"

    @property
    def id(self) -> str:
        """The id ``--replay`` takes (a ``mark`` history's without a fifth field)."""
        tail = "" if self.read == "mark" else f":{self.read}"
        return f"{self.shape}:{self.driver}:{self.fault}:{self.step}{tail}"


def parse_history(text: str) -> History:
    """Return the `History` an id names, checked against the catalog."""
    parts = text.split(":")
    read = parts.pop() if len(parts) == 5 and parts[4] in READS else "mark"  # noqa: PLR2004
    try:
        shape, driver, fault, step = parts
    except ValueError:
        step = ""
    if not step.isdigit():
        raise dropsafe.ConfigurationError(
            f"a history id is shape:driver:fault:step[:{'|'.join(READS)}]: {text!r}"
        )
    if shape not in CATALOG or driver not in DRIVERS or fault not in FAULTS:
        raise dropsafe.ConfigurationError(f"unknown shape, driver or fault in {text!r}")
    return History(shape, driver, fault, int(step), read)


@dataclass(frozen=True)
class Outcome:
    """What the caller saw: ``ok``, ``refused``, ``unknown`` or ``error`` (with its text)."""

    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    """The checker's word on one history."""

    violation: str | None
    unknown: bool


def check(  # noqa: C901, PLR0911, PLR0917 - one rule per return; the evidence, in order
    shape: Shape,
    outcome: Outcome,
    expected: Effects,
    rows: Counter[tuple[str, str, str]],
    notes: Counter[str],
    roles: set[str],
    *,
    commit_sent: bool,
    crashed: bool = False,
    server_can_tell: bool = False,
) -> Verdict:
    """Judge one history from what the caller saw and what the server holds.

    After a crash restart a notification may be lost (PostgreSQL's queue and its LISTENers
    do not survive one): then fewer notifications than expected pass, more never do.
    """
    if crashed and all(notes[key] <= n for key, n in expected.notes.items()):
        notes = Counter({key: n for key, n in notes.items() if key not in expected.notes})
        expected = Effects(expected.rows, Counter(), expected.roles)
    bad_roles = roles - expected.roles
    if bad_roles:
        return Verdict(
            f"rows written as {sorted(bad_roles)}, not as {sorted(expected.roles)}", unknown=False
        )
    seen = Effects(rows, notes, frozenset(roles))
    whole = rows == expected.rows and notes == expected.notes
    nothing = not rows and not notes
    if outcome.kind == "ok":
        if whole:
            return Verdict(None, unknown=False)
        return Verdict(f"acknowledged, but {_difference(expected, seen)}", unknown=False)
    if outcome.kind == "refused" and nothing:
        return Verdict(None, unknown=False)
    if outcome.kind == "partial":
        return _partly_committed(expected, seen, outcome, server_can_tell=server_can_tell)
    if outcome.kind == "unknown" and server_can_tell and "in time" not in outcome.detail:
        return Verdict(
            f"CommitOutcomeUnknown, though the server stayed up and could tell ({outcome.detail})",
            unknown=True,
        )
    ambiguous = outcome.kind == "unknown" or (
        shape.zero_code and outcome.kind == "error" and commit_sent
    )
    if ambiguous:
        if whole or nothing:
            return Verdict(None, unknown=True)
        return Verdict(f"{outcome.kind}, and {_difference(expected, seen)}", unknown=True)
    if nothing:
        return Verdict(None, unknown=False)
    return Verdict(
        f"{outcome.kind} ({outcome.detail}) but effects remain: {_describe(seen)}", unknown=False
    )


def _partly_committed(
    expected: Effects, seen: Effects, outcome: Outcome, *, server_can_tell: bool
) -> Verdict:
    """Judge a `CommitOutcomeUnknown` saying the app committed part of the work itself.

    Its reason is `APP_COMMITTED` (the DBAPI connection's ``commit()`` inside the unit, then
    the unit's COMMIT lost and aborted, or that commit's own reply lost), or
    `APP_ENDED_UNKNOWN` (whether it committed cannot be known: a defect where the server
    stayed up and could tell, as for any unknown): any part of the effects, each at most once;
    counted with the unknowns.
    """
    detail = outcome.detail
    if detail.startswith(APP_ENDED_UNKNOWN) and server_can_tell and "in time" not in detail:
        return Verdict(
            f"CommitOutcomeUnknown, though the server stayed up and could tell ({detail})",
            unknown=True,
        )
    if not (seen.rows - expected.rows) and not (seen.notes - expected.notes):
        return Verdict(None, unknown=True)
    return Verdict(f"partly committed by the app, and {_difference(expected, seen)}", unknown=True)


def _difference(expected: Effects, seen: Effects) -> str:
    parts = [
        f"row {key} {seen.rows[key]}x (want {expected.rows[key]})"
        for key in sorted(set(expected.rows) | set(seen.rows))
        if expected.rows[key] != seen.rows[key]
    ] + [
        f"notification {key} {seen.notes[key]}x (want {expected.notes[key]})"
        for key in sorted(set(expected.notes) | set(seen.notes))
        if expected.notes[key] != seen.notes[key]
    ]
    return "; ".join(parts) or "no difference"


def _describe(seen: Effects) -> str:
    return "; ".join(
        [f"row {key} {n}x" for key, n in sorted(seen.rows.items(), key=str)]
        + [f"notification {key} {n}x" for key, n in sorted(seen.notes.items())]
    )


# -- faults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A fault family: when it strikes, what it does, what the link does then."""

    name: str
    what: str
    phase: Phase
    then: Then
    action: str | None = None
    slow: bool = False
    #: Needs a unit's deadline to end (the zero-code shapes have none).
    needs_deadline: bool = False
    #: A crash restart: notifications in flight may be lost (never duplicated).
    crashes: bool = False
    #: The server stays up, same life: a CommitOutcomeUnknown (but "not in time") is a defect.
    server_can_tell: bool = True
    #: A known broken history of today's code (issue and item), left out of the CI sample.
    expected_violation: str | None = None


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault("none", "no fault: the healthy run (step 0)", "before", "pass"),
        Fault(
            "request_lost",
            f"flight dropped, link silent, reset after {HOLD_S:.0f} s",
            "before",
            "lost",
        ),
        Fault(
            "reply_lost",
            f"flight delivered, reply dropped, link reset after {HOLD_S:.0f} s",
            "after",
            "lost",
        ),
        Fault("rst", "link reset before the flight is delivered", "before", "rst"),
        Fault("fin", "flight delivered, link closed (FIN) instead of the reply", "after", "fin"),
        Fault(
            "terminate",
            "pg_terminate_backend, then the flight is sent",
            "before",
            "pass",
            "terminate",
        ),
        Fault(
            "sigkill",
            "flight done, backend SIGKILLed (crash restart), reply lost",
            "after",
            "fin",
            "sigkill",
            slow=True,
            crashes=True,
            server_can_tell=False,
        ),
        Fault(
            "restart",
            "flight done, immediate restart, reply lost",
            "after",
            "rst",
            "restart",
            slow=True,
            crashes=True,
            server_can_tell=False,
        ),
        Fault(
            "outage",
            f"flight done, immediate stop, reply lost (reset); the server is back {OUTAGE_S:.0f} s"
            " later (a checkout waits; behind PgBouncer, its failed login turns clients away)",
            "after",
            "rst",
            "outage",
            slow=True,
            crashes=True,
            server_can_tell=False,
        ),
        Fault(
            "stats_reset",
            "flight done, pg_stat_reset_shared('bgwriter'), reply lost (reset)",
            "after",
            "rst",
            "stats_reset",
        ),
        Fault(
            "sigstop",
            "backend SIGSTOPped, flight sent, past the unit's deadline",
            "before",
            "pass",
            "sigstop",
            needs_deadline=True,
            server_can_tell=False,
        ),
    )
}


# -- the server ---------------------------------------------------------------------------------

_SCHEMA_SQL = (
    f"""
CREATE SCHEMA {APP_ROLE} AUTHORIZATION {APP_ROLE};
CREATE SCHEMA {TENANT} AUTHORIZATION {APP_ROLE};
GRANT USAGE ON SCHEMA {APP_ROLE} TO {OTHER_ROLE};
"""
    + "".join(
        f"""
CREATE TABLE {schema}.effects (
    id bigserial PRIMARY KEY,
    tag text NOT NULL,
    usr name NOT NULL DEFAULT current_user
);
ALTER TABLE {schema}.effects OWNER TO {APP_ROLE};
"""
        for schema in _SCHEMAS
    )
    + f"""
GRANT INSERT, SELECT ON {APP_ROLE}.effects TO {OTHER_ROLE};
GRANT USAGE ON SEQUENCE {APP_ROLE}.effects_id_seq TO {OTHER_ROLE};
"""
)
_FLIGHT_SQL = (
    # Issue 28's histories (tests/units/test_flight_xid_attacks.py). A role without plpgsql:
    # revoked from PUBLIC (a common hardening), kept by the app's own roles and by
    # pg_database_owner (the app owns the database: psycopg2's DO-block leave is asked of
    # every role the session may become, and without it no psycopg2 history reads in flight).
    f"""
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
GRANT USAGE ON LANGUAGE plpgsql TO {APP_ROLE}, {OTHER_ROLE}, pg_database_owner;
GRANT USAGE ON SCHEMA {APP_ROLE} TO {BARE_ROLE};
GRANT INSERT, SELECT ON {APP_ROLE}.effects TO {BARE_ROLE};
GRANT USAGE ON SEQUENCE {APP_ROLE}.effects_id_seq TO {BARE_ROLE};
"""
    # A view whose INSTEAD OF trigger puts a value only when it is not there (4 is): the
    # INSERT counts its row and writes nothing (no xid, no WAL).
    f"""
CREATE TABLE {APP_ROLE}.once_values (v int);
INSERT INTO {APP_ROLE}.once_values VALUES (4);
CREATE VIEW {APP_ROLE}.once_put AS SELECT v FROM {APP_ROLE}.once_values;
CREATE FUNCTION {APP_ROLE}.once_put_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NOT EXISTS (SELECT FROM {APP_ROLE}.once_values WHERE v = NEW.v) THEN
    INSERT INTO {APP_ROLE}.once_values VALUES (NEW.v);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER once_put INSTEAD OF INSERT ON {APP_ROLE}.once_put
  FOR EACH ROW EXECUTE FUNCTION {APP_ROLE}.once_put_row();
ALTER TABLE {APP_ROLE}.once_values OWNER TO {APP_ROLE};
ALTER VIEW {APP_ROLE}.once_put OWNER TO {APP_ROLE};
"""
    # An UNLOGGED table (its rows are no effect the checker counts: a crash empties it).
    f"""
CREATE UNLOGGED TABLE {APP_ROLE}.scratch (v int);
ALTER TABLE {APP_ROLE}.scratch OWNER TO {APP_ROLE};
"""
)

_NOTIFYING_SQL = (
    f"""
CREATE SEQUENCE {APP_ROLE}.explore_seq;
ALTER SEQUENCE {APP_ROLE}.explore_seq OWNER TO {APP_ROLE};
CREATE FUNCTION {APP_ROLE}.announce(payload text) RETURNS void LANGUAGE sql
  AS $$ SELECT pg_notify('explore', payload) $$;
CREATE TABLE {APP_ROLE}.announcer (x int);
ALTER TABLE {APP_ROLE}.announcer OWNER TO {APP_ROLE};
CREATE FUNCTION {APP_ROLE}.announce_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_notify('explore', current_setting('explore.nonce', true) || ':t');
  RETURN NULL;
END $$;
CREATE TRIGGER announce AFTER UPDATE ON {APP_ROLE}.announcer
  FOR EACH STATEMENT EXECUTE FUNCTION {APP_ROLE}.announce_trigger();
"""
    # A view whose INSTEAD OF trigger only notifies: the INSERT counts its row, writes nothing.
    f"""
CREATE VIEW {APP_ROLE}.notify_put AS SELECT NULL::text AS payload WHERE false;
CREATE FUNCTION {APP_ROLE}.notify_put_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_notify('explore', NEW.payload);
  RETURN NEW;
END $$;
CREATE TRIGGER notify_put INSTEAD OF INSERT ON {APP_ROLE}.notify_put
  FOR EACH ROW EXECUTE FUNCTION {APP_ROLE}.notify_put_row();
ALTER VIEW {APP_ROLE}.notify_put OWNER TO {APP_ROLE};
"""
    # A SECURITY DEFINER function that writes an effect as its owner, OTHER_ROLE.
    f"""
CREATE FUNCTION {APP_ROLE}.put_effect(tag text) RETURNS void LANGUAGE sql SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$ INSERT INTO {APP_ROLE}.effects (tag) VALUES (tag) $$;
ALTER FUNCTION {APP_ROLE}.put_effect(text) OWNER TO {OTHER_ROLE};
"""
)


class _Listener:
    """A LISTENer on a direct connection (not through the proxy): hears every NOTIFY once.

    While a history runs a thread reads each notification as it arrives: a crash restart's
    end of the link read in the same read as a notification would drop it unparsed (psycopg2
    parses nothing of a read that failed), and a NOTIFY heard before a crash that lost its
    COMMIT, then sent again by the unit's next run, would be counted once, not twice.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.connection: Any = None
        self._heard: Counter[str] = Counter()
        self._watcher: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    def _ensure(self) -> psycopg2.extensions.connection:
        import psycopg2

        if self.connection is not None and not self.connection.closed:
            try:
                self.connection.poll()
            except psycopg2.Error:
                self.connection = None
            else:
                return self.connection
        if self.connection is not None:
            with contextlib.suppress(psycopg2.Error):
                self.connection.close()
        self.connection = psycopg2.connect(self.dsn)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute("LISTEN explore")
        return self.connection

    def start(self) -> None:
        """Listen (again, after a crash) and drop anything heard before this history."""
        self._unwatch()
        connection = self._ensure()
        connection.poll()
        connection.notifies.clear()
        self._heard.clear()
        self._wake_r.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(64):  # a wake-up left by a watcher that had ended
                pass
        self._wake_r.settimeout(None)
        self._watcher = threading.Thread(target=self._watch, args=(connection,), daemon=True)
        self._watcher.start()

    def _watch(self, connection: psycopg2.extensions.connection | None) -> None:
        import psycopg2

        while connection is not None:
            ready, _, _ = select.select([connection, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                connection.poll()
            except psycopg2.Error:
                # The link is gone (a crash restart): listen again at once, so that a unit run
                # again after it is heard too (its NOTIFY twice is a violation to see).
                with contextlib.suppress(psycopg2.Error):
                    connection.close()
                connection = self._listen_again()
                continue
            while connection.notifies:
                self._heard[connection.notifies.pop(0).payload] += 1

    def _listen_again(self) -> psycopg2.extensions.connection | None:
        """Connect and LISTEN as soon as the server takes connections; None: woken first."""
        import psycopg2

        deadline = time.monotonic() + 4 * _WAIT_S
        while time.monotonic() < deadline:
            try:
                connection = psycopg2.connect(self.dsn, connect_timeout=2)
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("LISTEN explore")
            except psycopg2.Error:
                # Not up yet: wait a little, or for collect() to wake this thread.
                if select.select([self._wake_r], [], [], 0.02)[0]:
                    return None
                continue
            self.connection = connection
            return connection
        return None

    def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        if watcher.is_alive():
            self._wake_w.send(b"x")
        watcher.join(_WAIT_S)
        if watcher.is_alive():
            msg = "the LISTENer's thread did not stop"
            raise TimeoutError(msg)

    def collect(self, sentinel: str) -> Counter[str]:
        """Every payload heard up to ``sentinel``, sent now from this connection itself.

        A crash restart closes this connection: what it received before is kept, and a new
        connection sends the sentinel (notifications of a commit after the crash reach it).
        """
        import psycopg2

        self._unwatch()
        heard: Counter[str] = Counter(self._heard)
        self._heard.clear()
        old = self.connection
        with contextlib.suppress(psycopg2.Error):
            old.poll()
        if old is not None:
            for notify in old.notifies:
                heard[notify.payload] += 1
            old.notifies.clear()
        connection = self._ensure()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify('explore', %s)", (sentinel,))
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            connection.poll()
            while connection.notifies:
                payload = connection.notifies.pop(0).payload
                if payload == sentinel:
                    return heard
                heard[payload] += 1
            select.select([connection], [], [], max(0.0, deadline - time.monotonic()))
        msg = "the LISTENer never heard its own sentinel"
        raise TimeoutError(msg)

    def close(self) -> None:
        self._unwatch()
        self._wake_r.close()
        self._wake_w.close()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()


@dataclass
class Record:
    """One history's result, for the matrix and the JSON."""

    history: History
    outcome: Outcome
    violation: str | None
    unknown: bool
    seconds: float
    fired: bool
    expected_violation: str | None


@dataclass
@final
class Explorer:
    """Owns one server, one proxy and its LISTENers, and runs histories on them."""

    log: Callable[[str], None] = print
    server: PostgresServer = field(init=False)
    proxy: FlightProxy = field(init=False)
    listeners: list[_Listener] = field(init=False)
    flights: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)
    _stopped: list[tuple[int, int]] = field(default_factory=list)
    _stops: Iterator[int] = field(default_factory=itertools.count)
    _admin: dict[str, Any] = field(default_factory=dict)
    #: A PgBouncer per pool mode, started when a shape first goes through it.
    poolers: dict[str, Pooler] = field(default_factory=dict)
    #: The route of the history running now (its fault actions find backends through it).
    _route: Route = ROUTES["direct"]
    #: Starts of the server after an ``outage``, pending until the history's end.
    _outages: list[threading.Timer] = field(default_factory=list)
    #: Whether the app's role is a member of BARE_ROLE now (`BARE_SHAPES`).
    _bare_member: bool = False

    def __enter__(self) -> Explorer:
        self.server = PostgresServer(tls=False, settings={"max_prepared_transactions": "10"})
        self.server.start()
        password = self.server.password.replace("'", "''")
        self.server.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")
        self.server.execute(f"CREATE ROLE {OTHER_ROLE} NOLOGIN")
        self.server.execute(f"GRANT {OTHER_ROLE} TO {APP_ROLE}")
        self.server.execute(f"CREATE ROLE {BARE_ROLE} NOLOGIN")  # a member only when needed
        for key, db in DATABASES.items():
            self.server.execute(f"CREATE DATABASE {db} OWNER {APP_ROLE}")
            notifying = "" if key in QUIET else _NOTIFYING_SQL
            self.server.execute(_SCHEMA_SQL + _FLIGHT_SQL + notifying, database=db)
            # Hint bits set, then kept on disk: a unit's read of the view's table writes no WAL.
            self.server.execute(f"SELECT count(*) FROM {APP_ROLE}.once_values", database=db)
        self.server.execute("CHECKPOINT")
        self.proxy = FlightProxy(self.server.port)
        self.proxy.start()
        # A NOTIFY is heard in its own database only: a LISTENer in the app's and the quiet ones.
        self.listeners = [
            _Listener(
                f"host=127.0.0.1 port={self.server.port} dbname={DATABASES[key]} "
                f"user=postgres password={self.server.password}"
            )
            for key in ("a", *QUIET)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_outages()
        self._resume_stopped()
        for connection in self._admin.values():
            connection.close()
        for listener in self.listeners:
            listener.close()
        for pooler in self.poolers.values():
            pooler.close()
        self.proxy.close()
        self.server.close()

    # -- routes -------------------------------------------------------------------------------

    def _pooler(self, route: Route) -> Pooler | None:
        """Return the route's PgBouncer (started on first use), or None for a direct route."""
        if route.pool_mode is None:
            return None
        if route.pool_mode not in self.poolers:
            self.poolers[route.pool_mode] = Pooler(
                self.server, route.pool_mode, {APP_ROLE: self.server.password}
            )
        return self.poolers[route.pool_mode]

    def _proxies(self, route: Route) -> tuple[FlightProxy, ...]:
        """Return the route's flight proxies, the struck one first."""
        pooler = self._pooler(route)
        if pooler is None:
            return (self.proxy,)
        struck = pooler.proxy(route)
        return (struck, pooler.front if struck is pooler.upstream else pooler.upstream)

    # -- URLs and policy ----------------------------------------------------------------------

    def urls(self, driver: str, route: str = "direct") -> dict[str, str]:
        """Return the app's URL of each database, through ``route``'s front, without TLS."""
        name = DRIVERS[driver][0]
        parameters = dict(driver_named(name).tls.off_url_parameters)
        pooler = self._pooler(ROUTES[route])
        if driver_kw(name, ROUTES[route]) and name == "asyncpg":
            parameters["prepared_statement_cache_size"] = "0"  # by hand, as SQLAlchemy says
        query = "&".join(f"{k}={v}" for k, v in parameters.items())
        port = self.proxy.port if pooler is None else pooler.front.port
        secret = self.server.password
        return {
            key: f"postgresql+{name}://{APP_ROLE}:{secret}@127.0.0.1:{port}/{db}?{query}"
            for key, db in DATABASES.items()
        }

    @staticmethod
    def policy(route: Route = ROUTES["direct"], read: str = "mark") -> dropsafe.Policy:
        """Short bounds: every hang in a history ends within a few seconds; the route's pooler.

        A verified unit's xid is read as ``read`` says (`READS`).
        """
        return dropsafe.Policy(
            pool=dropsafe.PoolPolicy(read_xid_in_flight=read == "flight"),
            connection=dropsafe.ConnectionPolicy(
                connect_timeout=2, tcp_user_timeout=2, pooler=route.pooler
            ),
            unit=dropsafe.UnitPolicy(
                deadline=UNIT_DEADLINE_S,
                backoff_initial=0.01,
                backoff_max=0.05,
                commit_status_timeout=1.5,
            ),
            hooks=(),
        )

    # -- histories ----------------------------------------------------------------------------

    def steps(self, shape: str, driver: str, read: str = "mark") -> list[str]:
        """Return the labels of the shape's query flights on ``driver`` (one healthy run).

        ``read``: the xid read in flight sends other flights (psycopg2's DO block, ...).
        """
        key = (shape, driver, read)
        if key not in self.flights:
            record, labels = self._run(History(shape, driver, "none", 0, read), None)
            # A healthy run is acknowledged, unless the shape promises no effect (it raises)
            # or is refused before anything runs (then it has few flights, maybe none).
            failed = record.outcome.kind not in ("ok", "refused") and (
                CATALOG[shape].effects(_DRY) != Effects()
            )
            broken = record.violation is not None or failed
            if broken and not record.expected_violation:
                msg = (
                    f"healthy run of {shape} on {driver} failed: "
                    f"{record.outcome.kind} {record.outcome.detail} {record.violation or ''}"
                )
                raise ServerError(msg)
            self.flights[key] = labels
        return self.flights[key]

    def run(self, history: History) -> Record:
        """Run one history and check it."""
        fault = FAULTS[history.fault]
        if fault.name == "none":
            return self._run(history, None)[0]
        labels = self.steps(history.shape, history.driver, history.read)
        strike = Strike(
            history.step,
            fault.phase,
            fault.then,
            self._action(fault.action),
            hold_s=HOLD_S,
        )
        # Struck at a COMMIT's own flight, a zero-code request may raise for a done COMMIT.
        struck = labels[history.step - 1] if 0 < history.step <= len(labels) else ""
        commit_sent = "COMMIT" in struck.upper()
        record, _ = self._run(history, strike, commit_sent=commit_sent)
        return record

    def _run(
        self, history: History, strike: Strike | None, *, commit_sent: bool = False
    ) -> tuple[Record, list[str]]:
        shape = CATALOG[history.shape]
        self._route = route = ROUTES[shape.route]
        self._prepare()
        bare = history.shape in BARE_SHAPES
        if bare is not self._bare_member:
            verb = "GRANT {} TO {}" if bare else "REVOKE {} FROM {}"
            self.server.execute(verb.format(BARE_ROLE, APP_ROLE))
            self._bare_member = bare
        nonce = uuid.uuid4().hex[:12]
        struck, *others = proxies = self._proxies(route)
        ctx = Context(
            self.urls(history.driver, route.name),
            self.policy(route, history.read),
            nonce,
            struck.pause,
            engine_kw=driver_kw(DRIVERS[history.driver][0], route),
            pooler=route.pooler,
            read_xid_in_flight=history.read == "flight",
        )
        for proxy in others:
            proxy.reset(None)
        struck.reset(strike)
        started = time.monotonic()
        outcome = _call(lambda: _run_shape(shape, history.driver, ctx))
        seconds = time.monotonic() - started
        if strike is not None and strike.acting and not strike.done.wait(90):
            outcome = Outcome(outcome.kind, f"{outcome.detail}; the fault never finished")
        labels = [flight.label for flight in struck.query_flights()]
        self._end_outages()
        for proxy in proxies:
            proxy.reset(None)
        self._resume_stopped()
        self._wait_app_gone()
        if strike is not None and strike.error is not None:
            outcome = Outcome(outcome.kind, f"{outcome.detail}; fault failed: {strike.error!r}")
        notes = sum(
            (listener.collect(f"sentinel:{nonce}") for listener in self.listeners), Counter()
        )
        notes = Counter({k: v for k, v in notes.items() if k.startswith(nonce)})
        rows, roles = self._rows()
        orphans = self._roll_back_prepared()
        crashed = FAULTS[history.fault].crashes
        verdict = check(
            shape,
            outcome,
            shape.effects(ctx),
            rows,
            notes,
            roles,
            commit_sent=commit_sent,
            crashed=crashed,
            server_can_tell=FAULTS[history.fault].server_can_tell,
        )
        violation = verdict.violation
        promised = shape.effects(ctx) != Effects()
        if strike is None and promised and outcome.kind not in ("ok", "refused") and not violation:
            # No fault: a unit that worked before must work (a read that fails the app's write).
            violation = f"the healthy run failed: {outcome.kind} ({outcome.detail})"
        if orphans:
            # A PREPARE TRANSACTION left behind holds its locks until someone decides it.
            violation = (
                f"{violation + '; ' if violation else ''}prepared transactions left: {orphans}"
            )
        record = Record(
            history,
            outcome,
            violation,
            verdict.unknown,
            seconds,
            fired=strike is None or strike.fired,
            expected_violation=shape.expected_violation
            or (shape.mark_violation if history.read == "mark" else None)
            or FAULTS[history.fault].expected_violation,
        )
        return record, labels

    def _sql(self, sql: str, *, database: str = "postgres") -> list[tuple[str, ...]]:
        """Run SQL as the superuser on a kept Unix-socket connection; rows come as text.

        psql per call cost ~30 ms on a loaded machine, five times per history. A lost
        connection (a crash restart, maybe still under way) is replaced until a deadline.
        """
        import psycopg2

        deadline = time.monotonic() + _WAIT_S
        while True:
            connection = self._admin.get(database)
            try:
                if connection is None or connection.closed:
                    connection = psycopg2.connect(
                        host=str(self.server.socket_dir),
                        port=self.server.port,
                        user="postgres",
                        dbname=database,
                    )
                    connection.autocommit = True
                    self._admin[database] = connection
                with connection.cursor() as cursor:
                    cursor.execute(sql)
                    if cursor.description is None:
                        return []
                    return [tuple(str(value) for value in row) for row in cursor.fetchall()]
            except psycopg2.Error as exc:
                # No SQLSTATE, or a dead connection: the link was lost, not the statement.
                lost = exc.pgcode is None or connection is None or bool(connection.closed)
                lost = lost or isinstance(exc, psycopg2.OperationalError)
                if connection is not None:
                    connection.close()
                self._admin.pop(database, None)
                if not lost or time.monotonic() > deadline:
                    raise ServerError(" ".join(str(exc).split())) from None
                time.sleep(0.05)  # a crash restart in progress: poll, within a deadline

    def _prepare(self) -> None:
        self._wait_accepting()
        # DELETE, not TRUNCATE: a few rows, and TRUNCATE makes new files (80 ms a history).
        wipe = "; ".join(f"DELETE FROM {schema}.effects" for schema in _SCHEMAS)
        for db in DATABASES.values():
            self._sql(wipe, database=db)
        for listener in self.listeners:
            listener.start()

    def _rows(self) -> tuple[Counter[tuple[str, str, str]], set[str]]:
        rows: Counter[tuple[str, str, str]] = Counter()
        roles: set[str] = set()
        for key, db in DATABASES.items():
            union = " UNION ALL ".join(
                f"SELECT '{schema}', tag, usr FROM {schema}.effects" for schema in _SCHEMAS
            )
            for schema, tag, usr in self._sql(union, database=db):
                rows[(key, schema, tag)] += 1
                roles.add(usr)
        return rows, roles

    def _roll_back_prepared(self) -> list[str]:
        """Roll back every prepared transaction left by the history; return their gids."""
        left = self._sql("SELECT gid, database FROM pg_prepared_xacts")
        for gid, database in left:
            quoted = gid.replace("'", "''")
            self._sql(f"ROLLBACK PREPARED '{quoted}'", database=database)
        return [gid for gid, _ in left]

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if not self.server.running:
                    self.server.start()
                self._sql("SELECT 1")
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling a restarting server, within a deadline
            else:
                return

    def _wait_app_gone(self) -> None:
        """Wait until no backend of the app remains: a late COMMIT must be in the check.

        Behind PgBouncer the app's backends stay, pooled: then wait until PgBouncer holds no
        client of the app and none of its backends is in a transaction or a statement.
        """
        pooler = self._pooler(self._route)
        busy = "" if pooler is None else " AND state IS DISTINCT FROM 'idle'"
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                self._wait_accepting()
                left = self._sql(
                    f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP_ROLE}'{busy}"
                )
                if left[0][0] == "0" and (pooler is None or pooler.clients_of(APP_ROLE) == 0):
                    return
            time.sleep(0.05)  # polling the server's view, within a deadline

    def _resume(self, stop: tuple[int, int]) -> None:
        """Resume one stop of one history, if its history has not already (never another's)."""
        try:
            self._stopped.remove(stop)
        except ValueError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(stop[0], signal.SIGCONT)

    def _resume_stopped(self) -> None:
        while self._stopped:
            with contextlib.suppress(ProcessLookupError, IndexError):
                os.kill(self._stopped.pop()[0], signal.SIGCONT)

    # -- fault actions (on the proxy's loop) -------------------------------------------------

    def _action(self, name: str | None) -> Callable[[int], Any] | None:
        if name is None:
            return None
        act: Callable[[int], None] = getattr(self, f"_do_{name}")

        async def action(port: int) -> None:
            await asyncio.to_thread(act, port)

        return action

    def _backends(self, port: int) -> list[int]:
        """Return the backends behind the struck link (its client port on the next hop).

        Struck in front of PgBouncer: the backend linked to that client, or else the idle
        ones it may be given (see `dropsafe._bench._pooler`).
        """
        pooler = self._pooler(self._route)
        if pooler is not None and self._route.struck == "client":
            pids = pooler.backends(port, APP_ROLE)
        else:
            rows = self._sql(f"SELECT pid FROM pg_stat_activity WHERE client_port = {int(port)}")
            pids = [int(row[0]) for row in rows]
        if not pids:
            msg = f"no backend for client port {port} ({self._route.name})"
            raise ServerError(msg)
        return pids

    def _do_terminate(self, port: int) -> None:
        pids = ", ".join(map(str, self._backends(port)))
        self._sql(f"SELECT pg_terminate_backend(pid, 5000) FROM unnest(ARRAY[{pids}]) AS pid")

    def _do_sigkill(self, port: int) -> None:
        pid = self._backends(port)[0]
        os.kill(pid, signal.SIGKILL)
        # The postmaster resets every backend and recovers. A SIGKILLed backend stays in
        # pg_stat_activity until that reset has cleared shared memory: wait for both.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                if not self._sql(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"):
                    return
            time.sleep(0.05)  # polling a recovering server, within a deadline

    def _do_restart(self, port: int) -> None:
        del port
        self.server.restart("immediate")

    def _do_outage(self, port: int) -> None:
        del port
        self.server.stop("immediate")
        back = threading.Timer(OUTAGE_S, self._start_server)
        back.daemon = True
        back.start()
        self._outages.append(back)

    def _start_server(self) -> None:
        # A start that failed is made again, and reported, by the check's _wait_accepting.
        with contextlib.suppress(ServerError):
            self.server.start()

    def _end_outages(self) -> None:
        """Wait for the server's start after each outage (before anyone else starts it)."""
        while self._outages:
            self._outages.pop().join(_WAIT_S + OUTAGE_S)

    def _do_stats_reset(self, port: int) -> None:
        del port
        self._sql("SELECT pg_stat_reset_shared('bgwriter')")

    def _do_sigstop(self, port: int) -> None:
        for pid in self._backends(port):
            os.kill(pid, signal.SIGSTOP)
            stop = (pid, next(self._stops))
            self._stopped.append(stop)
            # Resumed past the unit's deadline: a frozen server comes back, late. Until then a
            # Terminate sent to it (asyncpg's close, on dispose) would wait with no bound.
            resume = threading.Timer(UNIT_DEADLINE_S + 1.0, self._resume, args=(stop,))
            resume.daemon = True
            resume.start()

    # -- the matrix ---------------------------------------------------------------------------

    def cells(
        self,
        *,
        shapes: list[str] | None = None,
        faults: list[str] | None = None,
        drivers: list[str] | None = None,
        include_expected: bool = True,
        reads: tuple[str, ...] = READS,
    ) -> list[tuple[str, str, str, str]]:
        """(shape, driver, fault, read) cells of the matrix, after the filters.

        A zero-code shape runs no unit: it has no ``flight`` cells (the read is a unit's).
        """
        out = []
        for shape in _shapes_wanted(shapes, include_expected=include_expected):
            for driver in shape.faces():
                if drivers and driver not in drivers:
                    continue
                for fault in FAULTS.values():
                    if faults and fault.name not in faults:
                        continue
                    if not include_expected and fault.expected_violation:
                        continue
                    if fault.needs_deadline and shape.zero_code:
                        continue
                    for read in reads:
                        if (read != "mark" and shape.zero_code) or (
                            # the mark's known break, out with the other known ones
                            not include_expected and read == "mark" and shape.mark_violation
                        ):
                            continue
                        out.append((shape.name, driver, fault.name, read))
        return out

    def histories(
        self,
        cells: list[tuple[str, str, str, str]],
        *,
        sample: int | None,
        seed: int,
        at_commit: bool = False,
    ) -> Iterator[History]:
        """Every history of ``cells`` (steps from healthy runs), or a random ``sample``.

        ``at_commit``: only the steps whose flight carries a COMMIT (the ones a lost reply
        makes a question for the resolver).
        """
        rng = random.Random(seed)

        def steps(shape: str, driver: str, read: str) -> list[int]:
            labels = self.steps(shape, driver, read)
            return [
                k for k, label in enumerate(labels, 1) if not at_commit or "COMMIT" in label.upper()
            ]

        if sample is None:
            for shape, driver, fault, read in cells:
                if fault == "none":
                    yield History(shape, driver, fault, 0, read)
                    continue
                for step in steps(shape, driver, read):
                    yield History(shape, driver, fault, step, read)
            return
        for _ in range(sample):
            shape, driver, fault, read = rng.choice(cells)
            some = [] if fault == "none" else steps(shape, driver, read)
            yield History(shape, driver, fault, rng.choice(some) if some else 0, read)


def _shapes_wanted(names: list[str] | None, *, include_expected: bool) -> list[Shape]:
    """Return the catalog's shapes after the filters; none through a missing PgBouncer."""
    pooled_runs = pgbouncer_missing() is None
    return [
        shape
        for shape in CATALOG.values()
        if (not names or shape.name in names)
        and (include_expected or not shape.expected_violation)
        and (pooled_runs or ROUTES[shape.route].pool_mode is None)
    ]


def _call(run: Callable[[], object]) -> Outcome:
    try:
        run()
    except dropsafe.CommitOutcomeUnknown as exc:
        if exc.reason in (APP_COMMITTED, APP_ENDED_UNKNOWN):
            # The unit's COMMIT did not commit (or never left), but the app had ended a
            # transaction of the work itself (the DBAPI connection's commit() inside the
            # unit), which committed or may have: partly durable, not run again. Its reason
            # first, and the message's end (the inner reason, where unknown).
            return Outcome("partial", f"{exc.reason}: ...{' '.join(str(exc).split())[-120:]}")
        return Outcome("unknown", _short(exc))
    except dropsafe.ConfigurationError as exc:
        return Outcome("refused", _short(exc))
    except Exception as exc:  # every error is an outcome to check
        return Outcome("error", _short(exc))
    return Outcome("ok")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"
