"""app.tracing with OpenTelemetry's in-memory exporter: nesting, attributes, off by default."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import tracing


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(None, exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_off_unless_configured() -> None:
    assert not tracing.configure(None)
    assert not tracing.enabled()
    with tracing.span("x", a=1) as nothing:
        assert nothing is None
    with tracing.request_span("GET", "/") as root:
        assert root is None
    tracing.set_attributes(None, a=1)  # harmless when off


def test_steps_nest_under_the_request_and_drop_unknown_attributes(exported: InMemorySpanExporter) -> None:
    with tracing.request_span("POST", "/v1/faces/analyze") as root:
        assert root is not None
        with tracing.span("facegate.cache.lookup") as lookup:
            tracing.set_attributes(lookup, **{"facegate.cache.hit": False, "facegate.none": None})
        with tracing.span("facegate.upstream", **{"facegate.upstream.key": None, "facegate.tenant": "alpha"}):
            pass
        tracing.finish_request(
            root,
            method="POST",
            route="/v1/faces/analyze",
            status=502,
            request_id="rid",
            tenant="alpha",
            cache="miss",
            outcome="upstream_error",
            attempts=2,
        )
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"HTTP POST /v1/faces/analyze", "facegate.cache.lookup", "facegate.upstream"}
    request = spans["HTTP POST /v1/faces/analyze"]
    assert request.context is not None
    for child in ("facegate.cache.lookup", "facegate.upstream"):
        parent, context = spans[child].parent, spans[child].context
        assert parent is not None and context is not None
        assert parent.span_id == request.context.span_id
        assert context.trace_id == request.context.trace_id
    assert dict(spans["facegate.cache.lookup"].attributes or {}) == {"facegate.cache.hit": False}
    assert dict(spans["facegate.upstream"].attributes or {}) == {"facegate.tenant": "alpha"}
    attrs = dict(request.attributes or {})
    assert attrs["http.route"] == "/v1/faces/analyze"
    assert attrs["http.response.status_code"] == 502
    assert attrs["facegate.outcome"] == "upstream_error"
    assert attrs["facegate.upstream.attempts"] == 2
    assert not request.status.is_ok
    assert request.resource.attributes["service.name"] == "facegate"


def test_a_failing_step_is_marked_without_its_message(exported: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), tracing.span("facegate.upstream.attempt"):
        raise RuntimeError("secret-looking text fg_abc")
    [failed] = exported.get_finished_spans()
    assert not failed.status.is_ok
    assert failed.status.description == "RuntimeError"
    assert failed.events == ()  # no exception event: messages stay out of traces
