"""The edge: the outermost ASGI layer every HTTP request passes through.

It gives each request its :class:`~app.context.RequestContext` (request id), adds the
headers every answer carries (request id, Cache-Status, RateLimit), writes one access-log
line and the request metrics when the request ends, and turns anything that escaped the
app into a problem — a 503 during shutdown, a last-resort 500 that never carries a
traceback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.headers import context_headers
from app.api.responses import is_compat, send_problem
from app.context import RequestContext
from app.errors import Problem
from app.observability import Metrics

log = logging.getLogger("facegate")

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
            await send_problem(send_wrapper, problem, ctx, compat=is_compat(scope))
        except Exception as exc:
            log.error(
                "unhandled error: %s", type(exc).__name__, extra={"request_id": ctx.request_id, "where": _where(exc)}
            )
            if not response_started:
                problem = Problem("internal_error", "facegate failed unexpectedly; the request id helps find out why")
                await send_problem(send_wrapper, problem, ctx, compat=is_compat(scope))
        finally:
            self._account(scope, ctx, status, time.perf_counter() - started)

    def _account(self, scope: Scope, ctx: RequestContext, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        cache = ctx.cache.label if ctx.cache else None
        self.metrics.request_done(
            route,
            scope["method"],
            status,
            ctx.tenant or "-",
            seconds=seconds,
            cache=cache,
            outcome=ctx.outcome,
            quotas=ctx.admission.quotas if ctx.admission is not None else (),
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
                "operator": ctx.operator,
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
