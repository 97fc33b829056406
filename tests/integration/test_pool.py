"""The key pool and the fair queue through real gateway processes, one Redis and the simulator.

Every claim of issue 13's proof, over real sockets: a flooding tenant does not starve a
trickling one across three replicas (the upstream never over its limits, measured at the
simulator); a key out of credits mid-run hands its traffic to the next key with at most
one failed request and comes back once topped up; a refused key is disabled until the keys
file changes; all keys exhausted is 503 with Retry-After and no retry storm; a replica
SIGKILLed while holding slots and queue places gives them back within the lease; a tenant
with its own key never touches the shared ones. No timing assertions: waits for a state
poll the operator view until it shows up (bounded), then assert.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sim, start_gateway, unique_image, write_tenants
from tests.unit.test_settings import run_cli

pytestmark = [pytest.mark.redis, pytest.mark.slow]

BASE = {
    "FACEGATE_UPSTREAM_RETRIES": "0",
    "FACEGATE_BREAKER_FAILURES": "100000",
    # Two cores run three gateways, the simulator, Redis and the client: a stalled event loop
    # must not count as "Redis down".
    "FACEGATE_REDIS_TIMEOUT_S": "2",
    "FACEGATE_LOG_LEVEL": "info",
    "FACEGATE_UPSTREAM_LEASE_S": "1",
    "FACEGATE_UPSTREAM_CREDITS_POLL_S": "1",
}
HIGH = {"rate_per_s": 100000, "burst": 100000, "daily_quota": 100000, "monthly_quota": 1000000}


def secret(name: str) -> str:
    return f"sim-{name}-{uuid.uuid4().hex[:8]}"


class Pool:
    """A deployment: replicas on one Redis prefix, one keys file, the simulator's accounts."""

    def __init__(self, sim: Sim, tmp: Path, redis_url: str) -> None:
        self.sim = sim
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.keys_file = tmp / "upstream-keys.toml"
        self.replicas: list[Gateway] = []
        self.tenant_keys: dict[str, str] = {}

    def accounts(self, **balances: float | None) -> None:
        body = {"keys": {key: {"balance": balance} for key, balance in balances.items()}}
        httpx.post(self.sim.url + "/_sim/keys", json=body, timeout=5).raise_for_status()

    def sim_keys(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.sim.url + "/_sim/keys", timeout=5).json()
        return data

    def write_keys(self, keys: dict[str, dict[str, Any]], pool: dict[str, Any] | None = None) -> None:
        lines = []
        if pool:
            lines.append("[pool]")
            lines += [f"{k} = {v!r}" for k, v in pool.items()]
        for name, fields in keys.items():
            lines.append(f"\n[keys.{name}]")
            for k, v in fields.items():
                lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}")
        tmp = self.keys_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.keys_file)  # atomic, like a ConfigMap update

    def start(self, n: int, tenants: dict[str, dict[str, Any]], **env: str) -> list[Gateway]:
        tenants_file = self.tmp / "tenants.toml"
        self.tenant_keys = write_tenants(tenants_file, tenants, HIGH)
        full = {
            **BASE,
            "FACEGATE_REDIS_URL": self.redis_url,
            "FACEGATE_REDIS_PREFIX": self.prefix,
            "FACEGATE_UPSTREAM_URL": self.sim.url,
            "FACEGATE_UPSTREAM_KEYS_FILE": str(self.keys_file),
            **env,
        }
        dirs = []
        for i in range(len(self.replicas), len(self.replicas) + n):
            d = self.tmp / f"replica{i}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(tenants_file, d / "tenants.toml")
            dirs.append(d)
        with ThreadPoolExecutor(n) as workers:
            started = list(workers.map(lambda d: start_gateway(None, d, env=full, keys=self.tenant_keys), dirs))
        self.replicas += started
        return started

    def stop(self) -> None:
        for gw in self.replicas:
            gw.server.stop()

    def view(self, gw: Gateway | None = None) -> dict[str, Any]:
        gw = gw or self.replicas[0]
        with gw.client("operator:ops") as c:
            r = c.get("/admin/upstream-keys")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def state(self, name: str, gw: Gateway | None = None) -> str:
        return str(next(k for k in self.view(gw)["keys"] if k["name"] == name)["state"])

    def wait_for(self, what: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "the state did not show up in time"
            time.sleep(0.1)


@pytest.fixture
def pool(sim: Sim, tmp_path: Path, redis_url: str) -> Iterator[Pool]:
    p = Pool(sim, tmp_path, redis_url)
    try:
        yield p
    finally:
        p.stop()


def analyze(gw: Gateway, tenant: str, image: bytes | None = None, **kw: Any) -> httpx.Response:
    return gw.analyze(image or unique_image(), tenant=tenant, **kw)


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    return gw.log_lines("facegate.access")


# --- raw HTTP for many requests at once (httpx's async pool would load the two cores) ----------


async def post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, key: str, image: bytes
) -> tuple[int, str | None]:
    head = (
        f"POST /v1/faces/analyze HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n\r\n"
    )
    writer.write(head.encode() + image)
    await writer.drain()
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for n, _, v in (ln.partition(":") for ln in lines[1:]) if n.lower() == "content-length")
    body = await reader.readexactly(length)
    return status, None if status == 200 else json.loads(body).get("code")


