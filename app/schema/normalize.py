"""Raw ailabapi JSON -> schema v1, for both answer shapes.

The cache stores ailabapi's raw answer and this runs on every hit, so it builds
plain dicts and never calls pydantic; ``tests/unit/schema/test_normalize.py`` checks the
dicts against :class:`app.schema.v1.AnalysisV1` instead.

It is also total: whatever JSON arrives, the result is a v1 dict or an
:class:`UpstreamFormatError` (which the gateway answers with a 502 and never
caches). A single malformed attribute becomes ``null`` rather than failing the
whole answer, because the caller already paid for the rest of it. Values
outside their documented range are kept: they are what ailabapi said, and
clamping would hide an upstream change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from app.schema.labels import LIST, TENCENT, UNKNOWN, Table
from app.schema.v1 import SCHEMA_VERSION
from app.upstream.contract import Shape, error_code_of

Face = dict[str, Any]

_NO_FACE: Final = "ERROR_NO_FACE_IN_FILE"

# --- the two shape tables -------------------------------------------------------------
# fmt: off
# A v1 place is "field" or "group.field". In both shapes the upstream location of a
# coded attribute is also the name of its label table in enums.json.

#: Tencent shape: v1 place <- path under face_detail_attributes_info (= label table).
_TENCENT_ATTRIBUTES: Final = (
    # v1 place            upstream / table
    ("gender",            "gender"),
    ("emotion",           "emotion"),
    ("eyes.glasses",      "eye.glass"),
    ("eyes.open",         "eye.eye_open"),  # 1 = closed
    ("eyes.eyelid",       "eye.eyelid_type"),
    ("eyes.size",         "eye.eye_size"),
    ("eyebrows.density",  "eyebrow.eyebrow_density"),
    ("eyebrows.curve",    "eyebrow.eyebrow_curve"),
    ("eyebrows.length",   "eyebrow.eyebrow_length"),
    ("hair.length",       "hair.length"),
    ("hair.bangs",        "hair.bang"),
    ("hair.color",        "hair.color"),
    ("hat.style",         "hat.style"),
    ("hat.color",         "hat.color"),
    ("mask",              "mask"),
    ("mouth.open",        "mouth.mouth_open"),
    ("moustache",         "moustache"),
    ("nose",              "nose"),
    ("face_shape",        "shape"),
    ("skin",              "skin"),
)

#: Tencent shape: integer v1 field <- key of face_detail_attributes_info.
_TENCENT_NUMBERS: Final = (
    ("age",     "age"),
    ("beauty",  "beauty"),
    ("smile",   "smile"),
)

#: List shape: v1 place <- per-face list under data (= label table). No probabilities.
_LIST_ATTRIBUTES: Final = (
    # v1 place       data key / table
    ("gender",       "gender_list"),  # OPPOSITE codes to Tencent: 0 = female
    ("expression",   "expressions"),
    ("eyes.glasses", "glasses"),
    ("hat.style",    "hat_list"),
    ("mask",         "masks"),  # different codes from Tencent's mask table
)

#: List shape: numeric v1 field <- per-face list under data, and whether it is an integer.
_LIST_NUMBERS: Final = (
    ("detection_confidence", "face_probability_list", False),
    ("age",                  "age_list",              True),
    ("beauty",               "beauty_list",           True),
)

#: List shape: v1 quality field <- per-face list under data.qualities.
_LIST_QUALITIES: Final = (
    ("score",        "score_list"),
    ("blur",         "blur_list"),
    ("fnf",          "fnf_list"),
    ("glasses",      "glass_list"),
    ("illumination", "illu_list"),
    ("mask",         "mask_list"),
    ("noise",        "noise_list"),
    ("pose",         "pose_list"),
)

#: Flattened per-face strides of the list shape (verified in ailabapi's written docs).
_RECT_STRIDE: Final = 4  # left, top, width, height
_POSE_STRIDE: Final = 3  # yaw, pitch, roll
_PUPILS_STRIDE: Final = 6  # l.x, l.y, l.r, r.x, r.y, r.r
#: Points per face when data.landmark_count is absent or unusable (docs: 105).
_LANDMARK_POINTS: Final = 105
_MAX_LANDMARK_POINTS: Final = 10_000

# --- v1 key sets (tests assert they equal the pydantic models' fields) ----------------
FACE_KEYS: Final = (
    "box", "detection_confidence", "age", "beauty", "smile", "gender", "emotion", "expression",
    "eyes", "eyebrows", "hair", "hat", "head_pose", "mask", "moustache", "nose", "face_shape",
    "skin", "mouth", "quality", "landmarks", "pupils",
)
GROUP_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "eyes": ("glasses", "open", "eyelid", "size"),
    "eyebrows": ("density", "curve", "length"),
    "hair": ("length", "bangs", "color"),
    "hat": ("style", "color"),
    "mouth": ("open",),
}
# fmt: on
_IMAGE_KEYS: Final = ("sha256", "width", "height", "format", "bytes")

# JSON integers are unbounded in Python but not in orjson or in clients' int64.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1


class UpstreamFormatError(ValueError):
    """ailabapi answered in neither known shape, or in one too broken to use.

    Distinct from upstream *errors* (which carry an error code): this is a 502 that
    must never be cached, because the next call may well answer properly.
    """


# --- compiled tables ------------------------------------------------------------------

Place = tuple[str | None, str]  # (group or None, field)


def _place(dotted: str) -> Place:
    group, _, field = dotted.rpartition(".")
    return (group or None, field)


_TENCENT_CODED: Final[tuple[tuple[Place, tuple[str, ...], Table], ...]] = tuple(
    (_place(v1), tuple(key.split(".")), TENCENT[key]) for v1, key in _TENCENT_ATTRIBUTES
)
_LIST_CODED: Final[tuple[tuple[Place, str, Table], ...]] = tuple(
    (_place(v1), key, LIST[key]) for v1, key in _LIST_ATTRIBUTES
)


# --- scalar readers: a malformed value becomes None -----------------------------------


def _int(value: Any) -> int | None:
    """Integers, or floats rounded: some serializers write 39.0 for 39."""
    kind = type(value)  # not isinstance: bool is an int subclass and must not pass
    if kind is float:
        if not math.isfinite(value):
            return None
        value = round(value)
    elif kind is not int:
        return None
    return value if _INT_MIN <= value <= _INT_MAX else None


def _code(value: Any) -> int | None:
    """Label codes are identities: 1.0 is code 1, but 1.5 is no code at all."""
    if type(value) is float and not value.is_integer():
        return None
    return _int(value)


def _float(value: Any) -> float | None:
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int and _INT_MIN <= value <= _INT_MAX:
        return float(value)
    return None


def _attribute(code_value: Any, confidence_value: Any, table: Table) -> dict[str, Any] | None:
    code = _code(code_value)
    if code is None:
        return None
    return {"label": table.get(code, UNKNOWN), "code": code, "confidence": _float(confidence_value)}


def _floats(values: Sequence[Any] | None) -> list[float] | None:
    """All of them, or None: a pose or pupil with one bad number is not a pose."""
    if values is None:
        return None
    out = [_float(v) for v in values]
    return None if None in out else out  # type: ignore[return-value]


def _box(x: Any, y: Any, width: Any, height: Any) -> dict[str, int] | None:
    box = {"x": _int(x), "y": _int(y), "width": _int(width), "height": _int(height)}
    return None if None in box.values() else box  # type: ignore[return-value]


# --- face assembly --------------------------------------------------------------------


def _new_face(box: dict[str, int]) -> Face:
    face = dict.fromkeys(FACE_KEYS)
    face["box"] = box
    return face


def _put(face: Face, groups: dict[str, dict[str, Any]], place: Place, value: Any) -> None:
    """Groups are created on first non-null member, so a group nobody filled stays null."""
    if value is None:
        return
    group, field = place
    if group is None:
        face[field] = value
        return
    members = groups.get(group)
    if members is None:
        members = groups[group] = dict.fromkeys(GROUP_KEYS[group])
    members[field] = value


# --- Tencent shape --------------------------------------------------------------------


def _dig(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _tencent_attribute(item: Any, table: Table) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    return _attribute(item.get("type"), item.get("probability"), table)


def _head_pose(pose: Any) -> dict[str, float] | None:
    if not isinstance(pose, dict):
        return None
    values = _floats([pose.get("pitch"), pose.get("yaw"), pose.get("roll")])
    return None if values is None else {"pitch": values[0], "yaw": values[1], "roll": values[2]}


def _tencent_face(index: int, info: Any) -> Face:
    rect = info.get("face_rect") if isinstance(info, dict) else None
    if not isinstance(rect, dict):
        raise UpstreamFormatError(f"face {index}: no face_rect")
    box = _box(rect.get("x"), rect.get("y"), rect.get("width"), rect.get("height"))
    if box is None:
        raise UpstreamFormatError(f"face {index}: unusable face_rect")
    face = _new_face(box)
    attrs = info.get("face_detail_attributes_info")
    if not isinstance(attrs, dict):
        return face
    for field, key in _TENCENT_NUMBERS:
        face[field] = _int(attrs.get(key))
    face["head_pose"] = _head_pose(attrs.get("head_pose"))
    groups: dict[str, dict[str, Any]] = {}
    for place, path, table in _TENCENT_CODED:
        _put(face, groups, place, _tencent_attribute(_dig(attrs, path), table))
    face.update(groups)
    return face


def _tencent_faces(body: dict[str, Any]) -> list[Face]:
    infos = body.get("face_detail_infos")
    if not isinstance(infos, list):
        raise UpstreamFormatError("face_detail_infos is not a list")
    return [_tencent_face(i, info) for i, info in enumerate(infos)]


# --- list shape -----------------------------------------------------------------------


class _Columns:
    """The per-face lists of one list-shape answer, fetched and type-checked once."""

    __slots__ = ("coded", "landmark_points", "landmarks", "numbers", "poses", "pupils", "qualities")

    def __init__(self, data: dict[str, Any], with_landmarks: bool) -> None:
        self.coded = [(place, _seq(data.get(key)), table) for place, key, table in _LIST_CODED]
        self.numbers = [(field, _seq(data.get(key)), is_int) for field, key, is_int in _LIST_NUMBERS]
        qualities = data.get("qualities")
        self.qualities = (
            [(field, _seq(qualities.get(key))) for field, key in _LIST_QUALITIES] if isinstance(qualities, dict) else []
        )
        self.poses = _seq(data.get("pose_list"))
        self.pupils = _seq(data.get("pupils")) if with_landmarks else None
        self.landmarks = _seq(data.get("landmarks")) if with_landmarks else None
        count = _count(data.get("landmark_count"))
        valid = count is not None and 0 < count <= _MAX_LANDMARK_POINTS
        self.landmark_points = count if count is not None and valid else _LANDMARK_POINTS


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _seq(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _at(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else None


def _chunk(values: list[Any] | None, index: int, stride: int) -> list[Any] | None:
    if values is None:
        return None
    chunk = values[index * stride : (index + 1) * stride]
    return chunk if len(chunk) == stride else None


def _list_boxes(data: dict[str, Any]) -> list[dict[str, int]]:
    """face_count wins when every counted face has a rectangle; else the complete rectangles do."""
    rects = _seq(data.get("face_rectangles")) or []
    count = _count(data.get("face_count"))
    complete = len(rects) // _RECT_STRIDE
    limit = complete if count is None else min(count, complete)
    boxes: list[dict[str, int]] = []
    for i in range(limit):
        box = _box(*rects[i * _RECT_STRIDE : (i + 1) * _RECT_STRIDE])
        if box is None:
            break
        boxes.append(box)
    if count and not boxes:
        raise UpstreamFormatError(f"face_count is {count} but no face_rectangles are usable")
    return boxes


def _list_pose(values: list[Any] | None) -> dict[str, float] | None:
    floats = _floats(values)
    return None if floats is None else {"pitch": floats[1], "yaw": floats[0], "roll": floats[2]}


def _list_pupils(values: list[Any] | None) -> dict[str, dict[str, float]] | None:
    floats = _floats(values)
    if floats is None:
        return None
    lx, ly, lr, rx, ry, rr = floats
    return {"left": {"x": lx, "y": ly, "radius": lr}, "right": {"x": rx, "y": ry, "radius": rr}}


def _list_landmarks(values: list[Any] | None) -> list[dict[str, float]] | None:
    floats = _floats(values)
    if not floats:  # an empty list (as in ailabapi's example) is no landmarks, not zero of them
        return None
    return [{"x": x, "y": y} for x, y in zip(floats[0::2], floats[1::2], strict=True)]


def _list_quality(columns: _Columns, index: int) -> dict[str, float | None] | None:
    quality = {field: _float(_at(values, index)) for field, values in columns.qualities}
    return quality if any(v is not None for v in quality.values()) else None


def _list_face(columns: _Columns, index: int, box: dict[str, int]) -> Face:
    face = _new_face(box)
    for field, values, is_int in columns.numbers:
        value = _at(values, index)
        face[field] = _int(value) if is_int else _float(value)
    groups: dict[str, dict[str, Any]] = {}
    for place, values, table in columns.coded:
        _put(face, groups, place, _attribute(_at(values, index), None, table))
    face.update(groups)
    face["head_pose"] = _list_pose(_chunk(columns.poses, index, _POSE_STRIDE))
    face["quality"] = _list_quality(columns, index)
    if columns.pupils is not None:
        face["pupils"] = _list_pupils(_chunk(columns.pupils, index, _PUPILS_STRIDE))
    if columns.landmarks is not None:
        face["landmarks"] = _list_landmarks(_chunk(columns.landmarks, index, 2 * columns.landmark_points))
    return face


def _list_faces(body: dict[str, Any], with_landmarks: bool) -> list[Face]:
    data = body["data"]  # detect_shape made sure it is a dict
    boxes = _list_boxes(data)
    if not boxes:
        return []
    columns = _Columns(data, with_landmarks)
    return [_list_face(columns, i, box) for i, box in enumerate(boxes)]


# --- public API -----------------------------------------------------------------------


def _as_dict(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, Mapping):
        return dict(raw)
    raise UpstreamFormatError(f"answer is a {type(raw).__name__}, not a JSON object")


def detect_shape(raw: Mapping[str, Any]) -> Shape:
    """Which of ailabapi's two documented shapes this answer is, judged by its keys.

    ``face_detail_infos`` wins if an answer somehow has both, since that is the
    shape of the product specification and of ailabapi's OpenAPI example.
    """
    body = _as_dict(raw)
    if "face_detail_infos" in body:
        return Shape.TENCENT
    data = body.get("data")
    if isinstance(data, dict) and ("face_rectangles" in data or "face_count" in data):
        return Shape.LIST
    raise UpstreamFormatError("answer has neither face_detail_infos nor data.face_rectangles/face_count")


def normalize_faces(raw: Any, *, landmarks: bool = False) -> tuple[Shape | None, list[Face]]:
    """The v1 faces of an ailabapi answer, and the shape they were read from.

    A no-face answer has no shape, hence ``(None, [])``. Any other error answer
    is refused: the gateway must map those to problem codes before normalizing.
    """
    body = _as_dict(raw)
    code = error_code_of(body)
    if code == _NO_FACE:
        return None, []
    if code:
        raise UpstreamFormatError(f"error answer {code[:64]!r} is not an analysis")
    shape = detect_shape(body)
    if shape is Shape.TENCENT:
        return shape, _tencent_faces(body)
    return shape, _list_faces(body, landmarks)


def build_analysis(
    raw: Any,
    *,
    request_id: str,
    image: Mapping[str, Any],
    provider: str,
    upstream_request_id: str | None,
    cached: bool,
    analyzed_at: str,
    landmarks: bool = False,
    normalized: tuple[Shape | None, list[Face]] | None = None,
) -> dict[str, Any]:
    """A JSON-ready dict matching :class:`app.schema.v1.AnalysisV1` key for key.

    ``normalized`` is ``normalize_faces(raw, landmarks=...)`` when the caller already has it
    (the cache-hit path memoizes it per entry).

    ``image`` carries the :class:`~app.schema.v1.ImageInfo` fields; extra keys are
    dropped so that intake internals never leak into the answer. An empty
    ``upstream_request_id`` (ailabapi's examples show ``""``) is reported as null.
    """
    shape, faces = normalized if normalized is not None else normalize_faces(raw, landmarks=landmarks)
    return {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "image": {key: image[key] for key in _IMAGE_KEYS},
        "faces": faces,
        "source": {
            "provider": provider,
            "upstream_request_id": upstream_request_id or None,
            "upstream_shape": None if shape is None else shape.value,
            "cached": cached,
            "analyzed_at": analyzed_at,
        },
    }
