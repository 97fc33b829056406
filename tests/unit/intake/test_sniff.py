"""app.image_headers: what is refused for free, and that hostile bytes never crash it.

Valid images come from Pillow (tests/imagegen.py); edge cases Pillow will not write
(16-bit colour, interlaced or oversized PNGs, top-down BMPs, odd JPEG markers) are
built by hand with struct, and the hand-built PNGs/BMPs are checked to be real
images by letting Pillow decode them.
"""

from __future__ import annotations

import array
import io
import mmap
import struct
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.intake.sniff import (
    GRAYSCALE_DETAIL,
    MAX_SEGMENTS,
    Buffer,
    ImageError,
    ImageFacts,
    inspect,
    sniff,
)
from app.upstream.contract import MAX_PIXELS
from tests.imagegen import encode, make_image, pixels

CODES = {"unsupported_media_type", "invalid_image", "image_dimensions", "image_missing"}


def refused(data: Buffer, max_pixels: int = MAX_PIXELS) -> ImageError:
    with pytest.raises(ImageError) as info:
        inspect(data, max_pixels=max_pixels)
    return info.value


def outcome(data: bytes) -> ImageFacts | ImageError:
    """The contract for any input: facts or an ImageError with a sane, byte-free detail."""
    try:
        result: ImageFacts | ImageError = inspect(data)
    except ImageError as err:
        result = err
    if isinstance(result, ImageError):
        assert result.code in CODES
        assert result.detail
        assert result.detail.isascii()
        assert result.detail.isprintable()
        assert len(result.detail) < 160
    else:
        assert result.format in ("jpeg", "png", "bmp")
        assert 32 < result.width < 4096
        assert 32 < result.height < 4096
        assert result.frames >= 1
    return result


