"""The cache backends behind one protocol: one suite, run against each of them.

``memory`` is the embedded LRU; ``redis`` and ``tiered`` run on the real Redis of the
test session under a unique key prefix (their keys are deleted afterwards, nothing is
flushed). The byte bound of the LRU and the fail-open contract of the Redis backend
have their own tests below.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from app import cache as cache_mod
from app.cache import CacheBackend, CacheError, MemoryCache, RedisCache, TieredCache, cache_key
from app.redisconn import COOLDOWN_S, RedisClient, RedisHealth
from app.settings import Settings
from app.singleflight import Outcome
from app.upstream import contract
from tests.conftest import topology_url
from tests.servers import RedisServer, free_port


def connect(url: str) -> RedisClient:
    """The production pool settings, pointed at ``url`` (timeouts come from RedisHealth)."""
    from app import redisconn

    return redisconn.connect(Settings(redis_url=url, redis_timeout_s=0.25))


@dataclass
class Clock:
    """A hand-driven monotonic clock: cool-downs and TTLs without sleeping."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


# --- one suite, every backend ---------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "tiered", "redis-cluster", "redis-sentinel"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[CacheBackend]:
    if request.param == "memory":
        yield MemoryCache(1 << 20)
        return
    client = connect(topology_url(request, request.param.partition("-")[2] or "single"))
    prefix = "u" + uuid.uuid4().hex[:12]
    shared = RedisCache(client, RedisHealth(), prefix)
    try:
        yield TieredCache(MemoryCache(1 << 20), shared) if request.param == "tiered" else shared
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_set_then_get_returns_the_bytes_and_the_remaining_ttl(backend: CacheBackend) -> None:
    value = bytes(range(256)) * 4  # every byte value: nothing may be decoded or re-encoded
    await backend.set("k1", value, 60)
    found = await backend.get("k1")
    assert found is not None
    assert found[0] == value
    assert 0 < found[1] <= 60


async def test_absent_key_is_none(backend: CacheBackend) -> None:
    assert await backend.get("nope") is None


async def test_overwrite_and_delete(backend: CacheBackend) -> None:
    await backend.set("k", b"one", 60)
    await backend.set("k", b"two", 30)
    found = await backend.get("k")
    assert found is not None
    assert found[0] == b"two"
    assert found[1] <= 30
    await backend.delete("k")
    assert await backend.get("k") is None
    await backend.delete("k")  # deleting an absent key is not an error


async def test_entry_expires(backend: CacheBackend) -> None:
    await backend.set("short", b"x", 0.05)
    await backend.set("long", b"y", 60)
    await asyncio.sleep(0.15)
    assert await backend.get("short") is None
    assert await backend.get("long") is not None


async def test_redis_prefixes_keep_deployments_apart(redis_url: str) -> None:
    client = connect(redis_url)
    a, b = (RedisCache(client, RedisHealth(), "u" + uuid.uuid4().hex[:12]) for _ in range(2))
    try:
        await a.set("same", b"a", 60)
        assert await b.get("same") is None
        found = await a.get("same")
        assert found is not None
        assert found[0] == b"a"
    finally:
        await a.delete("same")
        await client.aclose()


# --- the key ----------------------------------------------------------------------------

SHA = "ab" * 32


def test_key_is_a_fixed_length_hash_that_reveals_nothing() -> None:
    key = cache_key(scope="tenant:alpha", sha256=SHA)
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert key == cache_key(scope="tenant:alpha", sha256=SHA)
    assert "alpha" not in key
    assert SHA not in key


@pytest.mark.parametrize(
    "change",
    [
        {"scope": "tenant:beta"},
        {"scope": "*"},
        {"sha256": "ab" * 31 + "ac"},
        {"endpoint": contract.ENDPOINT_ID + "-v2"},
        {"params": "max_face_num=2"},
    ],
)
def test_every_part_of_the_question_is_in_the_key(change: dict[str, str]) -> None:
    base = {"scope": "tenant:alpha", "sha256": SHA, "endpoint": contract.ENDPOINT_ID, "params": ""}
    assert cache_key(**{**base, **change}) != cache_key(**base)


def test_format_version_is_in_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key(scope="*", sha256=SHA)
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", "999")
    assert cache_key(scope="*", sha256=SHA) != before


