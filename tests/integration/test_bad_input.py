"""Bad input gets its documented error, for free: no upstream call, no quota, no crash.

Each case goes over a real socket to a real gateway process; after each, the simulator's
counter must still read zero and the tenant's quota must be untouched.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Gateway, Sim, unique_image
from tests.imagegen import encode, pixels


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims huge dimensions (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 16)
    body = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    body += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body


def gray_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (128, 128), 90).save(buf, "JPEG")
    return buf.getvalue()


def broken_crc_png() -> bytes:
    data = bytearray(unique_image("png"))
    data[40] ^= 0xFF  # inside the first IDAT chunk
    return bytes(data)


@dataclass
class Case:
    name: str
    status: int
    code: str
    send: Callable[[Gateway], httpx.Response]


def multipart(
    image: bytes, *, field: str = "image", filename: str = "x.jpg", ctype: str = "image/jpeg"
) -> Callable[[Gateway], httpx.Response]:
    return lambda gw: gw.analyze_files({field: (filename, image, ctype)})


def raw(body: bytes, ctype: str | None) -> Callable[[Gateway], httpx.Response]:
    def send(gw: Gateway) -> httpx.Response:
        headers = {"Authorization": f"Bearer {gw.key()}"}
        if ctype is not None:
            headers["Content-Type"] = ctype
        return httpx.post(gw.url + "/v1/faces/analyze", content=body, headers=headers, timeout=30)

    return send


def with_headers(headers: dict[str, Any], files: Any = None, params: Any = None) -> Callable[[Gateway], httpx.Response]:
    def send(gw: Gateway) -> httpx.Response:
        return httpx.post(
            gw.url + "/v1/faces/analyze",
            headers=headers,
            files=files or {"image": ("x.jpg", unique_image(), "image/jpeg")},
            params=params,
            timeout=30,
        )

    return send


def two_images(gw: Gateway) -> httpx.Response:
    files = [("image", ("a.jpg", unique_image(), "image/jpeg")), ("image", ("b.jpg", unique_image(), "image/jpeg"))]
    return gw.analyze_files(files)


def handmade_multipart(body: bytes, ctype: str) -> Callable[[Gateway], httpx.Response]:
    return raw(body, ctype)


JPEG = unique_image()
BIG = unique_image(width=256, height=256)

CASES = [
    Case("zero bytes", 400, "image_missing", multipart(b"")),
    Case("truncated jpeg (scan cut)", 422, "invalid_image", multipart(JPEG[: len(JPEG) // 2])),
    Case("truncated jpeg (header only)", 422, "invalid_image", multipart(JPEG[:200])),
    Case("truncated png", 422, "invalid_image", multipart(unique_image("png")[:300], ctype="image/png")),
    Case("png with a broken crc", 422, "invalid_image", multipart(broken_crc_png(), ctype="image/png")),
    Case("truncated bmp", 422, "invalid_image", multipart(unique_image("bmp")[:5000], ctype="image/bmp")),
    Case("text named .jpg", 415, "unsupported_media_type", multipart(b"hello, I am not a picture\n" * 20)),
    Case(
        "html with image/png type",
        415,
        "unsupported_media_type",
        multipart(b"<!doctype html><html></html>", ctype="image/png"),
    ),
    Case("lying raw content-type", 415, "unsupported_media_type", raw(b"%PDF-1.7\n" + b"x" * 500, "image/jpeg")),
    Case("gif", 415, "unsupported_media_type", multipart(unique_image("gif"), ctype="image/gif")),
    Case("webp", 415, "unsupported_media_type", multipart(unique_image("webp"), ctype="image/webp")),
    Case("grayscale jpeg", 415, "unsupported_media_type", multipart(gray_jpeg())),
    Case(
        "60000x60000 png header", 422, "image_dimensions", multipart(png_header_only(60000, 60000), ctype="image/png")
    ),
    Case("1x1 png", 422, "image_dimensions", multipart(encode(pixels(1, 1), "png"), ctype="image/png")),
    Case("32x32 jpeg", 422, "image_dimensions", multipart(encode(pixels(32, 32), "jpeg"))),
    Case("4096 wide png", 422, "image_dimensions", multipart(encode(pixels(4096, 40), "png"), ctype="image/png")),
    Case("over-size body", 413, "image_too_large", raw(b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024), "image/jpeg")),
    Case("missing image field", 400, "image_missing", multipart(JPEG, field="file")),
    Case("two image fields", 400, "invalid_request", two_images),
    Case("no content-type", 415, "unsupported_media_type", raw(JPEG, None)),
    Case("json body", 415, "unsupported_media_type", raw(b'{"image": "aGVsbG8="}', "application/json")),
    Case("multipart without boundary", 400, "invalid_request", raw(b"--x\r\n", "multipart/form-data")),
    Case(
        "multipart without closing boundary",
        400,
        "invalid_request",
        handmade_multipart(
            b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + JPEG[:1000],
            "multipart/form-data; boundary=XyZ",
        ),
    ),
    Case("wrong key", 401, "unauthorized", with_headers({"Authorization": "Bearer fg_not-a-real-key"})),
    Case("no key", 401, "unauthorized", with_headers({})),
    Case("malformed authorization", 401, "unauthorized", with_headers({"Authorization": "Basic dXNlcjpwYXNz"})),
    Case(
        "unicode in the key header", 401, "unauthorized", with_headers({"X-API-Key": "fg_\u00e9\u00e8\u00ff".encode()})
    ),
    Case("key in the query string", 400, "credentials_in_query", with_headers({}, params={"api_key": "fg_whatever"})),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_for_free(gateway: Gateway, sim: Sim, case: Case) -> None:
    with gateway.client("beta") as c:
        before = c.get("/v1/usage").json()["quotas"]["daily"]["used"]
    response = case.send(gateway)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == case.code
    assert body["status"] == case.status
    assert body["type"] == f"urn:facegate:problem:{case.code}"
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    assert sim.calls == 0
    with gateway.client("beta") as c:
        assert c.get("/v1/usage").json()["quotas"]["daily"]["used"] == before


def test_lying_content_length_is_cut_off(gateway: Gateway, sim: Sim) -> None:
    """A header announcing 3 GB is refused before a single body byte is read."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/faces/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Authorization: Bearer " + gateway.key().encode() + b"\r\nContent-Length: 3000000000\r\n\r\n"
        )
        reply = s.recv(65536)
        while b"image_too_large" not in reply and (more := s.recv(65536)):  # head and body may arrive apart
            reply += more
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"image_too_large" in reply
    assert sim.calls == 0


def test_raw_body_cut_short_is_invalid(gateway: Gateway, sim: Sim) -> None:
    """A raw upload that stops mid-image is judged on the bytes that arrived: truncated."""
    image = JPEG
    response = httpx.post(
        gateway.url + "/v1/faces/analyze",
        content=image[:500],
        headers={"Authorization": f"Bearer {gateway.key()}", "Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_image"
    assert sim.calls == 0
