"""The runtime: everything a running facegate holds, built once at start and closed at stop.

:func:`lifespan` (the app's lifespan, installed by :func:`app.main.create_app`) chooses
the backends — Redis-backed when ``FACEGATE_REDIS_URL`` is set, in-memory otherwise —
opens one Redis pool and one httpx client, loads the tenants (and watches the file),
starts the sandbox simulator when no ailabapi key is configured, and publishes a
:class:`Runtime` on ``app.state.runtime``. Routes reach it through ``app.api.deps``;
nothing here knows about routes or HTTP rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from app import __version__, redisconn, tracing
from app.cache import CacheBackend, MemoryCache, RedisCache, TieredCache
from app.intake import IntakeLimits, UploadGate
from app.limits import Limiter, MemoryLimiter, RedisLimiter
from app.observability import Metrics
from app.purge import CacheIndex, Invalidator, LocalInvalidator, MemoryIndex, Purger, RedisIndex, RedisInvalidator
from app.service import AnalyzeService, HitReader, ServiceConfig
from app.settings import Settings
from app.singleflight import Coordinator, LocalCoordinator, RedisCoordinator
from app.tenants import Limits, Tenant, TenantRegistry, TenantsFileError, TenantStore, hash_key
from app.upstream.ailabapi import KeyedClients
from app.upstream.keys import KeysFileError, KeysStore, PoolSpec
from app.upstream.pool import Caller, Hooks, MemoryPool, PoolSettings, RedisPool
from app.upstream.pool.credits import CreditsWatcher, recheck_s
from app.upstream.pool.front import PoolFront
from app.upstream.resilience import CircuitBreaker, ResilientUpstream, RetryPolicy

log = logging.getLogger("facegate")


class StartupError(RuntimeError):
    """A configuration problem found while starting: one line for the operator."""


@dataclass
class Runtime:
    """Everything the lifespan built; routes reach it through ``app.state.runtime``."""

    settings: Settings
    tenants: TenantStore
    service: AnalyzeService
    metrics: Metrics
    intake: IntakeLimits
    uploads: UploadGate
    purger: Purger
    keys: KeysStore
    pool: PoolFront
    redis: redisconn.RedisClient | None = None

    async def refresh_pool_metrics(self) -> None:
        """The per-key gauges from the pool's shared state, right before a scrape."""
        try:
            async with asyncio.timeout(max(1.0, self.settings.redis_timeout_s * 2)):
                self.metrics.pool_view(await self.pool.snapshot())
        except Exception as exc:  # Redis down or slow: the scrape shows the last values
            log.debug("pool gauges not refreshed (%s)", type(exc).__name__)

    async def readiness(self) -> dict[str, str]:
        configured = self.settings.upstream_api_key or self.settings.upstream_keys_file or self.settings.sandbox
        checks = {
            "tenants": "ok" if len(self.tenants.registry) else "no tenants configured",
            "upstream_config": "ok" if configured else "no upstream key",
        }
        if self.redis is not None:
            try:
                async with asyncio.timeout(max(1.0, self.settings.redis_timeout_s * 4)):
                    await redisconn.ping(self.redis)  # on a Cluster: every primary
                checks["redis"] = "ok"
            except Exception as exc:  # any failure means "not ready", the type says which
                checks["redis"] = f"unreachable ({type(exc).__name__})"
        return checks


def sandbox_registry(demo_key: str) -> TenantRegistry:
    """The demo tenant of sandbox mode (answers are simulated, nothing is spent)."""
    limits = Limits(rate_per_s=10.0, burst=20, daily_quota=1000, monthly_quota=20000)
    return TenantRegistry({"demo": Tenant("demo", limits)}, {hash_key(demo_key): "demo"})


def load_tenants(
    settings: Settings, demo_key: str | None, on_reload: Callable[[bool], None] | None = None
) -> TenantStore:
    path = settings.tenants_file
    if demo_key is not None and settings.sandbox and not path.exists():
        return TenantStore(None, sandbox_registry(demo_key))
    try:
        return TenantStore(path, TenantRegistry.load(path), on_reload)
    except TenantsFileError as exc:
        raise StartupError(str(exc)) from None


