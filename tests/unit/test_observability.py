"""Log formatting (JSON for machines, a short line for people at a terminal, never a traceback) and
the quota gauges (what /metrics says a tenant has left, from each request's admission)."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.limits import QuotaState
from app.observability import UNKNOWN_CODE, Metrics, configure_logging, outcome_label


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream: io.StringIO, fmt: str) -> str:
    configure_logging("info", fmt, stream)
    log = logging.getLogger("facegate.test")
    log.info("hello", extra={"request_id": "r1", "tenant": "alpha"})
    try:
        raise ValueError("secret-in-message")
    except ValueError:
        log.exception("failed")
    return stream.getvalue()


def test_json_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    lines = [json.loads(line) for line in _emit(io.StringIO(), "auto").splitlines()]
    assert lines[0]["msg"] == "hello" and lines[0]["request_id"] == "r1" and lines[0]["tenant"] == "alpha"
    assert lines[1]["error"] == "ValueError"
    assert "secret-in-message" not in json.dumps(lines) and "Traceback" not in json.dumps(lines)


def test_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    out = _emit(Tty(), "auto")
    first, second = out.splitlines()
    assert "INFO" in first and "hello" in first and "request_id=r1" in first
    assert not first.startswith("{")
    assert "error=ValueError" in second and "Traceback" not in out and "secret-in-message" not in out


# --- quota gauges ---------------------------------------------------------------------------


def quotas(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name.startswith("facegate_quota_"):
                out[(s.name.removeprefix("facegate_quota_"), s.labels["tenant"], s.labels["window"])] = s.value
    return out


def seen(metrics: Metrics, tenant: str, *states: QuotaState) -> None:
    metrics.request_done(
        "/v1/faces/analyze", "POST", 200, tenant, seconds=0.01, cache="miss", outcome=None, quotas=states
    )


def test_limit_and_remaining_follow_the_latest_admission() -> None:
    m = Metrics()
    seen(m, "acme", QuotaState("daily", 10, 3, 3600, 86400), QuotaState("monthly", None, 3, 86400, 2592000))
    assert quotas(m) == {("limit", "acme", "daily"): 10, ("remaining", "acme", "daily"): 7}  # monthly unlimited
    seen(m, "acme", QuotaState("daily", 10, 12, 3500, 86400))  # over (reserved, then refused)
    assert quotas(m)[("remaining", "acme", "daily")] == 0
    seen(m, "acme", QuotaState("daily", 50, 12, 3400, 86400))  # tenants file reloaded: a larger quota
    assert quotas(m) == {("limit", "acme", "daily"): 50, ("remaining", "acme", "daily"): 38}
    seen(m, "acme", QuotaState("daily", None, 12, 3300, 86400))  # now unlimited: no series at all
    assert quotas(m) == {}
    # A request without an admission (e.g. 401) changes nothing.
    m.request_done("/v1/faces/analyze", "POST", 401, "-", seconds=0.01, cache=None, outcome="unauthorized")
    assert quotas(m) == {}


def test_a_window_that_reset_shows_its_whole_limit_again() -> None:
    now = [1_000_000.0]
    m = Metrics(clock=lambda: now[0])
    seen(m, "acme", QuotaState("daily", 10, 9, 60, 86400), QuotaState("monthly", 100, 9, 3600, 2592000))
    assert quotas(m)[("remaining", "acme", "daily")] == 1
    now[0] += 61  # the daily window runs out
    got = quotas(m)
    assert got[("remaining", "acme", "daily")] == 10  # no request since: the new window is untouched here
    assert got[("remaining", "acme", "monthly")] == 91  # that window has not reset
    seen(m, "acme", QuotaState("daily", 10, 1, 86000, 86400))  # the next request says where the new day is
    assert quotas(m)[("remaining", "acme", "daily")] == 9


def test_upstream_outcome_labels_are_bounded() -> None:
    """ailabapi chooses its error codes; label values must not be chosen by the upstream."""
    metrics = Metrics()
    for outcome in ("ok", "timeout", "ERROR_BLURRY_FACE", "SOMETHING_NEW_FROM_AILABAPI", "<script>", "x" * 500):
        metrics.upstream_attempt(outcome, 0.1)
    text = metrics.exposition().decode()
    values = sorted(set(re.findall(r'facegate_upstream_calls_total\{outcome="([^"]*)"\}', text)))
    assert values == ["ERROR_BLURRY_FACE", UNKNOWN_CODE, "ok", "timeout"]
    assert outcome_label("ERROR_BLURRY_FACE") == "ERROR_BLURRY_FACE"


def test_tenants_reload_failures_are_counted() -> None:
    metrics = Metrics()
    metrics.tenants_reloaded(True)
    metrics.tenants_reloaded(False)
    metrics.tenants_reloaded(False)
    text = metrics.exposition().decode()
    assert 'facegate_tenants_reloads_total{result="ok"} 1.0' in text
    assert 'facegate_tenants_reloads_total{result="error"} 2.0' in text
