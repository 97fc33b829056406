"""Request collapsing: N identical concurrent requests make one upstream call.

Two layers. In one process, the first request for a key starts a *flight* (a task
detached from any one HTTP request, so a disconnecting client does not cancel a call
that others wait for, or that was already paid for) and later requests await it.
Across replicas, the flight's leader takes a lease in a :class:`Coordinator` (a Redis
lock with an owner token, renewed while the call runs); the other replicas' flights
wait to be told the outcome, and take over if the lease expires because its holder
died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar

from app import redisconn
from app.cache import CacheError
from app.redisconn import LOG_EVERY_S, RedisDown, RedisHealth

log = logging.getLogger("facegate.singleflight")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a remote leader announced: the entry bytes, an error, or that it gave up."""

    kind: Literal["done", "error", "abandoned", "timeout"]
    payload: bytes = b""


class Lease(Protocol):
    key: str


class Coordinator(Protocol):
    """Cross-replica leadership for one key at a time."""

    async def acquire(self, key: str) -> Lease | None:
        """The lease if this replica now leads ``key``; None if another one does."""

    async def wait(self, key: str, timeout_s: float) -> Outcome:
        """Wait (without polling) for the current leader of ``key`` to finish."""

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        """Give the lease back and tell the waiting replicas how it ended."""

    async def close(self) -> None: ...


@dataclass(slots=True)
class _LocalLease:
    key: str


class LocalCoordinator:
    """One process: every flight leads (the in-process layer already collapses)."""

    async def acquire(self, key: str) -> Lease | None:
        return _LocalLease(key)

    async def wait(self, key: str, timeout_s: float) -> Outcome:
        return Outcome("abandoned")  # no other replica exists that could be leading it

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        return None

    async def close(self) -> None:
        return None


