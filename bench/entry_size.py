"""How many bytes a cached analysis takes in Redis: ``python -m bench.entry_size``.

Sizing the cache (docs/operating.md, "Sizing") needs bytes per entry, measured rather than
guessed. This starts a throwaway ``redis-server`` (and, unless ``--no-cluster``, a local
Redis Cluster), the simulator and a gateway per Redis, analyzes distinct images whose answers
have 0, 1, 3 and 10 faces in both of ailabapi's answer shapes (the list style with its 105
landmarks per face), and prints per case: the stored value (metadata line + the upstream's
answer bytes), ``MEMORY USAGE`` of the cache key (key, value and Redis's own overhead), the
tenant index's share (``<prefix>:ci:{tenant}``, one member per entry), and entries per GiB of
``used_memory``. The simulator's answers carry every field of the contract
(``docs/upstream.md``), so their sizes are those of real answers with the same faces.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.conftest import PY, SIM_KEY, Sim, start_gateway
from tests.imagegen import make_image
from tests.servers import RedisClusterServer, RedisServer, free_port, redis_client, start_process

CASES = [(shape, faces) for shape in ("tencent", "list") for faces in (0, 1, 3, 10)]
PER_CASE = 20


def measure(url: str, sim: Sim, workdir: Path) -> list[dict[str, Any]]:
    """The cases on the Redis at ``url``."""
    prefix = "es" + uuid.uuid4().hex[:8]
    gw = start_gateway(
        sim,
        workdir / prefix,
        tenants={"size": {}},
        env={"FACEGATE_REDIS_URL": url, "FACEGATE_REDIS_PREFIX": prefix, "FACEGATE_LOG_LEVEL": "warning"},
    )
    client: Any = redis_client(url)
    rows: list[dict[str, Any]] = []
    seed = 0
    try:
        for shape, faces in CASES:
            before = set(client.scan_iter(match=f"{prefix}:c:*", count=1000))
            for _ in range(PER_CASE):
                seed += 1
                directive = f"faces={faces}" + (";shape=list" if shape == "list" else "")
                image = make_image("jpeg", 128, 128, seed=90_000 + seed, sim=directive)
                r = gw.analyze(image, tenant="size")
                if r.status_code != 200:
                    raise RuntimeError(f"{shape}/{faces}: {r.status_code} {r.text[:200]}")
            keys = set(client.scan_iter(match=f"{prefix}:c:*", count=1000)) - before
            assert len(keys) == PER_CASE, (shape, faces, len(keys))
            usage = [int(client.memory_usage(k, samples=0)) for k in keys]
            values = [int(client.strlen(k)) for k in keys]
            rows.append(
                {"shape": shape, "faces": faces, "value": sum(values) / len(values), "key": sum(usage) / len(usage)}
            )
        # The index (a sorted set, one member per entry) in its large-set encoding, per member.
        index = int(client.memory_usage(f"{prefix}:ci:{{size}}", samples=0) or 0) / (PER_CASE * len(CASES))
        for row in rows:
            row["index"] = index
            row["per_entry"] = float(row["key"]) + index
            row["per_gib"] = 2**30 / float(row["per_entry"])
    finally:
        gw.server.stop()
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
    return rows


def bulk(server: RedisServer, sim: Sim, workdir: Path, n: int) -> str:
    """``used_memory`` growth for ``n`` one-face entries on an otherwise empty Redis: every
    overhead included (dictionary and expiry entries, index, allocator), measured with no
    gateway connected before and after (client buffers out of the picture)."""
    info = redis.Redis(port=server.port)
    before = int(info.info("memory")["used_memory"])
    prefix = "es" + uuid.uuid4().hex[:8]
    gw = start_gateway(
        sim,
        workdir / prefix,
        tenants={"size": {}},
        env={"FACEGATE_REDIS_URL": server.url, "FACEGATE_REDIS_PREFIX": prefix, "FACEGATE_LOG_LEVEL": "warning"},
    )
    try:
        with gw.client("size") as http:
            for i in range(n):
                image = make_image("jpeg", 128, 128, seed=200_000 + i, sim="faces=1")
                files = {"image": ("x.jpg", image, "image/jpeg")}
                assert http.post("/v1/faces/analyze", files=files).status_code == 200
    finally:
        gw.server.stop()
    time.sleep(0.5)
    grown = int(info.info("memory")["used_memory"]) - before
    keys = int(info.dbsize())
    info.close()
    return (
        f"{n:,} one-face Tencent-style entries on an empty Redis: used_memory grew by {grown:,} B "
        f"({keys:,} keys in all), {grown / n:,.0f} B per entry with every overhead: {2**30 * n / grown:,.0f} "
        "entries per GiB of used_memory"
    )


def table(title: str, rows: list[dict[str, Any]]) -> str:
    out = [
        f"{title}",
        "",
        "| answer shape | faces | stored value (B) | MEMORY USAGE of the key (B) | index share (B) | per entry (B) "
        "| entries per GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['faces']} | {r['value']:,.0f} | {r['key']:,.0f} | {r['index']:,.0f} | "
            f"{r['per_entry']:,.0f} | {r['per_gib']:,.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-cluster", action="store_true", help="measure on one Redis only")
    parser.add_argument("--bulk", type=int, default=2000, help="entries for the used_memory measurement (0: skip)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="facegate-entry-size-"))
    port = free_port()
    sim_server = start_process(
        [PY, "-m", "app.sim", "--port", str(port), "--key", SIM_KEY, "--faces", "hash"], None, port
    )
    single = RedisServer()
    cluster = None if args.no_cluster else RedisClusterServer()
    try:
        sim = Sim(sim_server)
        sim.reset()
        version = redis.Redis(port=single.port).info("server")["redis_version"]
        print(table(f"One Redis ({version}):", measure(single.url, sim, workdir)))
        if args.bulk:
            print()
            print(bulk(single, sim, workdir, args.bulk))
        if cluster is not None:
            print()
            title = "Redis Cluster (3 primaries; each key measured on the primary that holds it):"
            print(table(title, measure(cluster.url, sim, workdir)))
    finally:
        if cluster is not None:
            cluster.close()
        single.close()
        sim_server.stop()


if __name__ == "__main__":
    main()
