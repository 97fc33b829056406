"""The one Redis pool, and how facegate behaves when Redis misbehaves.

Every Redis-backed component runs its commands through :meth:`RedisHealth.run`: short
timeouts, errors counted and logged without flooding, and after a failure Redis is
skipped for a short cool-down so that a dead Redis costs each request microseconds, not
a timeout per command. It is retried by itself afterwards: nothing needs a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from app.settings import Settings

log = logging.getLogger("facegate.redis")
T = TypeVar("T")

#: After a failure, how long Redis is not even tried.
COOLDOWN_S: Final = 1.0
#: At most one log line per component per this many seconds while Redis is failing.
LOG_EVERY_S: Final = 10.0


class RedisDown(Exception):
    """Redis could not be used for this operation (error, timeout, or cooling down)."""


def connect(settings: Settings) -> aioredis.Redis:
    """One pool for the process. Per-operation timeouts are applied by :meth:`RedisHealth.run`.

    Not by redis-py's ``socket_timeout``: that one wraps socket writes in ``asyncio.wait_for``,
    which on Python 3.11 can swallow a cancellation that arrives as the write completes
    (CPython gh-86296) — a cancelled request would then hang on. ``asyncio.timeout`` around
    the whole operation has no such gap.
    """
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=None,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        # Operations beyond this fail (and count as Redis errors): well above what
        # FACEGATE_MAX_UPLOADS_IN_FLIGHT requests can use at once.
        max_connections=1024,
        retry_on_timeout=False,
        decode_responses=False,
        # No CLIENT SETINFO: it halves what opening a connection costs (see ``warm``).
        driver_info=None,
    )


async def warm(client: aioredis.Redis, connections: int) -> bool:
    """Open ``connections`` pooled connections now; False if Redis did not answer (not an error).

    A burst of first requests on a cold pool opens one connection each, all at once; on a
    busy CPU that handshake burst outlasts the short per-operation timeout, and every
    request of the burst then fails open: cache skipped, collapsing skipped (so duplicate
    paid calls), quotas refused. Connections opened at start are kept by the pool.
    """

    async def ping() -> None:
        async with asyncio.timeout(2.0):
            await client.ping()

    results = await asyncio.gather(*(ping() for _ in range(connections)), return_exceptions=True)
    return not any(isinstance(r, BaseException) for r in results)


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
        except (RedisError, OSError, TimeoutError) as exc:
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
