"""Every metric the Grafana dashboard and the alert rules read is emitted by a running gateway.

A scripted sequence against a real gateway (real simulator, a throwaway Redis that is
stopped halfway) makes every kind of series appear: a miss, a hit, rate and quota
refusals, an upstream failure, Redis errors. Then every dashboard query and every rule
expression must name only sample names (and label names) this gateway's /metrics shows.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, Sim, unique_image
from tests.servers import RedisServer
from tests.unit.test_observability_assets import check_uses, dashboard_queries, rules


def emitted(gw: Gateway) -> tuple[dict[str, set[str]], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Sample name -> label names seen, and every sample's value."""
    names: dict[str, set[str]] = {}
    values = {}
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("facegate_") and not sample.name.endswith("_created"):
                names.setdefault(sample.name, set()).update(sample.labels)
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return names, values


def test_dashboard_and_rules_read_only_emitted_metrics(gateway_factory: Any, sim: Sim, own_redis: RedisServer) -> None:
    gw: Gateway = gateway_factory(
        tenants={"alpha": {}, "ratey": {"rate_per_s": 0.001, "burst": 1}, "quotay": {"daily_quota": 1}},
        env={"FACEGATE_REDIS_URL": own_redis.url, "FACEGATE_UPSTREAM_RETRIES": "0"},
    )
    image = unique_image()
    assert gw.analyze(image).status_code == 200  # miss: an upstream call, a credit
    assert gw.analyze(image).status_code == 200  # hit
    assert [gw.analyze(unique_image(), tenant="ratey").status_code for _ in range(2)] == [200, 429]
    assert [gw.analyze(unique_image(), tenant="quotay").status_code for _ in range(2)] == [200, 429]
    sim.faults({"mode": "status", "status": 500, "code": "PROCESSING_FAILURE"})
    assert gw.analyze(unique_image()).status_code == 502
    sim.reset()
    own_redis.stop()
    # Redis is gone: the cache lookup fails open (a miss), the quota fails closed (503).
    assert gw.analyze(unique_image()).status_code == 503

    names, values = emitted(gw)
    problems = [f"[dashboard: {title}] {p}" for title, expr in dashboard_queries() for p in check_uses(expr, names)]
    problems += [f"[rule {rule['alert']}] {p}" for rule in rules() for p in check_uses(rule["expr"], names)]
    assert not problems, "\n".join(problems)

    # The quota gauges say what the tenants have left (as of their latest admission).
    def quota(kind: str, tenant: str, window: str) -> float:
        return values[(f"facegate_quota_{kind}", (("tenant", tenant), ("window", window)))]

    assert (quota("limit", "quotay", "daily"), quota("remaining", "quotay", "daily")) == (1, 0)
    assert quota("remaining", "ratey", "daily") == quota("limit", "ratey", "daily") - 1
    assert quota("limit", "alpha", "monthly") == 1_000_000
    assert values[("facegate_redis_errors_total", (("component", "cache"),))] >= 1
