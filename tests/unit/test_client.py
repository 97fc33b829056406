"""The client's pure parts: what it imports, how it reads headers and problems, when it retries.

Everything that talks to facegate is in tests/integration/test_client.py, against a real gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from app.client import (
    BadRequest,
    ConnectionFailed,
    FacegateClient,
    FacegateError,
    Forbidden,
    InvalidImage,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    error_from_response,
    parse_ratelimit,
)
from app.errors import CATALOGUE, Problem
from app.httputil import parse_retry_after
from tests.servers import ROOT

SERVER_SIDE = ("fastapi", "starlette", "uvicorn", "redis", "orjson", "PIL", "prometheus_client", "pydantic_settings")


def test_client_imports_without_server_dependencies() -> None:
    """A service that only calls facegate needs httpx + pydantic, not the server's stack."""
    code = "import sys, json, app.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    modules = json.loads(out)
    heavy = [m for m in modules if m.split(".")[0] in SERVER_SIDE]
    assert heavy == []
    ours = {m for m in modules if m == "app" or m.startswith("app.")}
    assert ours == {"app", "app.client", "app.httputil", "app.schema", "app.schema.v1", "app.schema.labels"}


def _problem_response(code: str, *, retry_after: float | None = None, request_id: str = "rid-1") -> httpx.Response:
    """What the gateway's edge renders for ``Problem(code)`` (the same code path, not a copy)."""
    problem = Problem(code, "because", retry_after=retry_after)
    return httpx.Response(
        problem.status,
        headers={"content-type": "application/problem+json", **problem.response_headers()},
        json=problem.to_problem_json(request_id),
    )


EXPECTED: dict[str, type[FacegateError]] = {
    "unauthorized": Unauthorized,
    "operator_required": Forbidden,
    "force_not_allowed": Forbidden,
    "cache_unavailable": ServiceUnavailable,
    "credentials_in_query": BadRequest,
    "rate_limited": RateLimited,
    "quota_exceeded": QuotaExceeded,
    "image_missing": InvalidImage,
    "invalid_request": BadRequest,
    "image_too_large": InvalidImage,
    "unsupported_media_type": InvalidImage,
    "invalid_image": InvalidImage,
    "image_dimensions": InvalidImage,
    "upstream_rejected_image": InvalidImage,
    "request_timeout": BadRequest,
    "not_found": NotFound,
    "method_not_allowed": BadRequest,
    "upstream_auth": UpstreamError,
    "upstream_error": UpstreamError,
    "upstream_credits": UpstreamError,
    "upstream_unavailable": UpstreamError,
    "upstream_keys_unavailable": UpstreamError,
    "upstream_share_exceeded": RateLimited,
    "overloaded": ServiceUnavailable,
    "quota_unavailable": ServiceUnavailable,
    "upstream_timeout": UpstreamError,
    "internal_error": ServiceUnavailable,
    "too_many_uploads": RateLimited,
    "invalid_digest": BadRequest,
    "digest_mismatch": BadRequest,
}


def test_every_problem_code_has_an_error_class() -> None:
    assert set(EXPECTED) == set(CATALOGUE), "a new problem code needs a row here and in app.client._BY_CODE"


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_problem_maps_to_typed_error(code: str) -> None:
    error = error_from_response(_problem_response(code, retry_after=3))
    assert type(error) is EXPECTED[code]
    assert error.code == code
    assert error.status == CATALOGUE[code].status
    assert error.title == CATALOGUE[code].title
    assert error.detail == "because"
    assert error.request_id == "rid-1"
    assert error.retry_after == 3
    assert code in str(error)
    assert "rid-1" in str(error)


def test_non_problem_answer_maps_by_status() -> None:
    """A proxy in front of facegate may answer with HTML; the status still decides the class."""
    html = httpx.Response(502, headers={"content-type": "text/html", "x-request-id": "edge-7"}, text="<h1>Bad</h1>")
    error = error_from_response(html)
    assert isinstance(error, ServiceUnavailable)
    assert error.code == "http_502"
    assert error.request_id == "edge-7"
    assert "<h1>" not in str(error)
    unknown = error_from_response(httpx.Response(429, json={"code": 7}))
    assert isinstance(unknown, RateLimited)
    assert unknown.code == "http_429"


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 0 ") == 0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0  # in the past: now
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    assert parse_retry_after(None) is None