def load_keys(settings: Settings, sandbox_key: str | None = None) -> KeysStore:
    """The key pool: the keys file, or FACEGATE_UPSTREAM_API_KEY as a pool of one (the simulator's in sandbox)."""
    qps, conc = settings.upstream_qps, settings.upstream_max_concurrency
    path = settings.upstream_keys_file
    if path is not None:
        try:
            spec = PoolSpec.load(path, default_qps=qps, default_concurrency=conc)
        except KeysFileError as exc:
            raise StartupError(str(exc)) from None
        return KeysStore(spec, path, default_qps=qps, default_concurrency=conc)
    secret = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else sandbox_key
    spec = PoolSpec.single(secret or "unset", qps=qps, max_concurrency=conc)
    return KeysStore(spec, None, default_qps=qps, default_concurrency=conc)


def pool_settings(settings: Settings) -> PoolSettings:
    return PoolSettings(
        lease_s=settings.upstream_lease_s,
        queue_max=settings.upstream_queue_max,
        queue_per_tenant=settings.upstream_queue_per_tenant,
        cooldown_s=settings.upstream_cooldown_s,
        recheck_s=recheck_s(settings.upstream_credits_poll_s),
    )


def pool_hooks(metrics: Metrics) -> Hooks:
    def waited(caller: Caller, seconds: float) -> None:
        metrics.queue_wait.labels(caller.tenant, caller.priority).observe(seconds)

    def refused(caller: Caller, reason: str) -> None:
        metrics.queue_refusals.labels(caller.tenant, reason).inc()

    return Hooks(waited=waited, refused=refused, depth=metrics.queue_depth.set)


async def backends(
    settings: Settings, metrics: Metrics, keys: KeysStore | None = None
) -> tuple[redisconn.RedisClient | None, CacheBackend, Limiter, Coordinator, PoolFront]:
    """Redis-backed when FACEGATE_REDIS_URL is set, in-memory otherwise — chosen once, here."""
    memory = MemoryCache(settings.cache_memory_max_bytes)
    keys = keys or load_keys(settings)

    def spec() -> PoolSpec:
        return keys.spec

    if not settings.redis_url:
        log.warning("FACEGATE_REDIS_URL is not set: in-memory cache and quotas (exact for ONE process only)")
        pool = MemoryPool(spec, pool_settings(settings), pool_hooks(metrics))
        return None, memory, MemoryLimiter(), LocalCoordinator(), pool
    client = redisconn.connect(settings)
    if not await redisconn.warm(client, min(settings.max_uploads_in_flight, 64)):
        log.warning("redis at start: not answering; continuing without it until it does (fail open)")

    def health() -> redisconn.RedisHealth:
        # One cool-down per component: a cache lookup that timed out under load must not switch
        # off the quotas (which fail closed) or the collapsing (which then pays for duplicates).
        return redisconn.RedisHealth(
            lambda component: metrics.redis_errors.labels(component).inc(),
            timeout_s=settings.redis_timeout_s,
            failures=3,
        )

    prefix = settings.redis_prefix
    coordinator = RedisCoordinator(client, health(), prefix, settings.singleflight_lock_ttl_s)
    coordinator.start()
    redis_pool = RedisPool(
        client, health(), prefix, spec=spec, settings=pool_settings(settings), hooks=pool_hooks(metrics)
    )
    redis_pool.start()
    # The local tier is small: it spares Redis round trips on hot images, Redis holds the rest.
    local = MemoryCache(min(settings.cache_memory_max_bytes, 16 * 1024 * 1024))
    cache = TieredCache(local, RedisCache(client, health(), prefix, on_error=metrics.cache_errors.inc))
    return client, cache, RedisLimiter(client, health(), prefix), coordinator, redis_pool


