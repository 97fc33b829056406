"""The try-it page: ``GET /try`` and its assets, straight from ``app/static``.

A person with a tenant key can check facegate in a browser without writing code. The
page is plain HTML + one script + one stylesheet (no build step, no CDN: the gateway
may run where there is no internet). It calls the public v1 API from the browser, so it
holds no privilege of its own; the key lives only in the page's memory. A public-domain
sample photo (``/try/sample.jpg``, licence in ``app/static/README.md``) makes the first try
work without a picture of one's own.

Security: a strict Content-Security-Policy (scripts and styles only from this origin, no
inline code, fetches only to this origin, no framing), ``nosniff``, no referrer. The
page is gated by ``FACEGATE_TRY_PAGE``: when off, these paths are a plain 404.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import Problem

#: ``blob:`` for the preview of the picked file, ``data:`` for the empty favicon.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Short: a new facegate version should not be hidden by a stale script.
    "Cache-Control": "no-cache",
}
#: The only files served (no path from the URL reaches the filesystem).
ASSETS: Final = {
    "try.html": "text/html; charset=utf-8",
    "try.js": "text/javascript; charset=utf-8",
    "try.css": "text/css; charset=utf-8",
    "sample.jpg": "image/jpeg",
}

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    return resources.files("app").joinpath("static", name).read_bytes()


def _serve(request: Request, name: str) -> Response:
    if not request.app.state.settings.try_page:
        raise Problem("not_found", "no such endpoint")
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/try")
async def try_page(request: Request) -> Response:
    return _serve(request, "try.html")


@router.get("/try/try.js")
async def try_script(request: Request) -> Response:
    return _serve(request, "try.js")


@router.get("/try/try.css")
async def try_style(request: Request) -> Response:
    return _serve(request, "try.css")


@router.get("/try/sample.jpg")
async def try_sample(request: Request) -> Response:
    return _serve(request, "sample.jpg")
