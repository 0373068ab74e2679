from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dropsafe import ConfigurationError, Policy
from dropsafe._policy import seconds


def test_defaults_bound_a_half_open_request_within_fifteen_seconds():
    policy = Policy()
    assert policy.tcp_user_timeout is not None
    assert seconds(policy.tcp_user_timeout) <= 15
    assert seconds(policy.ping_after_idle) > 0


def test_durations_take_timedelta_and_store_seconds():
    policy = Policy(connect_timeout=timedelta(milliseconds=2500), deadline=timedelta(minutes=1))
    assert policy.connect_timeout == 2.5
    assert policy.deadline == 60.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("connect_timeout", 0, r"connect_timeout must be within 1\.\.600"),
        ("tcp_user_timeout", -1, "tcp_user_timeout must be within"),
        ("keepalive_count", 2.5, "keepalive_count must be an int"),
        ("max_attempts", 0, "max_attempts must be within 1..1000"),
        ("ping_timeout", float("nan"), "must be finite"),
        ("deadline", "30", "deadline must be a number of seconds or a timedelta"),
        ("ping_after_idle", True, "ping_after_idle must be"),
        ("verify_commits", 1, "verify_commits must be a bool"),
    ],
)
def test_bad_values_name_the_field_and_range(field, value, message):
    with pytest.raises(ConfigurationError, match=message):
        Policy(**{field: value})


def test_backoff_max_below_initial_is_refused():
    with pytest.raises(ConfigurationError, match="backoff_max must be >= backoff_initial"):
        Policy(backoff_initial=1, backoff_max=0.5)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        Policy().deadline = 1  # type: ignore[misc]


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6))
def test_any_number_is_accepted_in_range_or_refused_clearly(value):
    try:
        policy = Policy(ping_timeout=value)
    except ConfigurationError as exc:
        assert "Policy.ping_timeout" in str(exc)
    else:
        assert 0.05 <= policy.ping_timeout <= 300
