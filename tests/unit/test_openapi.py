"""The OpenAPI document follows facegate's conventions (app/api/openapi.py), for every operation.

``violations`` is the rule book: a readable operationId, one declared tag, a summary and a
description, a typed 2xx answer, a typed body on every error status, problem responses for
the statuses every route can answer (500 from the edge; 400/401 where a key is needed; 400
where parameters are validated), X-Request-ID everywhere. It is run on the app's document
and on a planted offending route, to prove it bites. Routes added later are checked without
anyone listing them here.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import jsonschema_rs
import pytest
from fastapi import FastAPI

from app import errors
from app.api import openapi
from app.main import create_app
from app.settings import Settings

OPERATION_ID = re.compile(r"^[a-z]+(?:[A-Z0-9][a-z0-9]*)*$")
JSON_MEDIA = re.compile(r"^application/(?:[\w.-]+\+)?json$")
#: Published operationIds: generated clients name their functions after them, so none may
#: disappear or move. New operations need not be listed (they are checked all the same).
PUBLISHED = {
    "analyzeFaces": ("post", "/v1/faces/analyze"),
    "getAnalysis": ("get", "/v1/faces/analyses/{sha256}"),
    "getUsage": ("get", "/v1/usage"),
    "getSchema": ("get", "/v1/schema"),
    "analyzeFacesAilabapi": ("post", "/api/portrait/analysis/face-analyzer-advanced"),
    "getHealth": ("get", "/healthz"),
    "getReadiness": ("get", "/readyz"),
    "getMetrics": ("get", "/metrics"),
}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, methods in doc["paths"].items() for method, op in methods.items()]


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def _is_named_model(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    ref = schema.get("$ref", "")
    return ref.startswith(openapi.REF) and _resolve(doc, schema).get("type") == "object"


def violations(doc: dict[str, Any]) -> list[str]:
    """Every way the document breaks the conventions, one line each."""
    out: list[str] = []
    tags = {tag["name"] for tag in doc.get("tags", []) if tag.get("description")}
    ids = Counter(op.get("operationId") for _, _, op in operations(doc))
    for method, path, op in operations(doc):
        where = f"{method.upper()} {path}"
        oid = op.get("operationId")
        if not oid or not OPERATION_ID.match(oid):
            out.append(f"{where}: operationId {oid!r} is not lowerCamelCase (name the route function verb_noun)")
        elif ids[oid] > 1:
            out.append(f"{where}: operationId {oid!r} is not unique")
        if len(op.get("tags", [])) != 1 or op["tags"][0] not in tags:
            out.append(f"{where}: needs exactly one tag from openapi.Tag (got {op.get('tags')})")
        if not op.get("summary") or not op.get("description"):
            out.append(f"{where}: needs a summary= and a docstring")
        responses: dict[str, Any] = op.get("responses", {})
        if not any(status.startswith("2") for status in responses):
            out.append(f"{where}: no 2xx response")
        for status, declared in responses.items():
            response = _resolve(doc, declared)
            content = response.get("content", {})
            if status.startswith("2") and not content and status != "204":
                out.append(f"{where}: {status} has no body schema (response_model=...)")
            for media, body in content.items():
                if JSON_MEDIA.match(media) and not _is_named_model(doc, body.get("schema", {})):
                    out.append(f"{where}: {status} {media} is not a named model (response_model=...)")
            if status[0] in "45":
                refs = {body.get("schema", {}).get("$ref") for body in content.values()}
                if not refs & {openapi.REF + "Problem", openapi.REF + "AilabapiError"}:
                    out.append(f"{where}: {status} is not declared as a problem (responses=problems(...))")
            if "X-Request-ID" not in response.get("headers", {}):
                out.append(f"{where}: {status} does not declare the X-Request-ID header")
        required = {"500"}
        if op.get("security"):
            required |= {"400", "401"}
        if any(p.get("in") in ("path", "query") for p in op.get("parameters", [])) or "requestBody" in op:
            required.add("400")
        for status in sorted(required - set(responses)):
            out.append(f"{where}: the {status} it can answer is not declared")
    return out


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return create_app().openapi()


def test_every_operation_follows_the_conventions(doc: dict[str, Any]) -> None:
    assert violations(doc) == []


def test_the_rules_catch_a_route_that_ignores_them() -> None:
    app = create_app()

    @app.get("/v1/planted", responses={418: {"description": "untyped"}})
    async def planted(sha256: str) -> dict[str, str]:
        return {}

    @app.get("/v1/Planted2", tags=["nowhere"], response_model=None, summary="s")
    async def Planted_Two() -> None:
        """Doc."""

    found = "\n".join(violations(app.openapi()))
    assert "GET /v1/planted: needs exactly one tag" in found
    assert "GET /v1/planted: needs a summary= and a docstring" in found
    assert "GET /v1/planted: 200 application/json is not a named model" in found
    assert "GET /v1/planted: 418 is not declared as a problem" in found
    assert "GET /v1/Planted2: operationId 'Planted_Two' is not lowerCamelCase" in found
    assert "GET /v1/Planted2: needs exactly one tag" in found
    assert "GET /v1/Planted2: 200 application/json is not a named model" in found
    # ... while what the conventions add by themselves is there for the planted routes too.
    planted_op = app.openapi()["paths"]["/v1/planted"]["get"]
    assert {"400", "500", "503"} <= set(planted_op["responses"])
    assert "422" not in planted_op["responses"], "FastAPI's 422 Validation Error must not be documented"


def test_published_operation_ids_stay(doc: dict[str, Any]) -> None:
    found = {op["operationId"]: (method, path) for method, path, op in operations(doc)}
    assert {oid: found.get(oid) for oid in PUBLISHED} == PUBLISHED


def test_every_problem_code_is_documented_somewhere(doc: dict[str, Any]) -> None:
    """Each code of the catalogue is an example of some operation's error response (405 is
    every route's answer to a wrong method, so no operation lists it)."""
    documented = {
        code
        for _, _, op in operations(doc)
        for response in op["responses"].values()
        for body in response.get("content", {}).values()
        for code in body.get("examples", {})
    }
    assert set(errors.CATALOGUE) - {"method_not_allowed"} <= documented


