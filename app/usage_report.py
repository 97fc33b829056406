"""A tenant's usage as JSON (``GET /v1/usage``) and ``facegate usage``, the operator's view, read from Redis;
and the usage history per tenant and UTC day for chargeback (``GET /v1/usage/history``,
``facegate usage --from … --to … [--csv]``).

Both print :func:`usage_dict` / :func:`history_report`, so what an operator sees is what the tenant
sees. :class:`UsageReport` and :class:`UsageHistory` are their published shapes (the OpenAPI response
models); ``tests/unit/test_usage_report.py`` proves each pair agrees key for key.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from app import redisconn
from app.limits import Admission, Limiter, QuotaUnavailable, RedisLimiter, Usage, ceil_s, utc_iso
from app.limits.base import DayCounts
from app.settings import Settings
from app.tenants import TenantRegistry, TenantsFileError


class UsagePolicy(BaseModel):
    """One limit as the `RateLimit-Policy` header names it. Unlimited quotas are not listed."""

    name: str = Field(description="`burst` (the rate limit), `daily` or `monthly` (quotas of billable calls).")
    quota: int = Field(ge=0, description="Requests (burst) or billable calls (quotas) allowed in the window.")
    window_s: int = Field(ge=1, description="The window, seconds (a month's length for `monthly`).")


class UsageRateLimit(BaseModel):
    """The rate limit on every request (cache hits too): GCRA, `rate_per_s` sustained, `burst` at once."""

    rate_per_s: float = Field(gt=0, description="Sustained requests per second.")
    burst: int = Field(ge=1, description="Requests allowed at once.")
    remaining: int = Field(ge=0, description="Requests that could be made right now.")
    reset_s: float = Field(ge=0, description="Seconds until the full burst is available again.")


class UsageQuota(BaseModel):
    """One quota of billable (upstream) calls. Cache hits never count."""

    limit: int | None = Field(description="Calls allowed in the window; null = unlimited.")
    used: int = Field(ge=0, description="Calls reserved or committed in the window (refunded calls are not).")
    remaining: int | None = Field(description="Calls left in the window; null = unlimited.")
    reset_s: int = Field(ge=0, description="Seconds until the window resets (UTC day or calendar month).")
    reset_at: datetime = Field(description="When the window resets, UTC (RFC 3339, whole seconds).")


class UsageQuotas(BaseModel):
    """The daily and monthly quotas."""

    daily: UsageQuota = Field(description="This UTC day.")
    monthly: UsageQuota = Field(description="This UTC calendar month.")


class UsageCredits(BaseModel):
    """Calls ailabapi billed (committed), which is what the tenant cost."""

    day: int = Field(ge=0, description="This UTC day.")
    month: int = Field(ge=0, description="This UTC calendar month.")


class UsageCacheCounts(BaseModel):
    """Admitted requests, by whether the cache answered them (refused requests are neither)."""

    hits: int = Field(ge=0, description="Answered from the cache: free.")
    misses: int = Field(ge=0, description="Made or joined an upstream call.")


class UsageCache(BaseModel):
    """Cache hits and misses."""

    day: UsageCacheCounts = Field(description="This UTC day.")
    month: UsageCacheCounts = Field(description="This UTC calendar month.")


class UsageReport(BaseModel):
    """The calling tenant's limits and usage (`GET /v1/usage`; `facegate usage --json` prints the same)."""

    tenant: str = Field(description="The tenant's name.")
    policies: list[UsagePolicy] = Field(description="The limits, as in the `RateLimit-Policy` header.")
    rate_limit: UsageRateLimit = Field(description="The rate limit's state.")
    quotas: UsageQuotas = Field(description="The quotas' state.")
    credits_spent: UsageCredits = Field(description="Billable calls ailabapi charged for.")
    cache: UsageCache = Field(description="Cache hits and misses.")


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


# --- usage history (chargeback) ---------------------------------------------------------------

#: Longest range one history read covers (the history itself is kept longer than this).
MAX_HISTORY_DAYS: Final = 400
#: The columns of a history day, in CSV order (``refused`` is one column per problem code after these).
DAY_COLUMNS: Final = ("billable_calls", "credits", "upstream_calls", "hits", "misses", "collapsed", "forced")


def today_utc() -> date:
    return datetime.now(UTC).date()


def days_between(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def day_row(day: date, counts: DayCounts) -> dict[str, Any]:
    """One tenant's UTC day. ``billable_calls`` are calls ailabapi billed (one credit each, as it
    charges today: ``credits``); ``upstream_calls`` every attempt made (retries included);
    ``misses`` include ``collapsed`` (answered by an identical call in flight, never billed to this
    request) and ``forced`` (X-Facegate-Force); ``refused`` counts answers with a problem, by code."""
    credits = counts.get("credits", 0)
    return {
        "date": day.isoformat(),
        "billable_calls": credits,
        "credits": credits,
        "upstream_calls": counts.get("upstream_calls", 0),
        "hits": counts.get("hits", 0),
        "misses": counts.get("misses", 0),
        "collapsed": counts.get("collapsed", 0),
        "forced": counts.get("forced", 0),
        "refused": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("refused:")},
    }


