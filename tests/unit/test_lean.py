"""LeanRoute (app/api/lean.py) answers exactly as FastAPI's own handler does, and the hot routes use it.

The same small app is built twice — with LeanRoute and with FastAPI's APIRoute — and every
request is sent to both: same status, same body, the same dependencies called in the same
order, the same number of times (the dependency cache). Requests whose parameters do not
validate, and apps with dependency overrides, must reach FastAPI's handler (its errors, its
order). And the production app's routes that every cache hit takes must have a plan, so the
saving cannot vanish silently (e.g. after a FastAPI upgrade).
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts

from app.api.lean import LeanRoute
from app.main import create_app
from app.settings import Settings

#: Dependency calls, in order (module level: FastAPI reads the endpoints' annotations as strings).
CALLS: list[str] = []


async def first(request: Request) -> str:
    CALLS.append("first")
    if request.headers.get("x-refuse") == "first":
        raise HTTPException(401, "no")
    return request.headers.get("x-who", "nobody")


async def second(request: Request, who: Annotated[str, Depends(first)]) -> str:
    CALLS.append("second")
    if request.headers.get("x-refuse") == "second":
        raise HTTPException(403, "not you")
    return who.upper()


async def uncached(request: Request) -> int:
    CALLS.append("uncached")
    return len(CALLS)


async def get_item(
    request: Request,
    *,
    who: Annotated[str, Depends(first)],
    loud: Annotated[str, Depends(second)],
    n: Annotated[int, Depends(uncached, use_cache=False)],
    again: Annotated[int, Depends(uncached, use_cache=False)],
    sha: Annotated[str, Path(pattern=r"^[0-9a-f]{4}$")],
    flag: Annotated[bool, Query()] = False,
    limit: Annotated[int, Query(ge=1)] = 10,
) -> Response:
    body = {"who": who, "loud": loud, "n": n, "again": again, "sha": sha, "flag": flag, "limit": limit}
    return JSONResponse({**body, "path": request.url.path})


async def get_model(who: Annotated[str, Depends(first)]) -> dict[str, Any]:
    return {"who": who}  # a model to serialize: FastAPI's handler


def build(route_class: type[APIRoute]) -> FastAPI:
    router = APIRouter(prefix="/v", route_class=route_class)
    router.add_api_route("/items/{sha}", get_item, methods=["GET"])
    router.add_api_route("/model", get_model, methods=["GET"])
    app = FastAPI()
    app.include_router(router)
    return app


def lean_routes(app: FastAPI) -> dict[str, LeanRoute]:
    """The app's LeanRoutes by name (FastAPI keeps included routes on the included router)."""
    found = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, LeanRoute):
            found[route.name] = route
    return found


REQUESTS: list[tuple[str, dict[str, str]]] = [
    ("/v/items/ab12", {"x-who": "ann"}),
    ("/v/items/ab12?flag=yes&limit=3", {"x-who": "ann"}),
    ("/v/items/ab12?flag=TRUE&unknown=1", {}),
    ("/v/items/ab12?flag=maybe", {"x-who": "ann"}),  # invalid query: FastAPI's 422, after the dependencies
    ("/v/items/ab12?limit=0", {}),
    ("/v/items/ab12?flag=1&flag=0", {}),
    ("/v/items/AB12", {}),  # the path does not match its pattern
    ("/v/items/ab12", {"x-refuse": "first"}),
    ("/v/items/ab12?flag=maybe", {"x-refuse": "second"}),
    ("/v/model", {"x-who": "bob"}),
]


async def _send(app: FastAPI, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get(path, headers=headers)
    return response.status_code, response.json()


@pytest.mark.parametrize(("path", "headers"), REQUESTS)
async def test_same_answers_and_dependency_calls_as_fastapi(path: str, headers: dict[str, str]) -> None:
    CALLS.clear()
    lean = await _send(build(LeanRoute), path, headers)
    lean_calls = list(CALLS)
    CALLS.clear()
    std = await _send(build(APIRoute), path, headers)
    assert lean == std
    assert lean_calls == CALLS


async def test_the_plan_serves_valid_requests_and_fastapi_the_rest() -> None:
    CALLS.clear()
    app = build(LeanRoute)
    assert await _send(app, "/v/items/ab12?flag=on", {"x-who": "ann"}) == (
        200,
        {
            "who": "ann",
            "loud": "ANN",
            "n": 3,
            "again": 4,
            "sha": "ab12",
            "flag": True,
            "limit": 10,
            "path": "/v/items/ab12",
        },
    )
    assert CALLS == ["first", "second", "uncached", "uncached"]  # first once: cached for second
    planned = {name: route.lean_plan is not None for name, route in lean_routes(app).items()}
    assert planned == {"get_item": True, "get_model": False}


async def test_dependency_overrides_are_honoured() -> None:
    CALLS.clear()
    app = build(LeanRoute)

    async def fake_first() -> str:
        return "override"

    app.dependency_overrides[first] = fake_first
    status, body = await _send(app, "/v/items/ab12", {"x-who": "ann"})
    assert (status, body["who"], body["loud"]) == (200, "override", "OVERRIDE")
    assert "first" not in CALLS


async def test_the_routes_of_every_cache_hit_are_planned() -> None:
    app = create_app(Settings(_env_file=None))
    assert (await _send(app, "/healthz", {}))[0] == 200  # FastAPI builds the handlers on the first request
    planned = {name: route.lean_plan is not None for name, route in lean_routes(app).items()}
    hot = {"analyze_faces", "get_analysis", "analyze_faces_ailabapi", "get_usage"}
    assert hot <= {name for name, ok in planned.items() if ok}, planned
