"""Deleting cached analyses everywhere they are held: Redis, every replica's local tier, flights.

Three pieces:

- :class:`CacheIndex` — which cache keys each tenant's calls stored, so that "purge all of
  tenant X" works although cache keys are opaque hashes (they reveal neither tenant nor
  image). In Redis a sorted set per tenant (``{prefix}:ci:{tenant}``, scored by expiry, so
  it trims itself) under the tenant's hash tag, plus the set of tenant names that have one.
- :class:`Invalidator` — tells every replica to forget keys. **Pub/sub with
  acknowledgements**, not versioned keys: a versioned key would orphan data rather than
  delete it (a privacy deletion must remove the bytes), and checking a version on every
  local-tier hit would cost the Redis round trip the tier exists to save. Replicas register
  with a short lease; each drops its local copies, marks its running flights, and
  acknowledges; the deleter waits for every registered replica's acknowledgement or for its
  lease to lapse (a replica that cannot renew its lease stops serving local copies first, so
  nothing it holds can outlive a deletion it missed).
- :class:`Purger` — the deletion itself, in an order that leaves no copy behind: delete
  from Redis, tell the replicas (they drop local copies and stop their in-flight calls
  from storing), then delete from Redis once more (a flight may have stored in between).

Single-flight *outcomes* are never stored (only announced), and negative verdicts live
under the same cache key as analyses, so deleting the key removes them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from app import cache as cache_mod
from app import redisconn
from app.audit import audit
from app.cache import CacheBackend, CacheError
from app.redisconn import LOG_EVERY_S, RedisClient, RedisDown, RedisHealth

log = logging.getLogger("facegate.purge")

#: The cache scope of ``FACEGATE_CACHE_SCOPE=shared``.
SHARED_SCOPE = "*"


def scope_of(cache_scope: str, tenant: str) -> str:
    """The cache-key scope of ``tenant``'s answers under ``FACEGATE_CACHE_SCOPE``."""
    return SHARED_SCOPE if cache_scope == "shared" else f"tenant:{tenant}"


def cache_key_of(cache_scope: str, tenant: str, sha256: str) -> str:
    """The cache key of ``tenant``'s analysis of ``sha256``."""
    return cache_mod.cache_key(scope=scope_of(cache_scope, tenant), sha256=sha256)


def keys_of_hash(sha256: str, tenants: Iterable[str]) -> list[str]:
    """Every cache key an image can have: each tenant's scope and the shared one (whatever the
    scope setting is now: entries stored under an earlier setting are found too)."""
    scopes = [f"tenant:{t}" for t in sorted(set(tenants))] + [SHARED_SCOPE]
    return [cache_mod.cache_key(scope=s, sha256=sha256) for s in scopes]


# --- the index: which keys each tenant stored -------------------------------------------------


class CacheIndex(Protocol):
    async def add(self, tenant: str, key: str, ttl_s: float) -> None:
        """``tenant``'s call stored ``key`` for ``ttl_s``."""

    async def keys(self, tenant: str) -> list[str]:
        """The live keys ``tenant``'s calls stored."""

    async def remove(self, tenant: str, keys: Sequence[str]) -> None: ...

    async def tenants(self) -> list[str]:
        """Every tenant that stored something still alive (including tenants since removed)."""


