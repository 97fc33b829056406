"""What one request did, filled in as it goes, read at the end by headers, logs and metrics.

The use case records here instead of returning HTTP details, so that it stays free of
HTTP types and a refusal raised halfway still leaves behind what was decided before it
(the rate-limit state for the headers, the cache status, the upstream time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.limits import Admission


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """One RFC 9211 ``Cache-Status`` entry for facegate's cache."""

    hit: bool
    fwd: Literal["uri-miss", "request"] | None = None
    stored: bool = False
    collapsed: bool = False
    ttl: float | None = None
    detail: str | None = None

    @property
    def label(self) -> str:
        """hit / miss / forced / collapsed — the metric and log label."""
        if self.collapsed:
            return "collapsed"
        if self.hit:
            return "hit"
        return "forced" if self.fwd == "request" else "miss"

    def header(self) -> str:
        parts = ["facegate"]
        if self.hit:
            parts.append("hit")
        if self.fwd:
            parts.append(f"fwd={self.fwd}")
        if self.ttl is not None:
            parts.append(f"ttl={max(0, int(self.ttl))}")
        if self.stored:
            parts.append("stored")
        if self.collapsed:
            parts.append("collapsed")
        if self.detail:
            parts.append(f'detail="{self.detail}"')
        return "; ".join(parts)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    route: str = ""
    tenant: str | None = None
    #: The operator's name on admin requests (then ``tenant`` stays None).
    operator: str | None = None
    admission: Admission | None = None
    cache: CacheStatus | None = None
    upstream_s: float | None = None
    upstream_attempts: int = 0
    #: This request's own upstream call: billed by ailabapi (True) or not (False); None = no call.
    billed: bool | None = None
    upstream_key: str | None = None  # the pool key's name (never the secret)
    queue_s: float | None = None  # time waited for an upstream slot
    image_bytes: int | None = None
    outcome: str | None = None
