"""The global guard: keeps the one shared ailabapi key under its QPS and concurrency limits.

ailabapi limits each key (``EXCEEDING_LIMITS``, ``AI_SERVICE_FLOW_RESTRICTION``); every
replica shares that key, so the limit has to be enforced across replicas or the
upstream answers a storm of 429s that hurts every tenant. Calls over the limit wait in a
bounded queue with a deadline, then get a clean 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from app.redisconn import RedisClient, RedisDown, RedisHealth


class GuardTimeout(Exception):
    """No upstream slot freed up before the deadline."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("upstream guard timeout")
        self.retry_after = retry_after


class Guard(Protocol):
    """Global limits of the shared upstream key (QPS and calls in flight)."""

    def slot(self, timeout_s: float) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def close(self) -> None: ...


class LocalGuard:
    """One process's guard: a semaphore for concurrency, paced starts for QPS.

    The queue in front of it is bounded twice: by time (each caller's deadline) and by
    length — a caller that could not start before its deadline even if every caller
    ahead of it started on time (``max_concurrency`` at once, then one per QPS interval)
    is refused at once instead of waiting to be refused.
    """

    def __init__(self, qps: float, max_concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / qps
        self._max_concurrency = max_concurrency
        self._sem = asyncio.Semaphore(max_concurrency)
        self._next = 0.0
        self._clock = clock
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Callers queued for a slot right now."""
        return self._waiting

    def queue_bound(self, timeout_s: float) -> int:
        return self._max_concurrency + math.ceil(timeout_s / self._interval)

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        deadline = self._clock() + timeout_s
        if self._waiting >= self.queue_bound(timeout_s):
            raise GuardTimeout(max(self._interval, timeout_s))
        self._waiting += 1
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._sem.acquire()
        except TimeoutError:
            raise GuardTimeout(self._interval) from None
        finally:
            self._waiting -= 1
        try:
            now = self._clock()
            start = max(now, self._next)
            if start > deadline:
                raise GuardTimeout(start - now)
            self._next = start + self._interval
            if start > now:
                await asyncio.sleep(start - now)
            yield
        finally:
            self._sem.release()

    async def close(self) -> None:
        return None


_ACQUIRE = """
-- KEYS: 1 slots zset (member = token, score = lease expiry µs), 2 qps TAT (µs)
-- ARGV: 1 token, 2 max concurrency, 3 interval µs, 4 lease µs, 5 poll µs
-- Returns 0 when the slot is taken, else the µs to wait before trying again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, math.min(tonumber(ARGV[5]), tonumber(first[2]) - now))
end
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat > now then return math.ceil(tat - now) end
local interval = tonumber(ARGV[3])
redis.call('SET', KEYS[2], string.format('%d', math.ceil(now + interval)), 'PX', math.ceil(interval / 1000) + 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
return 0
"""

#: While every slot is taken, how often a waiter asks again (µs; jittered up by 50 %).
POLL_US = 20_000


class RedisGuard:
    """The guard across replicas: a leased semaphore (sorted set) plus paced starts, in Lua.

    Leases expire, so a replica that dies holding slots frees them by itself. A local
    semaphore in front keeps this process from asking Redis for slots it could never get.
    If Redis is down, the local guard alone applies (this process stays within the
    limits; all replicas together may not).
    """

    def __init__(
        self,
        client: RedisClient,
        health: RedisHealth,
        prefix: str,
        *,
        qps: float,
        max_concurrency: int,
        lease_s: float,
    ) -> None:
        self._r = client
        self._health = health
        self._keys = [f"{prefix}:g:{{upstream}}:slots", f"{prefix}:g:{{upstream}}:tat"]
        self._args: list[Any] = [max_concurrency, f"{1_000_000 / qps:.3f}", int(lease_s * 1_000_000), POLL_US]
        self._acquire = client.register_script(_ACQUIRE)
        self._local = LocalGuard(qps, max_concurrency)
        self._interval = 1.0 / qps

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        deadline = time.monotonic() + timeout_s
        async with self._local.slot(timeout_s):
            token = uuid.uuid4().hex
            held = await self._take(token, deadline)
            try:
                yield
            finally:
                if held:
                    with contextlib.suppress(RedisDown):
                        await self._health.run("guard", lambda: self._r.zrem(self._keys[0], token))

    async def _take(self, token: str, deadline: float) -> bool:
        """True once a global slot is held; False when Redis is down (local limits only)."""
        while True:
            try:
                wait_us = await self._health.run(
                    "guard", lambda: self._acquire(keys=self._keys, args=[token, *self._args])
                )
            except RedisDown:
                return False
            if int(wait_us) == 0:
                return True
            delay = int(wait_us) / 1_000_000 * random.uniform(1.0, 1.5)  # noqa: S311 - jitter
            if time.monotonic() + delay > deadline:
                raise GuardTimeout(max(delay, self._interval))
            await asyncio.sleep(delay)

    async def close(self) -> None:
        return None
