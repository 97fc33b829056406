"""Per-tenant rate limits (GCRA) and quotas on billable calls: step 2 of the request's path.

- ``base``: what a decision reports (:class:`Admission`, :class:`Usage`, …) and the
  :class:`Limiter` protocol;
- ``gcra``: the arithmetic both backends share (GCRA steps, UTC day/month windows);
- ``memory``: the embedded backend, exact within one process;
- ``redis`` + ``lua/``: the backend shared by replicas, one atomic script per decision.
"""

from app.limits.base import (
    Admission,
    Clock,
    HitProbe,
    Limiter,
    QuotaState,
    QuotaUnavailable,
    RateState,
    Record,
    Reservation,
    Usage,
    ceil_s,
    utc_iso,
)
from app.limits.memory import MemoryLimiter
from app.limits.redis import RedisLimiter

__all__ = [
    "Admission",
    "Clock",
    "HitProbe",
    "Limiter",
    "MemoryLimiter",
    "QuotaState",
    "QuotaUnavailable",
    "RateState",
    "Record",
    "RedisLimiter",
    "Reservation",
    "Usage",
    "ceil_s",
    "utc_iso",
]
