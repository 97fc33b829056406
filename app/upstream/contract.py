"""Everything facegate knows (or assumes) about ailabapi, in one place.

The gateway, the simulator and the tests all read these tables, so that a
fact learned about the real upstream is corrected here once. Each entry says
whether it was read in a published source ("verified") or is an assumption
("unknown"), following ``docs/upstream.md`` (copied from the team's research
notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

#: Path of the one endpoint facegate fronts (verified).
ANALYZE_PATH: Final = "/api/portrait/analysis/face-analyzer-advanced"
#: Header carrying the ailabapi key (verified).
KEY_HEADER: Final = "ailabapi-api-key"
#: Multipart field carrying the image (verified).
IMAGE_FIELD: Final = "image"
#: Marks the cache key; bump when what is sent upstream for the same bytes changes.
ENDPOINT_ID: Final = "face-analyzer-advanced"

# --- image limits (verified: "JPG/JPEG, PNG, BMP; <= 20 MB; > 32x32 and < 4096x4096") ---
#: The docs say "20 MB" without saying MB or MiB. We take the larger reading: an image in
#: between reaches ailabapi and comes back as a (non-billed) size refusal at worst.
MAX_BYTES: Final = 20 * 1024 * 1024
#: Each side must be strictly greater than this (verified wording "> 32x32").
MIN_SIDE_EXCLUSIVE: Final = 32
#: Each side must be strictly smaller than this (verified wording "< 4096x4096").
MAX_SIDE_EXCLUSIVE: Final = 4096
MAX_PIXELS: Final = (MAX_SIDE_EXCLUSIVE - 1) ** 2
#: Formats ailabapi accepts (verified). No GIF, no WebP.
FORMATS: Final = ("jpeg", "png", "bmp")
#: ailabapi answers ERROR_UNSUPPORTED_GRAYSCALE_IMAGE for some grayscale images
#: (verified code, unknown exact rule); facegate refuses single-channel images up front.
REFUSE_GRAYSCALE: Final = True
#: Smallest face ailabapi detects (verified: "face >= 64x64 px").
MIN_FACE_SIDE: Final = 64

# --- limits of one ailabapi key (unknown; conservative defaults, overridable by settings) ---
DEFAULT_QPS: Final = 5.0
DEFAULT_MAX_CONCURRENCY: Final = 5

# --- the credit balance (verified: "GET /api/common/query-credits reports the balance") ---
#: Path of the balance endpoint; same key header, no body, costs nothing (verified).
CREDITS_PATH: Final = "/api/common/query-credits"
#: ``data[].unique_sign`` values whose ``balance`` pays for face-analyzer-advanced. "common"
#: (universal credits, all APIs) is verified; the per-API sign of this endpoint is an
#: assumption (ailabapi's table of per-API signs does not list the face analyzers).
CREDIT_SIGNS: Final = frozenset({"common", "face_analyzer_advanced"})


class Shape(StrEnum):
    """The two answer shapes ailabapi's docs show for face-analyzer-advanced."""

    TENCENT = "tencent"  # image_width, face_detail_infos[] (the seed example)
    LIST = "list"  # data{face_count, face_rectangles, age_list, ...}


class Kind(StrEnum):
    """What an upstream error means for the gateway."""

    BAD_REQUEST = "bad_request"  # we sent something wrong: our bug, not the caller's
    AUTH = "auth"  # the server-held key is wrong, locked or the API is gone
    IMAGE = "image"  # a verdict on this image: deterministic, cacheable
    NO_FACE = "no_face"  # a verdict too, but v1 answers it as faces: []
    CREDITS = "credits"  # the ailabapi account is out of credits
    THROTTLED = "throttled"  # per-key request/concurrency limit hit
    FAULT = "fault"  # an upstream fault
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class UpstreamCode:
    """One row of ailabapi's error table (verified), with facegate's reading of it."""

    code: str
    status: int
    kind: Kind
    message: str

    @property
    def retryable(self) -> bool:
        """Retry only what the issue allows: throttling, 502/503/504-class faults."""
        return self.kind in (Kind.THROTTLED, Kind.OVERLOADED, Kind.TIMEOUT) or (
            self.kind is Kind.FAULT and self.status in (502, 503, 504)
        )

    @property
    def cacheable(self) -> bool:
        """Deterministic verdicts on the image may be cached; transient errors never."""
        return self.kind in (Kind.IMAGE, Kind.NO_FACE)


def _rows(status: int, kind: Kind, *pairs: tuple[str, str]) -> list[UpstreamCode]:
    return [UpstreamCode(code, status, kind, message) for code, message in pairs]


