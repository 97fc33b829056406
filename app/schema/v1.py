"""Response schema v1: the one shape facegate answers in, whatever ailabapi sent.

These models are published twice: as the JSON Schema (``v1.schema.json``,
``GET /v1/schema``, ``/docs``) and as the typed client's return types. So the
class docstrings and field descriptions below are user documentation, and any
change here must be additive (``tests/unit/schema/test_v1.py`` enforces it); a
breaking change means ``/v2``.

Two rules shape every model: an attribute the upstream did not give is
``null`` (never guessed), and every key is always present, so clients see one
stable key set. The normalizer builds plain dicts for speed; these models are
the contract those dicts are tested against.

``python -m app.schema.v1 > app/schema/v1.schema.json`` regenerates the
committed schema.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schema.labels import LIST, TENCENT, labels

SCHEMA_VERSION: Final = "1"
#: ailabapi's side limits (``app.upstream.contract``, which the light client may not import;
#: ``tests/unit/schema/test_v1.py`` checks they agree): every answered image passed them.
MIN_SIDE_EXCLUSIVE: Final = 32
MAX_SIDE_EXCLUSIVE: Final = 4096

Provider = Literal["ailabapi", "simulator"]
UpstreamShape = Literal["tencent", "list"]
ImageFormat = Literal["jpeg", "png", "bmp"]


def _coded(what: str, *, tencent: str | None = None, list_: str | None = None) -> str:
    """A description that lists the labels each shape can produce, straight from the tables."""
    parts = [what]
    if tencent:
        parts.append(f"Tencent shape (`{tencent}`): {labels(TENCENT[tencent])}.")
    if list_:
        parts.append(f"List shape (`data.{list_}`): {labels(LIST[list_])}.")
    if not tencent or not list_:
        parts.append(f"null in the {'list' if tencent else 'Tencent'} shape.")
    parts.append("Unknown codes: label `unknown`, code kept.")
    return " ".join(parts)


def _tencent(what: str, key: str) -> str:
    return _coded(what, tencent=key)


class Attribute(BaseModel):
    """An enum-coded attribute.

    Use `label`: it is the same across both upstream shapes. `code` is ailabapi's raw
    code, whose meaning depends on `source.upstream_shape` (gender 0 is male in the
    Tencent shape and female in the list shape). A code missing from ailabapi's label
    tables yields label `unknown` with the code kept, because ailabapi may add values.
    """

    label: str = Field(description="Value from ailabapi's label tables, or `unknown`.")
    code: int = Field(description="ailabapi's raw code; read it together with `source.upstream_shape`.")
    confidence: float | None = Field(
        description=(
            "ailabapi's probability for this label, nominally 0..1 (Tencent shape). "
            "null when the shape gives none (list shape) or it was malformed."
        )
    )


class Box(BaseModel):
    """Face bounding box in pixels of the submitted image.

    Tencent shape: `face_rect`; list shape: `face_rectangles` [left, top, width, height].
    x and y may be negative when the box extends past the image edge.
    """

    x: int = Field(description="Left edge, px (may be negative).")
    y: int = Field(description="Top edge, px (may be negative).")
    width: int = Field(description="Width, px.")
    height: int = Field(description="Height, px.")


class HeadPose(BaseModel):
    """Head rotation in degrees.

    Tencent shape: `head_pose`, pitch and yaw -30..30, roll -180..180.
    List shape: `pose_list` [yaw, pitch, roll], yaw and pitch -90..90, roll -180..180.
    """

    pitch: float = Field(description="Up/down rotation, degrees.")
    yaw: float = Field(description="Left/right rotation, degrees.")
    roll: float = Field(description="In-plane rotation, degrees.")


class Eyes(BaseModel):
    """Eye attributes. null as a whole when the upstream gave none of them."""

    glasses: Attribute | None = Field(description=_coded("Glasses worn.", tencent="eye.glass", list_="glasses"))
    open: Attribute | None = Field(
        description=_tencent("Whether the eyes are open (ailabapi's code 1 means closed).", "eye.eye_open")
    )
    eyelid: Attribute | None = Field(description=_tencent("Eyelid type.", "eye.eyelid_type"))
    size: Attribute | None = Field(description=_tencent("Eye size.", "eye.eye_size"))


class Eyebrows(BaseModel):
    """Eyebrow attributes (Tencent shape only). null as a whole when none was given."""

    density: Attribute | None = Field(description=_tencent("Eyebrow density.", "eyebrow.eyebrow_density"))
    curve: Attribute | None = Field(description=_tencent("Eyebrow curve.", "eyebrow.eyebrow_curve"))
    length: Attribute | None = Field(description=_tencent("Eyebrow length.", "eyebrow.eyebrow_length"))


class Hair(BaseModel):
    """Hair attributes (Tencent shape only). null as a whole when none was given."""

    length: Attribute | None = Field(description=_tencent("Hair length.", "hair.length"))
    bangs: Attribute | None = Field(description=_tencent("Bangs (fringe).", "hair.bang"))
    color: Attribute | None = Field(description=_tencent("Hair colour.", "hair.color"))


class Hat(BaseModel):
    """Headwear. null as a whole when the upstream gave none of its attributes."""

    style: Attribute | None = Field(
        description=_coded(
            "Hat style; the list shape only says whether a hat is worn.",
            tencent="hat.style",
            list_="hat_list",
        )
    )
    color: Attribute | None = Field(description=_tencent("Hat colour.", "hat.color"))


class Mouth(BaseModel):
    """Mouth attributes (Tencent shape only). null when none was given."""

    open: Attribute | None = Field(description=_tencent("Whether the mouth is open.", "mouth.mouth_open"))


class Quality(BaseModel):
    """Face image quality (list shape only): ailabapi's `qualities.*_list` scores.

    Nominally 0..100, higher is better; ailabapi recommends >= 85 for recognition.
    Each score is null when the upstream omitted it.
    """

    score: float | None = Field(description="Overall quality (`score_list`).")
    blur: float | None = Field(description="Sharpness; higher = less blurred (`blur_list`).")
    fnf: float | None = Field(description="ailabapi's `fnf_list`, undocumented beyond 'higher is better'.")
    glasses: float | None = Field(description="Freedom from glasses occlusion (`glass_list`).")
    illumination: float | None = Field(description="Lighting quality (`illu_list`).")
    mask: float | None = Field(description="Freedom from mask occlusion (`mask_list`).")
    noise: float | None = Field(description="Freedom from image noise (`noise_list`).")
    pose: float | None = Field(description="Frontality of the head pose (`pose_list` in `qualities`).")


class Point(BaseModel):
    """A landmark, in pixels of the submitted image."""

    x: float = Field(description="Horizontal position, px.")
    y: float = Field(description="Vertical position, px.")


class Pupil(BaseModel):
    """One pupil: centre and radius, in pixels of the submitted image."""

    x: float = Field(description="Centre, horizontal, px.")
    y: float = Field(description="Centre, vertical, px.")
    radius: float = Field(description="Radius, px.")


class Pupils(BaseModel):
    """Both pupils (list shape only, on request with `?landmarks=true`)."""

    left: Pupil = Field(description="First triple of ailabapi's `pupils` (l.x, l.y, l.r).")
    right: Pupil = Field(description="Second triple of ailabapi's `pupils` (r.x, r.y, r.r).")


class Face(BaseModel):
    """One detected face. Every key is always present; null means the upstream did not give it.

    Numbers outside their documented range are passed through unchanged: they are
    ailabapi's answer, and clamping would hide an upstream change.
    """

    box: Box = Field(description="Where the face is.")
    detection_confidence: float | None = Field(
        description=("Face detection probability 0..1 (list shape `face_probability_list`); null in the Tencent shape.")
    )
    age: int | None = Field(
        description="Estimated age, years. Tencent shape 0..65 (65 means 65 or older); list shape 0..100."
    )
    beauty: int | None = Field(description="Beauty score 0..100 (both shapes).")
    smile: int | None = Field(description="Smile intensity 0..100 (Tencent shape); null in the list shape.")
    gender: Attribute | None = Field(
        description=_coded(
            "Perceived gender. The two shapes use OPPOSITE codes; compare labels.",
            tencent="gender",
            list_="gender_list",
        )
    )
    emotion: Attribute | None = Field(description=_tencent("Facial emotion.", "emotion"))
    expression: Attribute | None = Field(
        description=_coded("Facial expression (the list shape's coarse emotion).", list_="expressions")
    )
    eyes: Eyes | None = Field(description="Eye attributes; the list shape gives only `glasses`.")
    eyebrows: Eyebrows | None = Field(description="Eyebrow attributes (Tencent shape only).")
    hair: Hair | None = Field(description="Hair attributes (Tencent shape only).")
    hat: Hat | None = Field(description="Headwear; the list shape gives only `style` (none/present).")
    head_pose: HeadPose | None = Field(description="Head rotation (both shapes; ranges differ).")
    mask: Attribute | None = Field(
        description=_coded(
            "Face mask. The shapes use different codes for the same label; compare labels.",
            tencent="mask",
            list_="masks",
        )
    )
    moustache: Attribute | None = Field(description=_tencent("Moustache.", "moustache"))
    nose: Attribute | None = Field(description=_tencent("Nose shape.", "nose"))
    face_shape: Attribute | None = Field(description=_tencent("Face shape (ailabapi's `shape`).", "shape"))
    skin: Attribute | None = Field(description=_tencent("Skin tone.", "skin"))
    mouth: Mouth | None = Field(description="Mouth attributes (Tencent shape only).")
    quality: Quality | None = Field(description="Image quality scores (list shape only).")
    landmarks: list[Point] | None = Field(
        description=(
            "List shape only, with `?landmarks=true`: ailabapi's 105 facial landmarks in its order "
            "(`data.landmarks`, x/y interleaved). null otherwise, or when this face's set was incomplete."
        )
    )
    pupils: Pupils | None = Field(
        description="List shape only, with `?landmarks=true`: pupil centres and radii. null otherwise."
    )


class ImageInfo(BaseModel):
    """The image as facegate received and checked it (not as ailabapi reported it)."""

    sha256: str = Field(
        description="SHA-256 of the image bytes, lowercase hex (`GET /v1/faces/analyses/{sha256}` reads it again).",
        pattern=r"^[0-9a-f]{64}$",
    )
    width: int = Field(description="Width, px.", gt=MIN_SIDE_EXCLUSIVE, lt=MAX_SIDE_EXCLUSIVE)
    height: int = Field(description="Height, px.", gt=MIN_SIDE_EXCLUSIVE, lt=MAX_SIDE_EXCLUSIVE)
    format: ImageFormat = Field(description="Detected from the bytes, not from file name or Content-Type.")
    bytes: int = Field(description="Size of the image, bytes.", ge=1)


class Source(BaseModel):
    """Where the analysis came from."""

    provider: Provider = Field(
        description="`ailabapi` for the real API; `simulator` for facegate's built-in simulator."
    )
    upstream_request_id: str | None = Field(
        description="ailabapi's `request_id` of the call that produced the analysis; null when it gave none."
    )
    upstream_shape: UpstreamShape | None = Field(
        description=(
            "Shape of ailabapi's answer: `tencent` (face_detail_infos) or `list` (data.face_rectangles). "
            "It decides which fields can be non-null and how `code` values read. "
            "null when no face was found (that answer has no shape)."
        )
    )
    cached: bool = Field(description="true when served from facegate's cache: no credit was spent.")
    analyzed_at: datetime = Field(
        description="When ailabapi analyzed the image, UTC; for a cached answer, when the original call was."
    )


def _attr(label: str, code: int, confidence: float | None) -> dict[str, Any]:
    return {"label": label, "code": code, "confidence": confidence}


_EXAMPLE: Final[dict[str, Any]] = {
    "schema_version": SCHEMA_VERSION,
    "request_id": "01J9ZQ6V3K8XGQ2M4T7B5N1C0D",
    "image": {
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "width": 1024,
        "height": 768,
        "format": "jpeg",
        "bytes": 123456,
    },
    "faces": [
        {
            "box": {"x": 412, "y": 180, "width": 220, "height": 268},
            "detection_confidence": None,
            "age": 31,
            "beauty": 78,
            "smile": 40,
            "gender": _attr("male", 0, 0.99),
            "emotion": _attr("happy", 1, 0.91),
            "expression": None,
            "eyes": {
                "glasses": _attr("none", 0, 0.99),
                "open": _attr("open", 0, 0.98),
                "eyelid": _attr("double", 1, 0.75),
                "size": _attr("large", 2, 0.59),
            },
            "eyebrows": {
                "density": _attr("thick", 1, 0.83),
                "curve": _attr("flat", 0, 0.66),
                "length": _attr("long", 1, 0.71),
            },
            "hair": {
                "length": _attr("short", 1, 0.88),
                "bangs": _attr("none", 0, 0.93),
                "color": _attr("black", 0, 0.95),
            },
            "hat": {"style": _attr("none", 0, 0.99), "color": _attr("none", 0, 0.99)},
            "head_pose": {"pitch": -4.0, "yaw": 7.0, "roll": 1.0},
            "mask": _attr("none", 0, 0.99),
            "moustache": _attr("none", 0, 0.97),
            "nose": _attr("normal", 2, 0.75),
            "face_shape": _attr("oval", 2, 0.64),
            "skin": _attr("white", 3, 0.81),
            "mouth": {"open": _attr("closed", 0, 0.9)},
            "quality": None,
            "landmarks": None,
            "pupils": None,
        }
    ],
    "source": {
        "provider": "ailabapi",
        "upstream_request_id": "1D9A5E2C-3F4B-4C6D-8E7F-0A1B2C3D4E5F",
        "upstream_shape": "tencent",
        "cached": False,
        "analyzed_at": "2026-01-15T09:30:00Z",
    },
}


class AnalysisV1(BaseModel):
    """facegate's normalized face analysis, schema version 1.

    Both of ailabapi's answer shapes map onto it; `source.upstream_shape` says which one
    was seen and therefore which fields can be non-null. No face found is `faces: []`.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})

    schema_version: Literal["1"] = Field(
        description="Always 1: additive changes keep it, breaking ones get a new version (/v2)."
    )
    request_id: str = Field(description="facegate's request id, also sent as the X-Request-ID header.")
    image: ImageInfo = Field(description="The submitted image.")
    faces: list[Face] = Field(description="Detected faces in ailabapi's order; empty when no face was found.")
    source: Source = Field(description="Provenance of the analysis.")


def json_schema() -> dict[str, Any]:
    """The published contract; serialization mode because this model is only ever a response."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **AnalysisV1.model_json_schema(mode="serialization"),
    }


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
