"""The baseline: the least a FastAPI service can do for the same request.

``POST /v1/faces/analyze`` parses the multipart upload the usual FastAPI way
(``UploadFile``, python-multipart), hashes the image with SHA-256 and answers a fixed
JSON body of exactly the size of facegate's answer (the harness writes it to a file).
No auth, no cache, no limits, no logging: what is left is the framework, the server and
the parse. It runs under the same server settings as ``facegate serve``: one uvicorn
worker, ``loop="auto"``/``http="auto"`` (uvloop + httptools when installed, as for
facegate), no access log, no server header.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import Response


def create_app(body: bytes) -> FastAPI:
    app = FastAPI(title="facegate-bench-baseline")

    @app.post("/v1/faces/analyze")
    async def analyze(image: UploadFile) -> Response:
        digest = hashlib.sha256()
        while chunk := await image.read(1 << 16):
            digest.update(chunk)
        return Response(body, media_type="application/json", headers={"x-image-sha256": digest.hexdigest()})

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="baseline app for the facegate benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True, help="file with the fixed JSON answer")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.body.read_bytes()),
        host=args.host,
        port=args.port,
        loop="auto",
        http="auto",
        workers=None,
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
