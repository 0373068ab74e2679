"""OpenTelemetryHook: span events and metrics, read with the SDK's in-memory readers."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from dropsafe import ErrorKind
from dropsafe.events import (
    AcknowledgedCommitLost,
    CommitResolved,
    OpenTelemetryHook,
    PingSucceeded,
    RetriesGaveUp,
    RetryScheduled,
)


@pytest.fixture
def otel():
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    hook = OpenTelemetryHook(meter_provider=meter_provider)
    yield hook, tracer_provider.get_tracer("app"), spans, reader
    meter_provider.shutdown()
    tracer_provider.shutdown()


def _points(reader, name):
    data = reader.get_metrics_data()
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_events_become_span_events_of_the_current_span(otel):
    hook, tracer, spans, _ = otel
    with tracer.start_as_current_span("POST /posts"):
        hook(RetryScheduled(attempt=1, delay=0.03, kind=ErrorKind.DISCONNECT, error="boom ***"))
        hook(CommitResolved(xid=42, outcome="committed", elapsed=0.01))
    (span,) = spans.get_finished_spans()
    names = [event.name for event in span.events]
    assert names == ["dropsafe.retry_scheduled", "dropsafe.commit_resolved"]
    retry = dict(span.events[0].attributes)
    assert retry == {"attempt": 1, "delay": 0.03, "kind": "disconnect", "error": "boom ***"}


def test_events_are_counted_with_low_cardinality_attributes_only(otel):
    hook, _, _, reader = otel
    hook(RetryScheduled(attempt=1, delay=0.03, kind=ErrorKind.DISCONNECT, error="boom"))
    hook(RetryScheduled(attempt=2, delay=0.05, kind=ErrorKind.DISCONNECT, error="boom again"))
    hook(RetriesGaveUp(attempts=5, elapsed=20.0, reason="deadline", error="boom"))
    hook(AcknowledgedCommitLost(xid=7, unit="f", committed_at=1.0, outcome="lost", reason="x"))
    counted = {
        tuple(sorted(point.attributes.items())): point.value
        for point in _points(reader, "dropsafe.events")
    }
    assert counted == {
        (("event", "dropsafe.retry_scheduled"), ("kind", "disconnect")): 2,
        (("event", "dropsafe.retries_gave_up"), ("reason", "deadline")): 1,
        (("event", "dropsafe.acknowledged_commit_lost"), ("outcome", "lost")): 1,
    }


def test_durations_are_recorded_in_seconds(otel):
    hook, _, _, reader = otel
    hook(PingSucceeded(latency=0.004, why="idle"))
    (point,) = [
        p
        for p in _points(reader, "dropsafe.event.duration")
        if p.attributes["event"] == "dropsafe.ping_succeeded"
    ]
    assert point.count == 1
    assert point.sum == pytest.approx(0.004)


def test_without_a_span_the_event_is_only_counted(otel):
    hook, _, spans, reader = otel
    hook(PingSucceeded(latency=0.004, why="idle"))
    assert spans.get_finished_spans() == ()
    assert _points(reader, "dropsafe.events")
