"""Generates facegate's Grafana dashboard and the production PrometheusRule.

    python deploy/observability/build.py          # rewrite both files
    python deploy/observability/build.py --check  # exit 1 if a committed file is out of date

Outputs (both committed; tests/unit/test_observability_assets.py fails when they differ
from what this script makes):

- ``grafana/dashboards/facegate.json``: the dashboard, from ``ROWS`` below. A row is a title
  and its panels; panels flow left to right on Grafana's 24-column grid. To add a row (the
  upstream keys and fair queue row is one), append a ``Row`` whose queries use only metrics the
  app emits: the tests parse every query and check each metric against a live gateway.
- ``../overlays/production/prometheusrule.yaml``: ``prometheus/facegate-rules.yml`` wrapped
  in a prometheus-operator ``PrometheusRule`` (kustomize cannot embed a file in a custom
  resource, so the copy is generated instead of hand-kept).

Only the standard library and PyYAML (a dev dependency) are needed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "dashboards" / "facegate.json"
RULES = HERE / "prometheus" / "facegate-rules.yml"
PROMETHEUS_RULE = HERE.parent / "overlays" / "production" / "prometheusrule.yaml"

DASHBOARD_UID = "facegate-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
#: Requests that are not API traffic: scrapes and probes.
NOT_API = 'route!~"/metrics|/healthz|/readyz"'
JOB = 'job=~"$job"'
TENANT = 'tenant=~"$tenant"'
BREAKER_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green", "index": 0},
            "1": {"text": "half-open", "color": "yellow", "index": 1},
            "2": {"text": "open", "color": "red", "index": 2},
        },
    }
]


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | bargauge | state-timeline
    targets: tuple[Target, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    thresholds: tuple[tuple[str, float | None], ...] = (("green", None),)
    mappings: list[dict[str, Any]] = field(default_factory=list)
    stack: bool = False
    bars: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    collapsed: bool = False


def _rate(metric: str, selector: str, by: str = "", rng: str = "$__rate_interval") -> str:
    agg = f"sum by ({by}) " if by else "sum"
    return f"{agg}(rate({metric}{{{selector}}}[{rng}]))"


def _ratio(metric: str, numerator: str, denominator: str) -> str:
    return f"{_rate(metric, numerator)} / {_rate(metric, denominator)}"


def _quantiles(bucket: str, selector: str, by: str = "") -> tuple[Target, ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({group}) (rate({bucket}{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    )


API = f"{JOB}, {NOT_API}"

ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "API requests/s",
                "stat",
                (Target(_rate("facegate_http_requests_total", API)),),
                "Requests answered per second, all tenants and statuses (scrapes and probes left out).",
                unit="reqps",
                width=4,
                height=4,
            ),
            Panel(
                "5xx ratio",
                "stat",
                (Target(_ratio("facegate_http_requests_total", f'{API}, status=~"5.."', API)),),
                "Share of API requests answered 5xx. Alert FacegateHighErrorRatio fires above 5 % for 10 minutes.",
                unit="percentunit",
                width=4,
                height=4,
                thresholds=(("green", None), ("yellow", 0.01), ("red", 0.05)),
            ),
            Panel(
                "Cache hit ratio",
                "stat",
                (Target(_ratio("facegate_cache_requests_total", f'{JOB}, result="hit"', JOB)),),
                "Analyses answered from the cache, out of all analyses (hit, miss, forced, collapsed).",
                unit="percentunit",
                width=4,
                height=4,
                thresholds=(("red", None), ("yellow", 0.2), ("green", 0.5)),
            ),
            Panel(
                "Credits spent",
                "stat",
                (Target(f"sum(increase(facegate_credits_spent_total{{{JOB}, {TENANT}}}[$__range]))"),),
                "Billable upstream calls in the dashboard's time range (selected tenants).",
                width=4,
                height=4,
            ),
            Panel(
                "Breaker",
                "stat",
                (Target(f"max(facegate_upstream_breaker_state{{{JOB}}})"),),
                "The worst circuit breaker state over all replicas.",
                width=4,
                height=4,
                mappings=BREAKER_MAPPINGS,
                thresholds=(("green", None), ("yellow", 1), ("red", 2)),
            ),
            Panel(
                "Uploads in flight",
                "stat",
                (Target(f"sum(facegate_uploads_in_flight{{{JOB}}})"),),
                "Uploads being received right now, all replicas. Past FACEGATE_MAX_UPLOADS_IN_FLIGHT per "
                "process, new uploads get 503 overloaded.",
                width=4,
                height=4,
            ),
        ),
    ),
    Row(
        "Requests",
        (
            Panel(
                "Requests by tenant and status",
                "timeseries",
                (
                    Target(
                        _rate("facegate_http_requests_total", f"{API}, {TENANT}", "tenant, status"),
                        "{{tenant}} {{status}}",
                    ),
                ),
                'API requests per second by tenant ("-" = no valid key) and HTTP status.',
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Latency by route",
                "timeseries",
                _quantiles("facegate_http_request_duration_seconds_bucket", API, "route"),
                "Time to answer, upload included, by route template.",
                unit="s",
            ),
            Panel(
                "Limit rejections by tenant",
                "timeseries",
                (
                    Target(
                        _rate("facegate_limit_rejections_total", f"{JOB}, {TENANT}", "tenant, reason"),
                        "{{tenant}} {{reason}}",
                    ),
                ),
                "429s per second: rate_limited (GCRA burst) and quota_exceeded (daily/monthly quota).",
                unit="reqps",
            ),
            Panel(
                "Uploads in flight by replica",
                "timeseries",
                (Target(f"sum by (instance) (facegate_uploads_in_flight{{{JOB}}})", "{{instance}}"),),
                "Uploads being received, per process.",
            ),
        ),
    ),
    Row(
        "Cache",
        (
            Panel(
                "Cache hit ratio",
                "timeseries",
                (
                    Target(
                        _ratio("facegate_cache_requests_total", f'{JOB}, result="hit"', JOB),
                        "hit",
                    ),
                    Target(
                        _ratio("facegate_cache_requests_total", f'{JOB}, result=~"hit|collapsed"', JOB),
                        "no credit spent (hit or collapsed)",
                    ),
                ),
                "A collapsed request waited for an identical call in flight and was not charged either.",
                unit="percentunit",
                min=0,
                max=1,
            ),
            Panel(
                "Analyses by cache result",
                "timeseries",
                (Target(_rate("facegate_cache_requests_total", JOB, "result"), "{{result}}"),),
                "hit, miss, forced (X-Facegate-Force: a paid re-analysis), collapsed.",
                unit="reqps",
                stack=True,
            ),
        ),
    ),
    Row(
        "Credits and quotas",
        (
            Panel(
                "Credits spent per tenant",
                "timeseries",
                (
                    Target(
                        _rate("facegate_credits_spent_total", f"{JOB}, {TENANT}", "tenant") + " * 60",
                        "{{tenant}}",
                    ),
                ),
                "Billable upstream calls per minute, by tenant.",
                unit="short",
                stack=True,
                bars=True,
            ),
            Panel(
                "Credits spent per tenant in the time range",
                "bargauge",
                (
                    Target(
                        f"sort_desc(sum by (tenant) (increase(facegate_credits_spent_total{{{JOB}, {TENANT}}}"
                        "[$__range])))",
                        "{{tenant}}",
                        instant=True,
                    ),
                ),
                "Billable upstream calls in the dashboard's time range.",
            ),
            Panel(
                "Quota remaining",
                "bargauge",
                (
                    Target(
                        f"min by (tenant, window) (facegate_quota_remaining{{{JOB}, {TENANT}}})",
                        "{{tenant}} {{window}}",
                        instant=True,
                    ),
                ),
                "Billable calls left in the current daily / monthly window, as of each tenant's latest request "
                "(the lowest value over the replicas is the freshest). Unlimited windows are not shown.",
            ),
            Panel(
                "Quota used",
                "bargauge",
                (
                    Target(
                        f"1 - min by (tenant, window) (facegate_quota_remaining{{{JOB}, {TENANT}}}"
                        f" / facegate_quota_limit{{{JOB}, {TENANT}}})",
                        "{{tenant}} {{window}}",
                        instant=True,
                    ),
                ),
                "Share of the window's quota used. Alert FacegateTenantNearQuota fires above 90 %.",
                unit="percentunit",
                min=0,
                max=1,
                thresholds=(("green", None), ("yellow", 0.75), ("red", 0.9)),
            ),
        ),
    ),
    Row(
        "Upstream (ailabapi)",
        (
            Panel(
                "Circuit breaker by replica",
                "state-timeline",
                (Target(f"max by (instance) (facegate_upstream_breaker_state{{{JOB}}})", "{{instance}}"),),
                "Open: ailabapi failed too often; cache misses answer 503 upstream_unavailable at once.",
                mappings=BREAKER_MAPPINGS,
                thresholds=(("green", None), ("yellow", 1), ("red", 2)),
            ),
            Panel(
                "Upstream attempts by outcome",
                "timeseries",
                (Target(_rate("facegate_upstream_calls_total", JOB, "outcome"), "{{outcome}}"),),
                "Each attempt at ailabapi (retries included): ok, an image verdict (e.g. ERROR_NO_FACE_IN_FILE), "
                "an ailabapi error code, or a transport failure (timeout, connect, ...).",
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Upstream latency",
                "timeseries",
                _quantiles("facegate_upstream_duration_seconds_bucket", JOB),
                "Duration of one attempt at ailabapi.",
                unit="s",
            ),
            Panel(
                "Upstream attempts not ok",
                "timeseries",
                (
                    Target(
                        _ratio("facegate_upstream_calls_total", f'{JOB}, outcome!="ok"', JOB),
                        "not ok",
                    ),
                ),
                "Share of attempts that did not end ok; image verdicts such as no face count here too.",
                unit="percentunit",
                min=0,
                max=1,
            ),
        ),
    ),
    Row(
        "Upstream keys and fair queue",
        (
            Panel(
                "Usable upstream keys",
                "stat",
                (Target(f"min(facegate_upstream_keys_usable{{{JOB}}})"),),
                "Shared keys that can take calls now (ok or low). 0: every shared cache miss answers 503 "
                "upstream_keys_unavailable; alert FacegateUpstreamNoUsableKey.",
                width=4,
                thresholds=(("red", None), ("yellow", 1), ("green", 2)),
            ),
            Panel(
                "Key states",
                "timeseries",
                (
                    Target(
                        f'max by (key, state) (facegate_upstream_key_state{{{JOB}, state!="ok"}}) > 0',
                        "{{key}} {{state}}",
                    ),
                ),
                "Keys not ok, by state: low (balance below low_credits), cooling (throttled), exhausted (no "
                "credits), disabled (refused until the keys file changes). Empty = every key ok.",
                width=10,
                bars=True,
            ),
            Panel(
                "Credits by key",
                "timeseries",
                (Target(f"max by (key) (facegate_upstream_key_credits{{{JOB}}})", "{{key}}"),),
                "The last balance ailabapi reported for each key (read every FACEGATE_UPSTREAM_CREDITS_POLL_S). "
                "Alerts: FacegateUpstreamCreditsLow, FacegateUpstreamKeyExhausted.",
                width=10,
            ),
            Panel(
                "Calls in flight by key",
                "timeseries",
                (Target(f"max by (key) (facegate_upstream_key_in_flight{{{JOB}}})", "{{key}}"),),
                "Calls on each key right now, all replicas together (each key's max_concurrency is its ceiling).",
                stack=True,
            ),
            Panel(
                "Attempts by key and outcome",
                "timeseries",
                (Target(_rate("facegate_upstream_key_calls_total", JOB, "key, outcome"), "{{key}} {{outcome}}"),),
                "Attempts at ailabapi per key: ok, an image verdict, an ailabapi code (EXCEEDING_LIMITS, "
                "ERROR_NOT_ENOUGH_CREDITS move the call to another key), a transport failure.",
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Queue wait p95 by tenant",
                "timeseries",
                (
                    Target(
                        "histogram_quantile(0.95, sum by (le, tenant) "
                        f"(rate(facegate_upstream_queue_wait_seconds_bucket{{{JOB}, {TENANT}}}[$__rate_interval])))",
                        "{{tenant}}",
                    ),
                ),
                "How long a tenant's calls waited for an upstream slot (95th percentile). Fair queueing keeps a "
                "light tenant's wait short while another floods; alert FacegateUpstreamQueueSlow.",
                unit="s",
            ),
            Panel(
                "Calls waiting for a slot",
                "timeseries",
                (Target(f"max(facegate_upstream_queue_depth{{{JOB}}})", "waiting"),),
                "Calls queued for an upstream slot, all replicas together. Calls that could not start within "
                "FACEGATE_UPSTREAM_QUEUE_TIMEOUT_S are refused at once (429 share exceeded / 503).",
            ),
        ),
    ),
    Row(
        "Redis",
        (
            Panel(
                "Redis errors by component",
                "timeseries",
                (Target(_rate("facegate_redis_errors_total", JOB, "component"), "{{component}}"),),
                "Failed Redis operations: cache (falls back to a miss), quota (FACEGATE_QUOTA_FAIL_MODE decides), "
                "singleflight, pool (the upstream key pool: each replica then queues for itself).",
                unit="ops",
            ),
            Panel(
                "Cache backend errors",
                "timeseries",
                (Target(_rate("facegate_cache_errors_total", JOB), "errors"),),
                "Cache reads and writes that failed; the request went on as a miss.",
                unit="ops",
            ),
        ),
    ),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for color, value in panel.thresholds]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": panel.mappings,
    }
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "bars" if panel.bars else "line",
            "fillOpacity": 60 if panel.bars else 10,
            "lineWidth": 1,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        defaults["color"] = {"mode": "palette-classic"}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        options["tooltip"] = {"mode": "multi", "sort": "desc"}
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    elif panel.kind == "bargauge":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    elif panel.kind == "state-timeline":
        defaults["color"] = {"mode": "thresholds"}
        options = {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9}
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    targets = []
    for index, target in enumerate(panel.targets):
        t: dict[str, Any] = {
            "datasource": DS,
            "refId": chr(ord("A") + index),
            "expr": target.expr,
            "legendFormat": target.legend or "__auto",
            "range": not target.instant,
            "instant": target.instant,
        }
        targets.append(t)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in ROWS:
        row_panel: dict[str, Any] = {
            "id": next_id,
            "type": "row",
            "title": row.title,
            "collapsed": row.collapsed,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
        next_id += 1
        panels.append(row_panel)
        y += 1
        x, line_height = 0, 0
        members = row_panel["panels"] if row.collapsed else panels
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            members.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "facegate",
        "description": "facegate gateway: traffic, cache, credits and quotas, ailabapi, Redis. "
        "Generated by deploy/observability/build.py.",
        "tags": ["facegate"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(facegate_upstream_breaker_state, job)", "refId": "job"},
                    "definition": "label_values(facegate_upstream_breaker_state, job)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
                {
                    "name": "tenant",
                    "label": "Tenant",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": 'label_values(facegate_http_requests_total{job=~"$job"}, tenant)',
                        "refId": "tenant",
                    },
                    "definition": 'label_values(facegate_http_requests_total{job=~"$job"}, tenant)',
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (expressions, descriptions), so the file reads well."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule_text() -> str:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "facegate",
            "labels": {"app.kubernetes.io/name": "facegate", "app.kubernetes.io/component": "alerts"},
        },
        "spec": {"groups": groups},
    }
    header = (
        "# GENERATED by `python deploy/observability/build.py` from\n"
        "# deploy/observability/prometheus/facegate-rules.yml: edit that file, then regenerate.\n"
        "# Needs the prometheus-operator CRDs (kube-prometheus-stack). If your Prometheus selects\n"
        "# rules by label (ruleSelector, e.g. release: <helm release>), add that label here with a\n"
        '# kustomize patch. Meaning of each alert: docs/operating.md, "Dashboards and alerts".\n'
    )
    body: str = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return header + body


def outputs() -> dict[Path, str]:
    return {DASHBOARD: dashboard_text(), PROMETHEUS_RULE: prometheus_rule_text()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for path in stale:
        print(f"out of date: {path} (run python deploy/observability/build.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
