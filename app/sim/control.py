"""The control endpoints (``/healthz``, ``/_sim/stats|reset|faults|limits|keys``) and the 404 answer.

They need no key: keep the simulator on loopback (docs/simulator.md).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from app.sim.faults import FaultPlan, KeyBalances, Limits
from app.sim.replies import envelope
from app.sim.state import Sim

log = logging.getLogger("facegate.sim")


def sim_of(request: Request) -> Sim:
    sim: Sim = request.app.state.sim
    return sim


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _parse(
    request: Request, model: type[FaultPlan] | type[Limits] | type[KeyBalances]
) -> FaultPlan | Limits | KeyBalances | Response:
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        return _json({"detail": exc.errors(include_url=False, include_context=False)}, 422)


async def healthz(request: Request) -> Response:
    # ``faces`` says where boxes come from: "detector" (real faces) or "hash".
    return _json({"status": "ok", "faces": "hash" if sim_of(request).detector is None else "detector"})


async def stats(request: Request) -> Response:
    return _json(sim_of(request).stats.as_json())


async def reset(request: Request) -> Response:
    sim = sim_of(request)
    sim.reset()
    return _json(sim.stats.as_json())


async def faults(request: Request) -> Response:
    sim = sim_of(request)
    if request.method == "POST":
        plan = await _parse(request, FaultPlan)
        if isinstance(plan, Response):
            return plan
        assert isinstance(plan, FaultPlan)
        sim.set_plan(plan)
        log.info("fault plan: %s", sim.plan_json())
    elif request.method == "DELETE":
        sim.set_plan(FaultPlan(latency_ms=sim.config.latency_ms))
    return _json(sim.plan_json())


async def limits(request: Request) -> Response:
    sim = sim_of(request)
    if request.method == "POST":
        update = await _parse(request, Limits)
        if isinstance(update, Response):
            return update
        assert isinstance(update, Limits)
        sim.set_limits(update)
    return _json(sim.limits.model_dump())


async def keys(request: Request) -> Response:
    """Accepted keys with their balances and counters; ``POST`` sets balances (adding keys)."""
    sim = sim_of(request)
    if request.method == "POST":
        update = await _parse(request, KeyBalances)
        if isinstance(update, Response):
            return update
        assert isinstance(update, KeyBalances)
        for key, account in update.keys.items():
            sim.set_balance(key, account.balance if account.balance is not None else sim.config.credits)
    return _json({key: account.as_json() for key, account in sim.accounts.items()})


async def not_found(request: Request, exc: Exception) -> Response:
    # A wrong path on ailabapi plausibly answers this code (an assumption: not documented).
    body = envelope(404, "ERROR_AI_NOT_EXISTS", "no such API")
    return _json(body, 404)
