"""The pool as callers see it: grants that wait and are told, across "replicas", with leases.

Both backends run each test where it applies (two ``RedisPool`` objects on two connection
pools are two replicas). No timing assertions: a wait either ends with a grant within its
budget or the test fails. ``ResilientUpstream`` over a pool is driven by scripted keys
(the paid upstream is the one thing these tests fake); over real sockets it is proven in
tests/integration/test_pool.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from app import redisconn
from app.errors import Problem
from app.redisconn import RedisClient, RedisHealth
from app.settings import Settings
from app.upstream import contract
from app.upstream.ailabapi import ImagePayload, UpstreamAnswer, UpstreamFailure
from app.upstream.keys import KeySpec, PoolSpec, Secret
from app.upstream.pool import Caller, MemoryPool, Outcome, PoolSettings, RedisPool, Refused
from app.upstream.pool.credits import CreditsWatcher
from app.upstream.pool.front import PoolFront
from app.upstream.resilience import CircuitBreaker, ResilientUpstream, RetryPolicy
from tests.conftest import topology_url

pytestmark = pytest.mark.redis


def key(name: str, *, qps: float = 1000.0, conc: int = 1, tier: str = "primary") -> KeySpec:
    return KeySpec(name, Secret("secret-" + name), qps, conc, 1.0, tier)  # type: ignore[arg-type]


Factory = Callable[..., PoolFront]


@pytest.fixture(params=["memory", "redis", "redis-cluster", "redis-sentinel"])
async def make(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Factory]:
    """Pools over one shared state: one process (memory), or replicas on their own connections (each
    Redis topology, with production clients)."""
    made: list[PoolFront] = []
    clients: list[RedisClient] = []
    url = "" if request.param == "memory" else topology_url(request, request.param.partition("-")[2] or "single")
    memory: dict[str, MemoryPool] = {}

    def factory(spec: PoolSpec, **settings: Any) -> PoolFront:
        cfg = PoolSettings(**{"lease_s": 1.0, **settings})
        if request.param == "memory":
            if "pool" not in memory:
                memory["pool"] = MemoryPool(lambda: spec, cfg)
                made.append(memory["pool"])
            return memory["pool"]
        client = redisconn.connect(Settings(redis_url=url, _env_file=None))
        clients.append(client)
        pool = RedisPool(client, RedisHealth(), prefix, spec=lambda: spec, settings=cfg)
        pool.start()
        made.append(pool)
        return pool

    factory.backend = request.param  # type: ignore[attr-defined]
    yield factory
    for pool in made:
        await pool.close()
    for client in clients:
        await client.aclose()


async def test_a_waiter_is_told_when_another_replica_releases(make: Factory) -> None:
    spec = PoolSpec((key("k", conc=2),))
    one, two = make(spec), make(spec)
    held = [await one.acquire(Caller("a"), 1) for _ in range(2)]
    waiting = asyncio.create_task(two.acquire(Caller("b"), 10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await one.release(held[0], Outcome())
    grant = await asyncio.wait_for(waiting, 5)
    assert grant.key == "k"
    view = await one.snapshot()
    assert (view.keys[0].in_flight, view.waiting) == (2, 0)
    await two.release(grant, Outcome())
    await one.release(held[1], Outcome())
    assert (await two.snapshot()).keys[0].in_flight == 0


async def test_never_more_slots_than_the_limit_across_replicas(make: Factory) -> None:
    spec = PoolSpec((key("a", conc=2), key("b", conc=1)))
    pools = [make(spec) for _ in range(3)]
    in_use: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    async def call(i: int) -> None:
        pool = pools[i % 3]
        grant = await pool.acquire(Caller(f"t{i % 4}"), 20)
        in_use[grant.key] += 1
        peak[grant.key] = max(peak[grant.key], in_use[grant.key])
        await asyncio.sleep(0.01)
        in_use[grant.key] -= 1
        await pool.release(grant, Outcome(seconds=0.01))

    await asyncio.gather(*(call(i) for i in range(30)))
    assert peak == {"a": 2, "b": 1}


async def test_a_cancelled_waiter_leaves_the_queue(make: Factory) -> None:
    spec = PoolSpec((key("k"),))
    pool = make(spec)
    held = await pool.acquire(Caller("a"), 1)
    waiter = asyncio.create_task(pool.acquire(Caller("b"), 10))
    await asyncio.sleep(0.05)
    assert (await pool.snapshot()).waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(100):
        if (await pool.snapshot()).waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert (await pool.snapshot()).waiting == 0
    await pool.release(held, Outcome())
    again = await pool.acquire(Caller("c"), 1)  # the slot was not handed to the cancelled waiter
    await pool.release(again, Outcome())


async def test_a_wait_that_runs_out_is_refused_and_leaves(make: Factory) -> None:
    pool = make(PoolSpec((key("k"),)))
    held = await pool.acquire(Caller("a"), 1)
    with pytest.raises(Refused) as refused:
        await pool.acquire(Caller("b"), 0.2)
    assert refused.value.reason == "timeout"
    assert refused.value.retry_after > 0, "with a hint for the caller's Retry-After"
    assert (await pool.snapshot()).waiting == 0
    await pool.release(held, Outcome())


async def test_a_dead_replicas_slots_and_places_come_back_within_the_lease(make: Factory) -> None:
    if make.backend == "memory":  # type: ignore[attr-defined]
        pytest.skip("one process cannot lose a replica")
    spec = PoolSpec((key("k", conc=2),))
    doomed, survivor = make(spec, lease_s=0.5), make(spec, lease_s=0.5)
    await doomed.acquire(Caller("a"), 1)
    await doomed.acquire(Caller("a"), 1)
    queued = asyncio.create_task(doomed.acquire(Caller("a"), 30))
    await asyncio.sleep(0.05)
    assert (await survivor.snapshot()).waiting == 1
    # "SIGKILL": the heartbeat stops; nothing is released or cancelled.
    assert isinstance(doomed, RedisPool)
    for task in (doomed._pump_task, doomed._listener):
        assert task is not None
        task.cancel()
    grants = await asyncio.wait_for(asyncio.gather(*(survivor.acquire(Caller("b"), 10) for _ in range(2))), 10)
    assert [g.key for g in grants] == ["k", "k"]
    view = await survivor.snapshot()
    assert (view.keys[0].in_flight, view.waiting) == (2, 0)
    queued.cancel()


async def test_redis_down_falls_back_to_this_process(prefix: str) -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    spec = PoolSpec((key("k"),))
    pool = RedisPool(client, RedisHealth(timeout_s=0.5), prefix, spec=lambda: spec, settings=PoolSettings())
    try:
        grant = await pool.acquire(Caller("a"), 1)
        assert grant.ticket.startswith("L:")
        with pytest.raises(Refused):
            await pool.acquire(Caller("a"), 0.1)  # this process still keeps the key's limits
        await pool.release(grant, Outcome())
        again = await pool.acquire(Caller("a"), 1)
        await pool.release(again, Outcome())
    finally:
        await pool.close()
        await client.aclose()


# --- balances ------------------------------------------------------------------------------------


async def test_credits_watcher_brings_an_exhausted_key_back(make: Factory) -> None:
    spec = PoolSpec((key("a", conc=5), key("b", conc=5)))
    pool, other = make(spec), make(spec)
    balances = {"a": 0.0, "b": 100.0}
    reads: list[str] = []

    async def read(name: str) -> float | None:
        reads.append(name)
        return balances[name]

    watcher = CreditsWatcher(pool, read, every_s=0.2)
    await watcher.tick()
    assert sorted(reads) == ["a", "b"]
    view = {k.name: k for k in (await other.snapshot()).keys}
    assert (view["a"].state, view["a"].balance, view["b"].state) == ("exhausted", 0.0, "ok")
    grant = await other.acquire(Caller("t"), 1)
    assert grant.key == "b", "the replica that did not read the balance knows it too"
    await other.release(grant, Outcome())
    await watcher.tick()
    assert sorted(reads) == ["a", "b"], "read once per period, by one replica"
    balances["a"] = 50
    await asyncio.sleep(0.25)
    await CreditsWatcher(other, read, every_s=0.2).tick()
    view = {k.name: k for k in (await pool.snapshot()).keys}
    assert (view["a"].state, view["a"].balance) == ("low", 50.0)  # below the default low mark (100)


# --- the resilient call over a pool --------------------------------------------------------------

PAYLOAD = ImagePayload("image.jpg", b"\xff\xd8\xff", "image/jpeg")
OK = UpstreamAnswer(200, {"request_id": "r"}, b"{}", None, simulated=True, billed=True)


def refusal(code: str, retry_after: float | None = None) -> UpstreamFailure:
    row = contract.ERROR_CODES[code]
    problem = {"CREDITS": "upstream_credits", "AUTH": "upstream_auth"}.get(row.kind.name, "upstream_unavailable")
    return UpstreamFailure(Problem(problem, "scripted"), retryable=row.retryable, retry_after=retry_after, reason=code)


class Key:
    """One scripted ailabapi key: the next step per call; then OK."""

    def __init__(self, *steps: UpstreamAnswer | UpstreamFailure) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def analyze(self, image: ImagePayload, *, timeout_s: float) -> UpstreamAnswer:
        self.calls += 1
        step = self.steps.pop(0) if self.steps else OK
        if isinstance(step, UpstreamFailure):
            raise step
        return step


def resilient(pool: PoolFront, keys: dict[str, Key], **kw: Any) -> tuple[ResilientUpstream, list[str]]:
    exhausted: list[str] = []
    upstream = ResilientUpstream(
        pool=pool,
        clients=lambda name: keys[name],
        breaker=CircuitBreaker(2, reset_s=30),
        policy=RetryPolicy(0, base_s=0.001, cap_s=0.002),
        timeout_s=5,
        queue_timeout_s=kw.pop("queue_timeout_s", 2.0),
        on_exhausted=exhausted.append,
    )
    return upstream, exhausted


async def test_out_of_credits_moves_the_call_to_another_key_without_tripping_the_breaker() -> None:
    spec = PoolSpec((key("a", conc=5), key("b", conc=5)))
    pool = MemoryPool(lambda: spec, PoolSettings())
    keys = {"a": Key(*[refusal("ERROR_NOT_ENOUGH_CREDITS")] * 3), "b": Key()}
    upstream, exhausted = resilient(pool, keys)
    for _ in range(3):
        assert await upstream.call(PAYLOAD) is OK
    assert (keys["a"].calls, keys["b"].calls) == (1, 3)
    assert exhausted == ["a"]
    assert upstream.breaker.state == "closed"
    assert [k.state for k in (await pool.snapshot()).keys] == ["exhausted", "ok"]
    await pool.close()


async def test_a_verdict_on_the_image_never_moves() -> None:
    spec = PoolSpec((key("a", conc=5), key("b", conc=5)))
    pool = MemoryPool(lambda: spec, PoolSettings())
    blurry = UpstreamAnswer(422, {}, b"{}", contract.ERROR_CODES["ERROR_BLURRY_FACE"], simulated=True, billed=False)
    keys = {"a": Key(blurry), "b": Key()}
    upstream, _ = resilient(pool, keys)
    assert await upstream.call(PAYLOAD) is blurry
    assert (keys["a"].calls, keys["b"].calls) == (1, 0)
    await pool.close()


async def test_every_key_unusable_is_503_with_the_earliest_return() -> None:
    spec = PoolSpec((key("a", conc=5), key("b", conc=5)))
    pool = MemoryPool(lambda: spec, PoolSettings())
    keys = {"a": Key(refusal("EXCEEDING_LIMITS", retry_after=30)), "b": Key(refusal("ERROR_USER_NOT_EXISTS"))}
    upstream, _ = resilient(pool, keys)
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.call(PAYLOAD)
    assert failed.value.problem.code == "upstream_keys_unavailable"
    assert failed.value.problem.retry_after is not None
    assert 28 < failed.value.problem.retry_after <= 30
    assert (keys["a"].calls, keys["b"].calls) == (1, 1), "each key tried once, then no retry storm"
    with pytest.raises(UpstreamFailure):
        await upstream.call(PAYLOAD)
    assert (keys["a"].calls, keys["b"].calls) == (1, 1)
    await pool.close()


async def test_a_pool_of_one_keeps_todays_behaviour() -> None:
    """FACEGATE_UPSTREAM_API_KEY alone: a refusal is the caller's answer, and the next call tries again."""
    spec = PoolSpec.single("k", qps=1000, max_concurrency=5)
    pool = MemoryPool(lambda: spec, PoolSettings())
    keys = {"default": Key(refusal("ERROR_NOT_ENOUGH_CREDITS"))}
    upstream, exhausted = resilient(pool, keys)
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.call(PAYLOAD)
    assert failed.value.problem.code == "upstream_credits"
    assert exhausted == []
    assert await upstream.call(PAYLOAD) is OK
    await pool.close()


async def test_the_share_full_refusal_is_429() -> None:
    spec = PoolSpec((key("k", qps=1, conc=5),))
    pool = MemoryPool(lambda: spec, PoolSettings(queue_per_tenant=1))
    upstream, _ = resilient(pool, {"k": Key()})
    held = await pool.acquire(Caller("a"), 1)
    first = asyncio.create_task(upstream.call(PAYLOAD, caller=Caller("a")))
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamFailure) as refused:
        await upstream.call(PAYLOAD, caller=Caller("a"))
    assert refused.value.problem.code == "upstream_share_exceeded"
    assert refused.value.problem.status == 429
    await pool.release(held, Outcome())
    assert await first is OK
    await pool.close()
