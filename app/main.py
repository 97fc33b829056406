"""The application factory: ``create_app(settings)`` wires the HTTP layer around the runtime.

Backends are chosen and built in the lifespan (``app/runtime.py``); this module only
assembles the FastAPI app: routers, problem handlers, the edge middleware and the
OpenAPI additions. ``facegate serve`` runs it with uvicorn (``app/cli.py``).
"""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__
from app.api import admin, compat, openapi, ops, problems, try_page, v1
from app.api.edge import EdgeMiddleware
from app.intake.receive import MULTIPART_OVERHEAD
from app.observability import Metrics
from app.runtime import lifespan
from app.settings import Settings


def create_app(settings: Settings | None = None, *, demo_key: str | None = None) -> FastAPI:
    """Build the app. ``demo_key`` is the sandbox tenant's key (``facegate serve`` prints it)."""
    settings = settings or Settings()
    app = FastAPI(
        title="facegate",
        version=__version__,
        summary="A gateway in front of ailabapi's Face Analyzer Advanced: tenant keys, quotas, a cache, one schema.",
        description=openapi.DESCRIPTION,
        openapi_tags=openapi.TAGS,
        generate_unique_id_function=openapi.operation_id,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.demo_key = demo_key
    app.state.metrics = Metrics()
    app.include_router(v1.router)
    app.include_router(compat.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(try_page.router)  # 404 unless settings.try_page
    problems.install(app)
    app.add_middleware(
        EdgeMiddleware,
        metrics=app.state.metrics,
        drain_s=settings.body_timeout_s,
        drain_bytes=settings.max_image_bytes + MULTIPART_OVERHEAD,
    )
    openapi.install(app, max_image_bytes=settings.max_image_bytes)
    return app
