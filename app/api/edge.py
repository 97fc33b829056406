"""The edge: the outermost ASGI layer every HTTP request passes through.

It gives each request its :class:`~app.context.RequestContext` (request id), adds the
headers every answer carries (request id, Cache-Status, RateLimit), writes one access-log
line and the request metrics when the request ends, and turns anything that escaped the
app into a problem — a 503 during shutdown, a last-resort 500 that never carries a
traceback.

It also keeps connections sound when an answer comes before the body was asked for on
a request with ``Expect: 100-continue`` (a cache hit decided from a digest header, or any
refusal decided from the headers). uvicorn sends ``100 Continue`` only on the app's first
``receive()``; the client of such a request sends no body, while uvicorn waits for the
declared one on the connection, and the client's next request would be eaten as that
body. So the answer says ``Connection: close``, and before the connection is closed the
body that may still come (a client that gave up waiting for ``100 Continue`` and sent it)
is read and dropped for a bounded time, within a slot of the tenant's upload share:
closing a socket with unread bytes resets it, and the client could lose the answer.
Requests without ``Expect`` need none of this: their body follows the headers anyway, and
uvicorn drops what the app did not read, keeping the connection usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Final

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.api.headers import context_headers
from app.api.responses import is_compat, send_problem
from app.context import RequestContext
from app.errors import CATALOGUE, Problem
from app.observability import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("facegate")

_SANE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
access_log = logging.getLogger("facegate.access")
#: After an answer sent before the body was asked for: stop draining once no byte came for this long.
DRAIN_IDLE_S: Final = 2.0


def expects_continue(scope: Scope) -> bool:
    """True when the request asks for ``100 Continue`` before it sends its body."""
    for name, value in scope["headers"]:
        if name == b"expect":
            return bool(value.lower() == b"100-continue")
    return False


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

    def __init__(self, app: ASGIApp, metrics: Metrics, *, drain_s: float = 60.0, drain_bytes: int = 1 << 30) -> None:
        self.app = app
        self.metrics = metrics
        #: Bounds on reading and dropping a body after an early answer (see the module doc).
        self.drain_s = drain_s
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if tracing.enabled():
            with tracing.request_span(scope["method"], scope.get("path", "")) as root:
                await self._serve(scope, receive, send, root)
            return
        await self._serve(scope, receive, send, None)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, root: Span | None) -> None:
        started = time.perf_counter()
        ctx = RequestContext(request_id=request_id_from(scope))
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500
        response_started = False
        waiting = expects_continue(scope)  # the client waits for 100 Continue until the app reads
        drain = False
        # HEAD is GET without the body (RFC 9110 9.3.2): routed as GET, the body dropped here.
        head = scope["method"] == "HEAD"
        inner = {**scope, "method": "GET"} if head else scope

        async def receive_wrapper() -> Message:
            nonlocal waiting
            waiting = False
            return await receive()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started, drain
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *context_headers(ctx)]
                if status >= 400 and ctx.tenant is not None and ctx.outcome in CATALOGUE:
                    await _record_refusal(scope, ctx.tenant, ctx.outcome)
                if waiting:  # answered before the body was asked for: this connection ends here
                    drain = True
                    message["headers"].append((b"connection", b"close"))
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            if drain and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})  # the answer is complete for the client
                await self._drain(scope, ctx, receive)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        try:
            await self.app(inner, receive_wrapper if waiting else receive, send_wrapper)
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
            if head and "route" in inner:
                scope["route"] = inner["route"]
            self._account(scope, ctx, status, time.perf_counter() - started, root)

    async def _drain(self, scope: Scope, ctx: RequestContext, receive: Receive) -> None:
        """Read and drop the body that still arrives after an early answer, within bounds.

        A client that waited for ``100 Continue`` reads the answer and closes: that ends this at
        once. One that sent its body anyway is read to the end of it (not into the next request:
        the connection closes after this answer). Bounded by ``drain_s``, ``drain_bytes``,
        :data:`DRAIN_IDLE_S` without a byte, and a slot of the tenant's upload share — without a
        slot the connection is closed at once.
        """
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        gate = getattr(runtime, "uploads", None)
        holder = ctx.tenant or "-"
        if gate is not None and not gate.try_acquire(holder):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        dropped = 0
        try:
            while dropped <= self.drain_bytes:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(DRAIN_IDLE_S, left)):
                        message = await receive()
                except TimeoutError:
                    break
                if message["type"] != "http.request":
                    break
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        finally:
            if gate is not None:
                gate.release(holder)

    def _account(self, scope: Scope, ctx: RequestContext, status: int, seconds: float, root: Span | None) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        cache = ctx.cache.label if ctx.cache else None
        if root is not None:
            tracing.finish_request(
                root,
                method=scope["method"],
                route=route,
                status=status,
                request_id=ctx.request_id,
                tenant=ctx.tenant,
                cache=cache,
                outcome=ctx.outcome,
                attempts=ctx.upstream_attempts,
            )
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
                # Chargeback from the access log alone: one line per billed call, with its tenant.
                "billed": ctx.billed,
                "credits": (1 if ctx.billed else 0) if ctx.billed is not None else None,
                "upstream_key": ctx.upstream_key,
                "queue_ms": round(ctx.queue_s * 1000, 1) if ctx.queue_s is not None else None,
                "bytes": ctx.image_bytes,
                "duration_ms": round(seconds * 1000, 1),
            },
        )


async def _record_refusal(scope: Scope, tenant: str, code: str) -> None:
    """Count a refusal in the tenant's usage history (before the answer leaves, so that the
    history a client reads next includes it). Never fails the request."""
    runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
    if runtime is None:
        return
    with contextlib.suppress(Exception):  # best effort for refusals: the answer must go out
        await runtime.service.limiter.record(tenant, f"refused:{code}")


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame — enough to find a bug, with no locals or messages."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
