"""Schemathesis against a running gateway's own OpenAPI document.

Every operation gets a bounded, seeded batch of generated requests (with a valid tenant
key, so the checks reach past authentication): no answer may be a 5xx, and every answer
must match what the document promises — status codes, content types, headers and body
schemas (the Problem schema for errors included).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.conftest import Gateway, Sim, start_gateway
from tests.servers import ServerProcess

# Binary bodies: schemathesis knows image/jpeg and image/png as binary, not image/bmp.
schemathesis.serializer.alias("image/bmp", "application/octet-stream")

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_gateway(sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(Sim(sim_server), tmp_path_factory.mktemp("fuzz"))
    try:
        yield gw
    finally:
        gw.server.stop()


def _document() -> dict[str, Any]:
    from app.main import create_app

    return create_app().openapi()


# Loaded from the app itself at collection (schemathesis' lazy fixture loader does not work
# with pytest 9); the first test proves it is the very document the running gateway serves.
DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_served_document_is_the_one_fuzzed(fuzz_gateway: Gateway) -> None:
    assert httpx.get(fuzz_gateway.url + "/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_api_answers_as_documented(case: Any, fuzz_gateway: Gateway, sim: Sim) -> None:
    case.call_and_validate(
        base_url=fuzz_gateway.url,
        headers={"Authorization": f"Bearer {fuzz_gateway.key()}"},
        checks=CHECKS,
        timeout=30,
    )
