"""The versioned API: ``/v1/...``. Routes parse HTTP, call the service, render v1 JSON."""

from __future__ import annotations

import re
from datetime import date
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.api.deps import CallerDep, ContextDep, OptionsDep, RuntimeDep, TenantDep, operator_required
from app.api.openapi import UPLOAD_BODY, problems
from app.api.responses import json_response
from app.api.uploads import analyze_request
from app.audit import audit
from app.cache import CacheError
from app.context import CacheStatus, RequestContext
from app.entry import Entry
from app.errors import Problem
from app.limits import QuotaUnavailable, Usage
from app.policy import null_fields
from app.schema.normalize import build_analysis
from app.schema.v1 import AnalysisV1
from app.upstream.contract import Kind
from app.usage_report import MAX_HISTORY_DAYS, history_report, today_utc, usage_dict

router = APIRouter(prefix="/v1", tags=["v1"])
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def render(ctx: RequestContext, entry: Entry, *, landmarks: bool, omit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The v1 body for an entry, without the tenant's ``omit`` fields; an upstream refusal of the
    image becomes a problem."""
    verdict = entry.verdict
    if verdict is not None and verdict.kind is not Kind.NO_FACE:
        raise Problem(
            "upstream_rejected_image",
            f"ailabapi refused the image: {verdict.code} ({verdict.message})",
            upstream_body=entry.raw,
            upstream_status=entry.status,
        )
    cache = ctx.cache or CacheStatus(hit=False)
    return null_fields(
        build_analysis(
            entry.raw,
            request_id=ctx.request_id,
            image=entry.image,
            provider=entry.provider,
            upstream_request_id=entry.upstream_request_id,
            cached=cache.hit,
            analyzed_at=entry.analyzed_at,
            landmarks=landmarks,
            normalized=entry.faces(landmarks=landmarks),
        ),
        omit,
    )


@router.post(
    "/faces/analyze",
    summary="Analyze the faces in an image",
    response_model=AnalysisV1,
    responses=problems(400, 401, 403, 408, 413, 415, 422, 429, 502, 503, 504),
    openapi_extra=UPLOAD_BODY,
)
async def analyze(
    request: Request,
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    tenant: TenantDep,
    opts: OptionsDep,
    landmarks: Annotated[
        bool, Query(description="Include the 105 landmarks and pupils (list-style answers only).")
    ] = False,
) -> Response:
    """Answers from the cache when this image was analyzed before (free), otherwise calls ailabapi
    (one billable call counted against the tenant's quota). Identical concurrent uploads share one call."""
    entry = await analyze_request(request, rt, ctx, tenant, opts)
    return json_response(render(ctx, entry, landmarks=landmarks, omit=tenant.policy.omit))


@router.get(
    "/faces/analyses/{sha256}",
    summary="A cached analysis, by the image's SHA-256",
    response_model=AnalysisV1,
    responses=problems(400, 401, 404, 422, 429),
)
async def cached_analysis(
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    tenant: TenantDep,
    sha256: Annotated[str, Path(description="SHA-256 of the image bytes, 64 lowercase hex characters.")],
    landmarks: Annotated[bool, Query(description="Include landmarks and pupils.")] = False,
) -> Response:
    """Never billable: answers only what is in the cache for the caller's scope."""
    if not _SHA256.match(sha256):
        raise Problem("invalid_request", "sha256 must be 64 lowercase hex characters")
    entry = await rt.service.lookup(ctx, tenant, sha256)
    if entry is None:
        raise Problem("not_found", "no cached analysis of that image for this tenant")
    return json_response(render(ctx, entry, landmarks=landmarks, omit=tenant.policy.omit))


@router.delete(
    "/faces/analyses/{sha256}",
    summary="Delete a cached analysis, by the image's SHA-256",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Deleted everywhere it was held."}, **problems(400, 401, 403, 404, 429, 503)},
)
async def delete_analysis(
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    caller: CallerDep,
    sha256: Annotated[str, Path(description="SHA-256 of the image bytes, 64 lowercase hex characters.")],
) -> Response:
    """Removes the caller's cached analysis of that image (or verdict on it) from Redis, from every
    replica's local tier and from calls still in flight. With a tenant key: that tenant's own entry;
    in `shared` cache scope only an operator may delete (403 `operator_required`), since other tenants
    rely on the entry. With an operator key: the image in every tenant's scope and the shared one.
    404 when nothing was held."""
    if not _SHA256.match(sha256):
        raise Problem("invalid_request", "sha256 must be 64 lowercase hex characters")
    try:
        if caller.operator is not None:
            done = await rt.purger.purge_hash(
                sha256, rt.tenants.registry.tenants, actor=caller.actor, request_id=ctx.request_id
            )
        else:
            assert caller.tenant is not None
            await rt.service.count_request(ctx, caller.tenant)
            if rt.settings.cache_scope == "shared":
                raise operator_required("deleting in the shared cache scope (other tenants rely on the entry)")
            done = await rt.purger.delete_analysis(
                rt.settings.cache_scope, caller.tenant.name, sha256, actor=caller.actor, request_id=ctx.request_id
            )
    except CacheError:
        raise Problem(
            "cache_unavailable",
            "the cache could not be reached; the deletion may be incomplete, retry it",
            retry_after=5,
        ) from None
    if not done.deleted:
        raise Problem("not_found", "no cached analysis of that image for this caller")
    return Response(status_code=204)


@router.get("/usage", summary="The caller's limits and usage", responses=problems(401, 429, 503))
async def usage(rt: RuntimeDep, ctx: ContextDep, tenant: TenantDep) -> Response:
    """Policies, used and remaining per window, reset times, cache hits/misses and credits spent."""
    report = await rt.service.usage(ctx, tenant)
    return json_response(usage_body(report))


class HistoryDay(BaseModel):
    date: str = Field(description="The UTC day, YYYY-MM-DD (a call counts on the day it was admitted).")
    billable_calls: int = Field(
        description="Calls ailabapi billed for this tenant (what /v1/usage calls credits_spent)."
    )
    credits: int = Field(description="Credits those cost (one per billed call).")
    upstream_calls: int = Field(description="Attempts made at ailabapi for this tenant, retries included.")
    hits: int = Field(description="Answers from the cache.")
    misses: int = Field(description="Admitted requests not answered from the cache (collapsed and forced included).")
    collapsed: int = Field(description="Misses answered by an identical call already in flight (not billed).")
    forced: int = Field(description="Misses forced with X-Facegate-Force.")
    refused: dict[str, int] = Field(description="Answers with a problem, by problem code.")


class HistoryTotals(BaseModel):
    billable_calls: int
    credits: int
    upstream_calls: int
    hits: int
    misses: int
    collapsed: int
    forced: int
    refused: dict[str, int]


class TenantHistory(BaseModel):
    tenant: str
    days: list[HistoryDay] = Field(description="Days with any activity, oldest first.")
    totals: HistoryTotals


class UsageHistory(BaseModel):
    from_: str = Field(alias="from")
    to: str
    tenants: list[TenantHistory]


@router.get(
    "/usage/history",
    summary="Usage per UTC day, for chargeback",
    response_model=UsageHistory,
    responses=problems(400, 401, 403, 429, 503),
)
async def usage_history(
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    caller: CallerDep,
    first: Annotated[date | None, Query(alias="from", description="First UTC day, YYYY-MM-DD (default: to).")] = None,
    last: Annotated[date | None, Query(alias="to", description="Last UTC day, YYYY-MM-DD (default: today).")] = None,
    tenant: Annotated[
        str | None, Query(description="Operators: one tenant (also one no longer in the tenants file); default all.")
    ] = None,
) -> Response:
    """A tenant reads its own history; an operator every tenant's (audited). At most 400 days per
    read; kept at least 400 days (with Redis; for the life of the process without)."""
    last = last or today_utc()
    first = first or last
    if first > last or (last - first).days >= MAX_HISTORY_DAYS:
        raise Problem("invalid_request", f"from must not be after to, and at most {MAX_HISTORY_DAYS} days apart")
    if caller.operator is None:
        assert caller.tenant is not None
        await rt.service.count_request(ctx, caller.tenant)
        if tenant not in (None, caller.tenant.name):
            raise operator_required("reading another tenant's history")
        names = [caller.tenant.name]
    else:
        if tenant is not None and not _TENANT.match(tenant):
            raise Problem("invalid_request", "tenant is not a valid tenant name")
        names = [tenant] if tenant is not None else sorted(rt.tenants.registry.tenants)
    try:
        report = await history_report(rt.service.limiter, names, first, last)
    except QuotaUnavailable:
        raise Problem("quota_unavailable", "usage counters are unavailable right now", retry_after=5) from None
    if caller.operator is not None:
        audit(
            "admin.usage_history.read",
            actor=caller.actor,
            request_id=ctx.request_id,
            tenants=names,
            first=first.isoformat(),
            last=last.isoformat(),
        )
    return json_response(report)


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
