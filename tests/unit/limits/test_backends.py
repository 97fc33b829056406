"""One suite, two backends: MemoryLimiter and RedisLimiter (real Redis, the Lua scripts) must agree.

Time is injected (``clock=``): the Redis scripts take it as an argument instead of
``TIME``, so rollovers at midnight and at the end of a month are tested at exact
instants without waiting. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from app import redisconn
from app.limits import Admission, Limiter, MemoryLimiter, QuotaUnavailable, RedisLimiter
from app.limits.gcra import US, windows_us
from app.redisconn import RedisClient, RedisHealth
from app.settings import Settings
from app.tenants import Limits, Tenant
from tests.conftest import TOPOLOGIES, topology_url

pytestmark = pytest.mark.redis


class Clock:
    """Settable time, kept in whole µs (no float drift), read in seconds like ``time.time``."""

    def __init__(self, iso: str = "2026-03-10T12:00:00") -> None:
        self.us = 0
        self.set(iso)

    def set(self, iso: str) -> None:
        self.us = round(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * US)

    def advance(self, seconds: float) -> None:
        self.us += round(seconds * US)

    @property
    def now(self) -> float:
        return self.us / US

    def __call__(self) -> float:
        return self.us / US


def tenant(name: str = "acme", rate: float = 1000, burst: int = 1000, day: int | None = 5, month: int | None = 50):
    return Tenant(name, Limits(rate, burst, day, month))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=TOPOLOGIES)
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """A production client (app/redisconn.py) on each topology in turn."""
    client = redisconn.connect(Settings(redis_url=topology_url(request, request.param), _env_file=None))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis", "redis-cluster", "redis-sentinel"])
async def limiter(request: pytest.FixtureRequest, clock: Clock, prefix: str) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter(clock=clock)
        return
    url = topology_url(request, request.param.partition("-")[2] or "single")
    client = redisconn.connect(Settings(redis_url=url, _env_file=None))
    limiter = RedisLimiter(client, RedisHealth(), prefix, clock=clock)
    try:
        yield limiter
    finally:
        await limiter.close(grace_s=0)  # no settlement retried after the client is closed
        await client.aclose()


async def reserve_n(lim: Limiter, t: Tenant, n: int) -> list[Admission]:
    return [await lim.admit(t, reserve=True, record="misses") for _ in range(n)]


# --- rate limit ----------------------------------------------------------------------


async def test_burst_then_steady_rate(limiter: Limiter, clock: Clock) -> None:
    t = tenant(rate=10, burst=5)
    first = [await limiter.admit(t, reserve=False) for _ in range(7)]
    assert [a.allowed for a in first] == [True] * 5 + [False] * 2
    assert [a.rate.remaining for a in first[:5] if a.rate] == [4, 3, 2, 1, 0]
    refused = first[5]
    assert refused.reason == "rate_limited"
    assert refused.retry_after == pytest.approx(0.1)
    assert refused.rate is not None
    assert refused.rate.remaining == 0
    assert refused.rate.next_s == pytest.approx(0.1)
    assert refused.reservation is None
    # Steady: exactly one per 100 ms for 20 s.
    passed = 0
    for _ in range(200):
        clock.advance(0.1)
        assert (await limiter.admit(t, reserve=False)).allowed
        assert not (await limiter.admit(t, reserve=False)).allowed
        passed += 1
    assert passed == 200
    # Idle long enough and the whole burst is back, no more.
    clock.advance(60)
    again = [(await limiter.admit(t, reserve=False)).allowed for _ in range(6)]
    assert again == [True] * 5 + [False]


async def test_rate_limited_request_reserves_and_counts_nothing(limiter: Limiter) -> None:
    t = tenant(rate=1, burst=1)
    assert (await limiter.admit(t, reserve=True, record="misses")).allowed
    refused = await limiter.admit(t, reserve=True, record="misses")
    assert refused.reason == "rate_limited"
    usage = await limiter.usage(t)
    assert usage.quotas[0].used == 1
    assert usage.misses_day == 1


# --- quotas --------------------------------------------------------------------------


async def test_daily_quota_reserve_commit_refund(limiter: Limiter, clock: Clock) -> None:
    t = tenant(day=3, month=100)
    got = await reserve_n(limiter, t, 3)
    assert all(a.allowed and a.reservation for a in got)
    assert [a.quotas[0].remaining for a in got] == [2, 1, 0]
    over = await limiter.admit(t, reserve=True, record="misses")
    assert (over.allowed, over.reason) == (False, "quota_exceeded")
    assert over.violated == ("daily",)
    assert over.retry_after == pytest.approx(12 * 3600), "until UTC midnight"
    assert over.quotas[0].remaining == 0
    # Free requests still pass while the quota is used up.
    assert (await limiter.admit(t, reserve=False, record="hits")).allowed
    # One failed call refunded: one more billable call fits.
    assert got[0].reservation
    assert got[1].reservation
    assert got[2].reservation
    await limiter.settle(got[0].reservation, spent=False)
    await limiter.settle(got[1].reservation, spent=True)
    await limiter.settle(got[2].reservation, spent=True)
    usage = await limiter.usage(t)
    assert (usage.quotas[0].used, usage.credits_day, usage.credits_month) == (2, 2, 2)
    again = await limiter.admit(t, reserve=True, record="misses")
    assert again.allowed
    assert (await limiter.admit(t, reserve=True)).reason == "quota_exceeded"
    usage = await limiter.usage(t)
    assert (usage.hits_day, usage.misses_day, usage.hits_month, usage.misses_month) == (1, 4, 1, 4), (
        "refused requests are neither hits nor misses"
    )


async def test_monthly_quota_and_the_later_reset_wins(limiter: Limiter, clock: Clock) -> None:
    clock.set("2026-03-30T18:00:00")
    t = tenant(day=2, month=3)
    await reserve_n(limiter, t, 2)
    over = await limiter.admit(t, reserve=True)
    assert over.reason == "quota_exceeded"
    assert over.violated == ("daily",)
    assert over.retry_after == pytest.approx(6 * 3600)
    clock.set("2026-03-31T00:00:00")
    assert (await limiter.admit(t, reserve=True)).allowed
    assert (await limiter.admit(t, reserve=True)).allowed is False
    over = await limiter.admit(t, reserve=True)
    assert over.violated == ("monthly",)
    assert over.retry_after == pytest.approx(24 * 3600), "the month ends with the day here"
    await reserve_n(limiter, tenant(day=2, month=4), 1)
    over = await limiter.admit(t, reserve=True)
    assert over.violated == ("daily", "monthly")
    clock.set("2026-03-31T12:00:00")
    over = await limiter.admit(t, reserve=True)
    assert over.retry_after == pytest.approx(12 * 3600)
    clock.set("2026-04-01T00:00:00")
    fresh = await limiter.admit(t, reserve=True)
    assert fresh.allowed
    assert [q.used for q in fresh.quotas] == [1, 1]


async def test_monthly_only_limit(limiter: Limiter, clock: Clock) -> None:
    clock.set("2026-02-20T00:00:00")
    t = tenant(day=None, month=2)
    await reserve_n(limiter, t, 2)
    over = await limiter.admit(t, reserve=True)
    assert over.violated == ("monthly",)
    assert over.retry_after == pytest.approx(9 * 86400), "2026 is not a leap year: March starts in 9 days"
    clock.set("2026-02-28T23:59:59.999999")
    assert not (await limiter.admit(t, reserve=True)).allowed
    clock.set("2026-03-01T00:00:00")
    assert (await limiter.admit(t, reserve=True)).allowed


async def test_unlimited_quotas_never_refuse(limiter: Limiter) -> None:
    t = tenant(day=None, month=None)
    got = await reserve_n(limiter, t, 50)
    assert all(a.allowed for a in got)
    assert got[-1].quotas[0].limit is None
    assert got[-1].quotas[0].used == 50
    assert got[-1].quotas[0].remaining is None


async def test_zero_quota_allows_only_free_requests(limiter: Limiter) -> None:
    t = tenant(day=0)
    assert (await limiter.admit(t, reserve=True)).reason == "quota_exceeded"
    assert (await limiter.admit(t, reserve=False, record="hits")).allowed


async def test_day_rollover_at_utc_midnight(limiter: Limiter, clock: Clock) -> None:
    clock.set("2024-02-28T23:59:59.5")
    t = tenant(day=2, month=10)
    res = await reserve_n(limiter, t, 2)
    assert (await limiter.admit(t, reserve=True)).reason == "quota_exceeded"
    clock.set("2024-02-29T00:00:00")  # leap day: a new day, the same month
    usage = await limiter.usage(t)
    assert (usage.quotas[0].used, usage.quotas[1].used) == (0, 2)
    assert usage.quotas[0].reset_s == 86400
    after = await reserve_n(limiter, t, 2)
    assert all(a.allowed for a in after)
    # Yesterday's reservations settle into yesterday: today's counters are untouched by the
    # refund, the month (still current) gets it back.
    assert res[0].reservation
    assert res[1].reservation
    await limiter.settle(res[0].reservation, spent=False)
    await limiter.settle(res[1].reservation, spent=True)
    usage = await limiter.usage(t)
    assert (usage.quotas[0].used, usage.quotas[1].used) == (2, 3)
    assert (usage.credits_day, usage.credits_month) == (0, 1)


async def test_month_rollover_resets_both(limiter: Limiter, clock: Clock) -> None:
    clock.set("2025-12-31T23:59:59")
    t = tenant(day=100, month=3)
    await reserve_n(limiter, t, 3)
    await limiter.admit(t, reserve=False, record="hits")
    assert (await limiter.admit(t, reserve=True)).reason == "quota_exceeded"
    clock.set("2026-01-01T00:00:00.000001")
    usage = await limiter.usage(t)
    assert [q.used for q in usage.quotas] == [0, 0]
    assert (usage.hits_day, usage.hits_month) == (0, 0)
    assert usage.quotas[1].window_s == 31 * 86400
    assert (await limiter.admit(t, reserve=True)).allowed


async def test_new_limits_apply_at_once_and_counters_are_kept(limiter: Limiter) -> None:
    """A reload swaps the Tenant (same name, new Limits): counters live under the name."""
    await reserve_n(limiter, tenant(day=3), 3)
    assert (await limiter.admit(tenant(day=3), reserve=True)).reason == "quota_exceeded"
    raised = await limiter.admit(tenant(day=5), reserve=True)
    assert raised.allowed
    assert raised.quotas[0].used == 4
    assert (await limiter.admit(tenant(day=2), reserve=True)).reason == "quota_exceeded"


async def test_tenants_are_isolated(limiter: Limiter) -> None:
    a, b = tenant("a", rate=1, burst=1, day=1), tenant("b", rate=1, burst=1, day=1)
    assert (await limiter.admit(a, reserve=True)).allowed
    assert (await limiter.admit(a, reserve=True)).reason == "rate_limited"
    assert (await limiter.admit(b, reserve=True)).allowed
    assert (await limiter.usage(a)).quotas[0].used == 1
    assert (await limiter.usage(b)).quotas[0].used == 1


async def test_usage_reads_without_changing(limiter: Limiter, clock: Clock) -> None:
    t = tenant(rate=10, burst=5, day=5, month=9)
    await reserve_n(limiter, t, 2)
    for _ in range(3):
        u = await limiter.usage(t)
    assert u.rate.remaining == 3
    assert u.rate.limit == 5
    assert u.rate.reset_s == pytest.approx(0.2)
    assert [(q.name, q.used, q.remaining) for q in u.quotas] == [("daily", 2, 3), ("monthly", 2, 7)]
    assert u.now_s == pytest.approx(clock.now)
    assert u.now_s + u.quotas[0].reset_s == pytest.approx(datetime(2026, 3, 11, tzinfo=UTC).timestamp())
    assert u.now_s + u.quotas[1].reset_s == pytest.approx(datetime(2026, 4, 1, tzinfo=UTC).timestamp())
    fresh = await limiter.usage(tenant("nobody"))
    assert fresh.rate.remaining == 1000
    assert fresh.quotas[0].used == 0
    assert fresh.credits_day == 0


async def test_a_reservation_is_settled_once(limiter: Limiter) -> None:
    """A settlement sent again (a retry after an unconfirmed one) changes nothing."""
    t = tenant()
    first, second = await reserve_n(limiter, t, 2)
    assert first.reservation and second.reservation
    for _ in range(2):
        await limiter.settle(first.reservation, spent=False)
        await limiter.settle(second.reservation, spent=True)
    usage = await limiter.usage(t)
    assert (usage.quotas[0].used, usage.credits_day) == (1, 1)


async def test_refund_never_goes_below_zero(limiter: Limiter) -> None:
    t = tenant()
    (res,) = await reserve_n(limiter, t, 1)
    assert res.reservation
    await limiter.settle(res.reservation, spent=False)
    await limiter.settle(res.reservation, spent=False)
    assert (await limiter.usage(t)).quotas[0].used == 0


# --- the two backends are one behaviour ------------------------------------------------


def _view(a: Admission) -> tuple[Any, ...]:
    rate = a.rate
    assert rate is not None
    return (
        a.allowed,
        a.reason,
        round(a.retry_after, 6),
        rate.remaining,
        round(rate.reset_s, 6),
        round(rate.next_s, 6),
        tuple((q.name, q.limit, q.used, round(q.reset_s, 6), q.window_s) for q in a.quotas),
        a.reservation and (a.reservation.tenant, a.reservation.periods),  # ids are each backend's own
    )


async def test_memory_and_redis_decide_identically(redis_client: RedisClient, prefix: str) -> None:
    """A long random run (rates with fractional µs intervals, rollovers, refunds) on both backends."""
    clock = Clock("2024-02-27T23:59:50")
    mem = MemoryLimiter(clock=clock)
    red = RedisLimiter(redis_client, RedisHealth(), prefix, clock=clock)
    rng = random.Random(5)
    tenants = [tenant("x", rate=3, burst=4, day=7, month=20), tenant("y", rate=7.3, burst=2, day=None, month=11)]
    held: list[Any] = []
    for step in range(600):
        clock.advance(rng.choice([0, 0, 0.001, 0.05, 0.137, 0.4, 1, 3600, 86400 / 3]))
        t = rng.choice(tenants)
        op = rng.random()
        if op < 0.7:
            reserve = rng.random() < 0.6
            record = rng.choice(["hits", "misses", None])
            a = await mem.admit(t, reserve=reserve, record=record)  # type: ignore[arg-type]
            b = await red.admit(t, reserve=reserve, record=record)  # type: ignore[arg-type]
            assert _view(a) == _view(b), step
            if a.reservation and b.reservation:
                held.append((a.reservation, b.reservation))
        elif op < 0.85 and held:
            r_mem, r_red = held.pop(rng.randrange(len(held)))
            spent = rng.random() < 0.5
            await mem.settle(r_mem, spent=spent)
            await red.settle(r_red, spent=spent)
        else:
            a_u, b_u = await mem.usage(t), await red.usage(t)
            assert a_u == b_u, step


# --- Redis specifics --------------------------------------------------------------------


async def test_redis_reservations_are_exact_under_concurrency(redis_topology: str, prefix: str) -> None:
    """Three limiters on three connections pools (three "replicas"), 300 concurrent reservations."""
    clients = [redisconn.connect(Settings(redis_url=redis_topology, _env_file=None)) for _ in range(3)]
    limiters = [RedisLimiter(c, RedisHealth(), prefix) for c in clients]
    try:
        # Connections opened first, as the app does at start (redisconn.warm): 300 first commands at
        # once open 300 connections, on Sentinel each asking the sentinels where the master is, and on
        # a busy CPU some of those handshakes outlast the 1 s connect timeout (QuotaUnavailable).
        await asyncio.gather(*(redisconn.warm(c, 100) for c in clients))
        t = tenant(rate=100_000, burst=100_000, day=37, month=1000)
        async with asyncio.TaskGroup() as group:  # a failure stops the others before the clients close
            admits = [group.create_task(limiters[i % 3].admit(t, reserve=True)) for i in range(300)]
        results = [a.result() for a in admits]
        assert sum(a.allowed for a in results) == 37
        assert {a.reason for a in results if not a.allowed} == {"quota_exceeded"}
        assert (await limiters[0].usage(t)).quotas[0].used == 37
    finally:
        for limiter, c in zip(limiters, clients, strict=True):
            await limiter.close(grace_s=0)  # no settlement retried after the client is closed
            await c.aclose()


async def test_redis_keys_share_the_tenant_hash_tag_and_use_redis_time(redis_client: RedisClient, prefix: str) -> None:
    lim = RedisLimiter(redis_client, RedisHealth(), prefix)  # no clock: Redis TIME
    t = tenant("team-7")
    a = await lim.admit(t, reserve=True, record="misses")
    assert a.allowed
    assert a.reservation
    keys = sorted(
        [k.decode() if isinstance(k, bytes) else k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
    )
    seconds, micros = await redis_client.time()
    today = windows_us(seconds * US + micros)[0].period
    history = [f"{lim.history_base('team-7')}:{today}", f"{lim.history_base('team-7')}:days"]
    assert keys == sorted([*lim.keys("team-7"), *history, lim.marker("team-7", a.reservation.id)])
    assert all("{team-7}" in k for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1, "one Redis Cluster slot per tenant"
    seconds, micros = await redis_client.time()
    now_us = seconds * US + micros
    day, month = windows_us(now_us)
    assert a.reservation.periods == (day.period, month.period)
    assert abs(a.quotas[0].reset_s - (day.reset_us - now_us) / US) < 5


async def test_redis_reloads_scripts_after_a_flush(redis_client: RedisClient, prefix: str, clock: Clock) -> None:
    lim = RedisLimiter(redis_client, RedisHealth(), prefix, clock=clock)
    t = tenant()
    assert (await lim.admit(t, reserve=True)).allowed
    await redis_client.script_flush()  # what a Redis restart does to the script cache
    assert (await lim.admit(t, reserve=True)).allowed
    assert (await lim.usage(t)).quotas[0].used == 2


async def test_redis_down_is_quota_unavailable(own_redis: Any) -> None:
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    lim = RedisLimiter(client, RedisHealth(), "t")
    try:
        assert (await lim.admit(tenant(), reserve=True)).allowed
        own_redis.stop()
        with pytest.raises(QuotaUnavailable):
            await lim.admit(tenant(), reserve=True)  # its refund is retried in the background
        with pytest.raises(QuotaUnavailable):
            await lim.usage(tenant())
    finally:
        await lim.close(grace_s=0)
        await client.aclose()


async def test_lua_calendar_matches_python_over_many_days(redis_client: RedisClient, prefix: str) -> None:
    """Lua's civil-date arithmetic against Python's calendar, every ~3.7 days for 40 years."""
    clock = Clock("2000-01-01T00:00:00")
    lim = RedisLimiter(redis_client, RedisHealth(), prefix, clock=clock)
    t = tenant()
    for _ in range(4000):
        clock.advance(3.7 * 86400)
        u = await lim.usage(t)
        now_us = clock.us
        day, month = windows_us(now_us)
        assert round(u.quotas[0].reset_s * US) == day.reset_us - now_us
        assert round(u.quotas[1].reset_s * US) == month.reset_us - now_us
        assert u.quotas[1].window_s == month.length_s
