"""All mutable state of one simulator: call statistics, the fault queue and the per-key limits."""

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

    def as_json(self) -> dict[str, Any]:
        return {
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
        self.admitted = 0
        self.stats = Stats()
        #: None: faces are placed by the image's hash.
        self.detector = detect.load() if config.faces == "detect" else None
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
        self._refill_bucket()
        self._fault_rng = rng(self.config.fault_seed)

    def _refill_bucket(self) -> None:
        self._tokens = self._burst()
        self._refilled = time.monotonic()

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

    def key_ok(self, key: str | None) -> bool:
        if not key:
            return False
        given = key.encode()
        # Compare with every key, constant-time, so timing says nothing about which exist.
        return any([hmac.compare_digest(given, k.encode()) for k in self.config.api_keys])

    def admit(self) -> None:
        """Per-key limits: concurrency, then a token bucket (a refused call spends no token)."""
        qps, cap = self.limits.qps or 0.0, self.limits.max_concurrency or 0
        wait = 0.0
        if cap and self.admitted >= cap:
            wait = 1.0
        elif qps > 0:
            now = time.monotonic()
            self._tokens = min(self._burst(), self._tokens + (now - self._refilled) * qps)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
            else:
                wait = (1 - self._tokens) / qps
        if wait:
            err = Refusal("EXCEEDING_LIMITS")
            if self.limits.retry_after_on_throttle:
                err.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise err
        self.admitted += 1

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

    def record(self, reply: Reply) -> None:
        self.stats.by_code[reply.label] += 1
        if reply.status == 200 and not reply.drop:
            self.stats.ok += 1
        if reply.status == 429:
            self.stats.throttled += 1
