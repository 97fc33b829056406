"""Decide, without decoding pixels, whether bytes are an image ailabapi will accept.

Every ailabapi call costs a credit, so anything the upstream would certainly refuse
(wrong format, wrong size, grayscale, a file cut short) is refused here for free.
The gateway never decodes pixels itself: a decoder is a large attack surface and a
decompression bomb costs memory before its size is known. Instead the format is
sniffed from magic bytes (never from a filename or Content-Type, both of which the
client controls), dimensions come from the header, and the file's *structure* (JPEG
segments, PNG chunks with their CRCs, the BMP pixel array length) is walked to catch
truncation and corruption.

The module is pure: no I/O and no Pillow. ``inspect`` works on a ``memoryview`` of
whatever buffer the caller holds (an in-memory body or an mmap of a spooled file),
so nothing big is copied; every read is bounds-checked so hostile bytes end in an
``ImageError``, never in an ``IndexError`` or ``struct.error``; every loop moves
forward through the file and is capped, so time is linear in the size and small.

When a rule is a judgement call, it follows what libjpeg/libpng/Pillow (the
decoders ailabapi most likely runs) do: what they refuse is refused, what they
merely warn about is let through, because a false refusal is worse for a caller
than one upstream refusal. The per-format reasoning is in ``docs/images.md``.
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from app.upstream.contract import (
    FORMATS,
    MAX_PIXELS,
    MAX_SIDE_EXCLUSIVE,
    MIN_SIDE_EXCLUSIVE,
    REFUSE_GRAYSCALE,
)

ErrorCode = Literal["unsupported_media_type", "invalid_image", "image_dimensions", "image_missing"]
Format = Literal["jpeg", "png", "bmp"]
Buffer = bytes | bytearray | memoryview | mmap.mmap

#: ``sniff`` never looks further than this; callers sniffing a stream early need this much.
SNIFF_BYTES: Final = 512
#: JPEG markers / PNG chunks walked before giving up. Real files use tens to a few
#: thousand; the cap bounds the Python loop on hostile files made of tiny segments
#: (20 MB of empty COM segments would otherwise take seconds).
MAX_SEGMENTS: Final = 100_000

GRAYSCALE_DETAIL: Final = "grayscale images are not supported by ailabapi"

#: Human names for the formats ``sniff`` recognises, used in refusal messages.
_NAMES: Final[dict[str, str]] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "gif": "GIF",
    "webp": "WebP",
    "tiff": "TIFF",
    "heic": "HEIC/HEIF",
    "avif": "AVIF",
    "jxl": "JPEG XL",
    "jp2": "JPEG 2000",
    "ico": "ICO/CUR",
    "pdf": "PDF",
    "svg": "SVG",
    "zip": "ZIP",
    "psd": "Photoshop (PSD)",
    "mp4": "MP4/QuickTime (ISO media)",
}
_ACCEPTED_NAMES: Final = ", ".join(_NAMES[f] for f in FORMATS[:-1]) + f" or {_NAMES[FORMATS[-1]]}"

#: Fixed magic numbers at offset 0. A polyglot is judged by the first magic only.
_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\xff\x0a", "jxl"),  # bare codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "jp2"),  # bare J2K codestream
    (b"%PDF-", "pdf"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"8BPS", "psd"),
)
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"mif2", b"msf1"}
)
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_BMP_HEADER_SIZES: Final = frozenset({12, 40, 52, 56, 64, 108, 124})

_U16BE: Final = struct.Struct(">H")
_U32BE: Final = struct.Struct(">I")
_U32LE: Final = struct.Struct("<I")


class ImageError(Exception):
    """A verdict on the bytes that the API answers as a client error (no upstream call).

    ``detail`` is one sentence for the API answer and never quotes the file's bytes;
    ``format`` is what was sniffed (for logs and metrics), ``None`` when nothing was.
    """

    def __init__(self, code: ErrorCode, detail: str, *, format: str | None = None) -> None:
        super().__init__(detail)
        self.code: ErrorCode = code
        self.detail = detail
        self.format = format

    def __repr__(self) -> str:
        return f"ImageError({self.code!r}, {self.detail!r})"


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the header says; ``width``/``height`` are as stored (EXIF rotation not applied)."""

    format: Format
    width: int
    height: int
    channels: int | None
    frames: int
    orientation: int | None


