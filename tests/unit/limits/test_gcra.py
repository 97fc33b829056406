"""The GCRA step and the UTC windows, as pure functions (admit.lua does the same arithmetic).

Time is a number passed in: nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.limits.base import RateState
from app.limits.gcra import US, available, gcra, interval_us, windows_us
from app.tenants import Limits

T0 = 1_700_000_000 * US  # an arbitrary instant, in µs


def limits(rate: float, burst: int) -> Limits:
    return Limits(rate_per_s=rate, burst=burst, daily_quota=None, monthly_quota=None)


def run(times_us: list[int], lim: Limits) -> list[bool]:
    """Feed requests at ``times_us``; the decisions in order."""
    tat, out = 0, []
    iv = interval_us(lim)
    for now in times_us:
        step = gcra(tat, now, iv, lim.burst)
        tat = step.tat
        out.append(step.allowed)
    return out


def test_burst_at_once_then_one_per_interval() -> None:
    lim = limits(10, 5)  # 100 ms apart, 5 at once
    decisions = run([T0] * 8, lim)
    assert decisions == [True] * 5 + [False] * 3
    # Then exactly one per 100 ms, steady, for a minute: never refused, never more.
    tat = 0
    iv = interval_us(lim)
    for _i in range(5):
        tat = gcra(tat, T0, iv, 5).tat
    for k in range(1, 601):
        now = T0 + k * 100_000
        step = gcra(tat, now, iv, 5)
        assert step.allowed, k
        assert step.remaining == 0
        tat = step.tat
        assert not gcra(tat, now, iv, 5).allowed, "a second request in the same interval"


def test_remaining_counts_down_and_refusal_says_when() -> None:
    lim = limits(10, 4)
    iv = interval_us(lim)
    tat, seen = 0, []
    for _ in range(4):
        step = gcra(tat, T0, iv, 4)
        tat = step.tat
        seen.append(step.remaining)
    assert seen == [3, 2, 1, 0]
    refused = gcra(tat, T0, iv, 4)
    assert not refused.allowed
    assert refused.tat == tat, "a refused request must not move the TAT"
    assert refused.retry_us == 100_000
    assert not gcra(tat, T0 + refused.retry_us - 1, iv, 4).allowed
    assert gcra(tat, T0 + refused.retry_us, iv, 4).allowed


def test_idle_bucket_refills_to_burst_and_no_further() -> None:
    lim = limits(2, 3)
    iv = interval_us(lim)
    tat = 0
    for _ in range(3):
        tat = gcra(tat, T0, iv, 3).tat
    assert available(tat, T0, iv, 3) == (0, 1_500_000)
    assert available(tat, T0 + 500_000, iv, 3)[0] == 1
    assert available(tat, T0 + 3600 * US, iv, 3) == (3, 0), "idle for an hour: still only the burst"


def test_fractional_interval_keeps_the_long_run_rate() -> None:
    lim = limits(3, 2)  # 333333.333 µs: not a whole number of µs
    iv = interval_us(lim)
    tat, allowed = 0, 0
    for k in range(0, 60 * 1000):  # a request every ms for 60 s
        step = gcra(tat, T0 + k * 1000, iv, 2)
        if step.allowed:
            tat = step.tat
            allowed += 1
    assert allowed in (2 + 180 - 1, 2 + 180), allowed


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1, 3, 7.5, 10, 100, 1000]),
    burst=st.integers(1, 50),
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=120),
)
def test_never_more_than_burst_plus_rate_in_any_window(rate: float, burst: int, gaps: list[int]) -> None:
    lim = limits(rate, burst)
    times, now = [], T0
    for gap in gaps:
        now += gap
        times.append(now)
    decisions = run(times, lim)
    admitted = [t for t, ok in zip(times, decisions, strict=True) if ok]
    # GCRA's guarantee: in any span [a, b], at most burst + (b - a) * rate requests pass.
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span_s = (admitted[j] - start) / US
            assert j - i + 1 <= burst + math.floor(span_s * rate + 1e-6), (i, j)
    # And it is not stingy: a request after a full refill time always passes.
    assert decisions[0]


def test_rate_state_effective_window() -> None:
    lim = limits(10, 20)
    # Full bucket, one spent: 19 left; after spending them the next is 100 ms away.
    iv = interval_us(lim)
    step = gcra(0, T0, iv, 20)
    state = RateState.of(lim, step.remaining, step.tat_in_us)
    assert (state.limit, state.remaining) == (20, 19)
    assert state.next_s == pytest.approx(0.1)
    assert state.reset_s == pytest.approx(0.1)
    assert state.window_s == pytest.approx(2.0)
    refused = RateState.of(lim, 0, 2 * US, retry_us=100_000)
    assert refused.next_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("moment", "day", "day_end", "month", "month_end", "month_days"),
    [
        ("2024-02-28T23:59:59.999999", "20240228", "2024-02-29", "202402", "2024-03-01", 29),
        ("2024-02-29T00:00:00", "20240229", "2024-03-01", "202402", "2024-03-01", 29),
        ("2023-02-15T12:00:00", "20230215", "2023-02-16", "202302", "2023-03-01", 28),
        ("2100-02-10T00:00:00", "21000210", "2100-02-11", "210002", "2100-03-01", 28),  # not a leap year
        ("2000-02-10T00:00:00", "20000210", "2000-02-11", "200002", "2000-03-01", 29),  # a leap year
        ("2025-12-31T23:59:59", "20251231", "2026-01-01", "202512", "2026-01-01", 31),
        ("2026-01-01T00:00:00", "20260101", "2026-01-02", "202601", "2026-02-01", 31),
        ("2026-04-30T10:00:00", "20260430", "2026-05-01", "202604", "2026-05-01", 30),
    ],
)
def test_utc_windows(moment: str, day: str, day_end: str, month: str, month_end: str, month_days: int) -> None:
    t = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    now = round(t.timestamp() * US)
    d, m = windows_us(now)
    assert (d.name, d.period, d.length_s) == ("daily", day, 86400)
    assert d.reset_us == round(datetime.fromisoformat(day_end).replace(tzinfo=UTC).timestamp() * US)
    assert (m.name, m.period, m.length_s) == ("monthly", month, month_days * 86400)
    assert m.reset_us == round(datetime.fromisoformat(month_end).replace(tzinfo=UTC).timestamp() * US)
