"""The operator's routes: ``/admin/...``, for operator keys only (``OperatorDep``).

A missing or unknown key gets 401 ``unauthorized``, a valid *tenant* key 403
``operator_required`` — both problem+json. Every route here that reads another tenant's
data or deletes anything writes an audit line (``app.audit``). The routes are thin: the
governance use cases (purges, history) live in the service layer.

Adding a route: declare ``operator: OperatorDep`` (that is the whole access check; its 400/401/403
and the security schemes are added to the OpenAPI document by ``app.api.openapi``), list the
problem codes the route itself raises in ``responses=problems(...)`` (docs/developing.md, "Adding
an endpoint"), and call ``audit(...)`` with the operator as the actor, e.g.
``audit("upstream_keys.read", actor=f"operator:{operator.name}", request_id=ctx.request_id)``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.api.deps import ContextDep, OperatorDep, RuntimeDep
from app.api.openapi import Sha256Path, Tag, problems
from app.api.responses import json_response
from app.audit import audit
from app.cache import CacheError
from app.errors import Problem
from app.limits import QuotaUnavailable
from app.purge import Purged
from app.tenants import Tenant
from app.usage_report import UsageReport, usage_dict

router = APIRouter(prefix="/admin", tags=[Tag.ADMIN])


class TenantLimitsModel(BaseModel):
    """A tenant's effective limits."""

    rate_per_s: float = Field(description="Sustained requests per second.")
    burst: int = Field(description="Requests allowed at once.")
    daily_quota: int | None = Field(description="Billable calls per UTC day; null = unlimited.")
    monthly_quota: int | None = Field(description="Billable calls per UTC month; null = unlimited.")


class TenantPolicyModel(BaseModel):
    """A tenant's data policy (docs/privacy.md)."""

    store: bool = Field(description="false: its answers are never cached.")
    omit: list[str] = Field(description="v1 face fields removed from its answers and from what is stored.")
    cache_ttl_s: int | None = Field(description="Lifetime of its cached answers; null = FACEGATE_CACHE_TTL_S.")
    max_age_s: int | None = Field(description="Oldest analysis it is answered from; null = any.")
    allow_force: bool = Field(description="May send X-Facegate-Force (a paid re-analysis).")


class TenantInfo(BaseModel):
    """One tenant of the tenants file (never its keys)."""

    name: str = Field(description="The tenant's name.")
    limits: TenantLimitsModel = Field(description="Its effective limits.")
    policy: TenantPolicyModel = Field(description="Its data policy.")


class TenantsList(BaseModel):
    """The tenants file as facegate reads it now."""

    tenants: list[TenantInfo]
    operators: list[str] = Field(description="Names of the operators (never their keys).")


def tenant_info(tenant: Tenant) -> dict[str, Any]:
    limits = tenant.limits
    return {
        "name": tenant.name,
        "limits": {
            "rate_per_s": limits.rate_per_s,
            "burst": limits.burst,
            "daily_quota": limits.daily_quota,
            "monthly_quota": limits.monthly_quota,
        },
        "policy": {
            "store": tenant.policy.store,
            "omit": sorted(tenant.policy.omit),
            "cache_ttl_s": tenant.policy.cache_ttl_s,
            "max_age_s": tenant.policy.max_age_s,
            "allow_force": tenant.policy.allow_force,
        },
    }


def actor(operator_name: str) -> str:
    return f"operator:{operator_name}"


TenantName = Annotated[
    str,
    Path(
        description="A tenant's name (also one no longer in the tenants file).",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
    ),
]


class Replicas(BaseModel):
    """How the other replicas took the deletion."""

    told: int = Field(description="Replicas subscribed when the deletion was announced.")
    confirmed: int = Field(description="Of those, how many confirmed they dropped their copies in time.")


class PurgeResult(BaseModel):
    """What a purge deleted, and whether every replica dropped its copies."""

    deleted: int = Field(description="Cache entries that existed and were deleted.")
    replicas: Replicas = Field(description="Replicas told and confirming.")


async def _purge(work: Awaitable[Purged]) -> Response:
    try:
        done = await work
    except CacheError:
        raise Problem(
            "cache_unavailable", "the cache could not be reached; the purge may be incomplete, retry it"
        ) from None
    return json_response(
        {"deleted": done.deleted, "replicas": {"told": done.delivery.told, "confirmed": done.delivery.confirmed}}
    )


@router.get("/tenants", summary="List every tenant's settings (no keys)", response_model=TenantsList)
async def list_tenants(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep) -> Response:
    """The tenants file as facegate reads it now: names and effective settings, and the
    operators' names. Key hashes are never shown."""
    registry = rt.tenants.registry
    audit("admin.tenants.read", actor=actor(operator.name), request_id=ctx.request_id)
    return json_response(
        {
            "tenants": [tenant_info(registry.tenants[name]) for name in sorted(registry.tenants)],
            "operators": sorted(registry.operators),
        }
    )