# --- hand-built files ---------------------------------------------------------------------


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_bytes(
    width: int,
    height: int,
    components: int = 3,
    *,
    sof: int = 0xC0,
    before: bytes = b"",
    scan: bytes = b"\x12\x34" * 8,
    after: bytes = b"\xff\xd9",
) -> bytes:
    """A structurally complete JPEG (no tables, so not decodable): SOI [before] SOF SOS scan [after]."""
    ids = range(1, components + 1)
    frame = bytes([8]) + struct.pack(">HHB", height, width, components)
    frame += b"".join(bytes([i, 0x11, 0]) for i in ids)
    scan_header = bytes([min(components, 4)]) + b"".join(bytes([i, 0]) for i in ids[:4]) + b"\x00\x3f\x00"
    return b"\xff\xd8" + before + jpeg_segment(sof, frame) + jpeg_segment(0xDA, scan_header) + scan + after


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_raw_size(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    """Bytes of filtered scanlines, so the hand-built IDAT decodes for real."""
    bits = depth * _PNG_SAMPLES[colour]
    total = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        cols, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if cols and rows:
            total += rows * (1 + (cols * bits + 7) // 8)
    return total


def png_bytes(
    width: int,
    height: int,
    *,
    depth: int = 8,
    colour: int = 2,
    interlace: int = 0,
    idat: bytes | None = None,
    extra: bytes = b"",
    end: bytes | None = None,
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    if idat is None:
        idat = zlib.compress(bytes(png_raw_size(width, height, depth, colour, interlace)))
    plte = png_chunk(b"PLTE", bytes(range(48))) if colour == 3 else b""
    tail = png_chunk(b"IEND", b"") if end is None else end
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + plte + extra + png_chunk(b"IDAT", idat) + tail


def bmp_bytes(
    width: int,
    height: int,
    bpp: int = 24,
    *,
    dib: int = 40,
    compression: int = 0,
    palette: bytes = b"",
    masks: bytes = b"",
    colours: int = 0,
    planes: int = 1,
    pixels_len: int | None = None,
    offset: int | None = None,
) -> bytes:
    if dib == 12:
        header = struct.pack("<IHHHH", 12, width, height, planes, bpp)
    else:
        header = struct.pack("<IiiHHIIiiII", dib, width, height, planes, bpp, compression, 0, 0, 0, colours, 0)
        header = header + masks[: max(0, dib - 40)] + bytes(max(0, dib - 40 - len(masks)))
        masks = masks[max(0, dib - 40) :]
    stride = ((abs(width) * bpp + 31) // 32) * 4
    body = bytes(stride * abs(height) if pixels_len is None else pixels_len)
    start = 14 + len(header) + len(masks) + len(palette) if offset is None else offset
    size = 14 + len(header) + len(masks) + len(palette) + len(body)
    return b"BM" + struct.pack("<IHHI", size, 0, 0, start) + header + masks + palette + body


def colour_palette(entries: int) -> bytes:
    return b"".join(bytes([i % 256, (i * 7) % 256, (i * 13) % 256, 0]) for i in range(entries))


def gray_palette(entries: int, step: int = 1) -> bytes:
    return b"".join(bytes([i * step % 256] * 3 + [0]) for i in range(entries))


def decodes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --- valid images ---------------------------------------------------------------------


@cache
def jpeg_sample() -> bytes:
    return make_image("jpeg", 64, 48)


@cache
def png_sample() -> bytes:
    return make_image("png", 40, 36)


@cache
def bmp_sample() -> bytes:
    return make_image("bmp", 40, 36)


def exif_with_orientation(value: int) -> bytes:
    img = Image.new("RGB", (1, 1))
    exif = img.getexif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.mark.parametrize(
    ("name", "data", "channels"),
    [
        ("baseline", make_image("jpeg", 64, 48), 3),
        ("progressive", make_image("jpeg", 64, 48, progressive=True), 3),
        ("optimized", make_image("jpeg", 64, 48, optimize=True, quality=40), 3),
        ("cmyk", make_image("jpeg", 64, 48, mode="CMYK"), 4),
        ("4:4:4", make_image("jpeg", 64, 48, subsampling=0), 3),
        ("restart markers", make_image("jpeg", 64, 48, restart_marker_blocks=1), 3),
        ("with sim comment", make_image("jpeg", 64, 48, sim="faces=2"), 3),
    ],
)
def test_valid_jpeg(name: str, data: bytes, channels: int) -> None:
    assert inspect(data) == ImageFacts("jpeg", 64, 48, channels, 1, None)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_exif_orientation_is_found(orientation: int) -> None:
    data = encode(pixels(64, 48), "jpeg", exif=exif_with_orientation(orientation))
    facts = inspect(data)
    assert (facts.width, facts.height, facts.orientation) == (64, 48, orientation)


def test_jpeg_big_endian_exif_orientation_is_found() -> None:
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + bytes(4)
    app1 = jpeg_segment(0xE1, b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd)
    assert inspect(jpeg_bytes(64, 48, before=app1)).orientation == 6


@pytest.mark.parametrize(
    "payload",
    [b"Exif\x00\x00", b"Exif\x00\x00XX\x00\x2a\x00\x00\x00\x08", b"Exif\x00\x00II\x2a\x00\xff\xff\xff\xff"],
)
def test_odd_exif_means_no_orientation_not_a_refusal(payload: bytes) -> None:
    assert inspect(jpeg_bytes(64, 48, before=jpeg_segment(0xE1, payload + bytes(8)))).orientation is None


@pytest.mark.parametrize("sof", [0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB])
def test_other_frame_types_are_accepted(sof: int) -> None:
    """Extended, progressive, lossless and arithmetic JPEGs: ailabapi's decoder decides."""
    assert inspect(jpeg_bytes(64, 48, sof=sof)).width == 64


def test_jpeg_structure_tolerances() -> None:
    """What libjpeg accepts: fill bytes, junk between segments, RSTn, trailing data."""
    fills = b"\xff\xff\xff" + jpeg_segment(0xFE, b"comment")
    junk = jpeg_segment(0xE0, b"JFIF\x00") + b"\x00\x00garbage"
    scan = b"\x01\xff\x00\x02\xff\xd0\x03\xff\xd7\x04\xff\x01\x05"
    data = jpeg_bytes(64, 48, before=fills + junk, scan=scan, after=b"\xff\xff\xd9")
    assert inspect(data).width == 64
    assert inspect(data + b"PK\x03\x04 a zip appended" + b"\xff\xd8").width == 64


def test_eoi_inside_segments_does_not_count() -> None:
    """FF D9 inside an EXIF thumbnail or a comment is data, not the end of the image."""
    thumbnail = jpeg_segment(0xE1, b"Exif\x00\x00" + b"\xff\xd8\xff\xd9")
    data = jpeg_bytes(64, 48, before=thumbnail, after=jpeg_segment(0xFE, b"\xff\xd9"))
    assert refused(data).code == "invalid_image"
    assert inspect(data + b"\xff\xd9").width == 64


def test_progressive_jpeg_cut_between_scans_is_refused() -> None:
    data = make_image("jpeg", 64, 48, progressive=True)
    scans = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    assert len(scans) > 2
    for cut in scans[1:]:
        assert refused(data[:cut]).code == "invalid_image"


@pytest.mark.parametrize(
    ("name", "data", "channels"),
    [
        ("rgb", make_image("png", 64, 48), 3),
        ("rgba", make_image("png", 64, 48, mode="RGBA"), 4),
        ("palette", encode(pixels(64, 48).convert("P"), "png"), 3),
        ("with text chunk", make_image("png", 64, 48, sim="faces=1"), 3),
        ("rgb 16-bit", png_bytes(64, 48, depth=16, colour=2), 3),
        ("rgba 16-bit", png_bytes(64, 48, depth=16, colour=6), 4),
        ("interlaced", png_bytes(64, 48, interlace=1), 3),
        ("interlaced palette 4-bit", png_bytes(64, 48, depth=4, colour=3, interlace=1), 3),
    ],
)
def test_valid_png(name: str, data: bytes, channels: int) -> None:
    assert inspect(data) == ImageFacts("png", 64, 48, channels, 1, None)
    assert decodes(data).size == (64, 48)


def test_apng_frames_come_from_actl() -> None:
    frames = [pixels(64, 48, seed=i) for i in range(3)]
    data = encode(frames[0], "png", save_all=True, append_images=frames[1:], duration=100)
    assert inspect(data) == ImageFacts("png", 64, 48, 3, 3, None)


def test_png_tolerates_bytes_after_iend_and_split_idat() -> None:
    raw = zlib.compress(bytes(png_raw_size(64, 48, 8, 2, 0)))
    split = png_chunk(b"IDAT", raw[:10]) + png_chunk(b"IDAT", raw[10:]) + png_chunk(b"IEND", b"")
    data = png_bytes(64, 48, idat=b"", end=split) + b"trailing junk"
    assert inspect(data).height == 48
    assert decodes(data).size == (64, 48)


@pytest.mark.parametrize(
    ("name", "data", "channels"),
    [
        ("24-bit", make_image("bmp", 64, 48), 3),
        ("32-bit", make_image("bmp", 64, 48, mode="RGBA"), 3),
        ("8-bit colour palette", encode(pixels(64, 48).convert("P"), "bmp"), 3),
        ("with trailing sim directive", make_image("bmp", 64, 48, sim="faces=1"), 3),
        ("top-down", bmp_bytes(64, -48), 3),
        ("4-bit colour palette", bmp_bytes(64, 48, 4, palette=colour_palette(16)), 3),
        ("8-bit short palette", bmp_bytes(64, 48, 8, palette=colour_palette(20), colours=20), 3),
        ("16-bit", bmp_bytes(64, 48, 16), 3),
        ("OS/2 core header", bmp_bytes(64, 48, dib=12), 3),
        ("V5 header", bmp_bytes(64, 48, 24, dib=124), 3),
        (
            "V5 bitfields with alpha",
            bmp_bytes(
                64,
                48,
                32,
                dib=124,
                compression=3,
                masks=struct.pack("<4I", 0xFF0000, 0xFF00, 0xFF, 0xFF000000),
            ),
            4,
        ),
        (
            "16-bit bitfields",
            bmp_bytes(64, 48, 16, compression=3, masks=struct.pack("<3I", 0xF800, 0x7E0, 0x1F)),
            3,
        ),
    ],
)
def test_valid_bmp(name: str, data: bytes, channels: int) -> None:
    assert inspect(data) == ImageFacts("bmp", 64, 48, channels, 1, None)
    assert decodes(data).size == (64, 48)


def test_rle_bmp_is_accepted() -> None:
    rle = b"\x40\x07\x00\x00" * 48 + b"\x00\x01"  # 64 pixels of colour 7, end of line; end of bitmap
    data = bmp_bytes(64, 48, 8, compression=1, palette=colour_palette(256), pixels_len=0) + rle
    assert inspect(data).channels == 3
    assert decodes(data).size == (64, 48)


# --- format refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"this is not really a jpeg, whatever the file name said\n",
        b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>",
        b'{"image": "base64..."}',
        b"\x00" * 100,
        b"\xff\xd8\x00\x00",  # SOI but no marker after it
        b"BM",  # too short to be a bitmap
        bytes(range(256)),
    ],
)
def test_unrecognised_bytes(data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.detail) == ("unsupported_media_type", "the file is not a JPEG, PNG or BMP image")


@pytest.mark.parametrize("fmt", ["gif", "webp", "tiff"])
def test_pillow_made_refused_formats(fmt: str) -> None:
    err = refused(make_image(fmt, 64, 48))
    assert err.code == "unsupported_media_type"
    assert err.format == fmt
    assert fmt.upper() in err.detail.upper()


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"BM" + bytes(12) + b"\x28\x00\x00\x00", "bmp"),
        (b"GIF89a", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "avif"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", "mp4"),
        (b"\xff\x0a\xfa", "jxl"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
        (b"\x00\x00\x01\x00\x01\x00\x20\x20", "ico"),
        (b"%PDF-1.7\n", "pdf"),
        (b"\xef\xbb\xbf  <svg xmlns='http://www.w3.org/2000/svg'/>", "svg"),
        (b"<?xml version='1.0'?>\n<!-- x -->\n<svg/>", "svg"),
        (b"PK\x03\x04\x14\x00", "zip"),
        (b"8BPS\x00\x01", "psd"),
        (b"<html><svg/></html>", None),
        (b"", None),
        (b"BMW", None),
        (b"BM" + bytes(12) + b"\xff\x00\x00\x00", None),
    ],
)
def test_sniff(head: bytes, name: str | None) -> None:
    assert sniff(head) == name
    assert sniff(memoryview(head + bytes(600))) == sniff(head + bytes(600))


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100), "HEIC"),
        (b"%PDF-1.4\n" + bytes(100), "PDF"),
        (b"PK\x03\x04" + bytes(100), "ZIP"),
    ],
)
def test_refused_formats_are_named(data: bytes, name: str) -> None:
    err = refused(data)
    assert err.code == "unsupported_media_type"
    assert name in err.detail


