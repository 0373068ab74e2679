import logging
import pickle
import string
import sys
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import dropsafe
from dropsafe import ConfigurationError, ErrorKind, Policy
from dropsafe.events import (
    AcknowledgedCommitLost,
    CommitResolved,
    ConnectionInvalidated,
    ConnectWaited,
    DeadConnectionReplaced,
    FirstStatementReplayed,
    HookFailedAfterCommit,
    LoggingHook,
    PingSucceeded,
    PrometheusHook,
    RetriesGaveUp,
    RetryScheduled,
    RollbackConnectionLost,
    format_event,
)

EVENTS = [
    DeadConnectionReplaced("probe found the connection dead", pool_wide=True),
    ConnectionInvalidated(
        ErrorKind.FAILOVER, pool_wide=True, error='OperationalError: "read only"'
    ),
    PingSucceeded(0.0123, "idle"),
    RetryScheduled(2, 0.25, ErrorKind.TRANSIENT, "SerializationFailure: conflict\nline two"),
    RetriesGaveUp(5, 3.5, "deadline", "OperationalError: down"),
    CommitResolved(725, "committed", 0.05),
    CommitResolved(726, "unknown", 10.0),
    RollbackConnectionLost("rollback", "OperationalError: server closed the connection"),
    FirstStatementReplayed("OperationalError: terminating connection"),
    HookFailedAfterCommit("app.place_order", "RuntimeError: the broker is down"),
    ConnectWaited(
        "postgresql+psycopg2://app:***@db/app", "connected", 3, 0.41, 1795663776.5, "refused"
    ),
    ConnectWaited("postgresql+psycopg2://app:***@db/app", "gave_up", 9, 10.2, 1795663777.5, "x"),
    AcknowledgedCommitLost(731, "app.place_order", 1795663776.0121, "lost", 'past "0/3001218"'),
]


def test_format_is_one_logfmt_line_per_event():
    lines = [format_event(event) for event in EVENTS]
    assert lines[3] == (
        "dropsafe.retry_scheduled attempt=2 delay=0.25 kind=transient "
        'error="SerializationFailure: conflict line two"'
    )
    assert lines[1].startswith("dropsafe.connection_invalidated kind=failover pool_wide=True ")
    assert r'error="OperationalError: \"read only\""' in lines[1]
    assert all("\n" not in line for line in lines)
    assert lines[-1] == (
        "dropsafe.acknowledged_commit_lost xid=731 unit=app.place_order "
        'committed_at=1795663776.0121 outcome=lost reason="past \\"0/3001218\\""'
    )


def test_logging_hook_levels(caplog):
    hook = LoggingHook()
    with caplog.at_level(logging.DEBUG, logger="dropsafe"):
        for event in EVENTS:
            hook(event)
    levels = {record.getMessage().split()[0]: record.levelname for record in caplog.records}
    assert levels["dropsafe.ping_succeeded"] == "DEBUG"
    assert levels["dropsafe.rollback_connection_lost"] == "DEBUG"
    assert levels["dropsafe.first_statement_replayed"] == "INFO"
    assert levels["dropsafe.retry_scheduled"] == "INFO"
    assert levels["dropsafe.retries_gave_up"] == "WARNING"
    assert levels["dropsafe.acknowledged_commit_lost"] == "WARNING"
    assert levels["dropsafe.hook_failed_after_commit"] == "ERROR"
    waits = [r.levelname for r in caplog.records if "connect_waited" in r.getMessage()]
    assert waits == ["INFO", "WARNING"]  # connected, gave up
    assert [r.levelname for r in caplog.records if "outcome=unknown" in r.getMessage()] == [
        "WARNING"
    ]


def test_default_policy_logs_and_own_hooks_replace_it():
    assert Policy().hooks == (LoggingHook(),)
    assert Policy() == Policy()
    mine = []
    assert Policy(hooks=(mine.append,)).hooks == (mine.append,)
    with pytest.raises(ConfigurationError, match="hooks must be a tuple of callables"):
        Policy(hooks=[mine.append])


