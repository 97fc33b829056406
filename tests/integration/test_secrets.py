"""Secrets never leave: not in answers, logs, metrics or error texts, even on error paths."""

from __future__ import annotations

from typing import Any

import httpx

from app.upstream import contract
from tests.conftest import Gateway, Sim, unique_image

UPSTREAM_KEY = "UPSTREAM-SECRET-4f1e9c0d7b"


def test_keys_never_appear_in_answers_logs_or_metrics(gateway_factory: Any, sim: Sim) -> None:
    # The simulator accepts only its own key, so every call with this one is refused: the
    # error path (upstream_auth) is exactly where a careless gateway would echo the key.
    gw: Gateway = gateway_factory(env={"FACEGATE_UPSTREAM_API_KEY": UPSTREAM_KEY, "FACEGATE_UPSTREAM_RETRIES": "0"})
    tenant_key = gw.key()
    seen: list[str] = []
    r = gw.analyze(unique_image())
    assert r.json()["code"] == "upstream_auth"
    seen.append(r.text + str(r.headers))
    for fault in ({"mode": "status", "status": 500}, {"mode": "malformed"}, {"mode": "drop"}):
        sim.faults({**fault, "count": 1})
        r = gw.analyze(unique_image())
        seen.append(r.text + str(r.headers))
    # Tenant-key misuse: in the query string, wrong, and on the drop-in route.
    r = httpx.post(gw.url + "/v1/faces/analyze", params={"api_key": tenant_key}, files={"image": ("a", unique_image())})
    assert r.json()["code"] == "credentials_in_query"
    seen.append(r.text + str(r.headers))
    r = httpx.post(gw.url + contract.ANALYZE_PATH, headers={contract.KEY_HEADER: tenant_key + "x"}, files={"image": ("a", b"")})
    seen.append(r.text + str(r.headers))
    seen.append(httpx.get(gw.url + "/metrics").text)
    seen.append(gw.logs())
    everything = "\n".join(seen)
    assert UPSTREAM_KEY not in everything
    assert tenant_key not in everything
    assert tenant_key[3:20] not in everything  # not even a fragment
    assert "Traceback" not in everything


def test_check_masks_the_upstream_key(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FACEGATE_UPSTREAM_API_KEY": UPSTREAM_KEY, "FACEGATE_TENANTS_FILE": str(tmp_path / "none.toml")}
    out = subprocess.run([sys.executable, "-m", "app", "check"], env=env, capture_output=True, text=True, check=False)
    assert UPSTREAM_KEY not in out.stdout + out.stderr
    assert "**********" in out.stdout
    assert out.returncode == 1  # the tenants file is missing and this is not sandbox mode