# --- sniffing -------------------------------------------------------------------------


def sniff(head: Buffer) -> str | None:
    """Name the format from magic bytes only: what a client claims about a file is not evidence.

    Looks at the first ``SNIFF_BYTES`` bytes at most. Returns ``"jpeg"``, ``"png"`` or
    ``"bmp"`` for candidates, the name of a recognised but refused format, or ``None``.
    """
    head = bytes(head[:SNIFF_BYTES])
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _iso_media_kind(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 18 and 12 <= _U32LE.unpack_from(head, 14)[0] <= 124:
        # "BM" alone is two printable letters; the DIB header size makes it a bitmap.
        return "bmp"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] not in (b"", b"\x00\x00"):
        return "ico"
    if _looks_like_svg(head):
        return "svg"
    return None


def _iso_media_kind(head: bytes) -> str:
    """HEIC and AVIF share the ISO box layout; the brands in ``ftyp`` tell them apart."""
    box_size = _U32BE.unpack_from(head, 0)[0]
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(box_size, len(head)) - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heic"
    return "mp4"


def _looks_like_svg(head: bytes) -> bool:
    """SVG is text, so only a confident match is named; other text stays 'unrecognised'."""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg"):
        return True
    prologue = text.startswith((b"<?xml", b"<!--", b"<!doctype svg"))
    return prologue and b"<svg" in text and b"<html" not in text


# --- entry point ----------------------------------------------------------------------


def inspect(data: Buffer, *, max_pixels: int = MAX_PIXELS) -> ImageFacts:
    """Judge a whole file (up to ailabapi's 20 MB) as ailabapi would, without decoding it.

    Raises ``ImageError``. Problems are reported in file order: the first one found
    wins, so an oversized header is refused before the rest of the file is read.
    """
    # The views are released before returning or raising: a traceback kept by the
    # caller must not pin an export of their mmap (mmap.close() would then fail).
    with memoryview(data) as raw:
        if not raw.c_contiguous:  # a strided view: rare enough to pay for one copy
            return _inspect(memoryview(raw.tobytes()), max_pixels)
        if raw.format == "B" and raw.ndim == 1:
            return _inspect(raw, max_pixels)
        with raw.cast("B") as flat:
            return _inspect(flat, max_pixels)


def _inspect(mv: memoryview, max_pixels: int) -> ImageFacts:
    if len(mv) == 0:
        raise ImageError("image_missing", "the image is empty (0 bytes)")
    kind = sniff(mv)
    if kind is None:
        raise ImageError("unsupported_media_type", f"the file is not a {_ACCEPTED_NAMES} image")
    if kind not in FORMATS:
        raise ImageError(
            "unsupported_media_type",
            f"{_NAMES[kind]} files are not supported by ailabapi; send a {_ACCEPTED_NAMES} image",
            format=kind,
        )
    return _PARSERS[kind](mv, max_pixels)


# --- shared rules ---------------------------------------------------------------------


def _invalid(fmt: str, detail: str) -> ImageError:
    return ImageError("invalid_image", detail, format=fmt)


def _truncated(fmt: str, where: str) -> ImageError:
    return _invalid(fmt, f"the {_NAMES[fmt]} file is truncated or corrupt ({where})")


