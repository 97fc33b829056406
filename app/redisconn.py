"""The one Redis pool (one Redis, Sentinel's master, or a Cluster), and how facegate behaves when Redis misbehaves.

Every Redis-backed component runs its commands through :meth:`RedisHealth.run`: short
timeouts, errors counted and logged without flooding, and after a failure Redis is
skipped for a short cool-down so that a dead Redis costs each request microseconds, not
a timeout per command. It is retried by itself afterwards: nothing needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from app.redisurl import RedisTarget
from app.settings import Settings

log = logging.getLogger("facegate.redis")
T = TypeVar("T")

#: What :func:`connect` returns: one Redis (or Sentinel's master), or a Redis Cluster.
RedisClient = aioredis.Redis | RedisCluster

#: After a failure, how long Redis is not even tried.
COOLDOWN_S: Final = 1.0
#: At most one log line per component per this many seconds while Redis is failing.
LOG_EVERY_S: Final = 10.0


class RedisDown(Exception):
    """Redis could not be used for this operation (error, timeout, or cooling down)."""


def _no_retries() -> Retry:
    """redis-py's retry policy for facegate: none (see :func:`connect`)."""
    return Retry(NoBackoff(), 0)


def _options(settings: Settings) -> dict[str, Any]:
    """The connection options facegate sets itself, whatever the topology (see :func:`connect`)."""
    return {
        "retry": _no_retries(),
        "socket_timeout": None,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
        # Operations beyond this fail (and count as Redis errors): well above what
        # FACEGATE_MAX_UPLOADS_IN_FLIGHT requests can use at once. Per node on a cluster.
        "max_connections": 1024,
        "decode_responses": False,
        # No CLIENT SETINFO: it halves what opening a connection costs (see ``warm``).
        "driver_info": None,
    }


def connect(settings: Settings) -> RedisClient:
    """One pool for the process: to one Redis, to the master Sentinel names, or to a Cluster.

    Per-operation timeouts are applied by :meth:`RedisHealth.run`, not by redis-py's
    ``socket_timeout``: that one wraps socket writes in ``asyncio.wait_for``, which on
    Python 3.11 can swallow a cancellation that arrives as the write completes (CPython
    gh-86296) — a cancelled request would then hang on. ``asyncio.timeout`` around the
    whole operation has no such gap.

    No command is ever sent twice. redis-py (since 6) retries a command by default when
    the connection fails — also when it failed after the command reached Redis and only
    the reply was lost; for the quota scripts that runs a reservation or a refund twice
    (a double refund is an over-admission). So its retries are off on every client here
    (single, Sentinel's master and sentinels, Cluster): an unknown outcome surfaces as an
    error, and :class:`RedisHealth` and the component's policy decide.

    Sentinel (``redis+sentinel://``): each new connection asks the sentinels where the
    master is, and the client also follows the sentinels' announcements
    (:class:`SentinelRedis`): a failover that promotes a replica while the old master still
    answers (a stalled, not a dead, master) would otherwise leave the pooled connections
    writing to the old master until the sentinels demote it, and those writes are then
    thrown away. Nothing needs a restart.

    Cluster (``redis+cluster://``): the seed nodes tell the slot map; commands go to the
    slot's primary, MOVED/ASK and failovers refresh the map (redis-py retries a failed
    command after a refresh, within our per-operation timeout). Keys that one script or
    one atomic step touches share a hash tag, one per logical structure — a tenant's quota
    state ``{tenant}``, the upstream key pool ``{upstream}``, a single-flight shard ``{sN}``
    (lease keys and their notification channel) — so each runs on one slot. Anything new
    that needs atomicity over several keys (a fair queue, a key pool) takes its own tag.
    ``require_full_coverage=False``: while one shard fails over, the others keep working.
    """
    target = settings.redis_target
    if target.kind == "single":
        return aioredis.Redis.from_url(settings.redis_url, retry_on_timeout=False, **_options(settings))
    if target.kind == "sentinel":
        return _sentinel_master(settings, target)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    # ``retry`` (in _options) is the Cluster client's own: without it, a command whose
    # connection failed is sent again after a slot-map refresh, even when it had run.
    return _Cluster(startup_nodes=nodes, require_full_coverage=False, **_url_options(target), **_options(settings))


