"""The response cache through real gateways: one suite, run against both backends.

``memory``: gateways without Redis (the embedded byte-bounded LRU). ``redis``: gateways on
the session's real Redis (a local LRU tier in front of Redis), each with its own prefix.
Per backend three gateways are started once, in parallel: ``main`` (tenant scope, default
TTLs, a tenant whose quota is one call), ``short`` (shared scope, 2 s TTLs) and ``small``
(a memory bound of a few entries).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.cache import cache_key
from app.singleflight import SHARDS
from app.upstream import contract
from tests.cachekit import (
    COMMON_ENV,
    analysis,
    credits_today,
    in_parallel,
    metric,
    send_concurrently,
    sha,
    status,
    ttl_of,
    usage,
    wait_until,
)
from tests.conftest import Gateway, Sim, start_gateway, topology_url, unique_image, write_tenants
from tests.servers import RedisServer, ServerProcess, redis_client

MISS = "facegate; fwd=uri-miss; stored"
TENANTS: dict[str, dict[str, Any]] = {
    "alpha": {"allow_force": True},
    "beta": {},
    "gamma": {"daily_quota": 1, "monthly_quota": 1},
}
DAY = 86400


@dataclass
class Backend:
    name: str
    main: Gateway
    short: Gateway
    small: Gateway
    redis: Any | None  # a sync client of the topology (tests/servers.py redis_client)

    def stored_scopes(self, gw: Gateway, image: bytes) -> set[str]:
        """Which scopes hold an entry for ``image`` in Redis."""
        assert self.redis is not None
        prefix = gw.env["FACEGATE_REDIS_PREFIX"] + ":c:"
        scopes = ["*", *(f"tenant:{t}" for t in TENANTS)]
        return {s for s in scopes if self.redis.exists(prefix + cache_key(scope=s, sha256=sha(image)))}


@pytest.fixture(scope="module", params=["memory", "redis", "redis-cluster", "redis-sentinel"])
def backend(
    request: pytest.FixtureRequest, sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    env = dict(COMMON_ENV)
    client = None
    if request.param.startswith("redis"):
        url = topology_url(request, request.param.partition("-")[2] or "single")
        env["FACEGATE_REDIS_URL"] = url
        client = redis_client(url)
    sim = Sim(sim_server)
    short_env = {
        **env,
        "FACEGATE_CACHE_SCOPE": "shared",
        "FACEGATE_CACHE_TTL_S": "2",  # 2, not 1: a loaded CI box must still get its hit in time
        "FACEGATE_CACHE_NEGATIVE_TTL_S": "2",
    }
    small_env = {**env, "FACEGATE_CACHE_MEMORY_MAX_BYTES": "8000"}  # two or three analyses

    # Made here, not in the threads below: the session's first mktemp creates (and first clears) the
    # base directory, and three threads doing that at once delete each other's directories.
    dirs = {name: tmp_path_factory.mktemp(f"{request.param}-{name}") for name in ("main", "short", "small")}

    def start(name: str, env: dict[str, str]) -> Gateway:
        return start_gateway(sim, dirs[name], tenants=TENANTS, env=env)

    gateways = in_parallel(
        lambda: start("main", env), lambda: start("short", short_env), lambda: start("small", small_env)
    )
    try:
        yield Backend(request.param, gateways[0], gateways[1], gateways[2], client)
    finally:
        for gw in gateways:
            gw.server.stop()
        if client is not None:
            client.close()


def post(gw: Gateway, image: bytes, tenant: str = "alpha", **headers: str) -> httpx.Response:
    return gw.analyze(image, tenant=tenant, headers=headers)


def compat_post(gw: Gateway, image: bytes, tenant: str = "alpha") -> httpx.Response:
    return httpx.post(
        gw.url + contract.ANALYZE_PATH,
        headers={contract.KEY_HEADER: gw.key(tenant)},
        files={"image": ("a.jpg", image, "image/jpeg")},
        timeout=30,
    )


def lookup(gw: Gateway, digest: str, tenant: str = "alpha") -> httpx.Response:
    with gw.client(tenant) as c:
        return c.get(f"/v1/faces/analyses/{digest}")


# --- hit and miss ---------------------------------------------------------------------------


@pytest.mark.topology("cluster")
def test_miss_then_hit_for_the_same_bytes(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image(sim="faces=2")
    credits = credits_today(gw)
    first = post(gw, image)
    assert first.status_code == 200, first.text
    assert status(first) == MISS
    assert first.json()["source"]["cached"] is False
    second = post(gw, bytes(image))  # another upload of byte-identical content
    assert second.status_code == 200
    assert status(second).startswith("facegate; hit; ttl=")
    assert DAY < ttl_of(second) <= 604800
    body1, body2 = first.json(), second.json()
    assert body2["source"]["cached"] is True
    assert analysis(body2) == analysis(body1)  # the same analysis, normalized again from the raw entry
    assert len(body2["faces"]) == 2
    assert body2["request_id"] != body1["request_id"]
    assert sim.calls == 1
    assert credits_today(gw) == credits + 1  # the hit cost nothing


def test_one_changed_byte_is_a_miss(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image("bmp")
    changed = bytearray(image)
    changed[len(image) // 2] ^= 0x01  # one pixel byte: still a valid BMP, another hash
    assert post(gw, image).status_code == 200
    second = post(gw, bytes(changed))
    assert second.status_code == 200, second.text
    assert status(second) == MISS
    assert second.json()["image"]["sha256"] == sha(bytes(changed)) != sha(image)
    assert sim.calls == 2


def test_entries_expire_after_the_ttl(backend: Backend, sim: Sim) -> None:
    gw = backend.short  # FACEGATE_CACHE_TTL_S=2
    image = unique_image()
    assert status(post(gw, image)) == MISS
    stored = time.monotonic()
    hit = post(gw, image)
    assert status(hit).startswith("facegate; hit; ttl=")
    assert ttl_of(hit) <= 2
    time.sleep(max(0.0, stored + 2.2 - time.monotonic()))
    assert status(post(gw, image)) == MISS
    assert sim.calls == 2


def test_no_face_is_cached_with_the_negative_ttl(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image(sim="faces=0")
    assert status(post(gw, image)) == MISS
    again = post(gw, image)
    assert again.json()["faces"] == []
    assert status(again).startswith("facegate; hit")
    assert DAY - 5 <= ttl_of(again) <= DAY  # FACEGATE_CACHE_NEGATIVE_TTL_S, not the week of a success
    assert sim.calls == 1


def test_a_rejected_image_is_a_cached_verdict(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image(sim="error=ERROR_BLURRY_FACE")
    first = post(gw, image)
    assert first.status_code == 422
    assert first.json()["code"] == "upstream_rejected_image"
    assert status(first) == MISS
    second = post(gw, image)
    assert second.status_code == 422
    assert status(second).startswith("facegate; hit")
    assert sim.calls == 1


def test_transient_errors_are_never_cached(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image()
    sim.faults({"mode": "status", "status": 500})  # not retryable: the caller sees it
    failed = post(gw, image)
    assert failed.status_code == 502, failed.text
    assert status(failed) == "facegate; fwd=uri-miss"  # looked up, forwarded, nothing stored
    ok = post(gw, image)
    assert ok.status_code == 200
    assert status(ok) == MISS
    assert status(post(gw, image)).startswith("facegate; hit")
    assert sim.calls == 2


# --- Cache-Control and X-Facegate-Force -------------------------------------------------------


def test_a_browser_reload_costs_nothing_and_forcing_is_explicit(backend: Backend, sim: Sim) -> None:
    """Cache-Control: no-cache (every browser reload) is answered from the cache; only a tenant
    allowed to force, with X-Facegate-Force, pays for a fresh analysis (counted as forced)."""
    gw = backend.main
    image = unique_image()
    assert status(post(gw, image)) == MISS
    reload = post(gw, image, **{"Cache-Control": "no-cache"})
    assert status(reload).startswith("facegate; hit")
    assert sim.calls == 1
    with gw.client("beta") as c:
        assert status(c.post("/v1/faces/analyze", files={"image": ("x.jpg", image)})) == MISS  # beta's own entry
        refused = c.post("/v1/faces/analyze", files={"image": ("x.jpg", image)}, headers={"X-Facegate-Force": "1"})
    assert refused.status_code == 403
    assert refused.json()["code"] == "force_not_allowed"
    assert sim.calls == 2
    forced = post(gw, image, **{"X-Facegate-Force": "1"})
    assert forced.status_code == 200
    assert status(forced) == "facegate; fwd=request; stored"
    assert forced.json()["source"]["cached"] is False
    assert sim.calls == 3
    hit = post(gw, image)
    assert status(hit).startswith("facegate; hit")
    assert analysis(hit.json()) == analysis(forced.json())  # the forced answer replaced the entry


def test_no_store_answers_without_storing(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image()
    first = post(gw, image, **{"Cache-Control": "no-store"})
    assert first.status_code == 200
    assert status(first) == "facegate; fwd=uri-miss"
    assert status(post(gw, image)) == MISS  # nothing was stored: a second billable call
    assert sim.calls == 2
    # no-store does not skip the lookup: what is cached answers it
    assert status(post(gw, image, **{"Cache-Control": "no-store"})).startswith("facegate; hit")
    assert sim.calls == 2


# --- scope ------------------------------------------------------------------------------------


def test_tenant_scope_keeps_tenants_apart(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image()
    assert status(post(gw, image, "alpha")) == MISS
    assert status(post(gw, image, "beta")) == MISS  # beta pays for its own analysis
    assert status(post(gw, image, "alpha")).startswith("facegate; hit")
    assert status(post(gw, image, "beta")).startswith("facegate; hit")
    assert sim.calls == 2
    assert lookup(gw, sha(image), "beta").status_code == 200
    if backend.redis is not None:
        assert backend.stored_scopes(gw, image) == {"tenant:alpha", "tenant:beta"}


def test_shared_scope_shares_one_entry(backend: Backend, sim: Sim) -> None:
    gw = backend.short  # FACEGATE_CACHE_SCOPE=shared
    image = unique_image()
    assert status(post(gw, image, "alpha")) == MISS
    if backend.redis is not None:
        assert backend.stored_scopes(gw, image) == {"*"}  # one entry, not one per tenant
    hit = post(gw, image, "beta")
    assert status(hit).startswith("facegate; hit")
    assert sim.calls == 1
    assert lookup(gw, sha(image), "gamma").status_code == 200


# --- lookup by hash ---------------------------------------------------------------------------


@pytest.mark.topology("cluster")
def test_lookup_by_hash(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image(sim="faces=3")
    fresh = post(gw, image)
    assert fresh.status_code == 200
    credits, calls = credits_today(gw), sim.calls
    found = lookup(gw, sha(image))
    assert found.status_code == 200, found.text
    assert status(found).startswith("facegate; hit; ttl=")
    assert found.json()["source"]["cached"] is True
    assert analysis(found.json()) == analysis(fresh.json())
    with gw.client() as c:
        landmarks = c.get(f"/v1/faces/analyses/{sha(image)}", params={"landmarks": "true"})
    assert landmarks.status_code == 200
    assert len(landmarks.json()["faces"]) == 3

    other = lookup(gw, sha(image), "beta")  # tenant scope: beta never analyzed it
    assert other.status_code == 404
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["code"] == "not_found"
    absent = lookup(gw, sha(unique_image()))
    assert absent.status_code == 404
    assert absent.json()["code"] == "not_found"
    assert lookup(gw, "ABC").status_code == 400
    assert lookup(gw, sha(image).upper()).status_code == 400
    with httpx.Client(base_url=gw.url) as anonymous:
        assert anonymous.get(f"/v1/faces/analyses/{sha(image)}").status_code == 401

    assert sim.calls == calls  # never an upstream call
    assert credits_today(gw) == credits  # never billable


def test_lookup_never_spends_quota_even_when_it_is_used_up(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image()
    assert post(gw, image, "gamma").status_code == 200  # gamma's only billable call of the day
    assert post(gw, unique_image(), "gamma").json()["code"] == "quota_exceeded"
    assert status(post(gw, image, "gamma")).startswith("facegate; hit")  # a hit costs no quota
    assert lookup(gw, sha(image), "gamma").status_code == 200
    assert usage(gw, "gamma")["quotas"]["daily"]["remaining"] == 0
    assert sim.calls == 1


# --- the drop-in route --------------------------------------------------------------------------


def test_compat_route_and_v1_share_the_cache(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    first, second = unique_image(sim="faces=1"), unique_image(sim="faces=2")
    v1 = post(gw, first)
    compat = compat_post(gw, first)
    assert compat.status_code == 200
    assert status(compat).startswith("facegate; hit")
    assert compat.json()["request_id"] == v1.json()["source"]["upstream_request_id"]  # ailabapi's bytes

    stored = compat_post(gw, second)
    assert stored.status_code == 200
    assert status(stored) == MISS
    back = post(gw, second)
    assert status(back).startswith("facegate; hit")
    assert back.json()["source"]["upstream_request_id"] == stored.json()["request_id"]
    assert len(back.json()["faces"]) == 2
    assert compat_post(gw, second).content == stored.content  # byte for byte
    assert sim.calls == 2


# --- collapsing in one process -------------------------------------------------------------------


@pytest.mark.topology("cluster")
def test_identical_concurrent_requests_in_one_process_make_one_call(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image(sim="faces=1")
    credits = credits_today(gw)
    sim.faults(latency_ms=600)
    answers = send_concurrently([gw], image, 30)
    assert sim.calls == 1
    statuses = [status(a.ok) for a in answers]
    assert all(a.ok.status_code == 200 for a in answers), statuses
    assert statuses.count(MISS) == 1
    assert statuses.count("facegate; fwd=uri-miss; collapsed") >= 20, statuses  # they did overlap
    assert all(s == MISS or "collapsed" in s or s.startswith("facegate; hit") for s in statuses)
    bodies = [a.ok.json() for a in answers]
    assert all(analysis(b) == analysis(bodies[0]) for b in bodies)
    assert len({b["request_id"] for b in bodies}) == 30
    assert credits_today(gw) == credits + 1  # one quota charge for thirty answers


def test_compat_requests_collapse_too(backend: Backend, sim: Sim) -> None:
    gw = backend.main
    image = unique_image()
    sim.faults(latency_ms=400)
    answers = send_concurrently([gw], image, 10, compat=True)
    assert sim.calls == 1
    assert len({a.ok.content for a in answers}) == 1  # the one upstream answer, byte for byte


def test_the_memory_bound_is_applied(backend: Backend, sim: Sim) -> None:
    """``small`` has FACEGATE_CACHE_MEMORY_MAX_BYTES=8000, about two 2-face analyses (~3 KB each).
    Without Redis the oldest entry is evicted (a miss again); with Redis only the local tier is
    bounded and Redis still has it."""
    gw = backend.small
    first = unique_image(sim="faces=2")
    assert status(post(gw, first)) == MISS
    assert status(post(gw, first)).startswith("facegate; hit")
    for _ in range(4):
        assert status(post(gw, unique_image(sim="faces=2"))) == MISS
    again = post(gw, first)
    if backend.redis is None:
        assert status(again) == MISS
        assert sim.calls == 6
    else:
        assert status(again).startswith("facegate; hit")
        assert sim.calls == 5


# --- Redis trouble: the cache fails open and comes back by itself ---------------------------------


def test_redis_outage_fails_open_and_recovers_without_a_restart(
    own_redis: RedisServer, gateway_factory: Any, sim: Sim, tmp_path: Path
) -> None:
    tenants_file = tmp_path / "tenants.toml"
    keys = write_tenants(tenants_file, {"alpha": {}})
    env = {
        **COMMON_ENV,
        "FACEGATE_REDIS_URL": own_redis.url,
        "FACEGATE_REDIS_PREFIX": "o" + uuid.uuid4().hex[:12],
        "FACEGATE_TENANTS_FILE": str(tenants_file),
        "FACEGATE_QUOTA_FAIL_MODE": "open",  # quotas live in Redis too; closed would refuse misses
        "FACEGATE_SINGLEFLIGHT_LOCK_TTL_S": "1",
    }
    one, two = in_parallel(lambda: gateway_factory(keys=keys, env=env), lambda: gateway_factory(keys=keys, env=env))
    assert own_redis.proc is not None
    probe = redis.Redis.from_url(own_redis.url)

    # Up: replicas share entries through Redis.
    hot = unique_image()
    assert status(post(one, hot)) == MISS
    assert status(post(two, hot)).startswith("facegate; hit")

    # Stalled (SIGSTOP: connections hang, every command times out): answered, nothing stored.
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        assert status(post(one, hot)).startswith("facegate; hit")  # the local tier still serves it
        stalled = post(two, unique_image())
        assert stalled.status_code == 200, stalled.text
        assert status(stalled) == "facegate; fwd=uri-miss"  # forwarded, could not be stored
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)

    # Down: a burst is still answered; each replica collapses its own requests.
    own_redis.stop()
    calls = sim.calls
    burst = send_concurrently([one, two], unique_image(), 40)
    assert [a.ok.status_code for a in burst] == [200] * 40
    assert sim.calls == calls + 2  # one call per replica: the price of not coordinating while Redis is down
    for _ in range(5):
        assert post(one, unique_image()).status_code == 200

    # Restarted, empty (as after a flush): used again by itself, no facegate restart.
    own_redis.start()

    def stored_again() -> bool:
        return status(post(one, unique_image())) == MISS  # "stored" means the Redis SET succeeded

    restarted = time.perf_counter()
    wait_until(stored_again, 15, "the cache to store in Redis again", every=0.2)
    print(f"\nRedis restarted: entries stored again after {time.perf_counter() - restarted:.2f}s")
    fresh = unique_image()
    assert status(post(one, fresh)) == MISS
    assert status(post(two, fresh)).startswith("facegate; hit")  # two never saw it: it came from Redis

    def subscribers() -> int:  # the single-flight subscriptions (one per replica, to every shard channel)
        return sum(1 for c in probe.client_list() if int(c.get("sub", 0)) == SHARDS)

    wait_until(lambda: subscribers() == 2, 10, "both replicas to resubscribe", every=0.1)
    sim.faults(latency_ms=800)
    calls = sim.calls
    collapsed = send_concurrently([one, two], unique_image(), 20)
    assert [a.ok.status_code for a in collapsed] == [200] * 20
    assert sim.calls == calls + 1  # coordination across replicas is back too

    for gw in (one, two):
        assert metric(gw, "facegate_cache_errors") > 0
        assert metric(gw, "facegate_redis_errors", component="cache") > 0
        logs = gw.logs()
        # Logged, but not once per request: at most one line per component per 10 s.
        assert 1 <= logs.count("redis unavailable for cache") <= 2, logs
        assert logs.count("single-flight subscription lost") <= 2, logs
        assert logs.count("quota backend unavailable") <= 2, logs
    probe.close()
