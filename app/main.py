"""The application factory and its lifespan: where backends are chosen, once.

``create_app(settings)`` returns a FastAPI app whose lifespan opens one Redis pool and
one httpx client, loads the tenants, starts the sandbox simulator when no ailabapi key
is configured, and closes everything on shutdown after in-flight calls finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, redisconn
from app.api import compat, ops, try_page, v1
from app.api.common import json_response
from app.api.headers import context_headers
from app.cache import CacheBackend, MemoryCache, RedisCache, TieredCache
from app.context import RequestContext
from app.errors import Problem
from app.images import IntakeLimits, UploadGate
from app.observability import Metrics
from app.quota import Limiter, MemoryLimiter, RedisLimiter
from app.service import AnalyzeService, ServiceConfig
from app.settings import Settings
from app.singleflight import Coordinator, LocalCoordinator, RedisCoordinator
from app.tenants import Limits, Tenant, TenantRegistry, TenantsFileError, TenantStore, hash_key
from app.upstream import contract
from app.upstream.ailabapi import AilabapiClient
from app.upstream.guard import Guard, LocalGuard, RedisGuard
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
    redis: aioredis.Redis | None = None

    async def readiness(self) -> dict[str, str]:
        checks = {
            "tenants": "ok" if len(self.tenants.registry) else "no tenants configured",
            "upstream_config": "ok" if self.settings.upstream_api_key or self.settings.sandbox else "no upstream key",
        }
        if self.redis is not None:
            try:
                async with asyncio.timeout(max(1.0, self.settings.redis_timeout_s * 4)):
                    await self.redis.ping()
                checks["redis"] = "ok"
            except Exception as exc:  # any failure means "not ready", the type says which
                checks["redis"] = f"unreachable ({type(exc).__name__})"
        return checks


def sandbox_registry(demo_key: str) -> TenantRegistry:
    """The demo tenant of sandbox mode (answers are simulated, nothing is spent)."""
    limits = Limits(rate_per_s=10.0, burst=20, daily_quota=1000, monthly_quota=20000)
    return TenantRegistry({"demo": Tenant("demo", limits)}, {hash_key(demo_key): "demo"})


def load_tenants(settings: Settings, demo_key: str | None) -> TenantStore:
    path = settings.tenants_file
    if demo_key is not None and settings.sandbox and not path.exists():
        return TenantStore(None, sandbox_registry(demo_key))
    try:
        return TenantStore(path, TenantRegistry.load(path))
    except TenantsFileError as exc:
        raise StartupError(str(exc)) from None


async def _backends(
    settings: Settings, metrics: Metrics
) -> tuple[aioredis.Redis | None, CacheBackend, Limiter, Coordinator, Guard]:
    """Redis-backed when FACEGATE_REDIS_URL is set, in-memory otherwise — chosen once, here."""
    memory = MemoryCache(settings.cache_memory_max_bytes)
    local_guard = LocalGuard(settings.upstream_qps, settings.upstream_max_concurrency)
    if not settings.redis_url:
        log.warning("FACEGATE_REDIS_URL is not set: in-memory cache and quotas (exact for ONE process only)")
        return None, memory, MemoryLimiter(), LocalCoordinator(), local_guard
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
    guard = RedisGuard(
        client,
        health(),
        prefix,
        qps=settings.upstream_qps,
        max_concurrency=settings.upstream_max_concurrency,
        lease_s=settings.upstream_timeout_s + 5,
    )
    # The local tier is small: it spares Redis round trips on hot images, Redis holds the rest.
    local = MemoryCache(min(settings.cache_memory_max_bytes, 16 * 1024 * 1024))
    cache = TieredCache(local, RedisCache(client, health(), prefix, on_error=metrics.cache_errors.inc))
    return client, cache, RedisLimiter(client, health(), prefix), coordinator, guard


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    closers: list[Any] = []
    upstream_url = settings.upstream_url
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    if api_key is None:
        from app import sim

        sim_key = "sandbox-" + uuid.uuid4().hex
        handle = await sim.start_background("127.0.0.1", 0, sim.SimConfig(api_keys=[sim_key]))
        closers.append(handle.stop)
        upstream_url, api_key = handle.url, sim_key
        log.warning("SANDBOX: no FACEGATE_UPSTREAM_API_KEY, answers come from the built-in simulator at %s", handle.url)
    tenants = load_tenants(settings, app.state.demo_key)
    redis_client, cache, limiter, coordinator, guard = await _backends(settings, metrics)
    http = httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=settings.upstream_max_concurrency * 2,
            max_keepalive_connections=settings.upstream_max_concurrency,
        ),
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

    def on_attempt(outcome: str, seconds: float) -> None:
        metrics.upstream_calls.labels(outcome).inc()
        metrics.upstream_seconds.observe(seconds)

    upstream = ResilientUpstream(
        AilabapiClient(
            http,
            base_url=upstream_url,
            api_key=api_key,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            billed_error_codes=frozenset(settings.upstream_billed_error_codes),
        ),
        guard=guard,
        breaker=breaker,
        policy=RetryPolicy(settings.upstream_retries),
        timeout_s=settings.upstream_timeout_s,
        queue_timeout_s=settings.upstream_queue_timeout_s,
        on_attempt=on_attempt,
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
    )
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
        uploads=UploadGate(settings.max_uploads_in_flight, metrics.uploads_in_flight.set),
        redis=redis_client,
    )
    app.state.runtime = rt
    watcher = asyncio.get_running_loop().create_task(_watch_tenants(tenants, metrics))
    _install_sighup(tenants, metrics)
    log.info(
        "facegate %s ready: %d tenant(s), upstream %s",
        __version__,
        len(tenants.registry),
        "simulator" if settings.sandbox else "ailabapi",
    )
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        # uvicorn already gave requests the grace period; flights left now lost their
        # requesters (cut off or disconnected): a short wait, then they are cancelled and refunded.
        await service.drain(min(settings.shutdown_grace_s, 5.0))
        await http.aclose()
        for close in (coordinator.close, limiter.close, cache.close, guard.close, *reversed(closers)):
            with contextlib.suppress(Exception):
                await close()
        if redis_client is not None:
            await redis_client.aclose()


async def _watch_tenants(store: TenantStore, metrics: Metrics, every_s: float = 1.0) -> None:
    """Poll the tenants file's stamp: cheap, and works on every filesystem and in ConfigMaps."""
    while True:
        await asyncio.sleep(every_s)
        if store.reload():
            metrics.tenant_reloads.labels("ok").inc()


