"""app/sim/detect.py: the sandbox's face detector on the committed photos, without a server."""

from __future__ import annotations

import pytest
from PIL import Image

from app.sim import detect
from tests.photos import assert_faces_found, iou, picture, truth

pytest.importorskip("cv2", reason="the sandbox extra is not installed: pip install -e '.[sandbox]'")


def yunet() -> detect.YuNet:
    found = detect.load()
    assert found is not None, "the sandbox extra is installed, so the detector must load"
    return found


def boxes(img: Image.Image) -> list[tuple[int, int, int, int]]:
    return [face.box for face in yunet().find(detect.shrink(img), img.width, img.height)]


def test_finds_the_faces_and_their_eyes() -> None:
    img = picture("grace_hopper.jpg")
    (face,) = yunet().find(detect.shrink(img), img.width, img.height)
    assert_faces_found([face.box], truth("grace_hopper.jpg"))
    assert 0.7 <= face.score <= 1
    (lx, ly), (rx, ry) = face.eyes
    x, y, w, h = face.box
    assert x < lx < rx < x + w  # image-left eye first, both inside the box, in its upper half
    assert y < ly < y + h / 2
    assert y < ry < y + h / 2


def test_a_large_image_is_seen_small_and_boxed_in_its_own_pixels() -> None:
    img = picture("astronaut.jpg").resize((2000, 2000))
    assert detect.shrink(img).size == (detect.DETECT_MAX_SIDE, detect.DETECT_MAX_SIDE)
    (found,) = boxes(img)
    x, y, w, h = truth("astronaut.jpg")[0]
    scale = 2000 / 512
    assert iou(found, (round(x * scale), round(y * scale), round(w * scale), round(h * scale))) >= 0.5


def test_faces_below_ailabapi_minimum_are_dropped() -> None:
    # At half size her face is about 47 x 56 px: the detector sees it, ailabapi (>= 64 px) would not.
    small = picture("astronaut.jpg").resize((256, 256))
    assert boxes(small) == []
    assert len(boxes(picture("astronaut.jpg"))) == 1


def test_no_faces_in_a_coffee_cup() -> None:
    assert boxes(picture("coffee.jpg")) == []


def test_a_model_file_that_does_not_match_its_digest_is_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "MODEL_SHA256", "0" * 64)
    found, why = detect._load()
    assert found is None
    assert "SHA-256" in why
