"""The pool across replicas: each decision is one Lua script (``lua/``), atomic in Redis.

All of the pool's keys share the ``{upstream}`` hash tag, so the scripts run on one Redis
Cluster slot; time comes from Redis ``TIME`` (replica clocks may disagree). Slots and
queue places are leased and renewed by the heartbeat of the replica holding them: a
replica that dies (SIGKILL, OOM, a partition) stops renewing, and what it held returns
within ``FACEGATE_UPSTREAM_LEASE_S``. When a release on one replica grants a slot to a
call waiting on another, the script publishes the waiter's replica id on one channel;
each replica listens and runs its heartbeat at once (it also polls now and then, so a lost
message costs a fraction of a second, not a stuck call).

If Redis is down, calls fall back to an in-process pool with the same keys and limits
(this replica then stays within them; all replicas together may not), like the quota's
fail-open and the old guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from app import redisconn
from app.redisconn import RedisClient, RedisDown, RedisHealth
from app.upstream.keys import PoolSpec
from app.upstream.pool.base import Caller, Grant, Outcome
from app.upstream.pool.core import STRUCTURES, Ask, Config, Spent
from app.upstream.pool.front import Enqueued, Hooks, Pairs, Polled, PoolFront, PoolSettings
from app.upstream.pool.memory import MemoryPool

log = logging.getLogger("facegate.upstream")


def _lua(name: str) -> str:
    here = resources.files("app.upstream.pool").joinpath("lua")
    return here.joinpath("_pool.lua").read_text() + "\n" + here.joinpath(f"{name}.lua").read_text()


def _s(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _pairs(items: Sequence[Any]) -> Pairs:
    """(ticket, key, µs until its start) triples from a script's flat answer."""
    return [(_s(items[i]), _s(items[i + 1]), int(items[i + 2])) for i in range(0, len(items) - 2, 3)]


class RedisPool(PoolFront):
    """Grants, health and balances shared by every replica through Redis."""

    def __init__(
        self,
        client: RedisClient,
        health: RedisHealth,
        prefix: str,
        *,
        spec: Callable[[], PoolSpec],
        settings: PoolSettings,
        hooks: Hooks | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(spec, settings, hooks)
        self.replica = uuid.uuid4().hex[:10]
        self._r = client
        self._wire = redisconn.Wire.of(client)
        self._health = health
        base = f"{prefix}:pool:{{upstream}}"
        self.keys = [f"{base}:{name}" for name in STRUCTURES]
        self._poll_prefix = f"{base}:poll:"
        self.channel = f"{base}:wake"
        self._clock = clock  # tests only: None means Redis TIME
        self._publish = redisconn.publish_command(client)
        self._scripts = {
            name: client.register_script(_lua(name))
            for name in ("enqueue", "poll", "release", "cancel", "balance", "reloaded", "snapshot")
        }
        self._local = MemoryPool(spec, settings, hooks, replica="L")
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="upstream-pool-listener")

    def _head(self, cfg: Config) -> list[Any]:
        pool, keys = cfg.argv()
        now = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        return [now, pool, keys, self.channel, self.replica, self._publish]

    async def _run(self, name: str, cfg: Config, args: Sequence[Any]) -> list[Any]:
        script = self._scripts[name]
        argv = [*self._head(cfg), *args]
        result: list[Any] = await self._health.run("pool", lambda: self._wire.script(script, self.keys, argv))
        return result

    # --- decisions -----------------------------------------------------------------------

    async def acquire(self, caller: Caller, wait_s: float) -> Grant:
        try:
            return await super().acquire(caller, wait_s)
        except RedisDown:
            return await self._local.acquire(caller, wait_s)

    async def release(self, grant: Grant, outcome: Outcome) -> None:
        if grant.ticket.startswith(self._local.replica + ":"):
            await self._local.release(grant, outcome)
            return
        await super().release(grant, outcome)

    async def _enqueue(self, cfg: Config, ticket: str, ask: Ask) -> Enqueued:
        args = [ticket, ask.tenant, ask.cls, ask.key, 1 if ask.fallback else 0, repr(ask.cost), ask.budget_us]
        r = await self._run("enqueue", cfg, args)
        status = _s(r[0])
        value: Any = _s(r[1]) if status in ("granted", "queued") else int(r[1])
        return status, value, int(r[2]), int(r[3]), _pairs(r[4:])

    async def _poll(self, cfg: Config, waiting: Sequence[str], held: Sequence[str]) -> Polled:
        r = await self._run("poll", cfg, [len(waiting), *waiting, *held])
        n = int(r[2])
        return int(r[0]), int(r[1]), _pairs(r[3 : 3 + 3 * n]), [_s(t) for t in r[3 + 3 * n :]]

    async def _release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]:
        args = [ticket, spent.key, spent.effect, spent.cool_us, 1 if spent.billed else 0, spent.dur_us, spent.code]
        r = await self._run("release", cfg, args)
        return int(r[0]), int(r[1]), _pairs(r[2:])

    async def _cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]:
        try:
            r = await self._run("cancel", cfg, [ticket])
        except RedisDown:
            return "gone", "", 0  # the place expires with its lease
        return _s(r[0]), _s(r[1]), int(r[2])

    async def _balance(self, cfg: Config, key: str, balance: float | None) -> tuple[int, Pairs]:
        await self._local.record_balance(key, balance)  # the fallback pool knows it too
        r = await self._run("balance", cfg, [key, "" if balance is None else repr(float(balance))])
        return int(r[0]), _pairs(r[1:])

    async def _reloaded(self, cfg: Config) -> Pairs:
        await self._local.keys_reloaded()
        return _pairs(await self._run("reloaded", cfg, []))

    async def _snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        r = await self._run("snapshot", cfg, [])
        by_tenant = {_s(r[3][i]): int(r[3][i + 1]) for i in range(0, len(r[3]) - 1, 2)}
        return int(r[0]), int(r[1]), [list(row) for row in r[2]], by_tenant

    async def claim_poll(self, key: str, every_s: float) -> bool:
        try:
            won = await self._health.run(
                "pool",
                lambda: self._r.set(self._poll_prefix + key, self.replica, nx=True, px=max(1, int(every_s * 1000))),
            )
        except RedisDown:
            return await self._local.claim_poll(key, every_s)
        return bool(won)

    async def forget_poll(self, key: str) -> None:
        """The next :meth:`claim_poll` of ``key`` wins at once (a credits failure wants a fresh balance)."""
        with contextlib.suppress(RedisDown):
            await self._health.run("pool", lambda: self._r.delete(self._poll_prefix + key))

    # --- being told ----------------------------------------------------------------------

    async def _listen(self) -> None:
        """One subscription for the life of the process (sharded on a Cluster): wake the heartbeat when named."""
        me = self.replica.encode()
        backoff = 0.1
        lost = False
        last_log = float("-inf")
        while True:
            subscription = redisconn.Subscription(self._r, [self.channel])
            try:
                await subscription.open(refresh=lost)
                lost = False
                backoff = 0.1
                while True:
                    message = await subscription.get(1.0)
                    if message is not None and me in bytes(message[1]).split():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # resubscribe after a pause; the heartbeat still polls meanwhile
                lost = True
                now = time.monotonic()
                if now - last_log >= 10.0:
                    last_log = now
                    log.warning("upstream pool subscription lost (%s); retrying", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                await subscription.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._local.close()
        await super().close()