def test_prometheus_hook_counts_every_event():
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    for event in EVENTS:
        hook(event)
    value = registry.get_sample_value
    assert value("dropsafe_dead_connections_total", {"pool_wide": "true"}) == 1
    assert (
        value("dropsafe_invalidated_connections_total", {"kind": "failover", "pool_wide": "true"})
        == 1
    )
    assert value("dropsafe_retries_total", {"kind": "transient"}) == 1
    assert value("dropsafe_units_gave_up_total", {"reason": "deadline"}) == 1
    assert value("dropsafe_commits_resolved_total", {"outcome": "committed"}) == 1
    assert value("dropsafe_commits_resolved_total", {"outcome": "unknown"}) == 1
    assert value("dropsafe_ping_seconds_count", {"why": "idle"}) == 1
    assert value("dropsafe_lost_rollbacks_total", {"during": "rollback"}) == 1
    assert value("dropsafe_replayed_statements_total") == 1
    assert value("dropsafe_acknowledged_commits_lost_total", {"outcome": "lost"}) == 1
    assert value("dropsafe_commit_resolution_seconds_sum") == pytest.approx(10.05)
    assert value("dropsafe_hooks_failed_after_commit_total") == 1
    assert value("dropsafe_connect_wait_seconds_count", {"outcome": "connected"}) == 1
    assert value("dropsafe_connect_wait_seconds_sum", {"outcome": "gave_up"}) == pytest.approx(10.2)


def test_prometheus_hook_moves_a_metric_for_every_kind_of_event():
    url, kinds = "postgresql+psycopg2://app:***@db/app", dropsafe.events
    events = [
        *EVENTS,
        kinds.TransactionReplayed("OperationalError: closed", "refused", 1, 0, 40, reason="SET"),
        kinds.HostSkipped(url, "db1", 5432, "connect_timed_out", 30.0),
        kinds.HostRetried(url, "db1", 5432, 30.0),
    ]
    assert {type(event) for event in events} == set(typing.get_args(kinds.Event))
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)

    def total():
        samples = (sample for metric in registry.collect() for sample in metric.samples)
        return sum(sample.value for sample in samples if not sample.name.endswith("_created"))

    for event in events:
        before = total()
        hook(event)
        assert total() > before, type(event).__name__
    refused = {"outcome": "refused"}
    assert registry.get_sample_value("dropsafe_replayed_transactions_total", refused) == 1


def test_every_class_of_the_events_module_names_it_as_its_home():
    # The events and the metrics hooks are defined below dropsafe.events (no import circle);
    # reprs, pickles and tracebacks still name the module users import them from.
    classes = [getattr(dropsafe.events, name) for name in dropsafe.events.__all__]
    homes = {cls.__name__: cls.__module__ for cls in classes if isinstance(cls, type)}
    assert set(homes.values()) == {"dropsafe.events"}, homes
    assert len(homes) >= 17
    assert [pickle.loads(pickle.dumps(e)) for e in EVENTS] == EVENTS  # noqa: S301 - our own bytes


def test_prometheus_without_its_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'dropsafe\[prometheus\]'"):
        PrometheusHook()


SECRET = "Sekr3t-pw"  # noqa: S105 - the needle the test searches for
NAME = st.text(alphabet=string.ascii_letters + string.digits + "_.-", max_size=8)
URL_PARTS = st.tuples(
    st.sampled_from(["postgresql", "postgresql+psycopg2", "postgresql+asyncpg", "mysql", "pg", ""]),
    NAME,
    st.text(max_size=12),  # more password: anything, '@' and '/' included
    st.text(max_size=12),  # host: anything
    st.sampled_from(["", ":5432", ":notaport", ":99999"]),
)


@given(URL_PARTS)
def test_any_url_gives_an_engine_or_a_clear_error_without_the_password(parts):
    scheme, user, noise, host, port = parts
    url = f"{scheme}://{user}:{SECRET}{noise}@{host}{port}/db"
    try:
        engine = dropsafe.create_engine(url)
    except ConfigurationError as exc:
        assert SECRET not in str(exc)
    else:
        assert SECRET not in repr(engine)
        engine.dispose()
