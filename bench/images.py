"""Benchmark images and request bodies, made on the fly (no binary fixtures in the repo).

Distinct images are one base JPEG with a fixed-length tag in a COM segment right after
SOI: a different tag is a different SHA-256 (a cache miss) at no encoding cost, and the
body length stays the same. wrk's Lua script builds the same bodies from a prefix and a
suffix (see :func:`multipart_parts`), so Python and wrk send byte-identical layouts.
"""

from __future__ import annotations

import io
import random
import struct
from typing import Final

from PIL import Image

BOUNDARY: Final = "facegatebenchboundary7d3f2a"
CONTENT_TYPE: Final = f"multipart/form-data; boundary={BOUNDARY}"
TAG_MARK: Final = b"facegate-bench:"
#: Length of every tag: run id (8) + thread id (2) + counter (10) in the wrk script.
TAG_LEN: Final = 20


def jpeg_of_size(target_bytes: int, *, seed: int = 1, aspect: float = 4 / 3, quality: int = 90) -> bytes:
    """A photo-like (smoothed noise) JPEG of roughly ``target_bytes`` (within ~10%).

    Noise upscaled 4x has the entropy of a real photo, so the encoder, the gateway and
    the simulator do realistic work; a few size corrections converge on the target.
    """
    width = 640
    data = b""
    for _ in range(6):
        height = max(64, int(width / aspect))
        data = _encode(width, height, seed, quality)
        ratio = target_bytes / len(data)
        if 0.93 <= ratio <= 1.07:
            break
        width = max(64, int(width * ratio**0.5))
    return data


def _encode(width: int, height: int, seed: int, quality: int) -> bytes:
    rnd = random.Random(seed)
    sw, sh = max(1, width // 4), max(1, height // 4)
    small = Image.frombytes("RGB", (sw, sh), rnd.randbytes(sw * sh * 3))
    buf = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _com_header() -> bytes:
    """SOI plus the start of a COM segment whose payload is TAG_MARK + a TAG_LEN tag."""
    return b"\xff\xd8\xff\xfe" + struct.pack(">H", 2 + len(TAG_MARK) + TAG_LEN) + TAG_MARK


def tagged(jpeg: bytes, tag: str) -> bytes:
    """``jpeg`` with ``tag`` (padded/cut to TAG_LEN) in a COM segment: a distinct image."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    text = tag.encode("ascii")[:TAG_LEN].ljust(TAG_LEN, b"_")
    return _com_header() + text + jpeg[2:]


def multipart_head(filename: str = "photo.jpg") -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart(image: bytes) -> bytes:
    """A ``multipart/form-data`` body with one ``image`` field (as ailabapi and facegate take it)."""
    return multipart_head() + image + multipart_tail()


def multipart_parts(jpeg: bytes) -> tuple[bytes, bytes]:
    """(prefix, suffix) such that ``prefix + tag + suffix`` is the multipart body of ``tagged(jpeg, tag)``."""
    return multipart_head() + _com_header(), jpeg[2:] + multipart_tail()
