"""Per-tenant rate limits (GCRA) and quotas on billable calls.

Two limits, two meanings. The *rate limit* protects the gateway and is checked on every
authenticated request, cache hits included. The *quotas* protect the company's ailabapi
credits: they count only calls that reach the upstream, reserved before the call and
refunded when the upstream did not bill it.

Both are decided in one step (:meth:`Limiter.admit`), so a request is either admitted
with its reservation or refused with the reason, atomically, in one Redis round trip.
The in-memory backend (:class:`MemoryLimiter`) mirrors the Lua scripts in ``app/lua``
operation for operation — integer microseconds, the same rounding, the same window
bookkeeping — so both backends give the same answers and pass one test suite.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any, Final, Literal, Protocol

import redis.asyncio as aioredis

from app.redisconn import RedisDown, RedisHealth
from app.tenants import Limits, Tenant

Clock = Callable[[], float]
WindowName = Literal["daily", "monthly"]
Record = Literal["hits", "misses"] | None

US: Final = 1_000_000
_DAY_US: Final = 86_400 * US
_EPOCH: Final = date(1970, 1, 1)
#: Absorbs float noise in ``floor(x / interval)`` (the same constant is in admit.lua).
_EPS: Final = 1e-9


# --- the arithmetic both backends share (admit.lua and _time.lua do exactly this) -------


def interval_us(limits: Limits) -> float:
    """Microseconds between requests at the sustained rate, as the one decimal string both sides parse."""
    return float(interval_arg(limits))


def interval_arg(limits: Limits) -> str:
    return f"{US / limits.rate_per_s:.3f}"


@dataclass(frozen=True, slots=True)
class Window:
    """A quota window: its name, its id (for keys), its end and length — UTC, like Lua's."""

    name: WindowName
    period: str
    reset_us: int
    length_s: int


