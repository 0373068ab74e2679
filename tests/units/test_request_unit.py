"""@dropsafe.request_unit: a handler that takes a Session, run as one unit of work.

Real PostgreSQL, real faults: the handler's own backend is terminated in the middle of its
first run, after one of its CRUD commits. Each test states what the plain handler does under
the same fault, so that the fault is shown to hit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dropsafe

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from dropsafe.testing import PostgresServer

WAIT = 20.0  # seconds a terminated backend may take to be gone


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "request_unit_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(100), unique=True)


class AppSession(Session):
    """A Session subclass, as SQLModel's is: the handler must get one of these."""


@pytest.fixture
def engine(shared_server: PostgresServer) -> Iterator[sa.Engine]:
    engine = dropsafe.create_engine(shared_server.url("psycopg"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _stored(engine: sa.Engine, body: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(sa.select(sa.func.count()).select_from(Note).where(Note.body == body))
            or 0
        )


def _terminate_own_backend(server: PostgresServer, session: Session) -> None:
    """Terminate the backend behind ``session``'s connection and wait until it is gone."""
    pid = session.connection().connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    server.execute(f"SELECT pg_terminate_backend({int(pid)})")
    deadline = time.monotonic() + WAIT
    while server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}") != [
        ("0",)
    ]:
        assert time.monotonic() < deadline, f"backend {pid} still there after {WAIT} s"
        time.sleep(0.02)


def _commits_then_dies_once(
    server: PostgresServer, runs: list[Session]
) -> Callable[[Session, str], int]:
    """A handler as apps write them: a read, a CRUD function that commits, another read."""

    def handler(session: Session, body: str) -> int:
        runs.append(session)
        session.execute(sa.select(sa.func.count()).select_from(Note))
        session.add(Note(body=body))
        session.commit()  # the CRUD function's own commit
        session.execute(sa.select(sa.func.count()).select_from(Note))  # begins a transaction
        if len(runs) == 1:
            _terminate_own_backend(server, session)
        # Not a transaction's first statement (which dropsafe may replay): its second.
        return int(session.scalar(sa.select(sa.func.count()).select_from(Note)) or 0)

    return handler


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(120)
def test_a_disconnect_after_a_commit_inside_runs_the_whole_handler_again(shared_server, engine):
    # The plain handler: the request fails, and what its CRUD function committed stays.
    plain_runs: list[Session] = []
    plain = _commits_then_dies_once(shared_server, plain_runs)
    with AppSession(engine) as given, pytest.raises(sa.exc.OperationalError):
        plain(given, "plain")
    assert _stored(engine, "plain") == 1

    runs: list[Session] = []
    handler = dropsafe.request_unit(_commits_then_dies_once(shared_server, runs))
    with AppSession(engine) as given:
        assert handler(given, body="unit") == 2  # the plain note and this one
        assert not given.in_transaction()  # the request's own session was not used
    assert len(runs) == 2
    assert all(type(run) is AppSession and run is not given for run in runs)
    assert runs[0] is not runs[1]
    assert _stored(engine, "unit") == 1  # the first run's commit was a SAVEPOINT, undone


def test_nothing_is_committed_when_the_handler_raises(engine):
    runs = 0

    @dropsafe.request_unit
    def handler(session: Session) -> None:
        nonlocal runs
        runs += 1
        session.add(Note(body="refused"))
        session.commit()
        raise LookupError("a 404 after a commit")  # not a database error: not retried

    with Session(engine) as given, pytest.raises(LookupError):
        handler(given)
    assert runs == 1
    assert _stored(engine, "refused") == 0


def test_work_left_uncommitted_is_rolled_back_and_rollback_undoes_one_savepoint(engine):
    @dropsafe.request_unit
    def handler(session: Session) -> str:
        session.add(Note(body="kept"))
        session.commit()
        session.add(Note(body="rolled back"))
        session.flush()
        session.rollback()  # back to the last commit, as in the plain app
        session.add(Note(body="never committed"))
        session.flush()
        return "done"

    with Session(engine) as given:
        assert handler(given) == "done"
    assert (_stored(engine, "kept"), _stored(engine, "rolled back")) == (1, 0)
    assert _stored(engine, "never committed") == 0


def test_a_permanent_error_is_not_retried(engine):
    runs = 0

    @dropsafe.request_unit
    def handler(*, session: Session) -> None:
        nonlocal runs
        runs += 1
        session.add_all([Note(body="twice"), Note(body="twice")])
        session.commit()

    with Session(engine) as given, pytest.raises(sa.exc.IntegrityError):
        handler(session=given)
    assert runs == 1
    assert _stored(engine, "twice") == 0


def test_objects_read_by_other_dependencies_can_be_changed_in_the_unit(engine):
    with Session(engine) as setup:
        setup.add(Note(body="before"))
        setup.commit()

    @dropsafe.request_unit
    def handler(session: Session, note: Note) -> int:
        session.add(note)  # read with the request's session, detached by the unit
        note.body = "after"
        session.commit()
        return note.id

    with Session(engine) as given:
        note = given.scalars(sa.select(Note).where(Note.body == "before")).one()  # a dependency
        assert handler(given, note) == note.id
    assert (_stored(engine, "before"), _stored(engine, "after")) == (0, 1)


def test_bad_use_is_refused_at_the_call(engine):
    with pytest.raises(dropsafe.ConfigurationError, match="async"):

        @dropsafe.request_unit
        async def handler_async(session: Session) -> None: ...

    with pytest.raises(dropsafe.ConfigurationError, match="max_attempts"):
        dropsafe.request_unit(max_attempts=0)

    @dropsafe.request_unit(deadline=5)
    def handler(*sessions: Session) -> None: ...

    with pytest.raises(dropsafe.ConfigurationError, match="exactly one Session argument"):
        handler()
    with (
        Session(engine) as one,
        Session(engine) as two,
        pytest.raises(dropsafe.ConfigurationError, match="got 2"),
    ):
        handler(one, two)
    with (
        Session() as unbound,
        pytest.raises(dropsafe.ConfigurationError, match="bound to an Engine"),
    ):
        handler(unbound)
