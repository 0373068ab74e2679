"""The explorer's catalog: units of work drawn from SQLAlchemy's transaction API, as data.

Each `Shape` runs a whole request (engines made, unit run, engines disposed) through a sync
or an async face, and says which effects it must have once acknowledged: rows per database
and schema, and notifications. ``expected_violation`` names the issue of a history that today's
code is known to break; the CI sample leaves those shapes out. Delete that one line of a shape
once its fix is merged, and the shape joins the sample.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import dropsafe

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "BARE_SHAPES",
    "CATALOG",
    "DRIVERS",
    "FLIGHT_SHAPES",
    "POOLED",
    "Context",
    "Effects",
    "Shape",
]

#: The driver and face of each run: sync for psycopg2 and psycopg, async for psycopg and asyncpg.
DRIVERS: dict[str, tuple[str, bool]] = {
    "psycopg2": ("psycopg2", False),
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "asyncpg": ("asyncpg", True),
}
APP_ROLE = "explorer_app"
#: A role the app may SET ROLE to (granted to APP_ROLE).
OTHER_ROLE = "explorer_other"
TENANT = "tenant"
#: A role the app may SET ROLE to that has no USAGE on plpgsql (granted to APP_ROLE; the
#: explorer's databases revoke plpgsql from PUBLIC and grant it to APP_ROLE and OTHER_ROLE).
BARE_ROLE = "explorer_bare"


@dataclass(frozen=True)
class Effects:
    """What an acknowledged request leaves: rows (database, schema, tag) and notifications."""

    rows: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    #: The roles rows may be written as.
    roles: frozenset[str] = frozenset({APP_ROLE})


class Base(DeclarativeBase):
    """ORM mapping of the effects table, for the shapes that flush objects."""


class Effect(Base):
    """One effect row; ``usr`` and ``sch`` come from column defaults on the server."""

    __tablename__ = "effects"
    id: Mapped[int] = mapped_column(primary_key=True)
    tag: Mapped[str]


@dataclass
class Context:
    """What one run of a shape gets: URLs through the proxy, the policy, a per-history nonce."""

    urls: dict[str, str]  # database name -> URL of the run's driver
    policy: dropsafe.Policy
    nonce: str
    #: Pauses the flight count while an engine makes its first connection (dialect setup).
    pause: Callable[..., None] = lambda **_: None
    engines: list[Any] = field(default_factory=list)
    #: What every engine of the run is made with besides its URL (a pooler's driver settings).
    engine_kw: dict[str, Any] = field(default_factory=dict)
    #: The pooler the app declares (in ``policy``, and in a plugin URL as ``dropsafe_pooler``).
    pooler: str | None = None
    #: A verified unit's xid read in its first write's flight (in ``policy``, and in a plugin
    #: URL as ``dropsafe_read_xid_in_flight``).
    read_xid_in_flight: bool = False

    def engine(self, db: str = "a", **kw: object) -> sa.Engine:
        """Make a dropsafe engine on database ``db``, connected once, disposed after the run."""
        engine = dropsafe.create_engine(self.urls[db], policy=self.policy, **self.engine_kw, **kw)
        return self.warm(engine)

    def warm(self, engine: sa.Engine) -> sa.Engine:
        """Connect once outside the count: the history starts with a ready engine.

        With the xid read in flight, the engine is a long-lived app's: it ran a unit, and its
        connection was made after that (`_SEASONING`).
        """
        self.engines.append(engine)
        self.pause(paused=True)
        try:
            with engine.connect():
                pass
            if self.read_xid_in_flight:
                dropsafe.run_transaction(engine, _seasoning)
                engine.dispose()
                with engine.connect():
                    pass
        finally:
            self.pause(paused=False)
        return engine

    async def aengine(self, db: str = "a", **kw: object) -> AsyncEngine:
        """Make an async dropsafe engine on ``db``, connected once, disposed after the run."""
        engine = dropsafe.create_async_engine(
            self.urls[db], policy=self.policy, **self.engine_kw, **kw
        )
        return await self.awarm(engine)

    async def awarm(self, engine: AsyncEngine) -> AsyncEngine:
        """`warm` an async engine."""
        self.engines.append(engine)
        self.pause(paused=True)
        try:
            async with engine.connect():
                pass
            if self.read_xid_in_flight:
                await dropsafe.run_transaction_async(engine, _aseasoning)
                await engine.dispose()
                async with engine.connect():
                    pass
        finally:
            self.pause(paused=False)
        return engine

    def note(self, name: str) -> str:
        """Return a notification payload unique to this history."""
        return f"{self.nonce}:{name}"

    def dispose(self) -> None:
        """Close every sync engine of the run."""
        for engine in self.engines:
            if isinstance(engine, sa.Engine):
                engine.dispose()

    async def dispose_async(self) -> None:
        """Close every async engine of the run, in its event loop (they cannot outlive it)."""
        for engine in self.engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()


# An engine's first unit makes its later connections learn at connect what the xid read in
# flight needs (the server's life; on psycopg2, leave to run a DO block): without it a fresh
# engine's psycopg2 unit would read by the mark, and the explorer would never see its read.
_SEASONING = "SELECT 1"


def _seasoning(connection: sa.Connection) -> None:
    connection.execute(sa.text(_SEASONING))


async def _aseasoning(connection: AsyncConnection) -> None:
    await connection.execute(sa.text(_SEASONING))


@dataclass(frozen=True)
class Shape:
    """A unit of work as data: how to run it on each face, and what it must leave."""

    name: str
    what: str
    effects: Callable[[Context], Effects]
    sync: Callable[[Context], object] | None = None
    run_async: Callable[[Context], Coroutine[object, object, object]] | None = None
    drivers: tuple[str, ...] = tuple(DRIVERS)
    #: The request runs outside any unit (the zero-code path): a raise after a COMMIT was
    #: sent may leave the effect (the app knows its request failed, not what it did).
    zero_code: bool = False
    #: A known broken history of today's code (issue and item), left out of the CI sample.
    expected_violation: str | None = None
    #: The same, for the xid read by the mark only (``read_xid_in_flight=False``): its
    #: ``flight`` histories must hold, and are drawn.
    mark_violation: str | None = None
    #: How the app reaches the server (`dropsafe._bench._pooler.ROUTES`): straight, or
    #: through PgBouncer, struck on the client's or on the server's side of it.
    route: str = "direct"

    def faces(self) -> tuple[str, ...]:
        """Return the drivers this shape runs on (one it has no body for is left out)."""
        return tuple(
            d for d in self.drivers if (self.run_async if DRIVERS[d][1] else self.sync) is not None
        )


def _rows(*tags: str, db: str = "a", schema: str = APP_ROLE) -> Counter[tuple[str, str, str]]:
    return Counter((db, schema, tag) for tag in tags)


def _insert(tag: str, *, schema: str | None = None) -> str:
    table = f"{schema}.effects" if schema else "effects"
    return f"INSERT INTO {table} (tag) VALUES ('{tag}')"  # catalog constants


# -- generic: a list of statements in one unit ------------------------------------------------


def _statements(
    name: str,
    what: str,
    statements: Callable[[Context], list[str]],
    effects: Callable[[Context], Effects],
    *,
    via: str = "session",
    drivers: tuple[str, ...] = tuple(DRIVERS),
    expected_violation: str | None = None,
    engine_kw: dict[str, Any] | None = None,
    db: str = "a",
) -> Shape:
    kw = engine_kw or {}

    def sync(ctx: Context) -> object:
        engine = ctx.engine(db, **kw)
        sqls = statements(ctx)

        def unit(handle: Session | sa.Connection) -> None:
            for sql in sqls:
                handle.execute(sa.text(sql))

        if via == "session":
            return dropsafe.run_transaction(sessionmaker(engine), unit)
        return dropsafe.run_transaction(engine, unit)

    async def run_async(ctx: Context) -> object:
        engine = await ctx.aengine(db, **kw)
        sqls = statements(ctx)

        async def unit(handle: AsyncSession | AsyncConnection) -> None:
            for sql in sqls:
                await handle.execute(sa.text(sql))

        if via == "session":
            return await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)
        return await dropsafe.run_transaction_async(engine, unit)

    return Shape(
        name,
        what,
        effects,
        sync,
        run_async,
        drivers=drivers,
        expected_violation=expected_violation,
    )


def _one(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a"))


def _two(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a", "b"))


# -- special shapes -----------------------------------------------------------------------------


def _nested_sync(ctx: Context) -> object:
    engine = ctx.engine()

    def unit(session: Session) -> None:
        session.execute(sa.text(_insert("a")))
        with session.begin_nested():
            session.execute(sa.text(_insert("b")))
        nested = session.begin_nested()
        session.execute(sa.text(_insert("gone")))
        nested.rollback()

    return dropsafe.run_transaction(sessionmaker(engine), unit)


async def _nested_async(ctx: Context) -> object:
    engine = await ctx.aengine()

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text(_insert("a")))
        async with session.begin_nested():
            await session.execute(sa.text(_insert("b")))
        nested = await session.begin_nested()
        await session.execute(sa.text(_insert("gone")))
        await nested.rollback()

    return await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)


def _orm_sync(ctx: Context) -> object:
    engine = ctx.engine()

    def unit(session: Session) -> None:
        session.add_all([Effect(tag="a"), Effect(tag="b")])
        session.flush()

    return dropsafe.run_transaction(sessionmaker(engine), unit)


async def _orm_async(ctx: Context) -> object:
    engine = await ctx.aengine()

    async def unit(session: AsyncSession) -> None:
        session.add_all([Effect(tag="a"), Effect(tag="b")])
        await session.flush()

    return await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)


def _hooked(hook: str, *, raising: bool) -> Callable[[Session], None]:
    def listener(session: Session, *args: object) -> None:
        del args
        if raising:
            raise RuntimeError(f"{hook} hook failed")
        if hook != "after_commit":
            session.execute(sa.text(_insert("hook")))

    return listener


def _hook_shape(hook: str, *, raising: bool, expected_violation: str | None = None) -> Shape:
    def factory() -> sessionmaker[Session]:
        made: sessionmaker[Session] = sessionmaker()
        event.listen(made, hook, _hooked(hook, raising=raising))
        return made

    def sync(ctx: Context) -> object:
        made = factory()
        made.configure(bind=ctx.engine())

        def unit(session: Session) -> None:
            session.add(Effect(tag="a"))

        return dropsafe.run_transaction(made, unit)

    async def run_async(ctx: Context) -> object:
        engine = await ctx.aengine()
        made = async_sessionmaker(engine, sync_session_class=_session_class(hook, raising=raising))

        async def unit(session: AsyncSession) -> None:
            session.add(Effect(tag="a"))

        return await dropsafe.run_transaction_async(made, unit)

    def effects(ctx: Context) -> Effects:
        del ctx
        if raising and hook != "after_commit":
            return Effects()  # the unit cannot commit: no effect, an error
        if hook in ("before_commit", "after_flush") and not raising:
            return Effects(_rows("a", "hook"))
        return Effects(_rows("a"))

    return Shape(
        f"hook_{hook}_{'raising' if raising else 'writing'}",
        f"Session with a {'raising' if raising else 'writing'} {hook} listener",
        effects,
        sync,
        run_async,
        expected_violation=expected_violation,
    )


def _session_class(hook: str, *, raising: bool) -> type[Session]:
    class Hooked(Session):
        pass

    event.listen(Hooked, hook, _hooked(hook, raising=raising))
    return Hooked


def _two_engines_sync(ctx: Context) -> object:
    first, second = ctx.engine("a"), ctx.engine("b")

    def unit(session: Session) -> None:
        session.execute(sa.text(_insert("a")))
        session.execute(sa.text(_insert("b")), bind_arguments={"bind": second})

    return dropsafe.run_transaction(sessionmaker(first), unit)


async def _two_engines_async(ctx: Context) -> object:
    first, second = await ctx.aengine("a"), await ctx.aengine("b")

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text(_insert("a")))
        await session.execute(sa.text(_insert("b")), bind_arguments={"bind": second.sync_engine})

    return await dropsafe.run_transaction_async(async_sessionmaker(first), unit)


def _two_engines_raw_commit_sync(ctx: Context) -> object:
    first, second = ctx.engine("a"), ctx.engine("b")

    def unit(session: Session) -> None:
        # The second engine's connection begins first: SQLAlchemy commits it first.
        session.execute(sa.text(_READ), bind_arguments={"bind": second})
        session.execute(sa.text(_insert("a")))
        dbapi_connection: Any = session.connection().connection.dbapi_connection
        dbapi_connection.commit()
        session.execute(sa.text(_insert("b")), bind_arguments={"bind": second})

    return dropsafe.run_transaction(sessionmaker(first), unit)


def _two_dbs(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a", db="a") + _rows("b", db="b"))


def _twophase_sync(ctx: Context) -> object:
    engine = ctx.engine()

    def unit(session: Session) -> None:
        session.execute(sa.text(_insert("a")))

    return dropsafe.run_transaction(sessionmaker(engine, twophase=True), unit)


def _self_commit_sync(ctx: Context) -> object:
    engine = ctx.engine()

    def unit(session: Session) -> None:
        session.execute(sa.text(_insert("a")))
        session.commit()
        session.execute(sa.text(_insert("b")))

    return dropsafe.run_transaction(sessionmaker(engine), unit)


async def _self_commit_async(ctx: Context) -> object:
    engine = await ctx.aengine()

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text(_insert("a")))
        await session.commit()
        await session.execute(sa.text(_insert("b")))

    return await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)


def _copy_sync(ctx: Context) -> object:
    engine = ctx.engine()
    driver = engine.dialect.driver

    def unit(connection: sa.Connection) -> None:
        raw: Any = connection.connection.driver_connection
        if driver == "psycopg2":
            import io

            with raw.cursor() as cursor:
                cursor.copy_expert("COPY effects (tag) FROM STDIN", io.StringIO("a\nb\n"))
        else:
            with raw.cursor() as cursor, cursor.copy("COPY effects (tag) FROM STDIN") as copy:
                copy.write_row(("a",))
                copy.write_row(("b",))

    return dropsafe.run_transaction(engine, unit)


def _server_cursor_sync(ctx: Context) -> object:
    engine = ctx.engine()

    def unit(connection: sa.Connection) -> None:
        query = sa.text("SELECT g FROM generate_series(1, 50) g")
        result = connection.execute(query.execution_options(stream_results=True, max_row_buffer=10))
        total = sum(row[0] for row in result)
        connection.execute(sa.text(_insert(f"a{total}")))

    return dropsafe.run_transaction(engine, unit)


async def _server_cursor_async(ctx: Context) -> object:
    engine = await ctx.aengine()

    async def unit(connection: AsyncConnection) -> None:
        result = await connection.stream(sa.text("SELECT g FROM generate_series(1, 50) g"))
        total = 0
        async for row in result:
            total += row[0]
        await connection.execute(sa.text(_insert(f"a{total}")))

    return await dropsafe.run_transaction_async(engine, unit)


def _cursor_effects(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a1275"))


def _request(engine: sa.Engine, *transactions: str) -> object:
    """Run a request outside any unit (the zero-code path): one Session, a COMMIT a statement."""
    with Session(engine) as session:
        for sql in transactions:
            session.execute(sa.text(sql))
            session.commit()
    return None


def _request_faces(
    *transactions: str, engine_kw: dict[str, Any] | None = None
) -> tuple[Callable[[Context], object], Callable[[Context], Coroutine[object, object, object]]]:
    """Both faces of `_request` on a dropsafe engine made with ``engine_kw``."""
    kw = engine_kw or {}

    def sync(ctx: Context) -> object:
        return _request(ctx.engine(**kw), *transactions)

    async def run_async(ctx: Context) -> object:
        engine = await ctx.aengine(**kw)
        async with AsyncSession(engine) as session:
            for sql in transactions:
                await session.execute(sa.text(sql))
                await session.commit()
        return None

    return sync, run_async


def _plugin_request_sync(ctx: Context) -> object:
    url = ctx.urls["a"] + ("&" if "?" in ctx.urls["a"] else "?") + "plugin=dropsafe"
    if ctx.pooler is not None:
        url += f"&dropsafe_pooler={ctx.pooler}"
    # Both ways, explicitly: the history names its read whatever the default is.
    url += f"&dropsafe_read_xid_in_flight={'true' if ctx.read_xid_in_flight else 'false'}"
    return _request(ctx.warm(sa.create_engine(url, **ctx.engine_kw)), _insert("a"))


def _harden_request_sync(ctx: Context) -> object:
    engine = dropsafe.harden(sa.create_engine(ctx.urls["a"], **ctx.engine_kw), ctx.policy)
    return _request(ctx.warm(engine), _insert("a"))


# Session state set in a transaction of its own, then a write: what a replay must restore. One
# connection in the pool, so that the write runs on the connection that has the state.
_ONE_CONNECTION: dict[str, Any] = {"pool_size": 1, "max_overflow": 0}


def _role_effects(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a"), roles=frozenset({OTHER_ROLE}))


def _tenant_effects(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a", schema=TENANT))


def _notes(*names: str, rows: tuple[str, ...] = ()) -> Callable[[Context], Effects]:
    def effects(ctx: Context) -> Effects:
        return Effects(_rows(*rows), Counter(ctx.note(name) for name in names))

    return effects


# -- no unit, the transaction replay on: a connection lost between statements ------------------


def _replaying(ctx: Context) -> dropsafe.Policy:
    """Return the run's policy with the transaction replay on (the mid-transaction shapes)."""
    policy = ctx.policy
    return dropsafe.Policy(
        connection=policy.connection,
        pool=dataclasses.replace(policy.pool, replay_transaction=True),
        unit=policy.unit,
        hooks=policy.hooks,
    )


