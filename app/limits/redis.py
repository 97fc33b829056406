"""The limiter across replicas: each decision is one Lua script (``lua/``), atomic in Redis."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from app.limits.base import (
    Admission,
    Clock,
    DayCounts,
    QuotaState,
    QuotaUnavailable,
    RateState,
    Record,
    Reservation,
    Usage,
)
from app.limits.gcra import US, available, interval_arg, interval_us
from app.redisconn import RedisClient, RedisDown, RedisHealth
from app.tenants import Tenant


def _lua(name: str) -> str:
    here = resources.files("app.limits").joinpath("lua")
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
        client: RedisClient,
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
        self._record = client.register_script(_lua("record"))

    def keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:q:{{{tenant}}}"
        return [f"{base}:rate", f"{base}:daily", f"{base}:monthly"]

    def history_base(self, tenant: str) -> str:
        """``<this>:<YYYYMMDD>`` is a day of ``tenant``'s history (same {tenant} slot as its counters)."""
        return f"{self._prefix}:u:{{{tenant}}}"

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
        r = await self._run(self._admit, [*self.keys(tenant.name), self.history_base(tenant.name)], args)
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

    async def settle(
        self, reservation: Reservation, *, spent: bool, attempts: int = 0, collapsed: bool = False
    ) -> None:
        keys = [*self.keys(reservation.tenant)[1:], self.history_base(reservation.tenant)]
        args = [*reservation.periods, "spent" if spent else "refund", attempts, "1" if collapsed else "0"]
        await self._run(self._settle, keys, args)

    async def record(self, tenant: str, field: str) -> None:
        await self._run(self._record, [self.history_base(tenant)], [self._now(), field])

    async def history(self, tenant: str, days: Sequence[str]) -> dict[str, DayCounts]:
        base = self.history_base(tenant)

        async def op() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(f"{base}:{day}")
                result: list[Any] = await pipe.execute()
                return result

        try:
            found = await self._health.run("quota", op)
        except RedisDown:
            raise QuotaUnavailable() from None
        return {
            day: {k.decode(): int(v) for k, v in counts.items()}
            for day, counts in zip(days, found, strict=True)
            if counts
        }

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
