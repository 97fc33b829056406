"""Helpers for the cache and single-flight tests: parallel gateway start, concurrent uploads,
``Cache-Status`` parsing, metrics scraping."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from app.upstream import contract
from tests.conftest import Gateway

#: Settings every cache/single-flight gateway gets: room for the concurrent uploads we send.
COMMON_ENV = {"FACEGATE_MAX_UPLOADS_IN_FLIGHT": "512"}


def in_parallel(*starts: Callable[[], Gateway]) -> list[Gateway]:
    """Start several gateways at once (each takes about a second, mostly imports).

    If one fails to start, the others are stopped before the error is raised: nobody
    else would, and a leaked process fails the session (ResourceWarning is an error).
    """
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
        done = [f.exception() is None for f in futures]
    if all(done):
        return [f.result() for f in futures]
    for ok, f in zip(done, futures, strict=True):
        if ok:
            f.result().server.stop()
    raise next(exc for f in futures if (exc := f.exception()) is not None)


def sha(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def status(response: httpx.Response) -> str:
    return str(response.headers.get("cache-status", ""))


def ttl_of(response: httpx.Response) -> int:
    match = re.search(r"; ttl=(\d+)", status(response))
    assert match, f"no ttl in Cache-Status {status(response)!r}"
    return int(match.group(1))


def analysis(body: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between a fresh answer and its cached or collapsed copies."""
    source = body["source"]
    return {
        "faces": body["faces"],
        "image": body["image"],
        "analyzed_at": source["analyzed_at"],
        "upstream_request_id": source["upstream_request_id"],
    }


def usage(gw: Gateway, tenant: str = "alpha") -> dict[str, Any]:
    with gw.client(tenant) as c:
        response = c.get("/v1/usage")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def credits_today(gw: Gateway, tenant: str = "alpha") -> int:
    return int(usage(gw, tenant)["credits_spent"]["day"])


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name not in (name, name + "_total"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class Sent:
    """One answer of a concurrent batch (or the transport error that replaced it)."""

    gateway: int
    response: httpx.Response | None
    error: str | None = None

    @property
    def ok(self) -> httpx.Response:
        assert self.response is not None, f"gateway {self.gateway}: {self.error}"
        return self.response


async def _send_all(
    targets: Sequence[tuple[int, Gateway]],
    image: bytes,
    tenant: str,
    per_request_s: float,
    compat: bool,
    headers: dict[str, str] | None,
) -> list[Sent]:
    limits = httpx.Limits(max_connections=len(targets) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=per_request_s, limits=limits) as client:

        async def one(index: int, gw: Gateway) -> Sent:
            if compat:
                url, auth = gw.url + contract.ANALYZE_PATH, {contract.KEY_HEADER: gw.key(tenant)}
            else:
                url, auth = gw.url + "/v1/faces/analyze", {"Authorization": f"Bearer {gw.key(tenant)}"}
            try:
                response = await client.post(
                    url, files={"image": ("x.jpg", image, "image/jpeg")}, headers={**auth, **(headers or {})}
                )
            except httpx.TransportError as exc:
                return Sent(index, None, f"{type(exc).__name__}: {exc}")
            return Sent(index, response)

        return list(await asyncio.gather(*(one(i, gw) for i, gw in targets)))


def send_concurrently(
    gateways: Sequence[Gateway],
    image: bytes,
    n: int,
    *,
    tenant: str = "alpha",
    timeout: float = 30.0,
    compat: bool = False,
    headers: dict[str, str] | None = None,
) -> list[Sent]:
    """``n`` uploads of ``image`` at once, spread round-robin over ``gateways``."""
    targets = [(i % len(gateways), gateways[i % len(gateways)]) for i in range(n)]
    return asyncio.run(_send_all(targets, image, tenant, timeout, compat, headers))


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
