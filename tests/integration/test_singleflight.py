"""Request collapsing across replicas: real gateway processes sharing one real Redis.

The first half drives :class:`RedisCoordinator` directly (two coordinators on separate
connections play two replicas) to pin down the lease and notification protocol; the
second half runs three ``facegate serve`` processes with one Redis prefix and counts
upstream calls at the simulator.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from app import redisconn
from app.cache import CacheError
from app.redisconn import RedisHealth
from app.settings import Settings
from app.singleflight import Flights, Outcome, RedisCoordinator, RedisLease, join, renewing
from tests.cachekit import COMMON_ENV, Sent, analysis, credits_today, in_parallel, send_concurrently, status, wait_until
from tests.conftest import Gateway, Sim, start_gateway, unique_image, write_tenants
from tests.servers import ServerProcess, free_port, redis_client

MISS = "facegate; fwd=uri-miss; stored"
COLLAPSED = "facegate; fwd=uri-miss; collapsed"

# --- the coordinator protocol, in process ---------------------------------------------------


@dataclass
class Replicas:
    a: RedisCoordinator
    b: RedisCoordinator
    clients: list[redisconn.RedisClient] = field(default_factory=list)


def _coordinator(url: str, prefix: str, lock_ttl_s: float) -> tuple[redisconn.RedisClient, RedisCoordinator]:
    client = redisconn.connect(Settings(redis_url=url))
    return client, RedisCoordinator(client, RedisHealth(), prefix, lock_ttl_s)


@pytest.fixture
async def replicas(redis_topology: str) -> AsyncIterator[Replicas]:
    prefix = "s" + uuid.uuid4().hex[:12]
    (ca, a), (cb, b) = _coordinator(redis_topology, prefix, 0.3), _coordinator(redis_topology, prefix, 0.3)
    for coordinator in (a, b):
        coordinator.start()
    try:  # a slow subscription fails the setup, and the clients are closed all the same
        async with asyncio.timeout(5):
            await a._subscribed.wait()
            await b._subscribed.wait()
        yield Replicas(a, b, [ca, cb])
    finally:
        for coordinator in (a, b):
            await coordinator.close()
        keys = [k async for k in ca.scan_iter(match=f"{prefix}:*")]
        if keys:
            await ca.delete(*keys)
        for client in (ca, cb):
            await client.aclose()


@pytest.mark.topology("cluster", "sentinel")
async def test_one_leader_and_its_outcome_reaches_the_other_replica(replicas: Replicas) -> None:
    lease = await replicas.a.acquire("k")
    assert lease is not None
    assert await replicas.b.acquire("k") is None
    waiting = asyncio.create_task(replicas.b.wait("k", 30))
    await asyncio.sleep(0.05)  # let it register and check the lease
    assert not waiting.done()
    await replicas.a.release(lease, Outcome("done", b"entry-bytes"))
    async with asyncio.timeout(5):  # a bound, not a measurement: it is pushed, not polled
        assert await waiting == Outcome("done", b"entry-bytes")
    assert await replicas.b.acquire("k") is not None  # released: the next one may lead


@pytest.mark.topology("cluster")
async def test_an_error_outcome_is_passed_on(replicas: Replicas) -> None:
    lease = await replicas.a.acquire("e")
    assert lease is not None
    waiting = asyncio.create_task(replicas.b.wait("e", 30))
    await asyncio.sleep(0.05)
    await replicas.a.release(lease, Outcome("error", b'{"code":"upstream_error"}'))
    async with asyncio.timeout(5):
        assert await waiting == Outcome("error", b'{"code":"upstream_error"}')


@pytest.mark.topology("cluster")
async def test_waiting_for_a_key_nobody_leads_returns_at_once(replicas: Replicas) -> None:
    async with asyncio.timeout(5):
        assert (await replicas.b.wait("free", 30)).kind == "abandoned"
    assert not replicas.b._waiters  # no waiter left behind


@pytest.mark.topology("cluster")
async def test_a_dead_leaders_lease_expires_and_another_replica_takes_over(replicas: Replicas) -> None:
    lease = await replicas.a.acquire("d")  # and then a "dies": no renewal, no release
    assert lease is not None
    assert (await replicas.b.wait("d", 0.6)).kind == "timeout"
    assert await replicas.b.acquire("d") is not None  # the 0.3 s lease is gone


@pytest.mark.topology("cluster")
async def test_a_renewed_lease_outlives_its_ttl_and_a_stale_owner_cannot_touch_the_next(
    replicas: Replicas,
) -> None:
    lease = await replicas.a.acquire("r")
    assert lease is not None
    async with renewing(lambda: replicas.a.renew(lease), 0.1):
        await asyncio.sleep(0.7)  # more than twice the 0.3 s lease
        assert await replicas.b.acquire("r") is None
    await asyncio.sleep(0.4)  # no renewal any more: expired
    taken = await replicas.b.acquire("r")
    assert taken is not None
    assert await replicas.a.renew(lease) is False  # a's token is not the owner's
    await replicas.a.release(lease, Outcome("abandoned"))  # a late release from the old leader
    assert await replicas.a.acquire("r") is None  # ...did not delete b's lease
    await replicas.b.release(taken, Outcome("abandoned"))
    assert await replicas.a.acquire("r") is not None


async def test_unreachable_redis_is_a_cache_error_everywhere() -> None:
    client, coordinator = _coordinator(f"redis://127.0.0.1:{free_port()}/0", "x", 1)
    try:
        with pytest.raises(CacheError):
            await coordinator.acquire("k")
        with pytest.raises(CacheError):  # no subscription: a waiter would wait for nothing
            await coordinator.wait("k", 1)
        with pytest.raises(CacheError):
            await coordinator.release(RedisLease("k", "t"), Outcome("abandoned"))
        assert await coordinator.renew(RedisLease("k", "t")) is False
    finally:
        await client.aclose()


async def test_a_flight_outlives_the_requests_that_wait_for_it() -> None:
    flights: Flights[str] = Flights()
    release = asyncio.Event()
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "answer"

    task = flights.start("k", work)
    assert "k" in flights
    impatient = asyncio.create_task(join(task, 30))
    await asyncio.sleep(0)
    impatient.cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await impatient
    with pytest.raises(TimeoutError):
        await join(task, 0.01)  # a follower gave up
    assert not task.done()
    release.set()
    assert await join(task, 5) == "answer"
    assert calls == 1
    assert "k" not in flights


# --- three gateway processes, one Redis -------------------------------------------------------


@dataclass
class Cluster:
    gateways: list[Gateway]
    start_one: Any
    redis: redis.Redis

    def revive(self) -> None:
        """Replace members a previous test killed (the kill test runs last; this is for -k runs)."""
        for i, gw in enumerate(self.gateways):
            if gw.server.proc.poll() is not None:
                gw.server.stop()
                self.gateways[i] = self.start_one(i)


@pytest.fixture(scope="module")
def cluster(
    sim_server: ServerProcess, redis_topology: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    tenants_file = root / "tenants.toml"
    keys = write_tenants(tenants_file, {"alpha": {}, "beta": {}})
    env = {
        **COMMON_ENV,
        "FACEGATE_REDIS_URL": redis_topology,
        "FACEGATE_REDIS_PREFIX": "c" + uuid.uuid4().hex[:12],  # one prefix: one deployment
        "FACEGATE_TENANTS_FILE": str(tenants_file),
        "FACEGATE_SINGLEFLIGHT_LOCK_TTL_S": "1",
        "FACEGATE_UPSTREAM_RETRIES": "0",
    }
    sim = Sim(sim_server)
    counter = iter(range(1000))

    def start_one(i: int) -> Gateway:
        return start_gateway(sim, root / f"gw{i}-{next(counter)}", keys=keys, env=env)

    gateways = in_parallel(*(lambda i=i: start_one(i) for i in range(3)))
    client = redis_client(redis_topology)
    result = Cluster(gateways, start_one, client)
    try:
        yield result
    finally:
        for gw in result.gateways:
            gw.server.stop()
        client.close()


def by_gateway(answers: list[Sent]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for a in answers:
        counts[a.gateway] = counts.get(a.gateway, 0) + 1
    return counts


@pytest.mark.topology("cluster")
def test_200_identical_uploads_over_3_processes_make_one_upstream_call(cluster: Cluster, sim: Sim) -> None:
    cluster.revive()
    gateways = cluster.gateways
    image = unique_image(sim="faces=2")
    credits = credits_today(gateways[0])
    sim.faults(latency_ms=1500)  # the leader's call is still running when the last upload arrives
    started = time.perf_counter()
    answers = send_concurrently(gateways, image, 200)
    elapsed = time.perf_counter() - started

    assert sim.calls == 1
    assert [a.ok.status_code for a in answers] == [200] * 200
    assert by_gateway(answers) == {0: 67, 1: 67, 2: 66}
    bodies = [a.ok.json() for a in answers]
    first = analysis(bodies[0])
    assert all(analysis(b) == first for b in bodies)  # same faces, same analysis, same upstream id
    assert len(first["faces"]) == 2
    assert len({b["request_id"] for b in bodies}) == 200
    statuses = [status(a.ok) for a in answers]
    assert statuses.count(MISS) == 1  # one leader; everyone else joined it or hit its entry
    assert all(s in (MISS, COLLAPSED) or s.startswith("facegate; hit") for s in statuses)
    assert credits_today(gateways[0]) == credits + 1  # one quota charge
    print(
        f"\n200 uploads over 3 processes: {sim.calls} upstream call in {elapsed:.2f}s; "
        f"collapsed={statuses.count(COLLAPSED)} hit={sum(s.startswith('facegate; hit') for s in statuses)}"
    )


def test_a_failing_leader_hands_its_error_to_every_follower(cluster: Cluster, sim: Sim) -> None:
    cluster.revive()
    image = unique_image()
    credits = credits_today(cluster.gateways[0])
    # One failure: if any follower called the upstream itself, it would get a 200.
    sim.faults({"mode": "status", "status": 500, "count": 1}, latency_ms=800)
    answers = send_concurrently(cluster.gateways, image, 30)
    assert sim.calls == 1
    assert {a.ok.status_code for a in answers} == {502}
    assert {a.ok.json()["code"] for a in answers} == {"upstream_error"}
    assert credits_today(cluster.gateways[0]) == credits  # a failed call is refunded
    retry = cluster.gateways[1].analyze(image)  # the error was not cached
    assert retry.status_code == 200
    assert status(retry) == MISS
    assert sim.calls == 2


def test_followers_take_over_when_the_leader_process_is_killed(cluster: Cluster, sim: Sim) -> None:
    """Runs last: it kills a member (``revive`` replaces it if other tests follow)."""
    cluster.revive()
    leader, *others = cluster.gateways
    image = unique_image(sim="faces=1")
    sim.faults(latency_ms=1500)
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(lambda: send_concurrently([leader], image, 3, timeout=15))
        wait_until(lambda: sim.stats()["in_flight"] == 1, 10, "the leader's upstream call")
        followers = pool.submit(lambda: send_concurrently(others, image, 20, timeout=15))
        time.sleep(0.3)  # the followers are now waiting on the leader's lease
        started = time.perf_counter()
        leader.server.proc.kill()  # SIGKILL: no release, no goodbye; its lease just stops being renewed
        answers = followers.result()
        elapsed = time.perf_counter() - started
        assert all(a.response is None for a in doomed.result())  # the dead process answered nobody

    assert [a.ok.status_code for a in answers] == [200] * 20
    bodies = [a.ok.json() for a in answers]
    assert all(analysis(b) == analysis(bodies[0]) for b in bodies)
    statuses = [status(a.ok) for a in answers]
    assert statuses.count(MISS) == 1  # one follower took over and called
    assert sim.calls == 2  # the killed leader's call and the takeover, nothing more
    # lease 1 s: expiry <= 1 s after the kill, a waiter notices within another 1 s, then a 1.5 s call
    assert elapsed < 8, elapsed
    print(f"\nleader SIGKILLed: 20 followers on 2 processes answered {elapsed:.2f}s after the kill")
