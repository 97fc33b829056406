"""The analyze use case on its own: ``AnalyzeService`` driven directly, with no HTTP in between.

The order is the product — whatever answers for free (the cache, a call already in
flight) comes before anything that costs (the quota reservation, then the upstream call)
— and every way a paid call can end settles its reservation exactly once. Here the
memory backends are real; only the paid upstream attempt is a stand-in
(:class:`ScriptedAilabapi`), wrapped in the real breaker/guard/retry layer. The one
cross-replica case uses two services on a real Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from app import redisconn
from app.cache import MemoryCache
from app.context import RequestContext
from app.errors import Problem
from app.intake import IntakeLimits, Upload, receive
from app.limits import MemoryLimiter
from app.service import AnalyzeOptions, AnalyzeService, ServiceConfig
from app.settings import Settings
from app.singleflight import Coordinator, LocalCoordinator, RedisCoordinator
from app.tenants import Limits, Tenant
from app.upstream import contract
from app.upstream.ailabapi import ImagePayload, UpstreamAnswer, UpstreamFailure
from app.upstream.keys import PoolSpec
from app.upstream.pool import Hooks, MemoryPool, PoolSettings
from app.upstream.resilience import CircuitBreaker, ResilientUpstream, RetryPolicy
from tests.imagegen import make_image

FIXTURES = Path(__file__).parents[1] / "fixtures" / "upstream"
ANSWER = (FIXTURES / "face-analyzer-advanced.seed-style.example.json").read_bytes()
NO_FACE = (FIXTURES / "error.no-face.example.json").read_bytes()
LIMITS = IntakeLimits(
    max_bytes=1 << 20,
    max_pixels=1 << 22,
    spool_threshold=1 << 20,
    spool_dir=Path(tempfile.gettempdir()),
    body_timeout_s=5,
)
_seeds = iter(range(50_000, 60_000))

Outcome = Callable[[], UpstreamAnswer]


def answer(content: bytes = ANSWER, *, status: int = 200, billed: bool = True) -> UpstreamAnswer:
    body = orjson.loads(content)
    code = contract.error_code_of(body)
    verdict = contract.lookup(code, status) if code else None
    return UpstreamAnswer(status, body, content, verdict, simulated=False, billed=billed)


def failure(code: str, *, billed: bool = False, retryable: bool = False) -> UpstreamFailure:
    return UpstreamFailure(Problem(code, "scripted"), retryable=retryable, billed=billed)


class ScriptedAilabapi:
    """Stands in for one attempt at the paid API: answers from a script, counts calls."""

    def __init__(self, *script: UpstreamAnswer | UpstreamFailure, delay_s: float = 0.0) -> None:
        self.script = list(script) or [answer()]
        self.calls = 0
        self.delay_s = delay_s
        self.release = asyncio.Event()
        self.release.set()

    async def analyze(self, image: ImagePayload, *, timeout_s: float) -> UpstreamAnswer:
        self.calls += 1
        await self.release.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        step = self.script[min(self.calls, len(self.script)) - 1]
        if isinstance(step, UpstreamFailure):
            raise step
        return step


def service(
    upstream: ScriptedAilabapi,
    *,
    limiter: MemoryLimiter | None = None,
    cache: MemoryCache | None = None,
    coordinator: Coordinator | None = None,
    retries: int = 0,
    spent: list[str] | None = None,
) -> AnalyzeService:
    spec = PoolSpec.single("sk-test", qps=1000, max_concurrency=10)
    resilient = ResilientUpstream(
        pool=MemoryPool(lambda: spec, PoolSettings(), Hooks()),
        clients=lambda _key: upstream,
        breaker=CircuitBreaker(failures=100, reset_s=1),
        policy=RetryPolicy(retries, base_s=0.001, cap_s=0.001),
        timeout_s=5,
        queue_timeout_s=1,
    )
    return AnalyzeService(
        config=ServiceConfig(
            cache_scope="tenant",
            cache_ttl_s=60,
            negative_ttl_s=30,
            lock_ttl_s=1,
            follow_timeout_s=5,
            quota_fail_open=False,
        ),
        cache=cache if cache is not None else MemoryCache(1 << 20),
        limiter=limiter or MemoryLimiter(),
        upstream=resilient,
        coordinator=coordinator or LocalCoordinator(),
        on_spent=spent.append if spent is not None else None,
    )


def tenant(name: str = "alpha", *, daily: int | None = 100) -> Tenant:
    return Tenant(name, Limits(rate_per_s=1000.0, burst=1000, daily_quota=daily, monthly_quota=None))


def image() -> bytes:
    return make_image("jpeg", 64, 64, seed=next(_seeds))


async def upload_of(data: bytes) -> Upload:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    return await receive(chunks(), "image/jpeg", str(len(data)), LIMITS)


async def analyze(svc: AnalyzeService, who: Tenant, data: bytes, **opts: bool) -> tuple[RequestContext, Any]:
    ctx = RequestContext(request_id=uuid.uuid4().hex)
    upload = await upload_of(data)
    try:
        entry = await svc.analyze(ctx, who, upload, AnalyzeOptions(**opts))
    finally:
        if not upload.handed_off:
            upload.close()
    return ctx, entry


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (bounded by the test timeout)."""
    while not condition():  # noqa: ASYNC110 - the conditions are plain counters, no event to await
        await asyncio.sleep(0.001)