def test_parts_cannot_be_shifted_into_each_other() -> None:
    # "a" + "b|c" must not collide with "a|b" + "c": the separator is not a hex/scope character.
    assert cache_key(scope="tenant:a", params="x", sha256=SHA) != cache_key(scope="tenant:ax", params="", sha256=SHA)


# --- the in-memory LRU under a byte bound ------------------------------------------------


def cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + MemoryCache.ENTRY_OVERHEAD


async def test_memory_never_exceeds_its_bound_with_a_working_set_larger_than_it() -> None:
    rng = random.Random(7)
    bound = 20_000
    cache = MemoryCache(bound)
    model: dict[str, bytes] = {}
    for step in range(3000):
        key = f"k{rng.randrange(200)}"  # 200 keys of ~1 KB: ten times the bound
        op = rng.random()
        if op < 0.6:
            value = rng.randbytes(rng.randrange(0, 2000))
            await cache.set(key, value, 60)
            model[key] = value
        elif op < 0.9:
            found = await cache.get(key)
            if found is not None:
                assert found[0] == model[key], f"step {step}: stale or foreign value"
        else:
            await cache.delete(key)
            model.pop(key, None)
        assert cache.bytes <= bound, f"step {step}: {cache.bytes} > {bound}"
        assert cache.bytes == sum(cost(k, v) for k, (v, _) in cache._data.items())
    assert 0 < len(cache) < 200  # it did evict, and it did keep something


async def test_memory_evicts_least_recently_used_first() -> None:
    one = cost("a", b"x" * 100)
    cache = MemoryCache(3 * one)
    for key in "abc":
        await cache.set(key, b"x" * 100, 60)
    assert await cache.get("a") is not None  # a is now the most recent; b the least
    await cache.set("d", b"x" * 100, 60)
    assert await cache.get("b") is None
    assert [k for k in "acd" if await cache.get(k) is not None] == ["a", "c", "d"]
    assert cache.bytes == 3 * one


async def test_memory_one_big_entry_evicts_as_many_as_needed() -> None:
    small = cost("s0", b"x" * 100)
    cache = MemoryCache(5 * small)
    for i in range(5):
        await cache.set(f"s{i}", b"x" * 100, 60)
    await cache.set("big", b"y" * (3 * small), 60)
    assert await cache.get("big") is not None
    assert cache.bytes <= cache.max_bytes
    assert [i for i in range(5) if await cache.get(f"s{i}") is not None] == [4]


async def test_memory_oversize_entry_is_not_stored_and_evicts_nothing() -> None:
    cache = MemoryCache(2000)
    await cache.set("keep", b"k" * 500, 60)
    before = cache.bytes
    await cache.set("huge", b"h" * 2000, 60)
    assert await cache.get("huge") is None
    assert await cache.get("keep") is not None
    assert cache.bytes == before


async def test_memory_replacing_an_entry_with_an_oversize_one_drops_the_old_value() -> None:
    cache = MemoryCache(2000)
    await cache.set("k", b"old", 60)
    await cache.set("k", b"h" * 2000, 60)
    assert await cache.get("k") is None  # never the stale answer
    assert cache.bytes == 0


async def test_memory_expiry_frees_bytes_and_ttl_counts_down() -> None:
    clock = Clock()
    cache = MemoryCache(10_000, clock=clock)
    await cache.set("k", b"v" * 100, 10)
    clock.now += 4
    found = await cache.get("k")
    assert found is not None
    assert found[1] == pytest.approx(6)
    clock.now += 6
    assert await cache.get("k") is None
    assert cache.bytes == 0
    assert len(cache) == 0


async def test_memory_with_a_zero_bound_stores_nothing() -> None:
    cache = MemoryCache(0)
    await cache.set("k", b"", 60)
    assert await cache.get("k") is None
    assert cache.bytes == 0


# --- fail-open: Redis errors are CacheError, nothing else ----------------------------------


@dataclass
class Errors:
    count: int = 0

    def __call__(self) -> None:
        self.count += 1


def down_cache(clock: Clock, errors: Callable[[], None]) -> tuple[RedisClient, RedisCache]:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    return client, RedisCache(client, RedisHealth(clock=clock), "u" + uuid.uuid4().hex[:12], on_error=errors)


