"""Around the single attempt: the key pool, circuit breaker, retries, one deadline.

The order matters. The breaker is asked first, so that while ailabapi is down callers
get a 503 in microseconds instead of queueing. Each attempt then gets a slot on one key
from the pool (``pool/``: fair across tenants, within every key's QPS and concurrency
limits across all replicas — an upstream 429 storm would hurt every tenant). A failure
that is about the key — throttled, out of credits, refused — marks the key and moves the
call to another key at once (not a retry: no backoff, no breaker count), in a pool from
a keys file; a verdict about the image never moves (it would be paid once per key). Retries happen
only for what can succeed on a second try (connection errors, 429, 502/503/504; the
attempt decides, see ``ailabapi.py``), with jittered exponential backoff that never
undercuts the upstream's ``Retry-After``, and never past the request's one overall
deadline (``FACEGATE_UPSTREAM_TIMEOUT_S`` is the total for all attempts and the waits
between them). An answer about the image (a verdict) is an answer, never retried.
Retries happen inside one reserved quota unit: the caller is charged once however
many attempts it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from app import tracing
from app.errors import Problem
from app.upstream import contract
from app.upstream.ailabapi import ImagePayload, Upstream, UpstreamAnswer, UpstreamFailure
from app.upstream.contract import KeyEffect
from app.upstream.pool.base import Caller, Grant, Outcome, Refused

log = logging.getLogger("facegate.upstream")


BreakerState = Literal["closed", "open", "half_open"]

#: Failure-rate rule: at least this share of failures ...
RATE_THRESHOLD: Final = 0.5
#: ... among the last this many attempts ...
RATE_WINDOW_CALLS: Final = 20
#: ... all of which ended within this many seconds (older outcomes say little about now).
RATE_WINDOW_S: Final = 60.0
#: Seconds a caller is told to wait while the one half-open probe is out.
PROBE_BUSY_RETRY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one attempt; ``probe`` marks the half-open breaker's single trial call."""

    probe: bool
    issued_at: float


class CircuitBreaker:
    """Fails fast while ailabapi is failing; lets one probe through to find out when it is back.

    It opens on either of two rules, whichever trips first:

    * ``failures`` consecutive failed attempts (a dead upstream trips it within a few calls);
    * a failure rate of at least ``rate_threshold`` (default 50 %,
      ``FACEGATE_BREAKER_FAILURE_RATE``; 0 turns the rule off) over the last
      ``rate_window_calls`` (default 20, ``FACEGATE_BREAKER_WINDOW``) attempts, all within
      ``RATE_WINDOW_S`` (60 s) — a flaky upstream that fails every other call never
      builds a streak, but should still be given a rest.

    While open it answers "not now" for ``reset_s``; then it goes half-open and lets
    exactly one probe through. The probe's success closes it (and forgets the past),
    its failure re-opens it for another ``reset_s``. A probe that ends without an
    upstream outcome (our own queue was full, the request was cancelled) gives its turn
    back at once, and a probe permit older than ``probe_timeout_s`` is presumed lost, so
    the breaker can never wedge half-open. Outcomes of attempts that started before the
    breaker opened are ignored: they describe the past.
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
        *,
        probe_timeout_s: float = 60.0,
        rate_threshold: float = RATE_THRESHOLD,
        rate_window_calls: int = RATE_WINDOW_CALLS,
        rate_window_s: float = RATE_WINDOW_S,
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._probe_timeout_s = probe_timeout_s
        self._rate_threshold = rate_threshold
        self._rate_window_s = rate_window_s
        self._streak = 0
        self._recent: deque[tuple[float, bool]] = deque(maxlen=rate_window_calls)
        self._opened_at = 0.0
        self._probe: Permit | None = None
        self.state: BreakerState = "closed"
        self._on_change = on_change

    def _set(self, state: BreakerState, why: str) -> None:
        if state != self.state:
            log.warning(
                "upstream circuit breaker %s -> %s (%s)",
                self.state,
                state,
                why,
                extra={"breaker_from": self.state, "breaker_to": state},
            )
            self.state = state
            if self._on_change:
                self._on_change(state)

    def allow(self) -> Permit | float:
        """A permit to attempt a call, or the seconds until the breaker will try again."""
        now = self._clock()
        if self.state == "closed":
            return Permit(probe=False, issued_at=now)
        if self.state == "open":
            wait = self._opened_at + self._reset_s - now
            if wait > 0:
                return wait
            self._set("half_open", f"{self._reset_s:g} s passed, probing")
        if self._probe is not None and now - self._probe.issued_at < self._probe_timeout_s:
            return PROBE_BUSY_RETRY_S
        self._probe = Permit(probe=True, issued_at=now)
        return self._probe

    def success(self, permit: Permit) -> None:
        if permit.probe:
            if permit is self._probe:
                self._probe = None
                self._streak = 0
                self._recent.clear()
                self._set("closed", "the probe succeeded")
            return
        if self.state == "closed":
            self._streak = 0
            self._record(ok=True)

    def failure(self, permit: Permit) -> None:
        if permit.probe:
            if permit is self._probe:
                self._probe = None
                self._trip("the probe failed")
            return
        if self.state != "closed" or permit.issued_at < self._opened_at:
            return
        self._streak += 1
        self._record(ok=False)
        if self._streak >= self._threshold:
            self._trip(f"{self._streak} consecutive failures")
            return
        failed = sum(1 for _, ok in self._recent if not ok)
        full = len(self._recent) == self._recent.maxlen
        if self._rate_threshold > 0 and full and failed >= self._rate_threshold * len(self._recent):
            self._trip(f"{failed} of the last {len(self._recent)} attempts failed")

    def abandon(self, permit: Permit) -> None:
        """The attempt never reached the upstream: a probe gives its turn back."""
        if permit.probe and permit is self._probe:
            self._probe = None

    def _record(self, *, ok: bool) -> None:
        now = self._clock()
        while self._recent and now - self._recent[0][0] > self._rate_window_s:
            self._recent.popleft()
        self._recent.append((now, ok))

    def _trip(self, why: str) -> None:
        self._opened_at = self._clock()
        self._streak = 0
        self._recent.clear()
        self._set("open", why)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int
    base_s: float = 0.2
    cap_s: float = 5.0

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half to all of ``base·2^attempt``, capped), never
        shorter than the upstream's ``Retry-After``. The jitter keeps replicas that failed
        together from retrying together."""
        delay: float = random.uniform(0.5, 1.0) * min(self.cap_s, self.base_s * 2.0**attempt)  # noqa: S311 - jitter
        return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class CallReport:
    """What happened during one logical call, for metrics and logs."""

    attempts: int = 0
    upstream_s: float = 0.0
    key: str | None = None  # the pool key of the last attempt (a name, never the secret)
    queued_s: float = 0.0  # time spent waiting for a slot, all attempts together
    #: Started when the answer came back and still running: the slot's release. The caller
    #: awaits it beside its own writes (with :func:`app.redisconn.together` they share one
    #: round trip); left alone it finishes by itself.
    finishing: list[asyncio.Task[None]] = field(default_factory=list)


