"""What a limiter decides and reports, and the protocol both backends implement.

Two limits, two meanings. The *rate limit* protects the gateway and is checked on every
authenticated request, cache hits included. The *quotas* protect the company's ailabapi
credits: they count only calls that reach the upstream, reserved before the call and
refunded when the upstream did not bill it.

Both are decided in one step (:meth:`Limiter.admit`), so a request is either admitted
with its reservation or refused with the reason, atomically, in one Redis round trip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, Protocol

from app.limits.gcra import US, Window, WindowName, interval_us
from app.tenants import Limits, Tenant

Clock = Callable[[], float]
#: How an admitted request is counted: a cache hit, or a miss — ``forced`` (X-Facegate-Force) and
#: ``collapsed`` (answered by an identical call in flight) are misses counted apart as well.
Record = Literal["hits", "misses", "forced", "collapsed"] | None
#: Usage history of one tenant and UTC day: field -> count (see ``HISTORY_FIELDS``; refusals as
#: ``refused:<problem code>``).
DayCounts = dict[str, int]
HISTORY_FIELDS: Final = ("credits", "upstream_calls", "hits", "misses", "collapsed", "forced")
#: Days of history kept (the Lua scripts say the same): more than the 400 finance asks for.
HISTORY_KEEP_DAYS: Final = 410


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
    """One billable call held against the tenant's quotas until settled (once: a second
    settlement of the same ``id`` changes nothing, so a settlement may be retried)."""

    tenant: str
    periods: tuple[str, str]  # (day, month) the reservation counted in
    id: str = ""


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

    async def settle(
        self, reservation: Reservation, *, spent: bool, attempts: int = 0, collapsed: bool = False
    ) -> None:
        """Commit (``spent``: the upstream billed it) or refund a reservation; the history of the day
        it was admitted on counts the credit, the ``attempts`` made upstream, and whether another
        replica's call answered it instead (``collapsed``). Exactly once per reservation: settling
        it again changes nothing (a backend may retry a settlement it could not confirm)."""

    async def record(self, tenant: str, field: str) -> None:
        """Count one event (``refused:<code>``) in today's history of ``tenant``."""

    async def history(self, tenant: str, days: Sequence[str]) -> dict[str, DayCounts]:
        """``tenant``'s history for each UTC day ``YYYYMMDD`` in ``days`` (days without any are absent)."""

    async def usage(self, tenant: Tenant) -> Usage: ...

    async def close(self) -> None: ...


class HitProbe(Protocol):
    async def admit_hit(self, tenant: Tenant, entry: str) -> tuple[Admission, bytes, float] | None:
        """Read the cache entry named ``entry`` (a key of the limiter's own Redis) and, when it is
        there, admit this request as a hit in the same step: (the admission, the entry, its TTL in
        seconds); None when it is absent (nothing admitted or counted)."""


def quota_states(
    limits: Limits, used: tuple[int, int], wins: tuple[Window, Window], now: int
) -> tuple[QuotaState, ...]:
    day, month = wins
    return (
        QuotaState("daily", limits.daily_quota, used[0], (day.reset_us - now) / US, day.length_s),
        QuotaState("monthly", limits.monthly_quota, used[1], (month.reset_us - now) / US, month.length_s),
    )


def ceil_s(seconds: float) -> int:
    """Whole seconds for headers: never 0 while something is still pending."""
    return max(0, math.ceil(seconds - 1e-9))


def utc_iso(ts: float) -> str:
    """An RFC 3339 UTC timestamp (whole seconds) for reset times in usage reports."""
    return datetime.fromtimestamp(round(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
