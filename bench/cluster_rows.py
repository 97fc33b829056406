"""Row 11: facegate on a Redis Cluster (issue 14), measured in the same run as on one Redis.

A local Redis Cluster (3 primaries + 3 replicas, started as the tests do) and a dedicated
``redis-server`` (so that ``INFO commandstats`` counts only this row's gateways):

- cache-hit throughput, a gateway on the cluster against one on the single Redis (wrk, the
  row-1 hit, runs alternated single / cluster so that drift shows);
- Redis commands per hit, summed over every primary, against the single Redis;
- 200 identical uploads over 3 replicas on the cluster: one upstream call;
- quota 300, 1,000 distinct uploads over 3 replicas on the cluster: no over-admission.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx
import redis

from bench import client, images, procs, wrkrun
from bench.rows import ANALYZE, Bench, fmt_wrk, verdict
from tests.servers import RedisClusterServer, RedisServer


def _commandstats(ports: list[int]) -> Counter[str]:
    """``INFO commandstats`` calls, summed over these Redis servers."""
    # (the row's own INFO calls show up as "info": under one per hit, so filtered out below)
    total: Counter[str] = Counter()
    for port in ports:
        conn = redis.Redis(port=port, socket_timeout=5)
        try:
            for name, stats in conn.info("commandstats").items():
                total[name.removeprefix("cmdstat_")] += int(stats["calls"])
        finally:
            conn.close()
    return total


def row11(b: Bench) -> None:
    if not wrkrun.available():
        b.line(11, "Redis Cluster", "wrk is not installed (apt-get install wrk): row skipped", verdict="SKIP")
        return
    try:
        cluster = RedisClusterServer(log=b.workdir / "redis-cluster.log")
        single = RedisServer(log=b.workdir / "redis-row11.log")
    except (FileNotFoundError, RuntimeError) as exc:
        b.line(11, "Redis Cluster", f"no redis-server/redis-cli ({exc}): row skipped", verdict="SKIP")
        return
    o = b.opts
    try:
        started = time.perf_counter()
        gateways = {
            "single": b.gateway("gw-r11-single", redis_url=single.url),
            "cluster": b.gateway("gw-r11-cluster", redis_url=cluster.url),
        }
        ports = {"single": [single.port], "cluster": [n.port for n in cluster.masters()]}
        with httpx.Client(timeout=30) as http:
            for gw in gateways.values():
                body = b.hit_body.read_bytes()
                http.post(gw.url + ANALYZE, content=body, headers=b.headers())
                second = http.post(gw.url + ANALYZE, content=body, headers=b.headers())
                if client.cache_kind(second.headers.get("cache-status")) != "hit":
                    raise RuntimeError(f"{gw.name}: priming failed: {second.status_code} {second.headers}")

        # Commands per hit (local tier) and per first hit on a replica without the entry, by topology.
        per_hit: dict[str, dict[str, float]] = {}
        for kind, gw in gateways.items():
            with httpx.Client(timeout=30) as http:
                before = _commandstats(ports[kind])
                for _ in range(50):
                    r = http.post(gw.url + ANALYZE, content=b.hit_body.read_bytes(), headers=b.headers())
                    assert client.cache_kind(r.headers.get("cache-status")) == "hit"
                time.sleep(0.2)
                after = _commandstats(ports[kind])
            # Background traffic (lease renewals, health checks, this row's INFO) is well under one
            # per hit over 50 hits: what a hit costs is what runs at least once per hit.
            per_hit[kind] = {k: round((after[k] - before[k]) / 50) for k in after if after[k] - before[k] >= 25}

        # Hit throughput, alternated.
        results: dict[str, list[wrkrun.WrkResult]] = {"single": [], "cluster": []}
        cpu: dict[str, list[float]] = {"single": [], "cluster": []}
        for kind in ("single", "cluster") * (2 if o.quick else 3):
            gw = gateways[kind]
            b.wrk_static(gw.url + ANALYZE, b.headers(), o.warmup)
            cpu0 = gw.cpu_seconds()
            res = b.wrk_static(gw.url + ANALYZE, b.headers(), o.seconds)
            results[kind].append(res)
            if res.requests:
                cpu[kind].append(1000 * (gw.cpu_seconds() - cpu0) / res.requests)
        for gw in gateways.values():
            gw.stop()

        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        rps = {k: mean([r.rps for r in v]) for k, v in results.items()}
        cpu_ms = {k: mean(v) for k, v in cpu.items()}
        ratio = rps["cluster"] / rps["single"] if rps["single"] else 0.0
        cpu_ratio = cpu_ms["single"] / cpu_ms["cluster"] if cpu_ms["cluster"] else 0.0
        for kind in ("single", "cluster"):
            runs = " / ".join(fmt_wrk(r) for r in results[kind])
            what = "one Redis (a dedicated redis-server)" if kind == "single" else "Redis Cluster (3+3, local)"
            text = f"{runs} · mean {rps[kind]:,.0f} req/s · CPU {cpu_ms[kind]:.2f} ms/req"
            if kind == "cluster":
                text += f" · {ratio:.2f}x one Redis ({cpu_ratio:.2f}x by CPU)"
                b.line(11, f"cache-hit throughput, {what}", text, "≥ 0.9x one Redis", verdict(ratio >= 0.9))
            else:
                b.line(11, f"cache-hit throughput, {what}", text)
        same = per_hit["single"] == per_hit["cluster"]
        b.line(
            11,
            "Redis commands per cache hit (local tier), summed over every primary",
            "one Redis: "
            + ", ".join(f"{k} {v:g}" for k, v in sorted(per_hit["single"].items()))
            + " · cluster: "
            + ", ".join(f"{k} {v:g}" for k, v in sorted(per_hit["cluster"].items())),
            "unchanged on the cluster",
            verdict(same),
        )

        # Collapsing and quota over three replicas on the cluster.
        prefix = procs.new_prefix()
        extra = {"FACEGATE_MAX_UPLOADS_IN_FLIGHT": "256"}
        replicas = [b.gateway(f"r11-replica{i}", redis_url=cluster.url, prefix=prefix, extra=extra) for i in range(3)]
        _collapsing(b, replicas)
        _quota(b, replicas)
        b.details.append(
            f"Row 11: a local Redis Cluster (3 primaries, 3 replicas, cluster-node-timeout 1000 ms; the tests' "
            f"fixture) and a dedicated redis-server, both Redis {_version(single.port)}, on this machine. Hit "
            f"throughput as in row 1 (wrk -t2 -c{o.connections} -d{o.seconds:g}s after a {o.warmup:g}s warm-up), "
            "one gateway per topology, runs alternated single / cluster (three times each, twice with --quick), "
            "the ratio from the means; commands per hit "
            "are INFO commandstats deltas over 50 hits (including those run inside the Lua script). Row 6 counts "
            "round trips on one Redis; the cluster serves the same commands. "
            f"Took {time.perf_counter() - started:.0f} s."
        )
    finally:
        for server in b._servers:
            if server.name.startswith(("gw-r11", "r11-")):
                server.stop()
        cluster.close()
        single.close()


def _version(port: int) -> str:
    conn = redis.Redis(port=port, socket_timeout=5)
    try:
        return str(conn.info("server").get("redis_version", "?"))
    finally:
        conn.close()


def _collapsing(b: Bench, replicas: list[procs.Server]) -> None:
    b.sim.reset()
    b.sim.set_latency(1000)
    body = images.multipart(images.tagged(b.base, b.run_tag + "r11-collapse"))
    jobs = [(replicas[i % 3].url + ANALYZE, b.headers(), body) for i in range(200)]
    outcomes = asyncio.run(client.run_all(jobs, concurrency=200))
    calls, counts = b.sim.calls(), client.tally(outcomes)
    ok = counts.get("200", 0)
    b.line(
        11,
        "200 identical concurrent uploads over 3 replicas on the cluster, upstream latency 1 s",
        f"{calls} upstream call(s); {ok}/200 answered 200 ({counts.get('cache:miss', 0)} led, "
        f"{counts.get('cache:collapsed', 0)} collapsed, {counts.get('cache:hit', 0)} hits)",
        "exactly 1 upstream call",
        verdict(calls == 1 and ok == 200),
    )


def _quota(b: Bench, replicas: list[procs.Server]) -> None:
    b.sim.reset()
    b.sim.set_latency(100)
    jobs = []
    for i in range(1000):
        body = images.multipart(images.tagged(b.base, f"{b.run_tag}r11q{i:06d}"))
        jobs.append((replicas[i % 3].url + ANALYZE, b.headers("quota"), body))
    outcomes = asyncio.run(client.run_all(jobs, concurrency=64))
    calls, counts = b.sim.calls(), client.tally(outcomes)
    admitted, refused = counts.get("200", 0), counts.get("429 quota_exceeded", 0)
    with httpx.Client(timeout=10) as http:
        usage = http.get(replicas[0].url + "/v1/usage", headers=b.headers("quota")).json()
    used = int(usage["quotas"]["daily"]["used"])
    over = max(0, admitted - 300) + max(0, calls - admitted)
    b.line(
        11,
        "quota on the cluster: daily_quota 300, 1000 distinct uploads, 64 at once over 3 replicas, latency 100 ms",
        f"{admitted} admitted, {refused} refused (429), {calls} upstream calls, usage says {used} used, "
        f"{over} over-admits",
        "0 over-admits",
        verdict(over == 0 and admitted == calls == used == 300 and admitted + refused == 1000),
    )


CLUSTER_ROWS: dict[int, Callable[[Bench], None]] = {11: row11}
