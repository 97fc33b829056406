"""What routes depend on, as typed FastAPI dependencies: the runtime, the request context,
the authenticated tenant or operator and the caller's cache directives.

Routes declare what they need (``rt: RuntimeDep``, ``tenant: TenantDep``, ``ctx: ContextDep``,
``operator: OperatorDep``, ``caller: CallerDep``) and never reach into ``app.state`` or the ASGI
scope themselves. Operator (admin) keys and tenant keys are separate: a tenant key never
authenticates as an operator (403 ``operator_required`` on an operator-only action), an
operator key never as a tenant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.openapi import refuses
from app.context import RequestContext
from app.errors import Problem
from app.runtime import Runtime
from app.service import AnalyzeOptions
from app.tenants import Operator, Tenant
from app.upstream import contract

#: Query parameters people put keys in. A key in a URL ends up in proxy and browser logs.
CREDENTIAL_PARAMS = frozenset(
    {"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "x-api-key", contract.KEY_HEADER}
)
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


#: The OpenAPI security schemes (``openapi.SECURITY_SCHEMES``) each kind of key is accepted by:
#: any one of them (a tenant key works in all three headers, on every route).
TENANT_SECURITY = ("bearer", "apiKey", "ailabapiKey")
OPERATOR_SECURITY = ("operatorKey", "operatorKeyHeader")


def get_runtime(request: Request) -> Runtime:
    """The runtime the lifespan built (``app.runtime``)."""
    rt: Runtime = request.app.state.runtime
    return rt


def get_context(request: Request) -> RequestContext:
    """This request's context, created by the edge middleware (``app.api.edge``)."""
    ctx: RequestContext = request.scope["state"]["ctx"]
    return ctx


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer``, ``X-API-Key`` or ailabapi's own header."""
    auth = request.headers.get("authorization")
    if auth:
        match = _BEARER.match(auth)
        return match.group(1) if match else None
    return request.headers.get("x-api-key") or request.headers.get(contract.KEY_HEADER)


def _refuse_keys_in_query(request: Request) -> None:
    if any(name.lower() in CREDENTIAL_PARAMS for name in request.query_params):
        raise Problem(
            "credentials_in_query",
            "send the key in the Authorization, X-API-Key or ailabapi-api-key header; "
            "a key that was put in a URL may have been logged and should be rotated",
        )


def _unauthorized() -> Problem:
    return Problem(
        "unauthorized",
        "send a valid key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        headers={"WWW-Authenticate": 'Bearer realm="facegate"'},
    )


def operator_required(action: str) -> Problem:
    """The 403 for a valid tenant key on something only an operator may do."""
    return Problem("operator_required", f"{action} needs an operator key (tenant keys cannot do this)")