async def test_unreachable_redis_is_a_cache_error_then_skipped_during_the_cooldown() -> None:
    clock, errors, seen = Clock(), Errors(), []
    health_errors: list[str] = []
    client, cache = down_cache(clock, errors)
    cache._health._on_error = health_errors.append
    try:
        for op in (cache.get("k"), cache.set("k", b"v", 60), cache.delete("k")):
            with pytest.raises(CacheError):
                await op
            seen.append(errors.count)
        assert seen == [1, 2, 3]  # every degraded operation is counted (facegate_cache_errors)
        assert health_errors == ["cache"]  # but only the first one reached Redis: the rest were skipped
        clock.now += COOLDOWN_S
        with pytest.raises(CacheError):
            await cache.get("k")
        assert health_errors == ["cache", "cache"]  # tried again by itself after the cool-down
    finally:
        await client.aclose()


async def test_redis_stopped_then_restarted_comes_back_without_a_new_client(own_redis: RedisServer) -> None:
    clock = Clock()
    client = connect(own_redis.url)
    errors = Errors()
    cache = TieredCache(MemoryCache(1 << 20), RedisCache(client, RedisHealth(clock=clock), "u1", on_error=errors))
    try:
        await cache.set("old", b"v", 60)
        own_redis.stop()
        assert await cache.get("old") is not None  # the local tier keeps serving hot entries
        with pytest.raises(CacheError):
            await cache.get("other")
        with pytest.raises(CacheError):
            await cache.set("new", b"n", 60)
        assert errors.count == 2
        assert await cache.local.get("new") is not None  # kept locally even though Redis refused it
        own_redis.start()  # empty: a restarted Redis is also a flushed one
        clock.now += COOLDOWN_S
        await cache.set("after", b"a", 60)
        fresh = RedisCache(client, RedisHealth(), "u1")
        found = await fresh.get("after")
        assert found is not None
        assert found[0] == b"a"
    finally:
        await client.aclose()


async def test_stalled_redis_times_out_as_a_cache_error(own_redis: RedisServer) -> None:
    """SIGSTOP: connections are accepted but nothing answers (a slow or hung Redis)."""
    import signal

    client = connect(own_redis.url)
    cache = RedisCache(client, RedisHealth(timeout_s=0.25), "u2")  # a short bound keeps the test quick
    assert own_redis.proc is not None
    try:
        await cache.set("k", b"v", 60)
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(CacheError):
                await cache.get("k")
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
    finally:
        await client.aclose()


async def test_a_failing_cache_does_not_switch_off_the_other_redis_components(redis_url: str) -> None:
    """The backends the app builds: each component has its own cool-down, so a cache lookup
    that timed out (say under a CPU burst) leaves quotas (fail-closed) and collapsing working."""
    from app.limits import QuotaUnavailable
    from app.observability import Metrics
    from app.runtime import backends
    from app.tenants import Limits, Tenant

    settings = Settings(redis_url=redis_url, redis_prefix="u" + uuid.uuid4().hex[:12], max_uploads_in_flight=4)
    metrics = Metrics()
    client, cache, limiter, coordinator, pool = await backends(settings, metrics)
    assert client is not None
    assert isinstance(cache, TieredCache)
    assert isinstance(cache.shared, RedisCache)
    try:
        for _ in range(3):  # the app's threshold: three failures in a row start the cool-down
            cache.shared._health._failed("cache", TimeoutError())
        with pytest.raises(CacheError):
            await cache.get("k")
        assert metrics.cache_errors._value.get() == 1
        tenant = Tenant("t", Limits(rate_per_s=100, burst=100, daily_quota=10, monthly_quota=None))
        try:
            admission = await limiter.admit(tenant, reserve=False)
        except QuotaUnavailable:
            pytest.fail("the cache's cool-down switched off the quotas")
        assert admission.allowed
        lease = await coordinator.acquire("k")  # collapsing still coordinates across replicas
        assert lease is not None
        await coordinator.release(lease, Outcome("abandoned"))
    finally:
        for close in (coordinator.close, limiter.close, cache.close, pool.close):
            await close()
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