async def connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    return reader, writer, host


# --- 1. fair share across replicas -------------------------------------------------------------------


def test_a_flood_does_not_starve_a_trickle_across_three_replicas(pool: Pool) -> None:
    """Flood: 40 requests in flight from one tenant; trickle: one request every 0.25 s from another.

    The pool serves 20 calls/s, 4 at once; a call may wait 1 s. In a first-come queue the
    trickle's calls would stand behind ~20 flood calls, a second of waiting, and be refused
    as too late to serve; in the fair queue each goes next.
    """
    a = secret("a")
    pool.accounts(**{a: None})
    httpx.post(pool.sim.url + "/_sim/limits", json={"qps": 20, "max_concurrency": 4}).raise_for_status()
    pool.sim.faults(latency_ms=100)
    pool.write_keys({"main": {"key": a, "qps": 20, "max_concurrency": 4}})
    gws = pool.start(3, {"flood": {}, "trickle": {}}, FACEGATE_UPSTREAM_QUEUE_TIMEOUT_S="1")
    urls = [gw.url for gw in gws]
    flood: Counter[int | tuple[int, str | None]] = Counter()
    trickle: list[tuple[int, str | None]] = []

    done = asyncio.Event()

    async def flooder(n: int) -> None:
        reader, writer, host = await connection(urls[n % 3])
        try:
            while not done.is_set():
                status, code = await post(reader, writer, host, pool.tenant_keys["flood"], unique_image())
                flood[status if status == 200 else (status, code)] += 1
                if status != 200:
                    await asyncio.sleep(0.2)  # a client backing off a little, then trying the next image
        finally:
            writer.close()

    async def trickler() -> None:
        await asyncio.sleep(0.5)  # the flood is in full swing
        for i in range(6):
            reader, writer, host = await connection(urls[i % 3])
            try:
                trickle.append(await post(reader, writer, host, pool.tenant_keys["trickle"], unique_image()))
            finally:
                writer.close()
            await asyncio.sleep(0.25)
        done.set()

    async def run() -> None:
        await asyncio.gather(trickler(), *(flooder(n) for n in range(40)))

    asyncio.run(run())
    assert trickle == [(200, None)] * 6, trickle
    assert flood[200] > 0
    refused = sum(v for k, v in flood.items() if k != 200)
    assert refused > 0, f"the flood did not fill the queue: {flood}"
    # Its excess: 503 while the pool is full of its own calls, 429 while others wait (its share is full).
    assert set(flood) <= {200, (503, "upstream_unavailable"), (429, "upstream_share_exceeded")}, flood
    stats = pool.sim.stats()
    assert stats["throttled"] == 0, "the pool, not the upstream, said no"
    assert stats["max_in_flight"] <= 4
    # Every replica queued and served: the queue is one, across replicas.
    waits = [line for gw in gws for line in access_lines(gw) if line.get("tenant") == "trickle"]
    assert {line["upstream_key"] for line in waits} == {"main"}
    assert all(line["queue_ms"] is not None for line in waits)


# --- 2. failover between keys --------------------------------------------------------------------


def test_key_out_of_credits_moves_to_the_next_and_returns_after_a_top_up(pool: Pool) -> None:
    a, b = secret("a"), secret("b")
    pool.accounts(**{a: 5, b: None})
    pool.write_keys(
        {"a": {"key": a, "qps": 1000, "max_concurrency": 4}, "b": {"key": b, "qps": 1000, "max_concurrency": 4}}
    )
    gws = pool.start(2, {"alpha": {}})
    with ThreadPoolExecutor(4) as workers:
        results = list(workers.map(lambda i: analyze(gws[i % 2], "alpha").status_code, range(24)))
    assert results.count(200) >= 23, Counter(results)
    accounts = pool.sim_keys()
    assert accounts[a]["billed"] == 5
    assert accounts[a]["balance"] == 0
    assert accounts[b]["billed"] == results.count(200) - 5
    assert pool.state("a") == "exhausted"
    view = pool.view(gws[1])
    assert next(k for k in view["keys"] if k["name"] == "a")["reason"] in ("ERROR_NOT_ENOUGH_CREDITS", "BALANCE")
    # Top it up: the next balance check brings it back (one replica checks; all see it).
    pool.accounts(**{a: 100})
    pool.wait_for(lambda: pool.state("a", gws[1]) in ("ok", "low"))
    before = pool.sim_keys()[a]["calls"]
    for i in range(6):
        assert analyze(gws[i % 2], "alpha").status_code == 200
    assert pool.sim_keys()[a]["calls"] > before, "traffic returned to key a"


