"""Test images made on the fly with Pillow, so no binary fixtures live in the repo.

``sim=`` embeds a simulator directive (see ``app/sim/``): an ASCII
``facegate-sim:faces=2;error=ERROR_BLURRY_FACE`` string that the simulator finds
anywhere in the file's bytes. JPEG carries it in a COM segment, PNG in a tEXt
chunk, BMP after the pixel data.
"""

from __future__ import annotations

import io
import random

from PIL import Image, PngImagePlugin


def pixels(width: int, height: int, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic noisy image: different seeds give different bytes (and hashes)."""
    per_pixel = len(Image.new(mode, (1, 1)).tobytes())  # bands x bytes per band (16-bit modes)
    data = random.Random(seed).randbytes(width * height * per_pixel)
    return Image.frombytes(mode, (width, height), data)


def encode(
    img: Image.Image,
    fmt: str = "jpeg",
    *,
    sim: str | None = None,
    **save: object,
) -> bytes:
    """Encode ``img`` as ``fmt`` (jpeg, png, bmp, gif, webp, tiff), with an optional sim directive."""
    buf = io.BytesIO()
    directive = f"facegate-sim:{sim};".encode() if sim else None
    fmt = fmt.lower()
    if fmt == "jpeg":
        if directive:
            save["comment"] = directive
        img.save(buf, "JPEG", **save)
    elif fmt == "png":
        if directive:
            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", directive.decode())
            save["pnginfo"] = info
        img.save(buf, "PNG", **save)
    else:
        img.save(buf, fmt.upper(), **save)
        if directive:
            buf.write(directive)
    return buf.getvalue()


def make_image(
    fmt: str = "jpeg",
    width: int = 256,
    height: int = 256,
    *,
    seed: int = 0,
    mode: str = "RGB",
    sim: str | None = None,
    **save: object,
) -> bytes:
    """One call for the common case: a ``width`` x ``height`` noisy image in ``fmt``."""
    return encode(pixels(width, height, seed=seed, mode=mode), fmt, sim=sim, **save)