def test_polyglot_is_judged_by_its_first_magic() -> None:
    assert refused(b"PK\x03\x04" + jpeg_sample()).code == "unsupported_media_type"
    assert inspect(jpeg_sample() + b"PK\x03\x04" + bytes(64)).format == "jpeg"


def test_empty() -> None:
    for data in (b"", bytearray(), memoryview(b"")):
        assert refused(data).code == "image_missing"


# --- truncation and corruption --------------------------------------------------------


@pytest.mark.parametrize("sample", [jpeg_sample, png_sample, bmp_sample], ids=["jpeg", "png", "bmp"])
def test_every_truncation_is_refused(sample: Callable[[], bytes]) -> None:
    """Cut anywhere (inside headers, inside scan or pixel data): never accepted."""
    data = sample()
    assert inspect(data).width > 32
    for cut in range(len(data)):
        err = refused(data[:cut])
        if cut >= 18:
            assert err.code == "invalid_image", cut


@pytest.mark.parametrize("cut", [3, 4, 20, 0.5, -3, -1])
def test_truncated_jpeg_details(cut: float) -> None:
    data = jpeg_sample()
    at = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    err = refused(data[:at])
    assert err.code == "invalid_image"
    assert "truncated" in err.detail


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("EOI before any scan", b"\xff\xd8" + jpeg_segment(0xDB, bytes(65)) + b"\xff\xd9"),
        ("scan before frame", b"\xff\xd8" + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9"),
        ("zero height (DNL)", jpeg_bytes(64, 0)),
        ("zero width", jpeg_bytes(0, 48)),
        ("segment length below 2", b"\xff\xd8\xff\xe0\x00\x01" + bytes(40)),
        ("segment past the end", b"\xff\xd8\xff\xe0\x40\x00" + bytes(40)),
        ("unknown marker in scan", jpeg_bytes(64, 48, scan=b"\x12\xff\x08\x34")),
        ("second SOI", jpeg_bytes(64, 48, scan=b"\x12\xff\xd8\x34")),
        ("bad frame length", jpeg_bytes(64, 48).replace(b"\xff\xc0\x00\x11", b"\xff\xc0\x00\x14") + bytes(8)),
        ("bad sampling factors", jpeg_bytes(64, 48).replace(b"\x01\x11\x00", b"\x01\x51\x00")),
        ("bad scan header", jpeg_bytes(64, 48).replace(b"\xff\xda\x00\x0c\x03", b"\xff\xda\x00\x0c\x05")),
        ("no frame at all", b"\xff\xd8" + jpeg_segment(0xFE, b"hello") + b"\xff\xd9"),
        ("scan names an unknown component", jpeg_bytes(64, 48).replace(b"\x03\x01\x00\x02", b"\x03\x07\x00\x02")),
        ("Huffman counts exceed the segment", jpeg_bytes(64, 48, before=jpeg_segment(0xC4, b"\x00" + b"\x01" * 16))),
        ("Huffman table index 4", jpeg_bytes(64, 48, before=jpeg_segment(0xC4, b"\x04" + bytes(16)))),
        (
            "Huffman segment with leftovers",
            jpeg_bytes(64, 48, before=jpeg_segment(0xC4, b"\x00" + bytes(16) + b"\x05")),
        ),
    ],
)
def test_corrupt_jpeg(name: str, data: bytes) -> None:
    assert refused(data).code == "invalid_image"


