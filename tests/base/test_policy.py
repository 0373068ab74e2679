from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dropsafe
from dropsafe import ConfigurationError, ConnectionPolicy, Policy, PoolPolicy, UnitPolicy
from dropsafe._policy import seconds


def test_defaults_bound_a_half_open_request_within_fifteen_seconds():
    policy = Policy()
    assert policy.connection.tcp_user_timeout is not None
    assert seconds(policy.connection.tcp_user_timeout) <= 15
    assert seconds(policy.pool.ping_after_idle) > 0


def test_connections_are_retired_after_an_hour_and_no_pooler_is_assumed():
    assert PoolPolicy().max_lifetime == 3600.0
    assert PoolPolicy(max_lifetime=None).max_lifetime is None
    assert PoolPolicy(max_lifetime=timedelta(minutes=5)).max_lifetime == 300.0
    assert ConnectionPolicy().pooler is None
    assert ConnectionPolicy(pooler="transaction").pooler == "transaction"


def test_a_checkout_waits_out_a_restart_well_within_a_web_servers_timeout():
    wait = seconds(ConnectionPolicy().connect_wait)
    # Outlasts a restart (0.3-0.5 s measured here), well below gunicorn's and Heroku's 30 s.
    assert 5 <= wait <= 15
    assert ConnectionPolicy(connect_wait=0).connect_wait == 0.0
    assert ConnectionPolicy(connect_wait=timedelta(seconds=3)).connect_wait == 3.0


def test_durations_take_timedelta_and_store_seconds():
    assert ConnectionPolicy(connect_timeout=timedelta(milliseconds=2500)).connect_timeout == 2.5
    assert UnitPolicy(deadline=timedelta(minutes=1)).deadline == 60.0


@pytest.mark.parametrize(
    ("layer", "field", "value", "message"),
    [
        (ConnectionPolicy, "connect_timeout", 0, r"connect_timeout must be within 1\.\.600"),
        (ConnectionPolicy, "tcp_user_timeout", -1, "tcp_user_timeout must be within"),
        (ConnectionPolicy, "keepalive_count", 2.5, "keepalive_count must be an int"),
        (UnitPolicy, "max_attempts", 0, "max_attempts must be within 1..1000"),
        (PoolPolicy, "ping_timeout", float("nan"), "ping_timeout must be finite"),
        (UnitPolicy, "deadline", "30", "deadline must be a number of seconds or a timedelta"),
        (PoolPolicy, "ping_after_idle", True, "ping_after_idle must be"),
        (UnitPolicy, "verify_commits", 1, "verify_commits must be a bool"),
        (PoolPolicy, "replay_first_statement", 0, "replay_first_statement must be a bool"),
        (ConnectionPolicy, "pooler", "txn", "pooler must be one of None, 'session', 'transaction'"),
        (ConnectionPolicy, "pooler", True, "pooler must be one of"),
        (PoolPolicy, "max_lifetime", 0.5, r"max_lifetime must be within 1\.\.604800"),
        (PoolPolicy, "max_lifetime", "1h", "max_lifetime must be a number of seconds"),
        (ConnectionPolicy, "connect_wait", -1, r"connect_wait must be within 0\.\.600"),
        (ConnectionPolicy, "connect_wait", None, "connect_wait must be a number of seconds"),
        (ConnectionPolicy, "connect_wait", float("inf"), "connect_wait must be finite"),
    ],
)
def test_bad_values_name_the_layer_the_field_and_the_range(layer, field, value, message):
    with pytest.raises(ConfigurationError, match=f"{layer.__name__}.{message}"):
        layer(**{field: value})


def test_backoff_max_below_initial_is_refused():
    with pytest.raises(ConfigurationError, match="backoff_max must be >= backoff_initial"):
        UnitPolicy(backoff_initial=1, backoff_max=0.5)


def test_every_layer_is_frozen():
    for value in (Policy(), ConnectionPolicy(), PoolPolicy(), UnitPolicy()):
        with pytest.raises(AttributeError):
            value.deadline = 1


@pytest.mark.parametrize(
    ("knob", "layer"),
    [
        ("tcp_user_timeout", "connection=ConnectionPolicy"),
        ("ping_timeout", "pool=PoolPolicy"),
        ("deadline", "unit=UnitPolicy"),
        ("verify_commits", "unit=UnitPolicy"),
        ("pooler", "connection=ConnectionPolicy"),
        ("max_lifetime", "pool=PoolPolicy"),
        ("replay_first_statement", "pool=PoolPolicy"),
    ],
)
def test_a_flat_knob_of_version_one_says_which_layer_it_belongs_to(knob, layer):
    with pytest.raises(ConfigurationError, match=f"Policy\\({layer}\\({knob}=...\\)\\)"):
        Policy(**{knob: 1})


def test_a_layer_in_the_wrong_place_is_refused():
    with pytest.raises(ConfigurationError, match=r"Policy\.unit must be a UnitPolicy"):
        Policy(unit=ConnectionPolicy())
    with pytest.raises(ConfigurationError, match="no setting 'retries'"):
        Policy(retries=3)


def test_a_unit_of_work_refuses_the_engines_whole_policy():
    # The connection and pool knobs would be silently ignored there: say so instead.
    engine = dropsafe.create_engine("postgresql+psycopg2://app@127.0.0.1:1/app")
    with pytest.raises(ConfigurationError, match=r"policy=your_policy\.unit"):
        dropsafe.run_transaction(engine, lambda c: 1, policy=Policy())
    with pytest.raises(ConfigurationError, match=r"UnitPolicy\.deadline must be within"):
        dropsafe.run_transaction(engine, lambda c: 1, deadline=-1)
    with pytest.raises(ConfigurationError, match=r"UnitPolicy\.max_attempts must be an int"):
        dropsafe.transactional(engine, max_attempts=2.5)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6))
def test_any_number_is_accepted_in_range_or_refused_clearly(value):
    try:
        policy = PoolPolicy(ping_timeout=value)
    except ConfigurationError as exc:
        assert "PoolPolicy.ping_timeout" in str(exc)
    else:
        assert 0.05 <= policy.ping_timeout <= 300


def test_a_per_call_override_is_checked_every_time_though_made_once():
    # The overridden policy is cached (making one costs more than a unit's own work); a value
    # that equals a cached one without being valid (True == 1) is still refused, every time.
    from dropsafe._transaction import _settings  # noqa: PLC0415 - the cache under test

    engine = dropsafe.create_engine("postgresql+psycopg2://app@127.0.0.1:1/app")
    first, _ = _settings(engine, None, 1, 2)
    assert _settings(engine, None, 1, 2)[0] is first
    assert (first.deadline, first.max_attempts) == (1.0, 2)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match=r"UnitPolicy\.deadline must be"):
            dropsafe.run_transaction(engine, lambda c: 1, deadline=True, max_attempts=2)
        with pytest.raises(ConfigurationError, match=r"UnitPolicy\.max_attempts must be"):
            dropsafe.run_transaction(engine, lambda c: 1, deadline=1, max_attempts=True)
        with pytest.raises(ConfigurationError, match=r"UnitPolicy\.deadline must be"):
            dropsafe.run_transaction(engine, lambda c: 1, deadline=[1])  # unhashable