@router.delete(
    "/tenants/{tenant}/analyses",
    summary="Purge everything cached for a tenant",
    response_model=PurgeResult,
    responses=problems("cache_unavailable"),
)
async def purge_tenant(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep, tenant: TenantName) -> Response:
    """Deletes every analysis and verdict the tenant's calls stored (in `shared` scope: the entries its
    calls paid for), in Redis and in every replica's local tier; its calls in flight store nothing."""
    return await _purge(rt.purger.purge_tenant(tenant, actor=actor(operator.name), request_id=ctx.request_id))


@router.delete(
    "/tenants/{tenant}/analyses/{sha256}",
    summary="Delete one tenant's cached analysis of an image",
    response_model=PurgeResult,
    responses=problems("cache_unavailable"),
)
async def delete_tenant_analysis(
    rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep, tenant: TenantName, sha256: Sha256Path
) -> Response:
    """What `DELETE /v1/faces/analyses/{sha256}` does for the tenant, done by an operator."""
    scope = rt.settings.cache_scope
    work = rt.purger.delete_analysis(scope, tenant, sha256, actor=actor(operator.name), request_id=ctx.request_id)
    return await _purge(work)


@router.delete(
    "/analyses/{sha256}",
    summary="Purge one image across every tenant",
    response_model=PurgeResult,
    responses=problems("cache_unavailable"),
)
async def purge_image(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep, sha256: Sha256Path) -> Response:
    """Deletes the image's analysis in every tenant's scope and in the shared scope."""
    known = rt.tenants.registry.tenants
    return await _purge(rt.purger.purge_hash(sha256, known, actor=actor(operator.name), request_id=ctx.request_id))


@router.get(
    "/tenants/{tenant}/usage",
    summary="Read any tenant's limits and usage",
    response_model=UsageReport,
    responses=problems("not_found", "quota_unavailable"),
)
async def get_tenant_usage(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep, tenant: TenantName) -> Response:
    """The body `GET /v1/usage` gives that tenant (the operator's read is not rate-limited or counted)."""
    found = rt.tenants.registry.tenants.get(tenant)
    if found is None:
        raise Problem("not_found", "no such tenant in the tenants file")
    try:
        report = await rt.service.limiter.usage(found)
    except QuotaUnavailable:
        raise Problem("quota_unavailable", "usage counters are unavailable right now", retry_after=5) from None
    audit("admin.usage.read", actor=actor(operator.name), request_id=ctx.request_id, tenant=tenant)
    return json_response(usage_dict(report))


class UpstreamKeyModel(BaseModel):
    name: str = Field(description="The key's name in the keys file (never the ailabapi key).")
    tier: str = Field(description="primary, reserve or dedicated.")
    state: str = Field(description="ok, low (balance below low_credits), cooling, exhausted or disabled.")
    in_flight: int = Field(description="Calls on this key right now, all replicas together.")
    max_concurrency: int
    qps: float
    cooldown_until: str | None = Field(description="When a throttled key takes calls again (UTC), if cooling.")
    balance: float | None = Field(description="The last balance read from ailabapi; null = not read yet.")
    balance_at: str | None = Field(description="When it was read (UTC).")
    billed_since_balance: int = Field(description="Calls this key was billed for since that read.")
    low_credits: float
    reason: str | None = Field(description="The ailabapi code that last changed its state.")


class UpstreamKeysView(BaseModel):
    keys: list[UpstreamKeyModel]
    source: str = Field(description="Where the keys come from: the keys file, or FACEGATE_UPSTREAM_API_KEY.")
    gated: bool = Field(description="Unusable keys are taken out of rotation (false for the single-key setting).")
    waiting: int = Field(description="Calls waiting for an upstream slot, all replicas together.")
    waiting_by_tenant: dict[str, int]


@router.get(
    "/upstream-keys",
    summary="Read the upstream key pool: states, load, balances",
    response_model=UpstreamKeysView,
    responses=problems("upstream_unavailable"),
)
async def get_upstream_keys(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep) -> Response:
    """Which ailabapi keys exist (by name), their state, calls in flight, cooldown end and last
    balance, and the fair queue's depth — shared by all replicas. Never the keys themselves."""
    try:
        view = await rt.pool.snapshot()
    except Exception:
        raise Problem("upstream_unavailable", "the pool's shared state could not be read", retry_after=5) from None
    audit("admin.upstream_keys.read", actor=actor(operator.name), request_id=ctx.request_id)
    return json_response(view.as_dict())
