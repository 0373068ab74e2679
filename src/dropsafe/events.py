"""Events: one frozen dataclass per thing dropsafe did, handed to the hooks of the policy.

Hooks are plain callables taking one event; they are attached to a `Policy`
(``Policy(hooks=(my_hook,))``), so each engine reports to its own hooks and nothing is global.
The default policy has one: `LoggingHook`. A hook that raises is logged and ignored: observing
must never break the application. Every text an event carries has its passwords masked.

Example::

    def count_retries(event: dropsafe.events.Event) -> None:
        if isinstance(event, dropsafe.events.RetryScheduled):
            metrics.retries.inc()

    policy = dropsafe.Policy(hooks=(dropsafe.events.LoggingHook(), count_retries))
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    from dropsafe._classify import ErrorKind

__all__ = [
    "AcknowledgedCommitLost",
    "CommitResolved",
    "ConnectWaited",
    "ConnectionInvalidated",
    "DeadConnectionReplaced",
    "Event",
    "FirstStatementReplayed",
    "Hook",
    "HookFailedAfterCommit",
    "HostRetried",
    "HostSkipped",
    "LoggingHook",
    "OpenTelemetryHook",
    "PingSucceeded",
    "PrometheusHook",
    "RetriesGaveUp",
    "RetryScheduled",
    "RollbackConnectionLost",
    "TransactionReplayed",
    "format_event",
]

logger = logging.getLogger("dropsafe")


@dataclass(frozen=True)
class DeadConnectionReplaced:
    """A pooled connection was found dead at checkout and replaced before the app saw it."""

    reason: str
    pool_wide: bool  # every older pooled connection was recycled too


@dataclass(frozen=True)
class ConnectWaited:
    """A checkout could not connect at first because the server was not there; it waited.

    Also when a pooler (PgBouncer) turned a checkout's first statement away for want of a
    server and the statement was sent again on fresh connections. One event per wait, when it
    ends: ``connected`` (the app never saw the outage) or
    ``gave_up`` (``ConnectionPolicy.connect_wait`` ran out, or an error came that waiting
    cannot fix; the last error is raised). Logged at INFO, ``gave_up`` at WARNING.
    """

    url: str  # the engine's URL, password masked
    outcome: Literal["connected", "gave_up"]
    attempts: int  # connects made, the first one included
    waited: float  # seconds from the first failed connect to the outcome
    started_at: float  # when the first connect failed (``time.time()``)
    error: str  # the first failed connect's error, passwords redacted


@dataclass(frozen=True)
class ConnectionInvalidated:
    """A statement met a lost connection (or a failover); it is replaced, maybe the pool too."""

    kind: ErrorKind
    pool_wide: bool
    error: str


@dataclass(frozen=True)
class RollbackConnectionLost:
    """A ROLLBACK met a lost connection: the server had aborted that transaction already.

    The connection was invalidated and nothing was raised: the application goes on as after a
    successful rollback. ``during`` says which ROLLBACK: a Connection's or Session's
    (``rollback``), or the pool's reset of a connection checked in (``reset``). Logged at DEBUG.
    """

    during: Literal["rollback", "reset"]
    error: str


@dataclass(frozen=True)
class FirstStatementReplayed:
    """A transaction's first statement lost its connection before any reply; sent again.

    On a fresh connection, once, and the app never knew: the transaction cannot have
    committed, and nothing else had run in it (docs/guarantees.md). When the replay itself
    failed (no fresh connection, or that one lost too), ``replay_error`` says why, and the
    app got that error: operators see replays that did not save the request.
    """

    error: str  # the lost connection's error, passwords redacted
    replay_error: str | None = None  # None: the replay succeeded


@dataclass(frozen=True)
class PingSucceeded:
    """A checkout paid a round trip (idle too long, or something arrived while idle)."""

    latency: float  # seconds
    why: Literal["idle", "data_waiting"]  # idle too long, or bytes arrived while idle


@dataclass(frozen=True)
class RetryScheduled:
    """A unit of work failed with a retryable error and will run again after ``delay``."""

    attempt: int  # the attempt that failed, from 1
    delay: float  # seconds
    kind: ErrorKind
    error: str  # the error's type and message, passwords redacted


@dataclass(frozen=True)
class RetriesGaveUp:
    """A unit of work ran out of attempts or of time; its last error is raised next."""

    attempts: int
    elapsed: float
    reason: Literal["attempts", "deadline"]
    error: str


@dataclass(frozen=True)
class CommitResolved:
    """A COMMIT whose reply was lost was resolved by asking the server."""

    xid: int
    outcome: Literal["committed", "aborted", "unknown"]
    elapsed: float  # seconds spent asking


@dataclass(frozen=True)
class AcknowledgedCommitLost:
    """A unit of work's COMMIT was acknowledged, then its server failed over without it.

    With asynchronous replication a promoted standby may lack commits the old primary
    acknowledged; no client can prevent that. dropsafe remembers a unit's acknowledged commits
    and, when a unit commits on the server that took over, asks it which of them it has
    (docs/guarantees.md, "Commits a failover lost"). Each missing commit is reported once,
    logged at WARNING: re-check or redo what ``unit`` did, or alert.

    ``outcome`` is ``"lost"`` when the new server proves the commit is not in its history, and
    ``"unknown"`` when dropsafe could not tell (the reason says why): treat it as lost until
    checked. ``committed_at`` is when the COMMIT was acknowledged (``time.time()``).
    """

    xid: int
    unit: str  # the unit of work's function (its qualified name)
    committed_at: float
    outcome: Literal["lost", "unknown"]
    reason: str


@dataclass(frozen=True)
class HookFailedAfterCommit:
    """A Session hook raised after a unit of work's COMMIT had succeeded.

    The hook: ``after_commit`` or ``after_transaction_end`` (or anything else that raises
    between the COMMIT and the end of the unit's session). The unit committed:
    `run_transaction` returns its result, since an error from it means "no effect". The
    hook's error is reported here instead, logged at ERROR, once. Work that must happen with
    the commit belongs inside the unit (an outbox row), not in such a hook.
    """

    unit: str  # the unit of work's function (its qualified name)
    error: str  # the hook's error, passwords redacted


@dataclass(frozen=True)
class TransactionReplayed:
    """A transaction lost its connection before its COMMIT was sent, past its first statement.

    ``replayed``: its statements were sent again on a fresh connection, every result the same
    as what the app had received, and the lost statement then ran there: the app never knew.
    ``refused``: the transaction did something a replay cannot repeat (``reason``, one line).
    ``failed``: the replay ran and something differed or failed (``reason``). In both the app
    got the original error, and nothing of the replay was kept (docs/mid-transaction.md).
    """

    error: str  # the lost connection's error, passwords redacted
    outcome: Literal["replayed", "refused", "failed"]
    statements: int  # statements sent again (before the lost one)
    rows: int  # rows compared
    bytes: int  # statement and parameter bytes recorded
    reason: str | None = None  # why refused or failed


@dataclass(frozen=True)
class HostSkipped:
    """A host of a multi-host URL stopped answering: connects leave it out for a while.

    ``cause``: a connect timed out there (``connect_timed_out``), or TCP gave up on an open
    connection to it (``connection_timed_out``). For ``seconds`` the engine's connects try the
    other hosts only, so a vanished primary costs no connect its ``connect_timeout`` while a
    standby is promoted; then `HostRetried`. Never every host at once: when all of them time
    out, connects try them in order. Logged at INFO.
    """

    url: str  # the engine's URL, password masked
    host: str
    port: int
    cause: Literal["connect_timed_out", "connection_timed_out"]
    seconds: float  # how long connects leave it out


@dataclass(frozen=True)
class HostRetried:
    """A host that `HostSkipped` left out is tried again by connects (its time out is over)."""

    url: str  # the engine's URL, password masked
    host: str
    port: int
    skipped_for: float  # seconds it was left out


Event = (
    DeadConnectionReplaced
    | ConnectWaited
    | ConnectionInvalidated
    | RollbackConnectionLost
    | FirstStatementReplayed
    | PingSucceeded
    | RetryScheduled
    | RetriesGaveUp
    | CommitResolved
    | AcknowledgedCommitLost
    | HookFailedAfterCommit
    | TransactionReplayed
    | HostSkipped
    | HostRetried
)


class Hook(Protocol):
    """Anything that takes an event."""

    def __call__(self, event: Event, /) -> None:
        """Observe one event; must not block for long."""


class LoggingHook:
    """Write one structured line per event to the ``dropsafe`` logger (logfmt-style).

    Levels: pings and ROLLBACKs that met a lost connection at DEBUG; replaced connections,
    replayed first statements, retries and resolved commits at INFO; a unit of work that gave
    up, a commit that could not be resolved and an acknowledged commit a failover lost at
    WARNING; a Session hook that raised after a unit's COMMIT at ERROR.

    Example output::

        dropsafe.retry_scheduled attempt=1 delay=0.031 kind=disconnect error="OperationalError: ..."
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("dropsafe")

    def __call__(self, event: Event, /) -> None:
        """Log ``event``."""
        level = _level_of(event)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, format_event(event))

    def __repr__(self) -> str:
        return f"LoggingHook({self.logger.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoggingHook) and other.logger is self.logger

    def __hash__(self) -> int:
        return hash((LoggingHook, self.logger.name))


