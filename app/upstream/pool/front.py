"""The per-process side of a pool backend: tickets, waiting calls, the heartbeat.

Decisions are made by the backend (:mod:`app.upstream.pool.core` in memory, the Lua
scripts in Redis); this class turns them into awaitable grants. A call enqueues a
*ticket* (granted at once, queued, or refused at once); a queued call waits on a future
that the *heartbeat* resolves. The heartbeat runs while this process has waiters or holds
slots: it renews their leases (a process that dies stops renewing, and its slots and
places return within the lease) and asks the backend to dispatch when pacing or a
cooldown may have freed a slot by itself, or when told (a slot freed on another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from app.upstream.contract import KeyEffect
from app.upstream.keys import PoolSpec
from app.upstream.pool.base import (
    DEFAULT_CALL_US,
    NO_RETURN_S,
    SCAN,
    US,
    Caller,
    Grant,
    KeyView,
    Outcome,
    PoolView,
    RefusalReason,
    Refused,
    state_label,
)
from app.upstream.pool.core import TIER_NUMBER, Ask, Config, KeyCfg, Spent, interval_us

log = logging.getLogger("facegate.upstream")

#: While calls wait for a slot that only a release can free, how often the heartbeat asks
#: anyway (the release normally wakes it at once; this covers a lost notification).
SAFETY_POLL_S: Final = 0.25

#: (ticket, key, µs until its start) for each slot a decision granted.
Pairs = list[tuple[str, str, int]]
_REFUSALS: Final[dict[str, RefusalReason]] = {"tenant": "tenant", "full": "full", "late": "late", "nokey": "nokey"}
Enqueued = tuple[str, Any, int, int, Pairs]
Polled = tuple[int, int, Pairs, list[str]]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The pool's knobs that are not per key (``FACEGATE_UPSTREAM_*``)."""

    lease_s: float = 5.0
    queue_max: int = 1000
    queue_per_tenant: int = 200
    cooldown_s: float = 1.0
    recheck_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the pool tells the metrics (kept free of prometheus here)."""

    waited: Callable[[Caller, float], None] = lambda caller, seconds: None
    refused: Callable[[Caller, str], None] = lambda caller, reason: None
    depth: Callable[[int], None] = lambda n: None


def build_config(spec: PoolSpec, settings: PoolSettings, *, lease_us: int | None = None) -> Config:
    keys = tuple(
        KeyCfg(k.name, interval_us(k.qps), k.max_concurrency, k.weight, TIER_NUMBER[k.tier]) for k in spec.keys
    )
    return Config(
        gated=spec.gated,
        pool_conc=spec.max_concurrency,
        pool_interval_us=interval_us(spec.qps),
        lease_us=lease_us if lease_us is not None else int(settings.lease_s * US),
        max_total=settings.queue_max,
        max_tenant=settings.queue_per_tenant,
        cool_us=int(settings.cooldown_s * US),
        recheck_us=int(settings.recheck_s * US),
        scan=SCAN,
        lat0_us=DEFAULT_CALL_US,
        keys=keys,
    )


def effect_of(outcome: Outcome) -> str:
    if not outcome.reached:
        return "-"
    if outcome.effect is None:
        return "ok" if outcome.code == "ok" else "-"
    return {KeyEffect.THROTTLED: "throttled", KeyEffect.EXHAUSTED: "exhausted", KeyEffect.DISABLED: "disabled"}[
        outcome.effect
    ]


def _num(raw: Any) -> float | None:
    if raw is None or raw in (b"", ""):
        return None
    return float(raw.decode() if isinstance(raw, bytes) else raw)


def _text(raw: Any) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class PoolFront(ABC):
    """Grants as awaitables over a backend's decisions (the backend implements the ``_`` hooks)."""

    replica: str

    def __init__(self, spec: Callable[[], PoolSpec], settings: PoolSettings, hooks: Hooks | None = None) -> None:
        self._spec = spec
        self.settings = settings
        self.hooks = hooks or Hooks()
        self._seq = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[tuple[str, int]]] = {}
        self._held: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._cfg_for: tuple[PoolSpec, Config] | None = None
        self._closed = False
        self._last_error_log = float("-inf")

    # --- the backend's part ----------------------------------------------------------

    @abstractmethod
    async def _enqueue(self, cfg: Config, ticket: str, ask: Ask) -> Enqueued:
        """(status, key | retry µs, hint µs, depth, grants made)."""

    @abstractmethod
    async def _poll(self, cfg: Config, waiting: Sequence[str], held: Sequence[str]) -> Polled:
        """(hint µs, depth, grants for ``waiting``, lost tickets)."""

    @abstractmethod
    async def _release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]: ...

    @abstractmethod
    async def _cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]: ...

    @abstractmethod
    async def _balance(self, cfg: Config, key: str, balance: float | None) -> tuple[int, Pairs]: ...

    @abstractmethod
    async def _reloaded(self, cfg: Config) -> Pairs: ...

    @abstractmethod
    async def _snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        """(now µs, waiting, rows, waiting by tenant)."""

    @abstractmethod
    async def claim_poll(self, key: str, every_s: float) -> bool: ...

    def _lease_us(self) -> int | None:
        return None

    # --- the protocol ------------------------------------------------------------------

    @property
    def spec(self) -> PoolSpec:
        return self._spec()

    @property
    def gated(self) -> bool:
        """Unhealthy keys are taken out of rotation (a keys file; not the pool of one)."""
        return self._spec().gated

    def config(self) -> Config:
        spec = self._spec()
        cached = self._cfg_for
        if cached is None or cached[0] is not spec:
            cached = self._cfg_for = (spec, build_config(spec, self.settings, lease_us=self._lease_us()))
        return cached[1]

    async def acquire(self, caller: Caller, wait_s: float) -> Grant:
        started = time.monotonic()
        ticket = f"{self.replica}:{next(self._seq):012d}"
        cfg = self.config()
        ask = Ask(
            caller.tenant,
            "b" if caller.priority == "batch" else "i",
            caller.key or "-",
            caller.fallback,
            caller.cost,
            max(0, int(wait_s * US)),
        )
        status, value, _hint, depth, granted = await self._enqueue(cfg, ticket, ask)
        self.hooks.depth(depth)
        self._deliver(granted)
        if status not in ("granted", "queued"):
            reason = _REFUSALS.get(status, "full")
            self.hooks.refused(caller, reason)
            retry_s = int(value) / US if int(value) > 0 else NO_RETURN_S if reason == "nokey" else 1.0
            raise Refused(reason, retry_s)
        try:
            if status == "granted":
                self._held[ticket] = value
                self._start_pump()
                key, start_in = value, next((d for t, _, d in granted if t == ticket), 0)
            else:
                key, start_in = await self._wait(ticket, wait_s, started, caller)
            if start_in > 0:  # a paced start just ahead: the slot is ours, its start is not yet
                await asyncio.sleep(start_in / US)
        except asyncio.CancelledError:
            self._abandon(ticket)
            raise
        waited = time.monotonic() - started
        self.hooks.waited(caller, waited)
        return Grant(key, ticket, waited)

    async def _wait(self, ticket: str, wait_s: float, started: float, caller: Caller) -> tuple[str, int]:
        """A queued call: its key and µs to its start, once the heartbeat (or a release) grants it."""
        future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = future
        self._start_pump()
        self._wake.set()
        try:
            async with asyncio.timeout(max(0.0, wait_s)):
                return await future
        except TimeoutError:
            late = await self._late(ticket)
            if late is None:
                self.hooks.refused(caller, "timeout")
                raise Refused("timeout", 1.0) from None
            return late
        except Refused:
            self.hooks.refused(caller, "timeout")
            raise

    async def _late(self, ticket: str) -> tuple[str, int] | None:
        """The wait ran out: drop the place, unless a slot came meanwhile (then take it)."""
        if self._waiting.pop(ticket, None) is None and ticket in self._held:
            return self._held[ticket], 0
        status, key, start_in = await self._cancel(self.config(), ticket)
        if status == "granted":
            self._held[ticket] = key
            return key, start_in
        return None

    def _abandon(self, ticket: str) -> None:
        """The caller went away while waiting: give back the place, or the slot it just got."""
        self._waiting.pop(ticket, None)
        key = self._held.get(ticket)
        if key is not None:
            self._spawn(self.release(Grant(key, ticket, 0.0), Outcome(reached=False)))
            return

        async def cancel() -> None:
            status, got, _ = await self._cancel(self.config(), ticket)
            if status == "granted":
                await self.release(Grant(got, ticket, 0.0), Outcome(reached=False))

        self._spawn(cancel())

    async def release(self, grant: Grant, outcome: Outcome) -> None:
        self._held.pop(grant.ticket, None)
        cool_us = int(outcome.cool_s * US) if outcome.cool_s else 0
        try:
            spent = Spent(
                grant.key if outcome.reached else "-",
                effect_of(outcome),
                cool_us,
                outcome.billed,
                int(outcome.seconds * US) if outcome.reached else 0,
                outcome.code or "-",
            )
            _hint, depth, granted = await self._release(self.config(), grant.ticket, spent)
        except Exception as exc:  # a slot nobody releases comes back when its lease ends
            self._log_error("release", exc)
            return
        self.hooks.depth(depth)
        self._deliver(granted)
        if self._waiting:
            self._wake.set()

    async def record_balance(self, key: str, balance: float | None) -> None:
        _, granted = await self._balance(self.config(), key, balance)
        self._deliver(granted)

    async def keys_reloaded(self) -> None:
        self._deliver(await self._reloaded(self.config()))

    async def snapshot(self) -> PoolView:
        spec = self._spec()
        cfg = self.config()
        now, waiting, rows, by_tenant = await self._snapshot(cfg)
        keys = []
        for k, row in zip(spec.keys, rows, strict=True):
            raw, cool, _recheck, bal, bal_at, billed, why, inflight = row
            cool_us = int(_num(cool) or 0)
            balance = _num(bal)
            keys.append(
                KeyView(
                    name=k.name,
                    tier=k.tier,
                    state=state_label(raw=_text(raw), cool_until=cool_us, now=now, balance=balance, low=k.low_credits),
                    in_flight=int(inflight),
                    max_concurrency=k.max_concurrency,
                    qps=k.qps,
                    cooldown_until=cool_us / US if cool_us > now else None,
                    balance=balance,
                    balance_at=(_num(bal_at) or 0) / US if _num(bal_at) else None,
                    billed_since_balance=int(_num(billed) or 0),
                    low_credits=k.low_credits,
                    reason=_text(why) or None,
                )
            )
        return PoolView(tuple(keys), waiting, by_tenant, spec.gated, spec.source)

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._pump_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- the heartbeat -------------------------------------------------------------------

    def _deliver(self, pairs: Pairs) -> None:
        for ticket, key, start_in in pairs:
            future = self._waiting.pop(ticket, None)
            if future is None:
                continue  # another replica's waiter (it is told), or our own being granted right now
            self._held[ticket] = key
            if not future.done():
                future.set_result((key, start_in))

    def _start_pump(self) -> None:
        if self._closed:
            return
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump(), name="upstream-pool-heartbeat")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pump(self) -> None:
        renew_every = max(0.05, self.settings.lease_s / 3)
        sleep = 0.0 if self._waiting else renew_every  # slots alone need a renewal only a third of a lease on
        while self._waiting or self._held:
            if sleep > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._wake.wait()
            self._wake.clear()
            if not (self._waiting or self._held):
                break
            try:
                hint, depth, mine, lost = await self._poll(self.config(), list(self._waiting), list(self._held))
            except Exception as exc:
                self._log_error("heartbeat", exc)
                sleep = SAFETY_POLL_S
                continue
            self.hooks.depth(depth)
            self._deliver(mine)
            for ticket in lost:
                future = self._waiting.pop(ticket, None)
                if future is not None and not future.done():
                    future.set_exception(Refused("timeout", 1.0))
            sleep = renew_every
            if self._waiting:
                sleep = min(sleep, hint / US if hint > 0 else SAFETY_POLL_S)

    def _log_error(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            self._last_error_log = now
            log.warning("upstream pool %s failed (%s)", what, type(exc).__name__)
