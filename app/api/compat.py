"""The drop-in route: ailabapi's own path, header, form field and JSON envelope.

Existing ailabapi client code changes only its base URL (and uses a tenant key in
``ailabapi-api-key``). Answers are ailabapi's bytes, cached or live; facegate's own
refusals are rendered in ailabapi's envelope by the app's problem handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import ContextDep, OptionsDep, RuntimeDep, TenantDep
from app.api.lean import LeanRoute
from app.api.openapi import ANALYZE_EXTRA, AilabapiErrorDetail, Tag, header, problems
from app.api.uploads import ANALYZE_REFUSALS, analyze_request
from app.policy import strip_body
from app.upstream import contract

router = APIRouter(route_class=LeanRoute)


class AilabapiAnalysis(BaseModel):
    """ailabapi's answer, byte for byte as ailabapi gave it (from the cache or live).

    ailabapi documents two shapes for this endpoint: the Tencent shape (`image_width`,
    `image_height`, `face_detail_infos`) and the list shape (`data`); facegate passes on
    whichever ailabapi sent (facegate's own `/v1/faces/analyze` maps both onto one schema).
    """

    model_config = ConfigDict(extra="allow")

    request_id: str = Field(description="ailabapi's request id.")
    log_id: str | None = Field(None, description="ailabapi's log id.")
    error_code: int | None = Field(None, description="0 on success.")
    error_code_str: str | None = Field(None, description="Empty on success.")
    error_msg: str | None = Field(None, description="Empty on success.")
    error_detail: AilabapiErrorDetail | None = Field(None, description="On success, an empty code.")
    image_width: int | None = Field(None, description="Tencent shape: the image's width, px.")
    image_height: int | None = Field(None, description="Tencent shape: the image's height, px.")
    face_detail_infos: list[dict[str, Any]] | None = Field(None, description="Tencent shape: one entry per face.")
    data: dict[str, Any] | None = Field(None, description="List shape: per-attribute lists, one entry per face.")


@router.post(
    contract.ANALYZE_PATH,
    tags=[Tag.AILABAPI],
    summary="Analyze faces, speaking ailabapi's protocol (drop-in)",
    response_model=AilabapiAnalysis,
    responses={
        200: {"headers": header("CacheStatus")},
        **problems(*ANALYZE_REFUSALS, "upstream_rejected_image"),
    },
    openapi_extra=ANALYZE_EXTRA,
)
async def analyze_faces_ailabapi(
    request: Request, *, rt: RuntimeDep, ctx: ContextDep, tenant: TenantDep, opts: OptionsDep
) -> Response:
    """Same request as ailabapi's Face Analyzer Advanced (multipart field `image`, the tenant key in
    `ailabapi-api-key`); the answer is ailabapi's JSON, from the cache or live. ailabapi's verdicts
    on an image (no face, blurry face, …) come back as ailabapi sent them; facegate's refusals come
    in ailabapi's envelope with the facegate code in `X-Facegate-Error` (statuses as ailabapi uses them)."""
    entry = await analyze_request(request, rt, ctx, tenant, opts)
    return Response(strip_body(entry.body, tenant.policy.omit), status_code=entry.status, media_type="application/json")