_READ = "SELECT tag FROM effects ORDER BY tag"


def _mid_transaction_sync(ctx: Context) -> object:
    engine = ctx.warm(
        dropsafe.create_engine(ctx.urls["a"], policy=_replaying(ctx), **ctx.engine_kw)
    )
    with Session(engine) as session:
        session.execute(sa.text(_READ)).all()
        session.execute(sa.text(_insert("a")))
        session.execute(sa.text(_READ)).all()
        session.execute(sa.text(_insert("b")))
        session.commit()
    return None


async def _mid_transaction_async(ctx: Context) -> object:
    engine = dropsafe.create_async_engine(ctx.urls["a"], policy=_replaying(ctx), **ctx.engine_kw)
    try:
        ctx.pause(paused=True)  # connected once outside the count, as ctx.aengine does
        try:
            async with engine.connect():
                pass
        finally:
            ctx.pause(paused=False)
        async with AsyncSession(engine) as session:
            (await session.execute(sa.text(_READ))).all()
            await session.execute(sa.text(_insert("a")))
            (await session.execute(sa.text(_READ))).all()
            await session.execute(sa.text(_insert("b")))
            await session.commit()
    finally:
        await engine.dispose()
    return None


def _mid_transaction_orm_sync(ctx: Context) -> object:
    engine = ctx.warm(
        dropsafe.create_engine(ctx.urls["a"], policy=_replaying(ctx), **ctx.engine_kw)
    )
    with Session(engine) as session:
        session.add(Effect(tag="a"))
        session.flush()  # its generated id: a loss after it is refused (the id would differ)
        session.add(Effect(tag="b"))
        session.commit()
    return None


