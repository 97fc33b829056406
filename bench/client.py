"""An asyncio httpx client for the correctness and memory rows (3-5).

Those rows count what happened (upstream calls, admissions, peak memory), not how fast,
so a Python client is fine there; throughput and latency rows use wrk.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson


@dataclass(frozen=True)
class Outcome:
    status: int
    cache: str  # the Cache-Status header's facegate part ("hit", "fwd=uri-miss; stored", ...)
    code: str  # problem code for errors, "" for 200
    seconds: float


def cache_kind(header: str | None) -> str:
    """'hit', 'collapsed', 'miss' (led the call) or '' from a Cache-Status value."""
    if not header:
        return ""
    params = {p.strip().split("=", 1)[0] for p in header.split(";")[1:]}
    if "hit" in params:
        return "hit"
    if "collapsed" in params:
        return "collapsed"
    return "miss"


Body = bytes | Callable[[], AsyncIterator[bytes]]


async def _one(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: Body) -> Outcome:
    started = time.perf_counter()
    content = body if isinstance(body, bytes) else body()
    try:
        r = await client.post(url, content=content, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(0, "", type(exc).__name__, time.perf_counter() - started)
    code = ""
    if r.status_code != 200:
        try:
            code = str(orjson.loads(r.content).get("code", ""))
        except (orjson.JSONDecodeError, AttributeError):
            code = "?"
    return Outcome(r.status_code, cache_kind(r.headers.get("cache-status")), code, time.perf_counter() - started)


async def run_all(
    jobs: Sequence[tuple[str, dict[str, str], Body]], *, concurrency: int, timeout_s: float = 120.0
) -> list[Outcome]:
    """Send every job, at most ``concurrency`` at once (all at once when it is >= len(jobs))."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:

        async def guarded(job: tuple[str, dict[str, str], Body]) -> Outcome:
            async with gate:
                return await _one(client, *job)

        return await asyncio.gather(*(guarded(j) for j in jobs))


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Counts by status (+problem code) and by cache kind, e.g. {'200': 190, '429 quota_exceeded': 10}."""
    out: Counter[str] = Counter()
    for o in outcomes:
        out[f"{o.status} {o.code}".strip() if o.status != 200 else "200"] += 1
        if o.cache:
            out[f"cache:{o.cache}"] += 1
    return dict(sorted(out.items()))
