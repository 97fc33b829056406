"""OpenAPI pieces shared by the routes: problem responses, the upload body, the Problem schema.

Kept apart from the route modules so that none of them imports another.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

PROBLEM_RESPONSE: dict[str, Any] = {
    "description": "An RFC 9457 problem with a stable `code` (see the README's error table).",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route that refuses with these statuses."""
    return {status: PROBLEM_RESPONSE for status in statuses}


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image (JPEG, PNG or BMP, at most 20 MiB, each side 33..4095 px): as the "
        "multipart field `image` (like ailabapi), or as the raw body with `Content-Type: image/*`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/bmp": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "Cache-Control",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`no-store`: do not store the answer. `no-cache` is ignored (a browser reload "
            "must not pay again): use X-Facegate-Force.",
        },
        {
            "name": "X-Facegate-Force",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "enum": ["1", "true"]},
            "description": "A fresh, billable analysis even when the image is cached; only for tenants with "
            "`allow_force = true` (else 403 `force_not_allowed`). Counted as `forced` in usage and history.",
        },
        {
            "name": "Content-Digest",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "example": "sha-256=:<base64 of the 32-byte SHA-256>:"},
            "description": "RFC 9530, for a raw image body: an image analyzed before is answered from the "
            "headers, without reading the body (with `Expect: 100-continue` it is never sent); otherwise the "
            "body must match it (400 `digest_mismatch`). Malformed: 400 `invalid_digest`. Ignored on multipart.",
        },
        {
            "name": "Image-Digest",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "example": "sha-256=:<base64 of the 32-byte SHA-256>:"},
            "description": "The same for the multipart `image` part (or a raw body): `sha-256=:<base64>:`.",
        },
    ],
}


def register_problem_schema(app: FastAPI) -> None:
    """Add the Problem schema to the OpenAPI components (referenced by every error response)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code", "request_id"],
            "properties": {
                "type": {"type": "string", "description": "urn:facegate:problem:<code>"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string", "description": "Stable error code (README, 'Errors')."},
                "request_id": {"type": "string"},
                "retry_after": {"type": "integer", "description": "Seconds, as in the Retry-After header."},
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
