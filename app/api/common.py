"""What every route shares: the runtime, the request context, authentication, JSON out."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from app.context import RequestContext
from app.entry import Entry
from app.errors import Problem
from app.images import Upload, receive
from app.service import AnalyzeOptions
from app.tenants import Tenant
from app.upstream import contract

if TYPE_CHECKING:
    from app.main import Runtime

#: Query parameters people put keys in. A key in a URL ends up in proxy and browser logs.
CREDENTIAL_PARAMS = frozenset(
    {"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "x-api-key", contract.KEY_HEADER}
)
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def context(request: Request) -> RequestContext:
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
    """FastAPI dependency: the calling tenant, or a 401 identical for every kind of wrong key."""
    if any(name.lower() in CREDENTIAL_PARAMS for name in request.query_params):
        raise Problem(
            "credentials_in_query",
            "send the key in the Authorization, X-API-Key or ailabapi-api-key header; "
            "a key that was put in a URL may have been logged and should be rotated",
        )
    tenant = runtime(request).tenants.registry.authenticate(presented_key(request))
    if tenant is None:
        raise Problem(
            "unauthorized",
            "send a valid key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="facegate"'},
        )
    context(request).tenant = tenant.name
    return tenant


def cache_options(request: Request) -> AnalyzeOptions:
    """``Cache-Control: no-cache`` forces a fresh (billable) call; ``no-store`` skips storing."""
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("cache-control", "").split(",")}
    return AnalyzeOptions(no_cache="no-cache" in directives, no_store="no-store" in directives)


async def receive_upload(request: Request) -> Upload:
    """Stream the request's image in, within the per-process cap on concurrent uploads."""
    rt = runtime(request)
    async with rt.uploads.slot():
        return await receive(
            request.stream(),
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            rt.intake,
        )


async def analyze_request(request: Request, tenant: Tenant) -> Entry:
    """The body of both analyze routes: receive the upload, run the use case, release the upload.

    A refused upload still counts against the tenant's rate limit (and over it, the 429
    wins), so that a client cannot hammer the gateway for free with bad bodies.
    """
    ctx = context(request)
    service = runtime(request).service
    try:
        upload = await receive_upload(request)
    except Problem:
        await service.count_request(ctx, tenant)
        raise
    try:
        return await service.analyze(ctx, tenant, upload, cache_options(request))
    finally:
        if not upload.handed_off:
            upload.close()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
