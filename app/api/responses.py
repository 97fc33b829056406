"""How answers leave facegate: JSON bodies, and problems in their two renderings.

A :class:`~app.errors.Problem` is RFC 9457 ``application/problem+json`` on ``/v1`` and
ailabapi's own envelope (plus ``X-Facegate-Error``) on the drop-in route.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response
from starlette.types import Scope, Send

from app.context import RequestContext
from app.errors import Problem
from app.upstream import contract


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def is_compat_path(path: object) -> bool:
    """True for the drop-in route's path, whose callers expect ailabapi's envelope."""
    return path == contract.ANALYZE_PATH


def is_compat(scope: Scope) -> bool:
    """True on the drop-in route (also what the OpenAPI document says its errors look like)."""
    return is_compat_path(scope.get("path"))


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


async def send_problem(send: Send, problem: Problem, ctx: RequestContext, *, compat: bool) -> None:
    """A problem sent straight through ASGI (from the edge, outside FastAPI's handlers)."""
    response = problem_response(problem, ctx, compat=compat)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