def _install_sighup(store: TenantStore, metrics: Metrics) -> None:
    def reload() -> None:
        if store.reload(force=True):
            metrics.tenant_reloads.labels("ok").inc()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


# --- the edge: request ids, headers, problems, one log line per request -----------------

_SANE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
access_log = logging.getLogger("facegate.access")


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID when it is sane (1-128 safe characters), else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            try:
                text: str = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if 0 < len(text) <= 128 and set(text) <= _SANE_ID:
                return text
            break
    return secrets.token_hex(16)  # 128 random bits, like a UUID4, without building the UUID


class EdgeMiddleware:
    """Outermost layer: a request context, common headers, one log line, metrics, and a
    last-resort 500 that never carries a traceback."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        ctx = RequestContext(request_id=request_id_from(scope))
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *context_headers(ctx)]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # The client hung up mid-upload: nobody to answer and nothing broke here (nginx's 499).
            status = 499
            ctx.outcome = "client_disconnected"
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when the shutdown grace period ends: tell the
            # client to retry (another replica will answer) instead of dropping the connection.
            if response_started:
                raise
            problem = Problem("overloaded", "facegate is shutting down; try again", retry_after=1)
            await _send_problem(send_wrapper, problem, ctx, compat=_is_compat(scope))
        except Exception as exc:
            log.error(
                "unhandled error: %s", type(exc).__name__, extra={"request_id": ctx.request_id, "where": _where(exc)}
            )
            if not response_started:
                problem = Problem("internal_error", "facegate failed unexpectedly; the request id helps find out why")
                await _send_problem(send_wrapper, problem, ctx, compat=_is_compat(scope))
        finally:
            self._account(scope, ctx, status, time.perf_counter() - started)

    def _account(self, scope: Scope, ctx: RequestContext, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        cache = ctx.cache.label if ctx.cache else None
        self.metrics.request_done(
            route, scope["method"], status, ctx.tenant or "-", seconds=seconds, cache=cache, outcome=ctx.outcome
        )
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            "%s %s %d",
            scope["method"],
            route,
            status,
            extra={
                "request_id": ctx.request_id,
                "tenant": ctx.tenant,
                "route": route,
                "method": scope["method"],
                "status": status,
                "code": ctx.outcome,
                "cache": cache,
                "upstream_ms": round(ctx.upstream_s * 1000, 1) if ctx.upstream_s is not None else None,
                "upstream_attempts": ctx.upstream_attempts or None,
                "bytes": ctx.image_bytes,
                "duration_ms": round(seconds * 1000, 1),
            },
        )


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame — enough to find a bug, with no locals or messages."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"


def _is_compat(scope: Scope) -> bool:
    return bool(scope.get("path") == contract.ANALYZE_PATH)


def problem_response(problem: Problem, ctx: RequestContext, *, compat: bool) -> Response:
    ctx.outcome = problem.code
    if compat:
        status, body = problem.to_envelope(ctx.request_id)
        response = json_response(body, status, problem.response_headers())
        response.headers["X-Facegate-Error"] = problem.code
        return response
    response = json_response(problem.to_problem_json(ctx.request_id), problem.status, problem.response_headers())
    response.headers["content-type"] = "application/problem+json"
    return response


async def _send_problem(send: Send, problem: Problem, ctx: RequestContext, *, compat: bool) -> None:
    response = problem_response(problem, ctx, compat=compat)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _ctx(request: Request) -> RequestContext:
    ctx: RequestContext = request.scope["state"]["ctx"]
    return ctx


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, _ctx(request), compat=_is_compat(request.scope))


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
    problem = Problem("invalid_request", f"invalid parameter(s): {where}")
    return problem_response(problem, _ctx(request), compat=_is_compat(request.scope))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    problem = Problem(
        code, {404: "no such endpoint", 405: "method not allowed here"}.get(exc.status_code, "bad request")
    )
    response = problem_response(problem, _ctx(request), compat=_is_compat(request.scope))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def create_app(settings: Settings | None = None, *, demo_key: str | None = None) -> FastAPI:
    """Build the app. ``demo_key`` is the sandbox tenant's key (``facegate serve`` prints it)."""
    settings = settings or Settings()
    app = FastAPI(
        title="facegate",
        version=__version__,
        summary="A gateway in front of ailabapi's Face Analyzer Advanced: tenant keys, quotas, a cache, one schema.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.demo_key = demo_key
    app.state.metrics = Metrics()
    app.include_router(v1.router)
    app.include_router(compat.router)
    app.include_router(ops.router)
    app.include_router(try_page.router)  # 404 unless settings.try_page
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_middleware(EdgeMiddleware, metrics=app.state.metrics)
    _register_problem_schema(app)
    return app


def _register_problem_schema(app: FastAPI) -> None:
    """Add the Problem schema to the OpenAPI components (referenced by every error response)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code", "request_id"],
            "properties": {
                "type": {"type": "string", "description": "urn:facegate:problem:<code>"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string", "description": "Stable error code (README, 'Errors')."},
                "request_id": {"type": "string"},
                "retry_after": {"type": "integer", "description": "Seconds, as in the Retry-After header."},
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
