"""What facegate keeps of an image (docs/privacy.md): its hash and the analysis, never its bytes.

A spooled upload (over FACEGATE_SPOOL_THRESHOLD_BYTES) leaves no named file in the spool
directory, not even while its call is in flight (an anonymous O_TMPFILE on Linux), and no
byte run of the image appears in the logs (debug level, raw, hex or base64) or in Redis.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.cachekit import sha, wait_until
from tests.conftest import Gateway, Sim, unique_image


def _runs(image: bytes, n: int = 8, size: int = 24) -> list[bytes]:
    """``n`` byte runs from across the image (past its headers, which are not personal)."""
    start, step = len(image) // 4, len(image) // (2 * n)
    return [image[start + i * step : start + i * step + size] for i in range(n)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE is Linux's")
def test_no_image_bytes_in_spool_files_logs_or_redis(gateway_factory: Any, sim: Sim, redis_url: str, tmp_path: Path):
    spool = tmp_path / "spool"
    spool.mkdir()
    prefix = "p" + uuid.uuid4().hex[:12]
    gw: Gateway = gateway_factory(
        env={
            "FACEGATE_SPOOL_DIR": str(spool),
            "FACEGATE_SPOOL_THRESHOLD_BYTES": "1024",
            "FACEGATE_LOG_LEVEL": "debug",
            "FACEGATE_REDIS_URL": redis_url,
            "FACEGATE_REDIS_PREFIX": prefix,
        }
    )
    image = unique_image(width=400, height=300)
    assert len(image) > 1024, "spooled"
    sim.faults(latency_ms=800)
    answers: list[httpx.Response] = []
    upload = threading.Thread(target=lambda: answers.append(gw.analyze(image)))
    upload.start()
    try:
        wait_until(lambda: sim.stats()["in_flight"] == 1, 10, "the call to start")
        assert os.listdir(spool) == [], "no named spool file, even while the upload is in use"
    finally:
        upload.join()
    sim.faults()
    assert answers[0].status_code == 200
    assert gw.analyze(image).status_code == 200  # and a hit
    assert os.listdir(spool) == []

    logs = gw.logs().encode()
    client = redis.Redis.from_url(redis_url)
    try:
        stored = b"".join(_value(client, k) for k in client.scan_iter(match=f"{prefix}:*"))
    finally:
        client.close()
    assert sha(image).encode() in stored, "the hash is kept (in the entry's metadata)"
    for run in _runs(image):
        for form in (run, run.hex().encode(), base64.b64encode(run)):
            assert form not in logs
            assert form not in stored


def _value(client: redis.Redis, key: bytes) -> bytes:
    """Everything a key holds, as bytes, whatever its type."""
    kind = client.type(key)
    parts: list[Any]
    if kind == b"string":
        parts = [client.get(key)]
    elif kind == b"hash":
        parts = [x for item in client.hgetall(key).items() for x in item]
    elif kind == b"zset":
        parts = list(client.zrange(key, 0, -1))
    elif kind == b"set":
        parts = list(client.smembers(key))
    elif kind == b"list":
        parts = list(client.lrange(key, 0, -1))
    else:
        parts = []
    return b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts if p is not None)
