"""How facegate's OpenAPI document is written: the one place for its conventions.

Generated clients (openapi-python-client, openapi-typescript, …) read this document, so it
is written as documentation and kept exact. A route states what only it knows; everything
that follows from its surroundings is added here, by :func:`install`, when the document
is built:

- **operationId**: the route function's name in lowerCamelCase (``get_analysis`` →
  ``getAnalysis``; :func:`operation_id`, FastAPI's ``generate_unique_id_function``). Name
  route functions *verb_noun*; a rename is a breaking change for generated clients.
- **tags**: exactly one :class:`Tag` per route (``APIRouter(tags=[Tag.FACES])``).
- **summary and description**: ``summary=`` on the decorator, the docstring as description.
- **2xx**: a pydantic ``response_model`` for JSON answers (a route that returns a
  pre-rendered ``Response`` for speed still declares the model it renders).
- **problems**: the route lists the problem codes its own body can raise,
  ``responses=problems("rate_limited", "not_found")``. Added here: the codes its
  dependencies refuse with (:func:`refuses`, e.g. ``authenticate`` → ``unauthorized``),
  ``invalid_request`` when FastAPI validates parameters, and ``internal_error`` /
  ``overloaded`` (shutdown) from the edge. Each status then gets problem+json (ailabapi's
  envelope on the drop-in route), its codes listed with an example each, ``Retry-After`` /
  ``WWW-Authenticate`` / ``X-Facegate-Error`` where they are sent. FastAPI's default 422
  "Validation Error" is removed: facegate answers invalid parameters with 400.
- **every operation**: the ``X-Request-ID`` request and response header, the security
  schemes of its authentication dependency, ``RateLimit`` headers where it is rate limited.

``tests/unit/test_openapi.py`` fails when an operation misses any of this.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import Annotated, Any, Final, TypeVar

from fastapi import FastAPI, Path
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from app import errors
from app.api.responses import is_compat_path
from app.errors import CATALOGUE, PROBLEM_TYPE_PREFIX
from app.upstream import contract

REF: Final = "#/components/schemas/"
PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
#: What the README says about a request id; the same text wherever it is documented.
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
_EXAMPLE_REQUEST_ID: Final = "5af08543f4ce412cbaa31835ae217e32"


DESCRIPTION: Final = """\
Send an image, get its faces analyzed in one versioned JSON schema; pay ailabapi at most once per image.

- **Keys**: every call but the operations routes needs a tenant key, as `Authorization: Bearer <key>` or
  `X-API-Key` (`ailabapi-api-key` on the drop-in route). Keys in the URL are refused.
- **Cost**: an image already analyzed is answered from the cache (free); otherwise one billable ailabapi
  call, counted against the tenant's daily and monthly quotas. Refusals cost nothing.
- **Errors**: RFC 9457 `application/problem+json` with a stable `code` (ailabapi's envelope on the
  drop-in route). Each operation lists the codes each of its statuses can carry.
- **Headers**: `X-Request-ID` on every answer; `RateLimit-Policy`/`RateLimit` where rate limited;
  `Cache-Status` on analyses; `Retry-After` on 429 and some 503.
