"""create_engine, create_async_engine and harden refuse bad input at the call, clearly."""

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker
from sqlalchemy.orm import scoped_session, sessionmaker

import dropsafe
from dropsafe import ConfigurationError, Policy, UnitPolicy
from dropsafe._engine.guard import guard_of
from dropsafe._redaction import redact_text, redact_url

URL = "postgresql+psycopg2://app:s3cret@db.invalid/app"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url at all", "malformed database URL"),
        ("mysql+pymysql://app:s3cret@db/app", "PostgreSQL only"),
        ("postgresql+nosuchdriver://app:s3cret@db/app", "unsupported driver 'nosuchdriver'"),
        (
            "postgresql+psycopg2cffi://app:s3cret@db/app",
            r"supported: postgresql\+psycopg2, postgresql\+psycopg,",
        ),
    ],
)
def test_bad_urls_are_refused_without_the_password(url, message):
    with pytest.raises(ConfigurationError, match=message) as raised:
        dropsafe.create_engine(url)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://u:Hunt@er2s3cret@127.0.0.1:5432/postgres",
        "postgresql+asyncpg://u:s3cr@et@db.invalid/app",
        "postgresql+psycopg://us/er:s3cret@db.invalid/app",
    ],
)
def test_a_password_split_by_an_unencoded_at_is_refused_before_any_lookup(url):
    # Parsed as given, a piece of the password would become the host name: looked up in DNS
    # and named in every error.
    make = dropsafe.create_async_engine if "asyncpg" in url else dropsafe.create_engine
    with pytest.raises(ConfigurationError, match="percent-encode") as raised:
        make(url)
    assert "s3cr" not in str(raised.value)
    assert "er2" not in str(raised.value)


def test_url_of_the_wrong_type():
    with pytest.raises(ConfigurationError, match="url must be a string"):
        dropsafe.create_engine(42)  # type: ignore[arg-type]


def test_sync_driver_in_async_engine_is_refused():
    with pytest.raises(ConfigurationError, match="asyncio driver") as raised:
        dropsafe.create_async_engine(URL)
    assert "s3cret" not in str(raised.value)


def test_harden_is_idempotent_and_refuses_a_second_policy():
    engine = sa.create_engine(URL)
    assert dropsafe.harden(engine) is engine
    guard = guard_of(engine)
    assert guard is not None
    assert dropsafe.harden(engine) is engine
    assert dropsafe.harden(engine, guard.policy) is engine
    assert guard_of(engine) is guard
    with pytest.raises(ConfigurationError, match="already hardened"):
        dropsafe.harden(engine, Policy(unit=UnitPolicy(max_attempts=2)))


def test_harden_async_engine_guards_its_sync_engine():
    engine = dropsafe.create_async_engine("postgresql+asyncpg://app@db.invalid/app")
    assert guard_of(engine) is guard_of(engine.sync_engine) is not None


def test_harden_refuses_other_databases_and_other_objects():
    with pytest.raises(ConfigurationError, match="PostgreSQL engines only"):
        dropsafe.harden(sa.create_engine("sqlite://"))
    with pytest.raises(ConfigurationError, match="takes a SQLAlchemy Engine"):
        dropsafe.harden("postgresql://")  # type: ignore[type-var]


def test_engine_kwargs_pass_through_and_bad_ones_are_explained():
    engine = dropsafe.create_engine(URL, pool_size=3)
    assert engine.pool.size() == 3
    with pytest.raises(ConfigurationError, match="cannot create an engine") as raised:
        dropsafe.create_engine(URL, no_such_option=True)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql+psycopg2://app:s3cret@db/app",
        "postgresql://app:s3cret@db:5432/app?sslmode=require",
        "postgresql://app:s3cret@",
        "host=db password=s3cret user=app",
        "postgresql://db/app?password=s3cret",
    ],
)
def test_redact_url_hides_the_password(text):
    redacted = redact_url(text)
    assert "s3cret" not in redacted
    assert "***" in redacted


def test_redact_sqlalchemy_url():
    assert "s3cret" not in redact_url(make_url("postgresql://app:s3cret@db/app"))


@pytest.mark.parametrize(
    "text",
    [
        "error at postgresql://app:s3cret@db/app and more",
        "postgresql://a@b:s3cret@db/app",
        "{'password': 's3cret', 'user': 'app'}",
        "password = s3cret",
    ],
)
def test_redact_text_hides_passwords_in_free_text(text):
    assert "s3cret" not in redact_text(text)


def test_redact_text_leaves_ordinary_errors_alone():
    text = 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
    assert redact_text(text) == text


def test_a_scoped_session_is_refused_with_what_to_pass_instead():
    """Flask-SQLAlchemy's db.session is a scoped_session: one shared session for every attempt."""
    engine = dropsafe.create_engine(URL)
    try:
        shared = scoped_session(sessionmaker(engine))
        with pytest.raises(ConfigurationError, match=r"scoped_session.*sessionmaker\(db\.engine\)"):
            dropsafe.run_transaction(shared, lambda s: 1)
        with pytest.raises(ConfigurationError, match="scoped_session"):
            dropsafe.transactional(shared)(lambda s: 1)
    finally:
        engine.dispose()
    aengine = dropsafe.create_async_engine("postgresql+asyncpg://app:s3cret@db.invalid/app")
    ashared = async_scoped_session(async_sessionmaker(aengine), scopefunc=lambda: 1)
    with pytest.raises(ConfigurationError, match=r"async_scoped_session.*async_sessionmaker"):
        asyncio.run(dropsafe.run_transaction_async(ashared, lambda s: s.scalar(1)))
    asyncio.run(aengine.dispose())