class Flights(Generic[T]):
    """In-process flights: by key (joinable), or anonymous (``Cache-Control: no-cache``)."""

    def __init__(self) -> None:
        self._by_key: dict[str, asyncio.Task[T]] = {}
        self._running: set[asyncio.Task[T]] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def start(self, key: str | None, work: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """Start a flight; with a ``key`` (the caller checked none is running) others may join it."""

        async def run() -> T:
            try:
                return await work()
            finally:
                if key is not None and self._by_key.get(key) is task:
                    del self._by_key[key]

        name = f"flight:{key[:12]}" if key is not None else "flight:anonymous"
        task = asyncio.get_running_loop().create_task(run(), name=name)
        # A flight nobody awaits any more must not log "exception never retrieved".
        task.add_done_callback(_consume)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        if key is not None:
            self._by_key[key] = task
        return task

    def get(self, key: str) -> asyncio.Task[T] | None:
        return self._by_key.get(key)

    def detach(self, key: str) -> None:
        """Let no new request join the flight of ``key`` (its answer was deleted meanwhile)."""
        self._by_key.pop(key, None)

    @property
    def running(self) -> int:
        """Flights not finished yet, keyed or not."""
        return len(self._running)

    async def drain(self, grace_s: float, settle_s: float = 5.0) -> int:
        """Graceful shutdown: let flights finish within ``grace_s`` (their calls may already be
        paid), then cancel the rest and give them ``settle_s`` to refund. Returns how many
        were cancelled."""
        tasks = list(self._running)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        leftovers = [task for task in tasks if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=settle_s)
        return len(leftovers)


def _consume(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


async def join(task: asyncio.Task[T], timeout_s: float) -> T:
    """Await a flight without being able to cancel it, for at most ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        return await asyncio.shield(task)


@contextlib.asynccontextmanager
async def renewing(renew: Callable[[], Awaitable[bool]], every_s: float):  # type: ignore[no-untyped-def]
    """Keep a lease alive while the body runs (a dead leader's lease then expires quickly)."""

    # The stop flag, not only cancel(): on Python 3.11 redis-py's writes go through
    # asyncio.wait_for, which loses a cancellation that lands as the write completes
    # (CPython gh-86296). A lost cancel used to leave this loop renewing forever, and the
    # flight (its reservation unsettled, its lease held) hanging with it.
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await stop.wait()
            if stop.is_set() or not await renew():
                return

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        # Not awaited: the flag ends the loop whatever a renewal in progress does (a renewal
        # after the release finds another token and changes nothing), and not waiting keeps
        # the body's next Redis writes in the same turn as those its end started (together()).
        stop.set()
        task.cancel()


_RELEASE = """
-- KEYS: 1 lease. ARGV: 1 owner token, 2 channel (same hash tag as the lease), 3 message,
--       4 'PUBLISH' or 'SPUBLISH' (Cluster: a script may notify only a channel of its own slot)
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call(ARGV[4], ARGV[2], ARGV[3])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_KINDS: dict[bytes, Literal["done", "error", "abandoned"]] = {b"D": "done", b"E": "error", b"A": "abandoned"}

#: Outcomes travel on this many channels; a key's lease and its channel share the hash tag
#: ``{sN}`` (N from the key), so on a Cluster both live on one slot and one node.
SHARDS: Final = 16


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) % SHARDS


@dataclass(slots=True)
class RedisLease:
    key: str
    token: str


class RedisCoordinator:
    """Leadership by ``SET NX PX`` with an owner token; outcomes by pub/sub.

    One subscription per process to :data:`SHARDS` fixed channels carries every outcome
    (the message names the key), dispatched to local waiters by key, so a thousand waiting
    requests hold no extra Redis connections and nobody polls. On a Redis Cluster the
    channels are sharded (``SSUBSCRIBE``/``SPUBLISH``; no pattern subscription exists there),
    elsewhere plain pub/sub. The lease is short and renewed by its holder: if the holder
    dies, the lease expires within ``lock_ttl_s`` and a waiting replica takes over. A
    waiter registers before checking that the lease still exists, so an outcome published
    in between is never missed for longer than that check.
    """

    def __init__(self, client: redisconn.RedisClient, health: RedisHealth, prefix: str, lock_ttl_s: float) -> None:
        self._r = client
        self._wire = redisconn.Wire.of(client)
        self._health = health
        self._prefix = prefix
        self._channels = [f"{prefix}:sfc:{{s{n}}}" for n in range(SHARDS)]
        self._publish = redisconn.publish_command(client)
        self._ttl_ms = max(100, int(lock_ttl_s * 1000))
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._waiters: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def lease_key(self, key: str) -> str:
        return f"{self._prefix}:sf:{{s{shard_of(key)}}}:{key}"

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="singleflight-listener")

    async def _listen(self) -> None:
        """Keep one subscription alive for the life of the process."""
        backoff = 0.1
        lost = False
        last_log = -LOG_EVERY_S
        while True:
            subscription = redisconn.Subscription(self._r, self._channels)
            try:
                await subscription.open(refresh=lost)
                self._subscribed.set()
                if lost:
                    log.info("single-flight subscription restored")
                    lost = False
                backoff = 0.1
                while True:
                    message = await subscription.get(1.0)
                    if message is not None:
                        self._dispatch(message[1])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis/network failure: resubscribe after a pause
                self._subscribed.clear()
                lost = True
                now = time.monotonic()
                if now - last_log >= LOG_EVERY_S:  # retried every <= 2 s: log like RedisHealth, not per retry
                    last_log = now
                    log.warning("single-flight subscription lost (%s); retrying", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                await subscription.aclose()

    def _dispatch(self, data: bytes) -> None:
        head, _, payload = bytes(data).partition(b"\n")
        key = head[1:].decode()
        outcome = Outcome(_KINDS.get(head[:1], "abandoned"), payload)
        for future in self._waiters.pop(key, []):
            if not future.done():
                future.set_result(outcome)

    async def acquire(self, key: str) -> Lease | None:
        token = uuid.uuid4().hex
        try:
            won = await self._health.run(
                "singleflight", lambda: self._wire.call("SET", self.lease_key(key), token, "NX", "PX", self._ttl_ms)
            )
        except RedisDown:
            raise CacheError("redis") from None
        return RedisLease(key, token) if won else None

    async def renew(self, lease: Lease) -> bool:
        assert isinstance(lease, RedisLease)
        try:
            kept = await self._health.run(
                "singleflight",
                lambda: self._wire.script(self._renew, [self.lease_key(lease.key)], [lease.token, self._ttl_ms]),
            )
        except RedisDown:
            return False
        return bool(kept)

    async def wait(self, key: str, timeout_s: float) -> Outcome:
        if not self._subscribed.is_set():
            raise CacheError("not subscribed")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            try:
                held = await self._health.run("singleflight", lambda: self._wire.call("EXISTS", self.lease_key(key)))
            except RedisDown:
                raise CacheError("redis") from None
            if not held:
                return Outcome("abandoned")
            try:
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError:
                return Outcome("timeout")
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[key]

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        assert isinstance(lease, RedisLease)
        kind = {"done": b"D", "error": b"E"}.get(outcome.kind, b"A")
        message = kind + lease.key.encode() + b"\n" + outcome.payload
        channel = self._channels[shard_of(lease.key)]
        try:
            await self._health.run(
                "singleflight",
                lambda: self._wire.script(
                    self._release, [self.lease_key(lease.key)], [lease.token, channel, message, self._publish]
                ),
            )
        except RedisDown:
            raise CacheError("redis") from None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