"""


class Tag(StrEnum):
    """The groups of operations (a generated client's modules). One per route."""

    FACES = "faces"
    USAGE = "usage"
    SCHEMA = "schema"
    AILABAPI = "ailabapi-compatible"
    OPERATIONS = "operations"
    ADMIN = "admin"


TAGS: Final[list[dict[str, str]]] = [
    {
        "name": Tag.FACES,
        "description": "Analyze the faces in an image, or read an analysis again by the image's SHA-256. "
        'Answers follow schema v1 (`schema_version: "1"`).',
    },
    {"name": Tag.USAGE, "description": "The calling tenant's limits, quotas, credits spent and cache hits."},
    {"name": Tag.SCHEMA, "description": "The published JSON Schema of the v1 analysis."},
    {
        "name": Tag.AILABAPI,
        "description": "ailabapi's own protocol for code that cannot change: same path, header, form field and "
        "JSON; facegate's refusals in ailabapi's envelope, with the facegate code in `X-Facegate-Error`.",
    },
    {
        "name": Tag.ADMIN,
        "description": "For operator keys (`fgop_…`) only: tenants, purges, any tenant's usage. Audited.",
    },
    {
        "name": Tag.OPERATIONS,
        "description": "Liveness, readiness and Prometheus metrics, for the platform (no key needed).",
    },
]


# --- operationId ---------------------------------------------------------------------------

_WORD = re.compile(r"_+([a-z0-9])")


def operation_id(route: APIRoute) -> str:
    """The route function's name in lowerCamelCase: ``get_analysis`` → ``getAnalysis``."""
    return _WORD.sub(lambda m: m.group(1).upper(), route.name.strip("_"))


# --- models every error response refers to -------------------------------------------------


def _no_default(schema: dict[str, Any]) -> None:
    """An optional field that is absent, never null: no ``default: null`` in the schema."""
    schema.pop("default", None)


class Problem(BaseModel):
    """An RFC 9457 problem: every refusal on `/v1` and the operations routes.

    Branch on `code` (stable; the README's error table lists every code with its status);
    show `detail` to people; quote `request_id` when asking the operator.
    """

    type: str = Field(
        description=f"`{PROBLEM_TYPE_PREFIX}<code>`.",
        pattern=rf"^{re.escape(PROBLEM_TYPE_PREFIX)}[a-z_]+$",
    )
    title: str = Field(description="A short, stable summary of the problem type.")
    status: int = Field(description="The HTTP status, as on the response.", ge=400, le=599)
    detail: str = Field(description="What went wrong with this request, for people.")
    code: str = Field(
        description="The stable error code (one of: " + ", ".join(f"`{c}`" for c in CATALOGUE) + "). "
        "New codes may be added: treat an unknown one by its status.",
        pattern=r"^[a-z_]+$",
    )
    request_id: str = Field(description="facegate's request id (also the X-Request-ID header).")
    retry_after: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        None,
        description="Seconds to wait before retrying, as in the Retry-After header (429, some 503); "
        "absent when there is nothing to wait for.",
        json_schema_extra=_no_default,
    )


class AilabapiErrorDetail(BaseModel):
    """ailabapi's `error_detail`: `code` is the stable identifier."""

    model_config = ConfigDict(extra="allow")

    status_code: int | None = Field(None, description="The HTTP status.")
    code: str = Field(description="ailabapi's error code, e.g. `ERROR_NO_FACE_IN_FILE` (README: error table).")
    code_message: str | None = Field(None, description="ailabapi's text for the code.")
    message: str | None = Field(None, description="What went wrong.")


class AilabapiError(BaseModel):
    """An error in ailabapi's envelope: ailabapi's own (replayed byte for byte), or facegate's
    refusal in that envelope (then `X-Facegate-Error` carries facegate's problem code)."""

    model_config = ConfigDict(extra="allow")

    request_id: str = Field(description="The request id (facegate's, or ailabapi's on a replayed answer).")
    log_id: str | None = Field(None, description="ailabapi's log id; empty on facegate's refusals.")
    error_code: int | None = Field(None, description="Non-zero; its values are undocumented by ailabapi.")
    error_code_str: str | None = Field(None, description="The same code as `error_detail.code`.")
    error_msg: str | None = Field(None, description="What went wrong.")
    error_detail: AilabapiErrorDetail = Field(description="The stable error code and its messages.")


#: Models added to ``components.schemas`` besides those FastAPI finds on the routes.
COMPONENT_MODELS: Final[tuple[type[BaseModel], ...]] = (Problem, AilabapiError)


# --- problems: what routes and dependencies declare ----------------------------------------

_CODES_KEY: Final = "x-problem-codes"


