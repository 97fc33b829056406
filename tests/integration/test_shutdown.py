"""SIGTERM under load: stop accepting, finish what is in flight, settle every reservation.

A real ``facegate serve`` process with Redis quotas takes ~20 slow requests (the
simulator answers after 1 s), gets SIGTERM while they are all at the upstream, and must
answer every one of them, refuse new connections, and exit 0. A second gateway on the
same Redis prefix then reads the quota: exactly one charge per upstream call.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from tests.cachekit import wait_until
from tests.conftest import Gateway, Sim, unique_image

IN_FLIGHT = 20


def refuses_connections(gw: Gateway) -> bool:
    host, port = gw.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return True
    return False


def fire(gw: Gateway, n: int) -> tuple[list[threading.Thread], list[int | str]]:
    """n concurrent uploads of distinct images; results are statuses or exception names."""
    results: list[int | str] = []
    images = [unique_image() for _ in range(n)]

    def one(image: bytes) -> None:
        try:
            results.append(gw.analyze(image).status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=one, args=(img,)) for img in images]
    for t in threads:
        t.start()
    return threads, results


def usage_after(gateway_factory: Any, gw: Gateway) -> dict[str, Any]:
    """Quota as a fresh gateway on the same Redis prefix and tenants sees it."""
    reader: Gateway = gateway_factory(
        keys=gw.keys,
        env={
            "FACEGATE_REDIS_URL": gw.env["FACEGATE_REDIS_URL"],
            "FACEGATE_REDIS_PREFIX": gw.env["FACEGATE_REDIS_PREFIX"],
            "FACEGATE_TENANTS_FILE": str(gw.tenants_file),
        },
    )
    with reader.client() as c:
        body: dict[str, Any] = c.get("/v1/usage").json()
    return body


@pytest.mark.redis
def test_sigterm_finishes_in_flight_requests_and_settles_quota(gateway_factory: Any, sim: Sim, redis_url: str) -> None:
    gw: Gateway = gateway_factory(env={"FACEGATE_REDIS_URL": redis_url, "FACEGATE_SHUTDOWN_GRACE_S": "5"})
    sim.faults(latency_ms=1000)
    threads, results = fire(gw, IN_FLIGHT)
    wait_until(lambda: sim.stats()["in_flight"] == IN_FLIGHT, 10, "all requests to reach the upstream")

    signalled = time.monotonic()
    gw.server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refuses_connections(gw), 2, "the listening socket to close")
    for t in threads:
        t.join(15)
    assert results == [200] * IN_FLIGHT, results
    # uvicorn re-raises the captured SIGTERM once it has shut down gracefully: exit status 143.
    assert gw.server.proc.wait(10) in (0, -signal.SIGTERM)
    took = time.monotonic() - signalled
    assert took < 5, f"shutdown took {took:.1f} s with a 1 s upstream and a 5 s grace"

    logs = gw.logs()
    assert "Traceback" not in logs
    assert "could not commit" not in logs
    assert "could not refund" not in logs
    assert sim.calls == IN_FLIGHT
    usage = usage_after(gateway_factory, gw)
    assert usage["quotas"]["daily"]["used"] == IN_FLIGHT
    assert usage["credits_spent"]["day"] == IN_FLIGHT


@pytest.mark.redis
def test_calls_cut_off_by_the_grace_period_are_refunded(gateway_factory: Any, sim: Sim, redis_url: str) -> None:
    """The upstream takes longer than the grace: the requests fail, and nobody is charged for them."""
    gw: Gateway = gateway_factory(
        env={"FACEGATE_REDIS_URL": redis_url, "FACEGATE_SHUTDOWN_GRACE_S": "1", "FACEGATE_UPSTREAM_TIMEOUT_S": "30"}
    )
    sim.faults(latency_ms=20_000)
    threads, results = fire(gw, 5)
    wait_until(lambda: sim.stats()["in_flight"] == 5, 10, "all requests to reach the upstream")
    signalled = time.monotonic()
    gw.server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(15)
    assert gw.server.proc.wait(10) in (0, -signal.SIGTERM)
    took = time.monotonic() - signalled
    # uvicorn waits the grace for requests, the lifespan once more for detached flights.
    assert took < 2 * 1 + 2, f"shutdown took {took:.1f} s with a 1 s grace"
    assert 200 not in results
    logs = gw.logs()
    assert "Traceback" not in logs
    usage = usage_after(gateway_factory, gw)
    assert usage["quotas"]["daily"]["used"] == 0, "calls cut off by the shutdown must be refunded"
    assert usage["credits_spent"]["day"] == 0
