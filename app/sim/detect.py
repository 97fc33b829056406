"""Finding real faces for the sandbox: the YuNet detector (OpenCV's ``cv2.FaceDetectorYN``)
on a downscaled copy of the image, boxes mapped back to the original pixels.

Optional: it needs the ``sandbox`` extra (``opencv-python-headless`` and ``numpy``). The
model is the 122 KB ONNX file shipped in ``app/sim/models/`` (MIT, provenance in its
README), checked against its SHA-256 before loading; nothing is downloaded, ever. Without
the extra, ``load`` says why and the simulator places faces by the image's hash instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from PIL import Image

from app.upstream import contract

log = logging.getLogger("facegate.sim")

MODEL_NAME: Final = "face_detection_yunet_2023mar_int8bq.onnx"
MODEL_SHA256: Final = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
#: Longest side the detector sees. YuNet finds faces of about 10 to 300 px at its input
#: size, so at 640 a 64 px face (ailabapi's smallest) in a 4095 px photo is still found.
DETECT_MAX_SIDE: Final = 640
#: Measured on 22 sample photos (scikit-image, matplotlib) and 5 noise images: the three
#: real faces scored 0.89 to 0.94, the best false positive (scikit-image's Moon) 0.52.
SCORE_THRESHOLD: Final = 0.7
NMS_THRESHOLD: Final = 0.3
TOP_K: Final = 5000

Box = tuple[int, int, int, int]  # left, top, width, height
Point = tuple[float, float]


@dataclass(frozen=True)
class Found:
    """One face the detector saw, in the original image's pixel coordinates."""

    box: Box
    score: float
    #: Eye centres, the one further left in the image first.
    eyes: tuple[Point, Point]


class YuNet:
    """A loaded detector. ``find`` may run in several worker threads at once: each thread
    gets its own ``FaceDetectorYN`` (the object keeps per-call state)."""

    def __init__(self, cv2: Any, np: Any, model: bytes) -> None:
        self._cv2 = cv2
        self._np = np
        self._model = np.frombuffer(model, dtype=np.uint8)
        self._local = threading.local()
        self.version = str(cv2.__version__)
        self._detector()  # fail now, at start, rather than on the first call

    def _detector(self) -> Any:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            empty = self._np.empty(0, dtype=self._np.uint8)
            detector = self._cv2.FaceDetectorYN.create(
                "onnx", self._model, empty, (320, 320), SCORE_THRESHOLD, NMS_THRESHOLD, TOP_K
            )
            self._local.detector = detector
        return detector

    def find(self, small: Image.Image, width: int, height: int) -> list[Found]:
        """Faces in ``small`` (an RGB copy of a ``width`` x ``height`` image), left to right.

        Boxes are clipped to the image; faces smaller than ailabapi's minimum
        (``contract.MIN_FACE_SIDE`` on either side, in original pixels) are dropped,
        since ailabapi would not report them.
        """
        detector = self._detector()
        detector.setInputSize((small.width, small.height))
        bgr = self._np.ascontiguousarray(self._np.asarray(small)[:, :, ::-1])
        _, rows = detector.detect(bgr)
        if rows is None:
            return []
        sx, sy = width / small.width, height / small.height
        found = []
        for row in rows.tolist():
            left, top = max(0, round(row[0] * sx)), max(0, round(row[1] * sy))
            right, bottom = min(width, round((row[0] + row[2]) * sx)), min(height, round((row[1] + row[3]) * sy))
            if min(right - left, bottom - top) < contract.MIN_FACE_SIDE:
                continue
            first, second = (row[4] * sx, row[5] * sy), (row[6] * sx, row[7] * sy)
            eyes = (first, second) if first[0] <= second[0] else (second, first)
            found.append(Found((left, top, right - left, bottom - top), round(float(row[14]), 4), eyes))
        return sorted(found, key=lambda face: (face.box[0], face.box[1]))


@functools.cache
def load() -> YuNet | None:
    """The process's detector, or None; either way said once in the log (the first call)."""
    detector, why = _load()
    if detector is None:
        log.warning("sandbox faces: no face detector, %s; faces are placed by the image's hash instead", why)
    else:
        log.info("sandbox faces: found by YuNet (OpenCV %s, offline)", detector.version)
    return detector


def _load() -> tuple[YuNet | None, str]:
    try:
        import cv2
        import numpy as np
    except ImportError as exc:
        return None, f"the sandbox extra is not installed ({exc.name or exc}): pip install 'facegate[sandbox]'"
    model = resources.files("app.sim").joinpath("models", MODEL_NAME).read_bytes()
    if hashlib.sha256(model).hexdigest() != MODEL_SHA256:
        return None, f"app/sim/models/{MODEL_NAME} does not match its SHA-256"
    try:
        # One thread per detection: concurrency comes from the simulator's decode slots,
        # and in sandbox mode the gateway shares this process's cores.
        cv2.setNumThreads(1)
        return YuNet(cv2, np, model), "ok"
    except Exception as exc:  # an OpenCV too old for this model, a broken install
        return None, f"OpenCV could not load the face detector: {exc}"


def shrink(img: Image.Image) -> Image.Image:
    """An RGB copy whose longest side is at most DETECT_MAX_SIDE."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    scale = DETECT_MAX_SIDE / max(rgb.size)
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
