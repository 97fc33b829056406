"""Judging the image as ailabapi would (format, sides, grayscale, truncation), and the
``facegate-sim:`` directive a test can embed in an image to steer the answer."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Final

from PIL import Image

from app.sim.config import DIRECTIVE_MARK, MAX_FACES
from app.sim.detect import DETECT_MAX_SIDE, shrink
from app.sim.replies import Refusal
from app.upstream import contract

_PIL_FORMATS: Final = ("JPEG", "PNG", "BMP")
_FORMAT_NAMES: Final = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp"}
#: Magic numbers of the accepted formats: a file that starts like one but will not open
#: is broken (422), not of the wrong type (415).
_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
_GRAY_MODES: Final = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_DIRECTIVE_RE: Final = re.compile(rb"([a-z_]+)=([A-Za-z0-9_.-]*);?")


@dataclass(frozen=True)
class Directive:
    """What an embedded ``facegate-sim:key=value;...`` asks for (docs/simulator.md)."""

    faces: int | None = None
    error: str | None = None
    shape: str | None = None
    latency_ms: int = 0


@dataclass(frozen=True)
class Picture:
    """An image ailabapi would accept: its format, size and any directive inside it."""

    format: str
    width: int
    height: int
    directive: Directive
    #: An RGB copy at most DETECT_MAX_SIDE on its longest side, when asked for and the
    #: directive leaves the faces to the detector.
    pixels: Image.Image | None = None


def inspect(data: bytes, *, keep_pixels: bool = False) -> Picture:
    """Judge the image as ailabapi would; runs in a worker thread (decoding is CPU work).

    Sides are checked from the header before ``load()``, so a decompression bomb is
    refused without allocating its pixels. Pillow's global MAX_IMAGE_PIXELS is left
    alone: in sandbox mode this runs inside the gateway, which owns that setting.
    With ``keep_pixels`` the same decode also yields the detector's small copy.
    """
    # Parsed first (it decides whether pixels are needed), refused last, as always.
    try:
        directive: Directive | Refusal = parse_directive(data)
    except Refusal as err:
        directive = err
    detect = keep_pixels and isinstance(directive, Directive) and directive.faces is None and not directive.error
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refusal("FILE_RESOLUTION_EXCEEDS_LIMITS") from None
    except Exception:
        if data.startswith(_MAGIC):
            raise Refusal("FILE_DECODING_FAILURE") from None
        raise Refusal("UNSUPPORTED_FILE_TYPES") from None
    with img:
        fmt = _FORMAT_NAMES.get(img.format or "")
        if fmt is None:
            raise Refusal("UNSUPPORTED_FILE_TYPES")
        width, height = img.size
        if max(width, height) >= contract.MAX_SIDE_EXCLUSIVE:
            raise Refusal("FILE_RESOLUTION_EXCEEDS_LIMITS")
        if min(width, height) <= contract.MIN_SIDE_EXCLUSIVE:
            raise Refusal("ERROR_LOW_RESOLUTION")
        if contract.REFUSE_GRAYSCALE and img.mode in _GRAY_MODES:
            raise Refusal("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE")
        if fmt == "jpeg":
            # libjpeg still entropy-decodes everything (so truncation is caught) but
            # allocates 1/64 of the pixels (or just enough for the detector).
            scale = min(1.0, DETECT_MAX_SIDE / max(width, height)) if detect else 1 / 8
            img.draft(img.mode, (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            img.load()
        except Exception:
            raise Refusal("FILE_DECODING_FAILURE") from None
        if contract.REFUSE_GRAYSCALE and img.mode == "P" and _gray_palette(img):
            raise Refusal("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE")
        if isinstance(directive, Refusal):
            raise directive
        pixels = shrink(img) if detect else None
    return Picture(fmt, width, height, directive, pixels)


def _gray_palette(img: Image.Image) -> bool:
    """A palette image is grayscale in effect when every colour it actually uses is gray."""
    palette = img.getpalette() or []
    used = [index for _, index in img.getcolors(256) or [] if isinstance(index, int)]
    return all(palette[3 * i] == palette[3 * i + 1] == palette[3 * i + 2] for i in used if 3 * i + 2 < len(palette))


def parse_directive(data: bytes) -> Directive:
    """The first ``facegate-sim:`` directive in the bytes; an unusable one is refused."""
    at = data.find(DIRECTIVE_MARK)
    if at < 0:
        return Directive()
    pos = at + len(DIRECTIVE_MARK)
    values: dict[str, str] = {}
    while match := _DIRECTIVE_RE.match(data, pos):
        values.setdefault(match[1].decode(), match[2].decode())
        pos = match.end()
        if not match[0].endswith(b";"):
            break
    known = {"faces", "error", "shape", "latency_ms"}
    if not values or not values.keys() & known:
        raise Refusal("ERROR_INVALID_PARAMETER", "simulator directive has no known key")
    try:
        faces = int(values["faces"]) if "faces" in values else None
        latency = int(values.get("latency_ms", "0"))
    except ValueError:
        raise Refusal("ERROR_INVALID_PARAMETER", "simulator directive: faces/latency_ms must be integers") from None
    error, shape = values.get("error"), values.get("shape")
    if faces is not None and not 0 <= faces <= MAX_FACES:
        raise Refusal("ERROR_INVALID_PARAMETER", f"simulator directive: faces must be 0..{MAX_FACES}")
    if not 0 <= latency <= 600_000:
        raise Refusal("ERROR_INVALID_PARAMETER", "simulator directive: latency_ms must be 0..600000")
    if error is not None and error not in contract.ERROR_CODES:
        raise Refusal("ERROR_INVALID_PARAMETER", f"simulator directive: unknown error {error!r}")
    if shape is not None and shape not in ("tencent", "list"):
        raise Refusal("ERROR_INVALID_PARAMETER", "simulator directive: shape must be tencent or list")
    return Directive(faces, error, shape, latency)
