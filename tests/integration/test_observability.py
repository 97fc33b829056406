"""Metrics and logs: a scripted sequence of requests leaves exactly the expected traces."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, Sim, unique_image

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(gw: Gateway) -> dict[Sample, float]:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("facegate_") and not s.name.endswith(("_created", "_bucket")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) != 0}


def k(name: str, **labels: str) -> Sample:
    return (name, tuple(sorted(labels.items())))


def test_metrics_after_a_scripted_sequence(gateway_factory: Any, sim: Sim) -> None:
    gw: Gateway = gateway_factory(
        tenants={"alpha": {}, "ratey": {"rate_per_s": 0.001, "burst": 1}, "quotay": {"daily_quota": 1}},
        env={"FACEGATE_UPSTREAM_RETRIES": "0"},
    )
    before = scrape(gw)
    image = unique_image()
    assert gw.analyze(image).status_code == 200  # miss, one billable call
    assert gw.analyze(image).status_code == 200  # hit
    assert gw.analyze_files({"image": ("a.gif", unique_image("gif"), "image/gif")}).status_code == 415
    assert httpx.post(gw.url + "/v1/faces/analyze", files={"image": ("a", image)}).status_code == 401
    assert gw.analyze(unique_image(), tenant="ratey").status_code == 200
    assert gw.analyze(unique_image(), tenant="ratey").status_code == 429  # burst of 1 used up
    assert gw.analyze(unique_image(), tenant="quotay").status_code == 200
    assert gw.analyze(unique_image(), tenant="quotay").status_code == 429  # daily quota of 1 used up
    sim.faults({"mode": "status", "status": 500, "code": "PROCESSING_FAILURE"})
    assert gw.analyze(unique_image()).status_code == 502
    got = delta(before, scrape(gw))

    route = "/v1/faces/analyze"
    expected = {
        k("facegate_http_requests_total", route=route, method="POST", status="200", tenant="alpha"): 2,
        k("facegate_http_requests_total", route=route, method="POST", status="415", tenant="alpha"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="401", tenant="-"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="200", tenant="ratey"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="429", tenant="ratey"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="200", tenant="quotay"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="429", tenant="quotay"): 1,
        k("facegate_http_requests_total", route=route, method="POST", status="502", tenant="alpha"): 1,
        k("facegate_cache_requests_total", result="miss"): 4,
        k("facegate_cache_requests_total", result="hit"): 1,
        k("facegate_upstream_calls_total", outcome="ok"): 3,
        k("facegate_upstream_calls_total", outcome="PROCESSING_FAILURE"): 1,
        k("facegate_credits_spent_total", tenant="alpha"): 1,
        k("facegate_credits_spent_total", tenant="ratey"): 1,
        k("facegate_credits_spent_total", tenant="quotay"): 1,
        k("facegate_limit_rejections_total", reason="rate_limited", tenant="ratey"): 1,
        k("facegate_limit_rejections_total", reason="quota_exceeded", tenant="quotay"): 1,
        k("facegate_upstream_duration_seconds_count"): 4,
        k("facegate_http_request_duration_seconds_count", route=route): 9,
        k("facegate_http_request_duration_seconds_count", route="/metrics"): 1,  # the "before" scrape
        k("facegate_http_requests_total", route="/metrics", method="GET", status="200", tenant="-"): 1,
        # The key pool (a pool of one, "default"): attempts per key, and each call's wait for its slot.
        k("facegate_upstream_key_calls_total", key="default", outcome="ok"): 3,
        k("facegate_upstream_key_calls_total", key="default", outcome="PROCESSING_FAILURE"): 1,
        k("facegate_upstream_queue_wait_seconds_count", tenant="alpha", priority="interactive"): 2,
        k("facegate_upstream_queue_wait_seconds_count", tenant="ratey", priority="interactive"): 1,
        k("facegate_upstream_queue_wait_seconds_count", tenant="quotay", priority="interactive"): 1,
    }
    # Quota gauges, as of each tenant's latest admission (a reservation counts until refunded:
    # alpha's failed call was reserved when it was admitted, so alpha shows two used).
    day, month = 100_000, 1_000_000  # conftest's default quotas
    for tenant, limits, used in (("alpha", (day, month), 2), ("ratey", (day, month), 1), ("quotay", (1, month), 1)):
        for window, limit in zip(("daily", "monthly"), limits, strict=True):
            expected[k("facegate_quota_limit", tenant=tenant, window=window)] = limit
            if limit - used:  # a delta of 0 (quotay's daily remaining) is not listed by delta()
                expected[k("facegate_quota_remaining", tenant=tenant, window=window)] = limit - used
    assert scrape(gw)[k("facegate_quota_remaining", tenant="quotay", window="daily")] == 0
    sums = {key for key in got if key[0].endswith("_sum")}
    assert {key: value for key, value in got.items() if key not in sums} == expected
    assert all(got[key] > 0 for key in sums)
    after = scrape(gw)
    assert after[k("facegate_upstream_breaker_state")] == 0
    assert after[k("facegate_uploads_in_flight")] == 0
    assert sim.calls == 4


def test_one_json_log_line_per_request_without_secrets(gateway_factory: Any, sim: Sim) -> None:
    gw: Gateway = gateway_factory()
    image = unique_image()
    ids: list[str] = []
    for _ in range(2):
        r = gw.analyze(image, headers={"X-Request-ID": f"req-{len(ids)}"})
        ids.append(r.headers["x-request-id"])
    r = httpx.post(
        gw.url + "/v1/faces/analyze", headers={"Authorization": "Bearer wrong-key-123"}, files={"image": ("a", image)}
    )
    ids.append(r.headers["x-request-id"])
    access = [line for line in gw.log_lines("facegate.access", of=ids) if line["route"] != "/healthz"]
    lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    assert [a["request_id"] for a in access] == ids
    miss, hit, denied = access
    fields = {"request_id", "tenant", "route", "status", "cache", "upstream_ms", "bytes", "duration_ms", "method"}
    assert fields <= set(miss)
    assert (miss["tenant"], miss["status"], miss["cache"], miss["bytes"]) == ("alpha", 200, "miss", len(image))
    assert miss["upstream_ms"] > 0
    assert (hit["cache"], hit["upstream_ms"]) == ("hit", None)
    assert (denied["status"], denied["tenant"], denied["code"]) == (401, None, "unauthorized")
    assert all(line["level"] in {"debug", "info", "warning", "error"} for line in lines)
    text = gw.logs()
    assert gw.key() not in text and "wrong-key-123" not in text
    assert Counter(a["route"] for a in access) == {"/v1/faces/analyze": 3}


def test_metrics_aggregate_across_workers(gateway_factory: Any, sim: Sim) -> None:
    """With FACEGATE_WORKERS=2 any worker's /metrics reports the requests of both."""
    gw: Gateway = gateway_factory(env={"FACEGATE_WORKERS": "2"})
    with gw.client() as c:
        for _ in range(20):
            assert c.get("/v1/usage").status_code == 200
    key = k("facegate_http_requests_total", route="/v1/usage", method="GET", status="200", tenant="alpha")
    assert {scrape(gw)[key] for _ in range(6)} == {20.0}
