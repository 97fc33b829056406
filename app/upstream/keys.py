"""The pool of ailabapi keys: the keys file (TOML), its validation, and the pool of one.

A keys file names each ailabapi key and gives it its own limits, a weight and a tier::

    [pool]                       # optional: caps over all keys together, and the "low" mark
    max_concurrency = 8          # default: none beyond the keys' own
    qps = 8
    low_credits = 500

    [keys.main]
    key_file = "/run/secrets/ailabapi-main"   # or: key = "..."
    qps = 5
    max_concurrency = 5
    weight = 1
    tier = "primary"             # primary | reserve | dedicated

Without a keys file, ``FACEGATE_UPSTREAM_API_KEY`` alone is a pool of one key named
``default`` with ``FACEGATE_UPSTREAM_QPS`` and ``FACEGATE_UPSTREAM_MAX_CONCURRENCY``, which
is never taken out of rotation (today's behaviour; see :attr:`PoolSpec.gated`).

Secrets live only in :class:`KeySpec.secret` (masked in ``repr``); names are what logs,
metrics, Redis and the operator view show.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from app.audit import audit

log = logging.getLogger("facegate.upstream")

Tier = Literal["primary", "reserve", "dedicated"]
TIERS: Final[tuple[Tier, ...]] = ("primary", "reserve", "dedicated")
LEGACY_NAME: Final = "default"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: A key below this many credits shows as ``low`` unless the keys file says otherwise.
DEFAULT_LOW_CREDITS: Final = 100.0
_KEY_FIELDS: Final = {"key", "key_file", "qps", "max_concurrency", "weight", "tier", "low_credits"}
_POOL_FIELDS: Final = {"qps", "max_concurrency", "low_credits"}


class KeysFileError(ValueError):
    """The keys file is unusable; the message is one line for an operator (never a secret)."""


@dataclass(frozen=True, slots=True)
class Secret:
    """An ailabapi key. ``repr`` and ``str`` never show it; ``reveal()`` is for the one header."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "**********"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One ailabapi key of the pool, by name."""

    name: str
    secret: Secret
    qps: float
    max_concurrency: int
    weight: float = 1.0
    tier: Tier = "primary"
    low_credits: float = DEFAULT_LOW_CREDITS

    @property
    def shared(self) -> bool:
        """Serves every tenant (``dedicated`` keys serve only the tenants that name them)."""
        return self.tier != "dedicated"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The keys and the pool-wide caps. ``gated``: unhealthy keys are taken out of rotation.

    The pool of one built from ``FACEGATE_UPSTREAM_API_KEY`` is not gated: with no other key
    to move to, it keeps calling its key as facegate always did (health is still tracked and
    shown); a keys file — even with one key — is gated.
    """

    keys: tuple[KeySpec, ...]
    max_concurrency: int = 0  # all keys together; 0 = no cap beyond the keys' own
    qps: float = 0.0  # all keys together; 0 = no cap beyond the keys' own
    gated: bool = True
    source: str = "keys file"

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeysFileError("the pool has no keys")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    def get(self, name: str) -> KeySpec | None:
        for key in self.keys:
            if key.name == name:
                return key
        return None

    @classmethod
    def single(cls, secret: str, *, qps: float, max_concurrency: int) -> PoolSpec:
        """Today's configuration: one key, its limits, never taken out of rotation."""
        key = KeySpec(LEGACY_NAME, Secret(secret), qps, max_concurrency)
        return cls((key,), gated=False, source="FACEGATE_UPSTREAM_API_KEY")

    @classmethod
    def parse(
        cls, data: Mapping[str, Any], *, base_dir: Path, default_qps: float, default_concurrency: int
    ) -> PoolSpec:
        unknown = set(data) - {"pool", "keys"}
        if unknown:
            raise KeysFileError(f"unknown top-level setting(s) {', '.join(sorted(unknown))}")
        pool = data.get("pool", {})
        if not isinstance(pool, dict):
            raise KeysFileError("[pool] must be a table")
        extra = set(pool) - _POOL_FIELDS
        if extra:
            raise KeysFileError(f"[pool]: unknown setting(s) {', '.join(sorted(extra))}")
        low_default = _number(pool.get("low_credits", DEFAULT_LOW_CREDITS), "pool", "low_credits", minimum=0)
        table = data.get("keys", {})
        if not isinstance(table, dict) or not table:
            raise KeysFileError("[keys] must list at least one key ([keys.NAME] with key or key_file)")
        keys: list[KeySpec] = []
        secrets_seen: dict[str, str] = {}
        for name, entry in table.items():
            if not _NAME.match(name):
                raise KeysFileError(f"key name {name!r}: use 1-64 letters, digits, '_' or '-'")
            where = f"keys.{name}"
            if not isinstance(entry, dict):
                raise KeysFileError(f"[{where}] must be a table")
            extra = set(entry) - _KEY_FIELDS
            if extra:
                raise KeysFileError(f"[{where}]: unknown setting(s) {', '.join(sorted(extra))}")
            secret = _secret(entry, where, base_dir)
            if secret in secrets_seen:
                raise KeysFileError(f"[{where}]: the same ailabapi key is also configured as {secrets_seen[secret]}")
            secrets_seen[secret] = name
            tier = entry.get("tier", "primary")
            if tier not in TIERS:
                raise KeysFileError(f"[{where}] tier must be one of {', '.join(TIERS)}")
            conc = entry.get("max_concurrency", default_concurrency)
            if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
                raise KeysFileError(f"[{where}] max_concurrency must be an integer >= 1")
            keys.append(
                KeySpec(
                    name,
                    Secret(secret),
                    qps=_number(entry.get("qps", default_qps), where, "qps", minimum=0, exclusive=True),
                    max_concurrency=conc,
                    weight=_number(entry.get("weight", 1.0), where, "weight", minimum=0, exclusive=True),
                    tier=tier,
                    low_credits=_number(entry.get("low_credits", low_default), where, "low_credits", minimum=0),
                )
            )
        pool_conc = pool.get("max_concurrency", 0)
        if isinstance(pool_conc, bool) or not isinstance(pool_conc, int) or pool_conc < 0:
            raise KeysFileError("[pool] max_concurrency must be an integer >= 1 (0 or absent: no pool-wide cap)")
        pool_qps = _number(pool.get("qps", 0), "pool", "qps", minimum=0)
        return cls(tuple(keys), pool_conc, pool_qps, gated=True)

    @classmethod
    def load(cls, path: Path, *, default_qps: float, default_concurrency: int) -> PoolSpec:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise KeysFileError(f"keys file {path} not found") from None
        except OSError as exc:
            raise KeysFileError(f"keys file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError:
            # The decoder's message may quote the offending line, which can hold a key.
            raise KeysFileError(f"keys file {path}: invalid TOML") from None
        except UnicodeDecodeError:
            raise KeysFileError(f"keys file {path}: not UTF-8 text") from None
        spec = cls.parse(data, base_dir=path.parent, default_qps=default_qps, default_concurrency=default_concurrency)
        return PoolSpec(spec.keys, spec.max_concurrency, spec.qps, gated=True, source=str(path))


def _number(value: Any, where: str, name: str, *, minimum: float, exclusive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (exclusive and value == minimum):
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise KeysFileError(f"[{where}] {name} must be a number {bound}")
    return float(value)


def _secret(entry: Mapping[str, Any], where: str, base_dir: Path) -> str:
    if ("key" in entry) == ("key_file" in entry):
        raise KeysFileError(f"[{where}] needs exactly one of key or key_file")
    if "key" in entry:
        value = entry["key"]
        if not isinstance(value, str):
            raise KeysFileError(f"[{where}] key must be a string")
    else:
        raw = entry["key_file"]
        if not isinstance(raw, str) or not raw:
            raise KeysFileError(f"[{where}] key_file must be a path")
        path = Path(raw) if os.path.isabs(raw) else base_dir / raw
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeysFileError(f"[{where}] key_file {path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise KeysFileError(f"[{where}] key_file {path}: not UTF-8 text") from None
    value = value.strip()
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise KeysFileError(f"[{where}] the key is empty or contains whitespace")
    return value


class KeysStore:
    """The current pool spec, swapped when the keys file changes (like the tenants file).

    A broken edit keeps the previous spec and logs why; the pool of one (no file) never
    changes.
    """

    def __init__(
        self, spec: PoolSpec, path: Path | None = None, *, default_qps: float = 5.0, default_concurrency: int = 5
    ) -> None:
        self.spec = spec
        self.path = path
        self._defaults = (default_qps, default_concurrency)
        self._stamp = self._file_stamp()
        #: Bumped on every successful reload (the pool clears ``disabled`` states on it).
        self.generation = 0

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``). True when a new spec is live."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            spec = PoolSpec.load(self.path, default_qps=self._defaults[0], default_concurrency=self._defaults[1])
        except KeysFileError as exc:
            log.error("keys file reload failed, keeping the previous keys: %s", exc)
            return False
        except Exception as exc:  # the watcher must survive anything a file can do to the parser
            log.error("keys file reload failed (%s), keeping the previous keys", type(exc).__name__)
            return False
        changes = spec_changes(self.spec, spec)
        self.spec = spec
        self.generation += 1
        log.info("keys file reloaded: %d key(s): %s", len(spec.keys), ", ".join(spec.names))
        audit("upstream_keys.reload", actor="system", file=str(self.path), **changes)
        return True


_SETTINGS: Final = ("qps", "max_concurrency", "weight", "tier", "low_credits")


def spec_changes(old: PoolSpec, new: PoolSpec) -> dict[str, Any]:
    """What a reload changed, by key name: added, removed, and which settings of a key changed
    (``secret`` when its ailabapi key was replaced — never the key itself)."""
    before = {k.name: k for k in old.keys}
    after = {k.name: k for k in new.keys}
    changed: dict[str, list[str]] = {}
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        fields = [f for f in _SETTINGS if getattr(a, f) != getattr(b, f)]
        if a.secret.reveal() != b.secret.reveal():
            fields.append("secret")
        if fields:
            changed[name] = fields
    pool = [f for f in ("max_concurrency", "qps") if getattr(old, f) != getattr(new, f)]
    return {
        "keys_added": sorted(set(after) - set(before)),
        "keys_removed": sorted(set(before) - set(after)),
        "keys_changed": changed,
        "pool_changed": pool,
    }
