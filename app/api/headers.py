"""Response headers derived from what a request did (rate limits, cache status).

RateLimit headers follow the IETF httpapi draft (draft-ietf-httpapi-ratelimit-headers,
revisions -09 to -11 agree on this): both fields are Structured Field Lists (RFC 8941)
of Items whose value is the policy name as an sf-string.

- ``RateLimit-Policy``: per policy, the quota ``q`` and the window ``w`` in whole seconds.
  ``"burst";q=<burst>;w=<ceil(burst/rate)>`` describes the GCRA rate limit (q/w is the
  sustained rate, rounded down when burst/rate is not whole); ``"daily"`` (w=86400) and
  ``"monthly"`` (w = the month's length) the quotas of billable calls. Unlimited quotas
  are not advertised.
- ``RateLimit``: per policy, the remaining units ``r`` and the *effective window* ``t``:
  the seconds within which the client can use no more than ``r``. For a quota that is
  the time to the window's reset; for the GCRA burst it is the time until one more
  request is allowed after spending ``r`` now (so on a ``rate_limited`` 429, ``t``
  equals ``Retry-After``, as the draft asks: Retry-After is never earlier than ``t``).
"""

from __future__ import annotations

from app.context import RequestContext
from app.limits import Admission, ceil_s


def policy_items(admission: Admission) -> tuple[list[str], list[str]]:
    """(RateLimit-Policy items, RateLimit items) for the burst policy and each limited quota."""
    policies: list[str] = []
    states: list[str] = []
    if admission.rate is not None:
        rate = admission.rate
        policies.append(f'"burst";q={rate.limit};w={rate.policy_w}')
        states.append(f'"burst";r={rate.remaining};t={ceil_s(rate.next_s)}')
    for quota in admission.quotas:
        if quota.limit is None:
            continue
        policies.append(f'"{quota.name}";q={quota.limit};w={quota.window_s}')
        states.append(f'"{quota.name}";r={quota.remaining};t={ceil_s(quota.reset_s)}')
    return policies, states


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    policies, states = policy_items(admission)
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
