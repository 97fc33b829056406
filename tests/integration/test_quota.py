"""Rate limits and quotas through real gateway processes, one real Redis and the simulator.

The headline: three replicas, one Redis, 2,000 concurrent billable requests against a
daily quota of 500 make exactly 500 upstream calls — and with failures injected, every
failed call is refunded. The rest: the upstream key's limits across replicas, hot reload, shared and
separate budgets, Redis down (closed and open), /v1/usage against the simulator's own
count and the operator CLI, and how many Redis commands a request costs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import purge, singleflight
from app.limits.redis import _lua
from app.tenants import hash_key, new_key
from tests.conftest import PY, Gateway, Sim, start_gateway, unique_image, write_tenants
from tests.servers import ROOT, ByteCountingProxy, RedisServer, ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FAST = {
    "FACEGATE_UPSTREAM_RETRIES": "0",
    "FACEGATE_BREAKER_FAILURES": "100000",
    "FACEGATE_BREAKER_RESET_S": "0.2",
    # Two cores run three gateways, the simulator, Redis and the client here: an event loop
    # can stall past the default 1 s, which would count as "Redis down" (fail-closed 503s).
    "FACEGATE_REDIS_TIMEOUT_S": "2",
    "FACEGATE_LOG_LEVEL": "warning",
}
HIGH = {"rate_per_s": 100000, "burst": 100000, "daily_quota": 100000, "monthly_quota": 1000000}


def start_replicas(
    sim_server: ServerProcess, tmp: Path, n: int, tenants_file: Path, keys: dict[str, str], env: dict[str, str]
) -> list[Gateway]:
    """``n`` gateway processes on one Redis prefix (replicas of one deployment), started in parallel."""
    dirs = []
    for i in range(n):
        d = tmp / f"replica{i}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(tenants_file, d / "tenants.toml")
        dirs.append(d)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda d: start_gateway(Sim(sim_server), d, env=env, keys=keys), dirs))


async def blast(urls: list[str], key: str, images: list[bytes], concurrency: int = 100) -> list[tuple[int, Any]]:
    """POST every image once (raw body), spread over ``urls``, ``concurrency`` keep-alive connections.

    A few lines of HTTP/1.1 over asyncio streams instead of httpx: httpx's async pool costs
    milliseconds of CPU per request at this concurrency, which on two cores would measure
    the test client rather than the gateways. Returns (status, None) for a 200, else
    (status, (problem code, Retry-After, RateLimit)).
    """
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for item in enumerate(images):
        queue.put_nowait(item)
    results: list[tuple[int, Any]] = [(0, None)] * len(images)

    async def worker(n: int) -> None:
        host, port = urls[n % len(urls)].removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                i, image = queue.get_nowait()
                head = (
                    f"POST /v1/faces/analyze HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n\r\n"
                )
                writer.write(head.encode() + image)
                await writer.drain()
                status, headers, body = await read_response(reader)
                if status == 200:
                    results[i] = (200, None)
                else:
                    code = json.loads(body).get("code")
                    results[i] = (status, (code, headers.get("retry-after"), headers.get("ratelimit")))
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return results


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split(" ")[1]), headers, body


def usage(gw: Gateway, tenant: str) -> dict[str, Any]:
    with gw.client(tenant) as c:
        r = c.get("/v1/usage")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def small_images(n: int) -> list[bytes]:
    return [unique_image("jpeg", 64, 64) for _ in range(n)]


# --- three replicas, one Redis -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    sim_server: ServerProcess, redis_topology: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Gateway]]:
    tmp = tmp_path_factory.mktemp("cluster")
    tenants_file = tmp / "tenants.toml"
    keys = write_tenants(
        tenants_file,
        {"exact": {"daily_quota": 500}, "flaky": {"daily_quota": 500}, "edge": {"daily_quota": 1}, "warm": {}},
        HIGH,
    )
    env = {
        **FAST,
        "FACEGATE_REDIS_URL": redis_topology,
        "FACEGATE_REDIS_PREFIX": "t" + uuid.uuid4().hex[:12],
        "FACEGATE_UPSTREAM_MAX_CONCURRENCY": "32",
    }
    gws = start_replicas(sim_server, tmp, 3, tenants_file, keys, env)
    try:
        yield gws
    finally:
        for gw in gws:
            gw.server.stop()


@pytest.mark.topology("cluster")
async def test_three_replicas_2000_requests_daily_quota_500_exactly(cluster: list[Gateway], sim: Sim) -> None:
    results = await blast([gw.url for gw in cluster], cluster[0].key("exact"), small_images(2000))
    outcomes = Counter(status if status == 200 else (status, detail[0]) for status, detail in results)
    assert outcomes == {200: 500, (429, "quota_exceeded"): 1500}
    stats = sim.stats()
    assert (stats["calls"], stats["ok"], stats["throttled"]) == (500, 500, 0)
    refused = [detail for status, detail in results if status == 429]
    assert all(int(retry) >= 1 for _, retry, _ in refused), "Retry-After to the end of the UTC day"
    assert all('"daily";r=0' in ratelimit for _, _, ratelimit in refused)
    for gw in cluster:  # every replica reads the same counters
        u = usage(gw, "exact")
        assert u["quotas"]["daily"] | {"reset_s": 0, "reset_at": ""} == {
            "limit": 500,
            "used": 500,
            "remaining": 0,
            "reset_s": 0,
            "reset_at": "",
        }
        assert u["credits_spent"] == {"day": 500, "month": 500}
        assert u["cache"]["day"] == {"hits": 0, "misses": 500}


async def test_three_replicas_failed_calls_are_refunded(cluster: list[Gateway], sim: Sim) -> None:
    """30 % of upstream calls fail (not billed): each is refunded, so used == calls that succeeded.

    A failure rate like this also trips the circuit breakers now and then (their 503s never
    reach the upstream and are refunded too); the counts below hold either way.
    """
    sim.faults({"mode": "status", "status": 500, "probability": 0.3, "count": None})
    results = await blast([gw.url for gw in cluster], cluster[0].key("flaky"), small_images(2000))
    outcomes = Counter(status if status == 200 else (status, detail[0]) for status, detail in results)
    ok, failed = outcomes[200], outcomes[(502, "upstream_error")]
    refused, breaker = outcomes[(429, "quota_exceeded")], outcomes[(503, "upstream_unavailable")]
    assert ok + failed + refused + breaker == 2000, outcomes
    assert failed > 50, outcomes
    stats = sim.stats()
    assert stats["ok"] == ok, "every 200 is one billed upstream call"
    assert stats["calls"] == ok + failed, "retries are off: one upstream call per forwarded request"
    assert 0 < ok <= 500
    u = usage(cluster[2], "flaky")
    assert u["quotas"]["daily"]["used"] == ok, "failed calls refunded: used equals successful calls"
    assert u["credits_spent"]["day"] == ok
    # Every reservation was settled, so a second wave uses the quota up to exactly 500.
    sim.faults()
    await asyncio.sleep(0.3)  # FACEGATE_BREAKER_RESET_S: a breaker that tripped may probe again
    for gw in cluster:  # one good call each closes any breaker left open or half-open
        assert (await blast([gw.url], gw.key("warm"), small_images(1), concurrency=1)) == [(200, None)]
    more = Counter(
        s for s, _ in await blast([gw.url for gw in cluster], cluster[0].key("flaky"), small_images(600 - ok))
    )
    assert (more[200], more[429], sum(more.values())) == (500 - ok, 100, 600 - ok)
    assert usage(cluster[0], "flaky")["quotas"]["daily"]["used"] == 500


@pytest.mark.topology("cluster")
async def test_collapsed_followers_on_other_replicas_are_free_even_at_the_quota_edge(
    cluster: list[Gateway], sim: Sim
) -> None:
    """daily_quota = 1: the leader holds the only unit; followers elsewhere wait for its answer."""
    sim.faults(latency_ms=600)
    image = unique_image("jpeg", 64, 64)
    key = cluster[0].key("edge")
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:

        async def post(url: str) -> httpx.Response:
            return await client.post(url + "/v1/faces/analyze", content=image, headers={"Content-Type": "image/jpeg"})

        leader = asyncio.create_task(post(cluster[0].url))
        await asyncio.sleep(0.2)  # the leader holds its reservation and the cross-replica lease
        followers = await asyncio.gather(*(post(cluster[i % 3].url) for i in range(9)))
        first = await leader
    assert [r.status_code for r in [first, *followers]] == [200] * 10, [r.text for r in followers]
    assert sim.calls == 1
    assert {r.json()["source"]["upstream_request_id"] for r in [first, *followers]} == {
        first.json()["source"]["upstream_request_id"]
    }
    u = usage(cluster[1], "edge")
    assert (u["quotas"]["daily"]["used"], u["credits_spent"]["day"]) == (1, 1)


# --- one Redis gateway with several tenants ----------------------------------------------


@pytest.fixture(scope="module")
def multi(sim_server: ServerProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("multi")
    keys = {name: new_key() for name in ("pair1", "pair2", "solo", "slow", "hits", "junk", "count")}
    text = f"""