def test_repeated_component_ids_are_left_to_the_decoder() -> None:
    data = jpeg_bytes(64, 48).replace(b"\x02\x11\x00\x03\x11\x00", b"\x01\x11\x00\x01\x11\x00")
    data = data.replace(b"\x03\x01\x00\x02\x00\x03\x00", b"\x03\x01\x00\x01\x00\x01\x00")
    assert inspect(data).channels == 3


def test_huffman_tables_as_libjpeg_reads_them() -> None:
    tables = b"\x00" + b"\x01" + bytes(15) + b"\x07" + b"\x13" + bytes(15) + b"\x02" + b"\x21\x22"
    assert inspect(jpeg_bytes(64, 48, before=jpeg_segment(0xC4, tables))).width == 64


def test_jpeg_with_unusual_component_counts_is_unsupported() -> None:
    assert refused(jpeg_bytes(64, 48, 2)).code == "unsupported_media_type"
    jpeg_ls = b"\xff\xd8" + jpeg_segment(0xF7, b"\x08\x00\x30\x00\x40\x03" + bytes(9)) + b"\xff\xd9"
    err = refused(jpeg_ls)
    assert (err.code, err.detail) == ("unsupported_media_type", "JPEG-LS files are not supported by ailabapi")


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("CRC of IDAT", lambda d: flip(d, d.index(b"IDAT") + 10)),
        ("CRC of IHDR", lambda d: flip(d, 20)),
        ("no IEND", lambda d: d[: d.index(b"IEND") - 4]),
        ("IEND cut", lambda d: d[:-2]),
        ("chunk length runs past the end", lambda d: d[:33] + struct.pack(">I", 10**6) + d[37:]),
        ("chunk length over 2**31", lambda d: d[:33] + b"\xff\xff\xff\xff" + d[37:]),
        ("signature only", lambda d: d[:8]),
        ("IHDR not first", lambda d: d[:8] + png_chunk(b"tEXt", b"a\x00b") + d[8:]),
        ("second IHDR", lambda d: d[:33] + d[8:33] + d[33:]),
        ("no IDAT", lambda d: d[:33] + png_chunk(b"IEND", b"")),
        ("non-letter chunk type", lambda d: d[:33] + png_chunk(b"ID4T", b"") + d[33:]),
    ],
)
def test_corrupt_png(name: str, mutate: Callable[[bytes], bytes]) -> None:
    assert refused(mutate(png_sample())).code == "invalid_image"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("16-bit palette", png_bytes(64, 48, depth=16, colour=3)),
        ("colour type 5", png_bytes(64, 48, depth=8, colour=5, idat=b"x")),
        ("4-bit rgb", png_bytes(64, 48, depth=4, colour=2)),
        ("interlace 2", png_bytes(64, 48, interlace=2, idat=b"x")),
        ("zero width", png_bytes(0, 48, idat=b"x")),
        ("width over 2**31", png_bytes(2**31, 48, idat=b"x")),
        (
            "palette without PLTE",
            png_bytes(64, 48, colour=3).replace(png_chunk(b"PLTE", bytes(range(48))), b""),
        ),
        ("short acTL", png_bytes(64, 48, extra=png_chunk(b"acTL", b"\x00\x00\x00\x02"))),
    ],
)
def test_invalid_png_header(name: str, data: bytes) -> None:
    assert refused(data).code == "invalid_image"


