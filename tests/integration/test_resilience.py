"""Retries, the circuit breaker and load shedding, proven against the simulator over real sockets.

``test_upstream_errors.py`` maps every single fault with retries off; here retries are on,
and what matters is how many times the simulator was called, how long the answer took,
and that the tenant is charged once whatever happened in between.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sim, start_gateway, unique_image
from tests.servers import ServerProcess


def metric(gw: Gateway, name: str) -> float:
    """One unlabelled sample from /metrics."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def used(gw: Gateway, tenant: str = "alpha") -> tuple[int, int]:
    """(daily quota used, credits spent today)."""
    with gw.client(tenant) as c:
        body = c.get("/v1/usage").json()
    return body["quotas"]["daily"]["used"], body["credits_spent"]["day"]


def timed(gw: Gateway, image: bytes, **kw: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = gw.analyze(image, **kw)
    return response, time.monotonic() - started


# --- retries -------------------------------------------------------------------------------

RETRYING = {
    "FACEGATE_UPSTREAM_RETRIES": "3",
    "FACEGATE_UPSTREAM_TIMEOUT_S": "4",
    # Consecutive failures never open it here; the failure-rate rule needs 20 outcomes
    # within 60 s, and this module's retry tests make fewer than that in all.
    "FACEGATE_BREAKER_FAILURES": "1000",
}


@pytest.fixture(scope="module")
def retrying(sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(Sim(sim_server), tmp_path_factory.mktemp("retrying"), env=RETRYING)
    try:
        yield gw
    finally:
        gw.server.stop()


@pytest.fixture
def retry_gw(retrying: Gateway, sim: Sim) -> Gateway:
    assert metric(retrying, "facegate_upstream_breaker_state") == 0, "an earlier test opened the breaker"
    return retrying


def test_503_twice_then_success_is_one_answer_and_one_charge(retry_gw: Gateway, sim: Sim) -> None:
    before = used(retry_gw)
    sim.faults({"mode": "status", "status": 503, "code": "AI_SERVICE_FLOW_RESTRICTION", "count": 2})
    response, _ = timed(retry_gw, unique_image())
    assert response.status_code == 200, response.text
    assert sim.calls == 3
    assert used(retry_gw) == (before[0] + 1, before[1] + 1), "retries must not multiply quota charges"
    rid = response.headers["x-request-id"]
    line = [x for x in retry_gw.log_lines("facegate.access", of=[rid]) if x["request_id"] == rid]
    assert line[-1]["upstream_attempts"] == 3


def test_429_retry_after_is_honoured(retry_gw: Gateway, sim: Sim) -> None:
    sim.faults({"mode": "status", "status": 429, "code": "EXCEEDING_LIMITS", "retry_after": 1, "count": 1})
    response, elapsed = timed(retry_gw, unique_image())
    assert response.status_code == 200, response.text
    assert sim.calls == 2
    # The jittered backoff alone is at most 0.2 s: waiting a whole second is Retry-After's doing.
    assert elapsed >= 1.0


def test_429_retry_after_beyond_the_deadline_answers_at_once(retry_gw: Gateway, sim: Sim) -> None:
    sim.faults({"mode": "status", "status": 429, "code": "EXCEEDING_LIMITS", "retry_after": 30, "count": 1})
    response, elapsed = timed(retry_gw, unique_image())
    assert response.status_code == 503
    assert response.json()["code"] == "upstream_unavailable"
    assert int(response.headers["retry-after"]) >= 30  # passed on to the caller
    assert sim.calls == 1
    assert elapsed < 2


def test_500_is_not_retried(retry_gw: Gateway, sim: Sim) -> None:
    before = used(retry_gw)
    sim.faults({"mode": "status", "status": 500, "code": "PROCESSING_FAILURE", "count": 1})
    response, _ = timed(retry_gw, unique_image())
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_error"
    assert sim.calls == 1
    assert used(retry_gw) == before, "refunded"


def test_image_verdict_is_not_retried(retry_gw: Gateway, sim: Sim) -> None:
    response, _ = timed(retry_gw, unique_image(sim="error=ERROR_POOR_FACE_QUALITY"))
    assert response.status_code == 422
    assert response.json()["code"] == "upstream_rejected_image"
    assert sim.calls == 1


def test_dropped_answer_is_not_retried(retry_gw: Gateway, sim: Sim) -> None:
    """The upstream had started answering: the call may be billed, so it is not bought twice."""
    sim.faults({"mode": "drop", "count": 1})
    response, _ = timed(retry_gw, unique_image())
    assert response.status_code == 502
    assert response.json()["code"] == "upstream_error"
    assert sim.calls == 1


def test_retries_stay_within_one_overall_deadline(retry_gw: Gateway, sim: Sim) -> None:
    """4 s is the total: a 503 after 1.5 s each time leaves room for 3 attempts, not 4."""
    sim.faults({"mode": "status", "status": 503, "code": "AI_SERVICE_FLOW_RESTRICTION", "count": None}, latency_ms=1500)
    before = used(retry_gw)
    response, elapsed = timed(retry_gw, unique_image())
    sim.faults()
    assert response.status_code in (503, 504), response.text
    assert elapsed < 4 + 1.0, f"the 4 s deadline was not kept ({elapsed:.1f} s)"
    assert 2 <= sim.calls <= 3
    assert used(retry_gw) == before


# --- circuit breaker -----------------------------------------------------------------------


@pytest.fixture
def breaker_gw(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory(
        env={
            "FACEGATE_UPSTREAM_RETRIES": "0",
            "FACEGATE_UPSTREAM_TIMEOUT_S": "3",
            "FACEGATE_BREAKER_FAILURES": "3",
            "FACEGATE_BREAKER_RESET_S": "1",
        }
    )
    return gw


def test_breaker_opens_fails_fast_then_probes_and_recovers(breaker_gw: Gateway, sim: Sim) -> None:
    gw = breaker_gw
    sim.faults({"mode": "status", "status": 500, "code": "PROCESSING_FAILURE", "count": None})
    for _ in range(3):
        assert gw.analyze(unique_image()).status_code == 502
    assert sim.calls == 3
    assert metric(gw, "facegate_upstream_breaker_state") == 2  # open

    response, elapsed = timed(gw, unique_image())
    assert response.status_code == 503
    assert response.json()["code"] == "upstream_unavailable"
    assert response.headers["retry-after"] == "1"  # what is left of the 1 s reset period, rounded up
    assert sim.calls == 3, "an open breaker does not call the upstream"
    assert elapsed < 0.5
    assert httpx.get(gw.url + "/readyz").status_code == 200, "readiness ignores the upstream on purpose"

    # Still failing after the reset period: the one probe fails and the breaker re-opens.
    time.sleep(1.1)
    assert gw.analyze(unique_image()).status_code == 502
    assert sim.calls == 4
    assert metric(gw, "facegate_upstream_breaker_state") == 2

    # The upstream recovers: after the next reset period, one probe goes through and closes it.
    sim.faults()
    time.sleep(1.1)
    response = gw.analyze(unique_image())
    assert response.status_code == 200, response.text
    assert metric(gw, "facegate_upstream_breaker_state") == 0
    assert gw.analyze(unique_image()).status_code == 200
    assert sim.calls == 6
    assert used(gw) == (2, 2), "only the two answers were charged"

    logs = gw.logs()
    for transition in ("closed -> open", "open -> half_open", "half_open -> open", "half_open -> closed"):
        assert f"upstream circuit breaker {transition}" in logs


def test_half_open_breaker_lets_one_probe_through(breaker_gw: Gateway, sim: Sim) -> None:
    gw = breaker_gw
    sim.faults({"mode": "status", "status": 500, "code": "PROCESSING_FAILURE", "count": 3})
    for _ in range(3):
        gw.analyze(unique_image())
    assert metric(gw, "facegate_upstream_breaker_state") == 2
    time.sleep(1.1)
    sim.faults(latency_ms=1500)  # healthy but slow: the probe is out while the others arrive
    results: list[int] = []

    def call() -> None:
        results.append(gw.analyze(unique_image()).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 503, 503, 503, 503, 503]
    assert sim.calls == 4  # 3 failures + 1 probe
    assert metric(gw, "facegate_upstream_breaker_state") == 0


# --- load shedding and memory ---------------------------------------------------------------


def open_fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def test_large_upload_spools_to_disk_and_leaves_nothing_behind(gateway_factory: Any, sim: Sim, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gw: Gateway = gateway_factory(env={"FACEGATE_SPOOL_DIR": str(spool), "FACEGATE_SPOOL_THRESHOLD_BYTES": "65536"})
    pid = gw.server.proc.pid
    image = unique_image("png", 384, 384)  # ~440 KB of noise: well over the threshold
    assert len(image) > 4 * 65536
    sim.faults(latency_ms=1500)
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(gw.analyze(image)))
    worker.start()
    spooled: list[str] = []
    deadline = time.monotonic() + 5
    while not spooled and time.monotonic() < deadline:
        spooled = [p for p in open_fds(pid) if p.startswith(str(spool))]
        time.sleep(0.05)
    worker.join(15)
    assert spooled, "the upload was held in memory, not spooled to FACEGATE_SPOOL_DIR"
    assert len(result) == 1
    assert result[0].status_code == 200, result
    assert result[0].json()["image"]["bytes"] == len(image)
    assert sim.calls == 1
    time.sleep(0.2)
    assert not [p for p in open_fds(pid) if p.startswith(str(spool))], "spool file still open"
    assert list(spool.iterdir()) == []


def test_uploads_over_the_cap_are_shed_with_503(gateway_factory: Any, sim: Sim) -> None:
    env = {
        "FACEGATE_MAX_UPLOADS_IN_FLIGHT": "2",
        "FACEGATE_MAX_UPLOADS_PER_TENANT": "2",
        "FACEGATE_BODY_TIMEOUT_S": "20",
    }
    gw: Gateway = gateway_factory(env=env)
    host, port = gw.url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(2):  # two uploads that announce 1 MB and send 3 bytes: they hold their slots
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(
            b"POST /v1/faces/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n"
            b"Authorization: Bearer " + gw.key().encode() + b"\r\n\r\n\xff\xd8\xff"
        )
        stalled.append(s)
    deadline = time.monotonic() + 5
    while metric(gw, "facegate_uploads_in_flight") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gw, "facegate_uploads_in_flight") == 2
    response, elapsed = timed(gw, unique_image())
    assert response.status_code == 503
    assert response.json()["code"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    assert elapsed < 1
    for s in stalled:  # the stalled clients give up: their slots come back
        s.close()
    deadline = time.monotonic() + 5
    while metric(gw, "facegate_uploads_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.analyze(unique_image()).status_code == 200
    assert sim.calls == 1
    assert "unhandled error" not in gw.logs(), "a client hanging up is not a server error"
