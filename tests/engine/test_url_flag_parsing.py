"""The URL flag's parsing: ``dropsafe_<knob>`` parameters to a Policy, bad ones named."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import dropsafe
from dropsafe._engine.url_plugin import KNOBS, DropsafePlugin, policy_from_query
from dropsafe._policy import _LAYER_OF

URL = "postgresql+psycopg2://app:s3cret-pw@db.invalid/app?sslmode=require"


def test_every_knob_of_every_layer_is_reachable_from_the_url():
    assert set(KNOBS) == set(_LAYER_OF)


def test_values_parse_to_each_knobs_type_and_land_in_its_layer():
    policy = policy_from_query(
        {
            "dropsafe_deadline": "10",
            "dropsafe_max_attempts": "7",
            "dropsafe_verify_commits": "False",
            "dropsafe_tcp_user_timeout": "2.5",
            "dropsafe_keepalive_idle": "none",
            "dropsafe_keepalive_count": "4",
            "dropsafe_connect_wait": "3",
            "dropsafe_ping_after_idle": "0",
            "sslmode": "require",  # not ours: left alone
        }
    )
    assert policy.unit == dropsafe.UnitPolicy(deadline=10, max_attempts=7, verify_commits=False)
    assert policy.connection == dropsafe.ConnectionPolicy(
        tcp_user_timeout=2.5, keepalive_idle=None, keepalive_count=4, connect_wait=3
    )
    assert policy.pool == dropsafe.PoolPolicy(ping_after_idle=0, replay_transaction=True)
    assert policy.hooks == dropsafe.Policy().hooks


def test_a_knob_of_a_few_values_and_an_optional_duration_parse_too():
    policy = policy_from_query({"dropsafe_pooler": "Transaction", "dropsafe_max_lifetime": "600"})
    assert policy.connection.pooler == "transaction"
    assert policy.pool.max_lifetime == 600
    no_replay = policy_from_query({"dropsafe_replay_first_statement": "off"})
    assert no_replay.pool == dropsafe.PoolPolicy(
        replay_first_statement=False, replay_transaction=True
    )
    policy = policy_from_query({"dropsafe_pooler": "none", "dropsafe_max_lifetime": "none"})
    assert policy.connection.pooler is None
    assert policy.pool.max_lifetime is None


def test_no_parameters_give_the_default_policy_and_the_transaction_replay():
    # The flag is the zero-code path: its requests are not units of work.
    assert policy_from_query({}) == dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True)
    )


@pytest.mark.parametrize("value", ["false", "off", "0"])
def test_the_flags_transaction_replay_is_turned_off_by_the_url(value):
    policy = policy_from_query({"dropsafe_replay_transaction": value})
    assert policy == dropsafe.Policy()


def test_the_flags_transaction_replay_is_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DROPSAFE_REPLAY_TRANSACTION", "false")
    assert policy_from_query({}).pool.replay_transaction is False
    monkeypatch.setenv("DROPSAFE_REPLAY_TRANSACTION", "true")
    assert policy_from_query({}).pool.replay_transaction is True


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"dropsafe_deadlin": "5"}, "unknown URL parameter 'dropsafe_deadlin'"),
        ({"dropsafe_hooks": "x"}, "unknown URL parameter 'dropsafe_hooks'"),
        ({"dropsafe_deadline": "soon"}, "dropsafe_deadline must be a number of seconds"),
        ({"dropsafe_deadline": ""}, "dropsafe_deadline must be a number of seconds"),
        ({"dropsafe_deadline": "0"}, "dropsafe_deadline=0.0: UnitPolicy.deadline must be within"),
        ({"dropsafe_deadline": "nan"}, "dropsafe_deadline=nan: UnitPolicy.deadline must be"),
        ({"dropsafe_deadline": "inf"}, "dropsafe_deadline=inf"),
        ({"dropsafe_deadline": ("5", "6")}, "dropsafe_deadline is given 2 times"),
        ({"dropsafe_max_attempts": "2.5"}, "dropsafe_max_attempts must be an integer"),
        ({"dropsafe_max_attempts": "0"}, "UnitPolicy.max_attempts must be within 1..1000"),
        ({"dropsafe_verify_commits": "maybe"}, "dropsafe_verify_commits must be true or false"),
        ({"dropsafe_connect_timeout": "none"}, "dropsafe_connect_timeout must be a number"),
        (
            {"dropsafe_pooler": "statement"},
            "dropsafe_pooler must be one of none, session, transaction",
        ),
        ({"dropsafe_tcp_user_timeout": "-1"}, "ConnectionPolicy.tcp_user_timeout must be within"),
        (
            {"dropsafe_backoff_initial": "2", "dropsafe_backoff_max": "1"},
            "dropsafe_backoff_initial=2.0, dropsafe_backoff_max=1.0",
        ),
    ],
)
def test_a_bad_parameter_is_named_in_the_error(query, message):
    with pytest.raises(dropsafe.ConfigurationError) as caught:
        policy_from_query(query)
    assert message in str(caught.value)


def test_the_plugin_removes_only_its_own_parameters():
    url = make_url(URL + "&dropsafe_deadline=5&dropsafe_keepalive_idle=30&application_name=x")
    plugin = DropsafePlugin(url, {})
    assert dict(plugin.update_url(url).query) == {"sslmode": "require", "application_name": "x"}
    assert plugin.policy.unit.deadline == 5.0


def test_a_bad_parameter_fails_create_engine_itself_without_the_password():
    with pytest.raises(dropsafe.ConfigurationError, match="dropsafe_deadline") as caught:
        sa.create_engine(URL + "&plugin=dropsafe&dropsafe_deadline=-3")
    assert "s3cret-pw" not in str(caught.value)


def test_engines_of_other_databases_are_refused_by_name_without_the_password():
    with pytest.raises(dropsafe.ConfigurationError, match="PostgreSQL engines only") as caught:
        sa.create_engine("sqlite:///:memory:?plugin=dropsafe")
    assert "sqlite" in str(caught.value)
    with pytest.raises(dropsafe.ConfigurationError, match="PostgreSQL engines only") as caught:
        sa.create_engine("mysql+pymysql://app:s3cret-pw@db.invalid/app?plugin=dropsafe")
    assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(dropsafe.ConfigurationError, match="supported driver"):
        sa.create_engine("postgresql+psycopg2cffi://app@db.invalid/app?plugin=dropsafe")


def test_the_engine_is_hardened_and_its_url_is_clean_without_connecting(disposing):
    engine = disposing(sa.create_engine(URL + "&plugin=dropsafe&dropsafe_ping_after_idle=3"))
    guard = dropsafe._engine.guard.guard_of(engine)
    assert guard is not None
    assert guard.policy.pool.ping_after_idle == 3.0
    assert dict(engine.url.query) == {"sslmode": "require"}
    # Hardening again by hand with the same policy is a no-op; another policy is refused.
    assert dropsafe.harden(engine, guard.policy) is engine
    with pytest.raises(dropsafe.ConfigurationError, match="another policy"):
        dropsafe.harden(engine, dropsafe.Policy())


def test_the_entry_point_is_registered():
    (entry,) = importlib.metadata.entry_points(group="sqlalchemy.plugins", name="dropsafe")
    assert entry.load() is DropsafePlugin


def test_engines_without_the_flag_never_import_dropsafe():
    """SQLAlchemy loads a plugin only when a URL names it: other engines pay nothing."""
    code = (
        "import sys, sqlalchemy\n"
        "sqlalchemy.create_engine('postgresql+psycopg2://app@db.invalid/app')\n"
        "sqlalchemy.create_engine('sqlite://', plugins=[])\n"
        "print(sorted(m for m in sys.modules if m.startswith('dropsafe')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
