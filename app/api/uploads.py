"""The body of both analyze routes: receive the upload, run the use case, release the upload."""

from __future__ import annotations

from fastapi import Request

from app.context import RequestContext
from app.entry import Entry
from app.errors import Problem
from app.intake import Upload, receive
from app.runtime import Runtime
from app.service import AnalyzeOptions
from app.tenants import Tenant


async def receive_upload(request: Request, rt: Runtime) -> Upload:
    """Stream the request's image in, within the per-process cap on concurrent uploads."""
    async with rt.uploads.slot():
        return await receive(
            request.stream(),
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            rt.intake,
        )


async def analyze_request(
    request: Request, rt: Runtime, ctx: RequestContext, tenant: Tenant, opts: AnalyzeOptions
) -> Entry:
    """Receive the image and answer it through :meth:`AnalyzeService.analyze`.

    A refused upload still counts against the tenant's rate limit (and over it, the 429
    wins), so that a client cannot hammer the gateway for free with bad bodies.
    """
    service = rt.service
    try:
        upload = await receive_upload(request, rt)
    except Problem:
        await service.count_request(ctx, tenant)
        raise
    try:
        return await service.analyze(ctx, tenant, upload, opts)
    finally:
        if not upload.handed_off:
            upload.close()
