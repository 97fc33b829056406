"""The catalogue of errors facegate answers, and their two renderings.

Every refusal is a :class:`Problem` carrying a stable ``code``. The v1 API renders it as
RFC 9457 ``application/problem+json``; the drop-in route renders the same problem in
ailabapi's own envelope so that existing ailabapi client code keeps working. Detail
strings are written by facegate, never copied from exceptions, so no key, URL or stack
can leak through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

from app.upstream import contract

PROBLEM_TYPE_PREFIX: Final = "urn:facegate:problem:"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One row of the public error table (README "Errors")."""

    status: int
    title: str
    #: How the drop-in route reports it: ailabapi status and ``error_detail.code``.
    compat_status: int
    compat_code: str


CATALOGUE: Final[dict[str, ErrorSpec]] = {
    "unauthorized": ErrorSpec(401, "Missing or unknown API key", 401, "ERROR_USER_NOT_EXISTS"),
    "operator_required": ErrorSpec(403, "An operator key is required", 403, "ERROR_ILLEGAL_OPERATION"),
    "force_not_allowed": ErrorSpec(403, "This tenant may not force a fresh analysis", 403, "ERROR_ILLEGAL_OPERATION"),
    "credentials_in_query": ErrorSpec(400, "API keys are not accepted in the URL", 400, "ERROR_INVALID_PARAMETER"),
    "rate_limited": ErrorSpec(429, "Rate limit exceeded", 429, "EXCEEDING_LIMITS"),
    "quota_exceeded": ErrorSpec(429, "Quota exhausted", 429, "ERROR_NOT_ENOUGH_CREDITS"),
    "too_many_uploads": ErrorSpec(429, "Too many uploads in progress for this tenant", 429, "EXCEEDING_LIMITS"),
    "image_missing": ErrorSpec(400, "No image in the request", 400, "MISSING_PARAMETERS"),
    "invalid_request": ErrorSpec(400, "Malformed request", 400, "ERROR_PARAMETERS"),
    "invalid_digest": ErrorSpec(400, "Malformed digest header", 400, "ERROR_PARAMETERS"),
    "digest_mismatch": ErrorSpec(400, "The image does not match its digest", 400, "ERROR_PARAMETERS"),
    "image_too_large": ErrorSpec(413, "Image too large", 413, "FILE_SIZE_EXCEEDS_LIMIT"),
    "unsupported_media_type": ErrorSpec(415, "Unsupported image type", 415, "UNSUPPORTED_FILE_TYPES"),
    "invalid_image": ErrorSpec(422, "Invalid image", 422, "FILE_DECODING_FAILURE"),
    "image_dimensions": ErrorSpec(422, "Image dimensions out of range", 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    "upstream_rejected_image": ErrorSpec(422, "The upstream rejected the image", 422, "ERROR_INVALID_FILE"),
    "request_timeout": ErrorSpec(408, "The upload was too slow", 400, "ERROR_PARAMETERS"),
    "not_found": ErrorSpec(404, "Not found", 404, "ERROR_AI_NOT_EXISTS"),
    "method_not_allowed": ErrorSpec(405, "Method not allowed", 405, "ERROR_AI_NOT_EXISTS"),
    "upstream_auth": ErrorSpec(502, "The gateway's upstream credentials were refused", 502, "ERROR_GATEWAY"),
    "upstream_error": ErrorSpec(502, "The upstream failed", 502, "ERROR_GATEWAY"),
    "upstream_credits": ErrorSpec(503, "The upstream account is out of credits", 503, "ERROR_INSUFFICIENT_RESOURCES"),
    "upstream_unavailable": ErrorSpec(503, "The upstream is unavailable", 503, "AI_SERVICE_FLOW_RESTRICTION"),
    "upstream_share_exceeded": ErrorSpec(429, "This tenant's share of the upstream is full", 429, "EXCEEDING_LIMITS"),
    "upstream_keys_unavailable": ErrorSpec(
        503, "No upstream key is usable right now", 503, "ERROR_INSUFFICIENT_RESOURCES"
    ),
    "overloaded": ErrorSpec(503, "The gateway is overloaded", 503, "ERROR_INSUFFICIENT_RESOURCES"),
    "cache_unavailable": ErrorSpec(503, "The cache is unavailable", 503, "ERROR_RESOURCE_UNAVAILABLE"),
    "quota_unavailable": ErrorSpec(503, "Quota accounting is unavailable", 503, "ERROR_RESOURCE_UNAVAILABLE"),
    "upstream_timeout": ErrorSpec(504, "The upstream timed out", 504, "AI_SERVICE_TIMEOUT"),
    "internal_error": ErrorSpec(500, "Internal error", 500, "SERVICE_INTERNAL_ERROR"),
}


@dataclass(slots=True)
class Problem(Exception):
    """A refusal with a stable code; raised anywhere, rendered once at the HTTP edge."""

    code: str
    detail: str = ""
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Upstream envelope to replay verbatim on the drop-in route (image verdicts).
    upstream_body: dict[str, Any] | None = None
    upstream_status: int | None = None

    def __post_init__(self) -> None:
        if self.code not in CATALOGUE:
            raise ValueError(f"unknown problem code {self.code!r}")
        Exception.__init__(self, self.code)

    @property
    def spec(self) -> ErrorSpec:
        return CATALOGUE[self.code]

    @property
    def status(self) -> int:
        return self.spec.status

    def response_headers(self) -> dict[str, str]:
        out = dict(self.headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out

    def to_problem_json(self, request_id: str) -> dict[str, Any]:
        """RFC 9457 body, with facegate's ``code`` and ``request_id`` extensions."""
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_PREFIX + self.code,
            "title": self.spec.title,
            "status": self.status,
            "detail": self.detail or self.spec.title,
            "code": self.code,
            "request_id": request_id,
        }
        if self.retry_after is not None:
            body["retry_after"] = max(1, math.ceil(self.retry_after))
        return body

    def to_envelope(self, request_id: str) -> tuple[int, dict[str, Any]]:
        """ailabapi's envelope for the drop-in route: the upstream's own verdict when there is one."""
        if self.upstream_body is not None and self.upstream_status is not None:
            return self.upstream_status, self.upstream_body
        spec = self.spec
        return spec.compat_status, contract.envelope(
            request_id=request_id,
            status=spec.compat_status,
            code=spec.compat_code,
            message=self.detail or spec.title,
        )
