"""Fair at the door (issue 13 §4): one tenant's slow uploads cannot take every upload slot.

Real slow sockets: a tenant's uploads trickle in a byte at a time, as from a buggy client
on a bad link (or a hostile one with a valid key). They hold that tenant's share of the
process's upload slots and no more; another tenant's upload goes through meanwhile; the
body timeout still ends the slow ones.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Any

import httpx

from tests.conftest import Gateway, Sim, unique_image
from tests.integration.test_digest_first import Reader


def metric(gw: Gateway, name: str, labels: str = "") -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(gw: Gateway, name: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while metric(gw, name) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gw, name) == value, f"{name} never reached {value}"


def slow_upload(gw: Gateway, tenant: str) -> socket.socket:
    """An upload that announces 1 MB and sends its first bytes; the trickler sends the rest, slowly."""
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /v1/faces/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n"
        b"Authorization: Bearer " + gw.key(tenant).encode() + b"\r\n\r\n\xff\xd8\xff"
    )
    return sock


class Trickler(threading.Thread):
    """Sends one byte every 0.2 s on each socket until stopped (5 bytes/s: a trickle, not a stall)."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.send(b"\x00")


def test_one_tenants_trickling_uploads_do_not_block_another_tenants_upload(gateway_factory: Any, sim: Sim) -> None:
    gw: Gateway = gateway_factory(env={"FACEGATE_MAX_UPLOADS_IN_FLIGHT": "4", "FACEGATE_BODY_TIMEOUT_S": "5"})
    holding = [slow_upload(gw, "alpha") for _ in range(2)]
    trickler = Trickler(holding)
    trickler.start()
    try:
        wait_for(gw, "facegate_uploads_in_flight", 2)
        # alpha's share (half of 4) is taken: more of its uploads are refused at once, with a 429 that
        # says it is alpha's own share that is full (not the gateway that is overloaded).
        for _ in range(3):
            with slow_upload(gw, "alpha") as extra:
                status, headers, body = Reader(extra).response()
            assert status == 429
            assert b'"too_many_uploads"' in body
            assert headers["retry-after"] == "1"
        # The process still has room, and beta's uploads go through while alpha's keep trickling.
        for _ in range(2):
            response = gw.analyze(unique_image(), "beta")
            assert response.status_code == 200, response.text
        assert metric(gw, "facegate_uploads_in_flight") == 2  # alpha's two were in flight all along
        labels = '{reason="too_many_uploads",tenant="alpha"}'
        assert metric(gw, "facegate_limit_rejections_total", labels) == 3
        # The body timeout is still the backstop: alpha's trickling uploads end with 408.
        for sock in holding:
            status, _, body = Reader(sock).response()
            assert status == 408
            assert b'"request_timeout"' in body
    finally:
        trickler.done.set()
        trickler.join(5)
        for sock in holding:
            sock.close()
    wait_for(gw, "facegate_uploads_in_flight", 0)
    assert sim.calls == 2


def test_the_process_cap_still_holds_across_tenants(gateway_factory: Any, sim: Sim) -> None:
    gw: Gateway = gateway_factory(
        env={"FACEGATE_MAX_UPLOADS_IN_FLIGHT": "2", "FACEGATE_MAX_UPLOADS_PER_TENANT": "1"},
        tenants={"alpha": {}, "beta": {}, "gamma": {}},
    )
    holding = [slow_upload(gw, "alpha"), slow_upload(gw, "beta")]
    try:
        wait_for(gw, "facegate_uploads_in_flight", 2)
        response = gw.analyze(unique_image(), "gamma")  # within its share, but the process is full
        assert response.status_code == 503
        assert response.json()["code"] == "overloaded"
    finally:
        for sock in holding:
            sock.close()
    wait_for(gw, "facegate_uploads_in_flight", 0)
    assert gw.analyze(unique_image(), "gamma").status_code == 200
    assert sim.calls == 1