class MemoryIndex:
    """One process: tenant -> key -> expiry (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, dict[str, float]] = {}

    def _live(self, tenant: str) -> dict[str, float]:
        now = self._clock()
        keys = self._keys.get(tenant, {})
        for key in [k for k, expires in keys.items() if expires <= now]:
            del keys[key]
        return keys

    async def add(self, tenant: str, key: str, ttl_s: float) -> None:
        keys = self._keys.setdefault(tenant, {})
        if len(keys) % 1024 == 0:
            self._live(tenant)
        keys[key] = max(keys.get(key, 0.0), self._clock() + ttl_s)

    async def keys(self, tenant: str) -> list[str]:
        return list(self._live(tenant))

    async def remove(self, tenant: str, keys: Sequence[str]) -> None:
        held = self._keys.get(tenant)
        if held is not None:
            for key in keys:
                held.pop(key, None)

    async def tenants(self) -> list[str]:
        return sorted(t for t in list(self._keys) if self._live(t))


_INDEX_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[2])
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or tonumber(old) < expires then redis.call('ZADD', KEYS[1], expires, ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class RedisIndex:
    """A sorted set per tenant under the tenant's hash tag, scored by expiry (ms, Redis time)."""

    def __init__(self, client: RedisClient, health: RedisHealth, prefix: str) -> None:
        self._r = client
        self._wire = redisconn.Wire.of(client)
        self._health = health
        self._prefix = prefix
        self._tenants = f"{prefix}:ci:tenants"
        self._add = client.register_script(_INDEX_ADD)

    def key(self, tenant: str) -> str:
        return f"{self._prefix}:ci:{{{tenant}}}"

    async def _run(self, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._health.run("cache", op)
        except RedisDown:
            raise CacheError("redis") from None

    async def add(self, tenant: str, key: str, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))

        async def op() -> None:
            replies = await self._wire.pipeline(
                [
                    redisconn.ScriptCall(self._add, [self.key(tenant)], [key, ttl_ms]),
                    ("SADD", self._tenants, tenant),
                    ("PEXPIRE", self._tenants, ttl_ms, "GT"),
                    ("PEXPIRE", self._tenants, ttl_ms, "NX"),
                ]
            )
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

        await self._run(op)

    async def keys(self, tenant: str) -> list[str]:
        async def op() -> list[bytes]:
            t = await self._r.time()
            now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
            found: list[Any] = await self._r.zrangebyscore(self.key(tenant), f"({now_ms}", "+inf")
            return [bytes(k) for k in found]

        return [k.decode() for k in await self._run(op)]

    async def remove(self, tenant: str, keys: Sequence[str]) -> None:
        if keys:
            await self._run(lambda: self._r.zrem(self.key(tenant), *keys))

    async def tenants(self) -> list[str]:
        members: set[bytes] = await self._run(lambda: self._r.smembers(self._tenants))
        return sorted(m.decode() for m in members)


# --- telling every replica --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Forget these cache keys; and stop these tenants' running calls from storing."""

    keys: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()

    def encode(self, ident: str) -> bytes:
        return orjson.dumps({"id": ident, "keys": self.keys, "tenants": self.tenants})


@dataclass(frozen=True, slots=True)
class Delivery:
    """How many replicas were subscribed when told, and how many confirmed in time."""

    told: int
    confirmed: int


Handler = Callable[[Invalidation], Awaitable[None]]


class Invalidator(Protocol):
    def listen(self, handler: Handler, on_health: Callable[[bool], None]) -> None:
        """Run ``handler`` for every invalidation; ``on_health(False)`` while deaf."""

    async def broadcast(self, inv: Invalidation) -> Delivery: ...

    async def close(self) -> None: ...


class LocalInvalidator:
    """One process: the handler runs right away."""

    def __init__(self) -> None:
        self._handler: Handler | None = None

    def listen(self, handler: Handler, on_health: Callable[[bool], None]) -> None:
        self._handler = handler

    async def broadcast(self, inv: Invalidation) -> Delivery:
        if self._handler is None:
            return Delivery(0, 0)
        await self._handler(inv)
        return Delivery(1, 1)

    async def close(self) -> None:
        return None


REGISTER_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return now
"""
_LOG = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return now
"""
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


