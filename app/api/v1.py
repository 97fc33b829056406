"""The versioned API: ``/v1/...``. Routes parse HTTP, call the service, render v1 JSON."""

from __future__ import annotations

import re
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from app.api.common import analyze_request, authenticate, context, json_response, runtime
from app.context import CacheStatus, RequestContext
from app.entry import Entry
from app.errors import Problem
from app.quota import Usage
from app.schema.normalize import build_analysis
from app.schema.v1 import AnalysisV1
from app.tenants import Tenant
from app.upstream.contract import Kind
from app.usage_report import usage_dict

router = APIRouter(prefix="/v1", tags=["v1"])
TenantDep = Annotated[Tenant, Depends(authenticate)]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

PROBLEM_RESPONSE: dict[str, Any] = {
    "description": "An RFC 9457 problem with a stable `code` (see the README's error table).",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: PROBLEM_RESPONSE for status in statuses}


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image (JPEG, PNG or BMP, at most 20 MiB, each side 33..4095 px): as the "
        "multipart field `image` (like ailabapi), or as the raw body with `Content-Type: image/*`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/bmp": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "Cache-Control",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`no-cache`: skip the cache lookup (a billable call); `no-store`: do not store the answer.",
        }
    ],
}


def render(ctx: RequestContext, entry: Entry, *, landmarks: bool) -> dict[str, Any]:
    """The v1 body for an entry; an upstream refusal of the image becomes a problem."""
    verdict = entry.verdict
    if verdict is not None and verdict.kind is not Kind.NO_FACE:
        raise Problem(
            "upstream_rejected_image",
            f"ailabapi refused the image: {verdict.code} ({verdict.message})",
            upstream_body=entry.raw,
            upstream_status=entry.status,
        )
    cache = ctx.cache or CacheStatus(hit=False)
    return build_analysis(
        entry.raw,
        request_id=ctx.request_id,
        image=entry.image,
        provider=entry.provider,
        upstream_request_id=entry.upstream_request_id,
        cached=cache.hit,
        analyzed_at=entry.analyzed_at,
        landmarks=landmarks,
        normalized=entry.faces(landmarks=landmarks),
    )


@router.post(
    "/faces/analyze",
    summary="Analyze the faces in an image",
    response_model=AnalysisV1,
    responses=_problems(400, 401, 408, 413, 415, 422, 429, 502, 503, 504),
    openapi_extra=UPLOAD_BODY,
)
async def analyze(
    request: Request,
    tenant: TenantDep,
    landmarks: Annotated[
        bool, Query(description="Include the 105 landmarks and pupils (list-style answers only).")
    ] = False,
) -> Response:
    """Answers from the cache when this image was analyzed before (free), otherwise calls ailabapi
    (one billable call counted against the tenant's quota). Identical concurrent uploads share one call."""
    entry = await analyze_request(request, tenant)
    return json_response(render(context(request), entry, landmarks=landmarks))


@router.get(
    "/faces/analyses/{sha256}",
    summary="A cached analysis, by the image's SHA-256",
    response_model=AnalysisV1,
    responses=_problems(400, 401, 404, 422, 429),
)
async def cached_analysis(
    request: Request,
    tenant: TenantDep,
    sha256: Annotated[str, Path(description="SHA-256 of the image bytes, 64 lowercase hex characters.")],
    landmarks: Annotated[bool, Query(description="Include landmarks and pupils.")] = False,
) -> Response:
    """Never billable: answers only what is in the cache for the caller's scope."""
    if not _SHA256.match(sha256):
        raise Problem("invalid_request", "sha256 must be 64 lowercase hex characters")
    ctx = context(request)
    found = await runtime(request).service.lookup(ctx, tenant, sha256)
    if found is None:
        raise Problem("not_found", "no cached analysis of that image for this tenant")
    entry, ttl = found
    ctx.cache = CacheStatus(hit=True, ttl=ttl)
    return json_response(render(ctx, entry, landmarks=landmarks))


@router.get("/usage", summary="The caller's limits and usage", responses=_problems(401, 429, 503))
async def usage(request: Request, tenant: TenantDep) -> Response:
    """Policies, used and remaining per window, reset times, cache hits/misses and credits spent."""
    report = await runtime(request).service.usage(context(request), tenant)
    return json_response(usage_body(report))


def usage_body(u: Usage) -> dict[str, Any]:
    return usage_dict(u)


@router.get(
    "/schema",
    summary="JSON Schema of the v1 analysis",
    response_class=Response,
    responses={
        200: {"description": "A JSON Schema.", "content": {"application/schema+json": {"schema": {"type": "object"}}}}
    },
)
async def schema() -> Response:
    """The committed schema file, byte for byte (the same as ``app/schema/v1.schema.json``)."""
    data = resources.files("app.schema").joinpath("v1.schema.json").read_bytes()
    return Response(data, media_type="application/schema+json")
