"""What the pool decides and reports, and the protocol both backends implement.

A *call* asks the pool for a *grant*: one slot on one key, given fairly among the tenants
waiting (weighted by their share, batch after interactive but never starved), within the
key's and the pool's limits. It gives the slot back with the call's *outcome*, which is
how the pool learns about key health (throttled, out of credits, refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

from app.upstream.contract import KeyEffect

Priority = Literal["interactive", "batch"]
KeyState = Literal["ok", "low", "cooling", "exhausted", "disabled"]
KEY_STATES: Final[tuple[KeyState, ...]] = ("ok", "low", "cooling", "exhausted", "disabled")
#: Why a call was refused before it waited (see :class:`Refused`).
RefusalReason = Literal["tenant", "full", "late", "nokey", "timeout"]

US: Final = 1_000_000
#: Batch calls weigh this much of an interactive call of the same tenant (fair-queueing cost x4).
BATCH_WEIGHT: Final = 0.25
#: At most this many waiters are looked at per dispatch (the head of the fair order).
SCAN: Final = 256
#: Assumed duration of one upstream call until the pool has measured some (µs).
DEFAULT_CALL_US: Final = 500_000
#: Retry-After when every key is out with no known return (disabled keys).
NO_RETURN_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking for the upstream: the tenant, its weight and class, its own key."""

    tenant: str = "-"
    share: float = 1.0
    priority: Priority = "interactive"
    #: A dedicated pool key this tenant's calls are billed to (its own ailabapi account).
    key: str | None = None
    #: May use the shared keys while its own key is unusable.
    fallback: bool = False

    @property
    def cost(self) -> float:
        """Virtual time one call of this caller advances its flow (1 / weight)."""
        return 1.0 / (self.share * (BATCH_WEIGHT if self.priority == "batch" else 1.0))


@dataclass(frozen=True, slots=True)
class Grant:
    """A slot on key ``key``, held by ``ticket`` until released (leased while held)."""

    key: str
    ticket: str
    queued_s: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a granted call ended, as far as the key is concerned."""

    code: str = "ok"  # "ok", an ailabapi code, or a transport reason
    effect: KeyEffect | None = None
    cool_s: float | None = None  # Retry-After of a throttled key
    billed: bool = False
    seconds: float = 0.0
    reached: bool = True  # False: the call never reached ailabapi (nothing learned)


class Refused(Exception):
    """No slot for this call, said at once (or when its wait ran out).

    ``tenant``: this tenant's own calls fill its share of the queue (429); ``full``: the
    queue is full; ``late``: it could not start within its deadline; ``timeout``: it waited
    and did not get a slot; ``nokey``: every key it may use is unusable (all 503).
    """

    def __init__(self, reason: RefusalReason, retry_after: float) -> None:
        super().__init__(reason)
        self.reason: RefusalReason = reason
        self.retry_after = max(0.0, retry_after)


@dataclass(frozen=True, slots=True)
class KeyView:
    """One key as the operator sees it (never the secret)."""

    name: str
    tier: str
    state: KeyState
    in_flight: int
    max_concurrency: int
    qps: float
    cooldown_until: float | None  # unix seconds
    balance: float | None
    balance_at: float | None  # unix seconds
    billed_since_balance: int
    low_credits: float
    reason: str | None  # the last ailabapi code that changed its state


@dataclass(frozen=True, slots=True)
class PoolView:
    keys: tuple[KeyView, ...]
    waiting: int
    waiting_by_tenant: dict[str, int] = field(default_factory=dict)
    gated: bool = True
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        """As ``GET /admin/upstream-keys`` and ``facegate upstream status --json`` show it."""
        return {
            "keys": [
                {
                    "name": k.name,
                    "tier": k.tier,
                    "state": k.state,
                    "in_flight": k.in_flight,
                    "max_concurrency": k.max_concurrency,
                    "qps": k.qps,
                    "cooldown_until": utc(k.cooldown_until),
                    "balance": k.balance,
                    "balance_at": utc(k.balance_at),
                    "billed_since_balance": k.billed_since_balance,
                    "low_credits": k.low_credits,
                    "reason": k.reason,
                }
                for k in self.keys
            ],
            "source": self.source,
            "gated": self.gated,
            "waiting": self.waiting,
            "waiting_by_tenant": dict(sorted(self.waiting_by_tenant.items())),
        }


class Dispatcher(Protocol):
    """The pool: grants, outcomes, balances, the operator view."""

    async def acquire(self, caller: Caller, wait_s: float) -> Grant:
        """A slot for ``caller`` within ``wait_s`` seconds, or :class:`Refused`."""

    async def release(self, grant: Grant, outcome: Outcome) -> None: ...

    async def record_balance(self, key: str, balance: float | None) -> None:
        """The balance just read for ``key`` (None: it could not be read)."""

    async def claim_poll(self, key: str, every_s: float) -> bool:
        """True when this replica should read ``key``'s balance now (one replica per period)."""

    async def keys_reloaded(self) -> None:
        """The keys file changed: disabled keys get another chance."""

    async def snapshot(self) -> PoolView: ...

    async def close(self) -> None: ...


def state_label(*, raw: str, cool_until: int, now: int, balance: float | None, low: float) -> KeyState:
    """The state shown for a key: disabled > exhausted > cooling > low > ok."""
    if raw in ("disabled", "exhausted"):
        return raw  # type: ignore[return-value]
    if cool_until > now:
        return "cooling"
    if balance is not None and balance < low:
        return "low"
    return "ok"


def utc(ts: float | None) -> str | None:
    """A unix time as RFC 3339 UTC (milliseconds), for the operator view."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