class RedisInvalidator:
    """Pub/sub on ``{prefix}:inv``, acknowledged by every *registered* replica.

    Each listening replica registers itself in ``{prefix}:inv:replicas`` (a sorted set scored by
    the end of a short lease, renewed every second while it is subscribed) and serves local
    copies only until one second before its lease ends unless renewed. A deleter waits until
    every replica registered when it published has acknowledged — or has let its lease lapse,
    which means that replica stopped serving local copies. So once a deletion returns, no replica
    serves the deleted entry, even one cut off from Redis; and a replica that lost its
    subscription keeps serving hot images through a short Redis outage (up to the lease).

    Every invalidation is also kept for a while in ``{prefix}:inv:log`` (scored by Redis
    time): a replica that hears again while its lease still runs reads what it missed since
    its last renewal, applies and acknowledges it, and keeps its local copies — so hot images
    are served through a failover of the Redis node that carries the channel. One that could
    not catch up (or whose lease lapsed) starts empty.
    """

    def __init__(self, client: RedisClient, prefix: str, *, lease_s: float = 5.0) -> None:
        self._r = client
        self._channel = f"{prefix}:inv"
        self._ack_prefix = f"{prefix}:inv:ack:"
        self._replicas = f"{prefix}:inv:replicas"
        self._log = f"{prefix}:inv:log"
        self._lease_s = lease_s
        self.ident = uuid.uuid4().hex
        self._register = client.register_script(REGISTER_SCRIPT)
        self._live = client.register_script(_LIVE)
        self._record = client.register_script(_LOG)
        self._renewed_at: int | None = None  # Redis time (ms) of the last lease renewal
        self._tasks: list[asyncio.Task[None]] = []
        self._heard_until = 0.0  # monotonic: local copies may be served until then
        self._serving = False
        self.subscribed = asyncio.Event()

    def listen(self, handler: Handler, on_health: Callable[[bool], None]) -> None:
        self._set(on_health, False)  # deaf until subscribed and registered
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(handler, on_health), name="invalidation"),
            loop.create_task(self._heartbeat(on_health), name="invalidation-lease"),
        ]

    def _set(self, on_health: Callable[[bool], None], serving: bool) -> None:
        if serving != self._serving or not serving:
            self._serving = serving
            on_health(serving)

    async def _beat(self) -> None:
        sent = time.monotonic()
        async with asyncio.timeout(1.0):
            now = await self._register(keys=[self._replicas], args=[self.ident, int(self._lease_s * 1000)])
        self._heard_until = sent + self._lease_s - 1.0
        self._renewed_at = int(now)

    async def _catch_up(self, handler: Handler) -> bool:
        """Apply what was published while this replica was deaf; False if it cannot tell."""
        if self._renewed_at is None or time.monotonic() >= self._heard_until:
            return False  # never heard, or the lease lapsed: the tier is off and empty anyway
        for _ in range(3):  # read-only and idempotent: a pooled connection the outage broke may fail once
            try:
                async with asyncio.timeout(1.0):
                    # Since the last renewal, with a margin for a subscription that died unnoticed before it.
                    missed = await self._r.zrangebyscore(self._log, self._renewed_at - 2000, "+inf")
                for data in missed:
                    await self._apply(handler, data if isinstance(data, bytes) else str(data).encode())
            except (TimeoutError, OSError, RuntimeError, aioredis.RedisError):
                continue
            return True
        return False

    async def _listen(self, handler: Handler, on_health: Callable[[bool], None]) -> None:
        backoff, last_log = 0.1, -LOG_EVERY_S
        while True:
            subscription = redisconn.Subscription(self._r, [self._channel])
            try:
                await subscription.open(refresh=backoff > 0.1)
                if not await self._catch_up(handler):
                    self._set(on_health, False)  # deletions may have been missed while deaf: start empty
                self.subscribed.set()
                await self._beat()
                self._set(on_health, True)
                backoff = 0.1
                while True:
                    message = await subscription.get(1.0)
                    if message is not None:
                        await self._apply(handler, message[1])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis/network failure: deaf; the lease runs out by itself
                self.subscribed.clear()
                now = time.monotonic()
                if now - last_log >= LOG_EVERY_S:
                    last_log = now
                    log.warning(
                        "invalidation subscription lost (%s): local cache tier off within %.0f s unless it is back",
                        type(exc).__name__,
                        max(0.0, self._heard_until - now),
                    )
                await asyncio.sleep(backoff)
                # Soon again: hearing again within the lease keeps the local tier (see _catch_up).
                backoff = min(backoff * 2, 0.5)
            finally:
                await subscription.aclose()

    async def _heartbeat(self, on_health: Callable[[bool], None]) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._lease_s / 5))
            if self.subscribed.is_set():
                with contextlib.suppress(TimeoutError, OSError, aioredis.RedisError):
                    await self._beat()
            if time.monotonic() >= self._heard_until:
                self._set(on_health, False)
            elif self.subscribed.is_set() and not self._serving:
                self._set(on_health, True)

    async def _apply(self, handler: Handler, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            inv = Invalidation(tuple(map(str, msg["keys"])), tuple(map(str, msg["tenants"])))
            ident = str(msg["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("ignored a malformed invalidation message")
            return
        await handler(inv)
        ack = self._ack_prefix + ident
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.rpush(ack, self.ident)
            pipe.pexpire(ack, int(self._lease_s * 4000))
            await pipe.execute()

    async def broadcast(self, inv: Invalidation) -> Delivery:
        """Publish, then wait until every registered replica confirmed or let its lease lapse."""
        ident = uuid.uuid4().hex
        ack = self._ack_prefix + ident
        try:
            async with asyncio.timeout(self._lease_s):
                live = {m.decode() for m in await self._live(keys=[self._replicas])}
                message = inv.encode(ident)
                # Kept for replicas that are deaf right now (four leases: longer than any of them
                # can still be serving local copies without hearing).
                await self._record(keys=[self._log], args=[message, int(self._lease_s * 4000)])
                await redisconn.publish(self._r, self._channel, message)
        except (TimeoutError, OSError, aioredis.RedisError):
            raise CacheError("redis") from None
        confirmed: set[str] = set()
        pending = set(live)
        deadline = time.monotonic() + self._lease_s * 2 + 1
        with contextlib.suppress(TimeoutError, OSError, aioredis.RedisError):
            while pending and time.monotonic() < deadline:
                async with asyncio.timeout(2.0):
                    popped = await self._r.blpop([ack], timeout=0.5)
                if popped is not None:
                    value = popped[1]
                    who = value.decode() if isinstance(value, bytes) else str(value)
                    confirmed.add(who)
                    pending.discard(who)
                    continue
                # No answer for a while: a replica whose lease lapsed serves no local copies any more.
                async with asyncio.timeout(2.0):
                    pending &= {m.decode() for m in await self._live(keys=[self._replicas])}
        if pending or len(confirmed & live) < len(live):
            log.warning(
                "invalidation: %d of %d replica(s) confirmed; %d let their lease lapse, %d did not answer in time",
                len(confirmed & live),
                len(live),
                len(live - confirmed - pending),
                len(pending),
            )
        return Delivery(len(live), len(confirmed & live))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._r.zrem(self._replicas, self.ident)  # leave at once, not after the lease


# --- the deletion -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purged:
    """What a deletion found and how far it reached."""

    deleted: int
    delivery: Delivery


class Purger:
    """Deletes cached analyses everywhere: Redis (or memory), every replica's local tier, flights.

    Raises :class:`CacheError` when the cache cannot be reached (nothing can be promised then).
    """

    def __init__(self, cache: CacheBackend, index: CacheIndex, invalidator: Invalidator) -> None:
        self.cache = cache
        self.index = index
        self.invalidator = invalidator

    async def delete(self, keys: Sequence[str], *, owners: Sequence[str] = (), tenants: Sequence[str] = ()) -> Purged:
        """Delete ``keys`` (and forget them in ``owners``' indexes); ``tenants``' running calls
        must not store what they are computing either."""
        deleted = await self.cache.delete_many(keys)
        for owner in owners:
            await self.index.remove(owner, keys)
        delivery = await self.invalidator.broadcast(Invalidation(tuple(keys), tuple(tenants)))
        # A call that finished between the first delete and a replica's acknowledgement may
        # have stored again: those replicas no longer store, so this second pass is the last.
        deleted = max(deleted, await self.cache.delete_many(keys))
        return Purged(deleted, delivery)

    async def delete_analysis(
        self, cache_scope: str, tenant: str, sha256: str, *, actor: str, request_id: str | None = None
    ) -> Purged:
        """``tenant``'s cached analysis of one image (in its scope under ``cache_scope``)."""
        done = await self.delete([cache_key_of(cache_scope, tenant, sha256)], owners=[tenant])
        self._audit("cache.delete", done, actor, request_id, tenant=tenant, sha256=sha256, scope=cache_scope)
        return done

    async def purge_tenant(self, tenant: str, *, actor: str, request_id: str | None = None) -> Purged:
        """Everything ``tenant``'s calls stored (in ``shared`` scope: the entries it paid for)."""
        keys = await self.index.keys(tenant)
        done = await self.delete(keys, owners=[tenant], tenants=[tenant])
        self._audit("cache.purge_tenant", done, actor, request_id, tenant=tenant)
        return done

    async def purge_hash(
        self, sha256: str, known_tenants: Iterable[str], *, actor: str, request_id: str | None = None
    ) -> Purged:
        """One image, in every tenant's scope and the shared one."""
        tenants = sorted(set(known_tenants) | set(await self.index.tenants()))
        done = await self.delete(keys_of_hash(sha256, tenants), owners=tenants)
        self._audit("cache.purge_hash", done, actor, request_id, sha256=sha256, tenants_checked=len(tenants))
        return done

    @staticmethod
    def _audit(action: str, done: Purged, actor: str, request_id: str | None, **details: Any) -> None:
        audit(
            action,
            actor=actor,
            request_id=request_id,
            **details,
            deleted=done.deleted,
            replicas_told=done.delivery.told,
            replicas_confirmed=done.delivery.confirmed,
        )
