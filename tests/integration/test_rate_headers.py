"""RateLimit-Policy and RateLimit, parsed as the IETF draft defines them, on real responses.

draft-ietf-httpapi-ratelimit-headers (-10/-11): both fields are Structured Field Lists
(RFC 8941) of Items whose bare item is an sf-string naming the policy. A policy carries
``q`` (quota, Integer >= 0) and ``w`` (window, Integer seconds > 0); a service limit
carries ``r`` (available quota, Integer >= 0) and ``t`` (effective window, Integer
seconds >= 0: within t seconds no more than r units can be used). If Retry-After is
present it must not point before the end of the effective window. Parsing is done by
``http_sfv`` (an independent RFC 8941 implementation), not by facegate's own code.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from http_sfv.list import List as SfList

from app.api.headers import ratelimit_headers
from app.limits import Admission, QuotaState, RateState
from app.tenants import Limits
from tests.conftest import Gateway, Sim, start_gateway, unique_image, write_tenants
from tests.servers import ServerProcess

Policies = dict[str, dict[str, int]]


def parse_list(value: str) -> Policies:
    """A draft field as {policy name: params}; fails on anything the draft does not allow."""
    parsed = SfList()
    parsed.parse(value.encode("ascii"))
    out: Policies = {}
    for item in parsed:
        assert type(item.value) is str, f"the policy name must be an sf-string, got {item.value!r}"
        assert item.value not in out, "each policy at most once"
        params = dict(item.params)
        for name, param in params.items():
            assert type(param) is int, f"{name} must be an sf-integer, got {param!r}"
        out[item.value] = params
    return out


def check_draft(headers: httpx.Headers) -> tuple[Policies, Policies]:
    """Both fields present, well-formed, and consistent with each other and with Retry-After."""
    policy = parse_list(headers["ratelimit-policy"])
    state = parse_list(headers["ratelimit"])
    assert set(state) == set(policy), "every service limit names an advertised policy"
    for params in policy.values():
        assert set(params) == {"q", "w"}
        assert params["q"] >= 0
        assert params["w"] > 0
    for name, params in state.items():
        assert set(params) == {"r", "t"}
        assert 0 <= params["r"] <= policy[name]["q"]
        assert params["t"] >= 0
    if "retry-after" in headers:
        retry = int(headers["retry-after"])
        exhausted = [name for name, params in state.items() if params["r"] == 0]
        assert exhausted, "a Retry-After comes with at least one exhausted policy"
        assert retry >= max(state[name]["t"] for name in exhausted), "Retry-After before the effective window ends"
    return policy, state


def seconds_until(boundary: datetime) -> float:
    return (boundary - datetime.now(UTC)).total_seconds()


def next_midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def next_month() -> datetime:
    first = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


# --- the format, from constructed decisions -----------------------------------------------


def test_formatting_of_every_policy_kind() -> None:
    limits = Limits(3.0, 4, 10, None)
    rate = RateState.of(limits, 2, 600_000)
    admission = Admission(
        True,
        rate,
        (QuotaState("daily", 10, 7, 3600.2, 86400), QuotaState("monthly", None, 7, 99.0, 2_592_000)),
    )
    headers = httpx.Headers(ratelimit_headers(admission))
    policy, state = check_draft(headers)
    assert policy == {"burst": {"q": 4, "w": 2}, "daily": {"q": 10, "w": 86400}}, "unlimited is not advertised"
    assert state["daily"] == {"r": 3, "t": 3601}
    assert state["burst"]["r"] == 2
    assert ratelimit_headers(Admission(True, None)) == {}, "fail-open: nothing known, nothing claimed"


# --- real responses ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(
    request: pytest.FixtureRequest, sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp(f"headers-{request.param}")
    tenants: dict[str, dict[str, Any]] = {
        # 3 at once, then one every 10 s: easy to exhaust, nothing refills during the test.
        "slow": {"rate_per_s": 0.1, "burst": 3, "daily_quota": 50, "monthly_quota": "unlimited"},
        "tiny": {"daily_quota": 1, "monthly_quota": 100},
        # The usage body is read after the request's admission, which made the header: at the
        # default 1000/s a unit refills every millisecond, and a busy CPU put one between them (the
        # body said 1000, the header 999). A unit every 100 s: both describe the same state.
        "roomy": {"rate_per_s": 0.01, "burst": 1000},
    }
    env = {"FACEGATE_UPSTREAM_RETRIES": "0"}
    if request.param == "redis":
        env["FACEGATE_REDIS_URL"] = request.getfixturevalue("redis_url")
        env["FACEGATE_REDIS_PREFIX"] = "t" + uuid.uuid4().hex[:12]
    defaults = {"rate_per_s": 1000, "burst": 1000, "daily_quota": 1000, "monthly_quota": 20000}
    keys = write_tenants(tmp / "tenants.toml", tenants, defaults)
    gateway = start_gateway(Sim(sim_server), tmp, env=env, keys=keys)
    try:
        yield gateway
    finally:
        gateway.server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_success_miss_hit_and_rate_limited(gw: Gateway, sim: Sim) -> None:
    image = unique_image()
    miss = gw.analyze(image, tenant="slow")
    assert miss.status_code == 200
    policy, state = check_draft(miss.headers)
    # Burst 3 at 0.1/s refills in 30 s; the unlimited monthly quota is not advertised.
    assert policy == {"burst": {"q": 3, "w": 30}, "daily": {"q": 50, "w": 86400}}
    assert state["burst"] == {"r": 2, "t": 10}, "2 left; spending them, the next one is 10 s away"
    assert state["daily"]["r"] == 49
    assert abs(state["daily"]["t"] - seconds_until(next_midnight())) <= 3

    hit = gw.analyze(image, tenant="slow")
    assert hit.headers["cache-status"].startswith("facegate; hit")
    _, state = check_draft(hit.headers)
    assert state["daily"]["r"] == 49, "a cache hit is not charged"
    assert state["burst"]["r"] == 1, "but it is rate-limited"

    with gw.client("slow") as c:
        assert c.get("/v1/usage").status_code == 200  # the last unit of the burst
        refused = c.get("/v1/usage")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "rate_limited"
    _, state = check_draft(refused.headers)
    assert state["burst"]["r"] == 0
    assert int(refused.headers["retry-after"]) == state["burst"]["t"] == refused.json()["retry_after"]
    assert 8 <= state["burst"]["t"] <= 10
    assert sim.calls == 1


def test_quota_exceeded_retry_after_is_the_window_reset(gw: Gateway, sim: Sim) -> None:
    first = gw.analyze(unique_image(), tenant="tiny")
    assert first.status_code == 200
    policy, state = check_draft(first.headers)
    this_month = (next_month() - timedelta(days=1)).replace(day=1)
    assert policy["monthly"] == {"q": 100, "w": (next_month() - this_month).days * 86400}
    assert state["daily"]["r"] == 0
    assert state["monthly"]["r"] == 99
    assert abs(state["monthly"]["t"] - seconds_until(next_month())) <= 3
    refused = gw.analyze(unique_image(), tenant="tiny")
    assert refused.status_code == 429
    assert refused.json()["code"] == "quota_exceeded"
    _, state = check_draft(refused.headers)
    assert state["daily"]["r"] == 0
    assert int(refused.headers["retry-after"]) == state["daily"]["t"]
    assert abs(int(refused.headers["retry-after"]) - seconds_until(next_midnight())) <= 3
    assert sim.calls == 1


def test_usage_policies_match_the_header(gw: Gateway, sim: Sim) -> None:
    with gw.client("roomy") as c:
        r = c.get("/v1/usage")
    assert r.status_code == 200
    policy, state = check_draft(r.headers)
    body: dict[str, Any] = r.json()
    assert {p["name"]: {"q": p["quota"], "w": p["window_s"]} for p in body["policies"]} == policy
    assert body["quotas"]["daily"]["remaining"] == state["daily"]["r"]
    assert body["rate_limit"]["remaining"] == state["burst"]["r"]


def test_no_ratelimit_fields_without_a_tenant(gw: Gateway, sim: Sim) -> None:
    r = httpx.get(gw.url + "/v1/usage", headers={"Authorization": "Bearer fg_nobody"}, timeout=5)
    assert r.status_code == 401
    assert "ratelimit" not in r.headers
    assert "ratelimit-policy" not in r.headers