def test_ratelimit_headers_are_read_per_policy() -> None:
    headers = httpx.Headers(
        {
            "RateLimit-Policy": '"burst";q=20;w=2, "daily";q=1000;w=86400, "monthly";q=20000;w=2592000',
            "RateLimit": '"burst";r=19;t=1, "daily";r=999;t=54675, "monthly";r=19999;t=486675',
        }
    )
    state = parse_ratelimit(headers)
    assert list(state) == ["burst", "daily", "monthly"]
    assert state["daily"].remaining == 999
    assert state["daily"].reset_s == 54675
    assert state["daily"].limit == 1000
    assert state["daily"].window_s == 86400
    # A member we cannot read is skipped, not fatal; a policy may be missing.
    odd = parse_ratelimit(httpx.Headers({"RateLimit": 'nonsense, "x";r=1;t=2, "y";r=oops;t=1'}))
    assert list(odd) == ["x"]
    assert odd["x"].limit is None
    assert parse_ratelimit(httpx.Headers()) == {}


def _err(code: str, retry_after: float | None = None, status: int = 429) -> FacegateError:
    return FacegateError(code, "x", status=status, retry_after=retry_after)


def test_retry_policy_waits_for_retry_after_within_bounds() -> None:
    policy = RetryPolicy(max_retries=3, max_wait_s=30, max_total_wait_s=60)
    wait = policy.delay(_err("rate_limited", 2), attempt=1, waited=0)
    assert wait is not None
    assert 2 <= wait <= 2.2 + 1e-9
    assert policy.delay(_err("upstream_unavailable", 1, 503), attempt=3, waited=5) is not None
    # Bounded: the retry count, one wait, and all waits together.
    assert policy.delay(_err("rate_limited", 1), attempt=4, waited=3) is None
    assert policy.delay(_err("rate_limited", 31), attempt=1, waited=0) is None
    assert policy.delay(_err("rate_limited", 30), attempt=1, waited=0) == 30  # jitter stays within the bound
    assert policy.delay(_err("rate_limited", 20), attempt=2, waited=45) is None
    assert RetryPolicy(max_retries=0).delay(_err("rate_limited", 1), attempt=1, waited=0) is None


def test_quota_exceeded_hours_away_is_not_retried() -> None:
    policy = RetryPolicy()
    assert policy.delay(_err("quota_exceeded", 6 * 3600), attempt=1, waited=0) is None
    assert policy.delay(_err("quota_exceeded", None), attempt=1, waited=0) is None
    # ...but a daily quota that resets in 2 s (just before midnight UTC) is worth the wait.
    assert policy.delay(_err("quota_exceeded", 2), attempt=1, waited=0) is not None


def test_retry_policy_does_not_retry_what_will_not_pass() -> None:
    policy = RetryPolicy()
    for code, status in [
        ("upstream_credits", 503),
        ("upstream_timeout", 504),
        ("upstream_error", 502),
        ("invalid_image", 422),
        ("unauthorized", 401),
    ]:
        assert policy.delay(_err(code, 1, status), attempt=1, waited=0) is None, code


def test_retry_policy_backs_off_without_retry_after() -> None:
    policy = RetryPolicy(backoff_s=0.5)
    first = policy.delay(_err("http_503", None, 503), attempt=1, waited=0)
    third = policy.delay(_err("http_503", None, 503), attempt=3, waited=0)
    assert first is not None
    assert third is not None
    assert 0.5 <= first <= 0.75
    assert 2.0 <= third <= 3.0
    assert policy.delay(ConnectionFailed("connect_error", "x"), attempt=1, waited=0) == 0.5
    # The request may have arrived: a broken connection is not resent blindly.
    assert policy.delay(ConnectionFailed("transport_error", "x"), attempt=1, waited=0) is None
    assert policy.delay(_err("rate_limited", None), attempt=1, waited=0) is None


def test_configuration_from_arguments_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEGATE_URL", raising=False)
    monkeypatch.delenv("FACEGATE_KEY", raising=False)
    with pytest.raises(ValueError, match="FACEGATE_KEY"):
        FacegateClient()
    with pytest.raises(ValueError, match="http"):
        FacegateClient("ftp://example", key="k")
    monkeypatch.setenv("FACEGATE_URL", "http://facegate.internal:8000/")
    monkeypatch.setenv("FACEGATE_KEY", "fg_env")
    with FacegateClient() as client:
        assert client.base_url == "http://facegate.internal:8000"
        assert client._headers["Authorization"] == "Bearer fg_env"
    with FacegateClient("http://other:1", key="fg_arg") as client:
        assert client.base_url == "http://other:1"
        assert client._headers["Authorization"] == "Bearer fg_arg"