def problems(*codes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route whose own body refuses with these problem codes.

    Only the codes the route itself raises: :func:`install` adds its dependencies',
    parameter validation's and the edge's, and writes out each status.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        if code not in CATALOGUE:
            raise ValueError(f"unknown problem code {code!r} (app/errors.py CATALOGUE)")
        out.setdefault(CATALOGUE[code].status, {_CODES_KEY: []})[_CODES_KEY].append(code)
    return out


@dataclass(frozen=True, slots=True)
class Refusals:
    """What a dependency can refuse with, and the security schemes it accepts (any one of)."""

    codes: tuple[str, ...]
    security: tuple[str, ...] = ()
    rate_limited: bool = False


_DEPENDENCIES: dict[Callable[..., Any], Refusals] = {}
F = TypeVar("F", bound=Callable[..., Any])


def refuses(*codes: str, security: tuple[str, ...] = (), rate_limited: bool = False) -> Callable[[F], F]:
    """Mark a dependency: every route that depends on it can refuse with these codes.

    ``security`` names the schemes (``SECURITY_SCHEMES``) it authenticates with;
    ``rate_limited`` says its routes carry ``RateLimit`` headers.
    """
    unknown = [c for c in codes if c not in CATALOGUE]
    if unknown:
        raise ValueError(f"unknown problem code(s) {unknown} (app/errors.py CATALOGUE)")

    def mark(fn: F) -> F:
        _DEPENDENCIES[fn] = Refusals(codes, security, rate_limited)
        return fn

    return mark


#: Sent by the edge for any route: a bug (500), or the request outlived the shutdown grace (503).
EDGE_CODES: Final = ("internal_error", "overloaded")

#: A path parameter holding an image's SHA-256, as the server checks it.
Sha256Path = Annotated[
    str,
    Path(
        description="SHA-256 of the image bytes: 64 lowercase hex characters (`image.sha256` of an analysis, "
        "or `sha256sum photo.jpg`).",
        pattern=SHA256_PATTERN,
        examples=["def5" * 16],
    ),
]

SECURITY_SCHEMES: Final[dict[str, dict[str, Any]]] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The tenant key (`fg_…`) as `Authorization: Bearer <key>`.",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The tenant key in `X-API-Key`.",
    },
    "ailabapiKey": {
        "type": "apiKey",
        "in": "header",
        "name": contract.KEY_HEADER,
        "description": "The tenant key where ailabapi's client code puts ailabapi's key.",
    },
}


# --- reusable request pieces ---------------------------------------------------------------


def image_upload_body(max_bytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request body of both analyze routes (components.requestBodies.ImageUpload) and its
    multipart form (components.schemas.ImageForm), for this server's size limit."""
    image = {"type": "string", "format": "binary", "minLength": 1, "maxLength": max_bytes}
    rule = (
        f"JPEG, PNG or BMP (recognized from the bytes), 1 to {max_bytes} bytes, each side more than "
        f"{contract.MIN_SIDE_EXCLUSIVE} and less than {contract.MAX_SIDE_EXCLUSIVE} pixels, not grayscale"
    )
    form = {
        "type": "object",
        "title": "ImageForm",
        "description": f"ailabapi's form: one field `{contract.IMAGE_FIELD}` (other fields are ignored).",
        "required": [contract.IMAGE_FIELD],
        "properties": {contract.IMAGE_FIELD: {**image, "description": f"The image file: {rule}."}},
    }
    body = {
        "required": True,
        "description": f"The image: {rule}. Send it as the multipart field `{contract.IMAGE_FIELD}` (like "
        "ailabapi), or as the raw body with its own `Content-Type` (`image/jpeg`, `image/png`, `image/bmp` "
        "or `application/octet-stream`). Whether the bytes are such an image can only be told by reading them: "
        "other bytes are refused with 415 (`unsupported_media_type`) or 422 (`invalid_image`, "
        "`image_dimensions`), free of charge; more bytes with 413 (`image_too_large`) before they are all read.",
        "content": {
            "multipart/form-data": {"schema": {"$ref": REF + "ImageForm"}},
            "application/octet-stream": {"schema": image},
            "image/jpeg": {"schema": image},
            "image/png": {"schema": image},
            "image/bmp": {"schema": image},
        },
    }
    return body, form


#: The request body of the analyze routes: ``openapi_extra=IMAGE_UPLOAD``.
IMAGE_UPLOAD: Final[dict[str, Any]] = {"requestBody": {"$ref": "#/components/requestBodies/ImageUpload"}}


#: An RFC 8941 dictionary whose members are byte sequences (with parameters), one of them
#: ``sha-256`` with 32 bytes (44 base64 characters): what ``app.intake.digest`` accepts in
#: ``Image-Digest``, stated a little more loosely (base64 padding, a repeated key and the exact
#: grammar of parameter values are checked by the server only).
_DIGEST_PARAMS = r"(?:;[a-z*][a-z0-9_.*-]*(?:=[!-+\--:<-~]*)?)*"
_DIGEST_MEMBER = rf"[a-z*][a-z0-9_.*-]*=:[A-Za-z0-9+/=]*:{_DIGEST_PARAMS}"
_DIGEST_WITH_SHA256 = (
    rf"^(?:{_DIGEST_MEMBER}, *)*sha-256=:[A-Za-z0-9+/=]{{44}}:{_DIGEST_PARAMS}(?:, *{_DIGEST_MEMBER})*$"
)


def _header_parameter(name: str, description: str, **schema: Any) -> dict[str, Any]:
    # The description twice: generators read it from the parameter, others from its schema.
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", "description": description, **schema},
    }


PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    "XRequestId": _header_parameter(
        "X-Request-ID",
        "Your id for this request, echoed in the answer, its body and facegate's log line when it is 1 to 128 "
        "of `A-Z a-z 0-9 - _ . :`; anything else is replaced by a generated id (never refused).",
    ),
    "CacheControl": _header_parameter(
        "Cache-Control",
        "`no-store`: do not store the answer. Other directives are ignored, `no-cache` too (a browser reload "
        "must not pay again): use X-Facegate-Force.",
        examples=["no-store"],
    ),
    "ImageDigest": _header_parameter(
        "Image-Digest",
        "The image's SHA-256 as an RFC 9530 digest, `sha-256=:<base64 of the 32 bytes>:`: a cached image is "
        "answered from the headers alone (send `Expect: 100-continue` and the body is never sent); otherwise "
        "the body must have that digest (400 `digest_mismatch`). Every member must be a byte sequence and "
        "`sha-256` must be there (400 `invalid_digest`). Works on multipart and raw bodies.",
        pattern=_DIGEST_WITH_SHA256,
        examples=["sha-256=:" + base64.b64encode(bytes.fromhex("def5" * 16)).decode() + ":"],
    ),
    "ContentDigest": _header_parameter(
        "Content-Digest",
        "RFC 9530, on a raw body only (the body is the image): `sha-256=:<base64>:` works as `Image-Digest` "
        "(400 `invalid_digest` when malformed, `digest_mismatch` when it is not the body's); members for other "
        "algorithms are ignored. On a multipart body it describes the whole form and is ignored.",
        examples=["sha-256=:" + base64.b64encode(bytes.fromhex("def5" * 16)).decode() + ":"],
    ),
    "XFacegateForce": _header_parameter(
        "X-Facegate-Force",
        "`1` (or `true`, `yes`): a fresh, billable analysis even when the image is cached; only for tenants with "
        "`allow_force = true` (else 403 `force_not_allowed`). Counted as `forced` in usage and history.",
        examples=["1"],
    ),
}
#: ``openapi_extra`` of the analyze routes: the image body and the cache directives.
ANALYZE_EXTRA: Final[dict[str, Any]] = {
    **IMAGE_UPLOAD,
    "parameters": [
        {"$ref": "#/components/parameters/CacheControl"},
        {"$ref": "#/components/parameters/XFacegateForce"},
        {"$ref": "#/components/parameters/ImageDigest"},
        {"$ref": "#/components/parameters/ContentDigest"},
    ],
}


# --- response headers ----------------------------------------------------------------------