class _Cluster(RedisCluster):
    """redis-py's Cluster client, made to load the slot map before anything else a command does.

    redis-py 8.1 loads it lazily, inside the command's retry loop, after it has already chosen
    nodes for the command; commands sent at once on a client that has no map yet (a cold
    start, or the first ones after a failover marked it stale) then fail now and then with
    "Connection closed by server" or "Connection lost" (its retries used to hide that by
    sending them again). Loading the map first, under the client's lock, avoids it.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


async def ping(client: RedisClient) -> None:
    """PING the Redis (on a cluster: every primary, so a shard without one is "not ready")."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


def _url_options(target: RedisTarget) -> dict[str, Any]:
    """Credentials, db, TLS and the URL's query options, as redis-py reads them from a URL."""
    options: dict[str, Any] = dict(parse_url(target.options_url))
    for name in ("host", "port", "path"):
        options.pop(name, None)
    connection_class = options.pop("connection_class", None)
    if isinstance(connection_class, type) and issubclass(connection_class, SSLConnection):
        options["ssl"] = True
    return options


#: How long writes stay fenced after a sentinel starts promoting a replica, at most: until its
#: ``+switch-master`` (or an abort) normally, about a second later.
FENCE_MAX_S: Final = 5.0
#: How often the sentinels are asked where the master is, in case an announcement was missed.
SENTINEL_POLL_S: Final = 1.0