_SYNC = ("psycopg2", "psycopg")


# -- issue 28: histories between the xid read in flight and the COMMIT ----------------------
# (tests/units/test_flight_xid_attacks.py; "history N" is the brief's numbering, docs/guarantees.md
# "The xid read in the flight of the unit's first write" lists them.)


def _raw(session: Session, *sqls: str, end: str | None = None) -> None:
    """Run ``sqls`` through a raw cursor, after ``end`` (commit, rollback) of the DBAPI connection.

    SQLAlchemy sees none of it.
    """
    dbapi_connection: Any = session.connection().connection.dbapi_connection
    if end is not None:
        getattr(dbapi_connection, end)()
    cursor = dbapi_connection.cursor()
    for sql in sqls:
        cursor.execute(sql)
    cursor.close()


def _raw_shape(  # noqa: PLR0917 - the shape, and the unit's statements in order
    name: str,
    what: str,
    effects: Callable[[Context], Effects],
    before: tuple[str, ...] = (),
    raw: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    *,
    end: str | None = None,
    expected_violation: str | None = None,
    mark_violation: str | None = None,
) -> Shape:
    """Return a Session unit: ``before`` through the Session, `_raw`, ``after``."""

    def sync(ctx: Context) -> object:
        engine = ctx.engine()

        def unit(session: Session) -> None:
            for sql in before:
                session.execute(sa.text(sql))
            _raw(session, *raw, end=end)
            for sql in after:
                session.execute(sa.text(sql))

        return dropsafe.run_transaction(sessionmaker(engine), unit)

    return Shape(
        name,
        what,
        effects,
        sync,
        drivers=_SYNC,
        expected_violation=expected_violation,
        mark_violation=mark_violation,
    )


