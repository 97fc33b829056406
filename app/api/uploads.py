"""The body of both analyze routes: answer from the digest header if it can, else receive the
upload, run the use case, release the upload."""

from __future__ import annotations

from typing import Final

from fastapi import Request

from app.context import RequestContext
from app.entry import Entry
from app.errors import Problem
from app.intake import Upload, receive
from app.intake.digest import CONTENT_DIGEST, IMAGE_DIGEST, declared_sha256
from app.intake.receive import RAW_TYPES
from app.runtime import Runtime
from app.service import AnalyzeOptions
from app.tenants import Tenant

#: Every problem code :func:`analyze_request` can answer with (the analyze routes' OpenAPI
#: responses): the upload (intake), the limits, and the upstream call.
ANALYZE_REFUSALS: Final = (
    # receiving and judging the upload (app/intake): free, and still rate counted
    "image_missing",
    "invalid_request",
    "invalid_digest",
    "digest_mismatch",
    "request_timeout",
    "image_too_large",
    "unsupported_media_type",
    "invalid_image",
    "image_dimensions",
    "too_many_uploads",
    "overloaded",
    # the tenant's limits (app/limits)
    "rate_limited",
    "quota_exceeded",
    "quota_unavailable",
    # the paid call (app/upstream)
    "upstream_auth",
    "upstream_error",
    "upstream_credits",
    "upstream_unavailable",
    "upstream_share_exceeded",
    "upstream_keys_unavailable",
    "upstream_timeout",
)


async def receive_upload(request: Request, rt: Runtime, tenant: Tenant, expected_sha256: str | None) -> Upload:
    """Stream the request's image in, within the process's and the tenant's share of upload slots."""
    async with rt.uploads.slot(tenant.name):
        return await receive(
            request.stream(),
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            rt.intake,
            expected_sha256,
        )


def declared_digest(request: Request) -> str | None:
    """The image's SHA-256 from ``Content-Digest`` (raw body) or ``Image-Digest`` (app.intake.digest).

    Only on a body facegate accepts: anything else goes on to be refused by ``receive``.
    """
    headers = request.headers
    if CONTENT_DIGEST not in headers and IMAGE_DIGEST not in headers:
        return None
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data" and not media.startswith(RAW_TYPES):
        return None
    joined = {name: ", ".join(headers.getlist(name)) or None for name in (CONTENT_DIGEST, IMAGE_DIGEST)}
    return declared_sha256(media, joined[CONTENT_DIGEST], joined[IMAGE_DIGEST])


async def analyze_request(
    request: Request, rt: Runtime, ctx: RequestContext, tenant: Tenant, opts: AnalyzeOptions
) -> Entry:
    """Answer the request through the cache by its declared digest, or by :meth:`AnalyzeService.analyze`.

    With a digest header naming a cached image, the answer comes from the headers alone and
    the body is never read: a client that sent ``Expect: 100-continue`` never sends it (the
    edge then closes the connection, see ``app.api.edge``). Otherwise the body is received,
    its digest checked against the header as it streams, and the use case runs.

    A refused upload still counts against the tenant's rate limit (and over it, the 429
    wins), so that a client cannot hammer the gateway for free with bad bodies.
    """
    service = rt.service
    try:
        declared = declared_digest(request)
    except Problem:
        await service.count_request(ctx, tenant)
        raise
    if declared is not None and not opts.no_cache:
        entry = await service.cached(ctx, tenant, declared)
        if entry is not None:
            return entry
    try:
        upload = await receive_upload(request, rt, tenant, declared)
    except Problem:
        await service.count_request(ctx, tenant)
        raise
    try:
        return await service.analyze(ctx, tenant, upload, opts)
    finally:
        if not upload.handed_off:
            upload.close()
