"""Prometheus metrics and structured logs.

Metrics live in a registry owned by each app instance (several apps in one test process
must not share counters). Label values are bounded: ``tenant`` is a name from the
tenants file or ``-``, ``route`` is the route template, never the raw path.

Logs are one JSON object per line (or a short human line on a terminal). Records carry
only fields facegate chose to put there: no request bodies, no headers, no keys.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from app.upstream import contract
from app.upstream.pool.base import KEY_STATES, PoolView

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BREAKER_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}
#: The ``outcome`` value of an ailabapi error code that is not in ``contract.ERROR_CODES``.
UNKNOWN_CODE: Final = "UNKNOWN_CODE"
#: facegate's own reasons (``ok``, ``connect_timeout``…) and ``HTTP_<status>`` for a bare status.
_OWN_OUTCOME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}|HTTP_[1-5][0-9][0-9]")


def outcome_label(outcome: str) -> str:
    """A bounded ``outcome`` label value: facegate's own reasons (``ok``, ``timeout``,
    ``connect``…: lower case, a fixed set in the code), ``HTTP_<status>`` and ailabapi's codes
    known to the contract pass as they are; any other code (one ailabapi introduced since, or
    garbage it answered) becomes ``UNKNOWN_CODE`` — the upstream must not choose label values."""
    if outcome in contract.ERROR_CODES or _OWN_OUTCOME.fullmatch(outcome):
        return outcome
    return UNKNOWN_CODE


class QuotaView(Protocol):
    """What the quota gauges read from an admission (app.quota.QuotaState has these)."""

    @property
    def name(self) -> str: ...
    @property
    def limit(self) -> int | None: ...
    @property
    def remaining(self) -> int | None: ...
    @property
    def reset_s(self) -> float: ...


class Metrics:
    """Every metric facegate exports, in one place so names stay consistent."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._clock = clock  # wall clock: quota windows reset at UTC midnight / the 1st
        r = self.registry
        self.requests = Counter(
            "facegate_http_requests", "HTTP requests answered.", ["route", "method", "status", "tenant"], registry=r
        )
        self.request_seconds = Histogram(
            "facegate_http_request_duration_seconds",
            "Time to answer, upload included.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_calls = Counter(
            "facegate_upstream_calls",
            "Attempts at calling ailabapi, by outcome (ok, an upstream code, timeout, connect...).",
            ["outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "facegate_upstream_duration_seconds",
            "Duration of one attempt at ailabapi.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache = Counter(
            "facegate_cache_requests",
            "Analyses by cache result (hit, miss, forced, collapsed).",
            ["result"],
            registry=r,
        )
        self.cache_errors = Counter(
            "facegate_cache_errors", "Cache backend errors (the request went on as a miss).", registry=r
        )
        self.breaker = Gauge(
            "facegate_upstream_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r
        )
        self.rejections = Counter(
            "facegate_limit_rejections", "Requests refused by a limit.", ["reason", "tenant"], registry=r
        )
        self.credits = Counter("facegate_credits_spent", "Billable upstream calls, by tenant.", ["tenant"], registry=r)
        self.uploads_in_flight = Gauge(
            "facegate_uploads_in_flight", "Uploads being received right now.", registry=r, multiprocess_mode="livesum"
        )
        self.redis_errors = Counter(
            "facegate_redis_errors", "Redis operations that failed, by component.", ["component"], registry=r
        )
        self._children: dict[tuple[str, str, int, str], tuple[Counter, Histogram]] = {}
        self.tenant_reloads = Counter(
            "facegate_tenants_reloads", "Tenants file reloads, by result.", ["result"], registry=r
        )
        # Quotas as this process last saw them, from each request's admission (no extra Redis
        # read): across replicas the freshest remaining is the minimum. Unlimited windows have
        # no series; a window that has reset since shows its full limit again (see exposition).
        self.quota_limit = Gauge(
            "facegate_quota_limit",
            "Billable calls a tenant may make per quota window (daily, monthly); no series when unlimited.",
            ["tenant", "window"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.quota_remaining = Gauge(
            "facegate_quota_remaining",
            "Billable calls left in the tenant's current quota window, as of this process's latest request.",
            ["tenant", "window"],
            registry=r,
            multiprocess_mode="livemin",
        )
        #: (tenant, window) -> (limit, remaining, wall-clock time the window resets)
        self._quotas: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._pool_metrics(r)

    # --- the upstream key pool and its fair queue (README "Upstream keys and fairness") -------

    def _pool_metrics(self, r: CollectorRegistry) -> None:
        self.queue_wait = Histogram(
            "facegate_upstream_queue_wait_seconds",
            "Time a call waited for an upstream slot (granted calls), by tenant and priority.",
            ["tenant", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_refusals = Counter(
            "facegate_upstream_queue_refusals",
            "Calls refused a slot: tenant (its share is full, 429), full, late, timeout, nokey (503).",
            ["tenant", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "facegate_upstream_queue_depth",
            "Calls waiting for an upstream slot, all replicas together (as last seen by this one).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_calls = Counter(
            "facegate_upstream_key_calls",
            "Attempts at ailabapi by pool key and outcome (ok, an ailabapi code, timeout, connect...).",
            ["key", "outcome"],
            registry=r,
        )
        self.key_state = Gauge(
            "facegate_upstream_key_state",
            "1 for the state each pool key is in (ok, low, cooling, exhausted, disabled), else 0.",
            ["key", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_in_flight = Gauge(
            "facegate_upstream_key_in_flight",
            "Calls in flight on each pool key, all replicas together.",
            ["key"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_credits = Gauge(
            "facegate_upstream_key_credits",
            "Last credit balance read for each pool key.",
            ["key"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_credits_low = Gauge(
            "facegate_upstream_key_credits_low",
            "1 when a pool key's balance is below its low_credits mark.",
            ["key"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.keys_usable = Gauge(
            "facegate_upstream_keys_usable",
            "Shared pool keys that can take calls now (ok or low); 0 = every shared call gets 503.",
            registry=r,
            multiprocess_mode="livemax",
        )

    def pool_view(self, view: PoolView) -> None:
        """Refresh the per-key gauges from the pool's shared state."""
        usable = 0
        for key in view.keys:
            for state in KEY_STATES:
                self.key_state.labels(key.name, state).set(1 if key.state == state else 0)
            self.key_in_flight.labels(key.name).set(key.in_flight)
            if key.balance is not None:
                self.key_credits.labels(key.name).set(key.balance)
                self.key_credits_low.labels(key.name).set(1 if key.balance < key.low_credits else 0)
            if key.tier != "dedicated" and key.state in ("ok", "low"):
                usable += 1
        self.keys_usable.set(usable)
        self.queue_depth.set(view.waiting)

    def request_done(
        self,
        route: str,
        method: str,
        status: int,
        tenant: str,
        *,
        seconds: float,
        cache: str | None,
        outcome: str | None,
        quotas: Iterable[QuotaView] = (),
    ) -> None:
        """Count one answered request. Label children are kept: ``labels()`` costs a lock and a
        validation each time, and this runs on every request (values are bounded, see above).
        ``quotas``: the tenant's quota windows from this request's admission, if it had one."""
        children = self._children.get((route, method, status, tenant))
        if children is None:
            children = self._children[(route, method, status, tenant)] = (
                self.requests.labels(route, method, str(status), tenant),
                self.request_seconds.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)
        if cache is not None:
            self.cache.labels(cache).inc()
        if outcome in ("rate_limited", "quota_exceeded", "too_many_uploads"):
            self.rejections.labels(outcome, tenant).inc()
        for quota in quotas:
            self._quota_seen(tenant, quota)

    def _quota_seen(self, tenant: str, quota: QuotaView) -> None:
        key = (tenant, quota.name)
        known = self._quotas.get(key)
        if quota.limit is None or quota.remaining is None:
            if known is not None:  # the tenant became unlimited (tenants file reloaded)
                del self._quotas[key]
                self.quota_limit.remove(*key)
                self.quota_remaining.remove(*key)
            return
        if known is not None and known[:2] == (quota.limit, quota.remaining) and known[2] > self._clock():
            return  # the common case (a cache hit changes nothing): no gauge writes
        self._quotas[key] = (quota.limit, quota.remaining, self._clock() + quota.reset_s)
        self.quota_limit.labels(*key).set(quota.limit)
        self.quota_remaining.labels(*key).set(quota.remaining)

    def _expire_quotas(self, now: float) -> None:
        """A window this process saw has reset: as far as it knows the tenant has its whole new
        allowance (another replica that served the tenant since reports less, and wins the min)."""
        for key, (limit, remaining, reset_at) in list(self._quotas.items()):
            if reset_at <= now:
                self._quotas[key] = (limit, limit, float("inf"))
                if remaining != limit:
                    self.quota_remaining.labels(*key).set(limit)

    def exposition(self) -> bytes:
        """The text format for /metrics; with several workers, the sum over all of them.

        One worker per container is the supported mode (exact, simplest). With
        FACEGATE_WORKERS > 1, ``facegate serve`` sets PROMETHEUS_MULTIPROC_DIR and every
        worker writes its values there; a scrape of any worker then aggregates them all.
        """
        self._expire_quotas(self._clock())
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def upstream_attempt(self, outcome: str, seconds: float) -> None:
        """One attempt at ailabapi ended (``outcome``: ok, an ailabapi code, or facegate's reason)."""
        self.upstream_calls.labels(outcome_label(outcome)).inc()
        self.upstream_seconds.observe(seconds)

    def tenants_reloaded(self, ok: bool) -> None:
        self.tenant_reloads.labels("ok" if ok else "error").inc()

    def breaker_changed(self, state: str) -> None:
        self.breaker.set(BREAKER_VALUES.get(state, 2))


# --- logging ---------------------------------------------------------------------------

#: Record attributes that are not ours to print (uvicorn adds a colourised copy of its message).
_RESERVED: Final = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Exceptions become their type name, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Short human lines for a terminal; the same fields, no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_") and v is not None
        )
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{when} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            line += f" error={record.exc_info[0].__name__}"
        return f"{line}  {extras}" if extras else line


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Route facegate's and uvicorn's logs through one handler in the chosen format."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("CI") else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Nothing facegate prints needs the caller's file/line, thread or process: skipping the
    # frame walk and lookups that logging does for every record keeps the access log cheap.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # The access log would print query strings (where someone may paste a key): ours replaces it.
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