class SlotPool(Protocol):
    """What the resilient call needs from the key pool (``pool.PoolFront``)."""

    @property
    def gated(self) -> bool: ...

    async def acquire(self, caller: Caller, wait_s: float) -> Grant: ...

    async def release(self, grant: Grant, outcome: Outcome) -> None: ...


class _Moved(Exception):
    """The key failed the call (throttled, out of credits, refused): try another key now."""

    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def refusal_problem(refused: Refused) -> UpstreamFailure:
    """What a caller sees when the pool gives no slot (README: 429 vs 503)."""
    if refused.reason == "tenant":
        problem = Problem(
            "upstream_share_exceeded",
            "this tenant's calls already fill its share of the upstream queue; try again later",
            retry_after=max(1.0, refused.retry_after),
        )
    elif refused.reason == "nokey":
        problem = Problem(
            "upstream_keys_unavailable",
            "every upstream key this tenant may use is unusable right now (throttled, out of credits or refused)",
            retry_after=max(1.0, refused.retry_after),
        )
    else:
        problem = Problem(
            "upstream_unavailable",
            "too many calls to ailabapi in flight; try again shortly",
            retry_after=max(1.0, refused.retry_after) if refused.reason != "timeout" else refused.retry_after,
        )
    reason = "guard_timeout" if refused.reason == "timeout" else f"pool_{refused.reason}"
    return UpstreamFailure(problem, retryable=False, retry_after=refused.retry_after, reason=reason)