class _FollowingPool(SentinelConnectionPool):
    """Master connections that can be dropped at once when the sentinels announce a failover.

    ``epoch`` counts the drops: a command that was on the wire across one may have run on
    a master whose writes are being thrown away, so its outcome is unknown. Sentinels learn
    of a switch one after the other: for a while after ``+switch-master`` one of them may
    still name the old master, which is then not believed (``deposed``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.epoch = 0
        self.fenced_until = 0.0
        self.deposed: tuple[str, int] | None = None
        self.deposed_until = 0.0

    async def get_master_address(self) -> Any:
        now = time.monotonic()
        if now < self.fenced_until:
            raise MasterNotFoundError("a sentinel is promoting a replica")
        address = await self.sentinel_manager.discover_master(self.service_name)
        if now < self.deposed_until and (address[0], int(address[1])) == self.deposed:
            raise MasterNotFoundError("a sentinel still names the master that was just replaced")
        if self.master_address is None:
            self.master_address = address  # the first answer: there is no other master to leave
        elif self.master_address != address:
            await self.switch(address)
        return address

    async def switch(self, master: Any) -> None:
        """``master`` (None: not known yet) from now on: close the idle connections now and the busy
        ones when released (new ones ask the sentinels again)."""
        self.epoch += 1
        if master is not None:
            self.master_address = master
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.disconnect(inuse_connections=False)
        await self.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]


class SentinelRedis(aioredis.Redis):
    """The master's client: follows the sentinels, and closing it closes the sentinel connections.

    redis-py asks the sentinels only when it opens a connection. After a failover caused by
    a master that stalled (overloaded, paused, cut off from the sentinels) rather than died,
    the old master answers again, and the pooled connections keep writing to it until the
    sentinels demote it (about ten seconds) — and the demotion throws those writes away: for
    quotas, reservations that vanish, i.e. over-admission. So this client subscribes to every
    sentinel: when the elected sentinel starts promoting a replica
    (``+failover-state-send-slaveof-noone``) all connections are dropped and new ones wait
    (writes are refused: ``MasterNotFoundError``) until ``+switch-master`` names the new
    master, an abort, or :data:`FENCE_MAX_S`; a command that was in flight across the drop
    fails (its outcome is unknown) instead of reporting a write that may be lost. The
    sentinels are also asked every :data:`SENTINEL_POLL_S` in case an announcement was missed.
    """

    sentinels: Sentinel | None = None
    master_name: str = ""
    _follower: asyncio.Task[None] | None = None
    _closing = False

    @property
    def _pool(self) -> _FollowingPool:
        pool = self.connection_pool
        assert isinstance(pool, _FollowingPool)
        return pool

    async def initialize(self) -> SentinelRedis:
        if self._follower is None and self.sentinels is not None:
            self._follower = asyncio.get_running_loop().create_task(self._follow(), name="sentinel-follower")
        await super().initialize()
        return self

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        await self.initialize()
        epoch = self._pool.epoch
        result = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        if self._pool.epoch != epoch:
            raise RedisConnectionError("the master changed while the command ran: its outcome is unknown")
        return result

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        # Cancelling is not enough: the sentinels' clients have a socket timeout (a hung sentinel
        # must not stall discovery), so redis-py writes to them through asyncio.wait_for, which on
        # Python 3.11 loses a cancellation that lands as the write completes (CPython gh-86296).
        # The follower then polled on and this waited for it forever; with the flag it and its
        # listeners stop within a poll, before the sentinels' clients are closed below.
        self._closing = True
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(BaseException):
                await self._follower
            self._follower = None
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()

    async def _follow(self) -> None:
        assert self.sentinels is not None
        events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        listeners = [asyncio.create_task(_listen(s, events, self._running)) for s in self.sentinels.sentinels]
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(SENTINEL_POLL_S):
                        channel, data = await events.get()
                except TimeoutError:
                    await self._poll()
                    continue
                await self._on_event(channel, data.split())
        finally:
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)

    def _running(self) -> bool:
        return not self._closing

    async def _on_event(self, channel: str, words: list[str]) -> None:
        pool = self._pool
        if channel == "+switch-master":  # <name> <old ip> <old port> <new ip> <new port>
            if len(words) == 5 and words[0] == self.master_name:
                pool.fenced_until = 0.0
                pool.deposed, pool.deposed_until = (words[1], int(words[2])), time.monotonic() + FENCE_MAX_S
                new = (words[3], int(words[4]))
                if pool.master_address != new:
                    log.warning("redis sentinel: %s switched to a new master", self.master_name)
                    await pool.switch(new)
            return
        # "<type> <name> <ip> <port> [@ <master name> <ip> <port>]"
        master = words[words.index("@") + 1] if "@" in words else (words[1] if len(words) > 1 else "")
        if master != self.master_name:
            return
        if channel == "+failover-state-send-slaveof-noone":
            pool.fenced_until = time.monotonic() + FENCE_MAX_S
            log.warning("redis sentinel: promoting a replica of %s; writes wait for the new master", master)
            await pool.switch(None)
        elif channel.startswith("-failover-abort"):
            pool.fenced_until = 0.0

    async def _poll(self) -> None:
        pool = self._pool
        if pool.master_address is None:
            return
        previous = pool.master_address
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(SENTINEL_POLL_S):
                await pool.get_master_address()  # switches if the sentinels name another master
        if pool.master_address != previous:
            log.warning("redis sentinel: %s has a new master", self.master_name)


async def _listen(
    sentinel: aioredis.Redis, events: asyncio.Queue[tuple[str, str]], running: Callable[[], bool]
) -> None:
    """Feed one sentinel's failover announcements into ``events``; reconnect after any failure.
    Stops when cancelled, or within a second once ``running()`` is false (a lost cancellation)."""
    while running():
        pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe("+switch-master")
            await pubsub.psubscribe("*failover*")
            while running():
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") in ("message", "pmessage"):
                    events.put_nowait((_text(message["channel"]), _text(message["data"])))
        except (RedisError, OSError, TimeoutError):
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _epoch(client: RedisClient) -> int:
    """How often Sentinel's master connections were dropped (0 for other topologies)."""
    pool = getattr(client, "connection_pool", None)
    return pool.epoch if isinstance(pool, _FollowingPool) else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sentinel_master(settings: Settings, target: RedisTarget) -> aioredis.Redis:
    url_options = _url_options(target)
    sentinel_options: dict[str, Any] = {
        # A sentinel that hangs must not stall discovery: the next one is asked instead.
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "decode_responses": False,
        "driver_info": None,
        # A sentinel that is down is skipped at once, not retried with backoff first.
        "retry": _no_retries(),
    }
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.get_secret_value()
    if url_options.get("ssl"):
        # rediss+sentinel://: the sentinels speak TLS too, with the same CA and client certificate.
        sentinel_options.update({k: v for k, v in url_options.items() if k.startswith("ssl")})
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    options = {**url_options, **_options(settings)}
    client = sentinel.master_for(
        target.master, redis_class=SentinelRedis, connection_pool_class=_FollowingPool, **options
    )
    assert isinstance(client, SentinelRedis)
    client.sentinels = sentinel
    client.master_name = target.master
    return client


