"""The embedded pool: every decision of :mod:`core` over this process's memory (exact for one process).

No leases are needed in one process (nothing can die holding a slot without the process),
so slots and places are leased "forever"; everything else is the Redis backend's
behaviour, decision for decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from app.upstream.keys import PoolSpec
from app.upstream.pool.base import US
from app.upstream.pool.core import Ask, Config, Core, DictStore, Spent
from app.upstream.pool.front import Enqueued, Hooks, Pairs, Polled, PoolFront, PoolSettings

#: "Forever" for a lease in one process (about 30 years in µs).
_FOREVER_US = 10**15


class MemoryPool(PoolFront):
    """The pool in one process. Each decision runs without awaiting: atomic on the event loop."""

    def __init__(
        self,
        spec: Callable[[], PoolSpec],
        settings: PoolSettings,
        hooks: Hooks | None = None,
        *,
        clock: Callable[[], float] = time.time,
        replica: str = "m",
    ) -> None:
        super().__init__(spec, settings, hooks)
        self.replica = replica
        self.store = DictStore()
        self._clock = clock
        self._polls: dict[str, float] = {}

    def _lease_us(self) -> int | None:
        return _FOREVER_US

    def _core(self, cfg: Config) -> Core:
        return Core(self.store, cfg, round(self._clock() * US), self.replica)

    async def _enqueue(self, cfg: Config, ticket: str, ask: Ask) -> Enqueued:
        return self._core(cfg).enqueue(ticket, ask)

    async def _poll(self, cfg: Config, waiting: Sequence[str], held: Sequence[str]) -> Polled:
        return self._core(cfg).poll(waiting, held)

    async def _release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]:
        return self._core(cfg).release(ticket, spent)

    async def _cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]:
        return self._core(cfg).cancel(ticket)

    async def _balance(self, cfg: Config, key: str, balance: float | None) -> tuple[int, Pairs]:
        return self._core(cfg).balance(key, balance)

    async def _reloaded(self, cfg: Config) -> Pairs:
        return self._core(cfg).reloaded()

    async def _snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        core = self._core(cfg)
        rows, waiting, by_tenant = core.snapshot()
        return core.now, waiting, rows, by_tenant

    async def claim_poll(self, key: str, every_s: float) -> bool:
        now = self._clock()
        if self._polls.get(key, float("-inf")) > now:
            return False
        self._polls[key] = now + every_s
        return True
