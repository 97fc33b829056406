"""Redis topologies, for real: a local Redis Cluster and a Sentinel setup, failovers included.

The fixtures (tests/servers.py) start the same shapes operators run: 3 primaries with a
replica each, and a primary + replica watched by 3 sentinels. Each test that kills a
primary restores the setup before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from app import redisconn
from app.limits import QuotaUnavailable
from app.limits.redis import RedisLimiter
from app.redisconn import RedisDown, RedisHealth
from app.settings import Settings
from app.tenants import Limits, Tenant
from tests.conftest import topology_url
from tests.servers import RedisClusterServer, RedisSentinelServer, ReplyDroppingProxy, redis_client

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


async def test_closing_the_sentinel_client_ends_its_follower_even_when_a_cancellation_is_lost(
    redis_sentinel: RedisSentinelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sentinels' clients have a socket timeout, so redis-py writes to them through
    ``asyncio.wait_for``, which on Python 3.11 loses a cancellation that lands as the write completes
    (CPython gh-86296). Here the follower's poll loses it every time: closing must still end the
    follower and its listeners, and leave no connection to the sentinels open."""
    polling, lost = asyncio.Event(), asyncio.Event()

    async def poll_losing_the_cancellation(self: redisconn.SentinelRedis) -> None:
        polling.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            lost.set()  # swallowed, as wait_for does when the write has just completed

    monkeypatch.setattr(redisconn, "SENTINEL_POLL_S", 0.05)
    monkeypatch.setattr(redisconn.SentinelRedis, "_poll", poll_losing_the_cancellation)
    client = redisconn.connect(Settings(redis_url=redis_sentinel.url, _env_file=None))
    assert isinstance(client, redisconn.SentinelRedis) and client.sentinels is not None
    sentinels = client.sentinels.sentinels
    await client.ping()
    async with asyncio.timeout(10):
        await polling.wait()
        await client.aclose()  # a bound, not a measurement: it used to wait for the follower forever
    assert lost.is_set()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    pools = [s.connection_pool for s in sentinels]
    assert not [c for p in pools for c in [*p._available_connections, *p._in_use_connections] if c.is_connected]


# A gateway surviving a failover (three replicas, traffic running, hits and quotas checked):
# tests/integration/test_failover.py.


# --- quota exactness when Redis misbehaves ------------------------------------------------

TENANT = Tenant("exact", Limits(rate_per_s=1e6, burst=1_000_000, daily_quota=1_000_000, monthly_quota=None))


def _used(client: Any, prefix: str) -> int:
    """The tenant's reserved + committed count for today, read straight from Redis."""
    return int(client.hget(f"{prefix}:q:{{{TENANT.name}}}:daily", "used") or 0)


