"""The operator's credential and the admin routes: who may call them, and the audit trail.

Every route under ``/admin`` (read from the app's own OpenAPI document, so a route added
later is covered without touching this file) answers 401 without a key or with an
unknown one, 403 ``operator_required`` with a valid tenant key — problem+json both — and
serves an operator key. Admin reads leave an audit line that names the operator and holds
no key and no key hash.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from app.tenants import hash_key
from tests.conftest import Gateway


def _admin_operations() -> list[tuple[str, str]]:
    from app.main import create_app

    paths = create_app().openapi()["paths"]
    ops = [(method.upper(), path) for path, item in paths.items() if path.startswith("/admin/") for method in item]
    assert ops, "no admin routes found"
    return sorted(ops)


ADMIN_OPERATIONS = _admin_operations()
_FILL = {"sha256": "ab" * 32, "tenant": "alpha"}


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: _FILL.get(m.group(1), "x"), path)


@pytest.fixture(scope="module")
def admin_gateway(sim_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Sim, start_gateway

    gw = start_gateway(Sim(sim_server), tmp_path_factory.mktemp("admin"))
    try:
        yield gw
    finally:
        gw.server.stop()


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code
    assert body["type"] == f"urn:facegate:problem:{code}"
    assert body["status"] == status


@pytest.mark.parametrize(("method", "path"), ADMIN_OPERATIONS)
def test_admin_routes_refuse_anything_but_an_operator_key(admin_gateway: Gateway, method: str, path: str) -> None:
    gw, url = admin_gateway, admin_gateway.url + _url(path)
    _problem(httpx.request(method, url), 401, "unauthorized")
    _problem(httpx.request(method, url, headers={"Authorization": "Bearer fgop_not-a-key"}), 401, "unauthorized")
    for tenant in ("alpha", "beta"):
        for headers in ({"Authorization": f"Bearer {gw.key(tenant)}"}, {"X-API-Key": gw.key(tenant)}):
            _problem(httpx.request(method, url, headers=headers), 403, "operator_required")
    r = httpx.request(method, url, headers={"X-API-Key": gw.key("operator:ops")})
    assert r.status_code not in (401, 403), r.text


def test_admin_routes_are_documented_with_their_security_scheme() -> None:
    from app.main import create_app

    doc = create_app().openapi()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["operatorKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["operatorKey"]["description"],
    }
    assert schemes["operatorKeyHeader"]["in"] == "header"
    for method, path in ADMIN_OPERATIONS:
        op = doc["paths"][path][method.lower()]
        assert {"operatorKey": []} in op["security"], path
        assert {"401", "403"} <= set(op["responses"]), path


def test_tenants_read_is_audited_without_keys(admin_gateway: Gateway) -> None:
    gw = admin_gateway
    with gw.client("operator:ops") as c:
        r = c.get("/admin/tenants", headers={"X-Request-ID": "audit-tenants-1"})
    assert r.status_code == 200
    body = r.json()
    assert [t["name"] for t in body["tenants"]] == ["alpha", "beta"]
    assert body["operators"] == ["ops"]
    text = r.text
    rid = "audit-tenants-1"
    lines = [a for a in gw.log_lines("facegate.audit") if a["request_id"] == rid]
    assert [(a["action"], a["actor"]) for a in lines] == [("admin.tenants.read", "operator:ops")]
    everything = text + gw.logs()
    for name, key in gw.keys.items():
        assert key not in everything, name
        assert hash_key(key) not in everything, name
    access = [x for x in gw.log_lines("facegate.access", of=[rid]) if x["request_id"] == rid]
    assert access[0]["operator"] == "ops"
    assert access[0]["tenant"] is None
