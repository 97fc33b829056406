"""``usage_dict`` (what GET /v1/usage and ``facegate usage --json`` print) and ``UsageReport``,
``history_report`` (GET /v1/usage/history) and ``UsageHistory`` — each body and its published
OpenAPI model agree key for key, at every level, read from a real limiter after real traffic."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from app.limits import MemoryLimiter
from app.tenants import Limits, Tenant
from app.usage_report import UsageHistory, UsageReport, history_report, today_utc, usage_dict

LIMITED = Tenant("limited", Limits(rate_per_s=2.5, burst=4, daily_quota=10, monthly_quota=100))
UNLIMITED = Tenant("unlimited", Limits(rate_per_s=100.0, burst=200, daily_quota=None, monthly_quota=None))


def _same_keys(model: type[BaseModel], data: dict[str, Any], where: str = "$") -> list[str]:
    """Paths where the dict's keys and the model's fields differ (recursing into nested models)."""
    fields = model.model_fields
    names = {info.alias or name for name, info in fields.items()}
    out = [f"{where}: {sorted(set(data) ^ names)}"] if set(data) != names else []
    for field, info in fields.items():
        name = info.alias or field
        annotation, value = info.annotation, data.get(name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            out += _same_keys(annotation, value, f"{where}.{name}")
        args = getattr(annotation, "__args__", ())
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) and isinstance(value, list):
            out += [p for i, item in enumerate(value) for p in _same_keys(args[0], item, f"{where}.{name}[{i}]")]
    return out


@pytest.mark.parametrize("tenant", [LIMITED, UNLIMITED], ids=lambda t: t.name)
async def test_usage_dict_is_exactly_the_published_model(tenant: Tenant) -> None:
    limiter = MemoryLimiter(clock=lambda: 1_795_000_000.25)
    billed = await limiter.admit(tenant, reserve=True, record="misses")
    assert billed.reservation is not None
    await limiter.settle(billed.reservation, spent=True)
    await limiter.admit(tenant, reserve=False, record="hits")
    body = usage_dict(await limiter.usage(tenant))

    assert _same_keys(UsageReport, body) == []
    report = UsageReport.model_validate(body)
    assert report.model_dump(mode="json") == body
    assert report.credits_spent.day == 1
    assert report.cache.day.hits == 1
    assert report.cache.day.misses == 1
    names = [p.name for p in report.policies]
    assert names == (["burst", "daily", "monthly"] if tenant is LIMITED else ["burst"])
    assert (report.quotas.daily.limit is None) is (tenant is UNLIMITED)


async def test_the_comparison_notices_a_missing_or_extra_key() -> None:
    body = usage_dict(await MemoryLimiter(clock=lambda: 1_795_000_000.0).usage(LIMITED))
    del body["quotas"]["daily"]["reset_at"]
    body["cache"]["day"]["stale"] = 0
    assert _same_keys(UsageReport, body) == [
        "$.quotas.daily: ['reset_at']",
        "$.cache.day: ['stale']",
    ]


async def test_history_report_is_exactly_the_published_model() -> None:
    limiter = MemoryLimiter()
    billed = await limiter.admit(LIMITED, reserve=True, record="misses")
    assert billed.reservation is not None
    await limiter.settle(billed.reservation, spent=True)
    await limiter.admit(LIMITED, reserve=False, record="hits")
    today = today_utc()
    body = await history_report(limiter, ["limited", "unused"], today, today)

    assert _same_keys(UsageHistory, body) == []
    history = UsageHistory.model_validate(body)
    assert history.model_dump(mode="json", by_alias=True) == body
    [limited, unused] = history.tenants
    assert limited.totals.credits == 1
    assert [day.date for day in limited.days] == [today.isoformat()]
    assert unused.days == []