def _total(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {column: sum(r[column] for r in rows) for column in DAY_COLUMNS}
    refused: dict[str, int] = {}
    for r in rows:
        for code, n in r["refused"].items():
            refused[code] = refused.get(code, 0) + n
    total["refused"] = dict(sorted(refused.items()))
    return total


class HistoryCounts(BaseModel):
    """Counts over some UTC days."""

    billable_calls: int = Field(
        ge=0, description="Calls ailabapi billed for this tenant (`credits_spent` in /v1/usage)."
    )
    credits: int = Field(ge=0, description="Credits those cost (one per billed call).")
    upstream_calls: int = Field(ge=0, description="Attempts made at ailabapi for this tenant, retries included.")
    hits: int = Field(ge=0, description="Answers from the cache.")
    misses: int = Field(
        ge=0, description="Admitted requests not answered from the cache (collapsed and forced included)."
    )
    collapsed: int = Field(ge=0, description="Misses answered by an identical call already in flight (not billed).")
    forced: int = Field(ge=0, description="Misses forced with X-Facegate-Force.")
    refused: dict[str, int] = Field(description="Answers with a problem, by problem code.")


class HistoryDay(HistoryCounts):
    """One UTC day with any activity."""

    date: str = Field(
        description="The UTC day, YYYY-MM-DD (a call counts on the day it was admitted).",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
    )


class TenantHistory(BaseModel):
    """One tenant's days and their totals."""

    tenant: str = Field(description="The tenant's name.")
    days: list[HistoryDay] = Field(description="Days with any activity, oldest first.")
    totals: HistoryCounts = Field(description="The sums over those days.")


class UsageHistory(BaseModel):
    """Usage per tenant and UTC day over a range of days (`GET /v1/usage/history`)."""

    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from", description="First UTC day, YYYY-MM-DD.", pattern=r"^\d{4}-\d{2}-\d{2}$")
    to: str = Field(description="Last UTC day, YYYY-MM-DD.", pattern=r"^\d{4}-\d{2}-\d{2}$")
    tenants: list[TenantHistory] = Field(description="One entry per tenant read.")


async def history_report(limiter: Limiter, tenants: Sequence[str], first: date, last: date) -> dict[str, Any]:
    """Each tenant's days with any activity from ``first`` to ``last`` (UTC, inclusive), and totals."""
    days = days_between(first, last)
    keys = [d.strftime("%Y%m%d") for d in days]
    out = []
    for name in tenants:
        found = await limiter.history(name, keys)
        rows = [day_row(d, found[k]) for d, k in zip(days, keys, strict=True) if k in found]
        out.append({"tenant": name, "days": rows, "totals": _total(rows)})
    return {"from": first.isoformat(), "to": last.isoformat(), "tenants": out}


def history_csv(report: dict[str, Any]) -> str:
    """One row per tenant and day with activity: what finance imports."""
    codes = sorted({code for t in report["tenants"] for d in t["days"] for code in d["refused"]})
    rows = [["tenant", "date", *DAY_COLUMNS, *(f"refused_{c}" for c in codes)]]
    for t in report["tenants"]:
        for d in t["days"]:
            rows.append(
                [
                    t["tenant"],
                    d["date"],
                    *(str(d[c]) for c in DAY_COLUMNS),
                    *(str(d["refused"].get(c, 0)) for c in codes),
                ]
            )
    out = _Lines()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return "".join(out.lines)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)


async def print_history(
    settings: Settings, tenant: str | None, first: date, last: date, *, as_csv: bool, as_json: bool
) -> None:
    """``facegate usage --from … --to …``: the history, read from Redis (tenants of the file, or one by name)."""
    if not settings.redis_url:
        print(
            "facegate: without FACEGATE_REDIS_URL the history lives in the serving process "
            "(GET /v1/usage/history with an operator key)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if tenant is None:
        try:
            names = sorted(TenantRegistry.load(settings.tenants_file).tenants)
        except TenantsFileError as exc:
            print(f"facegate: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        names = [tenant]  # also a tenant no longer in the file: its history is kept
    client = redisconn.connect(settings)
    limiter = RedisLimiter(client, redisconn.RedisHealth(timeout_s=5.0), settings.redis_prefix)
    try:
        report = await history_report(limiter, names, first, last)
    except QuotaUnavailable:
        print("facegate: Redis is unreachable", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await client.aclose()
    if as_csv:
        sys.stdout.write(history_csv(report))
    elif as_json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{'tenant':<20} {'billable':>9} {'upstream':>9} {'hits':>8} {'misses':>8} {'collapsed':>9} {'forced':>7}"
        )
        for t in report["tenants"]:
            tot = t["totals"]
            print(
                f"{t['tenant']:<20} {tot['billable_calls']:>9} {tot['upstream_calls']:>9} {tot['hits']:>8} "
                f"{tot['misses']:>8} {tot['collapsed']:>9} {tot['forced']:>7}"
            )
