"""The limiter across replicas: each decision is one Lua script (``lua/``), atomic in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

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
from app.redisconn import RedisClient, RedisDown, RedisHealth, Wire
from app.tenants import Tenant

log = logging.getLogger("facegate.quota")

#: A reservation's marker outlives any call that holds it (settled calls delete theirs).
MARKER_TTL_MS: Final = 24 * 3600 * 1000
#: How long a settlement Redis could not confirm is sent again (it is settled at most once).
SETTLE_RETRY_FOR_S: Final = 300.0


def _lua(name: str) -> str:
    here = resources.files("app.limits").joinpath("lua")
    return here.joinpath("_time.lua").read_text() + "\n" + here.joinpath(f"{name}.lua").read_text()


def _quota_arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _admission(tenant: Tenant, r: list[Any], rid: str | None) -> Admission:
    """admit.lua's reply as an :class:`Admission` (``rid``: the reservation asked for, if any)."""
    limits = tenant.limits
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
    reservation = Reservation(tenant.name, (r[11].decode(), r[12].decode()), rid) if rid is not None else None
    return Admission(True, RateState.of(limits, remaining, tat_in), quotas, reservation=reservation)


class RedisLimiter:
    """Exact across replicas: each decision is one Lua script, atomic in Redis.

    Time comes from Redis ``TIME`` (replica clocks may disagree), and all of a tenant's
    keys share the ``{tenant}`` hash tag so the scripts run on one Redis Cluster slot.
    Scripts are sent once and then called by SHA with ``EVALSHA``; redis-py's script
    object loads them again by itself when Redis answers NOSCRIPT (after a restart or a
    ``SCRIPT FLUSH``).

    Each reservation leaves a marker key (``…:r:<id>``, same slot) that its settlement
    consumes, so a settlement takes effect once however often it is sent. That makes
    retrying safe: a settlement Redis could not confirm (down, failing over, the answer
    lost) is sent again in the background for up to :data:`SETTLE_RETRY_FOR_S`; and a
    reservation whose outcome is unknown (its admission failed that way) is refunded the
    same way — if it was made at all.
    """

    def __init__(
        self,
        client: RedisClient,
        health: RedisHealth,
        prefix: str,
        clock: Clock | None = None,
    ) -> None:
        self._r = client
        self._wire = Wire.of(client)
        self._health = health
        self._prefix = prefix
        self._clock = clock  # tests only: None means Redis TIME
        self._admit = client.register_script(_lua("admit"))
        self._settle = client.register_script(_lua("settle"))
        self._usage = client.register_script(_lua("usage"))
        self._record = client.register_script(_lua("record"))
        self._retrying: set[asyncio.Task[None]] = set()
        self._logged_at = -60.0

    def keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:q:{{{tenant}}}"
        return [f"{base}:rate", f"{base}:daily", f"{base}:monthly"]

    def marker(self, tenant: str, reservation_id: str) -> str:
        """The key that says reservation ``reservation_id`` of ``tenant`` is not settled yet."""
        return f"{self._prefix}:q:{{{tenant}}}:r:{reservation_id}"

    def history_base(self, tenant: str) -> str:
        """``<this>:<YYYYMMDD>`` is a day of ``tenant``'s history (same {tenant} slot as its counters)."""
        return f"{self._prefix}:u:{{{tenant}}}"

    def _now(self) -> str:
        return "" if self._clock is None else str(round(self._clock() * US))

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await self._health.run("quota", lambda: self._wire.script(script, keys, args))
        except RedisDown:
            raise QuotaUnavailable() from None
        return result

    async def admit(self, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        rid = uuid.uuid4().hex if reserve else ""
        keys = [*self.keys(tenant.name), self.history_base(tenant.name), self.marker(tenant.name, rid)]
        try:
            r = await self._run(self._admit, keys, self._admit_args(tenant, reserve, record))
        except QuotaUnavailable:
            if reserve:  # it may have been made: refund it once Redis answers (a no-op if it was not)
                self._settle_later(Reservation(tenant.name, ("", ""), rid), "refund", 0, False)
            raise
        return _admission(tenant, r, rid if reserve else None)

    async def admit_hit(self, tenant: Tenant, entry: str) -> tuple[Admission, bytes, float] | None:
        """Read the cache entry ``entry`` (a key of this Redis) and, when it is there, admit this
        request as a hit — one script, so a hit read from Redis costs one round trip. None: no such
        entry (nothing admitted or counted). One Redis or Sentinel's master only: on a Cluster the
        entry lives in another slot than the tenant's keys."""
        keys = [*self.keys(tenant.name), self.history_base(tenant.name), self.marker(tenant.name, ""), entry]
        r = await self._run(self._admit, keys, [*self._admit_args(tenant, False, "hits"), 1])
        if len(r) == 1:  # {'absent'}
            return None
        pttl = int(r[14])
        return _admission(tenant, r, None), bytes(r[13]), (pttl / 1000.0 if pttl > 0 else 0.0)

    def _admit_args(self, tenant: Tenant, reserve: bool, record: Record) -> list[Any]:
        limits = tenant.limits
        return [
            interval_arg(limits),
            limits.burst,
            1 if reserve else 0,
            _quota_arg(limits.daily_quota),
            _quota_arg(limits.monthly_quota),
            self._now(),
            record or "",
            MARKER_TTL_MS,
        ]

    async def settle(
        self, reservation: Reservation, *, spent: bool, attempts: int = 0, collapsed: bool = False
    ) -> None:
        try:
            await self._settle_once(reservation, "spent" if spent else "refund", attempts, collapsed)
        except QuotaUnavailable:
            self._settle_later(reservation, "spent" if spent else "refund", attempts, collapsed)

    async def _settle_once(self, reservation: Reservation, how: str, attempts: int, collapsed: bool) -> None:
        tenant = reservation.tenant
        keys = [*self.keys(tenant)[1:], self.history_base(tenant), self.marker(tenant, reservation.id)]
        await self._run(self._settle, keys, [how, attempts, "1" if collapsed else "0"])

    def _settle_later(self, reservation: Reservation, how: str, attempts: int, collapsed: bool) -> None:
        now = time.monotonic()
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.warning("quota backend unavailable: settling reservations later (logged at most every 10 s)")

        async def retry() -> None:
            delay, deadline = 0.25, time.monotonic() + SETTLE_RETRY_FOR_S
            while time.monotonic() < deadline:
                await asyncio.sleep(delay)
                with contextlib.suppress(QuotaUnavailable):
                    await self._settle_once(reservation, how, attempts, collapsed)
                    return
                delay = min(delay * 2, 5.0)
            log.error("could not %s a reservation of %s within %.0f s", how, reservation.tenant, SETTLE_RETRY_FOR_S)

        task = asyncio.get_running_loop().create_task(retry())
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

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

    async def close(self, grace_s: float = 5.0) -> None:
        """Give settlements that are being retried ``grace_s`` to get through, then stop them."""
        if self._retrying:
            await asyncio.wait(set(self._retrying), timeout=grace_s)
        for task in set(self._retrying):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
