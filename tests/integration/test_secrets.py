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
    r = httpx.post(
        gw.url + contract.ANALYZE_PATH, headers={contract.KEY_HEADER: tenant_key + "x"}, files={"image": ("a", b"")}
    )
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

    env = {
        **os.environ,
        "FACEGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "FACEGATE_TENANTS_FILE": str(tmp_path / "none.toml"),
    }
    out = subprocess.run([sys.executable, "-m", "app", "check"], env=env, capture_output=True, text=True, check=False)
    assert UPSTREAM_KEY not in out.stdout + out.stderr
    assert "**********" in out.stdout
    assert out.returncode == 1  # the tenants file is missing and this is not sandbox mode


def test_internal_errors_carry_no_exception_text_and_no_keys(gateway_factory: Any, sim: Sim, tmp_path: Any) -> None:
    """The last-resort 500 path: an unexpected exception (here: the spool directory is missing)
    must reach neither the answer nor the logs with its message, and no key may ride along."""
    marker = "EXCEPTION-TEXT-MARKER-93b1"
    gw: Gateway = gateway_factory(
        env={
            "FACEGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "FACEGATE_SPOOL_DIR": str(tmp_path / marker / "missing"),
            "FACEGATE_SPOOL_THRESHOLD_BYTES": "1024",
        }
    )
    tenant_key = gw.key()
    r = gw.analyze(unique_image())  # > 1 KB: it has to spool, and the directory is not there
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    everything = "\n".join([r.text, str(r.headers), httpx.get(gw.url + "/metrics").text, gw.logs()])
    assert "unhandled error: FileNotFoundError" in everything  # the type is logged, for the operator
    assert marker not in everything, "exception text leaked"
    assert UPSTREAM_KEY not in everything
    assert tenant_key not in everything
    assert "Traceback" not in everything
    assert sim.calls == 0


def test_proxy_variables_do_not_divert_a_plain_http_upstream(gateway_factory: Any, sim: Sim) -> None:
    """The key travels in a header: over plain http a proxy would read it. For an http://
    upstream (the simulator, a sidecar) facegate ignores the proxy environment entirely."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(65536))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        gw: Gateway = gateway_factory(
            env={
                name: proxy
                for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            }
            | {"NO_PROXY": "", "no_proxy": ""}
        )
        r = gw.analyze(unique_image())
    finally:
        stop.set()
        thread.join(2)
        listener.close()
    assert r.status_code == 200, r.text
    assert sim.calls == 1
    assert seen == [], "the upstream call went through the proxy"
