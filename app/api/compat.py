"""The drop-in route: ailabapi's own path, header, form field and JSON envelope.

Existing ailabapi client code changes only its base URL (and uses a tenant key in
``ailabapi-api-key``). Answers are ailabapi's bytes, cached or live; facegate's own
refusals are rendered in ailabapi's envelope by the app's problem handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ContextDep, OptionsDep, RuntimeDep, TenantDep
from app.api.openapi import UPLOAD_BODY
from app.api.uploads import analyze_request
from app.policy import strip_body
from app.upstream import contract

router = APIRouter(tags=["ailabapi-compatible"])

#: ailabapi's error envelope (``contract.envelope``), as documented in the fuzzed OpenAPI.
ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["request_id", "error_code", "error_code_str", "error_msg", "error_detail"],
    "properties": {
        "request_id": {"type": "string"},
        "log_id": {"type": "string"},
        "error_code": {"type": "integer"},
        "error_code_str": {"type": "string"},
        "error_msg": {"type": "string"},
        "error_detail": {"type": "object"},
    },
}


@router.post(
    contract.ANALYZE_PATH,
    summary="ailabapi-compatible Face Analyzer Advanced",
    responses={
        200: {"description": "ailabapi's JSON envelope, exactly as ailabapi answered it."},
        "default": {
            "description": "An error in ailabapi's envelope: ailabapi's own (replayed), or facegate's refusal "
            "(then the X-Facegate-Error header carries facegate's problem code).",
            "content": {"application/json": {"schema": ENVELOPE_SCHEMA}},
        },
    },
    openapi_extra=UPLOAD_BODY,
)
async def face_analyzer_advanced(
    request: Request, *, rt: RuntimeDep, ctx: ContextDep, tenant: TenantDep, opts: OptionsDep
) -> Response:
    """Same request as ailabapi (multipart field `image`, tenant key in `ailabapi-api-key`); the
    answer is ailabapi's JSON, from the cache or live, including its error envelopes."""
    entry = await analyze_request(request, rt, ctx, tenant, opts)
    return Response(strip_body(entry.body, tenant.policy.omit), status_code=entry.status, media_type="application/json")
