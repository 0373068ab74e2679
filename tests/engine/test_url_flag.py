"""``?plugin=dropsafe``: engines made anywhere, by the URL alone, hardened as `harden` does."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import dropsafe
from dropsafe._engine.guard import guard_of

flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
flask = pytest.importorskip("flask")


def test_flask_sqlalchemy_engines_with_the_url_flag_are_hardened(shared_server):
    """Flask-SQLAlchemy makes its engines itself: the URL flag alone must guard every bind."""
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = shared_server.url("psycopg2", plugin="dropsafe")
    app.config["SQLALCHEMY_BINDS"] = {
        "one": shared_server.url("psycopg", plugin="dropsafe"),
        "two": shared_server.url("psycopg2", plugin="dropsafe", dropsafe_deadline="7"),
    }
    db = flask_sqlalchemy.SQLAlchemy(app)
    with app.app_context():
        try:
            engines = db.engines
            assert set(engines) == {None, "one", "two"}
            for engine in engines.values():
                assert guard_of(engine) is not None, engine.url
                # The driver never sees dropsafe's parameters.
                assert "plugin" not in engine.url.query
                assert not any(key.startswith("dropsafe_") for key in engine.url.query)
                with engine.connect() as connection:
                    assert connection.scalar(sa.text("SELECT 1")) == 1
            guard = guard_of(engines["two"])
            assert guard is not None
            assert guard.policy.unit.deadline == 7.0
        finally:
            for engine in db.engines.values():
                engine.dispose()


@pytest.mark.shares_server
@pytest.mark.fault
@pytest.mark.parametrize("flag", [True, False], ids=["with-flag", "without-flag"])
def test_a_cut_between_checkouts_fails_no_query_only_with_the_flag(
    postgres_server, chaos_proxy, flag, disposing
):
    """Fault: every pooled connection reset (RST) while idle. Outcome: the next query works.

    Without the flag the same engine hands out a dead connection: the control that shows the
    test can fail.
    """
    params = {"plugin": "dropsafe"} if flag else {}
    engine = disposing(
        sa.create_engine(chaos_proxy.route(postgres_server.url("psycopg2", **params)))
    )
    with engine.connect() as connection:
        connection.scalar(sa.text("SELECT 1"))
    assert chaos_proxy.cut("rst") >= 1
    if flag:
        with engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT 2")) == 2
    else:
        with pytest.raises(sa.exc.OperationalError), engine.connect() as connection:
            connection.scalar(sa.text("SELECT 2"))


def test_the_url_settings_reach_the_driver(shared_server, disposing):
    url = shared_server.url(
        "psycopg2", plugin="dropsafe", dropsafe_tcp_user_timeout="3", dropsafe_keepalive_idle="8"
    )
    engine = disposing(sa.create_engine(url))
    with engine.connect() as connection:
        params = connection.connection.dbapi_connection.get_dsn_parameters()
    assert params["tcp_user_timeout"] == "3000"
    assert params["keepalives_idle"] == "8"


def test_dropsafe_create_engine_accepts_the_flag(shared_server):
    url = shared_server.url("psycopg2", plugin="dropsafe", dropsafe_deadline="9")
    engine = dropsafe.create_engine(url)
    try:
        guard = guard_of(engine)
        assert guard is not None
        assert guard.policy.unit.deadline == 9.0
        assert dropsafe.run_transaction(engine, lambda c: c.scalar(sa.text("SELECT 3"))) == 3
    finally:
        engine.dispose()
    with pytest.raises(dropsafe.ConfigurationError, match="another policy"):
        dropsafe.create_engine(url, policy=dropsafe.Policy())


@pytest.mark.shares_server
@pytest.mark.fault
async def test_async_engines_are_hardened_through_their_sync_engine(
    postgres_server, chaos_proxy, disposing_async
):
    """create_async_engine hands the plugin its sync engine: the guard lands where it belongs.

    Fault: every pooled connection reset (RST) while idle. Outcome: the next unit of work
    succeeds in the one attempt the URL allows.
    """
    url = postgres_server.url("asyncpg", plugin="dropsafe", dropsafe_max_attempts="1")
    engine = disposing_async(create_async_engine(chaos_proxy.route(url)))
    guard = guard_of(engine)
    assert guard is not None
    assert guard.policy.unit.max_attempts == 1
    assert guard_of(engine.sync_engine) is guard
    sessions = async_sessionmaker(engine)

    async def read(session):
        return await session.scalar(sa.text("SELECT 4"))

    assert await dropsafe.run_transaction_async(sessions, read) == 4
    assert chaos_proxy.cut("rst") >= 1
    # One attempt allowed: it succeeds only because the checkout check replaced the dead
    # connection, not because a retry did.
    assert await dropsafe.run_transaction_async(sessions, read) == 4
