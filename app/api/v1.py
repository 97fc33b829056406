"""The versioned API: ``/v1/...``. Routes parse HTTP, call the service, render v1 JSON."""

from __future__ import annotations

import re
from datetime import date
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.api.deps import CallerDep, ContextDep, OptionsDep, RuntimeDep, TenantDep, operator_required
from app.api.lean import LeanRoute
from app.api.openapi import ANALYZE_EXTRA, Sha256Path, Tag, header, problems
from app.api.responses import json_response
from app.api.uploads import ANALYZE_REFUSALS, analyze_request
from app.audit import audit
from app.cache import CacheError
from app.context import CacheStatus, RequestContext
from app.entry import Entry
from app.errors import Problem
from app.limits import QuotaUnavailable
from app.policy import null_fields
from app.schema.normalize import build_analysis
from app.schema.v1 import AnalysisV1
from app.upstream.contract import Kind
from app.usage_report import MAX_HISTORY_DAYS, UsageHistory, UsageReport, history_report, today_utc, usage_dict

router = APIRouter(prefix="/v1", route_class=LeanRoute)


#: An analysis carries the cache's verdict; it can be read again by its image's hash.
_ANALYSIS = {
    "headers": header("CacheStatus"),
    "links": {
        "getAnalysis": {
            "operationId": "getAnalysis",
            "parameters": {"sha256": "$response.body#/image/sha256"},
            "description": "Read this analysis again later, free (while it is cached).",
        }
    },
}


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
    tags=[Tag.FACES],
    summary="Analyze the faces in an image",
    response_model=AnalysisV1,
    responses={200: _ANALYSIS, **problems(*ANALYZE_REFUSALS, "upstream_rejected_image")},
    openapi_extra=ANALYZE_EXTRA,
)
async def analyze_faces(
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
    (one billable call counted against the tenant's quota). Identical concurrent uploads share one call.

    No face found is a 200 with `faces: []`. Refusals cost nothing: bad input is refused before any
    upstream call, and a call that fails is refunded."""
    entry = await analyze_request(request, rt, ctx, tenant, opts)
    return json_response(render(ctx, entry, landmarks=landmarks, omit=tenant.policy.omit))


@router.get(
    "/faces/analyses/{sha256}",
    tags=[Tag.FACES],
    summary="Read a cached analysis by the image's SHA-256",
    response_model=AnalysisV1,
    responses={200: _ANALYSIS, **problems("rate_limited", "not_found", "upstream_rejected_image")},
)
async def get_analysis(
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    tenant: TenantDep,
    sha256: Sha256Path,
    landmarks: Annotated[bool, Query(description="Include landmarks and pupils.")] = False,
) -> Response:
    """Never billable: answers only what is in the cache for the caller's scope (404 `not_found`
    otherwise; analyzed images stay `FACEGATE_CACHE_TTL_S`). An image ailabapi refused is answered
    with the same 422 `upstream_rejected_image` as when it was sent."""
    entry = await rt.service.lookup(ctx, tenant, sha256)
    if entry is None:
        raise Problem("not_found", "no cached analysis of that image for this tenant")
    return json_response(render(ctx, entry, landmarks=landmarks, omit=tenant.policy.omit))


@router.delete(
    "/faces/analyses/{sha256}",
    tags=[Tag.FACES],
    summary="Delete a cached analysis by the image's SHA-256",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Deleted everywhere it was held."},
        **problems("operator_required", "not_found", "rate_limited", "cache_unavailable"),
    },
)
async def delete_analysis(*, rt: RuntimeDep, ctx: ContextDep, caller: CallerDep, sha256: Sha256Path) -> Response:
    """Removes the caller's cached analysis of that image (or verdict on it) from Redis, from every
    replica's local tier and from calls still in flight. With a tenant key: that tenant's own entry;
    in `shared` cache scope only an operator may delete (403 `operator_required`), since other tenants
    rely on the entry. With an operator key: the image in every tenant's scope and the shared one.
    404 when nothing was held."""
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


@router.get(
    "/usage",
    tags=[Tag.USAGE],
    summary="Read the caller's limits and usage",
    response_model=UsageReport,
    responses=problems("rate_limited", "quota_unavailable"),
)
async def get_usage(rt: RuntimeDep, ctx: ContextDep, tenant: TenantDep) -> Response:
    """Policies, used and remaining per window, reset times, cache hits/misses and credits spent.
    Reading it counts against the rate limit, never against a quota."""
    report = await rt.service.usage(ctx, tenant)
    return json_response(usage_dict(report))


def _iso_date(value: object) -> object:
    """Only ``YYYY-MM-DD`` (pydantic would also read ``0`` as a Unix timestamp)."""
    if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("a date as YYYY-MM-DD")
    return value


IsoDate = Annotated[date, BeforeValidator(_iso_date)]


@router.get(
    "/usage/history",
    tags=[Tag.USAGE],
    summary="Read usage per UTC day, for chargeback",
    response_model=UsageHistory,
    responses=problems("operator_required", "rate_limited", "quota_unavailable"),
)
async def get_usage_history(
    *,
    rt: RuntimeDep,
    ctx: ContextDep,
    caller: CallerDep,
    first: Annotated[
        IsoDate | None, Query(alias="from", description="First UTC day, YYYY-MM-DD (default: to).")
    ] = None,
    last: Annotated[IsoDate | None, Query(alias="to", description="Last UTC day, YYYY-MM-DD (default: today).")] = None,
    tenant: Annotated[
        str | None,
        Query(
            description="Operators: one tenant (also one no longer in the tenants file); default all. A tenant key "
            "may name only its own tenant (else 403 `operator_required`).",
            pattern=r"^[A-Za-z0-9_-]{1,64}$",
        ),
    ] = None,
) -> Response:
    """A tenant reads its own history; an operator every tenant's (audited). `from` must not be after
    `to`, and at most 400 days apart (400 `invalid_request`); the history is kept at least 400 days
    (with Redis; for the life of the process without)."""
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


class JsonSchemaDocument(BaseModel):
    """A JSON Schema (draft 2020-12) document: the published schema of the v1 analysis."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: str = Field(alias="$schema", description="The JSON Schema dialect.")
    title: Literal["AnalysisV1"] = Field(description="The described model.")
    type: Literal["object"] = Field(description="Always `object`.")
    description: str = Field(description="What the model is.")
    properties: dict[str, Any] = Field(description="The analysis' fields.")
    required: list[str] = Field(description="Fields always present.")
    defs: dict[str, Any] = Field(alias="$defs", description="The nested models.")


class SchemaJSONResponse(JSONResponse):
    """JSON Schema's own media type; the body is the committed file's bytes, sent as they are."""

    media_type = "application/schema+json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else super().render(content)


@router.get(
    "/schema",
    tags=[Tag.SCHEMA],
    summary="Get the JSON Schema of the v1 analysis",
    response_model=JsonSchemaDocument,
    response_class=SchemaJSONResponse,
)
async def get_schema() -> Response:
    """The committed schema file, byte for byte (`app/schema/v1.schema.json`). No key needed.
    Additive changes keep `schema_version` "1"; a breaking change would be published as `/v2`."""
    data = resources.files("app.schema").joinpath("v1.schema.json").read_bytes()
    return SchemaJSONResponse(data)