def _as_tenant_at_connect(engine: sa.Engine) -> None:
    """Add the app's own pool listener, after dropsafe's: each new session as BARE_ROLE."""

    @event.listens_for(engine, "connect")
    def as_bare(dbapi_connection: Any, record: object) -> None:  # noqa: ANN401 - any driver's
        del record
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET ROLE {BARE_ROLE}")
        cursor.close()
        dbapi_connection.commit()


def _role_at_connect_sync(ctx: Context) -> object:
    engine = dropsafe.create_engine(ctx.urls["a"], policy=ctx.policy, **ctx.engine_kw)
    _as_tenant_at_connect(engine)
    ctx.warm(engine)

    def unit(session: Session) -> None:
        session.execute(sa.text(_insert("a", schema=APP_ROLE)))

    return dropsafe.run_transaction(sessionmaker(engine), unit)


async def _role_at_connect_async(ctx: Context) -> object:
    engine = dropsafe.create_async_engine(ctx.urls["a"], policy=ctx.policy, **ctx.engine_kw)
    _as_tenant_at_connect(engine.sync_engine)
    await ctx.awarm(engine)

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text(_insert("a", schema=APP_ROLE)))

    return await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)


def _bare_effects(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a"), roles=frozenset({BARE_ROLE}))


def _other_effects(ctx: Context) -> Effects:
    del ctx
    return Effects(_rows("a"), roles=frozenset({OTHER_ROLE}))


def _replayed_request(
    statements: Callable[[Context], list[str]], db: str = "a"
) -> tuple[Callable[[Context], object], Callable[[Context], Coroutine[object, object, object]]]:
    """Return both faces of a request outside any unit, ``statements`` in one transaction.

    The transaction replay is on: its xid is read in flight (the plain transaction's read).
    """

    def sync(ctx: Context) -> object:
        engine = ctx.warm(
            dropsafe.create_engine(ctx.urls[db], policy=_replaying(ctx), **ctx.engine_kw)
        )
        with Session(engine) as session:
            for sql in statements(ctx):
                session.execute(sa.text(sql))
            session.commit()
        return None

    async def run_async(ctx: Context) -> object:
        engine = await ctx.awarm(
            dropsafe.create_async_engine(ctx.urls[db], policy=_replaying(ctx), **ctx.engine_kw)
        )
        async with AsyncSession(engine) as session:
            for sql in statements(ctx):
                await session.execute(sa.text(sql))
            await session.commit()
        return None

    return sync, run_async


_H1 = (
    "issue 28 history 1, the mark only: a raw DBAPI commit() inside the unit, then a raw "
    "write, then any failure (a statement, the mark or the COMMIT lost, a COMMIT resolved "
    "aborted): the unit runs again, its first row twice (the app's own commit made part of it "
    "durable; the mark reads no xid before it). In flight, the dropped read is asked about "
    "before any rerun (session 15: after a COMMIT resolved aborted; session 16: after a lost "
    "mark or a refused COMMIT too): CommitOutcomeUnknown, run once"
)

#: The shapes whose sessions become BARE_ROLE: only while one runs is the app's role a member
#: of it. psycopg2's DO-block leave is asked of every role the session's user may become, so a
#: membership held for every history would keep psycopg2's flight histories on the mark.
BARE_SHAPES = frozenset({"set_local_role_bare", "role_at_connect_bare", "replayed_role_bare"})

FLIGHT_SHAPES: tuple[Shape, ...] = (
    _raw_shape(
        "raw_commit_then_raw_write",
        "Session INSERT, the DBAPI connection's commit(), a raw cursor's INSERT",
        _two,
        before=(_insert("a"),),
        raw=(_insert("b"),),
        end="commit",
        mark_violation=_H1,
    ),
    _raw_shape(
        "raw_commit_then_write",
        "Session INSERT, the DBAPI connection's commit(), a Session INSERT (a new read)",
        _two,
        before=(_insert("a"),),
        end="commit",
        after=(_insert("b"),),
        mark_violation=_H1,
    ),
    _raw_shape(
        "raw_commit_only",
        "Session INSERT, the DBAPI connection's commit(), nothing after (an empty COMMIT)",
        _one,
        before=(_insert("a"),),
        end="commit",
        mark_violation=_H1,
    ),
    Shape(
        "two_engines_raw_commit",
        "sessionmaker over two engines: a read of the second, an INSERT in the first, its "
        "DBAPI connection's commit(), an INSERT in the second",
        _two_dbs,
        _two_engines_raw_commit_sync,
        drivers=_SYNC,
        mark_violation=_H1,
    ),
    _raw_shape(
        "raw_rollback_then_raw_write",
        "Session INSERT, the DBAPI connection's rollback(), a raw cursor's INSERT",
        _one,
        before=(_insert("gone"),),
        raw=(_insert("a"),),
        end="rollback",
    ),
    _raw_shape(
        "raw_write",
        "a raw cursor's INSERT (no raw transaction control), then a Session INSERT",
        _two,
        raw=(_insert("a"),),
        after=(_insert("b"),),
    ),
    _statements(
        "once_view_notify",
        "INSERT into a view whose INSTEAD OF trigger writes nothing (counted, no WAL), NOTIFY",
        lambda c: ["INSERT INTO once_put VALUES (4)", f"NOTIFY explore, '{c.note('n')}'"],
        _notes("n"),
        db="q",  # no code that notifies: after a crash the resolver decides, not "unknown"
    ),
    _statements(
        "view_trigger_notify",
        "INSERT into a view whose INSTEAD OF trigger only notifies (counted, no WAL)",
        lambda c: [f"INSERT INTO notify_put VALUES ('{c.note('v')}')"],
        _notes("v"),
    ),
    _statements(
        "unlogged_notify",
        "INSERT into an UNLOGGED table (no WAL), NOTIFY",
        lambda c: ["INSERT INTO scratch VALUES (1)", f"NOTIFY explore, '{c.note('n')}'"],
        _notes("n"),
        db="q",
    ),
    _statements(
        "set_local_role_bare",
        "SET LOCAL ROLE to a role without USAGE on plpgsql, INSERT",
        lambda _: [f"SET LOCAL ROLE {BARE_ROLE}", _insert("a", schema=APP_ROLE)],
        _bare_effects,
    ),
    _statements(
        "set_local_role_plpgsql",
        "SET LOCAL ROLE to a role that keeps USAGE on plpgsql, INSERT",
        lambda _: [f"SET LOCAL ROLE {OTHER_ROLE}", _insert("a", schema=APP_ROLE)],
        _other_effects,
    ),
    Shape(
        "role_at_connect_bare",
        "the app's connect listener SETs ROLE to one without plpgsql; a Session INSERT",
        _bare_effects,
        _role_at_connect_sync,
        _role_at_connect_async,
    ),
    Shape(
        "replayed_role_bare",
        "no unit, transaction replay on: SET LOCAL ROLE to a role without plpgsql, INSERT",
        _bare_effects,
        *_replayed_request(
            lambda _: [f"SET LOCAL ROLE {BARE_ROLE}", _insert("a", schema=APP_ROLE)]
        ),
        zero_code=True,
    ),
    Shape(
        "replayed_once_view_notify",
        "no unit, transaction replay on: INSERT into the view that writes nothing, NOTIFY",
        _notes("n"),
        *_replayed_request(
            lambda c: ["INSERT INTO once_put VALUES (4)", f"NOTIFY explore, '{c.note('n')}'"],
            db="q",
        ),
        zero_code=True,
    ),
    _statements(
        "security_definer_write",
        "SELECT of a SECURITY DEFINER function that writes as its owner (no INSERT text)",
        lambda _: ["SELECT put_effect('a')"],
        _other_effects,
    ),
)

CATALOG: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        _statements("session_insert", "Session, one INSERT", lambda _: [_insert("a")], _one),
        _statements(
            "connection_insert",
            "Connection, one INSERT",
            lambda _: [_insert("a")],
            _one,
            via="connection",
        ),
        _statements(
            "session_two_inserts",
            "Session, two INSERTs",
            lambda _: [_insert("a"), _insert("b")],
            _two,
        ),
        Shape("orm_flush", "Session, ORM objects flushed", _two, _orm_sync, _orm_async),
        Shape(
            "begin_nested",
            "Session, savepoints: one released, one rolled back",
            _two,
            _nested_sync,
            _nested_async,
        ),
        _statements(
            "notify_direct",
            "INSERT and NOTIFY in the statement",
            lambda c: [_insert("a"), f"NOTIFY explore, '{c.note('n')}'"],
            _notes("n", rows=("a",)),
        ),
        _statements(
            "notify_function",
            "NOTIFY through a function, nothing written",
            lambda c: [f"SELECT announce('{c.note('n')}')"],
            _notes("n"),
        ),
        _statements(
            "notify_trigger",
            "NOTIFY from a statement trigger on a 0-row UPDATE",
            lambda c: [
                f"SELECT set_config('explore.nonce', '{c.nonce}', true)",
                "UPDATE announcer SET x = x WHERE false",
            ],
            _notes("t"),
        ),
        _statements(
            "sequence_default",
            "nextval() and an INSERT",
            lambda _: ["SELECT nextval('explore_seq')", _insert("a")],
            _one,
        ),
        _statements(
            "multi_statement",
            "two INSERTs in one execute()",
            lambda _: [f"{_insert('a')}; {_insert('b')}"],
            _two,
            drivers=("psycopg2", "psycopg", "psycopg-async"),
        ),
        _statements(
            "set_local",
            "SET LOCAL, set_config(is_local) and an INSERT",
            lambda _: [
                "SET LOCAL statement_timeout = '20s'",
                "SELECT set_config('explore.mark', 'x', true)",
                _insert("a"),
            ],
            _one,
        ),
        _statements(
            "advisory_lock",
            "pg_advisory_xact_lock and an INSERT",
            lambda _: ["SELECT pg_advisory_xact_lock(26)", _insert("a")],
            _one,
        ),
        Shape(
            "server_side_cursor",
            "Connection, a streamed SELECT, then an INSERT",
            _cursor_effects,
            _server_cursor_sync,
            _server_cursor_async,
        ),
        Shape("copy_from", "Connection, COPY FROM STDIN", _two, _copy_sync, drivers=_SYNC),
        _hook_shape("before_commit", raising=False),
        _hook_shape("after_flush", raising=False),
        _hook_shape("before_commit", raising=True),
        _hook_shape("after_commit", raising=True),
        Shape(
            "two_engines",
            "sessionmaker over two engines, a row in each database",
            _two_dbs,
            _two_engines_sync,
            _two_engines_async,
        ),
        Shape(
            "twophase",
            "sessionmaker(twophase=True)",
            _one,
            _twophase_sync,
            drivers=_SYNC,
        ),
        _statements(
            "autocommit",
            "AUTOCOMMIT engine, two INSERTs",
            lambda _: [_insert("a"), _insert("b")],
            _two,
            via="connection",
            engine_kw={"isolation_level": "AUTOCOMMIT"},
        ),
        Shape(
            "self_commit",
            "Session that commits inside the unit",
            _two,
            _self_commit_sync,
            _self_commit_async,
        ),
        Shape(
            "plain_request",
            "no unit: a Session request on a dropsafe engine",
            _one,
            *_request_faces(_insert("a")),
            zero_code=True,
        ),
        Shape(
            "plugin_request",
            "no unit: a Session request on ?plugin=dropsafe",
            _one,
            _plugin_request_sync,
            drivers=_SYNC,
            zero_code=True,
        ),
        Shape(
            "harden_request",
            "no unit: a Session request on an engine given to dropsafe.harden",
            _one,
            _harden_request_sync,
            drivers=_SYNC,
            zero_code=True,
        ),
        _statements(
            "session_settings",
            "SET and set_config(is_local=false) at session level, and an INSERT",
            lambda _: [
                "SET statement_timeout = '25s'",
                "SELECT set_config('explore.mark', 'x', false)",
                _insert("a"),
            ],
            _one,
        ),
        Shape(
            "role_request",
            "no unit: SET ROLE, commit, then INSERT (replay under session state)",
            _role_effects,
            *_request_faces(
                f"SET ROLE {OTHER_ROLE}", _insert("a", schema=APP_ROLE), engine_kw=_ONE_CONNECTION
            ),
            zero_code=True,
        ),
        Shape(
            "mid_transaction_request",
            "no unit, transaction replay on: read, INSERT, read, INSERT, commit",
            _two,
            _mid_transaction_sync,
            _mid_transaction_async,
            zero_code=True,
        ),
        Shape(
            "mid_transaction_orm",
            "no unit, transaction replay on: ORM flush (generated id), then another, commit",
            _two,
            _mid_transaction_orm_sync,
            drivers=_SYNC,
            zero_code=True,
        ),
        Shape(
            "tenant_request",
            "no unit: SET search_path, commit, then INSERT (replay under session state)",
            _tenant_effects,
            *_request_faces(
                f"SET search_path TO {TENANT}", _insert("a"), engine_kw=_ONE_CONNECTION
            ),
            zero_code=True,
        ),
    )
}