async def warm(client: RedisClient, connections: int) -> bool:
    """Open ``connections`` pooled connections now; False if Redis did not answer (not an error).

    A burst of first requests on a cold pool opens one connection each, all at once; on a
    busy CPU that handshake burst outlasts the short per-operation timeout, and every
    request of the burst then fails open: cache skipped, collapsing skipped (so duplicate
    paid calls), quotas refused. Connections opened at start are kept by the pool.
    """

    async def one() -> None:
        async with asyncio.timeout(2.0):
            await ping(client)  # on a cluster: one connection to each primary

    results = await asyncio.gather(*(one() for _ in range(connections)), return_exceptions=True)
    return not any(isinstance(r, BaseException) for r in results)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One EVALSHA of a registered script, as a command of :meth:`Wire.pipeline`."""

    script: Any  # redis-py's AsyncScript (register_script)
    keys: Sequence[Any]
    args: Sequence[Any]


#: A command of :meth:`Wire.pipeline`: the words of a Redis command, or a script call.
Command = tuple[Any, ...] | ScriptCall

#: Set by :func:`together`: commands issued meanwhile, by any task, are sent together.
_TOGETHER: contextvars.ContextVar[bool] = contextvars.ContextVar("facegate_redis_together", default=False)
#: How many turns of the event loop a batch of :func:`together` may wait for more commands.
_FLUSH_TURNS: Final = 3
#: Connections a wire keeps between commands (more in use at once go back to the pool after).
_KEEP_IDLE: Final = 64


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Redis commands issued inside — also by tasks started inside (``asyncio.gather``) — while
    the event loop keeps adding to them (turn after turn, at most ``_FLUSH_TURNS``) go to Redis
    as one write on one connection: one round trip for writes that do not depend on each other
    (settle, store, release), and one write for concurrent requests' commands. No effect on a
    Cluster (its commands go to several nodes) or without Redis."""
    token = _TOGETHER.set(True)
    try:
        yield
    finally:
        _TOGETHER.reset(token)


