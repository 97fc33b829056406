"""The embedded limiter: rate limits and quotas in this process's memory (exact for one process)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.limits.base import Admission, Clock, DayCounts, RateState, Record, Reservation, Usage, quota_states
from app.limits.gcra import US, available, gcra, interval_us, windows_us
from app.tenants import Tenant


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
        #: (tenant, YYYYMMDD) -> counters: the usage history, for the life of the process.
        self._history: dict[tuple[str, str], DayCounts] = {}
        #: Reservations not settled yet (each is settled once).
        self._open: set[str] = set()

    def _add(self, tenant: str, day: str, field: str, n: int = 1) -> None:
        counts = self._history.setdefault((tenant, day), {})
        counts[field] = counts.get(field, 0) + n

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
                quota_states(limits, (day.used, month.used), wins, now),
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
                quotas = quota_states(limits, (day.used, month.used), wins, now)
                return Admission(False, rate, quotas, "quota_exceeded", retry / US)
            day.used += 1
            month.used += 1
            reservation = Reservation(tenant.name, (wins[0].period, wins[1].period), uuid.uuid4().hex)
            self._open.add(reservation.id)
        if record is not None:
            window_field = "hits" if record == "hits" else "misses"
            for w in (day, month):
                setattr(w, window_field, getattr(w, window_field) + 1)
            self._add(tenant.name, wins[0].period, window_field)
            if record != window_field:
                self._add(tenant.name, wins[0].period, record)
        quotas = quota_states(limits, (day.used, month.used), wins, now)
        return Admission(True, rate, quotas, reservation=reservation)

    async def settle(
        self, reservation: Reservation, *, spent: bool, attempts: int = 0, collapsed: bool = False
    ) -> None:
        if reservation.id not in self._open:
            return  # settled already
        self._open.discard(reservation.id)
        day = reservation.periods[0]
        if spent:
            self._add(reservation.tenant, day, "credits")
        if attempts > 0:
            self._add(reservation.tenant, day, "upstream_calls", attempts)
        if collapsed:
            self._add(reservation.tenant, day, "collapsed")
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
            quotas=quota_states(limits, (day.used, month.used), wins, now),
            credits_day=day.spent,
            credits_month=month.spent,
            hits_day=day.hits,
            misses_day=day.misses,
            hits_month=month.hits,
            misses_month=month.misses,
            now_s=now / US,
        )

    async def record(self, tenant: str, field: str) -> None:
        self._add(tenant, windows_us(self._now())[0].period, field)

    async def history(self, tenant: str, days: Sequence[str]) -> dict[str, DayCounts]:
        return {day: dict(self._history[(tenant, day)]) for day in days if (tenant, day) in self._history}

    async def close(self) -> None:
        return None
