"""A tenant's usage as JSON (``GET /v1/usage``) and ``facegate usage``, the operator's view, read from Redis.

Both print :func:`usage_dict`, so what an operator sees is what the tenant sees.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from app import redisconn
from app.limits import Admission, QuotaUnavailable, RedisLimiter, Usage, ceil_s, utc_iso
from app.settings import Settings
from app.tenants import TenantRegistry, TenantsFileError


def usage_dict(u: Usage) -> dict[str, Any]:
    """Policies (as in ``RateLimit-Policy``), used/remaining per window, resets, credits, hits/misses.

    ``used`` counts billable calls reserved or committed in the window (a refunded call is
    not counted); ``credits_spent`` only the committed ones, i.e. what ailabapi billed.
    ``cache.misses`` counts admitted requests that were not answered from the cache (they
    made or joined an upstream call); refused requests are neither hits nor misses.
    """
    admission = Admission(True, u.rate, u.quotas)
    return {
        "tenant": u.tenant,
        "policies": _policies(admission),
        "rate_limit": {
            "rate_per_s": u.limits.rate_per_s,
            "burst": u.limits.burst,
            "remaining": u.rate.remaining,
            "reset_s": round(u.rate.reset_s, 3),
        },
        "quotas": {
            q.name: {
                "limit": q.limit,
                "used": q.used,
                "remaining": q.remaining,
                "reset_s": ceil_s(q.reset_s),
                "reset_at": utc_iso(u.now_s + q.reset_s),
            }
            for q in u.quotas
        },
        "credits_spent": {"day": u.credits_day, "month": u.credits_month},
        "cache": {
            "day": {"hits": u.hits_day, "misses": u.misses_day},
            "month": {"hits": u.hits_month, "misses": u.misses_month},
        },
    }


def _policies(admission: Admission) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if admission.rate is not None:
        rate = admission.rate
        out.append({"name": "burst", "quota": rate.limit, "window_s": rate.policy_w})
    out.extend(
        {"name": q.name, "quota": q.limit, "window_s": q.window_s} for q in admission.quotas if q.limit is not None
    )
    return out


def _fmt(limit: int | None, used: int) -> str:
    return f"{used}/{'∞' if limit is None else limit}"


async def print_usage(settings: Settings, tenant: str | None, *, as_json: bool) -> None:
    if not settings.redis_url:
        print(
            "facegate: usage is kept in the serving process's memory when FACEGATE_REDIS_URL is not set; "
            "ask the running server (GET /v1/usage with the tenant's key) or configure Redis.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        registry = TenantRegistry.load(settings.tenants_file)
    except TenantsFileError as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    names = [tenant] if tenant else sorted(registry.tenants)
    unknown = [n for n in names if n not in registry.tenants]
    if unknown:
        print(f"facegate: unknown tenant {unknown[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    client = redisconn.connect(settings)
    limiter = RedisLimiter(client, redisconn.RedisHealth(timeout_s=5.0), settings.redis_prefix)
    try:
        reports = [await limiter.usage(registry.tenants[n]) for n in names]
    except QuotaUnavailable:
        print("facegate: Redis is unreachable", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await client.aclose()
    if as_json:
        print(json.dumps([usage_dict(u) for u in reports], indent=2))
        return
    print(f"{'tenant':<20} {'today':>14} {'this month':>14} {'credits d/m':>14} {'hits/misses today':>18}")
    for u in reports:
        day, month = u.quotas
        print(
            f"{u.tenant:<20} {_fmt(day.limit, day.used):>14} {_fmt(month.limit, month.used):>14} "
            f"{f'{u.credits_day}/{u.credits_month}':>14} {f'{u.hits_day}/{u.misses_day}':>18}"
        )