async def misses(svc: AnalyzeService, who: Tenant) -> int:
    return (await svc.limiter.usage(who)).misses_day


async def used_and_spent(svc: AnalyzeService, who: Tenant) -> tuple[int, int]:
    usage = await svc.limiter.usage(who)
    return usage.quotas[0].used, usage.credits_day


# --- free answers first ------------------------------------------------------------------


async def test_a_hit_is_answered_before_any_reservation_even_with_no_quota_left() -> None:
    upstream = ScriptedAilabapi()
    limiter = MemoryLimiter()
    svc = service(upstream, limiter=limiter)
    data = image()
    await analyze(svc, tenant(), data)  # paid once, stored
    broke = tenant(daily=1)  # the same tenant, its one call of today now used

    ctx, entry = await analyze(svc, broke, data)

    assert upstream.calls == 1
    assert ctx.cache is not None and ctx.cache.hit and ctx.cache.label == "hit"
    assert entry.raw["request_id"] == orjson.loads(ANSWER)["request_id"]
    assert ctx.admission is not None and ctx.admission.reservation is None
    usage = await limiter.usage(broke)
    assert (usage.hits_day, usage.misses_day, usage.quotas[0].used) == (1, 1, 1)
    with pytest.raises(Problem) as refused:  # a new image now needs the quota: refused
        await analyze(svc, broke, image())
    assert refused.value.code == "quota_exceeded"
    assert upstream.calls == 1


async def test_a_bad_image_costs_nothing_but_its_rate_unit() -> None:
    upstream = ScriptedAilabapi()
    svc = service(upstream)
    who = tenant()
    with pytest.raises(Problem) as refused:
        await analyze(svc, who, b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(200))
    assert refused.value.code in {"invalid_image", "unsupported_media_type"}
    assert upstream.calls == 0
    usage = await svc.limiter.usage(who)
    assert usage.quotas[0].used == 0
    assert usage.rate.remaining == who.limits.burst - 1  # it still counted against the rate limit


async def test_identical_concurrent_requests_follow_one_flight_and_pay_once() -> None:
    upstream = ScriptedAilabapi()
    upstream.release.clear()  # hold the first call until everyone has joined
    spent: list[str] = []
    svc = service(upstream, spent=spent)
    who = tenant()
    data = image()
    leader = asyncio.create_task(analyze(svc, who, data))
    await until(lambda: upstream.calls == 1)
    followers = [asyncio.create_task(analyze(svc, who, data)) for _ in range(5)]
    while await misses(svc, who) < 6:  # noqa: ASYNC110 - each follower is admitted (a miss) just before it joins
        await asyncio.sleep(0.001)
    upstream.release.set()
    results = await asyncio.gather(leader, *followers)

    assert upstream.calls == 1
    assert spent == ["alpha"]
    labels = sorted(ctx.cache.label for ctx, _ in results if ctx.cache is not None)
    assert labels == ["collapsed"] * 5 + ["miss"]
    assert all(ctx.admission is not None and ctx.admission.reservation is None for ctx, _ in results[1:])
    assert await used_and_spent(svc, who) == (1, 1)