@refuses("credentials_in_query", "unauthorized", security=TENANT_SECURITY)
async def authenticate(request: Request) -> Tenant:
    """The calling tenant, or a 401 identical for every kind of wrong key."""
    _refuse_keys_in_query(request)
    tenant = get_runtime(request).tenants.registry.authenticate(presented_key(request))
    if tenant is None:
        raise _unauthorized()
    get_context(request).tenant = tenant.name
    return tenant


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling a route open to both kinds of key: exactly one of the two is set."""

    tenant: Tenant | None = None
    operator: Operator | None = None

    @property
    def actor(self) -> str:
        """As the audit log names it: ``operator:NAME`` or ``tenant:NAME``."""
        if self.operator is not None:
            return f"operator:{self.operator.name}"
        assert self.tenant is not None
        return f"tenant:{self.tenant.name}"


def _caller(request: Request) -> Caller | None:
    _refuse_keys_in_query(request)
    key = presented_key(request)
    registry = get_runtime(request).tenants.registry
    ctx = get_context(request)
    operator = registry.authenticate_operator(key)
    if operator is not None:
        ctx.operator = operator.name
        return Caller(operator=operator)
    tenant = registry.authenticate(key)
    if tenant is not None:
        ctx.tenant = tenant.name
        return Caller(tenant=tenant)
    return None


#: The operator key, as the OpenAPI documents it (the same two headers as tenant keys).
operator_bearer = HTTPBearer(
    auto_error=False, scheme_name="operatorKey", description="An operator key (`fgop_…`) as a Bearer token."
)
operator_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="operatorKeyHeader", description="An operator key (`fgop_…`)."
)


@refuses("credentials_in_query", "unauthorized", "operator_required", security=OPERATOR_SECURITY)
async def authenticate_operator(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(operator_bearer)],
    _header: Annotated[str | None, Security(operator_header)],
) -> Operator:
    """The calling operator; 401 for a missing or unknown key, 403 ``operator_required`` for a tenant key."""
    caller = _caller(request)
    if caller is None:
        raise _unauthorized()
    if caller.operator is None:
        raise operator_required("this admin route")
    return caller.operator


@refuses("credentials_in_query", "unauthorized", security=TENANT_SECURITY + OPERATOR_SECURITY)
async def authenticate_caller(request: Request) -> Caller:
    """A tenant or an operator (routes that serve both, e.g. usage history); 401 otherwise."""
    caller = _caller(request)
    if caller is None:
        raise _unauthorized()
    return caller


#: The one way to pay for a fresh analysis of an image already cached (tenants with ``allow_force``).
FORCE_HEADER = "X-Facegate-Force"
_YES = frozenset({"1", "true", "yes"})


@refuses("force_not_allowed")
async def cache_options(request: Request, tenant: Annotated[Tenant, Depends(authenticate)]) -> AnalyzeOptions:
    """``X-Facegate-Force: 1`` forces a fresh (billable) analysis — only for tenants with
    ``allow_force``, else 403 ``force_not_allowed``. ``Cache-Control: no-cache`` no longer does:
    browsers send it on every reload, and a reload must not pay again. ``no-store`` skips storing."""
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("cache-control", "").split(",")}
    force = request.headers.get(FORCE_HEADER, "").strip().lower() in _YES
    if force and not tenant.policy.allow_force:
        await get_runtime(request).service.count_request(get_context(request), tenant)
        raise Problem(
            "force_not_allowed",
            f"{FORCE_HEADER} (a fresh, billable analysis) needs allow_force = true in this tenant's settings",
        )
    return AnalyzeOptions(
        no_cache=force,
        no_store="no-store" in directives,
        batch=urgency(request.headers.get("priority")) > DEFAULT_URGENCY,
    )


#: RFC 9218: urgency 0 (highest) to 7, default 3. ``Priority: u=4..7`` queues the call as batch.
DEFAULT_URGENCY = 3


def urgency(value: str | None) -> int:
    """The ``u`` parameter of an RFC 9218 ``Priority`` header (a structured-field dictionary);
    the default when absent or malformed (a request can only lower its own priority)."""
    if not value:
        return DEFAULT_URGENCY
    for member in value.split(","):
        name, _, raw = member.strip().partition("=")
        if name.strip() == "u":
            raw = raw.split(";", 1)[0].strip()
            return int(raw) if raw.isdigit() and len(raw) == 1 and int(raw) <= 7 else DEFAULT_URGENCY
    return DEFAULT_URGENCY


async def _runtime(request: Request) -> Runtime:
    return get_runtime(request)


async def _context(request: Request) -> RequestContext:
    return get_context(request)


# As dependencies, through async twins: FastAPI runs a plain ``def`` dependency in its thread pool,
# a round trip through a worker thread on every request for what is one attribute read.
RuntimeDep = Annotated[Runtime, Depends(_runtime)]
ContextDep = Annotated[RequestContext, Depends(_context)]
TenantDep = Annotated[Tenant, Depends(authenticate)]
OperatorDep = Annotated[Operator, Depends(authenticate_operator)]
CallerDep = Annotated[Caller, Depends(authenticate_caller)]
OptionsDep = Annotated[AnalyzeOptions, Depends(cache_options)]
