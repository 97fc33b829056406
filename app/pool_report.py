"""``facegate upstream status``: the key pool as the operator sees it, read from Redis.

It prints what ``GET /admin/upstream-keys`` answers (:meth:`PoolView.as_dict`), so the
CLI and the endpoint never disagree: each key by name (never the secret), its state, calls
in flight, cooldown end and last balance, and the fair queue's depth.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from app import redisconn
from app.redisconn import RedisDown
from app.settings import Settings
from app.upstream.keys import KeysFileError, PoolSpec
from app.upstream.pool import PoolSettings, PoolView, RedisPool


def pool_spec(settings: Settings) -> PoolSpec:
    """The keys as the gateway would load them (the keys file, or the single key)."""
    qps, conc = settings.upstream_qps, settings.upstream_max_concurrency
    if settings.upstream_keys_file is not None:
        return PoolSpec.load(settings.upstream_keys_file, default_qps=qps, default_concurrency=conc)
    secret = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else "unset"
    return PoolSpec.single(secret, qps=qps, max_concurrency=conc)


def describe_spec(spec: PoolSpec) -> list[str]:
    """One line per key for ``facegate check`` (names and limits, never secrets)."""
    lines = [f"upstream keys: {len(spec.keys)} from {spec.source}" + ("" if spec.gated else " (never taken out)")]
    for k in spec.keys:
        lines.append(
            f"  {k.name:<20} {k.tier:<9} {k.qps:g} calls/s, {k.max_concurrency} in flight, "
            f"weight {k.weight:g}, low below {k.low_credits:g} credits"
        )
    if spec.max_concurrency or spec.qps:
        lines.append(f"  pool caps: {spec.max_concurrency or '-'} in flight, {spec.qps or '-'} calls/s")
    return lines


def _when(value: Any) -> str:
    return "-" if value is None else str(value).replace("T", " ").rstrip("Z")[:19]


async def print_status(settings: Settings, *, as_json: bool) -> None:
    if not settings.redis_url:
        print(
            "facegate: the pool's state lives in the serving process's memory when FACEGATE_REDIS_URL is not set; "
            "ask the running server (GET /admin/upstream-keys with an operator key) or configure Redis.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        spec = pool_spec(settings)
    except KeysFileError as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    client = redisconn.connect(settings)
    pool = RedisPool(
        client, redisconn.RedisHealth(timeout_s=5.0), settings.redis_prefix, spec=lambda: spec, settings=PoolSettings()
    )
    try:
        view: PoolView = await pool.snapshot()
    except RedisDown:
        print("facegate: Redis is unreachable", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await client.aclose()
    data = view.as_dict()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    head = ("key", "tier", "state", "in flight", "cooldown until", "balance", "read at")
    print(f"{head[0]:<20} {head[1]:<9} {head[2]:<9} {head[3]:>9} {head[4]:>19} {head[5]:>10} {head[6]:>19}")
    for k in data["keys"]:
        balance = "-" if k["balance"] is None else f"{k['balance']:g}"
        print(
            f"{k['name']:<20} {k['tier']:<9} {k['state']:<9} {k['in_flight']:>4}/{k['max_concurrency']:<4} "
            f"{_when(k['cooldown_until']):>19} {balance:>10} {_when(k['balance_at']):>19}"
            + (f"  ({k['reason']})" if k["reason"] and k["state"] not in ("ok", "low") else "")
        )
    waiting = ", ".join(f"{t} {n}" for t, n in data["waiting_by_tenant"].items())
    print(f"waiting for a slot: {data['waiting']}" + (f" ({waiting})" if waiting else ""))
