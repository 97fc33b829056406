"""Optional tracing with OpenTelemetry: off unless ``FACEGATE_OTLP_ENDPOINT`` is set.

When on, each request is a span (``HTTP <method> <route>``, from the edge) with children for
the steps that take time: the cache lookup, the admission (rate limit and quota), and the
paid call (``facegate.upstream``) with, per attempt, the wait for an upstream key slot
(``facegate.upstream.queue``) and the attempt itself. Attributes name the tenant, the cache
status, the outcome and the attempts — never a key, an image or a body. Spans go to the OTLP
endpoint over HTTP/protobuf in batches; a slow or absent collector never delays an answer
(the batch processor drops what it cannot send).

When off, :func:`span` hands back one shared no-op context manager: facegate imports nothing of
OpenTelemetry's SDK itself, and a step costs about 0.4 µs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("facegate")

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()


class _State:
    """The process's tracer (one per process, like the logging configuration)."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None


_state = _State()


def enabled() -> bool:
    return _state.tracer is not None


def configure(endpoint: str | None, *, service: str = "facegate", exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on: to ``endpoint`` (OTLP over HTTP, ``<endpoint>/v1/traces``), or to
    ``exporter`` (tests: an in-memory one, exported synchronously). Returns whether it is on."""
    if not endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from app import __version__

    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.version": __version__}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = f"{str(endpoint).rstrip('/')}/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=5)))
        log.info("tracing: spans go to %s (OTLP/HTTP)", url)
    _state.provider = provider
    _state.tracer = provider.get_tracer("facegate", __version__)
    return True


def shutdown() -> None:
    """Flush what is buffered and turn tracing off."""
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.tracer = _state.provider = None


def span(name: str, **attributes: Any) -> AbstractContextManager[Span | None]:
    """A child span of the current one (``None`` values are left out), or a no-op when off."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP
    return _child(tracer, name, {k: v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def _child(tracer: Tracer, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    # A failure marks the span with the exception's type only: messages stay out of traces.
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            from opentelemetry.trace import Status, StatusCode

            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def set_attributes(target: Span | None, **attributes: Any) -> None:
    """Attributes learned after the span started (no-op when off or when ``target`` is None)."""
    if target is None:
        return
    target.set_attributes({k: v for k, v in attributes.items() if v is not None})


def finish_request(
    root: Span,
    *,
    method: str,
    route: str,
    status: int,
    request_id: str,
    tenant: str | None,
    cache: str | None,
    outcome: str | None,
    attempts: int,
) -> None:
    """What the edge knows once the answer left: the route, status, tenant, cache, outcome."""
    from opentelemetry.trace import Status, StatusCode

    root.update_name(f"HTTP {method} {route}")
    set_attributes(
        root,
        **{
            "http.route": route,
            "http.response.status_code": status,
            "facegate.request_id": request_id,
            "facegate.tenant": tenant,
            "facegate.cache": cache,
            "facegate.outcome": outcome,
            "facegate.upstream.attempts": attempts or None,
        },
    )
    if status >= 500:
        root.set_status(Status(StatusCode.ERROR, outcome or str(status)))


@contextlib.contextmanager
def request_span(method: str, path: str) -> Iterator[Span | None]:
    """The root span of one HTTP request; the edge names it after the route once routed."""
    tracer = _state.tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(
        f"HTTP {method}",
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield current