def test_png_with_silly_actl_is_a_still_image() -> None:
    assert inspect(png_bytes(64, 48, extra=png_chunk(b"acTL", bytes(8)))).frames == 1


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("truncated pixel array", bmp_bytes(64, 48, pixels_len=64 * 3 * 48 - 1), "invalid_image"),
        (
            "truncated RLE",
            bmp_bytes(64, 48, 8, compression=1, palette=colour_palette(256), pixels_len=10)[:-5],
            "invalid_image",
        ),
        ("offset past the end", bmp_bytes(64, 48, offset=10**6), "invalid_image"),
        ("offset inside the header", bmp_bytes(64, 48, offset=20), "invalid_image"),
        ("planes 2", bmp_bytes(64, 48, planes=2), "invalid_image"),
        ("zero width", bmp_bytes(0, 48), "invalid_image"),
        ("negative width", bmp_bytes(-64, 48), "invalid_image"),
        ("zero height", bmp_bytes(64, 0), "invalid_image"),
        ("RLE8 at 24 bpp", bmp_bytes(64, 48, 24, compression=1), "invalid_image"),
        ("no room for a palette", bmp_bytes(64, 48, 8), "invalid_image"),
        (
            "more colours than 8 bits index",
            bmp_bytes(64, 48, 8, palette=colour_palette(257), colours=257),
            "invalid_image",
        ),
        ("JPEG inside", bmp_bytes(64, 48, 0, compression=4, pixels_len=100), "unsupported_media_type"),
        ("PNG inside", bmp_bytes(64, 48, 0, compression=5, pixels_len=100), "unsupported_media_type"),
        ("2 bits per pixel", bmp_bytes(64, 48, 2, palette=colour_palette(4)), "unsupported_media_type"),
        ("64 bits per pixel", bmp_bytes(64, 48, 64), "unsupported_media_type"),
        ("compression 9", bmp_bytes(64, 48, compression=9), "unsupported_media_type"),
        ("16-byte header", bmp_bytes(64, 48, dib=16)[:18] + bytes(400), "unsupported_media_type"),
    ],
)
def test_bad_bmp(name: str, data: bytes, code: str) -> None:
    assert refused(data).code == code