def test_examples_are_valid_against_their_schemas(doc: dict[str, Any]) -> None:
    checked = 0
    for method, path, op in operations(doc):
        for status, response in op["responses"].items():
            for media, body in response.get("content", {}).items():
                if "$ref" not in body.get("schema", {}):
                    continue
                # The document's components beside the $ref: "#/components/..." resolves as in the document.
                validator = jsonschema_rs.Draft202012Validator(
                    {"$ref": body["schema"]["$ref"], "components": doc["components"]}
                )
                for name, example in body.get("examples", {}).items():
                    errs = [e.message for e in validator.iter_errors(example["value"])]
                    assert errs == [], f"{method} {path} {status} {media} example {name}"
                    checked += 1
    assert checked > 50


def test_problem_bodies_match_the_problem_model() -> None:
    for code in errors.CATALOGUE:
        for problem in (errors.Problem(code, "why"), errors.Problem(code, "why", retry_after=2.5)):
            body = problem.to_problem_json("rid")
            model = openapi.Problem.model_validate(body)
            assert model.model_dump(mode="json", exclude_none=True) == body
            envelope = problem.to_envelope("rid")[1]
            assert (
                openapi.AilabapiError.model_validate(envelope).error_detail.code == errors.CATALOGUE[code].compat_code
            )


def test_the_upload_limits_are_the_servers(doc: dict[str, Any]) -> None:
    body = doc["components"]["requestBodies"]["ImageUpload"]
    sizes = {media: c["schema"].get("maxLength") for media, c in body["content"].items() if "$ref" not in c["schema"]}
    form = doc["components"]["schemas"]["ImageForm"]["properties"]["image"]
    assert set(sizes.values()) == {form["maxLength"]} == {Settings().max_image_bytes}
    small = create_app(Settings(max_image_bytes=1000)).openapi()
    assert small["components"]["schemas"]["ImageForm"]["properties"]["image"]["maxLength"] == 1000
    assert "1 to 1000 bytes" in small["components"]["requestBodies"]["ImageUpload"]["description"]


def test_the_hash_parameter_states_the_servers_pattern(doc: dict[str, Any]) -> None:
    [sha] = [p for p in doc["paths"]["/v1/faces/analyses/{sha256}"]["get"]["parameters"] if p.get("name") == "sha256"]
    assert sha["schema"]["pattern"] == openapi.SHA256_PATTERN
    image = doc["components"]["schemas"]["ImageInfo"]["properties"]["sha256"]
    assert image["pattern"] == openapi.SHA256_PATTERN


def test_no_fastapi_validation_error_schema_is_published(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "422" not in doc["paths"]["/v1/usage"]["get"]["responses"]


def test_the_drop_in_route_documents_ailabapis_statuses(doc: dict[str, Any]) -> None:
    responses = doc["paths"]["/api/portrait/analysis/face-analyzer-advanced"]["post"]["responses"]
    assert "image_dimensions" in responses["413"]["content"]["application/json"]["examples"]
    assert "upstream_rejected_image" in responses["422"]["content"]["application/json"]["examples"]
    assert "X-Facegate-Error" in responses["415"]["headers"]
    assert "application/problem+json" not in str(responses)


def test_operation_ids_are_the_function_names_in_camel_case() -> None:
    app = FastAPI(generate_unique_id_function=openapi.operation_id)

    @app.get("/x")
    async def get_thing_by_id() -> None: ...

    assert app.openapi()["paths"]["/x"]["get"]["operationId"] == "getThingById"
