"""Per-tenant rate limits (GCRA) and quotas on billable calls.

Two limits, two meanings. The *rate limit* protects the gateway and is checked on every
authenticated request, cache hits included. The *quotas* protect the company's ailabapi
credits: they count only calls that reach the upstream, reserved before the call and
refunded when the upstream did not bill it.

Both are decided in one step (:meth:`Limiter.admit`), so a request is either admitted
with its reservation or refused with the reason, atomically. The in-memory backend
here and the Redis backend (``quota_redis.py``) share these types and one test suite.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis

from app.redisconn import RedisDown, RedisHealth
from app.tenants import Limits, Tenant

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Window:
    """A quota window: its name, its id (for keys) and its end, all in UTC."""

    name: Literal["daily", "monthly"]
    period: str
    reset_at: float
    length_s: int


def windows_at(now: float) -> tuple[Window, Window]:
    """The UTC day and UTC calendar month containing ``now``."""
    t = datetime.fromtimestamp(now, UTC)
    day_start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return (
        Window("daily", day_start.strftime("%Y%m%d"), next_day.timestamp(), 86400),
        Window(
            "monthly",
            month_start.strftime("%Y%m"),
            next_month.timestamp(),
            int((next_month - month_start).total_seconds()),
        ),
    )


@dataclass(frozen=True, slots=True)
class RateState:
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again
    window_s: float  # burst / rate: the draft's policy window


@dataclass(frozen=True, slots=True)
class QuotaState:
    name: Literal["daily", "monthly"]
    limit: int | None
    used: int
    reset_s: float
    window_s: int

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One billable call held against the tenant's quotas until settled."""

    tenant: str
    periods: tuple[str, str]  # (day, month) the reservation counted in


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    rate: RateState | None  # None when the backend could not say (fail-open)
    quotas: tuple[QuotaState, ...] = ()
    reason: Literal["rate_limited", "quota_exceeded"] | None = None
    retry_after: float = 0.0
    reservation: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    tenant: str
    limits: Limits
    rate: RateState
    quotas: tuple[QuotaState, ...]
    credits_day: int
    credits_month: int
    hits_day: int
    misses_day: int
    hits_month: int
    misses_month: int


class QuotaUnavailable(Exception):
    """The backend cannot decide (Redis down); the service applies QUOTA_FAIL_MODE."""


Record = Literal["hits", "misses"] | None


class Limiter(Protocol):
    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        """Rate-limit this request, reserve one billable call if ``reserve``, and count it as a
        cache hit or miss (``record``) — atomically, in one round trip."""

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        """Commit (``spent``: the upstream billed it) or refund a reservation."""

    async def usage(self, tenant: Tenant) -> Usage: ...

    async def close(self) -> None: ...


def gcra(tat: float, now: float, limits: Limits) -> tuple[bool, float, float, int]:
    """One GCRA step. Returns (allowed, new_tat, retry_after, remaining).

    ``tat`` is the theoretical arrival time of the next request; a burst of ``burst``
    requests is allowed at once, then one every ``1/rate`` seconds.
    """
    interval = 1.0 / limits.rate_per_s
    capacity = interval * limits.burst
    new_tat = max(tat, now) + interval
    allow_at = new_tat - capacity
    if now < allow_at:
        return False, tat, allow_at - now, 0
    remaining = max(0, int((now + capacity - new_tat) / interval + 1e-9))
    return True, new_tat, 0.0, remaining


def available(tat: float, now: float, limits: Limits) -> int:
    """Requests that could be made right now without being refused."""
    interval = 1.0 / limits.rate_per_s
    return max(0, min(limits.burst, int((now + interval * limits.burst - max(tat, now)) / interval + 1e-9)))


def rate_state(tat: float, now: float, limits: Limits, remaining: int) -> RateState:
    return RateState(limits.burst, remaining, max(0.0, tat - now), limits.burst / limits.rate_per_s)


