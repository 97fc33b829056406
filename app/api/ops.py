"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from app.api.deps import RuntimeDep
from app.api.lean import LeanRoute
from app.api.openapi import Tag
from app.api.responses import json_response

router = APIRouter(tags=[Tag.OPERATIONS], route_class=LeanRoute)


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"] = Field(description="Always `ok`.")


class Readiness(BaseModel):
    """Whether this replica can serve, and each check's result."""

    status: Literal["ok", "unavailable"] = Field(description="`ok` when every check is `ok`.")
    checks: dict[str, str] = Field(
        description="Check → `ok` or why not: `tenants`, `upstream_config`, and `redis` when Redis is configured.",
        examples=[{"tenants": "ok", "upstream_config": "ok", "redis": "ok"}],
    )


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_LATEST


@router.get("/healthz", summary="Liveness: the process answers", response_model=Health)
async def get_health() -> Response:
    """For a liveness probe: answers as long as the event loop runs; checks nothing else."""
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: Redis, tenants and upstream configuration",
    response_model=Readiness,
    responses={503: {"description": "Not ready: the same report, with what failed.", "model": Readiness}},
)
async def get_readiness(rt: RuntimeDep) -> Response:
    """Ready when this replica can serve. Deliberately NOT a probe of ailabapi: if the upstream
    is down, every replica would turn unready at once and take cache hits down with them;
    the circuit breaker answers 503 quickly instead, and the breaker state is in /metrics."""
    checks = await rt.readiness()
    ok = all(value == "ok" for value in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PrometheusResponse,
    responses={200: {"description": "Prometheus text exposition format 0.0.4 (`facegate_*` series)."}},
)
async def get_metrics(rt: RuntimeDep) -> Response:
    """Requests, cache, quota, upstream and breaker series for Prometheus to scrape (docs/operating.md)."""
    await rt.refresh_pool_metrics()
    return PrometheusResponse(rt.metrics.exposition())