@pytest.mark.parametrize("kind", ["single", "cluster"])
@pytest.mark.topology("cluster")
async def test_a_reply_lost_after_redis_ran_a_quota_script_is_not_counted_twice(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A client that sends a command again after its connection broke runs it twice when Redis
    had already run it: a refund run twice is one admission too many. redis-py's Cluster client
    does that by default (10 retries, after a slot-map refresh); facegate turns those retries
    off and settles each reservation once (its marker is consumed), so its own retry of a
    settlement it could not confirm changes nothing; a reservation whose answer was lost is
    refunded, if it was made."""
    url = topology_url(request, kind)
    if kind == "cluster":
        targets = [("127.0.0.1", node.port) for node in request.getfixturevalue("redis_cluster").nodes]
    else:
        parts = urlsplit(url)
        targets = [(parts.hostname or "127.0.0.1", parts.port or 6379)]
    prefix = "t" + uuid.uuid4().hex[:12]
    probe = redis_client(url)
    async with ReplyDroppingProxy(*targets) as proxy:
        if kind == "single":
            client = redisconn.connect(Settings(redis_url=proxy.url, _env_file=None))
        else:  # every node through the proxy, as the URL and as the slot map names it
            nodes = ",".join(f"127.0.0.1:{port}" for port in proxy.ports.values())
            client = redisconn.connect(Settings(redis_url=f"redis+cluster://{nodes}", _env_file=None))
            assert isinstance(client, RedisCluster)
            client.nodes_manager.address_remap = lambda addr: ("127.0.0.1", proxy.ports[addr[1]])
            await client.initialize()
        limiter = RedisLimiter(client, RedisHealth(timeout_s=5.0, failures=100), prefix)
        try:
            held = [(await limiter.admit(TENANT, reserve=True)).reservation for _ in range(3)]
            assert _used(probe, prefix) == 3
            first, last = held[0], held[2]
            assert first is not None and last is not None
            await limiter.settle(last, spent=True)  # both scripts are loaded now (no NOSCRIPT below)

            proxy.arm(b"EVALSHA")
            await limiter.settle(first, spent=False)  # ran; the answer was lost; sent again later
            assert proxy.dropped == 1
            proxy.arm(b"EVALSHA")
            with pytest.raises(QuotaUnavailable):  # the outcome is unknown: refused, not guessed
                await limiter.admit(TENANT, reserve=True)
            assert proxy.dropped == 2
            assert _used(probe, prefix) == 3, "refunded once, reserved once"
            await limiter.close()  # the retries have run
            assert _used(probe, prefix) == 2, "the refund again: nothing; the unknown reservation: refunded"
            assert held[1] is not None  # the only reservation left open is the one never settled
            assert [k.decode() for k in probe.scan_iter(f"{prefix}:q:*:r:*")] == [
                limiter.marker(TENANT.name, held[1].id)
            ]
        finally:
            # redis-py's RedisCluster.aclose() closes nothing while a slot-map refresh is pending
            # (as after the errors above): one command first, so no socket is left to the GC.
            with contextlib.suppress(Exception):
                await redisconn.ping(client)
            await limiter.close(grace_s=0)  # (after a failure above: its retries still running)
            await client.aclose()
            keys = list(probe.scan_iter(f"{prefix}:*"))
            if keys:
                probe.delete(*keys)
            probe.close()


async def test_a_stalled_sentinel_master_loses_no_admitted_reservation(redis_sentinel: RedisSentinelServer) -> None:
    """The master stalls (SIGSTOP: overload, a VM pause) long enough for the sentinels to promote
    its replica, then answers again. Writes it takes after the promotion are thrown away when
    the sentinels demote it. facegate follows the sentinels' announcements: the connections to
    the old master are dropped when the promotion starts, a command in flight across it reports
    an unknown outcome, so every reservation reported as made is on the new master."""
    client = redisconn.connect(Settings(redis_url=redis_sentinel.url, _env_file=None))
    # A timeout longer than the stall: commands held by the paused master complete when it resumes.
    limiter = RedisLimiter(client, RedisHealth(timeout_s=30.0, failures=1_000_000), "t" + uuid.uuid4().hex[:12])
    admitted = unknown = busy = 0
    stop, reached, go, idle = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    go.set()
    target = 50

    async def reserve() -> None:
        nonlocal admitted, unknown, busy
        while not stop.is_set():
            await go.wait()
            busy += 1
            try:
                assert (await limiter.admit(TENANT, reserve=True)).allowed
                admitted += 1
                if admitted >= target:
                    reached.set()
            except QuotaUnavailable:
                unknown += 1
                await asyncio.sleep(0.02)
            finally:
                busy -= 1
                if not busy:
                    idle.set()

    assert await redisconn.warm(client, 8)
    old = redis_sentinel.master()
    assert old.proc is not None
    workers = [asyncio.create_task(reserve()) for _ in range(8)]
    try:
        await reached.wait()
        # Replication is asynchronous: a reservation acknowledged just before the stall may not have
        # reached the replica yet, and the promotion loses it whatever the client does (a busy CPU
        # made that happen: 1 of 264 lost, made before the stall). That loss is docs/operating.md's
        # "writes not yet replicated"; this test is about the writes after the stall.
        # So: the workers pause, the replica acknowledges everything, then the master stalls and the
        # workers go on, on their pooled connections to it.
        go.clear()
        idle.clear()
        if busy:
            await idle.wait()
        assert await client.execute_command("WAIT", 1, 5000) == 1
        os.kill(old.proc.pid, signal.SIGSTOP)
        go.set()
        try:
            new = await asyncio.to_thread(redis_sentinel.wait_failover, old)
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
        # Long enough for the pool's old connections to write to the old master, were they still used.
        target = admitted + 200
        reached.clear()
        await asyncio.wait_for(reached.wait(), 30)
        stop.set()
        await asyncio.gather(*workers)
        # What the sentinels do about ten seconds later, now: the old master becomes a replica
        # of the new one and drops whatever was written to it after the promotion.
        demote = redis.Redis(port=old.port)
        demote.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
        demote.close()
        await asyncio.to_thread(redis_sentinel.wait_healthy)
        probe = redis_client(redis_sentinel.url)
        try:
            used = _used(probe, limiter._prefix)
        finally:
            probe.close()
        # Over-admission would be admitted > used; an unknown outcome may or may not have counted.
        assert admitted <= used <= admitted + unknown, (admitted, used, unknown)
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        # Refunds of the unknown outcomes may still be retried in the background: stopped first, or
        # they reopen connections (to the sentinels too) after the client is closed, left to the GC.
        await limiter.close(grace_s=0)
        await client.aclose()
        old.args = []  # restore() restarts nodes that are down; this one runs (as a replica)
        redis_sentinel.restore()
