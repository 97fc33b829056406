"""``create_app``: the simulator as a Starlette app, every answer tagged as simulated, and a log
filter that keeps an embedded simulator's chatter out of the host's logs."""

from __future__ import annotations

import contextvars
import logging
from typing import Final

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.sim import control
from app.sim.config import SIM_HEADER, SimConfig
from app.sim.endpoint import Analyze, query_credits
from app.sim.replies import DROPPING
from app.sim.state import Sim
from app.upstream import contract

_INCOMPLETE_LOG: Final = "ASGI callable returned without completing response."

#: Set in the task that serves an embedded simulator; lets the log filter keep the sim's
#: chatter out of the host process's logs without touching the host's logging config.
EMBEDDED: contextvars.ContextVar[bool] = contextvars.ContextVar("facegate_sim_embedded", default=False)


class _Tagged:
    """Adds ``X-Facegate-Simulator: 1`` to every answer so nothing simulated passes as real."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (SIM_HEADER.lower().encode(), b"1")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


class _SimLogFilter(logging.Filter):
    """Keeps deliberate simulator behaviour out of the host's logs.

    A filter rather than logging config because in sandbox mode the host (the gateway)
    owns uvicorn's loggers; it only drops records emitted on behalf of the simulator.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        embedded = EMBEDDED.get()
        if record.name == "uvicorn.access":
            return not embedded
        if DROPPING.get() and record.getMessage() == _INCOMPLETE_LOG:
            return False
        return not (embedded and record.levelno < logging.WARNING)


def _install_log_filter() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == _SimLogFilter.__name__ for f in logger.filters):
            logger.addFilter(_SimLogFilter())


def create_app(config: SimConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; its state lives in ``app.state.sim``."""
    sim = Sim(config or SimConfig())
    _install_log_filter()
    app = Starlette(
        routes=[
            Route(contract.ANALYZE_PATH, Analyze(sim), methods=["POST"]),
            Route(contract.CREDITS_PATH, query_credits, methods=["GET"]),
            Route("/healthz", control.healthz, methods=["GET"]),
            Route("/_sim/stats", control.stats, methods=["GET"]),
            Route("/_sim/reset", control.reset, methods=["POST"]),
            Route("/_sim/faults", control.faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sim/limits", control.limits, methods=["GET", "POST"]),
            Route("/_sim/keys", control.keys, methods=["GET", "POST"]),
        ],
        middleware=[Middleware(_Tagged)],
        exception_handlers={404: control.not_found},
    )
    app.state.sim = sim
    return app


def sim_of_app(app: Starlette) -> Sim:
    """The state behind an app made by ``create_app``."""
    sim: Sim = app.state.sim
    return sim
