"""Exception handlers: every refusal, from facegate or from FastAPI/Starlette, becomes a Problem.

Installed by :func:`install` on the app. Handlers render through
:func:`app.api.responses.problem_response`, so a 404 from the router, a validation error
and a quota refusal all look the same to a client.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import get_context
from app.api.responses import is_compat, problem_response
from app.errors import Problem


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, get_context(request), compat=is_compat(request.scope))


async def on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
    problem = Problem("invalid_request", f"invalid parameter(s): {where}")
    return problem_response(problem, get_context(request), compat=is_compat(request.scope))


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    problem = Problem(
        code, {404: "no such endpoint", 405: "method not allowed here"}.get(exc.status_code, "bad request")
    )
    response = problem_response(problem, get_context(request), compat=is_compat(request.scope))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
