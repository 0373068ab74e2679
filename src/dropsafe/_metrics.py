"""The hooks that feed metrics systems: Prometheus and OpenTelemetry (optional extras).

Users import them from `dropsafe.events`; they live here so that the events module stays short.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from dropsafe import _event_types as events
from dropsafe._errors import ConfigurationError
from dropsafe._event_types import event_name

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    from dropsafe._event_types import Event

__all__ = ["OpenTelemetryHook", "PrometheusHook"]


class PrometheusHook:
    """Count and time every event in Prometheus counters and histograms.

    Needs ``pip install 'dropsafe[prometheus]'`` (imported when the hook is made). Labels are
    kinds, reasons and outcomes only: never a URL, a host or an error text, so that no secret
    and no unbounded label set reaches the metrics.

    Example::

        metrics = PrometheusHook()  # one per registry; share it between engines
        policy = dropsafe.Policy(hooks=(LoggingHook(), metrics))
    """

    __module__ = "dropsafe.events"  # where users import it

    def __init__(
        self, registry: CollectorRegistry | None = None, *, namespace: str = "dropsafe"
    ) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise ConfigurationError(
                "PrometheusHook needs prometheus-client: pip install 'dropsafe[prometheus]'"
            ) from None
        registry = registry or prometheus_client.REGISTRY
        # Every metric in ``namespace``, registered in ``registry``.
        counter = functools.partial(
            prometheus_client.Counter, namespace=namespace, registry=registry
        )
        histogram = functools.partial(
            prometheus_client.Histogram, namespace=namespace, registry=registry
        )
        self.dead_connections = counter(
            "dead_connections",
            "Pooled connections found dead at checkout and replaced before use.",
            ["pool_wide"],
        )
        self.invalidations = counter(
            "invalidated_connections",
            "Connections lost under a statement (the unit of work may be retried).",
            ["kind", "pool_wide"],
        )
        self.lost_rollbacks = counter(
            "lost_rollbacks",
            "ROLLBACKs that met a lost connection: invalidated, not raised.",
            ["during"],
        )
        self.replayed_statements = counter(
            "replayed_statements",
            "First statements of a transaction sent again after their connection was lost.",
        )
        self.replayed_transactions = counter(
            "replayed_transactions",
            "Transactions that lost their connection before COMMIT, by what the replay did.",
            ["outcome"],
        )
        self.connect_waits = histogram(
            "connect_wait_seconds",
            "Checkouts that waited for an unreachable server, by outcome.",
            ["outcome"],
        )
        self.pings = histogram("ping_seconds", "Round trips paid at checkout.", ["why"])
        self.retries = counter(
            "retries", "Units of work run again after a retryable error.", ["kind"]
        )
        self.gave_up = counter(
            "units_gave_up", "Units of work out of attempts or of time.", ["reason"]
        )
        self.commits_resolved = counter(
            "commits_resolved",
            "COMMITs whose reply was lost, by what the server said.",
            ["outcome"],
        )
        self.lost_commits = counter(
            "acknowledged_commits_lost",
            "Acknowledged COMMITs a failover lost (lost) or may have lost (unknown).",
            ["outcome"],
        )
        self.resolution_seconds = histogram(
            "commit_resolution_seconds", "Time spent resolving an ambiguous COMMIT."
        )
        self.hooks_failed_after_commit = counter(
            "hooks_failed_after_commit",
            "Session hooks that raised after a unit of work had committed (result returned).",
        )
        self.hosts_skipped = counter(
            "hosts_skipped",
            "Hosts of a multi-host URL left out of connects after a timeout, by cause.",
            ["cause"],
        )
        self.hosts_retried = counter(
            "hosts_retried", "Hosts left out of connects that connects try again."
        )

    def __call__(self, event: Event, /) -> None:
        """Record ``event``."""
        if not self._record_engine_event(event):
            self._record_unit_event(event)

    def _record_engine_event(self, event: Event) -> bool:
        """Record an event of a hardened engine; False if ``event`` is none of those."""
        if isinstance(event, events.DeadConnectionReplaced):
            self.dead_connections.labels(pool_wide=str(event.pool_wide).lower()).inc()
        elif isinstance(event, events.ConnectWaited):
            self.connect_waits.labels(outcome=event.outcome).observe(event.waited)
        elif isinstance(event, events.ConnectionInvalidated):
            pool_wide = str(event.pool_wide).lower()
            self.invalidations.labels(kind=event.kind.value, pool_wide=pool_wide).inc()
        elif isinstance(event, events.RollbackConnectionLost):
            self.lost_rollbacks.labels(during=event.during).inc()
        elif isinstance(event, events.FirstStatementReplayed):
            self.replayed_statements.inc()
        elif isinstance(event, events.TransactionReplayed):
            self.replayed_transactions.labels(outcome=event.outcome).inc()
        elif isinstance(event, events.PingSucceeded):
            self.pings.labels(why=event.why).observe(event.latency)
        elif isinstance(event, events.HostSkipped):
            self.hosts_skipped.labels(cause=event.cause).inc()
        elif isinstance(event, events.HostRetried):
            self.hosts_retried.inc()
        else:
            return False
        return True

    def _record_unit_event(self, event: Event) -> None:
        """Record an event of a unit of work."""
        if isinstance(event, events.RetryScheduled):
            self.retries.labels(kind=event.kind.value).inc()
        elif isinstance(event, events.RetriesGaveUp):
            self.gave_up.labels(reason=event.reason).inc()
        elif isinstance(event, events.CommitResolved):
            self.commits_resolved.labels(outcome=event.outcome).inc()
            self.resolution_seconds.observe(event.elapsed)
        elif isinstance(event, events.AcknowledgedCommitLost):
            self.lost_commits.labels(outcome=event.outcome).inc()
        elif isinstance(event, events.HookFailedAfterCommit):
            self.hooks_failed_after_commit.inc()


# Fields whose values are few and known: metric attributes. Free text (errors, a lost commit's
# reason, a unit's name) and numbers go to span events only.
_OTEL_LABELS = frozenset({"pool_wide", "kind", "during", "why", "outcome", "cause"})
# Durations in seconds, recorded in one histogram per event.
_OTEL_SECONDS = frozenset({"latency", "elapsed", "delay"})


class OpenTelemetryHook:
    """Report every event to OpenTelemetry: a span event on the current span, and metrics.

    Needs ``pip install 'dropsafe[otel]'`` (the API; your application configures the SDK and
    its exporters). Each event is added to the span that is current where it happened (the
    request's, the task's), named as in the log (``dropsafe.retry_scheduled``) with every field
    as an attribute, passwords already masked. Metrics: the counter ``dropsafe.events``, one
    per event, with attribute ``event`` and the event's low-cardinality fields (kind, outcome,
    ...; never an error text, a host or a URL), and the histogram ``dropsafe.event.duration``
    (seconds) for pings, retries' delays and resolutions. ``meter_provider``: the global one
    by default.

    Example::

        policy = dropsafe.Policy(hooks=(LoggingHook(), OpenTelemetryHook()))
    """

    __module__ = "dropsafe.events"  # where users import it

    def __init__(self, *, meter_provider: MeterProvider | None = None) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            raise ConfigurationError(
                "OpenTelemetryHook needs opentelemetry-api: pip install 'dropsafe[otel]'"
            ) from None
        self._trace = trace
        meter = metrics.get_meter("dropsafe", meter_provider=meter_provider)
        self.events = meter.create_counter(
            "dropsafe.events", unit="{event}", description="Things dropsafe did, by event."
        )
        self.durations = meter.create_histogram(
            "dropsafe.event.duration",
            unit="s",
            description="Pings at checkout, retries' backoff and commit resolutions.",
        )

    def __call__(self, event: Event, /) -> None:
        """Add ``event`` to the current span and count it."""
        name = event_name(event)
        attributes: dict[str, str | bool | int | float] = {}
        labels: dict[str, str | bool] = {"event": name}
        for field in dataclasses.fields(event):
            value = getattr(event, field.name)
            if value is None:
                continue
            shown = getattr(value, "value", value)  # an ErrorKind as its text
            if not isinstance(shown, (str, bool, int, float)):
                shown = str(shown)
            attributes[field.name] = shown
            if field.name in _OTEL_LABELS or (
                field.name == "reason" and isinstance(event, events.RetriesGaveUp)
            ):
                labels[field.name] = shown if isinstance(shown, bool) else str(shown)
        span = self._trace.get_current_span()
        if span.is_recording():
            span.add_event(name, attributes=attributes)
        self.events.add(1, labels)
        for field_name in _OTEL_SECONDS & attributes.keys():
            seconds = attributes[field_name]
            if isinstance(seconds, float):
                self.durations.record(seconds, {"event": name})
