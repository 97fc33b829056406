"""All mutable state of one simulator: call statistics, the fault queue, the keys with their
limits and credit balances."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from app.sim import detect
from app.sim.config import SimConfig, rng
from app.sim.faults import Fault, FaultPlan, Limits
from app.sim.replies import Refusal, Reply


@dataclass
class Stats:
    """What ``GET /_sim/stats`` reports."""

    calls: int = 0
    ok: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    per_image: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    disconnected: int = 0
    #: Balance queries (``GET /api/common/query-credits``); not part of ``calls``.
    credit_queries: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "credit_queries": self.credit_queries,
            "calls": self.calls,
            "ok": self.ok,
            "by_code": dict(self.by_code),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "per_image": dict(self.per_image),
            "throttled": self.throttled,
            "disconnected": self.disconnected,
        }


@dataclass
class Account:
    """One accepted key: its credits, its limiter and what it saw (``GET /_sim/keys``)."""

    balance: float
    total: float
    calls: int = 0
    ok: int = 0
    billed: int = 0
    throttled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    #: Most calls admitted within any one second (the per-key rate ailabapi would see).
    max_per_s: int = 0
    starts: deque[float] = field(default_factory=deque)
    tokens: float = 0.0
    refilled: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "balance": self.balance,
            "calls": self.calls,
            "ok": self.ok,
            "billed": self.billed,
            "throttled": self.throttled,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "max_per_s": self.max_per_s,
        }

    def zero(self, balance: float) -> None:
        """Counters back to zero (calls in progress stay counted), the balance to ``balance``."""
        self.balance = self.total = balance
        self.calls = self.ok = self.billed = self.throttled = self.max_per_s = 0
        self.max_in_flight = self.in_flight
        self.starts.clear()

    def started(self, now: float) -> None:
        self.starts.append(now)
        while self.starts and self.starts[0] <= now - 1.0:
            self.starts.popleft()
        self.max_per_s = max(self.max_per_s, len(self.starts))


@dataclass
class _Armed:
    fault: Fault
    left: int | None  # calls still to fault; None = until cleared


class Sim:
    """All mutable state of one simulator. Touched only from the event loop, so no locks."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.decode_slots = asyncio.Semaphore(config.decode_concurrency)
        #: Set when an embedded simulator stops: ends every hang and latency wait.
        self.wake = asyncio.Event()
        self.stats = Stats()
        #: None: faces are placed by the image's hash.
        self.detector = detect.load() if config.faces == "detect" else None
        self.accounts: dict[str, Account] = {}
        self.reset()

    def reset(self) -> None:
        # In-flight calls survive a reset; keep their count so it never goes negative.
        live = self.stats.in_flight
        self.stats = Stats(in_flight=live, max_in_flight=live)
        self.faults: deque[_Armed] = deque()
        self.latency_ms = self.config.latency_ms
        self.limits = Limits(
            qps=self.config.qps,
            qps_burst=self.config.qps_burst,
            max_concurrency=self.config.max_concurrency,
            retry_after_on_throttle=self.config.retry_after_on_throttle,
        )
        # The configured keys only, counters zeroed; calls in progress keep their account's
        # in-flight count right (they hold the account object).
        old, self.accounts = self.accounts, {}
        for key in self.config.api_keys:
            if key in old:
                account = self.accounts[key] = old[key]
                account.zero(self.config.credits)
            else:
                self.set_balance(key, self.config.credits)
        self._refill_bucket()
        self._fault_rng = rng(self.config.fault_seed)

    def set_balance(self, key: str, balance: float) -> Account:
        """Set a key's balance (a top-up); an unknown key becomes accepted."""
        account = self.accounts.get(key)
        if account is None:
            account = self.accounts[key] = Account(balance, balance, tokens=self._burst(), refilled=time.monotonic())
        account.balance = balance
        account.total = max(account.total, balance)
        return account

    def _refill_bucket(self) -> None:
        now = time.monotonic()
        for account in self.accounts.values():
            account.tokens = self._burst()
            account.refilled = now

    def _burst(self) -> float:
        return self.limits.qps_burst or max(1.0, self.limits.qps or 0.0)

    def set_limits(self, update: Limits) -> None:
        self.limits = self.limits.model_copy(update=update.model_dump(exclude_none=True))
        self._refill_bucket()

    def set_plan(self, plan: FaultPlan) -> None:
        self.faults = deque(_Armed(fault, fault.count) for fault in plan.faults)
        self._fault_rng = rng(self.config.fault_seed)
        if plan.latency_ms is not None:
            self.latency_ms = plan.latency_ms

    def plan_json(self) -> dict[str, Any]:
        faults = [
            {**armed.fault.model_dump(exclude_defaults=True), "mode": armed.fault.mode, "count": armed.left}
            for armed in self.faults
        ]
        return {"faults": faults, "latency_ms": self.latency_ms}

    def account(self, key: str | None) -> Account | None:
        """The account of an accepted key, or None."""
        if not key:
            return None
        given = key.encode()
        # Compare with every key, constant-time, so timing says nothing about which exist.
        found = None
        for name, account in list(self.accounts.items()):
            if hmac.compare_digest(given, name.encode()):
                found = account
        return found

    def key_ok(self, key: str | None) -> bool:
        return self.account(key) is not None

    def admit(self, account: Account) -> None:
        """The key's credits, then its limits: concurrency, then a token bucket (a refused call
        spends no token)."""
        if account.balance < 1:
            raise Refusal("ERROR_NOT_ENOUGH_CREDITS")
        qps, cap = self.limits.qps or 0.0, self.limits.max_concurrency or 0
        wait = 0.0
        now = time.monotonic()
        if cap and account.in_flight >= cap:
            wait = 1.0
        elif qps > 0:
            account.tokens = min(self._burst(), account.tokens + (now - account.refilled) * qps)
            account.refilled = now
            if account.tokens >= 1:
                account.tokens -= 1
            else:
                wait = (1 - account.tokens) / qps
        if wait:
            account.throttled += 1
            err = Refusal("EXCEEDING_LIMITS")
            if self.limits.retry_after_on_throttle:
                err.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise err
        account.in_flight += 1
        account.max_in_flight = max(account.max_in_flight, account.in_flight)
        account.started(now)
        account.balance -= 1  # reserved; given back unless the answer is billed (see endpoint.py)

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        armed = self.faults[0]
        if armed.fault.probability < 1 and self._fault_rng.random() >= armed.fault.probability:
            return None
        if armed.left is not None:
            armed.left -= 1
            if armed.left <= 0:
                self.faults.popleft()
        return armed.fault

    def record(self, reply: Reply, account: Account | None = None) -> None:
        self.stats.by_code[reply.label] += 1
        if reply.status == 200 and not reply.drop:
            self.stats.ok += 1
        if reply.status == 429:
            self.stats.throttled += 1
        if account is not None and reply.status == 200:
            # A 200 is a billed call (success, or an answer ailabapi reported as one); its credit
            # was taken when the call was admitted.
            account.ok += 1
            account.billed += 1
