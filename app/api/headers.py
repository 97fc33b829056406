"""Response headers derived from what a request did (rate limits, cache status).

RateLimit headers follow the IETF httpapi draft (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy`` lists each policy with its quota ``q`` and window ``w`` in
seconds; ``RateLimit`` gives, per policy, the remaining units ``r`` and the seconds
``t`` until they reset. Both are Structured Field Lists of named policies.
"""

from __future__ import annotations

import math

from app.context import RequestContext
from app.quota import Admission


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` for the burst policy and each limited quota."""
    policies: list[str] = []
    states: list[str] = []
    if admission.rate is not None:
        rate = admission.rate
        policies.append(f'"burst";q={rate.limit};w={max(1, math.ceil(rate.window_s))}')
        states.append(f'"burst";r={rate.remaining};t={math.ceil(rate.reset_s)}')
    for quota in admission.quotas:
        if quota.limit is None:
            continue
        policies.append(f'"{quota.name}";q={quota.limit};w={quota.window_s}')
        states.append(f'"{quota.name}";r={quota.remaining};t={math.ceil(quota.reset_s)}')
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}


def context_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Headers every answer carries, success or refusal."""
    out = [(b"x-request-id", ctx.request_id.encode("latin-1"))]
    if ctx.cache is not None:
        out.append((b"cache-status", ctx.cache.header().encode("latin-1")))
    if ctx.admission is not None:
        out.extend((k.lower().encode(), v.encode("latin-1")) for k, v in ratelimit_headers(ctx.admission).items())
    return out
