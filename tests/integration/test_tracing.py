"""Tracing end to end: a gateway process with FACEGATE_OTLP_ENDPOINT sends its spans over
OTLP/HTTP (protobuf) to a collector on loopback (this test), one trace per request: the
request, the cache lookup, the admission and, on a miss, the upstream call with its queue
wait and attempt — carrying tenant, cache status and attempts, and never a key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import Gateway, Sim, unique_image


class Collector:
    """An OTLP/HTTP trace receiver: keeps every span it is sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.lock:
                    for resource in request.resource_spans:
                        service = {a.key: a.value.string_value for a in resource.resource.attributes}
                        for scope in resource.scope_spans:
                            for span in scope.spans:
                                collector.spans.append(_flat(span, service))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace_of(self, route_name: str, **attrs: Any) -> list[dict[str, Any]]:
        """Every span of the first trace whose root has this name and these attributes (waits for them)."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with self.lock:
                for root in self.spans:
                    if root["name"] == route_name and all(root["attrs"].get(k) == v for k, v in attrs.items()):
                        return [s for s in self.spans if s["trace"] == root["trace"]]
            time.sleep(0.05)
        raise AssertionError(f"no trace {route_name} {attrs}; got {[s['name'] for s in self.spans]}")


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _flat(span: Any, service: dict[str, str]) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace": span.trace_id.hex(),
        "id": span.span_id.hex(),
        "parent": span.parent_span_id.hex() or None,
        "attrs": {a.key: _value(a.value) for a in span.attributes},
        "error": span.status.code == 2,
        "service": service.get("service.name"),
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    try:
        yield c
    finally:
        c.server.shutdown()
        c.server.server_close()


def test_a_miss_and_a_hit_are_traced_to_the_collector(gateway_factory: Any, sim: Sim, collector: Collector) -> None:
    gw: Gateway = gateway_factory(env={"FACEGATE_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    image = unique_image(sim="faces=1")
    assert gw.analyze(image).status_code == 200
    assert gw.analyze(image).status_code == 200

    miss = collector.trace_of("HTTP POST /v1/faces/analyze", **{"facegate.cache": "miss"})
    by_name = {s["name"]: s for s in miss}
    root = by_name["HTTP POST /v1/faces/analyze"]
    assert root["parent"] is None
    assert root["service"] == "facegate"
    assert root["attrs"]["facegate.tenant"] == "alpha"
    assert root["attrs"]["http.response.status_code"] == 200
    assert root["attrs"]["facegate.upstream.attempts"] == 1
    assert set(by_name) >= {
        "facegate.cache.lookup",
        "facegate.admit",
        "facegate.upstream",
        "facegate.upstream.queue",
        "facegate.upstream.attempt",
    }
    assert by_name["facegate.cache.lookup"]["parent"] == root["id"]
    assert by_name["facegate.cache.lookup"]["attrs"]["facegate.cache.hit"] is False
    assert by_name["facegate.admit"]["attrs"]["facegate.reserve"] is True
    upstream = by_name["facegate.upstream"]
    assert upstream["attrs"]["facegate.upstream.attempts"] == 1
    assert by_name["facegate.upstream.attempt"]["parent"] == upstream["id"]
    assert by_name["facegate.upstream.queue"]["parent"] == upstream["id"]

    hit = collector.trace_of("HTTP POST /v1/faces/analyze", **{"facegate.cache": "hit"})
    assert {s["name"] for s in hit} == {"HTTP POST /v1/faces/analyze", "facegate.cache.lookup", "facegate.admit"}
    assert sim.calls == 1

    everything = repr(collector.spans)
    assert gw.key() not in everything
    assert "sim-test-key" not in everything
