"""Hostile uploads and malformed HTTP, each with the answer facegate documents for it.

Every case is built when the test runs (Pillow and ``struct``), as the exact bytes a
client puts on the wire: request line, headers, body, and pauses. That lets a case lie
about anything (Content-Length, chunk sizes, boundaries, header bytes) and stall where
it likes. ``Expect`` says what must come back and why; refused cases must cost nothing
(no upstream call, no quota), legitimate ones (CMYK, 16-bit, alpha, EXIF-rotated,
multi-frame PNG, polyglots that start as a valid JPEG, odd filenames) are answered 200
with exactly one upstream call.

Refusals come from two layers:

* facegate's intake (``app/intake/``): RFC 9457 problems
  with a ``code`` (``docs/images.md``);
* the HTTP server (uvicorn + ``app/httpserver.py``) for what is not valid HTTP/1.1 at
  all: plain-text ``400``, ``408`` or ``431`` with ``connection: close`` and no request
  id (``code`` None below), before the application sees a request.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from PIL import Image

from tests.imagegen import encode, pixels

#: The hostile gateway's upload time limit (FACEGATE_BODY_TIMEOUT_S) and head time limit.
BODY_TIMEOUT_S: Final = 1.5
#: The hostile gateway's pixel cap (FACEGATE_MAX_IMAGE_PIXELS): below ailabapi's own, so a
#: bomb whose sides are legal is still refused before anyone decodes it.
MAX_PIXELS: Final = 3000 * 3000
MAX_BYTES: Final = 20 * 1024 * 1024

Step = bytes | float  # bytes to send, or seconds to pause


@dataclass(frozen=True)
class Expect:
    status: int  # 0: the server closes the connection without answering
    code: str | None  # problem code; None for a server-layer refusal or a 200
    why: str
    #: Seconds within which the answer must come (generous: this is a bound, not a benchmark).
    within_s: float = 5.0

    @property
    def legit(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Case:
    name: str
    expect: Expect
    #: key -> the steps to put on the wire (built lazily: some bodies are 20 MB).
    build: Callable[[str], list[Step]] = field(repr=False)


# --- HTTP framing --------------------------------------------------------------------------


def head(
    key: str | None,
    ctype: bytes | None,
    length: int | None,
    *,
    extra: list[bytes] | None = None,
    path: bytes = b"/v1/faces/analyze",
    chunked: bool = False,
) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: facegate.test", b"Connection: close"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    if ctype is not None:
        lines.append(b"Content-Type: " + ctype)
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines += extra or []
    return b"\r\n".join(lines) + b"\r\n\r\n"


def raw_upload(body: bytes, ctype: bytes = b"image/jpeg") -> Callable[[str], list[Step]]:
    return lambda key: [head(key, ctype, len(body)) + body]


BOUNDARY: Final = b"facegate-hostile-7d1c"


def part(
    body: bytes,
    *,
    name: bytes = b"image",
    filename: bytes | None = b"x.jpg",
    ctype: bytes | None = b"image/jpeg",
    extra: list[bytes] | None = None,
) -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    lines = [disposition]
    if ctype is not None:
        lines.append(b"Content-Type: " + ctype)
    lines += extra or []
    return b"--" + BOUNDARY + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + body + b"\r\n"


def form(*parts: bytes, boundary: bytes = BOUNDARY, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + boundary + b"--\r\n" if close else b"")


def multipart(body: bytes, boundary: bytes = BOUNDARY) -> Callable[[str], list[Step]]:
    ctype = b"multipart/form-data; boundary=" + boundary
    return lambda key: [head(key, ctype, len(body)) + body]


def upload(image: bytes, **kw: Any) -> Callable[[str], list[Step]]:
    """The image as the multipart ``image`` field, the way ailabapi clients send it."""
    return multipart(form(part(image, **kw)))


# --- image crafting ------------------------------------------------------------------------

_seed = iter(range(50_000, 10**9))


def fresh(fmt: str = "jpeg", w: int = 128, h: int = 128, mode: str = "RGB") -> bytes:
    """A never-seen-before image (the hostile gateway's cache must not answer for it)."""
    return encode(pixels(w, h, seed=next(_seed), mode=mode), fmt)


def png_chunk(kind: bytes, data: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value)


def png(
    width: int,
    height: int,
    *,
    depth: int = 8,
    colour: int = 2,
    idat: bytes | None = None,
    extra: list[bytes] | None = None,
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64) if idat is None else idat
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra or [])
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """side x side RGB of zeros: a few KB compressed, side² x 3 bytes once decoded."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 3)
    out = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    return png(side, side, idat=out)


def bmp(
    width: int, height: int, *, bpp: int = 24, pixels_len: int | None = None, dib: int = 40, colours: int = 0
) -> bytes:
    stride = ((abs(width) * bpp + 31) // 32) * 4
    size = stride * abs(height) if pixels_len is None else pixels_len
    palette = b"\x10\x20\x30\x00" * (1 << bpp) if bpp <= 8 else b""
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, 0, size, 2835, 2835, colours, 0)
    header = struct.pack("<I", dib) + header[4:]
    return b"BM" + struct.pack("<IHHI", offset + size, 0, 0, offset) + header + palette + b"\x7f" * size


def jpeg_with(data: bytes, marker: int, transform: Callable[[bytearray, int], None]) -> bytes:
    """Apply ``transform(buf, offset_of_marker)`` to the first ``FF marker`` segment."""
    buf = bytearray(data)
    at = buf.index(bytes([0xFF, marker]))
    transform(buf, at)
    return bytes(buf)


def sof_size(width: int, height: int) -> Callable[[bytearray, int], None]:
    def apply(buf: bytearray, at: int) -> None:
        struct.pack_into(">HH", buf, at + 5, height, width)

    return apply


def jpeg_segments(count: int, size: int) -> bytes:
    """A valid JPEG with ``count`` COM segments of ``size`` payload bytes after its SOI."""
    base = fresh()
    com = b"\xff\xfe" + struct.pack(">H", size + 2) + b"c" * size
    return base[:2] + com * count + base[2:]


def exif_rotated() -> bytes:
    img = pixels(160, 120, seed=next(_seed))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def apng() -> bytes:
    frames = [pixels(96, 96, seed=next(_seed)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    assert b"acTL" in data
    return data


def animated(fmt: str) -> bytes:
    frames = [pixels(96, 96, seed=next(_seed)).convert("RGB") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def zip_with(payload: bytes) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("face.jpg", payload)
    return buf.getvalue()


def chunked(body: bytes, size: int = 1 << 20) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n\r\n"


# --- the corpus ----------------------------------------------------------------------------

T = BODY_TIMEOUT_S


def _bad(status: int, code: str | None, why: str, within_s: float = 5.0) -> Expect:
    return Expect(status, code, why, within_s)


INVALID = "invalid_image"
DIMS = "image_dimensions"
UNSUPPORTED = "unsupported_media_type"
BAD_REQUEST = "invalid_request"


def corpus() -> list[Case]:
    jpeg = fresh()
    pngimg = fresh("png")
    sos = jpeg.index(b"\xff\xda")
    cases = [
        # --- truncated and corrupted images -------------------------------------------
        Case(
            "jpeg cut at 90%",
            _bad(422, INVALID, "no EOI after the scan: a cut upload"),
            upload(jpeg[: len(jpeg) * 9 // 10]),
        ),
        Case(
            "jpeg without its EOI", _bad(422, INVALID, "libjpeg refuses a file that ends mid-scan"), upload(jpeg[:-2])
        ),
        Case(
            "jpeg reserved marker in the scan",
            _bad(422, INVALID, "FF 02 inside entropy data is what a corrupted byte looks like"),
            upload(jpeg[: sos + 200] + b"\xff\x02" + jpeg[sos + 202 :]),
        ),
        Case(
            "jpeg zero width",
            _bad(422, INVALID, "a DNL-style zero size, which libjpeg refuses"),
            upload(jpeg_with(fresh(), 0xC0, sof_size(0, 128))),
        ),
        Case(
            "jpeg segment longer than the file",
            _bad(422, INVALID, "a segment length running past the end is truncation"),
            upload(jpeg_with(fresh(), 0xE0, lambda b, at: struct.pack_into(">H", b, at + 2, 0xFFFF))[:4000]),
        ),
        Case(
            "jpeg 100001 tiny segments",
            _bad(422, INVALID, "MAX_SEGMENTS bounds the walk on hostile files"),
            upload(jpeg_segments(100_001, 0)),
        ),
        Case(
            "jpeg frame with a wrong component count",
            _bad(422, INVALID, "frame length and count disagree"),
            upload(jpeg_with(fresh(), 0xC0, lambda b, at: b.__setitem__(at + 9, 2))),
        ),
        Case(
            "jpeg-ls frame",
            _bad(415, UNSUPPORTED, "JPEG-LS (FF F7) is not what ailabapi reads"),
            upload(jpeg_with(fresh(), 0xC0, lambda b, at: b.__setitem__(at + 1, 0xF7))),
        ),
        Case(
            "png cut before IEND", _bad(422, INVALID, "a PNG needs its IEND"), upload(pngimg[:-12], ctype=b"image/png")
        ),
        Case(
            "png with a bad IHDR crc",
            _bad(422, INVALID, "CRCs are checked in every chunk"),
            upload(png(128, 128, extra=[])[:29] + b"\x00\x00\x00\x00" + png(128, 128)[33:]),
        ),
        Case(
            "png chunk claiming 2 GB",
            _bad(422, INVALID, "a chunk running past the end is truncation"),
            upload(png(128, 128)[:33] + struct.pack(">I", 0x7FFFFFFF) + b"IDAT" + b"\x00" * 64),
        ),
        Case(
            "png without IDAT",
            _bad(422, INVALID, "no image data at all"),
            upload(
                b"\x89PNG\r\n\x1a\n"
                + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 128, 128, 8, 2, 0, 0, 0))
                + png_chunk(b"IEND", b"")
            ),
        ),
        Case(
            "png 100001 empty chunks",
            _bad(422, INVALID, "MAX_SEGMENTS bounds the chunk walk"),
            upload(png(128, 128, extra=[png_chunk(b"teXt", b"")] * 100_001)),
        ),
        Case(
            "apple CgBI png",
            _bad(422, INVALID, "standard decoders cannot read Apple's CgBI PNGs"),
            upload(b"\x89PNG\r\n\x1a\n" + png_chunk(b"CgBI", b"\x50\x00\x20\x02") + png(128, 128)[8:]),
        ),
        Case(
            "grayscale png",
            _bad(415, UNSUPPORTED, "ailabapi refuses grayscale (REFUSE_GRAYSCALE)"),
            upload(fresh("png", mode="L")),
        ),
        Case("webp", _bad(415, UNSUPPORTED, "ailabapi takes JPEG, PNG and BMP only"), upload(fresh("webp"))),
        Case(
            "truncated webp",
            _bad(415, UNSUPPORTED, "sniffed as WebP from its RIFF header, refused by type"),
            upload(fresh("webp")[:40]),
        ),
        Case("animated gif", _bad(415, UNSUPPORTED, "GIF is not accepted"), upload(animated("GIF"))),
        Case("multi-page tiff", _bad(415, UNSUPPORTED, "TIFF is not accepted"), upload(animated("TIFF"))),
        Case(
            "bmp cut short",
            _bad(422, INVALID, "the pixel array is shorter than stride x rows"),
            upload(bmp(128, 128, pixels_len=128 * 3 * 50)),
        ),
        Case("bmp negative width", _bad(422, INVALID, "width <= 0 is corrupt"), upload(bmp(-128, 128))),
        Case(
            "bmp palette larger than its depth",
            _bad(422, INVALID, "OpenCV refuses it"),
            upload(bmp(128, 128, bpp=8, colours=1 << 20)),
        ),
        Case(
            "bmp with a 20-byte header",
            _bad(415, UNSUPPORTED, "not a DIB header size any decoder reads"),
            upload(bmp(128, 128, dib=20)),
        ),
        # --- sizes and bombs -----------------------------------------------------------
        Case("1x1 jpeg", _bad(422, DIMS, "each side must be more than 32 px"), upload(fresh("jpeg", 1, 1))),
        Case("1x1 bmp", _bad(422, DIMS, "each side must be more than 32 px"), upload(bmp(1, 1))),
        Case("100000x1 png", _bad(422, DIMS, "judged from the header, never decoded"), upload(png(100_000, 1))),
        Case(
            "100000x1 bmp header",
            _bad(422, DIMS, "judged from the header before the pixel array"),
            upload(bmp(100_000, 1, pixels_len=0)),
        ),
        Case(
            "65535x65535 jpeg header",
            _bad(422, DIMS, "refused from the SOF before any scan is read"),
            upload(jpeg_with(fresh(), 0xC0, sof_size(65535, 65535))),
        ),
        Case(
            "png bomb 4000x4000 of zeros",
            _bad(422, DIMS, "legal sides, but over FACEGATE_MAX_IMAGE_PIXELS"),
            upload(png_bomb(4000)),
        ),
        Case(
            "png with a 25 MB text chunk",
            _bad(413, "image_too_large", "over the 20 MB cap, cut off while streaming"),
            lambda key: [
                head(key, b"image/png", None, chunked=True),
                chunked(png(128, 128, extra=[png_chunk(b"tEXt", b"k\x00" + b"v" * (25 << 20))])),
            ],
        ),
        Case(
            "chunked body over the cap",
            _bad(413, "image_too_large", "no Content-Length: the stream is cut at the cap"),
            lambda key: [
                head(key, b"image/jpeg", None, chunked=True),
                chunked(b"\xff\xd8\xff" + b"\0" * (MAX_BYTES + 1)),
            ],
        ),
        Case(
            "expect-100 with 3 GB announced",
            _bad(413, "image_too_large", "refused from Content-Length before the client sends a byte of body"),
            lambda key: [head(key, b"image/jpeg", 3 << 30, extra=[b"Expect: 100-continue"])],
        ),
        # --- polyglots -----------------------------------------------------------------
        Case(
            "zip with a jpeg inside",
            _bad(415, UNSUPPORTED, "judged by the magic at offset 0: a ZIP"),
            upload(zip_with(fresh())),
        ),
        Case(
            "gif/javascript polyglot",
            _bad(415, UNSUPPORTED, "GIF89a magic: a GIF"),
            upload(b"GIF89a/*\x00\x00*/=1;alert(1)//" + b"\x00" * 200),
        ),
        Case(
            "pdf with a jpeg appended",
            _bad(415, UNSUPPORTED, "%PDF- magic: a PDF"),
            upload(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n" + fresh()),
        ),
        Case(
            "html sent as image/png",
            _bad(415, UNSUPPORTED, "the Content-Type is not evidence"),
            raw_upload(b"<html><script>alert(1)</script></html>", b"image/png"),
        ),
        Case(
            "svg with script",
            _bad(415, UNSUPPORTED, "SVG is not accepted (and never rendered)"),
            upload(b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
        ),
        Case(
            "base64-encoded part",
            _bad(415, UNSUPPORTED, "Content-Transfer-Encoding is not honoured: text bytes"),
            upload(base64.b64encode(fresh()), extra=[b"Content-Transfer-Encoding: base64"]),
        ),
        # --- legitimate oddities: answered, one upstream call ---------------------------
        Case(
            "jpeg with a zip appended",
            Expect(200, None, "a valid JPEG; bytes after EOI are ignored by decoders"),
            upload(fresh() + zip_with(b"payload")),
        ),
        Case(
            "cmyk jpeg",
            Expect(200, None, "4 components (CMYK/YCCK) decode to colour"),
            upload(fresh("jpeg", mode="CMYK")),
        ),
        Case("16-bit png", Expect(200, None, "every legal PNG depth is accepted"), upload(_png16())),
        Case(
            "rgba png",
            Expect(200, None, "alpha is fine; ailabapi takes PNG"),
            upload(fresh("png", mode="RGBA"), ctype=b"image/png"),
        ),
        Case(
            "exif-rotated jpeg",
            Expect(200, None, "orientation is reported, sizes are as stored"),
            upload(exif_rotated()),
        ),
        Case(
            "apng with 3 frames",
            Expect(200, None, "a PNG; decoders show the first frame"),
            upload(apng(), ctype=b"image/png"),
        ),
        Case(
            "jpeg with 6 MB of comments",
            Expect(200, None, "metadata within the 20 MB cap is legal (spooled)", 10),
            upload(jpeg_segments(100, 65_000)),
        ),
        Case(
            "unicode, RTL and traversal in the filename",
            Expect(200, None, "the client's filename is never used or forwarded"),
            upload(fresh(), filename="../../etc/\u202egpj.exe\U0001f600".encode()),
        ),
        Case(
            "quote and CR-LF escapes in the filename",
            Expect(200, None, "the filename is ignored"),
            upload(fresh(), filename=b'a\\"b%0d%0aX-Injected: 1.jpg'),
        ),
        Case(
            "png sent as image/jpeg",
            Expect(200, None, "the bytes decide the format, not the Content-Type"),
            raw_upload(fresh("png"), b"image/jpeg"),
        ),
        # --- multipart -------------------------------------------------------------------
        Case(
            "1000 parts",
            _bad(400, BAD_REQUEST, "MAX_PARTS (16)"),
            multipart(form(*[part(b"v", name=b"f%d" % i, filename=None, ctype=None) for i in range(1000)])),
        ),
        Case(
            "100 KB part header",
            _bad(400, BAD_REQUEST, "MAX_PART_HEADER_BYTES (8 KiB)"),
            multipart(form(part(fresh(), extra=[b"X-Pad: " + b"p" * 100_000]))),
        ),
        Case(
            "300-byte boundary",
            _bad(400, BAD_REQUEST, "boundaries are at most 200 bytes (RFC 2046 says 70)"),
            multipart(
                form(
                    part(
                        fresh(),
                    ),
                    boundary=b"b" * 300,
                ),
                boundary=b"b" * 300,
            ),
        ),
        Case(
            "body uses another boundary",
            _bad(400, BAD_REQUEST, "the declared boundary never closes"),
            lambda key: [
                head(key, b"multipart/form-data; boundary=declared", len(form(part(fresh())))) + form(part(fresh()))
            ],
        ),
        Case(
            "only a preamble",
            _bad(400, BAD_REQUEST, "no part and no closing boundary"),
            multipart(b"this is not multipart at all\r\n" * 10),
        ),
        Case(
            "nested multipart/mixed as the image",
            _bad(415, UNSUPPORTED, "the image field's bytes are not an image"),
            multipart(form(part(form(part(fresh()), boundary=b"inner"), ctype=b"multipart/mixed; boundary=inner"))),
        ),
        Case("empty image part", _bad(400, "image_missing", "0 bytes"), upload(b"")),
        Case(
            "16 KB of other fields",
            _bad(400, BAD_REQUEST, "MAX_OTHER_FIELDS_BYTES (16 KiB)"),
            multipart(form(part(b"x" * 20_000, name=b"note", filename=None, ctype=None), part(fresh()))),
        ),
        # --- HTTP framing (server layer unless a code is given) ----------------------------
        Case(
            "100 KB of headers",
            _bad(431, None, "MAX_HEAD_BYTES (64 KiB) in app/httpserver.py"),
            lambda key: [
                head(key, b"image/jpeg", 3, extra=[b"X-Pad-%d: %s" % (i, b"p" * 1000) for i in range(100)])
                + b"\xff\xd8\xff"
            ],
        ),
        Case(
            "100 KB url",
            _bad(431, None, "the request line counts toward MAX_HEAD_BYTES"),
            lambda key: [head(key, b"image/jpeg", 3, path=b"/v1/faces/analyze?" + b"a" * 100_000) + b"\xff\xd8\xff"],
        ),
        Case(
            "bare CR in a header",
            _bad(400, None, "httptools refuses it (no header injection)"),
            lambda key: [head(key, b"image/jpeg", 3, extra=[b"X-Request-ID: a\rInjected: 1"]) + b"\xff\xd8\xff"],
        ),
        Case(
            "NUL in a header",
            _bad(400, None, "httptools refuses it"),
            lambda key: [head(key, b"image/jpeg", 3, extra=[b"X-Note: a\x00b"]) + b"\xff\xd8\xff"],
        ),
        Case(
            "obs-fold header",
            _bad(400, None, "line folding is refused (RFC 9112)"),
            lambda key: [head(key, b"image/jpeg", 3, extra=[b"X-Note: a", b" folded"]) + b"\xff\xd8\xff"],
        ),
        Case(
            "content-length and chunked",
            _bad(400, None, "request smuggling shape, refused"),
            lambda key: [head(key, b"image/jpeg", 5, chunked=True) + b"3\r\n\xff\xd8\xff\r\n0\r\n\r\n"],
        ),
        Case(
            "non-numeric content-length",
            _bad(400, None, "refused by the parser"),
            lambda key: [head(key, b"image/jpeg", None, extra=[b"Content-Length: 12abc"]) + b"\xff\xd8\xff"],
        ),
        Case(
            "invalid chunk size",
            _bad(400, None, "refused by the parser"),
            lambda key: [head(key, b"image/jpeg", None, chunked=True) + b"zz\r\nhello\r\n0\r\n\r\n"],
        ),
        Case(
            "utf-8 in header values",
            Expect(200, None, "bytes >= 0x80 are legal in values; the id is replaced"),
            lambda key: [
                head(key, b"image/jpeg", None, extra=["X-Request-ID: \u00e9\u20ac\u2603".encode()], chunked=True)
                + chunked(fresh())
            ],
        ),
        # --- slow and endless ------------------------------------------------------------
        Case(
            "body that never ends",
            _bad(408, "request_timeout", "FACEGATE_BODY_TIMEOUT_S bounds the upload", T + 2),
            lambda key: [head(key, b"image/jpeg", 1_000_000) + b"\xff\xd8\xff", 2 * T],
        ),
        Case(
            "chunked with no last chunk",
            _bad(408, "request_timeout", "the body timeout covers chunked bodies", T + 2),
            lambda key: [head(key, b"image/jpeg", None, chunked=True) + b"3\r\n\xff\xd8\xff\r\n", 2 * T],
        ),
        Case(
            "one byte every 100 ms",
            _bad(408, "request_timeout", "a total, not an idle, timeout", T + 2),
            lambda key: [head(key, b"image/jpeg", 100_000), *[s for _ in range(30) for s in (b"\x00", 0.1)]],
        ),
        Case(
            "multipart that stops mid-part",
            _bad(408, "request_timeout", "same bound for multipart", T + 2),
            lambda key: [head(key, b"multipart/form-data; boundary=" + BOUNDARY, 500_000) + part(fresh())[:300], 2 * T],
        ),
        Case(
            "headers that never end",
            _bad(408, None, "the head must arrive within the head timeout", T + 2),
            lambda key: [b"POST /v1/faces/analyze HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n", 2 * T],
        ),
        Case(
            "connection that sends nothing",
            _bad(0, None, "closed after the head timeout, no answer", T + 2),
            lambda key: [2 * T],
        ),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def _png16() -> bytes:
    rng = random.Random(next(_seed))
    raw = b"".join(b"\x00" + rng.randbytes(96 * 6) for _ in range(96))
    return png(96, 96, depth=16, colour=2, idat=zlib.compress(raw))
