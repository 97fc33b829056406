"""The committed public-domain photos (``tests/fixtures/photos/``) and their true face boxes.

Sources and licences: ``tests/fixtures/photos/README.md``. Boxes are (x, y, width, height)
in the photo's own pixels, drawn by hand, never by the detector under test.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

from PIL import Image

Box = tuple[int, int, int, int]

DIR = Path(__file__).resolve().parent / "fixtures" / "photos"
#: The least overlap (intersection over union) a returned box must have with a true face.
MIN_IOU = 0.5


def photo(name: str) -> bytes:
    return (DIR / name).read_bytes()


def picture(name: str) -> Image.Image:
    """The photo decoded (RGB, file closed)."""
    with Image.open(DIR / name) as img:
        return img.convert("RGB")


def size_of(name: str) -> tuple[int, int]:
    with Image.open(DIR / name) as img:
        return img.size


@cache
def _truth() -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = json.loads((DIR / "faces.json").read_text(encoding="utf-8"))
    return data


def truth(name: str) -> list[Box]:
    faces = _truth()[name]["faces"]
    assert isinstance(faces, list)
    return [(int(x), int(y), int(w), int(h)) for x, y, w, h in faces]


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def assert_faces_found(found: list[Box], true: list[Box]) -> None:
    """As many boxes as true faces, each true face covered by its own box with IoU >= MIN_IOU."""
    assert len(found) == len(true), (found, true)
    left = list(found)
    for face in true:
        best = max(left, key=lambda box: iou(box, face))
        assert iou(best, face) >= MIN_IOU, f"true face {face}: best box {best}, IoU {iou(best, face):.2f}"
        left.remove(best)


def two_faces() -> tuple[bytes, list[Box], tuple[int, int]]:
    """astronaut.jpg and grace_hopper.jpg side by side as one PNG, with both true boxes moved along."""
    first, second = picture("astronaut.jpg"), picture("grace_hopper.jpg")
    size = (first.width + second.width, max(first.height, second.height))
    canvas = Image.new("RGB", size, (128, 128, 128))
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width, 0))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    boxes = [*truth("astronaut.jpg"), *[(x + first.width, y, w, h) for x, y, w, h in truth("grace_hopper.jpg")]]
    return buf.getvalue(), boxes, size


def scaled(name: str, factor: float, fmt: str = "JPEG") -> tuple[bytes, list[Box], tuple[int, int]]:
    """The photo resized by ``factor`` (a large image, to check boxes come back in its own pixels)."""
    img = picture(name)
    size = (round(img.width * factor), round(img.height * factor))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(buf, fmt, quality=90)
    boxes = [(round(x * factor), round(y * factor), round(w * factor), round(h * factor)) for x, y, w, h in truth(name)]
    return buf.getvalue(), boxes, size
