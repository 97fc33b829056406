"""Around the single attempt: global limiter, circuit breaker, retries, one deadline.

The order matters. The breaker is asked first, so that while ailabapi is down callers
get a 503 in microseconds instead of queueing. Each attempt then takes a slot from the
global guard, which keeps the one shared key under its QPS and concurrency limits
across all replicas (an upstream 429 storm would hurt every tenant). Retries happen
only for what can succeed on a second try, with jittered exponential backoff, and never
past the request's overall deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.errors import Problem
from app.upstream.ailabapi import ImagePayload, Upstream, UpstreamAnswer, UpstreamFailure
from app.upstream.guard import Guard, GuardTimeout

log = logging.getLogger("facegate.upstream")


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; one probe at a time once ``reset_s`` passed."""

    def __init__(
        self,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state: BreakerState = "closed"
        self._on_change = on_change

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            log.warning("upstream circuit breaker %s -> %s", self.state, state)
            self.state = state
            if self._on_change:
                self._on_change(state)

    def allow(self) -> float | None:
        """None if a call may go ahead, else the seconds until the breaker will try again."""
        if self.state == "closed":
            return None
        wait = self._opened_at + self._reset_s - self._clock()
        if wait > 0:
            return wait
        if self._probing:
            return 1.0
        self._set("half_open")
        self._probing = True
        return None

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set("open")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int
    base_s: float = 0.2
    cap_s: float = 5.0

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the upstream's Retry-After."""
        delay: float = random.uniform(0.5, 1.0) * min(self.cap_s, self.base_s * 2.0**attempt)  # noqa: S311 - jitter
        return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class CallReport:
    """What happened during one logical call, for metrics and logs."""

    attempts: int = 0
    upstream_s: float = 0.0


class ResilientUpstream:
    """Breaker → guard → attempt, retried within one overall deadline."""

    def __init__(
        self,
        inner: Upstream,
        *,
        guard: Guard,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        timeout_s: float,
        queue_timeout_s: float,
        on_attempt: Callable[[str, float], None] | None = None,
    ) -> None:
        self._inner = inner
        self.guard = guard
        self.breaker = breaker
        self._policy = policy
        self._timeout_s = timeout_s
        self._queue_timeout_s = queue_timeout_s
        self._on_attempt = on_attempt

    async def call(self, image: ImagePayload, report: CallReport | None = None) -> UpstreamAnswer:
        report = report or CallReport()
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        while True:
            wait = self.breaker.allow()
            if wait is not None:
                raise UpstreamFailure(
                    Problem(
                        "upstream_unavailable",
                        "ailabapi is failing; facegate is not calling it for now",
                        retry_after=wait,
                    ),
                    retryable=False,
                    reason="breaker_open",
                )
            remaining = deadline - time.monotonic()
            elapsed = 0.0
            try:
                async with self.guard.slot(min(self._queue_timeout_s, remaining)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise UpstreamFailure(
                            Problem("upstream_timeout", "no time left to call ailabapi"),
                            retryable=False,
                            reason="deadline",
                        )
                    report.attempts += 1
                    started = time.monotonic()
                    try:
                        answer = await self._inner.analyze(image, timeout_s=remaining)
                    finally:
                        elapsed = time.monotonic() - started
                        report.upstream_s += elapsed
            except GuardTimeout as exc:
                # Our own queue, not an upstream failure: the breaker is not told.
                raise UpstreamFailure(
                    Problem(
                        "upstream_unavailable",
                        "too many calls to ailabapi in flight; try again shortly",
                        retry_after=exc.retry_after,
                    ),
                    retryable=False,
                    reason="guard_timeout",
                ) from None
            except UpstreamFailure as failure:
                self.breaker.failure()
                self._notify(failure.reason, elapsed)
                delay = self._policy.backoff(attempt, failure.retry_after)
                if not failure.retryable or attempt >= self._policy.retries or time.monotonic() + delay >= deadline:
                    raise
                attempt += 1
                log.info("upstream attempt failed (%s), retrying in %.2f s", failure.reason, delay)
                await asyncio.sleep(delay)
                continue
            self.breaker.success()
            self._notify("ok" if answer.verdict is None else answer.verdict.code, elapsed)
            return answer

    def _notify(self, outcome: str, elapsed: float) -> None:
        if self._on_attempt is not None:
            self._on_attempt(outcome, elapsed)
