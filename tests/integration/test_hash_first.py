"""Hash first, everywhere we ship a client (issue 16 §1).

The Python client (both twins) and ``facegate analyze`` hash the image and look it up by
SHA-256 before uploading; only an unknown image is uploaded. What goes over the wire is
counted by a TCP proxy between client and gateway. A lookup that answers counts as a cache
hit, in ``/v1/usage`` and in the metrics, in memory and in Redis mode.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import AsyncFacegateClient, FacegateClient
from tests.conftest import Gateway, Sim, unique_image
from tests.integration.test_client import facegate
from tests.servers import ByteCountingProxy

#: A hit by lookup: a GET and its headers, far below this, whatever the image's size.
LOOKUP_BYTES_MAX = 10 * 1024


def proxy_for(gw: Gateway) -> ByteCountingProxy:
    host, port = gw.url.removeprefix("http://").split(":")
    return ByteCountingProxy(host, int(port))


def test_client_uploads_only_images_facegate_does_not_know(gateway_factory: Any, sim: Sim, tmp_path: Path) -> None:
    gateway: Gateway = gateway_factory(tenants={"alpha": {"allow_force": True}})
    image = unique_image("bmp", 600, 600)  # ~1 MB
    path = tmp_path / "photo.bmp"
    path.write_bytes(image)
    with proxy_for(gateway) as proxy, FacegateClient(proxy.url, gateway.key(), timeout=20) as fg:
        first = fg.analyze_detailed(path)  # unknown: the lookup says 404, then the upload
        assert not first.from_lookup
        assert not first.cache_hit
        assert proxy.sent > len(image)

        sent = proxy.sent
        second = fg.analyze_detailed(image)  # the same bytes, known now: answered by the lookup
        assert second.from_lookup
        assert second.cache_hit
        assert second.cache_status is not None
        assert second.cache_status.startswith("facegate; hit")
        assert second.analysis.image.sha256 == hashlib.sha256(image).hexdigest()
        assert second.analysis.faces == first.analysis.faces
        assert proxy.sent - sent < LOOKUP_BYTES_MAX

        sent = proxy.sent
        with path.open("rb") as fh:
            third = fg.analyze_detailed(fh, lookup_first=False)  # turned off for one call: uploaded
        assert not third.from_lookup
        assert third.cache_hit  # a hit all the same, after the upload
        assert proxy.sent - sent > len(image)

        sent = proxy.sent
        forced = fg.analyze_detailed(image, force=True)  # a forced call never asks the cache
        assert not forced.from_lookup
        assert not forced.cache_hit
        assert proxy.sent - sent > len(image)
    with FacegateClient(gateway.url, gateway.key(), timeout=20, lookup_first=False) as fg:
        assert not fg.analyze_detailed(image).from_lookup  # turned off for the client
    assert sim.calls == 2  # the first upload and the forced call


async def test_async_client_looks_up_first_too(gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = unique_image(sim="faces=1;shape=list")
    path = tmp_path / "one.jpg"
    path.write_bytes(image)
    with proxy_for(gateway) as proxy:
        async with AsyncFacegateClient(proxy.url, gateway.key(), timeout=20) as fg:
            first = await fg.analyze_detailed(path, landmarks=True)
            assert not first.from_lookup
            sent = proxy.sent
            again = await fg.analyze_detailed(path, landmarks=True)
            assert again.from_lookup
            assert proxy.sent - sent < LOOKUP_BYTES_MAX
            assert again.analysis.faces[0].landmarks is not None  # options travel with the lookup
            plain = await fg.analyze(image)
            assert plain.faces[0].landmarks is None
            assert not (await fg.analyze_detailed(image, lookup_first=False)).from_lookup
    assert sim.calls == 1


def _cache_hits_metric(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    found = re.search(r'^facegate_cache_requests_total\{result="hit"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("mode", ["memory", "redis"])
def test_a_lookup_that_answers_counts_as_a_cache_hit(
    mode: str, gateway_factory: Any, sim: Sim, request: pytest.FixtureRequest
) -> None:
    env = {"FACEGATE_REDIS_URL": request.getfixturevalue("redis_url")} if mode == "redis" else {}
    gw: Gateway = gateway_factory(env=env)
    image = unique_image()
    sha = hashlib.sha256(image).hexdigest()
    with gw.client() as c:
        assert c.post("/v1/faces/analyze", files={"image": ("x.jpg", image, "image/jpeg")}).status_code == 200
        before, hits_before = c.get("/v1/usage").json(), _cache_hits_metric(gw)
        for _ in range(2):
            found = c.get(f"/v1/faces/analyses/{sha}")
            assert found.status_code == 200
            assert found.headers["cache-status"].startswith("facegate; hit")
        assert c.get(f"/v1/faces/analyses/{'0' * 64}").status_code == 404  # neither a hit nor a miss
        after = c.get("/v1/usage").json()
    for window in ("day", "month"):
        assert after["cache"][window]["hits"] == before["cache"][window]["hits"] + 2
        assert after["cache"][window]["misses"] == before["cache"][window]["misses"]
    assert after["credits_spent"] == before["credits_spent"]
    assert _cache_hits_metric(gw) == hits_before + 2
    assert sim.calls == 1


def test_cli_looks_up_first_and_says_so(gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = tmp_path / "face.jpg"
    image.write_bytes(unique_image(sim="faces=1"))
    first = facegate(str(image), "--url", gateway.url, key=gateway.key())
    assert first.returncode == 0, first.stderr
    assert "cache miss" in first.stdout
    again = facegate(str(image), "--url", gateway.url, key=gateway.key())
    assert again.returncode == 0, again.stderr
    assert "cache hit (by hash, not uploaded)" in again.stdout
    uploaded = facegate(str(image), "--no-lookup", "--url", gateway.url, key=gateway.key())
    assert uploaded.returncode == 0, uploaded.stderr
    assert "cache hit" in uploaded.stdout
    assert "by hash" not in uploaded.stdout
    assert sim.calls == 1
