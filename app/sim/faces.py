"""What the simulator "sees" in an image (one ``Face`` truth per person) and the two ailabapi
answer shapes rendered from it, so either shape describes the same people.

Where the faces are comes from the detector (``detect.py``) when it runs, else from the
image's hash (one face per grid cell). Every attribute derives from sha256(image bytes):
a repeated image gets the same analysis, which is what makes cache and single-flight
tests meaningful. Age, gender, emotion and the rest are never estimated from the pixels.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from app.sim.config import DENSE_FEATURE_LENGTH, LANDMARK_COUNT, rng
from app.sim.detect import Box, Found, Point
from app.upstream import contract

_ENUMS: Final[dict[str, Any]] = json.loads(
    resources.files("app.schema").joinpath("enums.json").read_text(encoding="utf-8")
)
_TENCENT: Final[dict[str, Any]] = _ENUMS["tencent_style"]
_LIST: Final[dict[str, Any]] = _ENUMS["list_style"]
_QUALITIES: Final = ("score", "blur", "fnf", "glass", "illu", "mask", "noise", "pose")


@dataclass(frozen=True)
class Face:
    """What the simulator "sees" in one face, before either shape encodes it."""

    seed: str
    box: Box
    gender: str
    age: int
    beauty: int
    smile: int
    emotion: str
    glasses: str
    hat: str
    mask: str
    yaw: float
    pitch: float
    roll: float
    confidence: float
    #: Eye centres when a detector found the face (list shape's pupils sit on them).
    eyes: tuple[Point, Point] | None = None


def _labels(table: dict[str, str]) -> list[str]:
    return [table[k] for k in sorted(table, key=int)]


def _code(table: dict[str, str], label: str) -> int:
    return next(int(code) for code, name in table.items() if name == label)


def _mostly_first(rand: random.Random, labels: list[str]) -> str:
    """Most people wear no hat and no mask; code 0 ("none") is the common case."""
    return rand.choices(labels, weights=[len(labels) * 2] + [1] * (len(labels) - 1))[0]


def _layout(digest: str, n: int, width: int, height: int) -> list[Box]:
    """One face per grid cell, so faces never overlap and stay >= MIN_FACE_SIDE when cells allow."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_w, cell_h = width // cols, height // rows
    rand = rng(f"{digest}:layout:{n}")
    boxes = []
    for i in range(n):
        row, col = divmod(i, cols)
        side = min(cell_w, cell_h)
        w = max(min(contract.MIN_FACE_SIDE, side), int(side * rand.uniform(0.6, 0.9)))
        h = min(cell_h, int(w * rand.uniform(1.05, 1.25)))
        boxes.append((col * cell_w + rand.randint(0, cell_w - w), row * cell_h + rand.randint(0, cell_h - h), w, h))
    return boxes


def faces(digest: str, n: int, width: int, height: int) -> list[Face]:
    """``n`` faces for the image with this sha256, laid out on a grid; the same image, the same faces."""
    return _people(digest, [(box, None) for box in _layout(digest, n, width, height)])


def detected_faces(digest: str, found: Sequence[Found]) -> list[Face]:
    """The faces a detector found: their boxes, scores and eyes; attributes from the hash."""
    return _people(digest, [(face.box, face) for face in found])


def _people(digest: str, where: list[tuple[Box, Found | None]]) -> list[Face]:
    people = []
    for i, (box, seen) in enumerate(where):
        seed = f"{digest}:{i}"
        rand = rng(seed)
        emotion = rand.choice(_labels(_TENCENT["emotion"]))
        people.append(
            Face(
                seed=seed,
                box=box,
                gender=rand.choice(["male", "female"]),
                age=rand.randint(1, 90),
                beauty=rand.randint(20, 95),
                smile=rand.randint(50, 100) if emotion == "happy" else rand.randint(0, 49),
                emotion=emotion,
                glasses=rand.choice(_labels(_TENCENT["eye.glass"])),
                hat=_mostly_first(rand, _labels(_TENCENT["hat.style"])),
                mask=_mostly_first(rand, _labels(_TENCENT["mask"])),
                yaw=round(rand.uniform(-30, 30), 2),
                pitch=round(rand.uniform(-30, 30), 2),
                roll=round(rand.uniform(-30, 30), 2),
                confidence=seen.score if seen else round(rand.uniform(0.9, 1.0), 4),
                eyes=seen.eyes if seen else None,
            )
        )
    return people


