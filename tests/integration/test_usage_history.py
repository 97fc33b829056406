"""Usage history for chargeback (issue 15 §4): three replicas on one Redis, real sockets.

A scripted day of traffic over three replicas — misses, hits, collapsed duplicates, a forced
re-analysis, a bad image, a quota refusal — and then the history equals the script, equals
what each tenant was told in ``/v1/usage``, equals what the simulator was asked, and equals
what the access log alone says was billed. It survives a Redis crash (append-only file, as in
the shipped compose and dev overlay). Tenants read their own history, operators everyone's.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from tests.cachekit import COMMON_ENV, in_parallel, send_concurrently, status, usage
from tests.conftest import Gateway, Sim, start_gateway, throwaway_redis, unique_image, write_tenants
from tests.servers import RedisServer, ServerProcess


@pytest.fixture(scope="module")
def replicas(
    sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Gateway], RedisServer]]:
    try:
        server = RedisServer(args=["--appendonly", "yes", "--appendfsync", "always"])
    except FileNotFoundError:
        server = throwaway_redis()  # skips with the reason
    tmp = tmp_path_factory.mktemp("history")
    keys = write_tenants(
        tmp / "tenants.toml",
        {"alpha": {"allow_force": True}, "capped": {"daily_quota": 1, "monthly_quota": 10}},
    )
    env = {
        **COMMON_ENV,
        "FACEGATE_REDIS_URL": server.url,
        "FACEGATE_REDIS_PREFIX": "h" + uuid.uuid4().hex[:12],
        "FACEGATE_TENANTS_FILE": str(tmp / "tenants.toml"),
    }
    sim = Sim(sim_server)
    gws = in_parallel(*(lambda i=i: start_gateway(sim, tmp / f"gw{i}", keys=keys, env=env) for i in range(3)))
    try:
        yield gws, server
    finally:
        for gw in gws:
            gw.server.stop()
        server.close()


def history(gw: Gateway, who: str, **params: str) -> httpx.Response:
    with gw.client(who) as c:
        return c.get("/v1/usage/history", params=params)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def test_history_equals_the_script_usage_the_upstream_and_the_access_log(
    replicas: tuple[list[Gateway], RedisServer], sim: Sim
) -> None:
    gws, server = replicas
    one, two, three = gws
    # alpha: three new images on three replicas, each repeated on another replica (hits).
    images = [unique_image() for _ in range(3)]
    for i, image in enumerate(images):
        assert gws[i].analyze(image).status_code == 200
        assert status(gws[(i + 1) % 3].analyze(image)).startswith("facegate; hit")
    # Six identical uploads at once over the three replicas: one paid call.
    sim.faults(latency_ms=300)
    burst = send_concurrently(gws, unique_image(), 6)
    sim.faults()
    assert [s.ok.status_code for s in burst] == [200] * 6
    # A browser reload costs nothing; an explicit force pays.
    assert status(two.analyze(images[0], headers={"Cache-Control": "no-cache"})).startswith("facegate; hit")
    assert status(three.analyze(images[0], headers={"X-Facegate-Force": "1"})) == "facegate; fwd=request; stored"
    # Refusals: a bad image, and capped's second new image of the day.
    assert one.analyze(b"not an image at all" * 10).status_code in (415, 422)
    assert two.analyze(unique_image(), tenant="capped").status_code == 200
    assert three.analyze(unique_image(), tenant="capped").json()["code"] == "quota_exceeded"

    day = today()
    body = history(one, "alpha", **{"from": day, "to": day}).json()
    assert [t["tenant"] for t in body["tenants"]] == ["alpha"]
    (alpha_day,) = body["tenants"][0]["days"]
    assert alpha_day["date"] == day
    assert alpha_day["billable_calls"] == alpha_day["credits"] == 5  # 3 images + the burst + the forced one
    assert alpha_day["forced"] == 1
    assert alpha_day["hits"] + alpha_day["collapsed"] == 3 + 1 + 5  # repeats, the reload, the burst's twins
    assert alpha_day["misses"] == 3 + 1 + 1 + alpha_day["collapsed"]
    assert alpha_day["refused"] == {next(iter(alpha_day["refused"])): 1}
    assert next(iter(alpha_day["refused"])) in ("invalid_image", "unsupported_media_type")

    everyone = history(two, "operator:ops").json()["tenants"]
    capped_day = next(t for t in everyone if t["tenant"] == "capped")["days"][0]
    assert capped_day["billable_calls"] == 1
    assert capped_day["refused"] == {"quota_exceeded": 1}
    assert next(t for t in everyone if t["tenant"] == "alpha")["days"][0] == alpha_day

    # = what each tenant was told in /v1/usage today
    for tenant, row in (("alpha", alpha_day), ("capped", capped_day)):
        told = usage(three, tenant)
        assert told["credits_spent"]["day"] == row["billable_calls"]
        assert told["cache"]["day"] == {"hits": row["hits"], "misses": row["misses"]}
    # = what the upstream was asked
    assert sim.calls == alpha_day["upstream_calls"] + capped_day["upstream_calls"] == 6
    # = what the access log alone says was billed, per tenant
    billed: dict[str, int] = {}
    for gw in gws:
        for line in gw.logs().splitlines():
            if line.startswith("{") and '"facegate.access"' in line:
                entry = json.loads(line)
                if entry.get("billed"):
                    billed[entry["tenant"]] = billed.get(entry["tenant"], 0) + entry["credits"]
    assert billed == {"alpha": 5, "capped": 1}

    # Who may read what: a tenant only its own; an operator's read is audited.
    refused = history(one, "alpha", tenant="capped")
    assert refused.status_code == 403
    assert refused.json()["code"] == "operator_required"
    assert history(one, "alpha", **{"from": "2026-01-02", "to": "2026-01-01"}).json()["code"] == "invalid_request"
    assert history(one, "alpha", **{"from": "2020-01-01", "to": "2026-01-01"}).json()["code"] == "invalid_request"
    audits = [json.loads(x) for x in two.logs().splitlines() if '"admin.usage_history.read"' in x]
    assert audits and audits[0]["actor"] == "operator:ops"

    # facegate usage --from --to --csv: the same numbers, for finance.
    env = dict(one.env)
    out = subprocess.run(
        [sys.executable, "-m", "app", "usage", "--from", day, "--to", day, "--csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["tenant"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    assert rows["alpha"]["billable_calls"] == "5"
    assert rows["capped"]["refused_quota_exceeded"] == "1"
    assert rows["alpha"]["date"] == day

    # A Redis crash (SIGKILL) and restart: the history is still there (append-only file).
    server.kill()
    server.start()
    after = history(one, "alpha", **{"from": day, "to": day})
    assert after.status_code == 200, after.text
    # (the refused reads above are in it too: a 403 and two 400s are answers with a problem)
    refused_reads = {"operator_required": 1, "invalid_request": 2}
    assert after.json()["tenants"][0]["days"][0] == {**alpha_day, "refused": {**alpha_day["refused"], **refused_reads}}