def test_a_refused_key_is_disabled_until_the_keys_file_changes(pool: Pool) -> None:
    good, fixed = secret("good"), secret("fixed")
    pool.accounts(**{good: None, fixed: None})
    pool.write_keys({"bad": {"key": "revoked-" + uuid.uuid4().hex}, "good": {"key": good}})
    gws = pool.start(2, {"alpha": {}})
    for i in range(6):
        assert analyze(gws[i % 2], "alpha").status_code == 200
    assert pool.state("bad") == "disabled"
    assert pool.sim.stats()["by_code"].get("ERROR_USER_NOT_EXISTS", 0) == 1, "one refusal, then never again"
    audit_before = sum('"upstream_keys.reload"' in line for line in gws[0].logs().splitlines())
    pool.write_keys({"bad": {"key": fixed}, "good": {"key": good}})
    pool.wait_for(lambda: pool.state("bad") == "ok")
    calls = 0
    for i in range(8):
        assert analyze(gws[i % 2], "alpha").status_code == 200
        calls = pool.sim_keys()[fixed]["calls"]
    assert calls > 0, "the fixed key takes calls again"
    reloads = [json.loads(x) for x in gws[0].logs().splitlines() if '"upstream_keys.reload"' in x]
    assert len(reloads) == audit_before + 1
    assert reloads[-1]["details"]["keys_changed"] == {"bad": ["secret"]}
    assert fixed not in gws[0].logs() and good not in gws[0].logs()


def test_all_keys_exhausted_is_503_with_retry_after_and_no_retry_storm(pool: Pool) -> None:
    a, b = secret("a"), secret("b")
    pool.accounts(**{a: 1, b: 1})
    pool.write_keys({"a": {"key": a}, "b": {"key": b}})
    (gw,) = pool.start(1, {"alpha": {}}, FACEGATE_UPSTREAM_CREDITS_POLL_S="30")
    assert [analyze(gw, "alpha").status_code for _ in range(2)] == [200, 200]
    r = analyze(gw, "alpha")
    assert r.status_code == 503
    assert r.json()["code"] == "upstream_keys_unavailable"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    calls = pool.sim.stats()["calls"]
    for _ in range(5):
        r = analyze(gw, "alpha")
        assert (r.status_code, r.json()["code"]) == (503, "upstream_keys_unavailable")
    assert pool.sim.stats()["calls"] == calls, "nobody calls ailabapi with keys known to be empty"
    with gw.client() as c:
        assert c.get("/v1/usage").json()["quotas"]["daily"]["used"] == 2, "refused calls are refunded"
    metrics = httpx.get(gw.url + "/metrics").text
    assert "facegate_upstream_keys_usable 0.0" in metrics
    assert 'facegate_upstream_key_state{key="a",state="exhausted"} 1.0' in metrics
    assert 'facegate_upstream_key_credits{key="a"} 0.0' in metrics


# --- 3. a replica dies holding slots and places ----------------------------------------------------


def test_a_sigkilled_replicas_slots_and_places_return_within_the_lease(pool: Pool) -> None:
    a = secret("a")
    pool.accounts(**{a: None})
    pool.write_keys({"a": {"key": a, "qps": 1000, "max_concurrency": 2}})
    doomed, survivor = pool.start(2, {"alpha": {}}, FACEGATE_UPSTREAM_QUEUE_TIMEOUT_S="8")
    pool.sim.faults({"mode": "hang", "seconds": 60, "count": 2})
    with ThreadPoolExecutor(4) as workers:
        futures = [workers.submit(analyze, doomed, "alpha", timeout=30) for _ in range(4)]
        pool.wait_for(lambda: pool.view(survivor)["waiting"] == 2 and pool.view(survivor)["keys"][0]["in_flight"] == 2)
        doomed.server.proc.send_signal(signal.SIGKILL)
        doomed.server.proc.wait(5)
        for f in futures:
            with pytest.raises(httpx.TransportError):
                f.result()
    # Two slots and two places were held by a dead process; within the 1 s lease they are free.
    results = [analyze(survivor, "alpha") for _ in range(2)]
    assert [r.status_code for r in results] == [200, 200]
    view = pool.view(survivor)
    assert (view["waiting"], view["keys"][0]["in_flight"]) == (0, 0)


