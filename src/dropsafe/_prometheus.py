"""Prometheus metrics for dropsafe's events (``pip install 'dropsafe[prometheus]'``).

Labels are kinds, reasons and outcomes only: never a URL, a host or an error text, so that no
secret and no unbounded label set reaches the metrics.

Example::

    from dropsafe.events import LoggingHook
    from dropsafe._prometheus import PrometheusHook

    metrics = PrometheusHook()  # one per registry; share it between policies
    policy = dropsafe.Policy(hooks=(LoggingHook(), metrics))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dropsafe._errors import ConfigurationError
from dropsafe.events import (
    CommitResolved,
    ConnectionInvalidated,
    DeadConnectionReplaced,
    Event,
    PingSucceeded,
    RetriesGaveUp,
    RetryScheduled,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["PrometheusHook"]


class PrometheusHook:
    """Count and time every event in Prometheus counters and histograms."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, namespace: str = "dropsafe"
    ) -> None:
        try:
            import prometheus_client  # noqa: PLC0415 - an optional extra
        except ImportError:
            raise ConfigurationError(
                "PrometheusHook needs prometheus-client: pip install 'dropsafe[prometheus]'"
            ) from None
        registry = registry or prometheus_client.REGISTRY
        counter, histogram = prometheus_client.Counter, prometheus_client.Histogram
        common: dict[str, Any] = {"namespace": namespace, "registry": registry}
        self.dead_connections = counter(
            "dead_connections",
            "Pooled connections found dead at checkout and replaced before use.",
            ["pool_wide"],
            **common,
        )
        self.invalidations = counter(
            "invalidated_connections",
            "Connections lost under a statement (the unit of work may be retried).",
            ["kind", "pool_wide"],
            **common,
        )
        self.pings = histogram("ping_seconds", "Round trips paid at checkout.", ["why"], **common)
        self.retries = counter(
            "retries", "Units of work run again after a retryable error.", ["kind"], **common
        )
        self.gave_up = counter(
            "units_gave_up", "Units of work out of attempts or of time.", ["reason"], **common
        )
        self.commits_resolved = counter(
            "commits_resolved",
            "COMMITs whose reply was lost, by what the server said.",
            ["outcome"],
            **common,
        )
        self.resolution_seconds = histogram(
            "commit_resolution_seconds", "Time spent resolving an ambiguous COMMIT.", **common
        )

    def __call__(self, event: Event, /) -> None:
        """Record ``event``."""
        if isinstance(event, DeadConnectionReplaced):
            self.dead_connections.labels(pool_wide=str(event.pool_wide).lower()).inc()
        elif isinstance(event, ConnectionInvalidated):
            pool_wide = str(event.pool_wide).lower()
            self.invalidations.labels(kind=event.kind.value, pool_wide=pool_wide).inc()
        elif isinstance(event, PingSucceeded):
            self.pings.labels(why=event.why).observe(event.latency)
        elif isinstance(event, RetryScheduled):
            self.retries.labels(kind=event.kind.value).inc()
        elif isinstance(event, RetriesGaveUp):
            self.gave_up.labels(reason=event.reason).inc()
        elif isinstance(event, CommitResolved):
            self.commits_resolved.labels(outcome=event.outcome).inc()
            self.resolution_seconds.observe(event.elapsed)
