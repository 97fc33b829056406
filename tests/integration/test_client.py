"""The Python client and ``facegate analyze`` against a real gateway and the simulator.

One gateway for the module (no upstream retries, so each simulator fault is seen once) with
tenants shaped for the tests: ``tiny`` has a burst of 1 at 1/s, ``capped`` a quota of 1.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.client import (
    AnalysisV1,
    AsyncFacegateClient,
    ConnectionFailed,
    FacegateClient,
    InvalidImage,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    UpstreamError,
    Usage,
)
from tests.conftest import Gateway, Sim, start_gateway, unique_image
from tests.servers import ROOT, ServerProcess, free_port

NO_RETRY = RetryPolicy(max_retries=0)


@pytest.fixture(scope="module")
def gw(sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(
        Sim(sim_server),
        tmp_path_factory.mktemp("client-gw"),
        tenants={
            "alpha": {"allow_force": True},
            "tiny": {"rate_per_s": 1, "burst": 1},
            "capped": {"daily_quota": 1, "monthly_quota": 1},
        },
        env={"FACEGATE_UPSTREAM_RETRIES": "0", "FACEGATE_BREAKER_FAILURES": "1000"},
    )
    try:
        yield gateway
    finally:
        gateway.server.stop()


def client(
    gw: Gateway, tenant: str = "alpha", retry: RetryPolicy | None = None, *, lookup_first: bool = True
) -> FacegateClient:
    return FacegateClient(gw.url, gw.key(tenant), timeout=20, retry=retry, lookup_first=lookup_first)


# --- success paths -----------------------------------------------------------------------


def test_analyze_path_bytes_and_file(gw: Gateway, sim: Sim, tmp_path: Path) -> None:
    data = unique_image("png", 200, 160, sim="faces=2")
    path = tmp_path / "two.png"
    path.write_bytes(data)
    with client(gw) as fg:
        first = fg.analyze_detailed(path)
        assert isinstance(first.analysis, AnalysisV1)
        assert len(first.analysis.faces) == 2
        assert first.analysis.image.format == "png"
        assert first.analysis.image.width == 200
        assert first.cache_status is not None
        assert "fwd=uri-miss" in first.cache_status
        assert not first.cache_hit
        assert first.request_id == first.analysis.request_id
        assert first.rate_limits["daily"].limit == 100000
        assert first.attempts == 1
        by_bytes = fg.analyze(data)
        with path.open("rb") as fh:
            by_file = fg.analyze(fh)
        by_str = fg.analyze(str(path))
        assert fg.analyze(io.BytesIO(data)).source.cached
    for again in (by_bytes, by_file, by_str):
        assert again.source.cached
        assert again.faces == first.analysis.faces
    assert sim.calls == 1  # one image, one billable call


def test_options_cached_lookup_and_usage(gw: Gateway, sim: Sim) -> None:
    data = unique_image(sim="faces=1;shape=list")
    with client(gw) as fg:
        analysis = fg.analyze(data, landmarks=True)
        face = analysis.faces[0]
        assert face.landmarks is not None
        assert len(face.landmarks) == 105
        assert face.pupils is not None
        assert fg.analyze(data).faces[0].landmarks is None
        forced = fg.analyze_detailed(data, force=True)
        assert forced.cache_status is not None
        assert "fwd=request" in forced.cache_status
        assert sim.calls == 2

        cached = fg.analysis(analysis.image.sha256.upper())
        assert cached.source.cached
        assert cached.faces[0].box == face.box
        with pytest.raises(NotFound) as missing:
            fg.analysis("0" * 64)
        assert missing.value.status == 404
        with pytest.raises(ValueError, match="sha256"):
            fg.analysis("../v1/usage")

        usage = fg.usage()
    assert isinstance(usage, Usage)
    assert usage.tenant == "alpha"
    assert usage.quotas["daily"].limit == 100000
    assert usage.credits_spent["day"] >= 2
    assert usage.cache["day"].hits >= 1


async def test_async_client(gw: Gateway, sim: Sim) -> None:
    data = unique_image(sim="faces=3")
    async with AsyncFacegateClient(gw.url, gw.key(), timeout=20) as fg:
        analysis = await fg.analyze(data)
        assert len(analysis.faces) == 3
        again = await fg.analysis(analysis.image.sha256)
        assert again.faces == analysis.faces
        assert (await fg.usage()).tenant == "alpha"
        with pytest.raises(InvalidImage) as bad:
            await fg.analyze(b"GIF89a not welcome")
    assert bad.value.code == "unsupported_media_type"
    assert sim.calls == 1


# --- errors ------------------------------------------------------------------------------


def test_errors_are_typed_with_code_and_request_id(gw: Gateway, sim: Sim) -> None:
    with FacegateClient(gw.url, "fg_wrong", timeout=20) as fg, pytest.raises(Unauthorized) as unauthorized:
        fg.usage()
    assert unauthorized.value.status == 401
    assert unauthorized.value.code == "unauthorized"
    assert unauthorized.value.request_id
    assert unauthorized.value.title == "Missing or unknown API key"

    with client(gw) as fg:
        with pytest.raises(InvalidImage) as undecodable:
            fg.analyze(b"\xff\xd8\xff\xe0 truncated jpeg")
        assert undecodable.value.code == "invalid_image"
        assert undecodable.value.status == 422
        with pytest.raises(InvalidImage) as rejected:
            fg.analyze(unique_image(sim="error=ERROR_BLURRY_FACE"))
        assert rejected.value.code == "upstream_rejected_image"
        assert "ERROR_BLURRY_FACE" in rejected.value.detail

        sim.faults({"mode": "bad_key", "count": 1})
        with pytest.raises(UpstreamError) as upstream:
            fg.analyze(unique_image())
    assert upstream.value.code == "upstream_auth"
    assert upstream.value.status == 502
    assert upstream.value.attempts == 1  # a refused server key does not pass by waiting
    assert sim.calls == 2


def test_connection_refused_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_retries=2, backoff_s=0.01)
    with FacegateClient(url, "fg_x", timeout=5, retry=policy) as fg, pytest.raises(ConnectionFailed) as failed:
        fg.usage()
    assert failed.value.code == "connect_error"
    assert failed.value.status is None
    assert failed.value.attempts == 3
    assert url in str(failed.value)


# --- retries -----------------------------------------------------------------------------


def test_rate_limited_429_is_retried_after_retry_after(gw: Gateway, sim: Sim) -> None:
    """``tiny`` may make 1 request per second: the second one is refused, then waited for.
    (Without the hash lookup first, which would be one more request against that limit.)"""
    data = unique_image(sim="faces=1")
    with client(gw, "tiny", retry=NO_RETRY, lookup_first=False) as fg:
        fg.usage()  # takes the burst
        with pytest.raises(RateLimited) as refused:
            fg.analyze(data)
    assert refused.value.status == 429
    assert refused.value.retry_after is not None
    assert refused.value.retry_after >= 1
    assert refused.value.request_id
    assert sim.calls == 0  # refused before anything was spent

    with client(gw, "tiny", lookup_first=False) as fg:
        result = fg.analyze_detailed(data)
    assert result.attempts == 2
    assert len(result.analysis.faces) == 1
    assert sim.calls == 1


def test_upstream_unavailable_503_is_retried(gw: Gateway, sim: Sim) -> None:
    """ailabapi throttles once (429, Retry-After 1): facegate answers 503 with Retry-After; the client waits."""
    sim.faults({"mode": "status", "status": 429, "code": "EXCEEDING_LIMITS", "retry_after": 1, "count": 1})
    with client(gw) as fg:
        result = fg.analyze_detailed(unique_image(sim="faces=2"))
    assert result.attempts == 2
    assert len(result.analysis.faces) == 2
    assert sim.calls == 2

    sim.faults({"mode": "status", "status": 429, "code": "EXCEEDING_LIMITS", "retry_after": 1, "count": 1})
    with client(gw, retry=NO_RETRY) as fg, pytest.raises(UpstreamError) as unavailable:
        fg.analyze(unique_image())
    assert unavailable.value.code == "upstream_unavailable"
    assert unavailable.value.status == 503
    assert unavailable.value.retry_after is not None


def test_quota_exceeded_is_not_waited_for(gw: Gateway, sim: Sim) -> None:
    with client(gw, "capped") as fg:
        fg.analyze(unique_image())
        with pytest.raises(QuotaExceeded) as exhausted:
            fg.analyze(unique_image())
    error = exhausted.value
    assert error.code == "quota_exceeded"
    assert error.retry_after is not None
    assert error.retry_after > RetryPolicy().max_wait_s  # the monthly quota resets in days, not seconds
    assert error.attempts == 1
    assert sim.calls == 1


# --- the CLI -----------------------------------------------------------------------------


def facegate(*argv: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    if key is not None:
        env["FACEGATE_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "app", "analyze", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_table_progress_and_exit_code(gw: Gateway, sim: Sim, tmp_path: Path) -> None:
    two = tmp_path / "two.jpg"
    two.write_bytes(unique_image(sim="faces=2"))
    none = tmp_path / "none.png"
    none.write_bytes(unique_image("png", sim="faces=0"))
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    run = facegate(str(two), str(none), str(junk), "--url", gw.url, "--progress", key=gw.key())
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{two}: 2 faces · 128x128 jpeg · cache miss")
    assert re.search(r" · SIMULATED · daily quota \d+/100000 left$", lines[0])
    assert lines[1].split()[:4] == ["#", "box", "x,y", "wxh"]
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"]
    assert lines[4].startswith(f"{none}: 0 faces")
    assert len(lines) == 5
    assert f"{junk}: unsupported_media_type 415" in run.stderr
    assert "[3/3]" in run.stderr
    assert "1 of 3 image(s) failed: unsupported_media_type x1" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_json_and_key_errors(gw: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = tmp_path / "one.png"
    image.write_bytes(unique_image("png", sim="faces=1;shape=list"))
    run = facegate(str(image), "--json", "--landmarks", "--url", gw.url, key=gw.key())
    assert run.returncode == 0, run.stderr
    analysis = AnalysisV1.model_validate_json(run.stdout)
    assert analysis.faces[0].landmarks is not None
    assert json.loads(run.stdout)["schema_version"] == "1"

    wrong = facegate(str(image), str(image), "--url", gw.url, "--key", "fg_wrong", key=None)
    assert wrong.returncode == 1
    assert "unauthorized 401" in wrong.stderr
    assert "skipped after the error above" in wrong.stderr  # one refusal, not one per image

    missing = facegate(str(image), "--url", gw.url, key=None)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "facegate: no API key: pass --key or set FACEGATE_KEY"
    assert sim.calls == 1