@pytest.mark.redis
async def test_over_quota_a_request_takes_the_answer_another_replica_is_paying_for(redis_url: str) -> None:
    """Replica A leads the call (and holds the reservation); on replica B the same tenant is
    out of quota, yet gets A's answer for free instead of a 429."""
    client = redisconn.connect(Settings(redis_url=redis_url))
    prefix = "svc" + uuid.uuid4().hex[:10]
    coordinators = [RedisCoordinator(client, redisconn.RedisHealth(timeout_s=2), prefix, 2.0) for _ in range(2)]
    for c in coordinators:
        c.start()
    try:
        upstream_a = ScriptedAilabapi()
        upstream_a.release.clear()
        upstream_b = ScriptedAilabapi()
        a = service(upstream_a, coordinator=coordinators[0])
        b = service(upstream_b, coordinator=coordinators[1])
        data = image()
        paying = asyncio.create_task(analyze(a, tenant(), data))
        await until(lambda: upstream_a.calls == 1)
        free = asyncio.create_task(analyze(b, tenant(daily=0), data))
        await asyncio.sleep(0.05)
        assert not free.done()  # waiting for A's outcome, not refused
        upstream_a.release.set()
        (_, paid_entry), (ctx_b, free_entry) = await asyncio.gather(paying, free)

        assert upstream_a.calls == 1 and upstream_b.calls == 0
        assert free_entry.body == paid_entry.body
        assert ctx_b.cache is not None and ctx_b.cache.collapsed
        assert (await b.limiter.usage(tenant(daily=0))).quotas[0].used == 0
    finally:
        for c in coordinators:
            await c.close()
        await client.aclose()


# --- every way a paid call can end settles its reservation once --------------------------


@pytest.mark.parametrize(
    ("script", "code", "used", "credits"),
    [
        ((failure("upstream_error"),), "upstream_error", 0, 0),
        ((failure("upstream_timeout"),), "upstream_timeout", 0, 0),
        ((failure("upstream_credits"),), "upstream_credits", 0, 0),
        ((failure("upstream_error", billed=True),), "upstream_error", 1, 1),  # billed although it failed
        ((answer(b'{"request_id": "x", "error_code": 0, "data": {"weird": 1}}'),), "upstream_error", 1, 1),
        ((failure("upstream_unavailable", retryable=True),) * 3, "upstream_unavailable", 0, 0),
    ],
    ids=["5xx", "timeout", "credits", "billed-failure", "unreadable-success", "retries-exhausted"],
)
async def test_failures_refund_unless_the_upstream_billed(
    script: tuple[UpstreamAnswer | UpstreamFailure, ...], code: str, used: int, credits: int
) -> None:
    upstream = ScriptedAilabapi(*script)
    svc = service(upstream, retries=2)
    who = tenant()
    with pytest.raises(Problem) as refused:
        await analyze(svc, who, image())
    assert refused.value.code == code
    assert await used_and_spent(svc, who) == (used, credits)
    assert len(svc.flights) == 0


async def test_a_retry_that_succeeds_is_charged_once() -> None:
    upstream = ScriptedAilabapi(failure("upstream_unavailable", retryable=True), answer())
    svc = service(upstream, retries=2)
    who = tenant()
    ctx, _ = await analyze(svc, who, image())
    assert upstream.calls == 2 and ctx.upstream_attempts == 2
    assert await used_and_spent(svc, who) == (1, 1)


