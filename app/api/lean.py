"""A leaner request handler for the routes every cache hit takes: FastAPI's dependency solving, planned once.

FastAPI solves a route's dependencies anew on every request: it walks the dependency tree,
computes cache keys and security scopes per dependency, parses every parameter source, and
builds a ``Response`` to collect headers nobody sets. On a lookup that was a quarter of the
request's CPU, on a cache hit a tenth (issue 16; bench/HISTORY.md). :class:`LeanRoute` does the
same work from a plan made once per route — in the same order, with the same dependency cache,
validating parameters with FastAPI's own functions — whenever the route is simple enough for a
plan: async dependencies that take the ``Request`` and each other, path and query parameters,
an endpoint that returns a ``Response``. Anything else (a sync or generator dependency, a
security scheme, a body or header parameter, dependency overrides) keeps FastAPI's handler, as
does every request whose parameters do not validate: FastAPI then answers exactly as it would
have (its errors, in its order). The route itself — its signature, its OpenAPI operation — is an
ordinary :class:`~fastapi.routing.APIRoute`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastapi import routing
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_NO_PARAMS: Final[Mapping[str, Any]] = {}
#: Defaults that are safe to share between requests (immutable).
_IMMUTABLE: Final = (bool, int, float, str, bytes, type(None), frozenset, tuple)


@dataclass(frozen=True, slots=True)
class _Step:
    """One dependency: its own dependencies first, then the call (as FastAPI's ``solve_dependencies``)."""

    call: Callable[..., Awaitable[Any]]
    name: str | None
    use_cache: bool
    request_param: str | None
    subs: tuple[_Step, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """How to call one route's endpoint without solving its dependencies per request."""

    dependant: Dependant
    steps: tuple[_Step, ...]
    request_param: str | None
    #: The query parameters' values when the query string is empty (None: compute per request).
    query_defaults: dict[str, Any] | None

    def params(self, request: Request) -> dict[str, Any] | None:
        """Path and query values as FastAPI validates them; None when any is invalid (then
        FastAPI's own handler answers, with its errors)."""
        values: dict[str, Any] = {}
        dependant = self.dependant
        if dependant.path_params:
            found, errors = request_params_to_args(dependant.path_params, request.path_params)
            if errors:
                return None
            values.update(found)
        if dependant.query_params:
            if self.query_defaults is not None and not request.scope.get("query_string"):
                values.update(self.query_defaults)
            else:
                found, errors = request_params_to_args(dependant.query_params, request.query_params)
                if errors:
                    return None
                values.update(found)
        return values

    async def arguments(self, request: Request, values: dict[str, Any]) -> dict[str, Any]:
        """The endpoint's keyword arguments: ``values`` plus each dependency's result."""
        cache: dict[Any, Any] = {}
        for step in self.steps:
            solved = await _solve(step, request, cache)
            if step.name is not None:
                values[step.name] = solved
        if self.request_param is not None:
            values[self.request_param] = request
        return values


async def _solve(step: _Step, request: Request, cache: dict[Any, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for sub in step.subs:  # FastAPI solves a dependency's own dependencies before its cache lookup
        solved = await _solve(sub, request, cache)
        if sub.name is not None:
            kwargs[sub.name] = solved
    if step.use_cache and step.call in cache:
        return cache[step.call]
    if step.request_param is not None:
        kwargs[step.request_param] = request
    result = await step.call(**kwargs)
    cache.setdefault(step.call, result)
    return result


def _plain(dependant: Dependant) -> bool:
    """Nothing but the request and sub-dependencies (and, on the endpoint, path/query parameters).
    ``scope`` (which exit stack closes a dependency) matters only for generator dependencies,
    which are FastAPI's."""
    return not (
        dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or dependant.own_oauth_scopes
        or dependant.concurrency is not None
    )


def _step(dependant: Dependant) -> _Step | None:
    call = dependant.call
    if (
        call is None
        or not inspect.iscoroutinefunction(call)  # sync (thread pool), generators, security schemes: FastAPI's
        or not _plain(dependant)
        or dependant.path_params
        or dependant.query_params
    ):
        return None
    subs = [_step(sub) for sub in dependant.dependencies]
    if any(sub is None for sub in subs):
        return None
    return _Step(call, dependant.name, dependant.use_cache, dependant.request_param_name, tuple(s for s in subs if s))


def _returns_response(call: Callable[..., Any]) -> bool:
    """Whether the endpoint is annotated to return a ``Response`` (FastAPI then sends it as is)."""
    returns = inspect.get_annotations(call).get("return")
    if isinstance(returns, str):  # ``from __future__ import annotations``
        try:
            returns = eval(returns, getattr(call, "__globals__", {}))  # noqa: S307 - the module's own annotation
        except Exception:  # a name only the defining scope knows: not planned
            return False
    return isinstance(returns, type) and issubclass(returns, Response)


def plan(dependant: Dependant) -> Plan | None:
    """The plan for an endpoint's dependant, or None when FastAPI's handler must do it."""
    call = dependant.call
    if call is None or not inspect.iscoroutinefunction(call) or not _plain(dependant):
        return None
    if not _returns_response(call):
        return None  # a model to serialize: FastAPI's job
    steps = [_step(sub) for sub in dependant.dependencies]
    if any(step is None for step in steps):
        return None
    defaults: dict[str, Any] | None = None
    if dependant.query_params:
        found, errors = request_params_to_args(dependant.query_params, _NO_PARAMS)
        if not errors and all(isinstance(v, _IMMUTABLE) for v in found.values()):
            defaults = found
    return Plan(dependant, tuple(s for s in steps if s), dependant.request_param_name, defaults)


class LeanRoute(APIRoute):
    """An :class:`APIRoute` whose requests skip FastAPI's per-request dependency solving when
    :func:`plan` can plan the route (the module doc says when, and what stays FastAPI's)."""

    #: The plan of the handler built last (tests check that the hot routes have one).
    lean_plan: Plan | None = None

    def get_route_handler(self) -> Handler:
        standard: Handler = super().get_route_handler()
        # FastAPI builds a handler per inclusion of the route (APIRouter.include_router), from
        # that inclusion's dependant (with the including routers' dependencies); it says which
        # one in a context variable. Without it, no plan: the route's own dependant may not be
        # the one FastAPI serves.
        var = getattr(routing, "_effective_route_context_var", None)
        if var is None:
            return standard
        effective = var.get()
        source: Any = effective if effective is not None and effective.original_route is self else self
        dependant = source.dependant
        route_plan = plan(dependant) if isinstance(dependant, Dependant) else None
        if route_plan is None:
            return standard
        self.lean_plan = route_plan
        endpoint = dependant.call
        assert endpoint is not None
        provider = source.dependency_overrides_provider

        async def handler(request: Request) -> Response:
            if provider is not None and getattr(provider, "dependency_overrides", None):
                return await standard(request)
            values = route_plan.params(request)
            if values is None:
                return await standard(request)
            response: Response = await endpoint(**await route_plan.arguments(request, values))
            return response

        return handler
