"""Reading each key's credit balance now and then, and right after it ran out.

Every ``every_s`` (``FACEGATE_UPSTREAM_CREDITS_POLL_S``) one replica — whichever claims the
key's poll first — asks ailabapi's free balance endpoint and records the answer in the
pool: a positive balance brings an exhausted key back, none takes a key out before a
call has to fail on it. An exhausted key is asked again every ``min(60 s, every_s)``
(its balance may be topped up any time), and at once after a call learns it is out of
credits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from app.upstream.pool.base import PoolView
from app.upstream.pool.front import PoolFront

log = logging.getLogger("facegate.upstream")

#: An exhausted key is asked at least this often.
EXHAUSTED_RECHECK_S = 60.0


def recheck_s(every_s: float) -> float:
    return min(EXHAUSTED_RECHECK_S, every_s)


class CreditsWatcher:
    """The balance poller of one replica (a background task)."""

    def __init__(
        self,
        pool: PoolFront,
        read_balance: Callable[[str], Awaitable[float | None]],
        *,
        every_s: float,
        on_view: Callable[[PoolView], None] | None = None,
    ) -> None:
        self._pool = pool
        self._read = read_balance
        self._every_s = every_s
        self._recheck_s = recheck_s(every_s)
        #: Told the pool's view after each tick (the gauges keep it while a scrape cannot read Redis).
        self._on_view = on_view
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def tick_s(self) -> float:
        """Often enough to recheck an exhausted key in time; the pool's gauges are read on each scrape."""
        return max(0.1, min(30.0, self._recheck_s / 2))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="upstream-credits")

    def nudge(self, key: str) -> None:
        """A call just found ``key`` out of credits: read its balance now (one replica does)."""
        forget = getattr(self._pool, "forget_poll", None)

        async def now() -> None:
            if forget is not None:
                await forget(key)
            self._wake.set()

        asyncio.get_running_loop().create_task(now())

    async def _run(self) -> None:
        """Every tick (the lifespan ran the first one before serving), or at once when nudged."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a bad answer: try again next tick
                log.warning("upstream credits check failed (%s)", type(exc).__name__)

    async def tick(self) -> PoolView:
        """Read the balances that are due; the pool's view after them."""
        view = await self._pool.snapshot()
        changed = False
        for key in view.keys:
            period = self._recheck_s if key.state == "exhausted" else self._every_s
            if await self._pool.claim_poll(key.name, period):
                balance = await self._read(key.name)
                await self._pool.record_balance(key.name, balance)
                changed = True
                if balance is None:
                    log.warning("could not read the credit balance of upstream key %s", key.name)
        if changed:
            view = await self._pool.snapshot()
        if self._on_view is not None:
            self._on_view(view)
        return view

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
