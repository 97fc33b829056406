"""Response cache: raw upstream answers, addressed by what was asked.

The key is derived from everything that decides the upstream's answer (see
:func:`cache_key`), so an image already analyzed is never paid for twice. Entries hold
the *raw* upstream JSON: the normalizer runs on read, so fixing it needs no re-buy.

Backends sit behind :class:`CacheBackend`: an in-memory LRU bounded by bytes (the
embedded default) and Redis (shared by replicas). A cache failure never fails a
request: the Redis backend reports errors, the service treats them as misses.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from app.redisconn import RedisClient, RedisDown, RedisHealth, Wire
from app.upstream import contract

T = TypeVar("T")

#: Bump when the meaning of a stored entry changes (not when the normalizer changes).
FORMAT_VERSION: Final = "1"


def cache_key(*, scope: str, sha256: str, params: str = "", endpoint: str = contract.ENDPOINT_ID) -> str:
    """Address of an upstream answer: scope, image hash, endpoint, parameters, format version.

    The pieces are hashed together so the key has a fixed length and reveals neither
    the tenant nor the image hash to someone reading Redis keys.
    """
    material = "\x1f".join((FORMAT_VERSION, scope, endpoint, params, sha256))
    return hashlib.sha256(material.encode()).hexdigest()


class CacheError(Exception):
    """The backend could not answer (Redis down, slow, refused): treat as a miss."""


class CacheBackend(Protocol):
    """Byte values with a TTL. Implementations raise :class:`CacheError`, nothing else."""

    async def get(self, key: str) -> tuple[bytes, float] | None:
        """The value and its remaining lifetime in seconds, or None."""

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete these keys; how many existed (deletion by hash, purges)."""

    async def close(self) -> None: ...


class MemoryCache:
    """A process-local LRU bounded by the bytes it holds, not by its number of entries."""

    #: Rough per-entry bookkeeping cost counted against the bound (key, tuple, dict slot).
    ENTRY_OVERHEAD: Final = 200

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0

    def _cost(self, key: str, value: bytes) -> int:
        return len(key) + len(value) + self.ENTRY_OVERHEAD

    async def get(self, key: str) -> tuple[bytes, float] | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        remaining = expires - self._clock()
        if remaining <= 0:
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value, remaining

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = self._cost(key, value)
        if key in self._data:
            self._drop(key)
        if cost > self.max_bytes:
            return
        self._data[key] = (value, self._clock() + ttl_s)
        self.bytes += cost
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._data))
            self._drop(oldest)

    async def delete(self, key: str) -> None:
        if key in self._data:
            self._drop(key)

    async def delete_many(self, keys: Sequence[str]) -> int:
        found = 0
        for key in keys:
            if key in self._data:
                found += self._clock() < self._data[key][1]  # an expired leftover was not "held"
                self._drop(key)
        return found

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self.bytes -= self._cost(key, value)

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        self.clear()


class RedisCache:
    """Entries shared by all replicas. Every failure is a :class:`CacheError` (→ a miss)."""

    def __init__(
        self,
        client: RedisClient,
        health: RedisHealth,
        prefix: str,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._r = client
        self._wire = Wire.of(client)
        self._health = health
        self._prefix = f"{prefix}:c:"
        #: Called once per operation that went on without the cache (facegate_cache_errors),
        #: including those skipped during the cool-down: it counts degraded requests.
        self._on_error = on_error

    async def _run(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._health.run("cache", op)
        except RedisDown:
            if self._on_error is not None:
                self._on_error()
            raise CacheError("redis") from None

    def redis_key(self, key: str) -> str:
        """The Redis key of ``key``'s entry."""
        return self._prefix + key

    async def get(self, key: str) -> tuple[bytes, float] | None:
        name = self._prefix + key
        value, pttl = await self._run(lambda: self._wire.pipeline([("GET", name), ("PTTL", name)]))
        if value is None:
            return None
        return bytes(value), (pttl / 1000.0 if pttl and pttl > 0 else 0.0)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._run(lambda: self._wire.call("SET", self._prefix + key, value, "PX", max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._run(lambda: self._r.delete(self._prefix + key))

    async def delete_many(self, keys: Sequence[str]) -> int:
        """One DEL per key in a pipeline (each key is its own Cluster slot), 500 at a time."""
        found = 0
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]

            async def op(batch: Sequence[str] = batch) -> list[Any]:
                async with self._r.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.delete(self._prefix + key)
                    result: list[Any] = await pipe.execute()
                    return result

            found += sum(int(n) for n in await self._run(op))
        return found

    async def close(self) -> None:
        return None


class TieredCache:
    """A small per-process LRU in front of Redis.

    Entries are content-addressed and never change meaning, so a local copy is never
    stale — except after a *deletion* (``DELETE /v1/faces/analyses/...``, purges): every
    replica then drops its copy when told (``app.purge``). A replica that cannot be told
    (its invalidation subscription is down) must not serve local copies: the invalidator
    switches the tier off (``local_enabled = False``, emptied) until it hears again. It
    saves a round trip on hot images and keeps serving them through a Redis stall.
    """

    def __init__(self, local: MemoryCache, shared: CacheBackend) -> None:
        self.local = local
        self.shared = shared
        self.local_enabled = True
        #: Bumped by every drop: a Redis read that started before a drop must not refill the tier.
        self._drops = 0

    def enable_local(self, enabled: bool) -> None:
        """Switch the local tier on or off; off also empties it (its copies may be stale then)."""
        if not enabled:
            self.local.clear()
            self._drops += 1
        self.local_enabled = enabled

    async def drop_local(self, keys: Sequence[str]) -> None:
        """Forget local copies of ``keys`` (another replica deleted them)."""
        self._drops += 1
        await self.local.delete_many(keys)

    async def get(
        self, key: str, shared: Callable[[], Awaitable[tuple[bytes, float] | None]] | None = None
    ) -> tuple[bytes, float] | None:
        """The local copy, else the shared entry (read by ``shared`` when given: a read that does
        more in the same round trip, see ``AnalyzeService``), kept locally for the next time."""
        if self.local_enabled:
            found = await self.local.get(key)
            if found is not None:
                return found
        drops = self._drops
        found = await (self.shared.get(key) if shared is None else shared())
        if found is not None and found[1] > 0 and self.local_enabled and drops == self._drops:
            await self.local.set(key, found[0], found[1])
        return found

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self.local_enabled:
            await self.local.set(key, value, ttl_s)
        await self.shared.set(key, value, ttl_s)

    async def delete(self, key: str) -> None:
        await self.local.delete(key)
        await self.shared.delete(key)

    async def delete_many(self, keys: Sequence[str]) -> int:
        local = await self.local.delete_many(keys)
        shared = await self.shared.delete_many(keys)
        return max(local, shared)

    async def close(self) -> None:
        await self.local.close()
        await self.shared.close()
