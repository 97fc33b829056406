"""What routes depend on, as typed FastAPI dependencies: the runtime, the request context,
the authenticated tenant and the caller's cache directives.

Routes declare what they need (``rt: RuntimeDep``, ``tenant: TenantDep``, ``ctx: ContextDep``)
and never reach into ``app.state`` or the ASGI scope themselves.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Request

from app.context import RequestContext
from app.errors import Problem
from app.runtime import Runtime
from app.service import AnalyzeOptions
from app.tenants import Tenant
from app.upstream import contract

#: Query parameters people put keys in. A key in a URL ends up in proxy and browser logs.
CREDENTIAL_PARAMS = frozenset(
    {"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "x-api-key", contract.KEY_HEADER}
)
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


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


async def authenticate(request: Request) -> Tenant:
    """The calling tenant, or a 401 identical for every kind of wrong key."""
    if any(name.lower() in CREDENTIAL_PARAMS for name in request.query_params):
        raise Problem(
            "credentials_in_query",
            "send the key in the Authorization, X-API-Key or ailabapi-api-key header; "
            "a key that was put in a URL may have been logged and should be rotated",
        )
    tenant = get_runtime(request).tenants.registry.authenticate(presented_key(request))
    if tenant is None:
        raise Problem(
            "unauthorized",
            "send a valid key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="facegate"'},
        )
    get_context(request).tenant = tenant.name
    return tenant


def cache_options(request: Request) -> AnalyzeOptions:
    """``Cache-Control: no-cache`` forces a fresh (billable) call; ``no-store`` skips storing."""
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("cache-control", "").split(",")}
    return AnalyzeOptions(no_cache="no-cache" in directives, no_store="no-store" in directives)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
TenantDep = Annotated[Tenant, Depends(authenticate)]
OptionsDep = Annotated[AnalyzeOptions, Depends(cache_options)]