def tencent_face(face: Face) -> dict[str, Any]:
    """One entry of ``face_detail_infos`` (the Tencent-style shape)."""
    rand = rng(f"{face.seed}:tencent")

    def item(table: str, label: str | None = None) -> dict[str, Any]:
        codes = _TENCENT[table]
        code = _code(codes, label) if label is not None else int(rand.choice(list(codes)))
        return {"type": code, "probability": round(rand.uniform(0.5, 1.0), 6)}

    hat_color = "none" if face.hat == "none" else rand.choice(_labels(_TENCENT["hat.color"])[1:])
    x, y, w, h = face.box
    return {
        "face_rect": {"x": x, "y": y, "width": w, "height": h},
        "face_detail_attributes_info": {
            "age": min(face.age, _TENCENT["_ranges"]["age"][1]),
            "beauty": face.beauty,
            "emotion": item("emotion", face.emotion),
            "eye": {
                "glass": item("eye.glass", face.glasses),
                "eye_open": item("eye.eye_open"),
                "eyelid_type": item("eye.eyelid_type"),
                "eye_size": item("eye.eye_size"),
            },
            "eyebrow": {
                "eyebrow_density": item("eyebrow.eyebrow_density"),
                "eyebrow_curve": item("eyebrow.eyebrow_curve"),
                "eyebrow_length": item("eyebrow.eyebrow_length"),
            },
            "gender": item("gender", face.gender),
            "hair": {"length": item("hair.length"), "bang": item("hair.bang"), "color": item("hair.color")},
            "hat": {"style": item("hat.style", face.hat), "color": item("hat.color", hat_color)},
            "head_pose": {"pitch": round(face.pitch), "yaw": round(face.yaw), "roll": round(face.roll)},
            "mask": item("mask", face.mask),
            "mouth": {"mouth_open": item("mouth.mouth_open")},
            "moustache": item("moustache", "none" if face.gender == "female" else None),
            "nose": item("nose"),
            "shape": item("shape"),
            "skin": item("skin"),
            "smile": face.smile,
        },
    }


def list_data(found: list[Face]) -> dict[str, Any]:
    """The ``data`` object of the list-style shape (parallel lists, one slot per face)."""
    keys = [
        *("face_rectangles", "face_probability_list", "age_list", "gender_list", "expressions"),
        *("glasses", "hat_list", "masks", "beauty_list", "pose_list", "pupils", "landmarks"),
    ]
    data: dict[str, Any] = {"face_count": len(found), **{key: [] for key in keys}}
    qualities: dict[str, list[float]] = {f"{q}_list": [] for q in _QUALITIES}
    for face in found:
        rand = rng(f"{face.seed}:list")
        x, y, w, h = face.box
        mask = face.mask if face.mask in ("none", "worn_properly") else "worn_incorrectly"
        data["face_rectangles"] += [x, y, w, h]
        data["face_probability_list"].append(face.confidence)
        data["age_list"].append(face.age)
        data["gender_list"].append(_code(_LIST["gender_list"], face.gender))
        data["expressions"].append(_code(_LIST["expressions"], "smile" if face.smile >= 50 else "neutral"))
        data["glasses"].append(_code(_LIST["glasses"], face.glasses))
        data["hat_list"].append(_code(_LIST["hat_list"], "none" if face.hat == "none" else "present"))
        data["masks"].append(_code(_LIST["masks"], mask))
        data["beauty_list"].append(face.beauty)
        data["pose_list"] += [face.yaw, face.pitch, face.roll]
        for eye, centre in enumerate((0.32, 0.68)):
            radius = round(w * rand.uniform(0.03, 0.05), 2)
            if face.eyes is not None:
                data["pupils"] += [round(face.eyes[eye][0], 2), round(face.eyes[eye][1], 2), radius]
                continue
            data["pupils"] += [
                round(x + w * (centre + rand.uniform(-0.03, 0.03)), 2),
                round(y + h * rand.uniform(0.38, 0.45), 2),
                radius,
            ]
        for _ in range(LANDMARK_COUNT):
            data["landmarks"] += [round(rand.uniform(x, x + w), 2), round(rand.uniform(y, y + h), 2)]
        for values in qualities.values():
            values.append(round(rand.uniform(60, 100), 2))
    data.update(landmark_count=LANDMARK_COUNT, dense_feature_length=DENSE_FEATURE_LENGTH, qualities=qualities)
    return data
