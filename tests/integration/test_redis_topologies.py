"""Redis topologies, for real: a local Redis Cluster and a Sentinel setup, failovers included.

The fixtures (tests/servers.py) start the same shapes operators run: 3 primaries with a
replica each, and a primary + replica watched by 3 sentinels. Each test that kills a
primary restores the setup before it ends.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from app import redisconn
from app.redisconn import RedisDown, RedisHealth
from app.settings import Settings
from tests.conftest import Sim, unique_image
from tests.servers import RedisClusterServer, RedisSentinelServer, redis_client

pytestmark = [pytest.mark.redis]


def test_the_cluster_fixture_is_a_cluster_that_fails_over(redis_cluster: RedisClusterServer) -> None:
    client = redis_client(redis_cluster.url)
    try:
        keys = [f"topo:{i}" for i in range(30)]
        for key in keys:
            client.set(key, key)
        # The keys spread over every primary (a cluster, not one node), and survive losing one.
        assert len({redis_cluster.master_for(k).port for k in keys}) == 3
        client.execute_command("WAIT", 1, 2000, target_nodes=client.get_primaries())
        victim = redis_cluster.kill_master(keys[0])
        promoted = redis_cluster.wait_failover(victim)
        assert promoted is not victim and promoted.running
        assert redis_cluster.master_for(keys[0]) is promoted
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]
    finally:
        client.close()
        redis_cluster.restore()
    assert redis_cluster.healthy()


async def _until_ok(health: RedisHealth, op: Any, budget_s: float = 20.0) -> tuple[Any, int]:
    """Retry ``op`` through ``health`` until it succeeds; returns its result and how often it failed."""
    failures = 0
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return await health.run("test", op), failures
        except RedisDown:
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_sentinel_client_follows_a_failover_without_restart(redis_sentinel: RedisSentinelServer) -> None:
    """Errors during the failover are RedisDown (the components' policy applies), then it just works."""
    client = redisconn.connect(Settings(redis_url=redis_sentinel.url, redis_timeout_s=0.5, _env_file=None))
    health = RedisHealth(timeout_s=0.5, failures=3)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    try:
        assert await redisconn.warm(client, 4)
        await client.delete("topo:n")
        assert await health.run("test", lambda: script(keys=["topo:n"])) == 1
        await client.execute_command("WAIT", 1, 2000)  # replicated: the failover keeps it
        victim = redis_sentinel.kill_master()
        # Until the new primary is found, operations fail as RedisDown only (_until_ok lets
        # anything else through, which fails the test); then the same client just works.
        value, _ = await _until_ok(health, lambda: script(keys=["topo:n"]))
        assert value == 2  # the new primary, with the data, and the script loaded again (NOSCRIPT handled)
        assert redis_sentinel.master() is not victim
    finally:
        await client.aclose()
        redis_sentinel.restore()


def test_a_gateway_on_sentinel_caches_and_survives_a_failover(
    redis_sentinel: RedisSentinelServer, gateway_factory: Any, sim: Sim, tmp_path: Path
) -> None:
    gw = gateway_factory(env={"FACEGATE_REDIS_URL": redis_sentinel.url, "FACEGATE_CACHE_MEMORY_MAX_BYTES": "0"})
    first = unique_image()
    assert gw.analyze(first).status_code == 200
    assert gw.analyze(first).status_code == 200
    assert sim.calls == 1  # the second answer came from the Redis cache behind Sentinel
    probe = redis_client(redis_sentinel.url)
    try:
        probe.execute_command("WAIT", 1, 2000)
    finally:
        probe.close()
    victim = redis_sentinel.kill_master()
    try:
        redis_sentinel.wait_failover(victim)
        # Without a restart the gateway finds the new primary: a new image is paid for once,
        # and the old one is still a hit (it was replicated before the failover).
        second = unique_image()
        deadline = time.monotonic() + 20
        while gw.analyze(second).status_code != 200:
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.1)
        calls = sim.calls
        assert gw.analyze(second).status_code == 200 and gw.analyze(first).status_code == 200
        assert sim.calls == calls
    finally:
        redis_sentinel.restore()


def test_a_gateway_on_a_cluster_survives_losing_a_primary(
    redis_cluster: RedisClusterServer, gateway_factory: Any, sim: Sim
) -> None:
    """Cache on a real cluster (no local tier): after a primary is killed, it works again by itself."""
    one = gateway_factory(env={"FACEGATE_REDIS_URL": redis_cluster.url, "FACEGATE_CACHE_MEMORY_MAX_BYTES": "0"})
    assert one.analyze(unique_image()).status_code == 200
    victim = redis_cluster.kill_master()
    try:
        redis_cluster.wait_failover(victim)
        second = unique_image()
        deadline = time.monotonic() + 20
        while one.analyze(second).status_code != 200:
            assert time.monotonic() < deadline, one.logs()[-2000:]
            time.sleep(0.1)
        calls = sim.calls
        assert one.analyze(second).status_code == 200
        assert sim.calls == calls  # a hit from the cluster after the failover, no restart
    finally:
        redis_cluster.restore()
