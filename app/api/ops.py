"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import RuntimeDep
from app.api.responses import json_response

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness: Redis, tenants and upstream configuration")
async def readyz(rt: RuntimeDep) -> Response:
    """Ready when this replica can serve. Deliberately NOT a probe of ailabapi: if the upstream
    is down, every replica would turn unready at once and take cache hits down with them;
    the circuit breaker answers 503 quickly instead, and the breaker state is in /metrics."""
    checks = await rt.readiness()
    ok = all(value == "ok" for value in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(rt: RuntimeDep) -> Response:
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
