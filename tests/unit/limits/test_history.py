"""Usage history per tenant and UTC day (chargeback), on both backends, with an injected clock.

A scripted day crosses a UTC midnight that is also a month end: every count lands on the day
the request was admitted (a call admitted at 23:59:59 and settled after midnight is billed to
the old day), and what ``usage()`` reported for the day equals the history of that day.
"""

# The fixtures come from the backend suite (imported below): pytest's way, ruff's F811.
# ruff: noqa: F811, F401

from __future__ import annotations

from app.limits import Limiter
from tests.unit.limits.test_backends import Clock, clock, limiter, redis_client, tenant

JAN31, FEB01 = "20260131", "20260201"


async def test_history_follows_a_scripted_sequence_across_midnight_and_month_end(
    limiter: Limiter,
    clock: Clock,
) -> None:
    t = tenant(day=100, month=1000)
    clock.set("2026-01-31T23:59:50")
    for _ in range(2):
        assert (await limiter.admit(t, reserve=False, record="hits")).allowed
    paid = await limiter.admit(t, reserve=True, record="misses")
    assert paid.reservation is not None
    await limiter.settle(paid.reservation, spent=True, attempts=1)
    failed = await limiter.admit(t, reserve=True, record="misses")  # ailabapi 5xx twice: not billed
    assert failed.reservation is not None
    await limiter.settle(failed.reservation, spent=False, attempts=2)
    assert (await limiter.admit(t, reserve=False, record="collapsed")).allowed  # joined a call in flight
    await limiter.record(t.name, "refused:invalid_image")
    clock.set("2026-01-31T23:59:59.900")
    late = await limiter.admit(t, reserve=True, record="misses")
    assert late.reservation is not None
    before_midnight = await limiter.usage(t)

    clock.set("2026-02-01T00:00:01")
    await limiter.settle(late.reservation, spent=True, attempts=1)  # billed to the day it was admitted
    forced = await limiter.admit(t, reserve=True, record="forced")
    assert forced.reservation is not None
    await limiter.settle(forced.reservation, spent=True, attempts=1)
    remote = await limiter.admit(t, reserve=True, record="misses")  # another replica answered it
    assert remote.reservation is not None
    await limiter.settle(remote.reservation, spent=False, collapsed=True)
    await limiter.record(t.name, "refused:rate_limited")
    await limiter.record(t.name, "refused:rate_limited")

    history = await limiter.history(t.name, [JAN31, FEB01, "20260202"])
    assert history == {
        JAN31: {
            "hits": 2,
            "misses": 4,
            "collapsed": 1,
            "credits": 2,
            "upstream_calls": 4,
            "refused:invalid_image": 1,
        },
        FEB01: {
            "misses": 2,
            "forced": 1,
            "collapsed": 1,
            "credits": 1,
            "upstream_calls": 1,
            "refused:rate_limited": 2,
        },
    }
    # What the tenant was told for Jan 31, just before midnight, is what the history keeps
    # (plus the call settled after midnight, which /v1/usage could not show any more).
    assert before_midnight.hits_day == history[JAN31]["hits"]
    assert before_midnight.misses_day == history[JAN31]["misses"]
    assert before_midnight.credits_day == history[JAN31]["credits"] - 1
    assert before_midnight.hits_month == 2, "January's window"
    after = await limiter.usage(t)
    assert (after.hits_day, after.misses_day, after.credits_day) == (0, 2, 1)
    assert (after.misses_month, after.credits_month) == (2, 1), "February's window starts from zero"
    assert await limiter.history("someone-else", [JAN31, FEB01]) == {}


async def test_redis_history_has_no_ttl_and_drops_days_older_than_410(
    limiter: Limiter,
    clock: Clock,
) -> None:
    """No TTL: under volatile-lru only keys with a TTL may be evicted, and finance data must not be."""
    from app.limits import RedisLimiter

    t = tenant()
    clock.set("2025-01-01T12:00:00")
    await limiter.record(t.name, "refused:x")
    clock.set("2026-02-15T12:00:00")  # 410 days later: 2025-01-01 is one day too old
    await limiter.record(t.name, "refused:x")
    kept = await limiter.history(t.name, ["20250101", "20260215"])
    if isinstance(limiter, RedisLimiter):
        assert list(kept) == ["20260215"]
        base = limiter.history_base(t.name)
        assert await limiter._r.ttl(f"{base}:20260215") == -1
    else:
        assert list(kept) == ["20250101", "20260215"], "memory: kept for the life of the process"