def _check_dimensions(fmt: str, width: int, height: int, max_pixels: int) -> None:
    """ailabapi's limits, checked from the header so a bomb is refused before it is read."""
    size = f"the image is {width}x{height} pixels"
    if width <= MIN_SIDE_EXCLUSIVE or height <= MIN_SIDE_EXCLUSIVE:
        raise ImageError(
            "image_dimensions", f"{size}; each side must be more than {MIN_SIDE_EXCLUSIVE} pixels", format=fmt
        )
    if width >= MAX_SIDE_EXCLUSIVE or height >= MAX_SIDE_EXCLUSIVE:
        raise ImageError(
            "image_dimensions", f"{size}; each side must be less than {MAX_SIDE_EXCLUSIVE} pixels", format=fmt
        )
    if width * height > max_pixels:
        raise ImageError(
            "image_dimensions",
            f"{size} ({width * height} in all); at most {max_pixels} pixels are accepted",
            format=fmt,
        )


def _check_grayscale(fmt: str, gray: bool) -> None:
    """ailabapi has a grayscale refusal code; paying for a call to receive it is pointless."""
    if gray and REFUSE_GRAYSCALE:
        raise ImageError("unsupported_media_type", GRAYSCALE_DETAIL, format=fmt)


def _u16be(mv: memoryview, at: int) -> int:
    value: int = _U16BE.unpack_from(mv, at)[0]
    return value


def _u32be(mv: memoryview, at: int) -> int:
    value: int = _U32BE.unpack_from(mv, at)[0]
    return value


# --- JPEG -----------------------------------------------------------------------------

#: The next marker as libjpeg's next_marker() finds it: 0xFF followed by anything but a
#: stuffed zero or fill 0xFF. RSTn and TEM carry no length and can occur thousands of
#: times in scan data, so the regex skips them in C rather than in the Python loop.
_JPEG_MARKER: Final = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_DHT, _SOI, _EOI, _SOS, _APP1, _SOF55 = 0xC4, 0xD8, 0xD9, 0xDA, 0xE1, 0xF7
#: Huffman tables defined in one file; a progressive JPEG uses a few dozen at most.
_MAX_HUFFMAN_TABLES: Final = 1024


def _inspect_jpeg(mv: memoryview, max_pixels: int) -> ImageFacts:
    """Walk every segment from SOI to EOI, including those between progressive scans.

    Bytes between segments are skipped as libjpeg skips them (it warns, it decodes);
    what libjpeg refuses is refused: unknown markers, a second SOI, a scan before the
    frame header, and a file that ends before its EOI, which is how a truncated upload
    looks. Bytes after the EOI are ignored (thumbnails, MPF images, appended data).
    """
    frame: tuple[int, int, bytes] | None = None  # width, height, component ids
    orientation: int | None = None
    in_scan = False
    tables = 0
    pos = 2
    for _ in range(MAX_SEGMENTS):
        found = _JPEG_MARKER.search(mv, pos)
        if found is None:
            raise _truncated("jpeg", "no end-of-image marker" if in_scan else "no image data")
        at = found.start()
        code = mv[at + 1]
        if code == _EOI:
            if frame is None or not in_scan:
                raise _invalid("jpeg", "the JPEG file ends before any image data")
            width, height, components = frame
            return ImageFacts("jpeg", width, height, len(components), 1, orientation)
        if code == _SOI or code < 0xC0:
            raise _invalid("jpeg", f"the JPEG file is corrupt (unexpected marker at byte {at})")
        end = _jpeg_segment_end(mv, at)
        if code in _SOF and frame is None:
            frame = _jpeg_frame(mv, at + 4, end, max_pixels)
        elif code == _SOS:
            if frame is None:
                raise _invalid("jpeg", "the JPEG file is corrupt (image data before the frame header)")
            _jpeg_check_scan(mv, at + 4, end, frame[2])
            in_scan = True
        elif code == _DHT:
            tables += _jpeg_huffman_tables(mv, at + 4, end)
            if tables > _MAX_HUFFMAN_TABLES:
                raise _invalid("jpeg", f"the JPEG file has more than {_MAX_HUFFMAN_TABLES} Huffman tables")
        elif code == _APP1 and orientation is None and not in_scan:
            orientation = _exif_orientation(mv, at + 4, end)
        elif code == _SOF55 and frame is None:
            raise ImageError("unsupported_media_type", "JPEG-LS files are not supported by ailabapi", format="jpeg")
        pos = end
    raise _invalid("jpeg", f"the JPEG file has more than {MAX_SEGMENTS} segments")