#: ailabapi's documented error codes (``error_detail.code``), verified. The numeric
#: ``error_code`` is undocumented; only this string is relied upon.
ERROR_CODES: Final[dict[str, UpstreamCode]] = {
    row.code: row
    for row in [
        *_rows(
            400,
            Kind.BAD_REQUEST,
            ("ERROR_PARAMETERS", "Parameter error."),
            ("MISSING_PARAMETERS", "Missing parameters."),
            ("ERROR_INVALID_PARAMETER", "Invalid parameter."),
            ("PARAMETERS_CANNOT_EMPTY", "Parameters cannot be empty."),
            ("UNSUPPORTED_PARAMETER_VALUES", "Unsupported parameter values."),
            ("ERROR_INVALID_PARAMETER_FORMAT", "Invalid parameter format."),
        ),
        *_rows(
            401,
            Kind.AUTH,
            ("ERROR_USER_NOT_EXISTS", "The user does not exist."),
            ("ERROR_APPLICATIONS_NOT_EXISTS", "The application does not exist."),
        ),
        *_rows(
            403,
            Kind.AUTH,
            ("ERROR_USER_LOCKED", "The account is locked."),
            ("ERROR_ILLEGAL_OPERATION", "Illegal operation."),
        ),
        *_rows(404, Kind.AUTH, ("ERROR_AI_NOT_EXISTS", "The API does not exist.")),
        *_rows(
            413,
            Kind.IMAGE,
            ("FILE_SIZE_EXCEEDS_LIMIT", "The file size exceeds the limit."),
            ("FILE_RESOLUTION_EXCEEDS_LIMITS", "The file resolution exceeds the limit."),
            ("ERROR_HIGH_RESOLUTION", "The resolution is too high."),
            ("ERROR_REQUEST_BODY_TOO_LARGE", "The request body is too large."),
        ),
        *_rows(
            415,
            Kind.IMAGE,
            ("UNSUPPORTED_FILE_TYPES", "Unsupported file type."),
            ("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE", "Grayscale images are not supported."),
        ),
        *_rows(
            422,
            Kind.IMAGE,
            ("FILE_DECODING_FAILURE", "The file could not be decoded."),
            ("ERROR_INVALID_FILE", "Invalid file."),
            ("ERROR_LOW_RESOLUTION", "The resolution is too low."),
            ("ERROR_FACE_SIZE_NOT_MEET_REQUIREMENTS", "The face size does not meet the requirements."),
            ("ERROR_SMALL_FACE_SIZE", "The face is too small."),
            ("ERROR_FACE_SIZE_RATIO_NOT_MET", "The face size ratio is not met."),
            ("ERROR_BLURRY_FACE", "The face is blurry."),
            ("ERROR_POOR_FACE_QUALITY", "The face quality is poor."),
            ("ERROR_FACE_COUNT_INVALID", "The number of faces is invalid."),
            ("ERROR_CONTENT_NON_COMPLIANCE", "The content does not comply with the rules."),
            ("FILE_CONTENT_NON_COMPLIANCE", "The file content does not comply with the rules."),
        ),
        *_rows(422, Kind.NO_FACE, ("ERROR_NO_FACE_IN_FILE", "No face detected in the file.")),
        *_rows(429, Kind.CREDITS, ("ERROR_NOT_ENOUGH_CREDITS", "Not enough credits.")),
        *_rows(429, Kind.THROTTLED, ("EXCEEDING_LIMITS", "Request limit exceeded.")),
        *_rows(
            500,
            Kind.FAULT,
            ("PROCESSING_FAILURE", "Processing failure."),
            ("UNKNOWN_ERROR", "Unknown error."),
            ("SERVICE_INTERNAL_ERROR", "Internal service error."),
            ("ERROR_RESPONSE_BODY_TOO_LARGE", "The response body is too large."),
        ),
        *_rows(
            502,
            Kind.FAULT,
            ("AI_SERVICE_ERROR", "AI service error."),
            ("AI_SERVICE_INTERNAL_ERROR", "AI service internal error."),
            ("AI_SERVICE_UNAUTHORIZED", "AI service unauthorized."),
            ("AI_SERVICE_NOT_FOUND", "AI service not found."),
            ("ERROR_GATEWAY", "Gateway error."),
            ("FILE_SERVICE_ERROR", "File service error."),
        ),
        *_rows(
            503,
            Kind.OVERLOADED,
            ("AI_SERVICE_FLOW_RESTRICTION", "AI service flow restriction."),
            ("ERROR_INSUFFICIENT_RESOURCES", "Insufficient resources."),
            ("ERROR_RESOURCE_UNAVAILABLE", "Resource unavailable."),
        ),
        *_rows(
            504,
            Kind.TIMEOUT,
            ("AI_SERVICE_TIMEOUT", "AI service timeout."),
            ("ERROR_FILE_DOWNLOAD_TIMEOUT", "File download timeout."),
        ),
    ]
}