def hit_reader(client: redisconn.RedisClient | None, cache: CacheBackend, limiter: Limiter) -> HitReader | None:
    """A hit read from Redis admitted by the same script (one round trip): one Redis or
    Sentinel's master; not a Cluster, where the entry and the tenant's counters are on
    different slots (two round trips there)."""
    if client is None or redisconn.is_cluster(client) or not isinstance(limiter, RedisLimiter):
        return None
    if not isinstance(cache, TieredCache) or not isinstance(cache.shared, RedisCache):
        return None
    return HitReader(limiter, cache.shared.redis_key)


def purge_backends(client: redisconn.RedisClient | None, settings: Settings) -> tuple[CacheIndex, Invalidator]:
    """The cache index and the invalidation bus: in memory for one process, else in Redis."""
    if client is None:
        return MemoryIndex(), LocalInvalidator()
    health = redisconn.RedisHealth(timeout_s=settings.redis_timeout_s, failures=3)
    return RedisIndex(client, health, settings.redis_prefix), RedisInvalidator(
        client, settings.redis_prefix, lease_s=settings.invalidation_lease_s
    )


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    closers: list[Any] = []
    upstream_url = settings.upstream_url
    sandbox_key = "sandbox-" + uuid.uuid4().hex if settings.sandbox else None
    # The files first: a start that fails on them leaves nothing running (the simulator's socket).
    tenants = load_tenants(settings, app.state.demo_key, metrics.tenants_reloaded)
    keys = load_keys(settings, sandbox_key)
    if sandbox_key is not None:
        from app import sim

        handle = await sim.start_background("127.0.0.1", 0, sim.SimConfig(api_keys=[sandbox_key]))
        closers.append(handle.stop)
        upstream_url = handle.url
        log.warning("SANDBOX: no FACEGATE_UPSTREAM_API_KEY, answers come from the built-in simulator at %s", handle.url)
    redis_client, cache, limiter, coordinator, pool = await backends(settings, metrics, keys)
    index, invalidator = purge_backends(redis_client, settings)
    connections = max(settings.upstream_max_concurrency, sum(k.max_concurrency for k in keys.spec.keys))
    http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=connections * 2, max_keepalive_connections=connections),
        follow_redirects=False,
        # Proxy (and CA) variables only for an https upstream: through a CONNECT tunnel the key
        # stays end-to-end encrypted to the configured origin; a plain-http upstream (the
        # simulator, a loopback sidecar) must never route the key through a proxy in clear.
        trust_env=upstream_url.startswith("https://"),
    )
    breaker = CircuitBreaker(
        settings.breaker_failures,
        settings.breaker_reset_s,
        on_change=metrics.breaker_changed,
        probe_timeout_s=settings.upstream_timeout_s + settings.upstream_queue_timeout_s,
        rate_threshold=settings.breaker_failure_rate,
        rate_window_calls=settings.breaker_window,
    )

    clients = KeyedClients(
        http,
        lambda: {k.name: k.secret.reveal() for k in keys.spec.keys},
        base_url=upstream_url,
        connect_timeout_s=settings.upstream_connect_timeout_s,
        billed_error_codes=frozenset(settings.upstream_billed_error_codes),
    )

    async def read_balance(name: str) -> float | None:
        try:
            client = clients(name)
        except KeyError:
            return None
        return await client.query_credits(timeout_s=min(10.0, settings.upstream_timeout_s))

    credits = CreditsWatcher(pool, read_balance, every_s=settings.upstream_credits_poll_s, on_view=metrics.pool_view)
    upstream = ResilientUpstream(
        pool=pool,
        clients=clients,
        breaker=breaker,
        policy=RetryPolicy(settings.upstream_retries),
        timeout_s=settings.upstream_timeout_s,
        queue_timeout_s=settings.upstream_queue_timeout_s,
        on_attempt=metrics.upstream_attempt,
        on_key_call=lambda key, outcome: metrics.key_calls.labels(key, outcome).inc(),
        on_exhausted=credits.nudge,
    )
    service = AnalyzeService(
        config=ServiceConfig(
            cache_scope=settings.cache_scope,
            cache_ttl_s=settings.cache_ttl_s,
            negative_ttl_s=settings.cache_negative_ttl_s,
            lock_ttl_s=settings.singleflight_lock_ttl_s,
            follow_timeout_s=settings.upstream_timeout_s + settings.upstream_queue_timeout_s + 5,
            quota_fail_open=settings.quota_fail_mode == "open",
        ),
        cache=cache,
        limiter=limiter,
        upstream=upstream,
        coordinator=coordinator,
        on_spent=lambda tenant: metrics.credits.labels(tenant).inc(),
        index=index,
        hits=hit_reader(redis_client, cache, limiter),
    )

    def hearing(ok: bool) -> None:
        # A replica that cannot hear deletions must not serve local copies (see TieredCache).
        if isinstance(cache, TieredCache):
            cache.enable_local(ok)

    invalidator.listen(service.forget, hearing)
    rt = Runtime(
        settings=settings,
        tenants=tenants,
        service=service,
        metrics=metrics,
        intake=IntakeLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            spool_threshold=settings.spool_threshold_bytes,
            spool_dir=settings.spool_dir,
            body_timeout_s=settings.body_timeout_s,
        ),
        uploads=UploadGate(
            settings.max_uploads_in_flight, settings.max_uploads_per_tenant, on_change=metrics.uploads_in_flight.set
        ),
        purger=Purger(cache, index, invalidator),
        keys=keys,
        pool=pool,
        redis=redis_client,
    )
    app.state.runtime = rt
    watcher = asyncio.get_running_loop().create_task(_watch_tenants(tenants, keys, pool))
    # The first balances before the first request (bounded: a slow ailabapi must not hold up the start).
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await credits.tick()
    credits.start()
    _install_sighup(tenants, keys, pool)
    traced = tracing.configure(settings.otlp_endpoint or None)
    log.info(
        "facegate %s ready: %d tenant(s), upstream %s",
        __version__,
        len(tenants.registry),
        "simulator" if settings.sandbox else "ailabapi",
    )
    # What start-up built lives as long as the process: kept out of the garbage collector's way.
    # A full collection otherwise walks all of it, a pause of 50-90 ms in the middle of traffic
    # (measured on a miss-path load; bench/HISTORY.md); frozen, ~1 ms.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # (several apps in one process, as in tests: nothing stays frozen for good)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        # uvicorn already gave requests the grace period; flights left now lost their
        # requesters (cut off or disconnected): a short wait, then they are cancelled and refunded.
        await service.drain(min(settings.shutdown_grace_s, 5.0))
        await credits.close()
        await http.aclose()
        for close in (
            invalidator.close,
            coordinator.close,
            limiter.close,
            cache.close,
            pool.close,
            *reversed(closers),
        ):
            with contextlib.suppress(Exception):
                await close()
        if redis_client is not None:
            await redisconn.Wire.of(redis_client).aclose()
            await redis_client.aclose()
        if traced:
            tracing.shutdown()


async def _watch_tenants(store: TenantStore, keys: KeysStore, pool: PoolFront, every_s: float = 1.0) -> None:
    """Poll the tenants and keys files' stamps: cheap, and works on every filesystem and in ConfigMaps."""
    while True:
        await asyncio.sleep(every_s)
        store.reload()  # counted (ok or error) through the store's on_reload
        if keys.reload():
            await keys_reloaded(keys, pool)


async def keys_reloaded(keys: KeysStore, pool: PoolFront) -> None:
    """A changed keys file: keys disabled because ailabapi refused them get another chance."""
    try:
        await pool.keys_reloaded()
    except Exception as exc:  # Redis down: the keys still reload; disabled marks stay until the next change
        log.warning("keys file reloaded, but disabled keys could not be re-enabled (%s)", type(exc).__name__)


def _install_sighup(store: TenantStore, keys: KeysStore, pool: PoolFront) -> None:
    def reload() -> None:
        store.reload(force=True)
        if keys.reload(force=True):
            asyncio.get_running_loop().create_task(keys_reloaded(keys, pool))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