class ResilientUpstream:
    """Breaker → pool slot → attempt, retried within one overall deadline.

    ``clients(name)`` is the attempt for the pool's key ``name`` (one key when only
    FACEGATE_UPSTREAM_API_KEY is set: ``PoolSpec.single``).
    """

    def __init__(
        self,
        *,
        pool: SlotPool,
        clients: Callable[[str], Upstream],
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        timeout_s: float,
        queue_timeout_s: float,
        on_attempt: Callable[[str, float], None] | None = None,
        on_key_call: Callable[[str, str], None] | None = None,
        on_exhausted: Callable[[str], None] | None = None,
    ) -> None:
        self.pool = pool
        self._clients = clients
        self.breaker = breaker
        self._policy = policy
        self._timeout_s = timeout_s
        self._queue_timeout_s = queue_timeout_s
        self._on_attempt = on_attempt
        self._on_key_call = on_key_call
        self._on_exhausted = on_exhausted
        #: Slot releases started after an answer (CallReport.finishing), held until done: the event
        #: loop keeps only weak references to tasks, and a caller may drop its report early.
        self._releasing: set[asyncio.Task[None]] = set()

    async def call(
        self, image: ImagePayload, report: CallReport | None = None, caller: Caller | None = None
    ) -> UpstreamAnswer:
        report = report or CallReport()
        caller = caller or Caller()
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        moves = 0
        while True:
            permit = self.breaker.allow()
            if not isinstance(permit, Permit):
                raise UpstreamFailure(
                    Problem(
                        "upstream_unavailable",
                        "ailabapi is failing; facegate is not calling it for now",
                        retry_after=permit,
                    ),
                    retryable=False,
                    reason="breaker_open",
                )
            try:
                answer = await self._attempt(image, permit, deadline, report, caller)
            except _Moved as moved:
                # The key is marked; the pool picks another (or says none is left). Bounded, in
                # case the marks cannot be stored (Redis down): then the key's failure stands.
                moves += 1
                if moves > 8 or time.monotonic() >= deadline:
                    raise moved.failure from None
                log.info("upstream key %s failed the call (%s); moving it to another key", report.key, moved)
                continue
            except UpstreamFailure as failure:
                delay = self._policy.backoff(attempt, failure.retry_after)
                if (
                    not failure.retryable
                    or attempt >= self._policy.retries
                    or self.breaker.state != "closed"  # this failure opened it: stop here
                    or time.monotonic() + delay >= deadline
                ):
                    raise
                attempt += 1
                log.info("upstream attempt failed (%s), retrying in %.2f s", failure.reason, delay)
                await asyncio.sleep(delay)
                continue
            return answer

    async def _attempt(
        self, image: ImagePayload, permit: Permit, deadline: float, report: CallReport, caller: Caller
    ) -> UpstreamAnswer:
        """One attempt on one key; tells the breaker and the pool its outcome."""
        try:
            with tracing.span("facegate.upstream.queue") as traced:
                grant = await self.pool.acquire(
                    caller, max(0.0, min(self._queue_timeout_s, deadline - time.monotonic()))
                )
                tracing.set_attributes(traced, **{"facegate.upstream.key": grant.key})
        except Refused as refused:
            # Our own queue, not an upstream failure: the breaker is not told.
            self.breaker.abandon(permit)
            raise refusal_problem(refused) from None
        except BaseException:
            self.breaker.abandon(permit)
            raise
        report.key = grant.key
        report.queued_s += grant.queued_s
        reached = False
        elapsed = 0.0
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamFailure(
                    Problem("upstream_timeout", "no time was left to call ailabapi"),
                    retryable=False,
                    reason="deadline",
                )
            upstream = self._clients(grant.key)
            reached = True
            report.attempts += 1
            started = time.monotonic()
            try:
                with tracing.span(
                    "facegate.upstream.attempt",
                    **{"facegate.upstream.key": grant.key, "facegate.upstream.attempt": report.attempts},
                ):
                    answer = await upstream.analyze(image, timeout_s=remaining)
            finally:
                elapsed = time.monotonic() - started
                report.upstream_s += elapsed
        except UpstreamFailure as failure:
            effect = contract.key_effect(failure.reason) if reached else None
            await self.pool.release(
                grant,
                Outcome(
                    code=failure.reason,
                    effect=effect,
                    cool_s=failure.retry_after,
                    billed=failure.billed,
                    seconds=elapsed,
                    reached=reached,
                ),
            )
            if not reached:
                self.breaker.abandon(permit)
                raise
            self._notify(grant.key, failure.reason, elapsed)
            if effect is not None and self.pool.gated:
                # About this key, not about ailabapi: no breaker count; the call moves on.
                self.breaker.abandon(permit)
                if effect is KeyEffect.EXHAUSTED and self._on_exhausted is not None:
                    self._on_exhausted(grant.key)
                raise _Moved(failure) from None
            self.breaker.failure(permit)
            raise
        except BaseException:
            # Cancelled (shutdown) or a bug: no verdict on the upstream either way.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.pool.release(grant, Outcome(reached=False)))
            self.breaker.abandon(permit)
            raise
        outcome = "ok" if answer.verdict is None else answer.verdict.code
        release = self.pool.release(grant, Outcome(code="ok", billed=answer.billed, seconds=elapsed))
        task = asyncio.get_running_loop().create_task(release)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        report.finishing.append(task)
        self.breaker.success(permit)
        self._notify(grant.key, outcome, elapsed)
        return answer

    def _notify(self, key: str, outcome: str, elapsed: float) -> None:
        if self._on_attempt is not None:
            self._on_attempt(outcome, elapsed)
        if self._on_key_call is not None:
            self._on_key_call(key, outcome)