def test_truncated_rle_bmp_is_refused_by_its_declared_sizes() -> None:
    data = bmp_bytes(64, 48, 8, compression=1, palette=colour_palette(256), pixels_len=100)
    assert inspect(data).width == 64  # file header's size matches
    assert refused(data[:-1]).code == "invalid_image"


# --- dimensions -----------------------------------------------------------------------

MAKERS: dict[str, Callable[[int, int], bytes]] = {
    "jpeg": jpeg_bytes,
    "png": png_bytes,
    "bmp": bmp_bytes,
}


@pytest.mark.parametrize("fmt", MAKERS)
@pytest.mark.parametrize(
    ("width", "height", "ok"),
    [
        (1, 1, False),
        (32, 32, False),
        (33, 33, True),
        (32, 100, False),
        (100, 32, False),
        (4095, 33, True),
        (33, 4095, True),
        (4096, 33, False),
        (33, 4096, False),
        (100_000, 1, False),
    ],
)
def test_side_limits(fmt: str, width: int, height: int, ok: bool) -> None:
    if fmt == "jpeg":
        width = min(width, 65535)  # a JPEG side is 16 bits
    data = MAKERS[fmt](width, height)
    if ok:
        facts = inspect(data)
        assert (facts.format, facts.width, facts.height) == (fmt, width, height)
    else:
        err = refused(data)
        assert err.code == "image_dimensions"
        assert f"{width}x{height}" in err.detail