def _jpeg_segment_end(mv: memoryview, at: int) -> int:
    if at + 4 > len(mv):
        raise _truncated("jpeg", f"segment at byte {at} is cut short")
    length = _u16be(mv, at + 2)
    if length < 2:
        raise _invalid("jpeg", f"the JPEG file is corrupt (bad segment length at byte {at})")
    end = at + 2 + length
    if end > len(mv):
        raise _truncated("jpeg", f"segment at byte {at} runs past the end")
    return end


def _jpeg_frame(mv: memoryview, start: int, end: int, max_pixels: int) -> tuple[int, int, bytes]:
    """The frame header holds everything the limits need; checked before any scan is read."""
    if end - start < 6:
        raise _invalid("jpeg", "the JPEG frame header is too short")
    height, width, components = _u16be(mv, start + 1), _u16be(mv, start + 3), mv[start + 5]
    if components == 0 or end - start != 6 + 3 * components:
        raise _invalid("jpeg", "the JPEG frame header is corrupt")
    for i in range(components):
        sampling = mv[start + 7 + 3 * i]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 0x0F <= 4):
            raise _invalid("jpeg", "the JPEG frame header is corrupt (bad sampling factors)")
    if width == 0 or height == 0:
        # Height 0 means "see the DNL marker": legal, but libjpeg refuses it, so would ailabapi.
        raise _invalid("jpeg", "the JPEG frame header declares a zero width or height")
    _check_dimensions("jpeg", width, height, max_pixels)
    _check_grayscale("jpeg", components == 1)
    if components not in (3, 4):
        # Decoders map only 1, 3 (YCbCr/RGB) and 4 (CMYK/YCCK) components to pixels.
        raise ImageError(
            "unsupported_media_type",
            f"JPEG files with {components} components are not supported",
            format="jpeg",
        )
    return width, height, mv[start + 6 : end : 3].tobytes()


def _jpeg_check_scan(mv: memoryview, start: int, end: int, components: bytes) -> None:
    """Refuse a scan header libjpeg refuses: wrong length, or a component the frame lacks.

    Some encoders repeat component ids; decoders patch that up in different ways, so
    the component check is only made when the frame's ids are unique.
    """
    count = mv[start] if start < end else 0
    if not 1 <= count <= 4 or end - start != 4 + 2 * count:
        raise _invalid("jpeg", "the JPEG scan header is corrupt")
    selectors = set(mv[start + 1 : start + 1 + 2 * count : 2].tobytes())
    if len(set(components)) == len(components) and not selectors <= set(components):
        raise _invalid("jpeg", "the JPEG scan header names a component the frame does not have")


def _jpeg_huffman_tables(mv: memoryview, start: int, end: int) -> int:
    """Count the tables in a DHT segment, refusing it where libjpeg does (its get_dht).

    Tables sit in the header, so this catches header corruption that a segment walk
    alone misses: a changed count shifts everything after it.
    """
    pos, tables = start, 0
    while end - pos > 16:
        index, count = mv[pos], sum(mv[pos + 1 : pos + 17])
        pos += 17 + count
        tables += 1
        if index & ~0x13 or count > 256 or pos > end:  # class 0/1, table 0-3
            raise _invalid("jpeg", "the JPEG file has a corrupt Huffman table")
    if pos != end:
        raise _invalid("jpeg", "the JPEG file has a corrupt Huffman table")
    return tables