_KIND_BY_STATUS: Final = {
    400: Kind.BAD_REQUEST,
    401: Kind.AUTH,
    403: Kind.AUTH,
    404: Kind.AUTH,
    413: Kind.IMAGE,
    415: Kind.IMAGE,
    422: Kind.IMAGE,
    429: Kind.THROTTLED,
    502: Kind.FAULT,
    503: Kind.OVERLOADED,
    504: Kind.TIMEOUT,
}


def lookup(code: str | None, status: int) -> UpstreamCode:
    """The table row for an error answer; an unknown code is classified by its HTTP status.

    ailabapi may add codes; classifying by status keeps the gateway's reaction sane
    (a new 422 code is still a verdict on the image, a new 503 code still retryable).
    """
    if code and code in ERROR_CODES:
        return ERROR_CODES[code]
    kind = _KIND_BY_STATUS.get(status, Kind.FAULT)
    return UpstreamCode(code or f"HTTP_{status}", status, kind, "Unrecognised upstream error.")


class KeyEffect(StrEnum):
    """What an upstream failure says about the *key* that made the call (not the image, not ailabapi)."""

    THROTTLED = "throttled"  # this key's request/concurrency limit: cool it down briefly
    EXHAUSTED = "exhausted"  # this key's account is out of credits: out until its balance is positive
    DISABLED = "disabled"  # ailabapi refuses this key: out until the keys file changes


#: Which error codes are about the key, so that a call moves to another key of the pool.
#: Verified codes; reading them as key-specific is facegate's choice. Unknown: whether
#: AI_SERVICE_FLOW_RESTRICTION (503) is per key or service-wide — treated as service-wide
#: (retried with backoff, never moves the call). ERROR_AI_NOT_EXISTS (404, "the API does not
#: exist") is about the endpoint, not the key, so it disables nothing either.
KEY_EFFECTS: Final[dict[str, KeyEffect]] = {
    "EXCEEDING_LIMITS": KeyEffect.THROTTLED,
    "ERROR_NOT_ENOUGH_CREDITS": KeyEffect.EXHAUSTED,
    "ERROR_USER_NOT_EXISTS": KeyEffect.DISABLED,
    "ERROR_APPLICATIONS_NOT_EXISTS": KeyEffect.DISABLED,
    "ERROR_USER_LOCKED": KeyEffect.DISABLED,
    "ERROR_ILLEGAL_OPERATION": KeyEffect.DISABLED,
}


def key_effect(code: str) -> KeyEffect | None:
    """The effect of an upstream error code on the key that got it (None: not about the key)."""
    return KEY_EFFECTS.get(code)


def credits_balance(body: Any) -> float | None:
    """The credits an answer of the balance endpoint reports for this endpoint, or None.

    ailabapi's docs show ``data`` both as a list of credit entries and as one entry; both
    are read. The balance is the sum over the entries in :data:`CREDIT_SIGNS`; an answer
    with none of them (or an error envelope) says nothing and gives None.
    """
    if not isinstance(body, dict) or error_code_of(body):
        return None
    data = body.get("data")
    entries = data if isinstance(data, list) else [data]
    total: float | None = None
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("unique_sign") not in CREDIT_SIGNS:
            continue
        value = entry.get("balance")
        if isinstance(value, int | float) and not isinstance(value, bool):
            total = (total or 0.0) + float(value)
    return total


#: Numeric ``error_code`` used in envelopes facegate writes itself; ailabapi's numbers are
#: undocumented and its own example shows -1 for an error.
ERROR_NUMBER: Final = -1


def envelope(
    *,
    request_id: str,
    status: int = 200,
    code: str = "",
    message: str = "",
    code_message: str | None = None,
    log_id: str = "",
) -> dict[str, Any]:
    """ailabapi's response envelope, as both shapes of the published examples carry it."""
    if code_message is None:
        row = ERROR_CODES.get(code)
        code_message = row.message if row else ""
    return {
        "request_id": request_id,
        "log_id": log_id,
        "error_code": 0 if not code else ERROR_NUMBER,
        "error_code_str": code,
        "error_msg": message,
        "error_detail": {
            "status_code": status,
            "code": code,
            "code_message": code_message,
            "message": message,
        },
    }


def error_code_of(body: Any) -> str:
    """The stable error identifier of an ailabapi answer ('' when it reports success)."""
    if not isinstance(body, dict):
        return ""
    detail = body.get("error_detail")
    if isinstance(detail, dict) and isinstance(detail.get("code"), str) and detail["code"]:
        return str(detail["code"])
    code_str = body.get("error_code_str")
    if isinstance(code_str, str) and code_str:
        return code_str
    number = body.get("error_code")
    if isinstance(number, int) and not isinstance(number, bool) and number != 0:
        return f"ERROR_CODE_{number}"
    return ""