async def test_a_verdict_is_an_answer_cached_for_its_negative_ttl() -> None:
    upstream = ScriptedAilabapi(answer(NO_FACE, status=200, billed=False))
    cache = MemoryCache(1 << 20)
    svc = service(upstream, cache=cache)
    who = tenant()
    data = image()
    _, entry = await analyze(svc, who, data)
    assert entry.verdict is not None and entry.verdict.kind is contract.Kind.NO_FACE
    ctx, _ = await analyze(svc, who, data)
    assert ctx.cache is not None and ctx.cache.hit
    assert ctx.cache.ttl is not None and ctx.cache.ttl <= 30  # the negative TTL, not the 60 s one
    assert upstream.calls == 1
    assert await used_and_spent(svc, who) == (0, 0)  # not billed: refunded


async def test_a_flight_cancelled_at_shutdown_refunds() -> None:
    upstream = ScriptedAilabapi()
    upstream.release.clear()  # never answers
    svc = service(upstream)
    who = tenant()
    request = asyncio.create_task(analyze(svc, who, image()))
    await until(lambda: upstream.calls == 1)
    assert await used_and_spent(svc, who) == (1, 0)  # reserved while the call runs
    await svc.drain(grace_s=0.01, settle_s=1)
    with pytest.raises((asyncio.CancelledError, Problem)):
        await request
    assert await used_and_spent(svc, who) == (0, 0)


# --- the caller's cache directives --------------------------------------------------------


async def test_no_cache_skips_the_lookup_and_pays_but_still_stores() -> None:
    upstream = ScriptedAilabapi()
    svc = service(upstream)
    who = tenant()
    data = image()
    await analyze(svc, who, data)
    ctx, _ = await analyze(svc, who, data, no_cache=True)
    assert upstream.calls == 2
    assert ctx.cache is not None and ctx.cache.label == "forced" and ctx.cache.stored
    assert await used_and_spent(svc, who) == (2, 2)
    ctx, _ = await analyze(svc, who, data)
    assert ctx.cache is not None and ctx.cache.hit and upstream.calls == 2


async def test_no_store_answers_without_storing() -> None:
    upstream = ScriptedAilabapi()
    cache = MemoryCache(1 << 20)
    svc = service(upstream, cache=cache)
    who = tenant()
    data = image()
    ctx, _ = await analyze(svc, who, data, no_store=True)
    assert ctx.cache is not None and not ctx.cache.stored
    assert len(cache) == 0
    await analyze(svc, who, data)
    assert upstream.calls == 2  # nothing was stored, so the second one paid too


# --- per-tenant policy: maximum age, TTL override --------------------------------------------


async def test_an_answer_older_than_the_tenants_max_age_is_not_served() -> None:
    from dataclasses import replace

    from app.entry import Entry
    from app.policy import Policy

    upstream = ScriptedAilabapi()
    cache = MemoryCache(1 << 20)
    svc = service(upstream, cache=cache)
    data = image()
    await analyze(svc, tenant(), data)
    key = svc.key_for(tenant(), hashlib.sha256(data).hexdigest())
    found = await cache.get(key)
    assert found is not None
    old = Entry.decode(found[0])
    assert old is not None
    aged = replace(old, analyzed_at="2020-01-01T00:00:00.000000Z")  # the entry says it is years old
    await cache.set(key, aged.encode(), 60)

    ctx, _ = await analyze(svc, tenant(), data)  # no max age: served
    assert ctx.cache is not None and ctx.cache.hit
    picky = replace(tenant(), policy=Policy(max_age_s=3600))
    ctx, entry = await analyze(svc, picky, data)  # too old for this tenant: a new analysis
    assert ctx.cache is not None and not ctx.cache.hit
    assert upstream.calls == 2
    assert entry.age_s() < 3600


async def test_the_tenants_cache_ttl_replaces_the_global_one() -> None:
    from dataclasses import replace

    from app.policy import Policy

    cache = MemoryCache(1 << 20)
    svc = service(ScriptedAilabapi(), cache=cache)  # global TTL 60 s
    brief = replace(tenant(), policy=Policy(cache_ttl_s=5))
    data = image()
    await analyze(svc, brief, data)
    found = await cache.get(svc.key_for(brief, hashlib.sha256(data).hexdigest()))
    assert found is not None
    assert 0 < found[1] <= 5