def format_event(event: Event) -> str:
    """Render ``event`` as ``dropsafe.<name> key=value ...``; strings are quoted."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
    fields = []
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, float):
            text = f"{value:.4f}".rstrip("0").rstrip(".")
        elif isinstance(value, str) and field.name in ("error", "reason"):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        else:
            text = str(getattr(value, "value", value))
        fields.append(f"{field.name}={text}")
    return " ".join([f"dropsafe.{name}", *fields])


def _level_of(event: Event) -> int:
    if isinstance(event, HookFailedAfterCommit):
        return logging.ERROR
    if isinstance(event, (PingSucceeded, RollbackConnectionLost)):
        return logging.DEBUG
    if (
        isinstance(event, (RetriesGaveUp, AcknowledgedCommitLost))
        or (isinstance(event, CommitResolved) and event.outcome == "unknown")
        or (isinstance(event, ConnectWaited) and event.outcome == "gave_up")
    ):
        return logging.WARNING
    return logging.INFO


class PrometheusHook:
    """Count and time every event in Prometheus counters and histograms.

    Needs ``pip install 'dropsafe[prometheus]'`` (imported when the hook is made). Labels are
    kinds, reasons and outcomes only: never a URL, a host or an error text, so that no secret
    and no unbounded label set reaches the metrics.

    Example::

        metrics = PrometheusHook()  # one per registry; share it between engines
        policy = dropsafe.Policy(hooks=(LoggingHook(), metrics))
    """

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
        self.lost_rollbacks = counter(
            "lost_rollbacks",
            "ROLLBACKs that met a lost connection: invalidated, not raised.",
            ["during"],
            **common,
        )
        self.replayed_statements = counter(
            "replayed_statements",
            "First statements of a transaction sent again after their connection was lost.",
            **common,
        )
        self.connect_waits = histogram(
            "connect_wait_seconds",
            "Checkouts that waited for an unreachable server, by outcome.",
            ["outcome"],
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
        self.lost_commits = counter(
            "acknowledged_commits_lost",
            "Acknowledged COMMITs a failover lost (lost) or may have lost (unknown).",
            ["outcome"],
            **common,
        )
        self.resolution_seconds = histogram(
            "commit_resolution_seconds", "Time spent resolving an ambiguous COMMIT.", **common
        )
        self.hooks_failed_after_commit = counter(
            "hooks_failed_after_commit",
            "Session hooks that raised after a unit of work had committed (result returned).",
            **common,
        )
        self.hosts_skipped = counter(
            "hosts_skipped",
            "Hosts of a multi-host URL left out of connects after a timeout, by cause.",
            ["cause"],
            **common,
        )
        self.hosts_retried = counter(
            "hosts_retried", "Hosts left out of connects that connects try again.", **common
        )

    def __call__(self, event: Event, /) -> None:
        """Record ``event``."""
        if not self._record_engine_event(event):
            self._record_unit_event(event)

    def _record_engine_event(self, event: Event) -> bool:
        """Record an event of a hardened engine; False if ``event`` is none of those."""
        if isinstance(event, DeadConnectionReplaced):
            self.dead_connections.labels(pool_wide=str(event.pool_wide).lower()).inc()
        elif isinstance(event, ConnectWaited):
            self.connect_waits.labels(outcome=event.outcome).observe(event.waited)
        elif isinstance(event, ConnectionInvalidated):
            pool_wide = str(event.pool_wide).lower()
            self.invalidations.labels(kind=event.kind.value, pool_wide=pool_wide).inc()
        elif isinstance(event, RollbackConnectionLost):
            self.lost_rollbacks.labels(during=event.during).inc()
        elif isinstance(event, FirstStatementReplayed):
            self.replayed_statements.inc()
        elif isinstance(event, PingSucceeded):
            self.pings.labels(why=event.why).observe(event.latency)
        elif isinstance(event, HostSkipped):
            self.hosts_skipped.labels(cause=event.cause).inc()
        elif isinstance(event, HostRetried):
            self.hosts_retried.inc()
        else:
            return False
        return True

    def _record_unit_event(self, event: Event) -> None:
        """Record an event of a unit of work."""
        if isinstance(event, RetryScheduled):
            self.retries.labels(kind=event.kind.value).inc()
        elif isinstance(event, RetriesGaveUp):
            self.gave_up.labels(reason=event.reason).inc()
        elif isinstance(event, CommitResolved):
            self.commits_resolved.labels(outcome=event.outcome).inc()
            self.resolution_seconds.observe(event.elapsed)
        elif isinstance(event, AcknowledgedCommitLost):
            self.lost_commits.labels(outcome=event.outcome).inc()
        elif isinstance(event, HookFailedAfterCommit):
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
        name = "dropsafe." + re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
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
                field.name == "reason" and isinstance(event, RetriesGaveUp)
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
