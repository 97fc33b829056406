"""Tenant registry and API-key authentication.

Tenants live in a TOML file that stores only the SHA-256 of each key, so the file can
sit in a ConfigMap or a git repository without exposing anything usable. Several
hashes per tenant allow rotation without downtime. The file is reloaded when it
changes (or on SIGHUP); a broken edit keeps the previous registry and logs why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from app.audit import audit
from app.policy import DEFAULT_POLICY, POLICY_FIELDS, Policy, PolicyError, parse_policy

log = logging.getLogger("facegate.tenants")

KEY_PREFIX: Final = "fg_"
#: Operator (admin) keys look different, so a leaked one is recognised (and scanned for) as such.
OPERATOR_KEY_PREFIX: Final = "fgop_"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Longest credential looked at; anything longer cannot be a facegate key and is not hashed.
MAX_KEY_LENGTH: Final = 256

DEFAULT_LIMITS: Final = {"rate_per_s": 10.0, "burst": 20, "daily_quota": 1000, "monthly_quota": 20000}
#: Bounds that keep the GCRA arithmetic (microseconds in doubles, in Lua and Python) exact enough.
MIN_RATE: Final = 0.001
MAX_RATE: Final = 1_000_000.0
MAX_BURST: Final = 1_000_000
UNLIMITED: Final = "unlimited"
#: How a tenant shares the upstream (``[defaults]`` or ``[tenants.NAME]``): see :class:`UpstreamShare`.
UPSTREAM_FIELDS: Final = frozenset({"share", "priority", "upstream_key", "upstream_fallback"})
MAX_SHARE: Final = 1000.0


class TenantsFileError(ValueError):
    """The tenants file is unusable; the message is one line meant for an operator."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tenant limits. ``None`` quota = unlimited."""

    rate_per_s: float
    burst: int
    daily_quota: int | None
    monthly_quota: int | None


Priority = Literal["interactive", "batch"]


@dataclass(frozen=True, slots=True)
class UpstreamShare:
    """How a tenant shares the upstream with the others (issue 13).

    ``share``: its weight when calls queue for the upstream (2 = twice the calls of a tenant
    with 1, when both have calls waiting); ``priority``: ``batch`` calls weigh a quarter of
    ``interactive`` ones; ``upstream_key``: the pool key this tenant's calls are billed to
    (its own ailabapi account) instead of the shared keys; ``upstream_fallback``: whether
    they may use the shared keys while that key is unusable.
    """

    share: float = 1.0
    priority: Priority = "interactive"
    upstream_key: str | None = None
    upstream_fallback: bool = False


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    limits: Limits
    #: Retention and field policy (``app/policy.py``): store, omit, cache_ttl_s, max_age_s, allow_force.
    policy: Policy = DEFAULT_POLICY
    #: How it shares the upstream with the others (share, priority, its own key): see UpstreamShare.
    upstream: UpstreamShare = UpstreamShare()


@dataclass(frozen=True, slots=True)
class Operator:
    """Someone allowed to use the admin routes (``/admin/...``) and purge any tenant's data."""

    name: str


def hash_key(key: str) -> str:
    """The stored form of a key. SHA-256 is enough: keys are 256-bit random, not passwords."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key(prefix: str = KEY_PREFIX) -> str:
    """A fresh key: ``fg_`` (tenants) or ``fgop_`` (operators) + 32 random bytes, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