def windows_us(now_us: int) -> tuple[Window, Window]:
    """The UTC day and UTC calendar month containing ``now_us`` (integer arithmetic, as in Lua)."""
    return _windows_of_day(now_us // _DAY_US)


@functools.lru_cache(maxsize=64)
def _windows_of_day(days: int) -> tuple[Window, Window]:
    """Cached per day: every admission asks, and the answer changes once a day."""
    today = _EPOCH + timedelta(days=days)
    month_start = today.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    month_days = (next_month - month_start).days
    return (
        Window("daily", today.strftime("%Y%m%d"), (days + 1) * _DAY_US, 86_400),
        Window("monthly", month_start.strftime("%Y%m"), (next_month - _EPOCH).days * _DAY_US, month_days * 86_400),
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One GCRA decision, in microseconds."""

    allowed: bool
    tat: int  # the TAT to store (unchanged when refused)
    retry_us: int  # refused: until the next request is allowed
    remaining: int
    tat_in_us: int  # TAT minus now after this step: until the bucket is full again


def gcra(stored_tat: int, now: int, interval: float, burst: int) -> Step:
    """One GCRA step: a burst of ``burst`` at once, then one request every ``interval`` µs.

    ``stored_tat`` is the theoretical arrival time of the next request (0 = none yet).
    """
    capacity = interval * burst
    tat = max(stored_tat, now)
    new_tat = math.floor(tat + interval)
    if now < new_tat - capacity:
        return Step(False, stored_tat, math.ceil(new_tat - capacity - now), 0, tat - now)
    remaining = math.floor((now + capacity - new_tat) / interval + _EPS)
    return Step(True, new_tat, 0, remaining, new_tat - now)


def available(stored_tat: int, now: int, interval: float, burst: int) -> tuple[int, int]:
    """(requests that could be made right now, µs until the bucket is full) — without taking one."""
    tat_in = max(0, stored_tat - now)
    count = math.floor((interval * burst - tat_in) / interval + _EPS)
    return max(0, min(burst, count)), tat_in


# --- what a decision reports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateState:
    """The burst policy's state, as the RateLimit headers and /v1/usage show it."""

    limit: int  # the burst
    remaining: int
    reset_s: float  # until the bucket is full again
    next_s: float  # the draft's "effective window": no more than ``remaining`` before this
    window_s: float  # burst / rate: the policy window, in which ``limit`` refills

    @property
    def policy_w(self) -> int:
        """The window as the draft's ``w``: whole seconds, at least 1 (rounded up: never claims more)."""
        return max(1, math.ceil(self.window_s - 1e-9))

    @classmethod
    def of(cls, limits: Limits, remaining: int, tat_in_us: int, retry_us: int = 0) -> RateState:
        interval = interval_us(limits)
        if retry_us > 0:
            next_us: float = retry_us
        else:
            # Spend all ``remaining`` now: the next one is allowed once the TAT passes now + capacity.
            next_us = max(0.0, tat_in_us + (remaining + 1) * interval - interval * limits.burst)
        return cls(limits.burst, remaining, tat_in_us / US, next_us / US, limits.burst / limits.rate_per_s)


@dataclass(frozen=True, slots=True)
class QuotaState:
    name: WindowName
    limit: int | None
    used: int  # reserved + committed, in the current window
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

    @property
    def violated(self) -> tuple[str, ...]:
        """Names of the policies that refused this request (the draft's ``violated-policies``)."""
        if self.reason == "rate_limited":
            return ("burst",)
        if self.reason == "quota_exceeded":
            return tuple(q.name for q in self.quotas if q.limit is not None and q.used >= q.limit)
        return ()


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
    now_s: float  # the backend's clock when this was read: reset times are now_s + reset_s


class QuotaUnavailable(Exception):
    """The backend cannot decide (Redis down); the service applies QUOTA_FAIL_MODE."""


class Limiter(Protocol):
    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        """Rate-limit this request, reserve one billable call if ``reserve``, and count it as a
        cache hit or miss (``record``, only when admitted) — atomically, in one round trip."""

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        """Commit (``spent``: the upstream billed it) or refund a reservation."""

    async def usage(self, tenant: Tenant) -> Usage: ...

    async def close(self) -> None: ...


def _quota_states(
    limits: Limits, used: tuple[int, int], wins: tuple[Window, Window], now: int
) -> tuple[QuotaState, ...]:
    day, month = wins
    return (
        QuotaState("daily", limits.daily_quota, used[0], (day.reset_us - now) / US, day.length_s),
        QuotaState("monthly", limits.monthly_quota, used[1], (month.reset_us - now) / US, month.length_s),
    )


# --- in-memory backend ------------------------------------------------------------------


@dataclass
class _WindowCounters:
    """One window's counters; a new period starts them from zero (as ``window_used`` in Lua)."""

    period: str = ""
    used: int = 0
    spent: int = 0
    hits: int = 0
    misses: int = 0

    def roll(self, period: str) -> _WindowCounters:
        if self.period != period:
            self.period, self.used, self.spent, self.hits, self.misses = period, 0, 0, 0, 0
        return self

    def current(self, period: str) -> _WindowCounters:
        """Read-only view: the counters if they are for ``period``, else zeros."""
        return self if self.period == period else _WindowCounters(period)


@dataclass
class _TenantCounters:
    tat: int = 0
    windows: tuple[_WindowCounters, _WindowCounters] = field(
        default_factory=lambda: (_WindowCounters(), _WindowCounters())
    )


class MemoryLimiter:
    """The embedded backend: exact within one process (all state in this object).

    Every method runs without awaiting, so on one event loop each decision is atomic,
    as a Lua script is in Redis.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._tenants: dict[str, _TenantCounters] = {}

    def _now(self) -> int:
        return round(self._clock() * US)

    def _counters(self, name: str) -> _TenantCounters:
        c = self._tenants.get(name)
        if c is None:
            c = self._tenants[name] = _TenantCounters()
        return c

    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        now = self._now()
        limits = tenant.limits
        c = self._counters(tenant.name)
        wins = windows_us(now)
        day = c.windows[0].roll(wins[0].period)
        month = c.windows[1].roll(wins[1].period)
        step = gcra(c.tat, now, interval_us(limits), limits.burst)
        if not step.allowed:
            return Admission(
                False,
                RateState.of(limits, 0, step.tat_in_us, step.retry_us),
                _quota_states(limits, (day.used, month.used), wins, now),
                "rate_limited",
                step.retry_us / US,
            )
        c.tat = step.tat
        rate = RateState.of(limits, step.remaining, step.tat_in_us)
        reservation = None
        if reserve:
            retry = -1
            if limits.daily_quota is not None and day.used >= limits.daily_quota:
                retry = wins[0].reset_us - now
            if limits.monthly_quota is not None and month.used >= limits.monthly_quota:
                retry = max(retry, wins[1].reset_us - now)
            if retry >= 0:
                quotas = _quota_states(limits, (day.used, month.used), wins, now)
                return Admission(False, rate, quotas, "quota_exceeded", retry / US)
            day.used += 1
            month.used += 1
            reservation = Reservation(tenant.name, (wins[0].period, wins[1].period))
        if record is not None:
            for w in (day, month):
                setattr(w, record, getattr(w, record) + 1)
        quotas = _quota_states(limits, (day.used, month.used), wins, now)
        return Admission(True, rate, quotas, reservation=reservation)

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        c = self._counters(reservation.tenant)
        for counters, period in zip(c.windows, reservation.periods, strict=True):
            if counters.period != period:
                continue  # that window is over: nothing left to commit or refund in it
            if spent:
                counters.spent += 1
            elif counters.used > 0:
                counters.used -= 1

    async def usage(self, tenant: Tenant) -> Usage:
        now = self._now()
        limits = tenant.limits
        c = self._counters(tenant.name)
        wins = windows_us(now)
        day, month = c.windows[0].current(wins[0].period), c.windows[1].current(wins[1].period)
        count, tat_in = available(c.tat, now, interval_us(limits), limits.burst)
        return Usage(
            tenant=tenant.name,
            limits=limits,
            rate=RateState.of(limits, count, tat_in),
            quotas=_quota_states(limits, (day.used, month.used), wins, now),
            credits_day=day.spent,
            credits_month=month.spent,
            hits_day=day.hits,
            misses_day=day.misses,
            hits_month=month.hits,
            misses_month=month.misses,
            now_s=now / US,
        )

    async def close(self) -> None:
        return None


# --- Redis backend ----------------------------------------------------------------------


def _lua(name: str) -> str:
    here = resources.files("app.lua")
    return here.joinpath("_time.lua").read_text() + "\n" + here.joinpath(f"{name}.lua").read_text()


def _quota_arg(limit: int | None) -> int:
    return -1 if limit is None else limit


class RedisLimiter:
    """Exact across replicas: each decision is one Lua script, atomic in Redis.

    Time comes from Redis ``TIME`` (replica clocks may disagree), and all of a tenant's
    keys share the ``{tenant}`` hash tag so the scripts run on one Redis Cluster slot.
    Scripts are sent once and then called by SHA with ``EVALSHA``; redis-py's script
    object loads them again by itself when Redis answers NOSCRIPT (after a restart or a
    ``SCRIPT FLUSH``).
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
        return "" if self._clock is None else str(round(self._clock() * US))

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await self._health.run("quota", lambda: script(keys=keys, args=args))
        except RedisDown:
            raise QuotaUnavailable() from None
        return result

    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        limits = tenant.limits
        args = [
            interval_arg(limits),
            limits.burst,
            1 if reserve else 0,
            _quota_arg(limits.daily_quota),
            _quota_arg(limits.monthly_quota),
            self._now(),
            record or "",
        ]
        r = await self._run(self._admit, self.keys(tenant.name), args)
        allowed, reason, retry_us, remaining, tat_in = int(r[0]), r[1].decode(), int(r[2]), int(r[3]), int(r[4])
        quotas = (
            QuotaState("daily", limits.daily_quota, int(r[5]), int(r[6]) / US, int(r[7])),
            QuotaState("monthly", limits.monthly_quota, int(r[8]), int(r[9]) / US, int(r[10])),
        )
        if not allowed:
            if reason == "rate_limited":
                rate = RateState.of(limits, 0, tat_in, retry_us)
                return Admission(False, rate, quotas, "rate_limited", retry_us / US)
            return Admission(False, RateState.of(limits, remaining, tat_in), quotas, "quota_exceeded", retry_us / US)
        reservation = Reservation(tenant.name, (r[11].decode(), r[12].decode())) if reserve else None
        return Admission(True, RateState.of(limits, remaining, tat_in), quotas, reservation=reservation)

    async def settle(self, reservation: Reservation, *, spent: bool) -> None:
        keys = self.keys(reservation.tenant)[1:]
        await self._run(self._settle, keys, [*reservation.periods, "spent" if spent else "refund"])

    async def usage(self, tenant: Tenant) -> Usage:
        r = [int(v) for v in await self._run(self._usage, self.keys(tenant.name), [self._now()])]
        limits = tenant.limits
        now, tat = r[13], r[0]
        count, tat_in = available(tat, now, interval_us(limits), limits.burst)
        return Usage(
            tenant=tenant.name,
            limits=limits,
            rate=RateState.of(limits, count, tat_in),
            quotas=(
                QuotaState("daily", limits.daily_quota, r[5], r[1] / US, r[2]),
                QuotaState("monthly", limits.monthly_quota, r[9], r[3] / US, r[4]),
            ),
            credits_day=r[6],
            credits_month=r[10],
            hits_day=r[7],
            misses_day=r[8],
            hits_month=r[11],
            misses_month=r[12],
            now_s=now / US,
        )

    async def close(self) -> None:
        return None


def ceil_s(seconds: float) -> int:
    """Whole seconds for headers: never 0 while something is still pending."""
    return max(0, math.ceil(seconds - 1e-9))


def utc_iso(ts: float) -> str:
    """An RFC 3339 UTC timestamp (whole seconds) for reset times in usage reports."""
    return datetime.fromtimestamp(round(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
