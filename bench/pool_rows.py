"""Rows 8-10: the upstream key pool and its fair queue (issue 13), measured at the simulator.

8. fair share: one tenant floods, another trickles, three replicas, default limits;
9. failover: key A runs out of credits mid-run, B takes over;
10. two keys of 5 calls/s: the pool sustains their sum (a single key in the same run as baseline).

The simulator enforces the configured limits per key itself (token bucket, calls in flight)
and counts per key (``/_sim/keys``), so "within its limits" is what the upstream saw, not
what the gateway believes it did.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from app.tenants import new_key, paste_line
from bench import images, procs
from bench.rows import ANALYZE, Bench, verdict

POOL_TENANTS = ("flood", "trickle", "batch")


def _tenants(b: Bench) -> tuple[Path, dict[str, str]]:
    keys = {name: new_key() for name in POOL_TENANTS}
    path = b.workdir / "pool-tenants.toml"
    lines = ["[defaults]", "rate_per_s = 1000000.0", "burst = 1000000", "daily_quota = 1000000000"]
    lines.append("monthly_quota = 1000000000")
    for name, key in keys.items():
        lines += ["", f"[tenants.{name}]", paste_line(key)]
    path.write_text("\n".join(lines) + "\n")
    return path, keys


def _keys_file(b: Bench, keys: dict[str, tuple[str, dict[str, Any]]]) -> Path:
    path = b.workdir / f"upstream-keys-{secrets.token_hex(3)}.toml"
    lines = []
    for name, (secret, fields) in keys.items():
        lines += [f"[keys.{name}]", f'key = "{secret}"', *(f"{k} = {v!r}" for k, v in fields.items()), ""]
    path.write_text("\n".join(lines))
    return path


def _replicas(b: Bench, n: int, name: str, extra: dict[str, str]) -> list[procs.Server]:
    assert b.redis_url
    tenants, _ = b.pool_tenants
    prefix = procs.new_prefix()
    b.prefixes.append(prefix)
    out = []
    for i in range(n):
        env = procs.gateway_env(b.sim, tenants, redis_url=b.redis_url, prefix=prefix, extra=extra)
        server = procs.start_gateway(f"{name}{i}", env, b.workdir)
        b._servers.append(server)
        out.append(server)
    return out


def _headers(b: Bench, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {b.pool_tenants[1][tenant]}", "Content-Type": images.CONTENT_TYPE}


def _image(b: Bench, tag: str) -> bytes:
    return images.multipart(images.tagged(b.base, f"{b.run_tag}{tag}"))


async def _post(http: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str, float]:
    """(status, problem code, Retry-After seconds) of one upload."""
    try:
        r = await http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__, 1.0
    if r.status_code == 200:
        return 200, "", 0.0
    try:
        code = str(orjson.loads(r.content).get("code", "?"))
    except (orjson.JSONDecodeError, AttributeError):
        code = "?"
    return r.status_code, code, float(r.headers.get("retry-after") or 1)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


def _prepare(b: Bench) -> None:
    if not hasattr(b, "pool_tenants"):
        b.pool_tenants = _tenants(b)  # type: ignore[attr-defined]


# --- row 8: fair share -----------------------------------------------------------------------------


def row8(b: Bench) -> None:
    if not b.redis_url:
        b.line(8, "fair share over 3 replicas", "no Redis: skipped", verdict="SKIP")
        return
    _prepare(b)
    b.sim.reset()
    b.sim.set_latency(200)
    b.sim.limits(qps=5, qps_burst=5, max_concurrency=5)  # ailabapi's limits as the defaults assume them
    replicas = _replicas(b, 3, "pool-fair", {"FACEGATE_UPSTREAM_QPS": "5", "FACEGATE_UPSTREAM_MAX_CONCURRENCY": "5"})
    urls = [r.url + ANALYZE for r in replicas]
    flood_images = [_image(b, f"flood{i:04d}") for i in range(300)]
    flood: Counter[str] = Counter()
    trickle: list[tuple[int, str, float]] = []
    flood_done: list[float] = []

    async def run() -> float:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            todo = list(enumerate(flood_images))

            async def flooder(n: int) -> None:
                # A well-behaved batch client: 60 uploads at a time; a refused one is sent again after
                # its Retry-After, so the flood lasts until all 300 images are analyzed.
                while todo:
                    i, body = todo.pop()
                    while True:
                        status, code, retry = await _post(http, urls[i % 3], _headers(b, "flood"), body)
                        flood[str(status) if status == 200 else f"{status} {code}"] += 1
                        if status == 200:
                            break
                        await asyncio.sleep(min(retry, 5.0))
                flood_done.append(time.perf_counter())

            async def one(i: int) -> None:
                started = time.perf_counter()
                status, code, _ = await _post(http, urls[i % 3], _headers(b, "trickle"), _image(b, f"trickle{i}"))
                trickle.append((status, code, time.perf_counter() - started))

            async def trickler() -> None:
                await asyncio.sleep(2.0)  # the flood is queued by now
                tasks = []
                for i in range(20):  # one every 0.5 s, whatever the previous one is doing
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(0.5)
                await asyncio.gather(*tasks)

            started = time.perf_counter()
            await asyncio.gather(trickler(), *(flooder(n) for n in range(60)))
            return time.perf_counter() - started

    took = asyncio.run(run())
    stats = b.sim.stats()
    account = b.sim.accounts()[procs.SIM_KEY]
    ok = [t for s, _, t in trickle if s == 200]
    p50, p95 = _p(ok, 0.5), _p(ok, 0.95)
    calls_per_s = stats["calls"] / took if took else 0.0
    within = account["throttled"] == 0 and account["max_in_flight"] <= 5
    b.line(
        8,
        "fair share: flood tenant 300 distinct images 60 at a time (retrying after Retry-After), trickle tenant "
        "one every 0.5 s (20), upstream 200 ms, 3 replicas, default limits (5 calls/s, 5 in flight)",
        f"trickle: {len(ok)}/20 answered, p50 {p50:.2f} s, p95 {p95:.2f} s · flood: {flood.get('200', 0)}/300 "
        f"analyzed in {took:.0f} s · upstream: {stats['calls']} calls ({calls_per_s:.1f}/s on average), "
        f"at most {account['max_in_flight']} in flight and {account['max_per_s']} started within any 1 s, "
        f"{account['throttled']} refused by its 5/s limiter",
        "trickle: every answer, p95 ≤ 3 s; upstream within its limits",
        verdict(len(ok) == 20 and p95 <= 3.0 and within),
    )
    b.details.append(
        f"Row 8: flood outcomes {dict(flood)} (a refused upload was sent again after its Retry-After); trickle "
        f"latencies (s) {[round(t, 2) for t in sorted(ok)]}. The simulator enforces 5 calls/s (token bucket of 5) "
        "and 5 in flight per key and counts what it admitted: 'refused by its limiter' = calls over the limits. "
        "'Started within any 1 s' counts arrivals at the simulator; the gateway paces starts 200 ms apart in "
        "Redis time, and network jitter between replicas and the simulator can put a 6th arrival inside a "
        "1 s window without exceeding the rate."
    )
    for r in replicas:
        r.stop()


# --- row 9: failover -----------------------------------------------------------------------------------


def row9(b: Bench) -> None:
    if not b.redis_url:
        b.line(9, "failover between keys", "no Redis: skipped", verdict="SKIP")
        return
    _prepare(b)
    b.sim.reset()
    b.sim.set_latency(100)
    b.sim.limits(qps=5, qps_burst=5, max_concurrency=5)
    a, c = "bench-key-a-" + secrets.token_hex(4), "bench-key-b-" + secrets.token_hex(4)
    b.sim.accounts({a: 50, c: None})
    limits = {"qps": 5, "max_concurrency": 5}
    keys = _keys_file(b, {"a": (a, limits), "b": (c, limits)})
    replicas = _replicas(b, 2, "pool-failover", {"FACEGATE_UPSTREAM_KEYS_FILE": str(keys)})
    outcomes: Counter[str] = Counter()

    async def run() -> float:
        async with httpx.AsyncClient(timeout=60) as http:
            todo = list(range(200))

            async def worker() -> None:
                while todo:
                    i = todo.pop()
                    status, code, _ = await _post(
                        http, replicas[i % 2].url + ANALYZE, _headers(b, "flood"), _image(b, f"failover{i:04d}")
                    )
                    outcomes[str(status) if status == 200 else f"{status} {code}"] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(10)))
            return time.perf_counter() - started

    took = asyncio.run(run())
    accounts = b.sim.accounts()
    errors = sum(v for k, v in outcomes.items() if k != "200")
    b.line(
        9,
        "failover: key A holds 50 credits, key B plenty; 200 distinct images, 10 at a time, 2 replicas, "
        "5 calls/s per key, upstream 100 ms",
        f"{outcomes.get('200', 0)}/200 answered, {errors} errors in {took:.0f} s · key A billed "
        f"{accounts[a]['billed']} (then out), key B billed {accounts[c]['billed']}; "
        f"{accounts[a]['throttled'] + accounts[c]['throttled']} refused by the simulator's limiters",
        "200 answers, ≤ 1 error",
        verdict(outcomes.get("200", 0) >= 199 and errors <= 1),
    )
    b.details.append(
        f"Row 9 outcomes: {dict(outcomes)}; key A: {accounts[a]}; key B: {accounts[c]}. A call that found A empty "
        "(ERROR_NOT_ENOUGH_CREDITS) moved to B at once; A was then out of rotation until a balance check "
        "finds credits again."
    )
    for r in replicas:
        r.stop()


# --- row 10: two keys, twice the rate ---------------------------------------------------------------------


KeysSpec = dict[str, tuple[str, dict[str, Any]]]


def _throughput(b: Bench, name: str, keys: KeysSpec, n: int) -> tuple[float, dict[str, Any]]:
    keys_file = _keys_file(b, keys)
    replicas = _replicas(b, 2, name, {"FACEGATE_UPSTREAM_KEYS_FILE": str(keys_file)})
    starts: list[float] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            todo = list(range(n))

            async def worker() -> None:
                while todo:
                    i = todo.pop()
                    status, _, retry = await _post(
                        http, replicas[i % 2].url + ANALYZE, _headers(b, "batch"), _image(b, f"{name}{i:04d}")
                    )
                    if status == 200:
                        starts.append(time.perf_counter())
                    else:
                        todo.append(i)
                        await asyncio.sleep(retry)

            await asyncio.gather(*(worker() for _ in range(20)))

    before = b.sim.calls()
    asyncio.run(run())
    calls = b.sim.calls() - before
    for r in replicas:
        r.stop()
    # Sustained rate: answers after the first, over the time from the first answer to the last.
    rate = (len(starts) - 1) / (max(starts) - min(starts)) if len(starts) > 1 else 0.0
    return rate, {"answers": len(starts), "upstream calls": calls, "keys": b.sim.accounts()}


def row10(b: Bench) -> None:
    if not b.redis_url:
        b.line(10, "two keys of 5 calls/s", "no Redis: skipped", verdict="SKIP")
        return
    _prepare(b)
    b.sim.reset()
    b.sim.set_latency(200)
    b.sim.limits(qps=5, qps_burst=5, max_concurrency=5)
    one, two, three = ("bench-rate-" + secrets.token_hex(4) for _ in range(3))
    b.sim.accounts({one: None, two: None, three: None})
    limits = {"qps": 5, "max_concurrency": 5}
    single, _ = _throughput(b, "pool-one", {"solo": (one, limits)}, 50)
    double, info = _throughput(b, "pool-two", {"a": (two, limits), "b": (three, limits)}, 100)
    throttled = sum(info["keys"][k]["throttled"] for k in (one, two, three))
    b.line(
        10,
        "one key of 5 calls/s (baseline, same run): 50 distinct images, 20 at a time, 2 replicas",
        f"{single:.2f} calls/s sustained",
    )
    b.line(
        10,
        "two keys of 5 calls/s each: 100 distinct images, 20 at a time, 2 replicas, upstream 200 ms",
        f"{double:.2f} calls/s sustained ({double / single:.2f}x one key) · key a {info['keys'][two]['billed']} "
        f"calls, key b {info['keys'][three]['billed']}; {throttled} refused by the simulator's limiters",
        "≥ 9 calls/s",
        verdict(double >= 9.0 and throttled == 0),
    )
    b.details.append(
        "Row 10: sustained = (answers - 1) / (last answer - first answer), the client's view of the upstream's "
        "rate; each key is paced at 5 starts/s across replicas and the simulator limits each key to 5/s."
    )


POOL_ROWS: dict[int, Callable[[Bench], None]] = {8: row8, 9: row9, 10: row10}
