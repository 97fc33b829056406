"""Every way the upstream can fail maps to its documented problem, fast, with the quota refunded."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sim, unique_image

FAULTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("bad key", {"mode": "bad_key"}, 502, "upstream_auth"),
    ("out of credits", {"mode": "no_credits"}, 503, "upstream_credits"),
    ("500 processing failure", {"mode": "status", "status": 500, "code": "PROCESSING_FAILURE"}, 502, "upstream_error"),
    ("502 ai service error", {"mode": "status", "status": 502, "code": "AI_SERVICE_ERROR"}, 502, "upstream_error"),
    (
        "503 flow restriction",
        {"mode": "status", "status": 503, "code": "AI_SERVICE_FLOW_RESTRICTION"},
        503,
        "upstream_unavailable",
    ),
    ("504 ai timeout", {"mode": "status", "status": 504, "code": "AI_SERVICE_TIMEOUT"}, 504, "upstream_timeout"),
    (
        "429 with retry-after",
        {"mode": "status", "status": 429, "code": "EXCEEDING_LIMITS", "retry_after": 7},
        503,
        "upstream_unavailable",
    ),
    ("400 parameter error", {"mode": "status", "status": 400, "code": "ERROR_PARAMETERS"}, 502, "upstream_error"),
    ("malformed json", {"mode": "malformed"}, 502, "upstream_error"),
    ("json missing its fields", {"mode": "missing_field"}, 502, "upstream_error"),
    ("connection dropped mid-answer", {"mode": "drop"}, 502, "upstream_error"),
    ("slower than the deadline", {"mode": "hang", "seconds": 30}, 504, "upstream_timeout"),
    ("redirect elsewhere", {"mode": "redirect", "location": "http://127.0.0.2:9/steal"}, 502, "upstream_error"),
]


@pytest.fixture
def strict_gateway(gateway_factory: Any) -> Gateway:
    """No retries and a breaker that never opens: each fault is seen exactly once."""
    gw: Gateway = gateway_factory(
        env={"FACEGATE_UPSTREAM_RETRIES": "0", "FACEGATE_UPSTREAM_TIMEOUT_S": "2", "FACEGATE_BREAKER_FAILURES": "1000"}
    )
    return gw


@pytest.mark.parametrize(("name", "fault", "status", "code"), FAULTS, ids=[f[0] for f in FAULTS])
def test_upstream_fault_maps_to_problem(
    strict_gateway: Gateway, sim: Sim, name: str, fault: dict[str, Any], status: int, code: str
) -> None:
    sim.faults({**fault, "count": 1})
    started = time.monotonic()
    response = strict_gateway.analyze(unique_image())
    elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert "Traceback" not in response.text and "127.0.0.1" not in response.text
    assert elapsed < 5  # the 2 s deadline holds even against a hanging upstream
    if code in ("upstream_unavailable",) and "retry_after" in fault:
        assert int(response.headers["retry-after"]) >= 7
    with strict_gateway.client() as c:
        usage = c.get("/v1/usage").json()
    # Refunded unless ailabapi billed it: an unusable answer that reported success was billed.
    billed = 1 if fault["mode"] == "missing_field" else 0
    assert usage["quotas"]["daily"]["used"] == billed, "a failed call the upstream did not bill is refunded"
    assert usage["credits_spent"]["day"] == billed
    assert sim.calls == 1
    # The next call (no fault) succeeds: nothing was cached from the failure.
    again = strict_gateway.analyze(unique_image())
    assert again.status_code == 200


def test_image_rejected_by_upstream_is_a_cached_422(strict_gateway: Gateway, sim: Sim) -> None:
    image = unique_image(sim="error=ERROR_BLURRY_FACE")
    first = strict_gateway.analyze(image)
    assert first.status_code == 422
    assert first.json()["code"] == "upstream_rejected_image"
    assert "ERROR_BLURRY_FACE" in first.json()["detail"]
    second = strict_gateway.analyze(image)
    assert second.status_code == 422
    assert second.headers["cache-status"].startswith("facegate; hit")
    assert sim.calls == 1  # a verdict on the image is deterministic: cached, never re-bought


def test_upstream_key_is_never_sent_to_a_redirect_target(strict_gateway: Gateway, sim: Sim) -> None:
    """The redirect points back at the simulator: had it been followed, the sim would count 2 calls."""
    sim.faults({"mode": "redirect", "location": sim.url + "/api/portrait/analysis/face-analyzer-advanced", "count": 1})
    response = strict_gateway.analyze(unique_image())
    assert response.status_code == 502
    assert sim.calls == 1


def test_unreachable_upstream_is_503(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(
        sim=None,
        env={
            "FACEGATE_UPSTREAM_URL": "http://127.0.0.1:9",
            "FACEGATE_UPSTREAM_API_KEY": "k",
            "FACEGATE_UPSTREAM_RETRIES": "0",
        },
    )
    response = gw.analyze(unique_image())
    assert response.status_code == 503
    assert response.json()["code"] == "upstream_unavailable"
    assert httpx.get(gw.url + "/readyz").status_code == 200  # readiness ignores the upstream on purpose
