"""OpenTelemetryHook on a real engine: a connection the network reset, on the request's span."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.events import LoggingHook, OpenTelemetryHook
from dropsafe.testing import ChaosProxy

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


@pytest.mark.fault
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_reset_connection_is_a_span_event_of_the_request(shared_server, driver):
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = tracer_provider.get_tracer("app")
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    hooks = (LoggingHook(), OpenTelemetryHook(meter_provider=meter_provider))
    with ChaosProxy(shared_server.host, shared_server.port) as proxy:
        engine = dropsafe.create_engine(
            proxy.route(shared_server.url(driver)), policy=dropsafe.Policy(hooks=hooks)
        )
        sessions = sessionmaker(engine)
        try:
            assert dropsafe.run_transaction(sessions, lambda s: s.scalar(sa.text("SELECT 1"))) == 1
            assert proxy.cut("rst") == 1  # the pooled connection, reset as by a load balancer
            with tracer.start_as_current_span("GET /posts"):
                value = dropsafe.run_transaction(sessions, lambda s: s.scalar(sa.text("SELECT 2")))
        finally:
            engine.dispose()
    assert value == 2
    (span,) = spans.get_finished_spans()
    assert [event.name for event in span.events] == ["dropsafe.dead_connection_replaced"]
    counted = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
    assert any(metric.name == "dropsafe.events" for metric in counted)
    meter_provider.shutdown()
    tracer_provider.shutdown()