class TenantRegistry:
    """An immutable snapshot of the tenants file."""

    def __init__(
        self,
        tenants: Mapping[str, Tenant],
        key_owners: Mapping[str, str],
        operators: Mapping[str, str] | None = None,
    ) -> None:
        self.tenants: dict[str, Tenant] = dict(tenants)
        self._key_owners: dict[str, str] = dict(key_owners)
        #: Operator key hash -> operator name; separate from tenant keys (a hash is never both).
        self._operator_keys: dict[str, str] = dict(operators or {})
        names = sorted(set(self._operator_keys.values()))
        self.operators: dict[str, Operator] = {name: Operator(name) for name in names}

    def __len__(self) -> int:
        return len(self.tenants)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant owning ``key``, or None — the same work whether or not the tenant exists.

        Only digests are compared. A timing side channel on the lookup could at most
        reveal how much of the digest of the caller's own guess matches a stored digest,
        which says nothing about any stored key (SHA-256 preimage resistance); so this is
        as safe as a constant-time compare, without scanning every key.
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        owner = self._key_owners.get(hash_key(key))
        return self.tenants.get(owner) if owner is not None else None

    def authenticate_operator(self, key: str | None) -> Operator | None:
        """The operator owning ``key``, or None (tenant keys never authenticate here)."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        owner = self._operator_keys.get(hash_key(key))
        return self.operators.get(owner) if owner is not None else None

    def key_counts(self) -> dict[str, int]:
        """How many key hashes each tenant and operator (``operator:NAME``) has: what a reload
        may report about keys (counts, never hashes)."""
        counts: dict[str, int] = {}
        for owner in self._key_owners.values():
            counts[owner] = counts.get(owner, 0) + 1
        for owner in self._operator_keys.values():
            counts[f"operator:{owner}"] = counts.get(f"operator:{owner}", 0) + 1
        return counts

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> TenantRegistry:
        unknown_tables = set(data) - {"defaults", "tenants", "operators"}
        if unknown_tables:
            # A typo like [tenant.x] would otherwise silently leave every tenant out.
            raise TenantsFileError(f"unknown top-level setting(s) {', '.join(sorted(unknown_tables))}")
        raw_defaults = data.get("defaults", {})
        allowed_defaults = set(DEFAULT_LIMITS) | POLICY_FIELDS | UPSTREAM_FIELDS
        if isinstance(raw_defaults, dict) and set(raw_defaults) - allowed_defaults:
            extra = sorted(set(raw_defaults) - allowed_defaults)
            raise TenantsFileError(f"[defaults]: unknown setting(s) {', '.join(extra)}")
        defaults = _limits(dict(DEFAULT_LIMITS), raw_defaults, "defaults")
        default_policy = _policy(raw_defaults, DEFAULT_POLICY, "defaults")
        upstream_defaults = _upstream(UpstreamShare(), raw_defaults, "defaults")
        tenants_table = data.get("tenants", {})
        if not isinstance(tenants_table, dict):
            raise TenantsFileError("[tenants] must be a table of tenants")
        tenants: dict[str, Tenant] = {}
        owners: dict[str, str] = {}
        for name, table in tenants_table.items():
            if not _NAME.match(name):
                raise TenantsFileError(f"tenant name {name!r}: use 1-64 letters, digits, '_' or '-'")
            if not isinstance(table, dict):
                raise TenantsFileError(f"[tenants.{name}] must be a table")
            unknown = set(table) - {"key_sha256", "disabled", *DEFAULT_LIMITS, *POLICY_FIELDS, *UPSTREAM_FIELDS}
            if unknown:
                raise TenantsFileError(f"[tenants.{name}]: unknown setting(s) {', '.join(sorted(unknown))}")
            hashes = table.get("key_sha256", [])
            if isinstance(hashes, str):
                hashes = [hashes]
            if not isinstance(hashes, list) or not hashes:
                raise TenantsFileError(f"[tenants.{name}]: key_sha256 must list at least one key hash")
            if table.get("disabled", False) is True:
                continue
            where = f"tenants.{name}"
            tenants[name] = Tenant(
                name,
                _limits(_as_dict(defaults), table, where),
                _policy(table, default_policy, where),
                _upstream(upstream_defaults, table, where),
            )
            for digest in hashes:
                if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
                    raise TenantsFileError(f"[tenants.{name}]: key_sha256 entries must be 64 hex characters")
                if digest.lower() in owners:
                    raise TenantsFileError(f"[tenants.{name}]: a key hash is also used by {owners[digest.lower()]}")
                owners[digest.lower()] = name
        return cls(tenants, owners, _operators(data.get("operators", {}), owners))

    @classmethod
    def load(cls, path: Path) -> TenantRegistry:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise TenantsFileError(
                f"tenants file {path} not found (create one: facegate keys create --tenant NAME)"
            ) from None
        except OSError as exc:
            raise TenantsFileError(f"tenants file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise TenantsFileError(f"tenants file {path}: invalid TOML ({exc})") from None
        except UnicodeDecodeError:
            raise TenantsFileError(f"tenants file {path}: not UTF-8 text") from None
        return cls.parse(data)


def _operators(table: Any, tenant_keys: Mapping[str, str]) -> dict[str, str]:
    """``[operators.NAME] key_sha256 = [...]``: operator key hash -> name."""
    if not isinstance(table, dict):
        raise TenantsFileError("[operators] must be a table of operators")
    owners: dict[str, str] = {}
    for name, entry in table.items():
        if not _NAME.match(name):
            raise TenantsFileError(f"operator name {name!r}: use 1-64 letters, digits, '_' or '-'")
        if not isinstance(entry, dict):
            raise TenantsFileError(f"[operators.{name}] must be a table")
        unknown = set(entry) - {"key_sha256", "disabled"}
        if unknown:
            raise TenantsFileError(f"[operators.{name}]: unknown setting(s) {', '.join(sorted(unknown))}")
        hashes = entry.get("key_sha256", [])
        if isinstance(hashes, str):
            hashes = [hashes]
        if not isinstance(hashes, list) or not hashes:
            raise TenantsFileError(f"[operators.{name}]: key_sha256 must list at least one key hash")
        if entry.get("disabled", False) is True:
            continue
        for given in hashes:
            if not isinstance(given, str) or not _HEX64.match(given.lower()):
                raise TenantsFileError(f"[operators.{name}]: key_sha256 entries must be 64 hex characters")
            digest = given.lower()
            if digest in tenant_keys:
                # One key must never be both: a tenant could then reach the admin routes.
                raise TenantsFileError(f"[operators.{name}]: a key hash is also a key of tenant {tenant_keys[digest]}")
            if digest in owners:
                raise TenantsFileError(f"[operators.{name}]: a key hash is also used by operator {owners[digest]}")
            owners[digest] = name
    return owners


def _policy(table: Any, base: Policy, where: str) -> Policy:
    try:
        return parse_policy(table, base, where)
    except PolicyError as exc:
        raise TenantsFileError(str(exc)) from None


def _as_dict(limits: Limits) -> dict[str, Any]:
    return {
        "rate_per_s": limits.rate_per_s,
        "burst": limits.burst,
        "daily_quota": limits.daily_quota,
        "monthly_quota": limits.monthly_quota,
    }


def _limits(base: dict[str, Any], table: Any, where: str) -> Limits:
    if not isinstance(table, dict):
        raise TenantsFileError(f"[{where}] must be a table")
    merged = {**base, **{k: v for k, v in table.items() if k in DEFAULT_LIMITS}}
    rate, burst = merged["rate_per_s"], merged["burst"]
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or not MIN_RATE <= rate <= MAX_RATE
    ):
        raise TenantsFileError(f"[{where}] rate_per_s must be a number from {MIN_RATE:g} to {MAX_RATE:g}")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise TenantsFileError(f"[{where}] burst must be an integer from 1 to {MAX_BURST}")
    return Limits(float(rate), burst, _quota(merged["daily_quota"], where), _quota(merged["monthly_quota"], where))


def _upstream(base: UpstreamShare, table: Any, where: str) -> UpstreamShare:
    if not isinstance(table, dict):
        raise TenantsFileError(f"[{where}] must be a table")
    share = table.get("share", base.share)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= MAX_SHARE:
        raise TenantsFileError(f"[{where}] share must be a number above 0 and at most {MAX_SHARE:g}")
    priority = table.get("priority", base.priority)
    if priority not in ("interactive", "batch"):
        raise TenantsFileError(f'[{where}] priority must be "interactive" or "batch"')
    key = table.get("upstream_key", base.upstream_key)
    if key is not None and (not isinstance(key, str) or not _NAME.match(key)):
        raise TenantsFileError(f"[{where}] upstream_key must name a key of the keys file")
    fallback = table.get("upstream_fallback", base.upstream_fallback)
    if not isinstance(fallback, bool):
        raise TenantsFileError(f"[{where}] upstream_fallback must be true or false")
    return UpstreamShare(float(share), priority, key, fallback)


def _quota(value: Any, where: str) -> int | None:
    if value is None or value == UNLIMITED:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TenantsFileError(f'[{where}] quotas must be integers >= 0 or "{UNLIMITED}"')
    return value


class TenantStore:
    """Holds the current registry and swaps it when the file changes.

    Reload keeps counters (they live in the quota backend, keyed by tenant name) and
    keeps the old registry when the new file is broken: a typo must not lock every
    tenant out.
    """

    def __init__(
        self, path: Path | None, registry: TenantRegistry, on_reload: Callable[[bool], None] | None = None
    ) -> None:
        self.path = path
        self.registry = registry
        #: Told each reload attempt's result (True: a new registry is live; False: it failed).
        self._on_reload = on_reload
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``). True when a new registry is live."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            registry = TenantRegistry.load(self.path)
        except TenantsFileError as exc:
            log.error("tenants file reload failed, keeping the previous registry: %s", exc)
            self._told(ok=False)
            return False
        except Exception as exc:  # the watcher must survive anything a file can do to the parser
            log.error("tenants file reload failed (%s), keeping the previous registry", type(exc).__name__)
            self._told(ok=False)
            return False
        changes = registry_changes(self.registry, registry)
        self.registry = registry
        log.info("tenants file reloaded: %d tenant(s)", len(registry))
        audit("tenants.reload", actor="system", file=str(self.path), **changes)
        self._told(ok=True)
        return True

    def _told(self, *, ok: bool) -> None:
        if self._on_reload is not None:
            self._on_reload(ok)


def registry_changes(old: TenantRegistry, new: TenantRegistry) -> dict[str, Any]:
    """What a reload changed, by name: tenants and operators added or removed, tenants whose
    settings changed (which ones), and whose keys changed (counts only, never hashes)."""
    changed: dict[str, list[str]] = {}
    for name in sorted(set(old.tenants) & set(new.tenants)):
        fields = _differences(old.tenants[name], new.tenants[name])
        if fields:
            changed[name] = fields
    old_keys, new_keys = old.key_counts(), new.key_counts()
    old_ops, new_ops = old._operator_keys, new._operator_keys
    rotated = sorted(
        owner
        for owner in set(old_keys) & set(new_keys)
        if old_keys[owner] != new_keys[owner]
        or _owned(old._key_owners if ":" not in owner else old_ops, owner)
        != _owned(new._key_owners if ":" not in owner else new_ops, owner)
    )
    return {
        "tenants_added": sorted(set(new.tenants) - set(old.tenants)),
        "tenants_removed": sorted(set(old.tenants) - set(new.tenants)),
        "tenants_changed": changed,
        "operators_added": sorted(set(new.operators) - set(old.operators)),
        "operators_removed": sorted(set(old.operators) - set(new.operators)),
        "keys_changed": rotated,
        "key_counts": {owner: new_keys[owner] for owner in rotated},
    }


def _owned(owners: Mapping[str, str], owner: str) -> frozenset[str]:
    name = owner.split(":", 1)[-1]
    return frozenset(h for h, o in owners.items() if o == name)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Names of the (nested dataclass) fields that differ between ``a`` and ``b``."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        out: list[str] = []
        for f in dataclasses.fields(a):
            out += _differences(getattr(a, f.name), getattr(b, f.name), f"{where}{f.name}.")
        return out
    return [] if a == b else [where.rstrip(".")]


def paste_line(key: str) -> str:
    """The TOML line an operator pastes under ``[tenants.NAME]``."""
    return f'key_sha256 = ["{hash_key(key)}"]'
