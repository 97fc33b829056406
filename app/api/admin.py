"""The operator's routes: ``/admin/...``, for operator keys only (``OperatorDep``).

A missing or unknown key gets 401 ``unauthorized``, a valid *tenant* key 403
``operator_required`` — both problem+json. Every route here that reads another tenant's
data or deletes anything writes an audit line (``app.audit``). The routes are thin: the
governance use cases (purges, history) live in the service layer.

Adding a route: declare ``operator: OperatorDep`` (that is the whole access check), list
``problems(401, 403, ...)`` in ``responses``, and call ``audit(...)`` with the operator as
the actor, e.g. ``audit("upstream_keys.read", actor=f"operator:{operator.name}",
request_id=ctx.request_id)``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.api.deps import ContextDep, OperatorDep, RuntimeDep
from app.api.openapi import problems
from app.api.responses import json_response
from app.audit import audit
from app.tenants import Tenant

#: Every admin route documents these refusals (no key / unknown key, and a tenant key).
ADMIN_PROBLEMS = problems(400, 401, 403)

router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_PROBLEMS)


class TenantLimitsModel(BaseModel):
    rate_per_s: float
    burst: int
    daily_quota: int | None = Field(description="Billable calls per UTC day; null = unlimited.")
    monthly_quota: int | None = Field(description="Billable calls per UTC month; null = unlimited.")


class TenantInfo(BaseModel):
    name: str
    limits: TenantLimitsModel


class TenantsList(BaseModel):
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
    }


def actor(operator_name: str) -> str:
    return f"operator:{operator_name}"


@router.get("/tenants", summary="Every tenant's settings (no keys)", response_model=TenantsList)
async def tenants(rt: RuntimeDep, ctx: ContextDep, operator: OperatorDep) -> Response:
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
