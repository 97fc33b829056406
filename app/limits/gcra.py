"""The arithmetic both limiter backends share: GCRA steps and UTC quota windows.

``app/limits/lua/admit.lua`` and ``_time.lua`` do exactly this, operation for operation —
integer microseconds, the same rounding, the same window bookkeeping — so the in-memory
and the Redis backend give the same answers (one test suite runs against both).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from app.tenants import Limits

WindowName = Literal["daily", "monthly"]

US: Final = 1_000_000
_DAY_US: Final = 86_400 * US
_EPOCH: Final = date(1970, 1, 1)
#: Absorbs float noise in ``floor(x / interval)`` (the same constant is in admit.lua).
_EPS: Final = 1e-9


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