class Wire:
    """The commands of the request path, without redis-py's per-command machinery.

    redis-py runs each command through a retry wrapper, observability hooks, the pool's lock
    and its events — about a tenth of a cache hit's CPU in Redis mode, more than the command's
    own work (issue 16, bench/HISTORY.md). A wire sends packed commands on connections it
    checked out of the client's pool once and keeps (the pool still owns them: closing the
    client closes them), reads the replies, and returns the connection to its idle list.

    - :meth:`call` and :meth:`script` (``EVALSHA``; a script Redis does not know yet is loaded
      by redis-py's own script object, once) send one command, :meth:`pipeline` several in one
      write; replies come back raw (no response callbacks: ``SET`` answers ``b"OK"``).
    - Inside :func:`together`, commands of concurrent tasks go out together (one round trip).
    - A connection is checked before each use (one Redis closed, or with unread data, is
      reopened: :func:`_fresh`); one that failed is closed (it reconnects when next used).
      A failed command is never sent again (no retries anywhere, see :func:`connect`): its
      outcome is unknown, and the caller's policy decides.
    - Sentinel (:class:`SentinelRedis`): a kept connection the pool marked when the master
      changed is reopened (to the new master) before use, and a command that was on the wire
      across a change fails, as with the client's own commands.

    On a Redis Cluster a wire is only a front for the client's own methods (each command goes to
    its slot's node, a pipeline's one after the other; no batching): the saving is for one Redis
    and Sentinel's master.
    """

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._ready = False
        self._idle: list[Any] = []
        self._pending: list[tuple[Command, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    @classmethod
    def of(cls, client: RedisClient) -> Wire:
        """The client's wire (one per client, made on first use)."""
        wire: Wire | None = getattr(client, "_facegate_wire", None)
        if wire is None:
            wire = cls(client)
            client._facegate_wire = wire  # type: ignore[union-attr]
        return wire

    async def call(self, *args: Any) -> Any:
        return (await self.pipeline([args]))[0]

    async def script(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return (await self.pipeline([ScriptCall(script, keys, args)]))[0]

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """The replies of ``commands``, in order. An error reply (a ``ResponseError``) is raised when
        it is the only command, else returned in its place; a failed connection raises."""
        if self._cluster:  # one after the other, in order, each to its slot's node
            replies = []
            for command in commands:
                try:
                    replies.append(await self._cluster_one(command))
                except ResponseError as exc:
                    replies.append(exc)
        elif _TOGETHER.get():
            loop = asyncio.get_running_loop()
            futures = []
            for command in commands:
                future: asyncio.Future[Any] = loop.create_future()
                if not self._pending:
                    loop.call_soon(self._flush, 0, 0)
                self._pending.append((command, future))
                futures.append(future)
            replies = list(await asyncio.gather(*futures, return_exceptions=True))
        else:
            replies = await self._exchange(commands)
        for i, reply in enumerate(replies):
            command = commands[i]
            if isinstance(reply, NoScriptError) and isinstance(command, ScriptCall):
                try:  # redis-py's script object loads the script and runs it
                    replies[i] = await command.script(keys=list(command.keys), args=list(command.args))
                except ResponseError as exc:
                    replies[i] = exc
        for reply in replies:
            if isinstance(reply, BaseException) and (len(replies) == 1 or not isinstance(reply, ResponseError)):
                raise reply
        return replies

    async def _cluster_one(self, command: Command) -> Any:
        if isinstance(command, ScriptCall):
            return await command.script(keys=list(command.keys), args=list(command.args))
        return await self._client.execute_command(*command)

    def _flush(self, seen: int, turns: int) -> None:
        """Send what is pending once a turn of the event loop added nothing more (at most
        ``_FLUSH_TURNS`` turns late): tasks that a gather started in the turn that issued the
        first command — a store and its index line beside a settle — issue theirs a turn later."""
        if len(self._pending) != seen and turns < _FLUSH_TURNS:
            asyncio.get_running_loop().call_soon(self._flush, len(self._pending), turns + 1)
            return
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send_pending(pending))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_pending(self, pending: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        try:
            replies: list[Any] = await self._exchange([command for command, _ in pending])
        except BaseException as exc:
            replies = [exc] * len(pending)
        for (_, future), reply in zip(pending, replies, strict=True):
            if future.done():  # its caller gave up (timeout, cancelled)
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply if not isinstance(reply, asyncio.CancelledError) else ConnectionError())
            else:
                future.set_result(reply)

    async def _exchange(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write and read their replies (error replies in place)."""
        if not self._ready:
            await self._client.initialize()  # SentinelRedis starts following the sentinels here
            self._ready = True
        assert isinstance(self._client, aioredis.Redis)  # a Cluster's commands never come here
        pool = self._client.connection_pool
        conn = self._idle.pop() if self._idle else await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await _fresh(conn)
            epoch = getattr(pool, "epoch", None)
            replies = await self._on(conn, commands)
            if getattr(pool, "epoch", None) != epoch:  # as SentinelRedis.execute_command
                raise RedisConnectionError("the master changed while the command ran: its outcome is unknown")
            return replies
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            if len(self._idle) < _KEEP_IDLE:
                self._idle.append(conn)
            else:
                await pool.release(conn)

    @staticmethod
    async def _on(conn: Any, commands: Sequence[Command]) -> list[Any]:
        packed = conn.pack_commands(
            [
                ("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args) if isinstance(c, ScriptCall) else c
                for c in commands
            ]
        )
        await conn.send_packed_command(packed)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # the reply was read whole: the connection is in step
                replies.append(exc)
        return replies

    async def aclose(self) -> None:
        """Give the kept connections back to the pool (the client's own close closes them)."""
        for task in list(self._sending):
            task.cancel()
        idle, self._idle = self._idle, []
        if isinstance(self._client, aioredis.Redis):
            for conn in idle:
                await self._client.connection_pool.release(conn)


async def _fresh(conn: Any) -> None:
    """Reopen a connection that must not be used as it is: one the pool was told to drop (a failover),
    one Redis closed (a restart: the socket is at its end) or one with unread data. redis-py's pool
    checks the last two only when its maintenance notifications are off
    (they are on by default in redis-py 8), so a connection that sat in the pool across a Redis
    restart would fail its first command."""
    if conn.should_reconnect():
        await conn.disconnect()
    elif conn.is_connected:
        try:
            stale = await conn.can_read()
        except (RedisConnectionError, OSError):
            stale = True
        if stale:
            await conn.disconnect()
    if not conn.is_connected:
        # The connection's own connect(): Sentinel's asks the sentinels where the master is now.
        # (Sending on a closed connection would reopen it to the address it had: the old master.)
        await conn.connect()


class RedisHealth:
    """Failure accounting for one component (cache, quota, single-flight, guard).

    ``timeout_s`` bounds each operation; ``failures`` consecutive failures start the
    cool-down. More than one, because under a CPU burst a single operation can outlast a
    short timeout while Redis is fine: one slow lookup must not switch Redis off for a
    second (for quotas that would mean refusing billable calls). A refused connection
    fails at once, so a dead Redis still reaches the threshold in microseconds.
    """

    def __init__(
        self,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout_s: float | None = None,
        failures: int = 1,
    ) -> None:
        self._down_until = 0.0
        self._last_log: dict[str, float] = {}
        self._on_error = on_error
        self._clock = clock
        self._timeout_s = timeout_s
        self._threshold = failures
        self._consecutive = 0

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    async def run(self, component: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; any Redis or network failure becomes :class:`RedisDown`."""
        if not self.available:
            raise RedisDown(component)
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await op()
        except NoScriptError:
            raise
        # RedisClusterException is not a RedisError: redis-py raises it when no node serves a
        # slot during a cluster failover (SlotNotCoveredError) or cannot map a command.
        # RuntimeError: uvloop refuses a write on a connection redis-py has just closed (its Cluster
        # client closes connections during a failover) — "unable to perform operation on
        # <TCPTransport closed=True>"; asyncio's own loop would report it as a lost connection.
        except (RedisError, RedisClusterException, OSError, TimeoutError, RuntimeError) as exc:
            self._failed(component, exc)
            raise RedisDown(component) from None
        self._consecutive = 0
        return result

    def _failed(self, component: str, exc: BaseException) -> None:
        now = self._clock()
        self._consecutive += 1
        if self._consecutive >= self._threshold:
            self._down_until = now + COOLDOWN_S
        if self._on_error is not None:
            self._on_error(component)
        if now - self._last_log.get(component, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[component] = now
            # What happens next is the component's policy (the cache skips, quotas follow
            # FACEGATE_QUOTA_FAIL_MODE), so the line states only the fact.
            log.warning("redis unavailable for %s (%s); retrying in %.0f s", component, type(exc).__name__, COOLDOWN_S)


class Subscription:
    """The messages of a fixed set of channels: plain pub/sub, or sharded pub/sub on a Cluster.

    On a Cluster, classic ``PUBLISH`` is broadcast to every node (and counts only one
    node's subscribers); sharded channels live on the node that serves their slot:
    ``SPUBLISH`` reaches that node's subscribers and returns their number, and a Lua script
    may ``SPUBLISH`` to a channel of its own slot. There is no pattern form. redis-py's
    ``ClusterPubSub`` holds one connection per node, but its ``get_sharded_message`` waits
    out each node's timeout in turn (a second of latency), so one reader per node feeds a
    queue here. Any failure (a node lost, a slot moved) comes out of :meth:`get` as the
    exception: the owner closes this subscription and opens a new one (``refresh=True``
    re-reads the slot map first, which pub/sub errors alone do not trigger).
    """

    def __init__(self, client: RedisClient, channels: list[str]) -> None:
        self._client = client
        self._channels = channels
        self._pubsub: Any = None
        self._epoch = 0
        self._queue: asyncio.Queue[tuple[bytes, bytes] | BaseException] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    async def open(self, *, refresh: bool = False) -> None:
        client = self._client
        if not isinstance(client, RedisCluster):
            self._epoch = _epoch(client)
            self._pubsub = client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(*self._channels)
            return
        if refresh:
            await client.nodes_manager.initialize()
        else:
            await client.initialize()
        self._pubsub = pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.ssubscribe(*self._channels)
        names = frozenset(pubsub.node_pubsub_mapping)
        for name in names:
            node = client.get_node(node_name=name)
            self._readers.append(asyncio.get_running_loop().create_task(self._read(pubsub, node, names)))

    async def _read(self, pubsub: Any, node: Any, names: frozenset[str]) -> None:
        try:
            while True:
                message = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=1.0, target_node=node
                )
                if message is not None and message.get("type") in ("smessage", b"smessage"):
                    self._queue.put_nowait((message["channel"], message["data"]))
                if frozenset(pubsub.node_pubsub_mapping) != names:
                    raise RedisConnectionError("shard channels moved to other nodes")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def get(self, wait_s: float) -> tuple[bytes, bytes] | None:
        """The next (channel, data), or None after ``wait_s`` seconds without one."""
        if self._pubsub is None:
            raise RedisConnectionError("not subscribed")
        if not isinstance(self._client, RedisCluster):
            if _epoch(self._client) != self._epoch:  # subscribed on a master Sentinel has replaced
                raise RedisConnectionError("the master changed")
            message = await self._pubsub.get_message(timeout=wait_s)
            if message is not None and message.get("type") == "message":
                return message["channel"], message["data"]
            return None
        try:
            async with asyncio.timeout(wait_s):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task
        self._readers.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None


async def publish(client: RedisClient, channel: str, message: bytes) -> int:
    """PUBLISH (SPUBLISH on a Cluster) to a :class:`Subscription`'s channel; how many heard it."""
    if isinstance(client, RedisCluster):
        return int(await client.spublish(channel, message))
    return int(await client.publish(channel, message))


def publish_command(client: RedisClient) -> str:
    """The command a Lua script uses to notify a :class:`Subscription` (the channel in its slot)."""
    return "SPUBLISH" if isinstance(client, RedisCluster) else "PUBLISH"
