"""Alert rules, the Grafana dashboard and the compose Prometheus config: valid, and in terms of
metrics facegate really defines.

promtool (Debian package ``prometheus``; .ci/run installs it) checks the rule files, runs
their unit tests and parses every dashboard query. Without it those checks skip and say so;
the structural checks below (every expression names a metric app/observability.py defines,
with labels it has) run everywhere. tests/integration/test_dashboards.py goes further: every
metric must be *emitted* by a running gateway.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app.observability import Metrics
from app.upstream import contract
from tests import promql

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "deploy" / "observability"
RULES = OBS / "prometheus" / "facegate-rules.yml"
RULE_TESTS = OBS / "prometheus" / "facegate-rules.test.yml"
PROMETHEUS_CONFIG = OBS / "prometheus" / "prometheus.yml"
DASHBOARD = OBS / "grafana" / "dashboards" / "facegate.json"
#: Labels Prometheus itself attaches to every scraped series (target labels).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service", "endpoint"})
#: Values the dashboard variables take for parsing (All = ".*").
VARIABLES = {"job": ".*", "tenant": ".*", "datasource": "prometheus"}
NO_PROMTOOL = "promtool not installed (Debian package `prometheus`; .ci/run installs it): structural checks only"


def _load_build() -> Any:
    spec = importlib.util.spec_from_file_location("observability_build", OBS / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("observability_build", module)
    spec.loader.exec_module(module)
    return module


build = _load_build()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(NO_PROMTOOL)
    return path


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


# ------------------------------------------------------------------ what the app defines


def defined_series() -> dict[str, set[str]]:
    """Every sample name facegate's registry can expose, with its label names."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind, labels = metric._name, metric._type, set(metric._labelnames)
        if kind == "counter":
            out[name + "_total"] = labels
        elif kind == "gauge":
            out[name] = labels
        elif kind == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_count"] = labels
            out[name + "_sum"] = labels
        else:
            raise AssertionError(f"{name}: metric type {kind} not handled here")
    return out


def check_uses(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Problems with one (expanded) expression against ``series`` (sample name -> label names)."""
    uses = promql.uses(expr)
    problems = []
    known_labels = set(TARGET_LABELS)
    for selector in uses.selectors:
        if selector.metric not in series:
            problems.append(f"{selector.metric}: not a facegate metric")
            continue
        labels = series[selector.metric] | TARGET_LABELS
        known_labels |= labels
        problems += [f"{selector.metric} has no label {label!r}" for label in sorted(selector.labels - labels)]
    problems += [
        f"grouping label {label!r} is on none of its metrics" for label in sorted(uses.grouping - known_labels)
    ]
    return [f"{expr}: {p}" for p in problems]


# ------------------------------------------------------------------------ the documents


@functools.cache
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


@functools.cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query with Grafana's variables expanded) for every target and variable."""
    queries = []
    for panel in panels():
        for target in panel.get("targets", []):
            queries.append((panel["title"], promql.expand_grafana(target["expr"], VARIABLES)))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, f"variable {variable['name']}: only label_values(selector, label) is supported here"
        selector, label = match.groups()
        expanded = promql.expand_grafana(selector, VARIABLES)
        queries.append((f"${variable['name']}", f"group by ({label}) ({expanded})"))
    return queries


# --------------------------------------------------------------------------------- tests


def test_generated_files_are_up_to_date() -> None:
    for path, text in build.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} is out of date: run python deploy/observability/build.py"
        )


def test_every_rule_expression_names_a_defined_metric() -> None:
    series = defined_series()
    problems = [p for rule in rules() for p in check_uses(rule["expr"], series)]
    assert not problems, "\n".join(problems)


def test_every_dashboard_query_names_a_defined_metric() -> None:
    series = defined_series()
    problems = [f"[{title}] {p}" for title, expr in dashboard_queries() for p in check_uses(expr, series)]
    assert not problems, "\n".join(problems)