def test_huge_headers_are_refused_before_anything_else() -> None:
    """Header-only files (no pixel data at all): the size alone decides, instantly."""
    png = png_bytes(60000, 60000, idat=b"")[:33]
    jpeg = b"\xff\xd8" + jpeg_segment(0xC0, b"\x08\xff\xff\xff\xff\x03" + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00")
    bmp = bmp_bytes(60000, 60000, pixels_len=0)
    for data in (png, jpeg, bmp):
        started = time.perf_counter()
        err = refused(data)
        assert time.perf_counter() - started < 0.1  # microseconds in practice; CI slack
        assert err.code == "image_dimensions"
        assert "less than 4096" in err.detail


def test_max_pixels_override() -> None:
    data = jpeg_sample()  # 64x48 = 3072 pixels
    assert inspect(data, max_pixels=3072).width == 64
    err = refused(data, max_pixels=3071)
    assert err.code == "image_dimensions"
    assert "3071" in err.detail
    assert inspect(data).width == 64
    assert MAX_PIXELS == 4095 * 4095


# --- grayscale ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("jpeg L", make_image("jpeg", 64, 48, mode="L")),
        ("jpeg 1 component by hand", jpeg_bytes(64, 48, 1)),
        ("png L", make_image("png", 64, 48, mode="L")),
        ("png LA", make_image("png", 64, 48, mode="LA")),
        ("png gray 16-bit", png_bytes(64, 48, depth=16, colour=0)),
        ("png gray 1-bit", png_bytes(64, 48, depth=1, colour=0)),
        ("bmp L", make_image("bmp", 64, 48, mode="L")),
        ("bmp 1-bit", make_image("bmp", 64, 48, mode="1")),
        ("bmp gray palette, not a ramp", bmp_bytes(64, 48, 8, palette=gray_palette(256, step=3))),
        ("bmp 4-bit gray", bmp_bytes(64, 48, 4, palette=gray_palette(16, step=17))),
    ],
)
def test_grayscale_is_refused(name: str, data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.detail) == ("unsupported_media_type", GRAYSCALE_DETAIL)


def test_one_coloured_palette_entry_makes_a_colour_bmp() -> None:
    palette = bytearray(gray_palette(256))
    palette[4 * 200 : 4 * 200 + 3] = b"\x10\x20\x30"
    assert inspect(bmp_bytes(64, 48, 8, palette=bytes(palette))).channels == 3


# --- buffers --------------------------------------------------------------------------


def test_buffer_types() -> None:
    data = png_sample()
    expected = inspect(data)
    assert inspect(bytearray(data)) == expected
    assert inspect(memoryview(data)) == expected
    assert inspect(memoryview(b"xx" + data)[2:]) == expected
    assert inspect(memoryview(array.array("B", data))) == expected
    padded = data + bytes(-len(data) % 4)
    assert inspect(memoryview(array.array("I", padded))) == expected  # not 'B': cast, no error
    doubled = bytes(b for b in data for _ in (0, 1))
    assert inspect(memoryview(doubled)[::2]) == expected  # a strided view is copied, not refused


def test_mmap_input_and_release(tmp_path: Path) -> None:
    """A refusal must not pin the caller's mmap (its traceback holds our frames)."""
    for content, ok in ((jpeg_sample(), True), (jpeg_sample()[:-10], False)):
        path = tmp_path / "upload.bin"
        path.write_bytes(content)
        with path.open("rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            if ok:
                assert inspect(mapped).width == 64
            else:
                err = refused(mapped)
                assert err.__traceback__ is not None
            mapped.close()  # BufferError here would mean an export leaked


# --- hostile input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty JPEG comments", b"\xff\xd8" + b"\xff\xfe\x00\x02" * 1_000_000),
        ("JPEG fill bytes", b"\xff\xd8" + b"\xff" * 4_000_000),
        ("JPEG restart markers", jpeg_bytes(64, 48, scan=b"\xff\xd0" * 2_000_000)),
        ("empty PNG chunks", png_sample()[:33] + png_chunk(b"tEXt", b"") * 330_000),
        ("empty Huffman tables", jpeg_bytes(64, 48, before=jpeg_segment(0xC4, (b"\x00" + bytes(16)) * 3854) * 60)),
        ("zeros after SOI", b"\xff\xd8\xff" + bytes(4_000_000)),
    ],
)
def test_hostile_structures_are_fast(name: str, data: bytes) -> None:
    started = time.perf_counter()
    outcome(data)
    assert time.perf_counter() - started < 1.0


def test_segment_cap() -> None:
    jpeg = b"\xff\xd8" + b"\xff\xfe\x00\x02" * (MAX_SEGMENTS + 1)
    assert str(MAX_SEGMENTS) in refused(jpeg).detail
    png = png_sample()[:33] + png_chunk(b"tEXt", b"") * (MAX_SEGMENTS + 1)
    assert str(MAX_SEGMENTS) in refused(png).detail
    huffman = jpeg_segment(0xC4, b"\x00" + bytes(16)) * 1025
    assert "1024 Huffman tables" in refused(jpeg_bytes(64, 48, before=huffman)).detail


_MAGICS = [
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xc0",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"BM" + bytes(12) + b"\x28\x00\x00\x00",
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_MAGICS), st.binary(max_size=400))
def test_arbitrary_bytes_behind_a_magic(magic: bytes, rest: bytes) -> None:
    outcome(magic + rest)


def _ihdr(width: int, height: int, depth: int, colour: int, interlace: int) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 3),
)
def test_arbitrary_png_headers(width: int, height: int, depth: int, colour: int, interlace: int) -> None:
    outcome(b"\x89PNG\r\n\x1a\n" + _ihdr(width, height, depth, colour, interlace) + png_chunk(b"IEND", b""))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([12, 40, 52, 56, 64, 108, 124]),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, 2, 4, 8, 16, 24, 32, 48]),
    st.integers(0, 7),
    st.integers(0, 2**32 - 1),
    st.integers(0, 600),
)
def test_arbitrary_bmp_headers(
    dib: int, width: int, height: int, bpp: int, compression: int, colours: int, offset: int
) -> None:
    fields = struct.pack("<iiHHIIiiII", width, height, 1, bpp, compression, 0, 0, 0, colours, 0)
    header = struct.pack("<I", dib) + fields[: dib - 4] + bytes(max(0, dib - 4 - len(fields)))
    outcome(b"BM" + struct.pack("<IHHI", 0, 0, 0, offset) + header + bytes(500))


MUTATION_SEEDS = {
    "jpeg": lambda: make_image("jpeg", 40, 36, seed=1),
    "jpeg-progressive": lambda: make_image("jpeg", 40, 36, seed=2, progressive=True),
    "jpeg-exif": lambda: encode(pixels(40, 36), "jpeg", exif=exif_with_orientation(6)),
    "png": lambda: make_image("png", 40, 36, seed=3),
    "apng": lambda: encode(pixels(40, 36), "png", save_all=True, append_images=[pixels(40, 36, seed=1)]),
    "bmp": lambda: make_image("bmp", 40, 36, seed=4),
    "bmp-palette": lambda: encode(pixels(40, 36).convert("P"), "bmp"),
}


@cache
def mutation_seed(name: str) -> bytes:
    return MUTATION_SEEDS[name]()


Edit = tuple[str, int, int]

_EDITS = st.tuples(
    st.sampled_from(["flip", "cut", "insert", "delete", "set"]),
    st.integers(0, 2**16),
    st.integers(0, 255),
)


def mutate(data: bytes, edits: list[Edit]) -> bytes:
    """Bit flips, truncations, insertions, deletions and marker-ish bytes at random places."""
    buf = bytearray(data)
    for kind, where, arg in edits:
        at = where % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= 1 << (arg % 8)
        elif kind == "cut":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = bytes([arg]) * (1 + arg % 8)
        elif kind == "delete":
            del buf[at : at + 1 + arg % 16]
        elif kind == "set" and at < len(buf):
            buf[at] = (0x00, 0xFF, 0xD9, 0xDA, 0x7F, arg)[arg % 6]
    return bytes(buf)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(MUTATION_SEEDS)), st.lists(_EDITS, min_size=1, max_size=4))
def test_mutations_of_valid_images(seed: str, edits: list[Edit]) -> None:
    outcome(mutate(mutation_seed(seed), edits))


@pytest.mark.parametrize("seed", sorted(MUTATION_SEEDS))
def test_mutation_seeds_are_valid(seed: str) -> None:
    assert isinstance(outcome(mutation_seed(seed)), ImageFacts)
