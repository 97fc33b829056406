"""Per-tenant data policy: how long its answers are kept, whether at all, which fields never
leave or stay, and whether it may pay for a fresh analysis of an image already cached.

Set in the tenants file, per tenant or under ``[defaults]``::

    [tenants.hr]
    store = false                # nothing about its images stays after the answer
    omit = ["emotion", "gender"] # removed from its answers AND from what is stored for it
    cache_ttl_s = 86400          # its answers are kept 1 day instead of FACEGATE_CACHE_TTL_S
    max_age_s = 3600             # it is never answered from an analysis older than 1 hour
    allow_force = true           # may send X-Facegate-Force: 1 (a fresh, billable analysis)

Defaults keep facegate's behaviour without a policy: stored for ``FACEGATE_CACHE_TTL_S``,
every field, any age, no forcing.

``omit`` names v1 face fields (``emotion`` also removes the list shape's ``expression``).
In v1 answers an omitted field is ``null`` (the schema keeps every key); in the drop-in
route's answer and in the stored entry the upstream's own fields are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from app.schema.normalize import FACE_KEYS

#: The tenants-file settings this module reads.
POLICY_FIELDS: Final = frozenset({"store", "omit", "cache_ttl_s", "max_age_s", "allow_force"})
#: v1 face fields that may be omitted (the box is what a face *is*).
OMITTABLE: Final = frozenset(FACE_KEYS) - {"box"}
#: Longest TTL / maximum age accepted: ten years, in seconds.
MAX_SECONDS: Final = 10 * 366 * 86400


class PolicyError(ValueError):
    """A policy setting is unusable; the message is one line for an operator."""


@dataclass(frozen=True, slots=True)
class Policy:
    store: bool = True
    omit: frozenset[str] = frozenset()
    cache_ttl_s: int | None = None
    max_age_s: int | None = None
    allow_force: bool = False

    @property
    def shares_entries(self) -> bool:
        """Whether this tenant's answers may be written to a *shared* cache entry others read:
        only full, storable answers (otherwise others would get stripped answers, or this
        tenant's images would be kept although it asked for nothing to be)."""
        return self.store and not self.omit


DEFAULT_POLICY: Final = Policy()


def parse_policy(table: Mapping[str, Any], base: Policy, where: str) -> Policy:
    """``base`` overridden by the policy settings in ``table`` (other keys are ignored here)."""
    store, omit, ttl, max_age, force = base.store, base.omit, base.cache_ttl_s, base.max_age_s, base.allow_force
    if "store" in table:
        store = _bool(table["store"], where, "store")
    if "allow_force" in table:
        force = _bool(table["allow_force"], where, "allow_force")
    if "omit" in table:
        value = table["omit"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"[{where}] omit must be a list of field names")
        unknown = sorted(set(value) - OMITTABLE)
        if unknown:
            raise PolicyError(
                f"[{where}] omit: unknown field(s) {', '.join(unknown)} (one of {', '.join(sorted(OMITTABLE))})"
            )
        omit = frozenset(value) | ({"expression"} if "emotion" in value else set())
    if "cache_ttl_s" in table:
        ttl = _seconds(table["cache_ttl_s"], where, "cache_ttl_s")
    if "max_age_s" in table:
        max_age = _seconds(table["max_age_s"], where, "max_age_s")
    return Policy(store, omit, ttl, max_age, force)


def _bool(value: Any, where: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"[{where}] {name} must be true or false")
    return value


def _seconds(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SECONDS:
        raise PolicyError(f"[{where}] {name} must be a whole number of seconds from 1 to {MAX_SECONDS}")
    return value


# --- omitting fields --------------------------------------------------------------------------

#: Tencent shape: v1 field -> keys under face_detail_attributes_info.
_TENCENT: Final[Mapping[str, tuple[str, ...]]] = {
    "age": ("age",),
    "beauty": ("beauty",),
    "smile": ("smile",),
    "gender": ("gender",),
    "emotion": ("emotion",),
    "eyes": ("eye",),
    "eyebrows": ("eyebrow",),
    "hair": ("hair",),
    "hat": ("hat",),
    "head_pose": ("head_pose",),
    "mask": ("mask",),
    "moustache": ("moustache",),
    "nose": ("nose",),
    "face_shape": ("shape",),
    "skin": ("skin",),
    "mouth": ("mouth",),
}
#: List shape: v1 field -> keys under data.
_LIST: Final[Mapping[str, tuple[str, ...]]] = {
    "detection_confidence": ("face_probability_list",),
    "age": ("age_list",),
    "beauty": ("beauty_list",),
    "gender": ("gender_list",),
    "expression": ("expressions",),
    "eyes": ("glasses",),
    "hat": ("hat_list",),
    "mask": ("masks",),
    "head_pose": ("pose_list",),
    "quality": ("qualities",),
    "landmarks": ("landmarks", "landmark_count"),
    "pupils": ("pupils",),
}


def strip_raw(raw: dict[str, Any], omit: frozenset[str]) -> dict[str, Any]:
    """A copy of an ailabapi answer without the upstream fields behind the ``omit`` v1 fields."""
    if not omit:
        return raw
    out = dict(raw)
    infos = raw.get("face_detail_infos")
    if isinstance(infos, list):
        drop = {key for field in omit for key in _TENCENT.get(field, ())}
        faces = []
        for info in infos:
            if isinstance(info, dict) and isinstance(info.get("face_detail_attributes_info"), dict):
                attrs = {k: v for k, v in info["face_detail_attributes_info"].items() if k not in drop}
                faces.append({**info, "face_detail_attributes_info": attrs})
            else:
                faces.append(info)
        out["face_detail_infos"] = faces
    data = raw.get("data")
    if isinstance(data, dict):
        drop = {key for field in omit for key in _LIST.get(field, ())}
        out["data"] = {k: v for k, v in data.items() if k not in drop}
    return out


def strip_body(body: bytes, omit: frozenset[str]) -> bytes:
    """:func:`strip_raw` on JSON bytes (the drop-in route's answer)."""
    if not omit:
        return body
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return orjson.dumps(strip_raw(raw, omit)) if isinstance(raw, dict) else body


def null_fields(analysis: dict[str, Any], omit: frozenset[str]) -> dict[str, Any]:
    """A v1 analysis with the ``omit`` face fields set to null (faces are copied, not changed)."""
    if not omit or not analysis.get("faces"):
        return analysis
    nulls = dict.fromkeys(omit & OMITTABLE)
    return {**analysis, "faces": [{**face, **nulls} for face in analysis["faces"]]}