@dataclass
class _TenantCounters:
    tat: float = 0.0
    used: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    misses: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class MemoryLimiter:
    """The embedded backend: exact within one process (all state in this object)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._tenants: dict[str, _TenantCounters] = defaultdict(_TenantCounters)

    def _quota_states(self, c: _TenantCounters, limits: Limits, now: float) -> tuple[QuotaState, ...]:
        day, month = windows_at(now)
        return (
            QuotaState("daily", limits.daily_quota, c.used[day.period], day.reset_at - now, day.length_s),
            QuotaState("monthly", limits.monthly_quota, c.used[month.period], month.reset_at - now, month.length_s),
        )

    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        now = self._clock()
        c = self._tenants[tenant.name]
        limits = tenant.limits
        allowed, tat, retry, remaining = gcra(c.tat, now, limits)
        if not allowed:
            return Admission(False, rate_state(c.tat, now, limits, remaining), (), "rate_limited", retry)
        c.tat = tat
        if record is not None:
            counters = c.hits if record == "hits" else c.misses
            for window in windows_at(now):
                counters[window.period] += 1
        rate = rate_state(tat, now, limits, remaining)
        quotas = self._quota_states(c, limits, now)
        if not reserve:
            return Admission(True, rate, quotas)
        full = [q for q in quotas if q.limit is not None and q.used >= q.limit]
        if full:
            return Admission(False, rate, quotas, "quota_exceeded", max(q.reset_s for q in full))
        day, month = windows_at(now)
        c.used[day.period] += 1
        c.used[month.period] += 1
        return Admission(
            True,
            rate,
            self._quota_states(c, limits, now),
            reservation=Reservation(tenant.name, (day.period, month.period)),
        )

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        c = self._tenants[reservation.tenant]
        for period in reservation.periods:
            if spent:
                c.spent[period] += 1
            else:
                c.used[period] = max(0, c.used[period] - 1)

    async def usage(self, tenant: Tenant) -> Usage:
        now = self._clock()
        c = self._tenants[tenant.name]
        day, month = windows_at(now)
        return Usage(
            tenant=tenant.name,
            limits=tenant.limits,
            rate=rate_state(c.tat, now, tenant.limits, available(c.tat, now, tenant.limits)),
            quotas=self._quota_states(c, tenant.limits, now),
            credits_day=c.spent[day.period],
            credits_month=c.spent[month.period],
            hits_day=c.hits[day.period],
            misses_day=c.misses[day.period],
            hits_month=c.hits[month.period],
            misses_month=c.misses[month.period],
        )

    async def close(self) -> None:
        return None


def ceil_s(seconds: float) -> int:
    """Whole seconds for headers: never 0 while something is still pending."""
    return max(0, math.ceil(seconds - 1e-9))


def _lua(name: str) -> str:
    here = resources.files("app.lua")
    return here.joinpath("_time.lua").read_text() + "\n" + here.joinpath(f"{name}.lua").read_text()


class RedisLimiter:
    """Exact across replicas: each decision is one Lua script, atomic in Redis.

    Time comes from Redis ``TIME`` (replica clocks may disagree), and all of a tenant's
    keys share the ``{tenant}`` hash tag so the scripts run on one Redis Cluster slot.
    Scripts are loaded once and called with ``EVALSHA`` (redis-py falls back to ``EVAL``
    after a Redis restart flushed the script cache).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        health: RedisHealth,
        prefix: str,
        clock: Clock | None = None,
    ) -> None:
        self._r = client
        self._health = health
        self._prefix = prefix
        self._clock = clock  # tests only: None means Redis TIME
        self._admit = client.register_script(_lua("admit"))
        self._settle = client.register_script(_lua("settle"))
        self._usage = client.register_script(_lua("usage"))

    def keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:q:{{{tenant}}}"
        return [f"{base}:rate", f"{base}:daily", f"{base}:monthly"]

    def _now(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1_000_000))

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await self._health.run("quota", lambda: script(keys=keys, args=args))
        except RedisDown:
            raise QuotaUnavailable() from None
        return result

    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        limits = tenant.limits
        interval_us = 1_000_000 / limits.rate_per_s
        args = [
            f"{interval_us:.3f}",
            limits.burst,
            1 if reserve else 0,
            -1 if limits.daily_quota is None else limits.daily_quota,
            -1 if limits.monthly_quota is None else limits.monthly_quota,
            self._now(),
            record or "",
        ]
        r = await self._run(self._admit, self.keys(tenant.name), args)
        allowed, reason, retry_us, remaining, tat_in_us = int(r[0]), r[1].decode(), int(r[2]), int(r[3]), int(r[4])
        quotas = (
            QuotaState("daily", limits.daily_quota, int(r[5]), int(r[6]) / 1e6, int(r[7])),
            QuotaState("monthly", limits.monthly_quota, int(r[8]), int(r[9]) / 1e6, int(r[10])),
        )
        rate = RateState(limits.burst, remaining, max(0.0, tat_in_us / 1e6), limits.burst / limits.rate_per_s)
        if not allowed:
            why: Literal["rate_limited", "quota_exceeded"] = (
                "rate_limited" if reason == "rate_limited" else "quota_exceeded"
            )
            return Admission(False, rate, quotas, why, retry_us / 1e6)
        reservation = Reservation(tenant.name, (r[11].decode(), r[12].decode())) if reserve else None
        return Admission(True, rate, quotas, reservation=reservation)

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        keys = self.keys(reservation.tenant)[1:]
        await self._run(self._settle, keys, [*reservation.periods, "spent" if spent else "refund"])

    async def usage(self, tenant: Tenant) -> Usage:
        r = [int(v) for v in await self._run(self._usage, self.keys(tenant.name), [self._now()])]
        limits = tenant.limits
        tat_in_s = r[0] / 1e6
        interval = 1.0 / limits.rate_per_s
        remaining = max(0, min(limits.burst, int((interval * limits.burst - tat_in_s) / interval + 1e-9)))
        return Usage(
            tenant=tenant.name,
            limits=limits,
            rate=RateState(limits.burst, remaining, tat_in_s, limits.burst / limits.rate_per_s),
            quotas=(
                QuotaState("daily", limits.daily_quota, r[5], r[1] / 1e6, r[2]),
                QuotaState("monthly", limits.monthly_quota, r[9], r[3] / 1e6, r[4]),
            ),
            credits_day=r[6],
            credits_month=r[10],
            hits_day=r[7],
            misses_day=r[8],
            hits_month=r[11],
            misses_month=r[12],
        )

    async def close(self) -> None:
        return None