# --- 4. a tenant that brings its own account --------------------------------------------------------


def test_a_tenant_with_its_own_key_never_touches_the_shared_ones(pool: Pool) -> None:
    shared, own = secret("shared"), secret("own")
    pool.accounts(**{shared: None, own: 3})
    pool.write_keys({"shared": {"key": shared}, "team-x": {"key": own, "tier": "dedicated"}})
    gws = pool.start(
        2, {"x": {"upstream_key": "team-x"}, "y": {}, "z": {"upstream_key": "team-x", "upstream_fallback": True}}
    )
    assert [analyze(gws[i % 2], "x").status_code for i in range(3)] == [200] * 3
    assert [analyze(gws[i % 2], "y").status_code for i in range(4)] == [200] * 4
    accounts = pool.sim_keys()
    assert (accounts[own]["calls"], accounts[shared]["calls"]) == (3, 4)
    # Its account is empty now: its calls are refused, never billed to the shared key...
    r = analyze(gws[0], "x")
    assert r.status_code == 503 and r.json()["code"] == "upstream_keys_unavailable"
    r = analyze(gws[1], "x")
    assert r.json()["code"] == "upstream_keys_unavailable"
    # ... unless the tenant's config allows falling back.
    assert analyze(gws[0], "z").status_code == 200
    accounts = pool.sim_keys()
    assert accounts[own]["billed"] == 3
    assert accounts[shared]["calls"] == 5, "only y and the fallback tenant z used the shared key"
    assert {
        line["upstream_key"]
        for line in access_lines(gws[0]) + access_lines(gws[1])
        if line.get("tenant") == "x" and line["status"] == 200
    } == {"team-x"}


# --- 5. what the operator sees -------------------------------------------------------------------------


def test_operator_view_metrics_and_logs_name_keys_never_secrets(pool: Pool) -> None:
    a = secret("a")
    pool.accounts(**{a: 42})
    pool.write_keys({"main": {"key": a, "low_credits": 100}})
    (gw,) = pool.start(1, {"alpha": {}, "bulk": {"priority": "batch"}})
    assert analyze(gw, "alpha").status_code == 200
    assert analyze(gw, "alpha", headers={"Priority": "u=7"}).status_code == 200
    assert analyze(gw, "bulk").status_code == 200
    view = pool.view()
    (key,) = view["keys"]
    assert (key["name"], key["tier"], key["state"], key["in_flight"]) == ("main", "primary", "low", 0)
    assert key["balance"] in (39.0, 40.0, 41.0, 42.0)  # read at start, then 1-3 calls billed
    assert view["gated"] is True
    metrics = httpx.get(gw.url + "/metrics").text
    for needle in (
        'facegate_upstream_key_calls_total{key="main",outcome="ok"} 3.0',
        'facegate_upstream_key_state{key="main",state="low"} 1.0',
        'facegate_upstream_key_credits_low{key="main"} 1.0',
        'facegate_upstream_queue_wait_seconds_count{priority="interactive",tenant="alpha"} 1.0',
        'facegate_upstream_queue_wait_seconds_count{priority="batch",tenant="alpha"} 1.0',
        'facegate_upstream_queue_wait_seconds_count{priority="batch",tenant="bulk"} 1.0',
        'facegate_upstream_key_in_flight{key="main"} 0.0',
    ):
        assert needle in metrics, needle
    lines = [x for x in access_lines(gw) if x["route"] == "/v1/faces/analyze"]
    assert {x["upstream_key"] for x in lines} == {"main"}
    assert all(isinstance(x["queue_ms"], float) for x in lines)
    # The same view from the CLI, read from Redis (what `GET /admin/upstream-keys` shows).
    env = {name: value for name, value in gw.env.items() if name.startswith(("FACEGATE_REDIS", "FACEGATE_UPSTREAM"))}
    cli = run_cli("upstream", "status", "--json", env=env)
    assert cli.returncode == 0, cli.stderr
    fields = ("name", "tier", "state", "in_flight", "max_concurrency", "qps", "low_credits")
    (shown,) = json.loads(cli.stdout)["keys"]
    assert {f: shown[f] for f in fields} == {f: key[f] for f in fields}  # balances may have been re-read since
    # The last balance read, less the calls billed since: 42 less the 3 calls, whenever it was read.
    assert shown["balance"] - shown["billed_since_balance"] == 39
    table = run_cli("upstream", "status", env=env)
    assert table.stdout.splitlines()[1].split()[:3] == ["main", "primary", "low"]
    everything = gw.logs() + metrics + json.dumps(view) + cli.stdout + table.stdout
    assert a not in everything