[defaults]
rate_per_s = 100000
burst = 100000
daily_quota = 100000
monthly_quota = "unlimited"

[tenants.pair]
key_sha256 = ["{hash_key(keys["pair1"])}", "{hash_key(keys["pair2"])}"]
daily_quota = 3

[tenants.solo]
key_sha256 = ["{hash_key(keys["solo"])}"]
daily_quota = 3

[tenants.slow]
key_sha256 = ["{hash_key(keys["slow"])}"]
rate_per_s = 5
burst = 3

[tenants.hits]
key_sha256 = ["{hash_key(keys["hits"])}"]
rate_per_s = 0.2
burst = 2

[tenants.junk]
key_sha256 = ["{hash_key(keys["junk"])}"]
rate_per_s = 0.2
burst = 2

[tenants.count]
key_sha256 = ["{hash_key(keys["count"])}"]
daily_quota = 50
monthly_quota = 500
"""
    (tmp / "tenants.toml").write_text(text)
    env = {**FAST, "FACEGATE_REDIS_URL": redis_url}
    gw = start_gateway(Sim(sim_server), tmp, env=env, keys=keys)
    try:
        yield gw
    finally:
        gw.server.stop()


def test_two_keys_of_one_tenant_share_one_budget_and_tenants_are_isolated(multi: Gateway, sim: Sim) -> None:
    assert [multi.analyze(unique_image(), tenant="pair1").status_code for _ in range(2)] == [200, 200]
    assert multi.analyze(unique_image(), tenant="pair2").status_code == 200
    for key in ("pair1", "pair2"):
        refused = multi.analyze(unique_image(), tenant=key)
        assert refused.status_code == 429
        assert refused.json()["code"] == "quota_exceeded"
    # One budget: the same numbers for both keys (reset_s may tick over a second between the two calls).
    first, second = usage(multi, "pair1")["quotas"], usage(multi, "pair2")["quotas"]
    for window in first.keys() | second.keys():
        assert abs(first[window].pop("reset_s") - second[window].pop("reset_s")) <= 1
    assert first == second
    assert usage(multi, "pair1")["tenant"] == "pair"
    # Another tenant with the same limits is untouched by pair's spending.
    assert multi.analyze(unique_image(), tenant="solo").status_code == 200
    assert usage(multi, "solo")["quotas"]["daily"]["used"] == 1
    assert sim.calls == 4


def test_rate_limit_over_a_real_short_window(multi: Gateway, sim: Sim) -> None:
    """5/s with a burst of 3: counts, not durations — what a slow machine lets through is bounded."""
    with multi.client("slow") as c:
        started = time.monotonic()
        answers = [c.get("/v1/usage") for _ in range(12)]
        elapsed = time.monotonic() - started
        passed = sum(r.status_code == 200 for r in answers)
        assert 3 <= passed <= 3 + int(elapsed * 5) + 1, (passed, elapsed)
        refused = [r for r in answers if r.status_code != 200]
        assert refused
        assert all(r.status_code == 429 and r.json()["code"] == "rate_limited" for r in refused)
        retry = int(refused[-1].headers["retry-after"])
        assert retry == 1
        time.sleep(retry)
        assert c.get("/v1/usage").status_code == 200, "after Retry-After the next request passes"


def test_cache_hits_count_against_the_rate_limit_but_not_the_quota(multi: Gateway, sim: Sim) -> None:
    image = unique_image()
    first, second, third = (multi.analyze(image, tenant="hits") for _ in range(3))
    assert first.status_code == 200
    assert first.headers["cache-status"].endswith("stored")
    assert second.status_code == 200
    assert second.headers["cache-status"].startswith("facegate; hit")
    assert third.status_code == 429
    assert third.json()["code"] == "rate_limited"
    assert sim.calls == 1


def test_refused_uploads_count_against_the_rate_limit(multi: Gateway, sim: Sim) -> None:
    bad = [
        multi.analyze_files({"image": ("x.jpg", b"not an image at all", "image/jpeg")}, tenant="junk") for _ in range(3)
    ]
    assert all(r.status_code in (415, 422) for r in bad[:2]), [r.text for r in bad]
    assert all("ratelimit" in r.headers for r in bad[:2]), "a refused upload still says where the tenant stands"
    assert bad[2].status_code == 429
    assert bad[2].json()["code"] == "rate_limited"
    assert sim.calls == 0


def test_usage_matches_the_simulator_and_the_operator_cli(multi: Gateway, sim: Sim, redis_url: str) -> None:
    fresh = [unique_image() for _ in range(5)]
    assert all(multi.analyze(img, tenant="count").status_code == 200 for img in fresh)
    assert all(multi.analyze(fresh[i], tenant="count").status_code == 200 for i in range(3))  # hits
    sim.faults({"mode": "status", "status": 503, "count": 1})
    assert multi.analyze(unique_image(), tenant="count").status_code >= 500
    stats = sim.stats()
    u = usage(multi, "count")
    assert u["quotas"]["daily"]["used"] == stats["ok"] == 5
    assert u["quotas"]["monthly"]["used"] == 5
    assert u["credits_spent"] == {"day": stats["ok"], "month": stats["ok"]}
    assert u["cache"]["day"] == {"hits": 3, "misses": stats["calls"]} == {"hits": 3, "misses": 6}
    assert u["quotas"]["daily"]["remaining"] == 45
    assert u["quotas"]["monthly"]["remaining"] == 495
    assert u["quotas"]["daily"]["reset_at"].endswith("T00:00:00Z")
    assert u["quotas"]["monthly"]["reset_at"][8:] == "01T00:00:00Z"
    assert [p["name"] for p in u["policies"]] == ["burst", "daily", "monthly"]

    env = {
        **os.environ,
        "FACEGATE_REDIS_URL": redis_url,
        "FACEGATE_REDIS_PREFIX": multi.env["FACEGATE_REDIS_PREFIX"],
        "FACEGATE_TENANTS_FILE": str(multi.tenants_file),
    }
    argv = [PY, "-m", "app", "usage", "--tenant", "count", "--json"]
    out = subprocess.run(argv, check=False, env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    (cli,) = json.loads(out.stdout)
    for field in ("tenant", "policies", "credits_spent", "cache"):
        assert cli[field] == u[field], field
    for window in ("daily", "monthly"):
        assert {k: v for k, v in cli["quotas"][window].items() if k != "reset_s"} == {
            k: v for k, v in u["quotas"][window].items() if k != "reset_s"
        }
    argv = [PY, "-m", "app", "usage"]
    table = subprocess.run(argv, check=False, env=env, cwd=ROOT, capture_output=True, timeout=30, text=True)
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("count "))
    assert "5/50" in line
    assert "5/500" in line
    assert "3/6" in line


# --- the upstream key's limits across replicas ----------------------------------------------


async def test_the_pool_keeps_two_replicas_under_the_upstream_limits(
    sim_server: ServerProcess, sim: Sim, redis_url: str, tmp_path: Path
) -> None:
    """The simulator throttles past 2 in flight or 20/s; the gateways must never make it."""
    async with httpx.AsyncClient(timeout=5) as client:
        (await client.post(sim.url + "/_sim/limits", json={"max_concurrency": 2, "qps": 20})).raise_for_status()
    sim.faults(latency_ms=100)
    tenants_file = tmp_path / "tenants.toml"
    keys = write_tenants(tenants_file, {"g": {}}, HIGH)
    env = {
        **FAST,
        "FACEGATE_REDIS_URL": redis_url,
        "FACEGATE_REDIS_PREFIX": "t" + uuid.uuid4().hex[:12],
        "FACEGATE_UPSTREAM_QPS": "20",
        "FACEGATE_UPSTREAM_MAX_CONCURRENCY": "2",
        "FACEGATE_UPSTREAM_QUEUE_TIMEOUT_S": "0.6",
    }
    gws = start_replicas(sim_server, tmp_path, 2, tenants_file, keys, env)
    try:
        results = await blast([gw.url for gw in gws], keys["g"], small_images(40), concurrency=40)
        stats = sim.stats()
        outcomes = Counter(status if status == 200 else (status, detail[0]) for status, detail in results)
        assert stats["throttled"] == 0, "the pool, not the upstream, must say no"
        ok, queued_out = outcomes[200], outcomes[(503, "upstream_unavailable")]
        assert ok + queued_out == 40, outcomes
        assert ok >= 2, outcomes
        assert queued_out > 0, outcomes
        assert stats["calls"] == ok
        assert all(int(d[1]) >= 1 for s, d in results if s == 503), "503 with Retry-After"
        assert usage(gws[0], "g")["quotas"]["daily"]["used"] == ok, "queue timeouts are refunded"
    finally:
        for gw in gws:
            gw.server.stop()


# --- hot reload ----------------------------------------------------------------------------


def wait_for(check: Any, timeout: float = 6.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_limits_and_keys_reload_without_restart_counters_kept(gateway_factory: Any, sim: Sim, redis_url: str) -> None:
    old_key, new = new_key(), new_key()
    gw: Gateway = gateway_factory(
        tenants={"r": {"key": old_key, "daily_quota": 2}}, defaults=HIGH, env={**FAST, "FACEGATE_REDIS_URL": redis_url}
    )
    path = gw.tenants_file

    def write(daily: int, keys: list[str]) -> None:
        hashes = ", ".join(f'"{hash_key(k)}"' for k in keys)
        path.write_text(
            f"[defaults]\nrate_per_s = 100000\nburst = 100000\nmonthly_quota = 1000000\n\n"
            f"[tenants.r]\nkey_sha256 = [{hashes}]\ndaily_quota = {daily}\n"
        )

    def limit_is(n: int, key: str = old_key) -> bool:
        r = httpx.get(gw.url + "/v1/usage", headers={"X-API-Key": key}, timeout=5)
        return r.status_code == 200 and r.json()["quotas"]["daily"]["limit"] == n

    assert [gw.analyze(unique_image(), tenant="r").status_code for _ in range(3)] == [200, 200, 429]
    write(4, [old_key])  # the file poll picks it up
    assert wait_for(lambda: limit_is(4)), "new limit not live within the poll interval"
    assert [gw.analyze(unique_image(), tenant="r").status_code for _ in range(3)] == [200, 200, 429], (
        "the 2 calls made before the reload still count"
    )
    # Rotation: a second key, then the first one removed.
    write(4, [old_key, new])
    assert wait_for(lambda: limit_is(4, new))
    write(4, [new])
    assert wait_for(lambda: httpx.get(gw.url + "/v1/usage", headers={"X-API-Key": old_key}).status_code == 401)
    assert usage_by_key(gw, new)["quotas"]["daily"]["used"] == 4

    # SIGHUP: an in-place edit that keeps size, mtime and inode is invisible to the poll.
    st = os.stat(path)
    edited = path.read_text().replace("daily_quota = 4", "daily_quota = 6")
    with path.open("r+") as fh:
        fh.write(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(1.3)
    assert limit_is(4, new), "the poll saw an edit it cannot see: this test would not test SIGHUP"
    os.kill(gw.server.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: limit_is(6, new))
    assert sim.calls == 4


def usage_by_key(gw: Gateway, key: str) -> dict[str, Any]:
    r = httpx.get(gw.url + "/v1/usage", headers={"X-API-Key": key}, timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# --- Redis down ------------------------------------------------------------------------------


def test_redis_down_fail_closed_refuses_billable_calls_but_serves_cache_hits(
    gateway_factory: Any, sim: Sim, own_redis: RedisServer
) -> None:
    gw: Gateway = gateway_factory(
        defaults=HIGH, env={**FAST, "FACEGATE_REDIS_URL": own_redis.url, "FACEGATE_REDIS_TIMEOUT_S": "0.2"}
    )
    known = unique_image()
    assert gw.analyze(known).status_code == 200
    own_redis.stop()
    hit = gw.analyze(known)
    assert hit.status_code == 200, hit.text
    assert hit.headers["cache-status"].startswith("facegate; hit")
    refused = gw.analyze(unique_image())
    assert refused.status_code == 503
    assert refused.json()["code"] == "quota_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    with gw.client() as c:
        assert c.get("/v1/usage").json()["code"] == "quota_unavailable"
    assert sim.calls == 1, "no billable call without quota accounting"
    # Redis back (empty, its scripts gone): billable calls resume by themselves.
    own_redis.start()
    assert wait_for(lambda: gw.analyze(unique_image()).status_code == 200)
    assert usage(gw, "alpha")["quotas"]["daily"]["used"] >= 1


def test_redis_down_fail_open_allows_and_logs(gateway_factory: Any, sim: Sim, own_redis: RedisServer) -> None:
    gw: Gateway = gateway_factory(
        defaults=HIGH,
        env={
            **FAST,
            "FACEGATE_LOG_LEVEL": "info",
            "FACEGATE_REDIS_URL": own_redis.url,
            "FACEGATE_REDIS_TIMEOUT_S": "0.2",
            "FACEGATE_QUOTA_FAIL_MODE": "open",
        },
    )
    known = unique_image()
    assert gw.analyze(known).status_code == 200
    own_redis.stop()
    allowed = gw.analyze(unique_image())
    assert allowed.status_code == 200, allowed.text
    assert "ratelimit" not in allowed.headers, "no numbers to show when the backend could not count"
    assert gw.analyze(known).status_code == 200
    assert sim.calls == 2
    logs = wait_for(lambda: "quota backend unavailable" in gw.logs() and gw.logs())
    assert logs
    assert "billable request for alpha allowed" in logs


# --- Redis commands per request ----------------------------------------------------------------


def test_one_redis_round_trip_for_rate_limit_and_quota(
    sim_server: ServerProcess, sim: Sim, own_redis: RedisServer, tmp_path: Path
) -> None:
    """MONITOR on a Redis of our own: what a miss, an L1 hit and a Redis hit send to Redis."""
    tenants_file = tmp_path / "tenants.toml"
    keys = write_tenants(tenants_file, {"m": {}}, HIGH)
    env = {**FAST, "FACEGATE_REDIS_URL": own_redis.url, "FACEGATE_REDIS_PREFIX": "mon"}
    a, b = start_replicas(sim_server, tmp_path, 2, tenants_file, keys, env)
    monitor_log = tmp_path / "monitor.log"
    admit_sha = hashlib.sha1(_lua("admit").encode()).hexdigest()
    marks = ["miss", "l1-hit", "redis-hit", "end"]
    try:
        a.analyze(unique_image(), tenant="m")  # warm up: scripts loaded, connections open
        b.analyze(unique_image(), tenant="m")
        with monitor_log.open("wb") as out:
            mon = subprocess.Popen(["redis-cli", "-p", str(own_redis.port), "monitor"], stdout=out)
            try:

                def mark(name: str) -> bool:
                    argv = ["redis-cli", "-p", str(own_redis.port), "echo", f"mark-{name}"]
                    return subprocess.run(argv, check=True, capture_output=True).returncode == 0

                def seen(name: str) -> bool:
                    return f'"mark-{name}"'.encode() in monitor_log.read_bytes()

                assert wait_for(lambda: mark("ready") and seen("ready")), "MONITOR did not attach"
                image = unique_image()
                mark("miss")
                assert a.analyze(image, tenant="m").headers["cache-status"].endswith("stored")
                mark("l1-hit")
                assert a.analyze(image, tenant="m").headers["cache-status"].startswith("facegate; hit")
                mark("redis-hit")
                assert b.analyze(image, tenant="m").headers["cache-status"].startswith("facegate; hit")
                mark("end")
                assert wait_for(lambda: seen("end"))
            finally:
                mon.terminate()
                mon.wait(5)
    finally:
        a.server.stop()
        b.server.stop()
    sections: dict[str, list[str]] = {m: [] for m in marks}
    current = None
    for line in monitor_log.read_text(errors="replace").splitlines():
        if '"mark-' in line:
            current = line.rsplit('"mark-', 1)[1].rstrip('"')
            continue
        # (":inv:" lines are the replicas' invalidation leases, renewed every second, not the request's)
        if (
            current in sections
            and current != "end"
            and "[0 lua]" not in line
            and '"PING"' not in line
            and ":inv:" not in line
        ):
            sections[current].append(line.split("] ", 1)[1] if "] " in line else line)
    quota = {name: [c for c in cmds if ":q:{m}:" in c] for name, cmds in sections.items()}
    for name in ("l1-hit", "redis-hit"):
        assert len(quota[name]) == 1, (name, quota[name])
        assert admit_sha in quota[name][0], (name, quota[name])
    # The lookup (admit.lua's hit probe: 6 keys, finds no entry, changes nothing), the admission
    # (rate + reserve + miss count), then the settlement.
    assert len(quota["miss"]) == 3, quota["miss"]
    assert all(admit_sha in c for c in quota["miss"][:2])
    assert f'{admit_sha}" "6"' in quota["miss"][0] and f'{admit_sha}" "5"' in quota["miss"][1]
    assert f'{admit_sha}" "6"' in quota["redis-hit"][0], "a hit read from Redis: the entry read by the admission"
    # The paid answer is stored before the lease is released (one write, run in order): a replica
    # that wins the lease after the release finds the entry instead of paying again.
    release_sha = hashlib.sha1(singleflight._RELEASE.encode()).hexdigest()
    miss = sections["miss"]
    stored_at = next(i for i, c in enumerate(miss) if c.startswith('"SET" "mon:c:'))
    released_at = next(i for i, c in enumerate(miss) if release_sha in c)
    assert stored_at < released_at, miss
    assert sections["l1-hit"] == quota["l1-hit"], "an L1 hit costs exactly one Redis command"


def test_round_trips_per_request_on_one_redis(
    sim_server: ServerProcess, sim: Sim, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Through a proxy that counts round trips (a pipeline is one): a hit costs one (the local
    tier + the admission, or the entry read by the admission's own script on a replica that
    has no copy), a miss four (lookup; reservation + lead bid; key slot; settle, store, index,
    lease and slot release in one write)."""
    heartbeat = hashlib.sha1(purge.REGISTER_SCRIPT.encode()).hexdigest()
    with ByteCountingProxy("127.0.0.1", own_redis.port, background=(heartbeat,)) as proxy:
        tenants_file = tmp_path / "tenants.toml"
        keys = write_tenants(tenants_file, {"m": {}}, HIGH)
        env = {**FAST, "FACEGATE_REDIS_URL": proxy.redis_url, "FACEGATE_REDIS_PREFIX": "rt"}
        a, b = start_replicas(sim_server, tmp_path, 2, tenants_file, keys, env)
        try:
            for gw in (a, b):  # warm up: scripts loaded, connections open
                gw.analyze(unique_image(), tenant="m")

            def trips(send: Callable[[], httpx.Response], status: str) -> int:
                before = proxy.round_trips
                assert status in send().headers["cache-status"]
                return proxy.round_trips - before

            image, other = unique_image(), unique_image()
            assert b.analyze(other, tenant="m").status_code == 200  # stored by b: not in a's local tier

            def lookup() -> httpx.Response:
                with a.client("m") as c:
                    return c.get(f"/v1/faces/analyses/{hashlib.sha256(other).hexdigest()}")

            counts = {
                "miss": trips(lambda: a.analyze(image, tenant="m"), "stored"),
                "local hit": trips(lambda: a.analyze(image, tenant="m"), "hit"),
                "hit from Redis": trips(lambda: b.analyze(image, tenant="m"), "hit"),
                "lookup from Redis": trips(lookup, "hit"),
            }
        finally:
            a.server.stop()
            b.server.stop()
    assert counts == {"miss": 4, "local hit": 1, "hit from Redis": 1, "lookup from Redis": 1}, counts
