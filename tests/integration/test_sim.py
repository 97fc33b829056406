"""The ailabapi simulator against the upstream contract, over real sockets.

One real subprocess (``python -m app.sim``) serves the module; every test
starts from ``POST /_sim/reset``. A few tests run the simulator in-process with
``start_background`` to cover sandbox mode and the per-key limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.sim import BackgroundSim, SimConfig, start_background
from app.upstream import contract
from tests.imagegen import encode, make_image, pixels
from tests.servers import free_port, start_process

ROOT = Path(__file__).resolve().parents[2]
ENUMS = json.loads((ROOT / "app/schema/enums.json").read_text())
FIXTURES = ROOT / "tests/fixtures/upstream"
TENCENT_EXAMPLE = json.loads((FIXTURES / "face-analyzer-advanced.seed-style.example.json").read_text())
LIST_EXAMPLE = json.loads((FIXTURES / "face-analyzer-advanced.list-style.example.json").read_text())
NO_FACE_EXAMPLE = json.loads((FIXTURES / "error.no-face.example.json").read_text())
KEY = "sim-key"
HEX = re.compile(r"^[0-9a-f]{8,}$")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "app.sim",
        "--port",
        str(port),
        "--key",
        KEY,
        "--key",
        "second-key",
        "--faces",
        "hash",
    ]
    server = start_process(argv, {}, port)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(sim_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_url, timeout=10) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "client" in request.fixturenames:
        request.getfixturevalue("client").post("/_sim/reset").raise_for_status()


def analyze(
    client: httpx.Client,
    image: bytes,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
) -> httpx.Response:
    sent = {contract.KEY_HEADER: key} if key is not None else {}
    sent.update(headers or {})
    files = {contract.IMAGE_FIELD: ("face.jpg", image, "application/octet-stream")}
    if timeout is None:
        return client.post(contract.ANALYZE_PATH, files=files, headers=sent)
    return client.post(contract.ANALYZE_PATH, files=files, headers=sent, timeout=timeout)


def code_of(response: httpx.Response) -> str:
    return str(response.json()["error_detail"]["code"])


def set_faults(client: httpx.Client, *faults: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/_sim/faults", json={"faults": list(faults), **extra})
    assert response.status_code == 200, response.text
    return dict(response.json())


def stats(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/_sim/stats").json())


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_keys(actual: Any, example: Any, path: str = "$") -> None:
    """``actual`` has exactly the example's structure (keys, nesting, numbers where numbers)."""
    if isinstance(example, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(example), f"{path}: {set(actual) ^ set(example)}"
        for key, value in example.items():
            same_keys(actual[key], value, f"{path}.{key}")
    elif isinstance(example, list):
        assert isinstance(actual, list), path
        for i, item in enumerate(actual if example else []):
            same_keys(item, example[0], f"{path}[{i}]")
    elif is_number(example):
        assert is_number(actual), f"{path}: {actual!r}"
    else:
        assert type(actual) is type(example), f"{path}: {actual!r}"


def check_envelope(body: dict[str, Any], status: int, code: str = "") -> None:
    assert HEX.match(body["request_id"]), body["request_id"]
    assert HEX.match(body["log_id"]), body["log_id"]
    assert body["error_code"] == (contract.ERROR_NUMBER if code else 0)
    assert body["error_code_str"] == code
    assert body["error_detail"]["status_code"] == status
    assert body["error_detail"]["code"] == code
    if code in contract.ERROR_CODES:
        assert body["error_detail"]["code_message"] == contract.ERROR_CODES[code].message


def inside(value: float, bounds: list[float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def check_tencent(body: dict[str, Any], width: int, height: int, faces: int) -> None:
    table = ENUMS["tencent_style"]
    ranges = table["_ranges"]
    check_envelope(body, 200)
    same_keys(body, TENCENT_EXAMPLE)
    assert (body["image_width"], body["image_height"]) == (width, height)
    assert len(body["face_detail_infos"]) == faces
    for info in body["face_detail_infos"]:
        rect = info["face_rect"]
        assert rect["x"] >= 0
        assert rect["y"] >= 0
        assert rect["x"] + rect["width"] <= width
        assert rect["y"] + rect["height"] <= height
        attrs = info["face_detail_attributes_info"]
        for name, labels in table.items():
            if name.startswith("_"):
                continue
            item = attrs
            for part in name.split("."):
                item = item[part]
            assert str(item["type"]) in labels, (name, item)
            assert inside(item["probability"], ranges["probability"])
        for name in ("age", "beauty", "smile"):
            assert isinstance(attrs[name], int), name
            assert inside(attrs[name], ranges[name]), name
        for axis in ("pitch", "yaw", "roll"):
            assert inside(attrs["head_pose"][axis], ranges[f"head_pose.{axis}"])


def check_list(body: dict[str, Any], width: int, height: int, faces: int) -> None:
    table = ENUMS["list_style"]
    ranges = table["_ranges"]
    check_envelope(body, 200)
    same_keys(body, LIST_EXAMPLE)
    assert (body["image_width"], body["image_height"]) == (width, height)
    data = body["data"]
    assert data["face_count"] == faces
    assert data["landmark_count"] == 105
    assert data["dense_feature_length"] == 1024
    per_face = {"face_rectangles": 4, "pose_list": 3, "pupils": 6, "landmarks": 210}
    for name, value in data.items():
        if isinstance(value, list):
            assert len(value) == faces * per_face.get(name, 1), name
    for name in ("gender_list", "expressions", "glasses", "hat_list", "masks"):
        assert all(str(code) in table[name] for code in data[name]), name
    for name in ("age_list", "beauty_list", "face_probability_list"):
        assert all(inside(v, ranges[name]) for v in data[name]), name
    assert all(isinstance(v, int) for v in data["age_list"] + data["face_rectangles"])
    for name, values in data["qualities"].items():
        assert len(values) == faces, name
        assert all(inside(v, ranges["qualities.*"]) for v in values), name
    for i in range(faces):
        x, y, w, h = data["face_rectangles"][4 * i : 4 * i + 4]
        assert x >= 0
        assert y >= 0
        assert x + w <= width
        assert y + h <= height
        yaw, pitch, roll = data["pose_list"][3 * i : 3 * i + 3]
        assert inside(yaw, ranges["pose_list.yaw"])
        assert inside(pitch, ranges["pose_list.pitch"])
        assert inside(roll, ranges["pose_list.roll"])
        points = data["landmarks"][210 * i : 210 * (i + 1)]
        pupils = data["pupils"][6 * i : 6 * i + 6]
        for px, py in [*zip(points[::2], points[1::2], strict=True), (pupils[0], pupils[1]), (pupils[3], pupils[4])]:
            assert x <= px <= x + w
            assert y <= py <= y + h


def boxes_of(body: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    if "data" in body:
        flat = body["data"]["face_rectangles"]
        return [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]
    return [tuple(info["face_rect"].values()) for info in body["face_detail_infos"]]


def overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("request_id", "log_id")}


# --------------------------------------------------------------------------- success


def test_healthz_and_unknown_paths(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    missing = client.get("/api/portrait/analysis/nope")
    assert missing.status_code == 404
    assert missing.headers["x-facegate-simulator"] == "1"
    check_envelope(missing.json(), 404, "ERROR_AI_NOT_EXISTS")
    assert client.get(contract.ANALYZE_PATH).status_code == 405


def test_tencent_success(client: httpx.Client) -> None:
    response = analyze(client, make_image("jpeg", 320, 240))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-facegate-simulator"] == "1"
    check_tencent(response.json(), 320, 240, faces=1)
    ((_, _, w, h),) = boxes_of(response.json())
    assert w >= contract.MIN_FACE_SIDE
    assert h >= contract.MIN_FACE_SIDE


@pytest.mark.parametrize("how", ["header", "directive"])
def test_list_success(client: httpx.Client, how: str) -> None:
    if how == "header":
        response = analyze(client, make_image("png", 300, 200), headers={"X-Sim-Shape": "list"})
    else:
        response = analyze(client, make_image("png", 300, 200, sim="shape=list"))
    assert response.status_code == 200
    check_list(response.json(), 300, 200, faces=1)


def test_bad_shape_header(client: httpx.Client) -> None:
    response = analyze(client, make_image(), headers={"X-Sim-Shape": "xml"})
    assert response.status_code == 400
    assert code_of(response) == "ERROR_INVALID_PARAMETER"


def test_deterministic(client: httpx.Client) -> None:
    image = make_image(seed=7, sim="faces=2")
    first, second = analyze(client, image).json(), analyze(client, image).json()
    assert without_ids(first) == without_ids(second)
    assert first["request_id"] != second["request_id"]
    assert first["log_id"] != second["log_id"]
    other = analyze(client, make_image(seed=8, sim="faces=2")).json()
    assert without_ids(other) != without_ids(first)


def test_both_shapes_describe_the_same_faces(client: httpx.Client) -> None:
    image = make_image(seed=3, width=640, height=480, sim="faces=4")
    tencent = analyze(client, image).json()
    listed = analyze(client, image, headers={"X-Sim-Shape": "list"}).json()
    assert boxes_of(tencent) == boxes_of(listed)
    t_gender, l_gender = ENUMS["tencent_style"]["gender"], ENUMS["list_style"]["gender_list"]
    for i, info in enumerate(tencent["face_detail_infos"]):
        attrs = info["face_detail_attributes_info"]
        # The trap: the same person has opposite gender codes in the two shapes.
        assert t_gender[str(attrs["gender"]["type"])] == l_gender[str(listed["data"]["gender_list"][i])]
        assert attrs["age"] == min(listed["data"]["age_list"][i], 65)
        assert attrs["beauty"] == listed["data"]["beauty_list"][i]
        assert attrs["head_pose"]["yaw"] == round(listed["data"]["pose_list"][3 * i])


@pytest.mark.parametrize("shape", ["tencent", "list"])
def test_three_faces(client: httpx.Client, shape: str) -> None:
    response = analyze(client, make_image("jpeg", 600, 400, sim=f"faces=3;shape={shape}"))
    body = response.json()
    (check_tencent if shape == "tencent" else check_list)(body, 600, 400, faces=3)
    boxes = boxes_of(body)
    assert all(w >= 64 and h >= 64 for _, _, w, h in boxes)
    assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_many_faces_in_a_small_image(client: httpx.Client) -> None:
    response = analyze(client, make_image("jpeg", 100, 90, sim="faces=120;shape=list"))
    check_list(response.json(), 100, 90, faces=120)
    boxes = boxes_of(response.json())
    assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bmp"])
def test_directive_in_every_format(client: httpx.Client, fmt: str) -> None:
    response = analyze(client, make_image(fmt, 400, 300, sim="faces=2"))
    check_tencent(response.json(), 400, 300, faces=2)


# --------------------------------------------------------------------------- no face, directives


def test_no_face_in_small_image(client: httpx.Client) -> None:
    response = analyze(client, make_image("jpeg", 200, 63))
    assert response.status_code == 422
    body = response.json()
    check_envelope(body, 422, "ERROR_NO_FACE_IN_FILE")
    assert without_ids(body) == without_ids(NO_FACE_EXAMPLE)


def test_no_face_by_directive(client: httpx.Client) -> None:
    response = analyze(client, make_image("png", 500, 500, sim="faces=0"))
    assert response.status_code == 422
    assert without_ids(response.json()) == without_ids(NO_FACE_EXAMPLE)


@pytest.mark.parametrize(("code", "status"), [("ERROR_BLURRY_FACE", 422), ("EXCEEDING_LIMITS", 429)])
def test_error_directive(client: httpx.Client, code: str, status: int) -> None:
    response = analyze(client, make_image(sim=f"error={code}"))
    assert response.status_code == status
    check_envelope(response.json(), status, code)


@pytest.mark.parametrize("directive", ["faces=many", "faces=121", "error=NOT_A_CODE", "shape=xml", "fcaes=2"])
def test_bad_directive(client: httpx.Client, directive: str) -> None:
    response = analyze(client, make_image(sim=directive))
    assert response.status_code == 400
    assert code_of(response) == "ERROR_INVALID_PARAMETER"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("key", [None, "", "wrong-key", "SIM-KEY", "sim-ke"])
def test_bad_key(client: httpx.Client, key: str | None) -> None:
    response = analyze(client, make_image(), key=key)
    assert response.status_code == 401
    check_envelope(response.json(), 401, "ERROR_USER_NOT_EXISTS")


def test_every_configured_key_works(client: httpx.Client) -> None:
    assert analyze(client, make_image(), key="second-key").status_code == 200


def test_missing_image(client: httpx.Client) -> None:
    headers = {contract.KEY_HEADER: KEY}
    image = make_image()
    cases = {
        "json": client.post(contract.ANALYZE_PATH, json={"image": "x"}, headers=headers),
        "raw": client.post(contract.ANALYZE_PATH, content=image, headers={**headers, "content-type": "image/jpeg"}),
        "wrong field": client.post(contract.ANALYZE_PATH, files={"photo": ("a.jpg", image)}, headers=headers),
        "not a file": client.post(contract.ANALYZE_PATH, data={"image": "abc"}, files={"x": b""}, headers=headers),
        "broken multipart": client.post(
            contract.ANALYZE_PATH,
            content=b"--b\r\nContent-Disposition: form-data; name=image; filename=a.jpg\r\n\r\n" + image,
            headers={**headers, "content-type": "multipart/form-data; boundary=b"},
        ),
    }
    for name, response in cases.items():
        assert response.status_code == 400, name
        check_envelope(response.json(), 400, "MISSING_PARAMETERS")
    empty = analyze(client, b"")
    assert empty.status_code == 400
    assert code_of(empty) == "PARAMETERS_CANNOT_EMPTY"


def test_size_limit_is_exact(client: httpx.Client) -> None:
    image = make_image()
    padded = image + b"\0" * (contract.MAX_BYTES - len(image))
    assert analyze(client, padded).status_code == 200
    response = analyze(client, padded + b"\0")
    assert response.status_code == 413
    check_envelope(response.json(), 413, "FILE_SIZE_EXCEEDS_LIMIT")


def test_huge_body_refused_before_reading(client: httpx.Client) -> None:
    response = client.post(
        contract.ANALYZE_PATH,
        content=b"\0" * (30 * MiB),
        headers={contract.KEY_HEADER: KEY, "content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413
    assert code_of(response) == "ERROR_REQUEST_BODY_TOO_LARGE"
    assert analyze(client, make_image()).status_code == 200  # the connection pool still works


def _truncated(fmt: str) -> bytes:
    data = make_image(fmt, 200, 200)
    return data[: len(data) // 2]


def _gray_palette_png() -> bytes:
    return encode(pixels(100, 100, mode="L").convert("P"), "png")


REFUSALS: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "4096 wide png": (lambda: make_image("png", 4096, 40), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    "4096 high jpeg": (lambda: make_image("jpeg", 40, 4096), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    "bomb header": (lambda: _png_header_only(100_000, 100_000), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    "4096 square header": (lambda: _png_header_only(4096, 4096), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    # Between Pillow's warning and error thresholds: still refused from the header alone.
    "100 MP header": (lambda: _png_header_only(10_000, 10_000), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
    "32 wide": (lambda: make_image("jpeg", 32, 200), 422, "ERROR_LOW_RESOLUTION"),
    "32 high bmp": (lambda: make_image("bmp", 200, 32), 422, "ERROR_LOW_RESOLUTION"),
    "gif": (lambda: make_image("gif", 100, 100), 415, "UNSUPPORTED_FILE_TYPES"),
    "webp": (lambda: make_image("webp", 100, 100), 415, "UNSUPPORTED_FILE_TYPES"),
    "tiff": (lambda: make_image("tiff", 100, 100), 415, "UNSUPPORTED_FILE_TYPES"),
    "garbage": (lambda: b"this is not an image at all" * 10, 415, "UNSUPPORTED_FILE_TYPES"),
    "truncated jpeg": (lambda: _truncated("jpeg"), 422, "FILE_DECODING_FAILURE"),
    "truncated png": (lambda: _truncated("png"), 422, "FILE_DECODING_FAILURE"),
    "jpeg magic, broken header": (lambda: b"\xff\xd8\xff" + b"\x00" * 500, 422, "FILE_DECODING_FAILURE"),
    "gray jpeg": (lambda: make_image("jpeg", mode="L"), 415, "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"),
    "gray png": (lambda: make_image("png", mode="L"), 415, "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"),
    "gray+alpha png": (lambda: make_image("png", mode="LA"), 415, "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"),
    "16-bit gray png": (
        lambda: encode(Image.new("I;16", (100, 100), 300), "png"),
        415,
        "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE",
    ),
    "1-bit bmp": (lambda: make_image("bmp", mode="1"), 415, "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"),
    "gray palette png": (_gray_palette_png, 415, "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"),
}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: must be refused without decoding."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name", list(REFUSALS))
def test_image_refusals(client: httpx.Client, name: str) -> None:
    make, status, code = REFUSALS[name]
    response = analyze(client, make())
    assert response.status_code == status, response.text
    check_envelope(response.json(), status, code)


ACCEPTED: dict[str, tuple[Callable[[], bytes], int, int]] = {
    "4095 wide png": (lambda: make_image("png", 4095, 64), 4095, 64),
    "33x33 (no face, but not too small)": (lambda: make_image("jpeg", 33, 33), 33, 33),
    "64x64": (lambda: make_image("jpeg", 64, 64), 64, 64),
    "rgb bmp": (lambda: make_image("bmp", 120, 90), 120, 90),
    "rgba png": (lambda: make_image("png", 120, 90, mode="RGBA"), 120, 90),
    "cmyk jpeg": (lambda: make_image("jpeg", 120, 90, mode="CMYK"), 120, 90),
    "colour palette png": (lambda: encode(pixels(120, 90).convert("P"), "png"), 120, 90),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_images(client: httpx.Client, name: str) -> None:
    make, width, height = ACCEPTED[name]
    response = analyze(client, make())
    if min(width, height) < contract.MIN_FACE_SIDE:
        assert response.status_code == 422
        assert code_of(response) == "ERROR_NO_FACE_IN_FILE"
    else:
        assert response.status_code == 200, response.text
        check_tencent(response.json(), width, height, faces=1)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"mode": "status", "code": "PROCESSING_FAILURE"}, 500, "PROCESSING_FAILURE"),
        ({"mode": "status", "status": 502}, 502, "AI_SERVICE_ERROR"),
        ({"mode": "status", "status": 503}, 503, "AI_SERVICE_FLOW_RESTRICTION"),
        ({"mode": "status", "code": "AI_SERVICE_TIMEOUT"}, 504, "AI_SERVICE_TIMEOUT"),
        ({"mode": "status", "status": 429}, 429, "EXCEEDING_LIMITS"),
        ({"mode": "status", "code": "ERROR_NOT_ENOUGH_CREDITS"}, 429, "ERROR_NOT_ENOUGH_CREDITS"),
        ({"mode": "status", "status": 503, "code": "SOMETHING_NEW"}, 503, "SOMETHING_NEW"),
        ({"mode": "no_credits"}, 429, "ERROR_NOT_ENOUGH_CREDITS"),
        ({"mode": "bad_key"}, 401, "ERROR_USER_NOT_EXISTS"),
    ],
)
def test_status_faults(client: httpx.Client, fault: dict[str, Any], status: int, code: str) -> None:
    set_faults(client, fault)
    response = analyze(client, make_image())
    assert response.status_code == status
    check_envelope(response.json(), status, code)
    assert "retry-after" not in response.headers
    assert analyze(client, make_image()).status_code == 200  # count defaults to 1


def test_retry_after(client: httpx.Client) -> None:
    set_faults(client, {"mode": "status", "code": "EXCEEDING_LIMITS", "retry_after": 7})
    response = analyze(client, make_image())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


def test_fault_queue(client: httpx.Client) -> None:
    plan = set_faults(client, {"mode": "status", "status": 503, "count": 2}, {"mode": "no_credits"})
    assert [f["count"] for f in plan["faults"]] == [2, 1]
    image = make_image()
    assert analyze(client, image).status_code == 503
    assert client.get("/_sim/faults").json()["faults"][0]["count"] == 1
    assert analyze(client, image).status_code == 503
    assert code_of(analyze(client, image)) == "ERROR_NOT_ENOUGH_CREDITS"
    assert analyze(client, image).status_code == 200
    assert client.get("/_sim/faults").json()["faults"] == []


def test_fault_until_cleared(client: httpx.Client) -> None:
    set_faults(client, {"mode": "status", "status": 502, "count": None})
    assert [analyze(client, make_image()).status_code for _ in range(3)] == [502, 502, 502]
    assert client.delete("/_sim/faults").json() == {"faults": [], "latency_ms": 0}
    assert analyze(client, make_image()).status_code == 200


def test_faults_are_not_consumed_by_bad_keys(client: httpx.Client) -> None:
    set_faults(client, {"mode": "status", "status": 503})
    assert analyze(client, make_image(), key="nope").status_code == 401
    assert analyze(client, make_image()).status_code == 503


def test_fault_probability_is_seeded(client: httpx.Client) -> None:
    def run() -> list[int]:
        set_faults(client, {"mode": "status", "status": 503, "count": None, "probability": 0.5})
        return [analyze(client, make_image()).status_code for _ in range(12)]

    first = run()
    assert set(first) == {200, 503}
    assert run() == first


def test_malformed(client: httpx.Client) -> None:
    set_faults(client, {"mode": "malformed"})
    response = analyze(client, make_image())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_malformed_custom_body(client: httpx.Client) -> None:
    html = "<html><body>502 Bad Gateway</body></html>"
    set_faults(client, {"mode": "malformed", "status": 502, "body": html, "content_type": "text/html"})
    response = analyze(client, make_image())
    assert (response.status_code, response.text, response.headers["content-type"]) == (502, html, "text/html")


def test_missing_field(client: httpx.Client) -> None:
    set_faults(client, {"mode": "missing_field"})
    response = analyze(client, make_image())
    assert response.status_code == 200
    body = response.json()
    check_envelope(body, 200)
    assert "face_detail_infos" not in body
    assert "data" not in body


def test_drop(client: httpx.Client) -> None:
    set_faults(client, {"mode": "drop"})
    with pytest.raises(httpx.RemoteProtocolError):
        analyze(client, make_image())
    assert analyze(client, make_image()).status_code == 200
    assert stats(client)["by_code"] == {"SIM_DROP": 1, "OK": 1}


def test_hang_outlasts_client_timeout(client: httpx.Client) -> None:
    set_faults(client, {"mode": "hang"})
    with pytest.raises(httpx.ReadTimeout):
        analyze(client, make_image(), timeout=0.3)
    deadline = time.monotonic() + 3
    while (current := stats(client))["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert current["in_flight"] == 0
    assert current["disconnected"] == 1


def test_short_hang_then_answers(client: httpx.Client) -> None:
    set_faults(client, {"mode": "hang", "seconds": 0.2})
    started = time.monotonic()
    assert analyze(client, make_image()).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_redirect(client: httpx.Client) -> None:
    set_faults(client, {"mode": "redirect", "location": "https://elsewhere.example/api"})
    response = analyze(client, make_image())
    assert response.status_code == 307
    assert response.headers["location"] == "https://elsewhere.example/api"


def test_latency(client: httpx.Client) -> None:
    assert set_faults(client, latency_ms=200)["latency_ms"] == 200
    started = time.monotonic()
    assert analyze(client, make_image()).status_code == 200
    assert time.monotonic() - started >= 0.2
    client.delete("/_sim/faults")
    started = time.monotonic()
    analyze(client, make_image())
    assert time.monotonic() - started < 0.2


def test_latency_directive(client: httpx.Client) -> None:
    started = time.monotonic()
    assert analyze(client, make_image(sim="latency_ms=150")).status_code == 200
    assert time.monotonic() - started >= 0.15


@pytest.mark.parametrize(
    "plan",
    [
        {"faults": [{"mode": "explode"}]},
        {"faults": [{"mode": "status"}]},
        {"faults": [{"mode": "status", "code": "MADE_UP"}]},
        {"faults": [{"mode": "status", "status": 418}]},
        {"faults": [{"mode": "redirect"}]},
        {"faults": [{"mode": "drop", "count": 0}]},
        {"faults": [{"mode": "drop", "colour": "red"}]},
        {"latency_ms": -1},
    ],
)
def test_invalid_fault_plans(client: httpx.Client, plan: dict[str, Any]) -> None:
    response = client.post("/_sim/faults", json=plan)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert client.get("/_sim/faults").json()["faults"] == []


# --------------------------------------------------------------------------- counters


def test_counters(client: httpx.Client) -> None:
    image, small = make_image(seed=1), make_image(width=50, height=50)
    analyze(client, image)
    analyze(client, image)
    analyze(client, small)
    analyze(client, image, key="bad")
    set_faults(client, {"mode": "no_credits"})
    analyze(client, image)
    current = stats(client)
    assert current["calls"] == 5
    assert current["ok"] == 2
    assert current["throttled"] == 1
    assert current["by_code"] == {
        "OK": 2,
        "ERROR_NO_FACE_IN_FILE": 1,
        "ERROR_USER_NOT_EXISTS": 1,
        "ERROR_NOT_ENOUGH_CREDITS": 1,
    }
    sha = hashlib.sha256
    assert current["per_image"] == {sha(image).hexdigest(): 3, sha(small).hexdigest(): 1}
    assert current["in_flight"] == 0
    assert current["max_in_flight"] == 1
    reset = client.post("/_sim/reset").json()
    assert reset["calls"] == 0
    assert reset["by_code"] == {}
    assert reset["per_image"] == {}


async def test_max_in_flight(sim_url: str, client: httpx.Client) -> None:
    set_faults(client, latency_ms=300)
    async with httpx.AsyncClient(base_url=sim_url, timeout=5) as async_client:
        files = {"image": ("a.jpg", make_image(), "image/jpeg")}
        calls = [
            async_client.post(contract.ANALYZE_PATH, files=files, headers={contract.KEY_HEADER: KEY}) for _ in range(4)
        ]
        responses = await asyncio.gather(*calls)
    assert [r.status_code for r in responses] == [200] * 4
    current = stats(client)
    assert current["max_in_flight"] == 4
    assert current["in_flight"] == 0


# --------------------------------------------------------------------------- in-process (sandbox mode)


async def _post(http: httpx.AsyncClient, url: str, image: bytes) -> httpx.Response:
    files = {"image": ("a.jpg", image, "image/jpeg")}
    return await http.post(url + contract.ANALYZE_PATH, files=files, headers={contract.KEY_HEADER: KEY})


async def test_start_background_on_port_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sim = await start_background(port=0, config=SimConfig(shape="list", faces="hash"))
    try:
        assert not sim.url.endswith(":0")
        async with httpx.AsyncClient(timeout=5) as http:
            response = await _post(http, sim.url, make_image("jpeg", 200, 150))
            check_list(response.json(), 200, 150, faces=1)
            await http.post(sim.url + "/_sim/faults", json={"faults": [{"mode": "drop"}]})
            with pytest.raises(httpx.RemoteProtocolError):
                await _post(http, sim.url, make_image())
        assert sim.stats()["by_code"] == {"OK": 1, "SIM_DROP": 1}
    finally:
        await sim.stop()
    # Embedded in the gateway, the sim keeps quiet: no access lines, no error for a deliberate drop.
    noisy = [r for r in caplog.records if r.name.startswith("uvicorn")]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_background_concurrency_limit() -> None:
    config = SimConfig(max_concurrency=1, latency_ms=200, retry_after_on_throttle=True, faces="hash")
    async with BackgroundSim(config=config) as sim, httpx.AsyncClient(timeout=5) as http:
        image = make_image()
        first, second = await asyncio.gather(_post(http, sim.url, image), _post(http, sim.url, image))
        assert sorted([first.status_code, second.status_code]) == [200, 429]
        throttled = first if first.status_code == 429 else second
        check_envelope(throttled.json(), 429, "EXCEEDING_LIMITS")
        assert throttled.headers["retry-after"] == "1"
        assert sim.stats()["throttled"] == 1


async def test_background_qps_limit_and_runtime_limits() -> None:
    async with BackgroundSim(config=SimConfig(qps=1, faces="hash")) as sim, httpx.AsyncClient(timeout=5) as http:
        image = make_image()
        assert (await _post(http, sim.url, image)).status_code == 200
        refused = await _post(http, sim.url, image)
        assert refused.status_code == 429
        assert "retry-after" not in refused.headers
        limits = (await http.post(sim.url + "/_sim/limits", json={"qps": 0})).json()
        assert limits["qps"] == 0
        assert (await _post(http, sim.url, image)).status_code == 200
        await http.post(sim.url + "/_sim/reset")
        assert (await http.get(sim.url + "/_sim/limits")).json()["qps"] == 1


async def test_stop_releases_hung_calls() -> None:
    sim = await start_background(config=SimConfig(faces="hash"))
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            await http.post(sim.url + "/_sim/faults", json={"faults": [{"mode": "hang"}]})
            hung = asyncio.create_task(_post(http, sim.url, make_image()))
            for _ in range(500):
                if sim.stats()["in_flight"]:
                    break
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await sim.stop()
            assert time.monotonic() - started < 0.9  # well under the graceful-shutdown timeout
            assert (await hung).status_code == 200
    finally:
        await sim.stop()


async def test_background_reports_busy_port() -> None:
    async with BackgroundSim() as sim:
        with pytest.raises(OSError):
            await start_background(port=sim.port)


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEGATE_SIM_API_KEYS", "a, b")
    monkeypatch.setenv("FACEGATE_SIM_SHAPE", "list")
    assert (SimConfig().api_keys, SimConfig().shape) == (["a", "b"], "list")
    monkeypatch.setenv("FACEGATE_SIM_API_KEYS", '["c"]')
    assert SimConfig().api_keys == ["c"]


# --------------------------------------------------------------------------- keys, credits, balance


def test_balance_endpoint_answers_ailabapis_shape(client: httpx.Client) -> None:
    r = client.get(contract.CREDITS_PATH, headers={contract.KEY_HEADER: KEY})
    assert r.status_code == 200
    body = r.json()
    check_envelope(body, 200)
    (entry,) = body["data"]
    assert set(entry) == {
        "unique_sign", "name", "balance", "total", "last_recharge_balance", "balance_warning",
        "first_buy_time", "last_update_time",
    }  # fmt: skip
    assert contract.credits_balance(body) == 1_000_000
    refused = client.get(contract.CREDITS_PATH, headers={contract.KEY_HEADER: "nope"})
    assert refused.status_code == 401
    check_envelope(refused.json(), 401, "ERROR_USER_NOT_EXISTS")
    assert stats(client)["calls"] == 0 and stats(client)["credit_queries"] == 2


def test_credits_are_per_key_billed_per_answer_and_settable(client: httpx.Client) -> None:
    client.post("/_sim/keys", json={"keys": {KEY: {"balance": 2}, "added-key": {"balance": 5}}}).raise_for_status()
    assert analyze(client, make_image(sim="error=ERROR_BLURRY_FACE")).status_code == 422  # a verdict: not billed
    assert [analyze(client, make_image()).status_code for _ in range(3)] == [200, 200, 429]
    empty = analyze(client, make_image())
    check_envelope(empty.json(), 429, "ERROR_NOT_ENOUGH_CREDITS")
    assert analyze(client, make_image(), key="added-key").status_code == 200, "another key, its own account"
    keys = client.get("/_sim/keys").json()
    assert (keys[KEY]["balance"], keys[KEY]["billed"], keys[KEY]["calls"]) == (0, 2, 5)
    assert (keys["added-key"]["balance"], keys["added-key"]["billed"]) == (4, 1)
    client.post("/_sim/keys", json={"keys": {KEY: {"balance": 10}}}).raise_for_status()  # a top-up
    assert analyze(client, make_image()).status_code == 200
    client.post("/_sim/reset").raise_for_status()
    keys = client.get("/_sim/keys").json()
    assert "added-key" not in keys and keys[KEY]["balance"] == 1_000_000


async def test_concurrent_calls_cannot_overdraw_a_key() -> None:
    config = SimConfig(latency_ms=100, faces="hash", credits=3)
    async with BackgroundSim(config=config) as sim, httpx.AsyncClient(timeout=5) as http:
        results = await asyncio.gather(*(_post(http, sim.url, make_image()) for _ in range(6)))
    assert sorted(r.status_code for r in results) == [200, 200, 200, 429, 429, 429]


async def test_limits_apply_per_key() -> None:
    config = SimConfig(api_keys=["k1", "k2"], max_concurrency=1, latency_ms=200, faces="hash")
    async with BackgroundSim(config=config) as sim, httpx.AsyncClient(timeout=5) as http:
        image = make_image()

        async def post(key: str) -> int:
            files = {contract.IMAGE_FIELD: ("face.jpg", image, "image/jpeg")}
            r = await http.post(sim.url + contract.ANALYZE_PATH, files=files, headers={contract.KEY_HEADER: key})
            return r.status_code

        assert sorted(await asyncio.gather(post("k1"), post("k2"), post("k1"))) == [200, 200, 429]
        keys = (await http.get(sim.url + "/_sim/keys")).json()
        assert (keys["k1"]["throttled"], keys["k2"]["throttled"], keys["k1"]["max_in_flight"]) == (1, 0, 1)
