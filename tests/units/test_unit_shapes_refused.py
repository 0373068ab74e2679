"""Two-phase and AUTOCOMMIT units are refused at the call, before a connection is made."""

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe import ConfigurationError

# Nothing listens there: a refusal that connected first would fail differently, and slowly.
URL = "postgresql+psycopg2://app:s3cret@db.invalid/app"
ASYNC_URL = "postgresql+asyncpg://app:s3cret@db.invalid/app"


def _never_called(handle):
    raise AssertionError("the unit ran")


async def _never_awaited(handle):
    raise AssertionError("the unit ran")


@pytest.mark.parametrize(
    ("make_bind", "message"),
    [
        (lambda engine: sessionmaker(engine, twophase=True), "two-phase"),
        (lambda engine: engine.execution_options(isolation_level="AUTOCOMMIT"), "AUTOCOMMIT"),
        (
            lambda engine: sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT")),
            "AUTOCOMMIT",
        ),
    ],
)
def test_a_sync_unit_of_a_refused_shape_never_connects(make_bind, message):
    engine = dropsafe.create_engine(URL)
    with pytest.raises(ConfigurationError, match=message) as raised:
        dropsafe.run_transaction(make_bind(engine), _never_called)
    assert "instead" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert engine.pool.checkedout() == 0


def test_an_autocommit_engine_is_refused_at_the_call():
    engine = dropsafe.create_engine(URL, isolation_level="AUTOCOMMIT")
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        dropsafe.run_transaction(engine, _never_called)
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        dropsafe.transactional(sessionmaker(engine))(_never_called)()


@pytest.mark.parametrize(
    ("make_bind", "message"),
    [
        (lambda engine: async_sessionmaker(engine, twophase=True), "two-phase"),
        (lambda engine: engine.execution_options(isolation_level="AUTOCOMMIT"), "AUTOCOMMIT"),
    ],
)
def test_an_async_unit_of_a_refused_shape_never_connects(make_bind, message):
    async def scenario():
        engine = dropsafe.create_async_engine(ASYNC_URL)
        try:
            with pytest.raises(ConfigurationError, match=message):
                await dropsafe.run_transaction_async(make_bind(engine), _never_awaited)
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_a_plain_sessionmaker_is_not_refused():
    engine = dropsafe.create_engine(URL, connect_args={"connect_timeout": 1})
    with pytest.raises(sa.exc.OperationalError):  # it tried: db.invalid does not resolve
        dropsafe.run_transaction(sessionmaker(engine), _never_called, deadline=0.5)


def test_an_autocommit_engine_among_a_sessionmakers_binds_is_refused_at_the_call():
    main = dropsafe.create_engine(URL)
    other = dropsafe.create_engine(URL.replace("/app", "/other"), isolation_level="AUTOCOMMIT")

    class Model:  # binds take any class; no table is needed to be refused
        pass

    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        dropsafe.run_transaction(sessionmaker(main, binds={Model: other}), _never_called)
    assert main.pool.checkedout() == 0
    assert other.pool.checkedout() == 0