#: Response headers, as ``components.headers`` (name → (header, definition)).
HEADERS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "XRequestId": (
        "X-Request-ID",
        {
            "description": "The request id (yours when sane, else generated); also in every body and log line.",
            "required": True,
            "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
        },
    ),
    "CacheStatus": (
        "Cache-Status",
        {
            "description": "RFC 9211: `facegate; hit; ttl=3600`, `facegate; fwd=uri-miss; stored`, `facegate; "
            "fwd=request; stored` (no-cache), `…; collapsed` (answered by an identical request in flight).",
            "required": True,
            "schema": {"type": "string", "pattern": "^facegate(; .+)?$"},
        },
    ),
    "RateLimitPolicy": (
        "RateLimit-Policy",
        {
            "description": 'IETF ratelimit-headers draft: `"burst";q=20;w=2, "daily";q=1000;w=86400, …` '
            "(absent when the limits could not be read).",
            "schema": {"type": "string"},
        },
    ),
    "RateLimit": (
        "RateLimit",
        {
            "description": 'Remaining `r` and effective window `t` (seconds) per policy: `"burst";r=19;t=1, …`.',
            "schema": {"type": "string"},
        },
    ),
    "RetryAfter": (
        "Retry-After",
        {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        },
    ),
    "RetryAfterWhenKnown": (
        "Retry-After",
        {
            "description": "Seconds to wait before retrying, when facegate knows.",
            "schema": {"type": "integer", "minimum": 1},
        },
    ),
    "WWWAuthenticate": (
        "WWW-Authenticate",
        {
            "description": 'How to authenticate: `Bearer realm="facegate"`.',
            "required": True,
            "schema": {"type": "string"},
        },
    ),
    "XFacegateError": (
        "X-Facegate-Error",
        {
            "description": "facegate's problem code when facegate refused the request (absent on ailabapi's own "
            "answers, which are replayed as they came).",
            "schema": {"type": "string", "pattern": r"^[a-z_]+$"},
        },
    ),
}


def header(component: str) -> dict[str, dict[str, str]]:
    """``{header name: $ref}`` for a response's ``headers``: ``{"headers": header("CacheStatus")}``."""
    name, _ = HEADERS[component]
    return {name: {"$ref": f"#/components/headers/{component}"}}


# --- install -------------------------------------------------------------------------------


def install(app: FastAPI, *, max_image_bytes: int) -> None:
    """Make ``app.openapi()`` write out the conventions above (called once by the factory)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = original()
        components = doc.setdefault("components", {})
        _add_models(components.setdefault("schemas", {}))
        body, form = image_upload_body(max_image_bytes)
        components["schemas"]["ImageForm"] = form
        components["requestBodies"] = {"ImageUpload": body}
        components["parameters"] = PARAMETERS
        components["headers"] = {component: definition for component, (_, definition) in HEADERS.items()}
        components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        for route, method, operation in _operations(app, doc):
            _complete(route, method, operation)
        _drop_unused_validation_schemas(doc)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _add_models(schemas: dict[str, Any]) -> None:
    _, top = models_json_schema([(model, "serialization") for model in COMPONENT_MODELS], ref_template=REF + "{model}")
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)


def api_routes(app: FastAPI) -> Iterator[Any]:
    """Every API route as the app serves it (prefix, tags and dependencies of its router applied).

    FastAPI keeps included routers as they are; :func:`fastapi.routing.iter_route_contexts`
    gives each route with its effective settings (the attributes of an :class:`APIRoute`).
    """
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute) and context.include_in_schema:
            yield context


def _operations(app: FastAPI, doc: dict[str, Any]) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    for route in api_routes(app):
        for method in sorted(route.methods):
            operation = doc["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                yield route, method, operation


def _dependency_calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependency_calls(sub)


def route_codes(route: Any) -> tuple[list[str], Refusals]:
    """Every problem code a route can answer with, and what its dependencies bring."""
    codes: list[str] = []
    for response in route.responses.values():
        codes.extend(response.get(_CODES_KEY, ()))
    security: tuple[str, ...] = ()
    rate_limited = "rate_limited" in codes
    for call in _dependency_calls(route.dependant):
        refusals = _DEPENDENCIES.get(call)
        if refusals is not None:
            codes.extend(refusals.codes)
            security += refusals.security
            rate_limited = rate_limited or refusals.rate_limited
    if get_flat_params(route.dependant) or route.body_field is not None:
        codes.append("invalid_request")
    codes.extend(EDGE_CODES)
    return sorted(set(codes)), Refusals((), tuple(dict.fromkeys(security)), rate_limited)


def _statuses(codes: list[str], *, envelope: bool) -> dict[int, list[str]]:
    """Status → codes; on the drop-in route, with ailabapi's statuses and replayed verdicts."""
    out: dict[int, list[str]] = {}
    for code in codes:
        spec = CATALOGUE[code]
        if envelope and code == "upstream_rejected_image":
            # ailabapi's own verdict on the image, replayed with ailabapi's status.
            for status in sorted({row.status for row in contract.ERROR_CODES.values() if row.cacheable}):
                out.setdefault(status, []).append(code)
            continue
        out.setdefault(spec.compat_status if envelope else spec.status, []).append(code)
    return out


