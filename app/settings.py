"""Configuration: environment variables with the ``FACEGATE_`` prefix, or a ``.env`` file.

Every setting has a default that works on a laptop: no Redis (in-memory backends, one
process) and no ailabapi key (sandbox: an embedded simulator answers). Invalid values
fail at start with one line naming the setting, never a traceback (see ``cli.py``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app import redisurl
from app.upstream import contract

DEFAULT_UPSTREAM_URL = "https://www.ailabapi.com"


class Settings(BaseSettings):
    """All of facegate's knobs. Names match the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="FACEGATE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- server ---
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    workers: int = Field(
        1, ge=1, le=64, description="uvicorn worker processes (1 per container is the supported mode)."
    )
    shutdown_grace_s: float = Field(20.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto = text on a terminal, JSON otherwise."
    )
    try_page: bool = Field(True, description="Serve the try-it page at /try.")

    # --- upstream ---
    upstream_url: str = Field(DEFAULT_UPSTREAM_URL, description="ailabapi base URL (point at the simulator in tests).")
    upstream_api_key: SecretStr | None = Field(None, description="The server-held ailabapi key.")
    upstream_api_key_file: Path | None = Field(None, description="File holding the key (container secrets).")
    upstream_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Total deadline of one upstream call, retries included."
    )
    upstream_connect_timeout_s: float = Field(5.0, gt=0, le=60)
    upstream_max_concurrency: int = Field(
        contract.DEFAULT_MAX_CONCURRENCY, ge=1, description="Calls in flight to ailabapi, all replicas together."
    )
    upstream_qps: float = Field(
        contract.DEFAULT_QPS, gt=0, description="Calls per second to ailabapi, all replicas together."
    )
    upstream_queue_timeout_s: float = Field(
        10.0, ge=0, description="How long a call may wait for an upstream slot before 503."
    )
    upstream_keys_file: Path | None = Field(
        None, description="A pool of named ailabapi keys (TOML); replaces FACEGATE_UPSTREAM_API_KEY."
    )
    upstream_lease_s: float = Field(
        5.0, gt=0, le=300, description="Lease of a held slot or queue place, renewed by its replica."
    )
    upstream_queue_max: int = Field(1000, ge=1, description="Calls waiting for the upstream, all tenants together.")
    upstream_queue_per_tenant: int = Field(200, ge=1, description="Calls one tenant may have waiting; more → 429.")
    upstream_cooldown_s: float = Field(
        1.0, gt=0, le=3600, description="How long a throttled key rests when ailabapi sends no Retry-After."
    )
    upstream_credits_poll_s: float = Field(
        600.0, ge=0.1, description="How often each key's balance is read (exhausted keys: every min(60 s, this))."
    )
    upstream_retries: int = Field(
        2, ge=0, le=10, description="Extra attempts for retryable failures, within the deadline."
    )
    upstream_billed_error_codes: list[str] = Field(
        default_factory=list,
        description="ailabapi error codes that still cost a credit (unknown upstream fact; default none).",
    )
    breaker_failures: int = Field(5, ge=1, description="Consecutive upstream failures that open the circuit breaker.")
    breaker_reset_s: float = Field(15.0, gt=0, description="How long the breaker stays open before one probe.")
    breaker_failure_rate: float = Field(
        0.5, ge=0, le=1, description="Also open at this share of failures among the last BREAKER_WINDOW calls; 0 = off."
    )
    breaker_window: int = Field(20, ge=2, description="Calls (within 60 s) the failure rate is measured over.")

    # --- storage ---
    redis_url: str = Field(
        "",
        description="Empty = in-memory cache and quotas (one process only); redis://, rediss://, unix:// "
        "(one Redis), redis+cluster:// (Cluster) or redis+sentinel:// (Sentinel): see app/redisurl.py.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels themselves (the URL's credentials are the data nodes')."
    )
    redis_prefix: str = Field("fg", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every Redis key.")
    redis_timeout_s: float = Field(1.0, gt=0, le=10, description="Per-operation Redis timeout (the cache fails open).")
    tenants_file: Path = Field(
        Path("tenants.toml"), description="Tenant registry (TOML), reloaded on change or SIGHUP."
    )

    # --- cache ---
    cache_ttl_s: int = Field(604800, ge=1, description="Lifetime of a cached analysis.")
    cache_negative_ttl_s: int = Field(
        86400, ge=1, description="Lifetime of a cached image verdict (no face, rejected)."
    )
    cache_scope: Literal["tenant", "shared"] = "tenant"
    cache_memory_max_bytes: int = Field(64 * 1024 * 1024, ge=0, description="Byte bound of the in-memory cache.")
    singleflight_lock_ttl_s: float = Field(
        5.0, gt=0, description="Lease of a cross-replica leader, renewed while it works."
    )
    invalidation_lease_s: float = Field(
        5.0,
        ge=2.0,
        description="How long a replica that cannot hear deletions keeps serving its local tier (minus 1 s).",
    )

    # --- images and uploads ---
    max_image_bytes: int = Field(contract.MAX_BYTES, ge=1, le=contract.MAX_BYTES)
    max_image_pixels: int = Field(contract.MAX_PIXELS, ge=1, le=contract.MAX_PIXELS)
    spool_threshold_bytes: int = Field(1024 * 1024, ge=0, description="Uploads above this are spooled to disk.")
    spool_dir: Path = Field(Path(tempfile.gettempdir()), description="Where large uploads are spooled.")
    max_uploads_in_flight: int = Field(64, ge=1, description="Uploads being received at once per process; more → 503.")
    max_uploads_per_tenant: int | None = Field(
        None, ge=1, description="One tenant's share of those; more → 429. Unset = half of MAX_UPLOADS_IN_FLIGHT."
    )
    body_timeout_s: float = Field(60.0, gt=0, description="Total time to receive one upload.")

    # --- quotas ---
    quota_fail_mode: Literal["closed", "open"] = Field(
        "closed", description="When Redis is down: refuse or allow billable calls."
    )

    # --- tracing ---
    otlp_endpoint: str = Field(
        "", description="OpenTelemetry: send request traces to this OTLP/HTTP collector (empty = no tracing)."
    )

    @field_validator("upstream_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value:
            return value
        target = redisurl.parse(value)
        from redis.connection import parse_url  # the options every topology shares, as redis-py reads them

        try:
            parse_url(target.options_url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(str(exc).replace(target.options_url, "(url)")) from None
        return value

    @property
    def redis_target(self) -> redisurl.RedisTarget:
        """The parsed ``redis_url`` (not empty)."""
        return redisurl.parse(self.redis_url)

    @model_validator(mode="after")
    def _key_file(self) -> Settings:
        if self.upstream_keys_file is not None and (
            self.upstream_api_key is not None or self.upstream_api_key_file is not None
        ):
            raise ValueError(
                "upstream_keys_file: set FACEGATE_UPSTREAM_KEYS_FILE or FACEGATE_UPSTREAM_API_KEY[_FILE], not both"
            )
        if self.upstream_api_key_file is not None and self.upstream_api_key is None:
            try:
                text = self.upstream_api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"upstream_api_key_file: cannot read ({exc.strerror})") from None
            if not text:
                raise ValueError("upstream_api_key_file: the file is empty")
            self.upstream_api_key = SecretStr(text)
        return self

    @property
    def sandbox(self) -> bool:
        """No ailabapi key → answers come from the embedded simulator, never the paid API."""
        return self.upstream_api_key is None and self.upstream_keys_file is None

    def masked(self) -> dict[str, object]:
        """The effective configuration for ``facegate check``, secrets shown as ``**********``."""
        out: dict[str, object] = {}
        for name, value in self.model_dump().items():
            shown: object = value
            if isinstance(value, SecretStr):
                shown = "**********"
            elif isinstance(value, Path):
                shown = str(value)
            elif name == "redis_url" and isinstance(value, str):
                shown = redisurl.masked(value)
            out[name] = shown
        return out


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, never echoing the value."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = "_".join(str(p) for p in err["loc"]).upper()
        name = f"FACEGATE_{loc}" if loc else "configuration"
        parts.append(f"{name}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