def _exif_orientation(mv: memoryview, start: int, end: int) -> int | None:
    """EXIF orientation from IFD0 if it is where it usually is; anything unusual gives None.

    Only a hint for callers (the box coordinates ailabapi returns are in stored pixels),
    so no effort is spent on odd EXIF layouts and nothing here can refuse an image.
    """
    if end - start < 14 or mv[start : start + 6].tobytes() != b"Exif\x00\x00":
        return None
    tiff = start + 6
    order = mv[tiff : tiff + 2].tobytes()
    if order not in (b"II", b"MM"):
        return None
    endian = "<" if order == b"II" else ">"
    magic, ifd = struct.unpack_from(endian + "HI", mv, tiff + 2)
    entries_at = tiff + ifd + 2
    if magic != 42 or entries_at > end:
        return None
    count = struct.unpack_from(endian + "H", mv, entries_at - 2)[0]
    for i in range(min(count, (end - entries_at) // 12)):
        tag, kind, _count, value = struct.unpack_from(endian + "HHIH", mv, entries_at + 12 * i)
        if tag == 0x0112:
            return int(value) if kind == 3 and 1 <= value <= 8 else None
    return None


# --- PNG ------------------------------------------------------------------------------

#: Legal bit depths per colour type (PNG spec 11.2.2); anything else libpng refuses.
_PNG_DEPTHS: Final[dict[int, frozenset[int]]] = {
    0: frozenset({1, 2, 4, 8, 16}),
    2: frozenset({8, 16}),
    3: frozenset({1, 2, 4, 8}),
    4: frozenset({8, 16}),
    6: frozenset({8, 16}),
}
_PNG_CHANNELS: Final = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_GRAY: Final = frozenset({0, 4})
_PNG_MAX_LENGTH: Final = 2**31 - 1


def _inspect_png(mv: memoryview, max_pixels: int) -> ImageFacts:
    """Walk every chunk to IEND checking lengths and CRCs; IDAT is never decompressed.

    A CRC mismatch is what truncation, a bad transfer or a text-mode copy looks like,
    and Pillow and libpng both refuse one in a critical chunk; checking all of them
    costs ~10 ms for 20 MB. Bytes after IEND are ignored.
    """
    header: tuple[int, int, int] | None = None
    has_palette = False
    image_bytes = 0
    frames = 1
    pos = 8
    for _ in range(MAX_SEGMENTS):
        ctype, start, end = _png_chunk(mv, pos)
        if header is None:
            if ctype != b"IHDR" or end - start != 13:
                raise _invalid("png", "the PNG file does not start with a valid IHDR chunk")
            header = _png_header(mv, start, max_pixels)
        elif ctype == b"IHDR":
            raise _invalid("png", "the PNG file has a second IHDR chunk")
        elif ctype == b"PLTE":
            has_palette = True
        elif ctype == b"IDAT":
            if header[2] == 3 and not has_palette:
                raise _invalid("png", "the palette PNG file has no PLTE chunk before its image data")
            image_bytes += end - start
        elif ctype == b"acTL" and image_bytes == 0:
            frames = _apng_frames(mv, start, end)
        elif ctype == b"IEND":
            if image_bytes == 0:
                raise _invalid("png", "the PNG file has no image data")
            width, height, colour = header
            return ImageFacts("png", width, height, _PNG_CHANNELS[colour], frames, None)
        pos = end + 4
    raise _invalid("png", f"the PNG file has more than {MAX_SEGMENTS} chunks")


def _png_chunk(mv: memoryview, pos: int) -> tuple[bytes, int, int]:
    """One chunk's type and data span, after its length, type and CRC have been checked."""
    if pos + 8 > len(mv):
        raise _truncated("png", "no IEND chunk")
    length = _u32be(mv, pos)
    ctype = mv[pos + 4 : pos + 8].tobytes()
    if length > _PNG_MAX_LENGTH or not ctype.isalpha():
        raise _invalid("png", f"the PNG file is corrupt (bad chunk header at byte {pos})")
    start, end = pos + 8, pos + 8 + length
    if end + 4 > len(mv):
        raise _truncated("png", f"chunk at byte {pos} runs past the end")
    if zlib.crc32(mv[pos + 4 : end]) != _u32be(mv, end):
        raise _invalid("png", f"the PNG file is corrupt (checksum mismatch in the chunk at byte {pos})")
    return ctype, start, end


def _png_header(mv: memoryview, start: int, max_pixels: int) -> tuple[int, int, int]:
    width, height = _u32be(mv, start), _u32be(mv, start + 4)
    depth, colour, compression, filtering, interlace = mv[start + 8 : start + 13].tolist()
    if not (0 < width <= _PNG_MAX_LENGTH and 0 < height <= _PNG_MAX_LENGTH):
        raise _invalid("png", "the PNG header declares a zero or out-of-range size")
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace not in (0, 1):
        raise _invalid("png", "the PNG header declares an invalid pixel format")
    _check_dimensions("png", width, height, max_pixels)
    _check_grayscale("png", colour in _PNG_GRAY)
    return width, height, colour


def _apng_frames(mv: memoryview, start: int, end: int) -> int:
    """Frame count as Pillow reads it: a short acTL is an error, a silly count is ignored."""
    if end - start < 8:
        raise _invalid("png", "the APNG animation control chunk is too short")
    frames = _u32be(mv, start)
    return frames if 0 < frames <= 2**31 else 1


# --- BMP ------------------------------------------------------------------------------

_BI_RGB, _BI_RLE8, _BI_RLE4, _BI_BITFIELDS, _BI_JPEG, _BI_PNG, _BI_ALPHABITFIELDS = range(7)
_BMP_DEPTHS: Final = frozenset({1, 4, 8, 16, 24, 32})
#: Compression -> bit depths it is defined for.
_BMP_COMPRESSION_DEPTHS: Final[dict[int, frozenset[int]]] = {
    _BI_RGB: _BMP_DEPTHS,
    _BI_RLE8: frozenset({8}),
    _BI_RLE4: frozenset({4}),
    _BI_BITFIELDS: frozenset({16, 24, 32}),
    _BI_ALPHABITFIELDS: frozenset({16, 32}),
}
#: Masks stored after a 40-byte header (larger headers hold them inside).
_BMP_MASK_BYTES: Final = {_BI_BITFIELDS: 12, _BI_ALPHABITFIELDS: 16}
#: The alpha mask's file offset: the same in V3+ headers and after a 40-byte header.
_BMP_ALPHA_MASK_AT: Final = 66


def _inspect_bmp(mv: memoryview, max_pixels: int) -> ImageFacts:
    """Check the headers, the colour table and that the pixel array is all there.

    BMP has no end marker, so for uncompressed data the only truncation test is the
    array's size (stride x rows after the declared offset). The file header's size
    field is ignored except for RLE data: writers often get it wrong and no decoder
    reads it, so refusing on it would refuse images that decode.
    """
    n = len(mv)
    offset, dib = _U32LE.unpack_from(mv, 10)[0], _U32LE.unpack_from(mv, 14)[0]
    if dib not in _BMP_HEADER_SIZES:
        raise ImageError(
            "unsupported_media_type", f"BMP files with a {dib}-byte header are not supported", format="bmp"
        )
    if 14 + dib > n:
        raise _truncated("bmp", "the header is cut short")
    if dib == 12:
        width, height, planes, bpp = struct.unpack_from("<HHHH", mv, 18)
        compression, image_size, colours, entry = _BI_RGB, 0, 0, 3
    else:
        width, height, planes, bpp, compression, image_size = struct.unpack_from("<iiHHII", mv, 18)
        colours, entry = _U32LE.unpack_from(mv, 46)[0], 4
    _bmp_check_encoding(dib, bpp, compression)
    if planes != 1 or width <= 0 or height == 0:
        raise _invalid("bmp", "the BMP header is corrupt")
    height = abs(height)  # negative height = rows stored top-down
    _check_dimensions("bmp", width, height, max_pixels)

    table = 14 + dib  # colour masks, then the palette, follow the headers
    if dib == 40 and compression in _BMP_MASK_BYTES:
        table += _BMP_MASK_BYTES[compression]
    if table > n:
        raise _truncated("bmp", "the colour masks are cut short")
    if not table <= offset < n:
        raise _invalid("bmp", "the BMP pixel data offset points outside the image data")
    channels = 3
    if bpp <= 8:
        channels = _bmp_palette_channels(mv, range(table, offset - entry + 1, entry), bpp, colours)
    elif bpp == 32 and _bmp_has_alpha(mv, dib, compression):
        channels = 4

    if compression in (_BI_RLE8, _BI_RLE4):
        declared_end = offset + image_size if image_size else _U32LE.unpack_from(mv, 2)[0]
        if declared_end > n:
            raise _truncated("bmp", "the compressed pixel data is cut short")
    elif offset + ((width * bpp + 31) // 32) * 4 * height > n:
        raise _truncated("bmp", f"the pixel data is shorter than {width}x{height} pixels need")
    return ImageFacts("bmp", width, height, channels, 1, None)


def _bmp_check_encoding(dib: int, bpp: int, compression: int) -> None:
    os2_huffman_or_rle24 = dib == 64 and compression in (3, 4)
    if compression in (_BI_JPEG, _BI_PNG) or os2_huffman_or_rle24:
        # Embedded JPEG/PNG (printers only) or OS/2 Huffman/RLE24: no common decoder reads them.
        raise ImageError(
            "unsupported_media_type",
            "BMP files with JPEG, PNG or OS/2 compression are not supported",
            format="bmp",
        )
    if compression not in _BMP_COMPRESSION_DEPTHS or bpp not in _BMP_DEPTHS:
        raise ImageError(
            "unsupported_media_type",
            f"this BMP encoding ({bpp} bits per pixel) is not supported",
            format="bmp",
        )
    if bpp not in _BMP_COMPRESSION_DEPTHS[compression]:
        raise _invalid("bmp", "the BMP header is corrupt (compression does not fit the bit depth)")


def _bmp_palette_channels(mv: memoryview, slots: range, bpp: int, colours: int) -> int:
    """A palette of only grays makes a grayscale image (OpenCV's rule; Pillow's is narrower).

    ``slots`` are the entry positions that fit between the headers and the pixel data.
    """
    if colours > 1 << bpp:
        # More colours than the depth can index: OpenCV refuses it, Pillow past 65536.
        raise _invalid("bmp", "the BMP colour table is larger than its bit depth allows")
    count = min(colours or 1 << bpp, len(slots))
    if count == 0:
        raise _invalid("bmp", "the BMP file has no colour table")
    gray = all(mv[p] == mv[p + 1] == mv[p + 2] for p in slots[:count])
    _check_grayscale("bmp", gray)
    return 1 if gray else 3


def _bmp_has_alpha(mv: memoryview, dib: int, compression: int) -> bool:
    """Alpha exists only where a mask says so; plain 32-bit BI_RGB is BGRX to decoders."""
    has_alpha_mask = dib in (56, 108, 124) or (dib == 40 and compression == _BI_ALPHABITFIELDS)
    return compression in _BMP_MASK_BYTES and has_alpha_mask and _U32LE.unpack_from(mv, _BMP_ALPHA_MASK_AT)[0] != 0


_PARSERS: Final[dict[str, Callable[[memoryview, int], ImageFacts]]] = {
    "jpeg": _inspect_jpeg,
    "png": _inspect_png,
    "bmp": _inspect_bmp,
}
