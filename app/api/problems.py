"""Exception handlers: every refusal, from facegate or from FastAPI/Starlette, becomes a Problem.

Installed by :func:`install` on the app. Handlers render through
:func:`app.api.responses.problem_response`, so a 404 from the router, a validation error
and a quota refusal all look the same to a client.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import get_context
from app.api.responses import is_compat, problem_response
from app.errors import Problem


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, get_context(request), compat=is_compat(request.scope))


async def on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5]
    )
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
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(allowed_methods(request))
    return response


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own ``Allow`` names only the
    first route that matched the path), HEAD wherever GET is (the edge answers it)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex, served = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and served and regex.match(path):
            methods |= served
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