def test_the_structural_check_catches_mistakes() -> None:
    series = defined_series()
    assert check_uses("sum by (tenant) (rate(facegate_credits_spent_total[5m]))", series) == []
    assert check_uses("rate(facegate_credits_spent[5m])", series)  # the counter's _total is missing
    assert check_uses('facegate_upstream_breaker_state{tenant="a"}', series)  # no such label
    assert check_uses("sum by (outcome) (facegate_uploads_in_flight)", series)
    assert check_uses("facegate_upstream_breaker_state unless facegate_queue_depth", series)
    with pytest.raises(promql.PromQLError):
        promql.uses('{__name__=~"facegate_.*"}')
    with pytest.raises(promql.PromQLError):
        promql.expand_grafana("rate(x[$undefined])", VARIABLES)


def test_rule_label_values_match_the_app() -> None:
    """Label values the rules match on are values the app produces."""
    outcomes = set(contract.ERROR_CODES) | {"ok"}
    for rule in rules():
        for op, value in re.findall(r'outcome(=~|=)"([^"]*)"', rule["expr"]):
            values = set(value.split("|")) if op == "=~" else {value}
            assert values <= outcomes, f"{rule['alert']}: unknown upstream outcome(s) {values - outcomes}"
        for value in re.findall(r'reason="([^"]*)"', rule["expr"]):
            assert value in ("rate_limited", "quota_exceeded")
    # The key alert covers exactly the codes by which ailabapi refuses the gateway's key or API.
    key_rule = next(r for r in rules() if r["alert"] == "FacegateUpstreamKeyRejected")
    matched = set(re.search(r'outcome=~"([^"]*)"', key_rule["expr"]).group(1).split("|"))  # type: ignore[union-attr]
    assert matched == {code for code, row in contract.ERROR_CODES.items() if row.kind is contract.Kind.AUTH}
    credits = next(r for r in rules() if r["alert"] == "FacegateUpstreamCreditsExhausted")
    assert {c for c, row in contract.ERROR_CODES.items() if row.kind is contract.Kind.CREDITS} == set(
        re.findall(r'outcome="([^"]*)"', credits["expr"])
    )


def test_rules_are_complete_and_documented() -> None:
    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Dashboards and alerts") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert f"`{rule['alert']}`" in section, f"{rule['alert']} is not explained in docs/operating.md"
    # What the issue asks for: breaker, credits, error ratio, Redis, a tenant near its quota.
    used = {m for rule in rules() for m in promql.uses(rule["expr"]).metrics}
    assert {
        "facegate_upstream_breaker_state",
        "facegate_upstream_calls_total",
        "facegate_http_requests_total",
        "facegate_redis_errors_total",
        "facegate_quota_remaining",
        "facegate_quota_limit",
    } <= used


def test_dashboard_layout() -> None:
    board = dashboard()
    assert board["uid"] == build.DASHBOARD_UID
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert re.fullmatch(r"[A-Z]", target["refId"])
            assert "$job" in target["expr"], f"{panel['title']}: every query follows the job variable"
    # The list: requests by tenant and status, cache hit ratio, credits per tenant, upstream
    # latency and outcomes, breaker state, quota remaining, Redis errors, uploads in flight.
    used = {m for _, expr in dashboard_queries() for m in promql.uses(expr).metrics}
    assert {
        "facegate_http_requests_total",
        "facegate_cache_requests_total",
        "facegate_credits_spent_total",
        "facegate_upstream_duration_seconds_bucket",
        "facegate_upstream_calls_total",
        "facegate_upstream_breaker_state",
        "facegate_quota_remaining",
        "facegate_redis_errors_total",
        "facegate_uploads_in_flight",
    } <= used


# -------------------------------------------------------------------------- with promtool


def test_promtool_checks_the_rules() -> None:
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_rule_unit_tests() -> None:
    """Breaker, quota, credits, key, throttling, error-ratio and Redis alerts fire (and only then)
    on synthetic series: deploy/observability/prometheus/facegate-rules.test.yml."""
    proc = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert {"FacegateUpstreamBreakerOpen", "FacegateTenantNearQuota"} <= tested
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a promtool unit test"


def test_promtool_checks_the_compose_prometheus_config() -> None:
    proc = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule): the real PromQL parser, not ours."""
    queries = dashboard_queries()
    groups = [
        {
            "name": "dashboard",
            "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)],
        }
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout
