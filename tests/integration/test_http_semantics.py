"""HTTP semantics on every documented route, over real sockets: a method the route does not
serve is 405 with an ``Allow`` naming exactly the methods it does (RFC 9110 15.5.6), in
the route's own error rendering; HEAD answers wherever GET does, with GET's status and
headers and no body (RFC 9110 9.3.2)."""

from __future__ import annotations

from typing import Any

import pytest

from app.upstream import contract
from tests.conftest import Gateway

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def _document() -> dict[str, Any]:
    from app.main import create_app

    return create_app().openapi()


DOCUMENT = _document()
PATHS = {path: sorted(method.upper() for method in ops) for path, ops in DOCUMENT["paths"].items()}


def _concrete(path: str) -> str:
    return path.replace("{sha256}", "0" * 64)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_undeclared_methods_are_405_with_allow(gateway: Gateway, path: str) -> None:
    served = PATHS[path]
    allow = sorted({*served, "HEAD"} if "GET" in served else set(served))
    with gateway.client() as client:
        for method in METHODS:
            if method in served:
                continue
            response = client.request(method, _concrete(path))
            assert response.status_code == 405, (method, path, response.text)
            assert sorted(response.headers["Allow"].split(", ")) == allow, (method, path)
            if path == contract.ANALYZE_PATH:
                assert response.headers["X-Facegate-Error"] == "method_not_allowed"
                assert response.json()["error_detail"]["code"] == "ERROR_AI_NOT_EXISTS"
            else:
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", sorted(p for p, methods in PATHS.items() if "GET" in methods))
def test_head_is_get_without_the_body(gateway: Gateway, path: str) -> None:
    with gateway.client() as client:
        get = client.get(_concrete(path))
        head = client.head(_concrete(path))
    assert head.status_code == get.status_code
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the exposition grows between the two requests
        assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["x-request-id"] != get.headers["x-request-id"]


def test_head_on_a_post_only_route_is_405(gateway: Gateway) -> None:
    with gateway.client() as client:
        response = client.head("/v1/faces/analyze")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.content == b""