def _complete(route: Any, method: str, operation: dict[str, Any]) -> None:
    envelope = is_compat_path(route.path_format)
    codes, found = route_codes(route)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for key in [k for k, r in responses.items() if _is_fastapi_validation(r)]:
        del responses[key]
    for key in [k for k, r in responses.items() if _CODES_KEY in r]:
        # The route's own codes are in ``codes`` now; its markers were keyed by the v1 status.
        del responses[key][_CODES_KEY]
        if set(responses[key]) <= {"description"}:
            del responses[key]
    for status, status_codes in sorted(_statuses(codes, envelope=envelope).items()):
        _write_problem(responses.setdefault(str(status), {}), status, status_codes, envelope=envelope)
    for key, response in responses.items():
        headers = response.setdefault("headers", {})
        headers.update(header("XRequestId"))
        if found.rate_limited and key != "401":
            headers.update(header("RateLimitPolicy") | header("RateLimit"))
    operation["responses"] = dict(sorted(responses.items()))
    operation["parameters"] = [*operation.get("parameters", []), {"$ref": "#/components/parameters/XRequestId"}]
    if found.security:
        operation["security"] = [{scheme: []} for scheme in found.security]


def _write_problem(response: dict[str, Any], status: int, codes: list[str], *, envelope: bool) -> None:
    lines = "\n".join(f"- `{code}`: {CATALOGUE[code].title}." for code in codes)
    if envelope:
        media, schema = "application/json", {"$ref": REF + "AilabapiError"}
        examples = {
            code: {"summary": CATALOGUE[code].title, "value": _envelope_example(code, status)} for code in codes
        }
        what = "ailabapi's envelope for facegate's problem code (in `X-Facegate-Error`)"
    else:
        media, schema = PROBLEM_MEDIA_TYPE, {"$ref": REF + "Problem"}
        examples = {code: {"summary": CATALOGUE[code].title, "value": _problem_example(code)} for code in codes}
        what = "a problem with the code"
    phrase = HTTPStatus(status).phrase
    own = response.get("description")
    lead = f"{own}\n\nOr {what}:" if own and own != phrase else f"{phrase}: {what}:"
    response["description"] = f"{lead}\n\n{lines}"
    response.setdefault("content", {})[media] = {"schema": schema, "examples": examples}
    headers = response.setdefault("headers", {})
    if status == 401:
        headers.update(header("WWWAuthenticate"))
    if status == 429:
        headers.update(header("RetryAfter"))
    elif status == 503:
        headers.update(header("RetryAfterWhenKnown"))
    if envelope:
        headers.update(header("XFacegateError"))


def _problem_example(code: str) -> dict[str, Any]:
    retry = 1 if CATALOGUE[code].status == 429 else None
    return errors.Problem(code, retry_after=retry).to_problem_json(_EXAMPLE_REQUEST_ID)


def _envelope_example(code: str, status: int) -> dict[str, Any]:
    if code == "upstream_rejected_image":  # ailabapi's own verdict: one of its codes with this status
        row = next(r for r in contract.ERROR_CODES.values() if r.cacheable and r.status == status)
        return contract.envelope(request_id=_EXAMPLE_REQUEST_ID, status=status, code=row.code, message=row.message)
    return errors.Problem(code).to_envelope(_EXAMPLE_REQUEST_ID)[1]


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    """FastAPI's automatic 422 "Validation Error": facegate answers invalid parameters with 400."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == REF + "HTTPValidationError")


def _drop_unused_validation_schemas(doc: dict[str, Any]) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    if "HTTPValidationError" in schemas and REF + "HTTPValidationError" not in str(doc["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
