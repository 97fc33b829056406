"""Data governance (issue 15): deletion and per-tenant policy, three replicas on one Redis.

A deletion on one replica is not served by the others on their very next request — not from
Redis, not from their local tiers (proved by removing the Redis copy behind facegate's back
first, so only local tiers still hold it), not from a call that was in flight. Operators
purge a whole tenant and one image across tenants (HTTP and CLI); in ``shared`` scope only
they may delete. Every deletion leaves an audit line without keys. A ``store = false`` tenant
leaves no key about its images in Redis and nothing in local tiers; ``omit`` fields are
absent from answers and from the stored entry.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from app.cache import cache_key
from app.tenants import hash_key
from app.upstream import contract
from tests.cachekit import COMMON_ENV, in_parallel, send_concurrently, sha, status, wait_until
from tests.conftest import Gateway, Sim, start_gateway, throwaway_redis, unique_image, write_tenants
from tests.servers import RedisServer, ServerProcess

MISS = "facegate; fwd=uri-miss; stored"


class Cluster:
    def __init__(self, gws: list[Gateway], server: RedisServer) -> None:
        self.gws = gws
        self.server = server
        self.redis = redis.Redis.from_url(server.url)
        self.prefix = gws[0].env["FACEGATE_REDIS_PREFIX"]

    def redis_key(self, tenant: str, image: bytes) -> str:
        return f"{self.prefix}:c:" + cache_key(scope=f"tenant:{tenant}", sha256=sha(image))


@pytest.fixture(scope="module")
def cluster(sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    server = throwaway_redis()
    tmp = tmp_path_factory.mktemp("deletion")
    keys = write_tenants(
        tmp / "tenants.toml",
        {
            "alpha": {},
            "beta": {},
            "hr": {"store": False},
            "lean": {"omit": ["emotion", "gender"], "cache_ttl_s": 60},
        },
    )
    env = {
        **COMMON_ENV,
        "FACEGATE_REDIS_URL": server.url,
        "FACEGATE_REDIS_PREFIX": "d" + uuid.uuid4().hex[:12],
        "FACEGATE_TENANTS_FILE": str(tmp / "tenants.toml"),
    }
    sim = Sim(sim_server)
    gws = in_parallel(*(lambda i=i: start_gateway(sim, tmp / f"gw{i}", keys=keys, env=env) for i in range(3)))
    c = Cluster(gws, server)
    try:
        # Each replica serves its local tier only while it holds an invalidation lease: wait for all three.
        def registered() -> int:
            return int(c.redis.zcount(f"{c.prefix}:inv:replicas", "-inf", "+inf"))

        wait_until(lambda: registered() == 3, 15, "three replicas registered for invalidations", every=0.05)
        yield c
    finally:
        for gw in gws:
            gw.server.stop()
        c.redis.close()
        server.close()


def lookup(gw: Gateway, image: bytes, tenant: str = "alpha") -> httpx.Response:
    with gw.client(tenant) as c:
        return c.get(f"/v1/faces/analyses/{sha(image)}")


def delete(gw: Gateway, image: bytes, who: str = "alpha") -> httpx.Response:
    with gw.client(who) as c:
        return c.delete(f"/v1/faces/analyses/{sha(image)}", headers={"X-Request-ID": f"del-{uuid.uuid4().hex[:8]}"})


def audit_lines(*gws: Gateway) -> list[dict[str, Any]]:
    return [line for gw in gws for line in gw.log_lines("facegate.audit")]


def assert_keyless(text: str, gw: Gateway) -> None:
    for name, key in gw.keys.items():
        assert key not in text, name
        assert hash_key(key) not in text, name


def test_a_deletion_is_not_served_by_any_replica_on_its_very_next_request(cluster: Cluster, sim: Sim) -> None:
    one, two, three = cluster.gws
    image = unique_image()
    assert status(one.analyze(image)) == MISS
    for gw in (two, three):  # now in every replica's local tier
        assert lookup(gw, image).status_code == 200
        assert status(gw.analyze(image)).startswith("facegate; hit")
    # Remove the Redis copy behind facegate's back: from here only the local tiers hold it.
    assert cluster.redis.delete(cluster.redis_key("alpha", image)) == 1
    assert status(two.analyze(image)).startswith("facegate; hit"), "served from two's local tier"

    r = delete(one, image)
    assert r.status_code == 204, r.text
    assert lookup(two, image).status_code == 404
    assert lookup(three, image).status_code == 404
    calls = sim.calls
    assert status(three.analyze(image)) == MISS, "a new, paid analysis: nothing was left to serve"
    assert sim.calls == calls + 1
    assert delete(two, image).status_code == 204  # that new one is deletable too
    assert delete(two, image).json()["code"] == "not_found"  # and then there is nothing
    assert all(lookup(gw, image).status_code == 404 for gw in cluster.gws)

    lines = [a for a in audit_lines(one) if a["action"] == "cache.delete" and a["details"]["sha256"] == sha(image)]
    assert lines[0]["actor"] == "tenant:alpha"
    assert lines[0]["details"]["deleted"] == 1
    assert lines[0]["details"]["replicas_told"] == lines[0]["details"]["replicas_confirmed"] == 3
    assert lines[0]["request_id"].startswith("del-")
    assert_keyless(json.dumps(audit_lines(*cluster.gws)), one)


def test_a_tenant_deletes_only_its_own_entry(cluster: Cluster) -> None:
    one, two, _ = cluster.gws
    image = unique_image()
    assert status(one.analyze(image, tenant="alpha")) == MISS
    assert status(one.analyze(image, tenant="beta")) == MISS
    assert delete(two, image, "beta").status_code == 204
    assert lookup(one, image, "beta").status_code == 404
    assert lookup(one, image, "alpha").status_code == 200


def test_a_deletion_while_the_call_is_in_flight_stores_nothing(cluster: Cluster, sim: Sim) -> None:
    one, two, three = cluster.gws
    image = unique_image()
    sim.faults(latency_ms=1500)
    answers: list[httpx.Response] = []
    upload = threading.Thread(target=lambda: answers.append(two.analyze(image)))
    upload.start()
    try:
        wait_until(lambda: sim.stats()["in_flight"] == 1, 10, "the call to start")
        assert delete(one, image).status_code == 404  # nothing stored yet...
    finally:
        upload.join()
    assert answers[0].status_code == 200  # ...the caller who paid still gets the answer
    assert status(answers[0]) == "facegate; fwd=uri-miss", "but it was not stored"
    assert cluster.redis.exists(cluster.redis_key("alpha", image)) == 0
    assert lookup(three, image).status_code == 404


def test_operators_purge_a_tenant_and_an_image_across_tenants(cluster: Cluster, tmp_path: Path) -> None:
    one, two, three = cluster.gws
    mine = [unique_image() for _ in range(3)]
    for image in mine:
        assert status(one.analyze(image, tenant="alpha")) == MISS
        assert lookup(two, image, "alpha").status_code == 200  # in two's local tier too
    other = unique_image()
    assert status(one.analyze(other, tenant="beta")) == MISS

    with three.client("operator:ops") as c:
        r = c.delete("/admin/tenants/alpha/analyses")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] >= 3
    assert r.json()["replicas"] == {"told": 3, "confirmed": 3}
    for image in mine:
        assert all(lookup(gw, image, "alpha").status_code == 404 for gw in cluster.gws)
    assert lookup(two, other, "beta").status_code == 200, "another tenant's data stays"

    shared = unique_image()
    for tenant in ("alpha", "beta"):
        assert status(one.analyze(shared, tenant=tenant)) == MISS
    with two.client("operator:ops") as c:
        r = c.delete(f"/admin/analyses/{sha(shared)}")
    assert r.json()["deleted"] == 2
    assert all(lookup(gw, shared, t).status_code == 404 for gw in cluster.gws for t in ("alpha", "beta"))

    # The CLI: the same deletion straight on Redis; the replicas are told and confirm.
    again = unique_image()
    assert status(one.analyze(again, tenant="beta")) == MISS
    assert lookup(three, again, "beta").status_code == 200
    env = {**one.env, "FACEGATE_TENANTS_FILE": str(one.tenants_file)}
    out = subprocess.run(
        [sys.executable, "-m", "app", "purge", "--sha256", sha(again)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"deleted": 1, "replicas": {"told": 3, "confirmed": 3}}
    assert lookup(three, again, "beta").status_code == 404
    out = subprocess.run(
        [sys.executable, "-m", "app", "purge", "--tenant", "beta"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert lookup(one, other, "beta").status_code == 404

    actions = [(a["action"], a["actor"].split(":")[0]) for a in audit_lines(*cluster.gws)]
    assert ("cache.purge_tenant", "operator") in actions
    assert ("cache.purge_hash", "operator") in actions
    assert_keyless(json.dumps(audit_lines(*cluster.gws)), one)


def test_in_shared_scope_only_an_operator_deletes(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(env={"FACEGATE_CACHE_SCOPE": "shared"})  # memory mode: one process
    image = unique_image()
    assert status(gw.analyze(image, tenant="alpha")) == MISS
    r = delete(gw, image, "beta")
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "operator_required"
    assert lookup(gw, image, "beta").status_code == 200, "a tenant cannot remove what others rely on"
    assert delete(gw, image, "operator:ops").status_code == 204
    assert lookup(gw, image, "alpha").status_code == 404
    assert delete(gw, image, "operator:ops").status_code == 404
    with gw.client("alpha") as c:
        assert c.delete("/v1/faces/analyses/nothex").json()["code"] == "invalid_request"
    with gw.client(None) as c:
        assert c.delete(f"/v1/faces/analyses/{sha(image)}").status_code == 401


# --- policy: store = false, omit, cache_ttl_s -------------------------------------------------


def test_a_store_false_tenant_leaves_nothing_in_redis_or_local_tiers(cluster: Cluster, sim: Sim) -> None:
    images = [unique_image() for _ in range(3)]
    for i, image in enumerate(images):
        for gw in cluster.gws:  # every replica, twice: nothing is served from anywhere
            for _ in range(2):
                r = gw.analyze(image, tenant="hr")
                assert r.status_code == 200
                assert status(r) == "facegate; fwd=uri-miss", "answered, never stored"
        assert sim.calls == 6 * (i + 1)
        assert all(lookup(gw, image, "hr").status_code == 404 for gw in cluster.gws)
    collapsed = send_concurrently(cluster.gws, unique_image(), 9, tenant="hr")
    assert [s.ok.status_code for s in collapsed] == [200] * 9

    hashes = {sha(image).encode() for image in images}
    keys = [k.decode() for k in cluster.redis.scan_iter(match=cluster.prefix + ":*", count=1000)]
    about_hr = [k for k in keys if "hr" in k.split(":", 1)[1]]
    assert about_hr, "its quota counters and usage history exist (they are about calls, not images)"
    counters = (f"{cluster.prefix}:q:{{hr}}", f"{cluster.prefix}:u:{{hr}}")
    assert all(k.startswith(counters) for k in about_hr), about_hr
    assert b"hr" not in cluster.redis.smembers(f"{cluster.prefix}:ci:tenants")
    for key in keys:  # no entry holds its images, whatever the key
        if key.startswith(cluster.prefix + ":c:"):
            value = cluster.redis.get(key) or b""
            assert not any(h in value for h in hashes)
    assert not [k for k in keys if k.startswith(cluster.prefix + ":sf:")], "no lease left behind"


def test_omitted_fields_are_absent_from_answers_and_from_the_stored_entry(cluster: Cluster) -> None:
    one, two, _ = cluster.gws
    image = unique_image(sim="faces=2")
    r = one.analyze(image, tenant="lean")
    assert status(r) == MISS
    for answer in (r.json(), two.analyze(image, tenant="lean").json()):
        assert len(answer["faces"]) == 2
        for face in answer["faces"]:
            assert face["emotion"] is None and face["gender"] is None
            assert face["age"] is not None, "the rest is kept"
    stored = cast(bytes | None, cluster.redis.get(cluster.redis_key("lean", image)))
    assert stored is not None
    body = json.loads(stored.split(b"\n", 1)[1])
    for info in body["face_detail_infos"]:
        attributes = info["face_detail_attributes_info"]
        assert "emotion" not in attributes and "gender" not in attributes
        assert "age" in attributes
    assert 0 < cluster.redis.pttl(cluster.redis_key("lean", image)) <= 60_000, "cache_ttl_s = 60"
    drop_in = httpx.post(
        two.url + contract.ANALYZE_PATH,
        headers={contract.KEY_HEADER: two.key("lean")},
        files={"image": ("a.jpg", image, "image/jpeg")},
    )
    assert drop_in.status_code == 200
    assert "emotion" not in drop_in.text and '"gender"' not in drop_in.text
    full = one.analyze(image, tenant="alpha").json()  # another tenant's own entry is complete
    assert all(face["emotion"] is not None for face in full["faces"])


def test_in_shared_scope_only_full_answers_of_storing_tenants_are_shared(gateway_factory: Any, sim: Sim) -> None:
    gw: Gateway = gateway_factory(
        env={"FACEGATE_CACHE_SCOPE": "shared"},
        tenants={"alpha": {}, "lean": {"omit": ["emotion"]}, "hr": {"store": False}},
    )
    image = unique_image()
    assert status(gw.analyze(image, tenant="lean")) == "facegate; fwd=uri-miss", "not written to the shared entry"
    assert status(gw.analyze(image, tenant="hr")) == "facegate; fwd=uri-miss"
    assert status(gw.analyze(image, tenant="alpha")) == MISS
    assert gw.analyze(image, tenant="alpha").json()["faces"][0]["emotion"] is not None
    hit = gw.analyze(image, tenant="lean")
    assert status(hit).startswith("facegate; hit"), "it reads the shared entry..."
    assert hit.json()["faces"][0]["emotion"] is None, "...without its omitted fields"
    assert sim.calls == 3