CATALOG.update({shape.name: shape for shape in FLIGHT_SHAPES})

#: Shapes run again through PgBouncer, by route (`dropsafe._bench._pooler.ROUTES`): units and
#: the zero-code requests, struck on the app's side of the pooler; a few struck on the
#: server's side. Session state set by the app is PgBouncer's trap in transaction mode (and
#: the role and tenant shapes set it): those stay direct.
POOLED: dict[str, tuple[str, ...]] = {
    "pgbouncer_tx": (
        "session_insert",
        "notify_direct",
        "plain_request",
        "plugin_request",
        "harden_request",
        "mid_transaction_request",
        "mid_transaction_orm",
    ),
    "pgbouncer_tx_upstream": ("session_insert", "plain_request", "mid_transaction_request"),
    "pgbouncer_session": ("session_insert", "plain_request", "mid_transaction_request"),
    "pgbouncer_tx_undeclared": (
        "session_insert",
        "plain_request",
        "mid_transaction_request",
        "mid_transaction_orm",
    ),
    # Issue 28 history 3: the driver's backend pid is PgBouncer's (random) one.
    "pgbouncer_session_undeclared": ("session_insert", "notify_direct"),
}
_ROUTE_WHAT = {
    "pgbouncer_tx": "PgBouncer in transaction mode, struck between the app and it",
    "pgbouncer_tx_upstream": "PgBouncer in transaction mode, struck between it and the server",
    "pgbouncer_session": "PgBouncer in session mode, struck between the app and it",
    "pgbouncer_tx_undeclared": (
        "PgBouncer in transaction mode not told to dropsafe (drivers set up by hand), "
        "struck between the app and it"
    ),
    "pgbouncer_session_undeclared": (
        "PgBouncer in session mode not told to dropsafe (pooler=None: the settings say session "
        "mode needs nothing), struck between the app and it"
    ),
}
CATALOG.update(
    {
        f"{base}_via_{route}": dataclasses.replace(
            CATALOG[base],
            name=f"{base}_via_{route}",
            what=f"{CATALOG[base].what}; through {_ROUTE_WHAT[route]}",
            route=route,
        )
        for route, bases in POOLED.items()
        for base in bases
    }
)


async def _disposing(
    run_async: Callable[[Context], Coroutine[object, object, object]], ctx: Context
) -> object:
    """Run an async face, then close its engines whatever happened, before its loop ends."""
    try:
        return await run_async(ctx)
    finally:
        await ctx.dispose_async()


def run_shape(shape: Shape, driver: str, ctx: Context) -> object:
    """Run ``shape`` once on ``driver``'s face; engines are disposed whatever happens."""
    try:
        if DRIVERS[driver][1]:
            if shape.run_async is None:  # faces() leaves such shapes out
                raise dropsafe.ConfigurationError(f"shape {shape.name} has no async face")
            return asyncio.run(_disposing(shape.run_async, ctx))
        if shape.sync is None:
            raise dropsafe.ConfigurationError(f"shape {shape.name} has no sync face")
        return shape.sync(ctx)
    finally:
        ctx.dispose()
