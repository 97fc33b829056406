"""The whole path over real sockets: upload → gateway → simulator → normalized v1 answer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
import pytest

from app.schema.v1 import AnalysisV1
from app.upstream import contract
from tests.conftest import SIM_KEY, Gateway, Sim, unique_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("fmt", "mime"), [("jpeg", "image/jpeg"), ("png", "image/png"), ("bmp", "image/bmp")])
def test_full_path_per_format(gateway: Gateway, sim: Sim, fmt: str, mime: str) -> None:
    image = unique_image(fmt, 320, 240, sim="faces=2")
    response = gateway.analyze_files({"image": (f"photo.{fmt}", image, mime)})
    assert response.status_code == 200, response.text
    body = response.json()
    AnalysisV1.model_validate(body)
    assert body["schema_version"] == "1"
    assert body["image"] == {
        "sha256": __import__("hashlib").sha256(image).hexdigest(),
        "width": 320,
        "height": 240,
        "format": fmt,
        "bytes": len(image),
    }
    assert len(body["faces"]) == 2
    assert body["source"]["provider"] == "simulator"
    assert body["source"]["upstream_shape"] == "tencent"
    assert body["source"]["cached"] is False
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["cache-status"] == "facegate; fwd=uri-miss; stored"
    assert sim.calls == 1


def test_raw_body_upload(gateway: Gateway, sim: Sim) -> None:
    image = unique_image("png")
    response = httpx.post(
        gateway.url + "/v1/faces/analyze",
        content=image,
        headers={"X-API-Key": gateway.key(), "Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == "png"
    assert sim.calls == 1


def test_list_shape_is_normalized_with_opposite_gender_codes(gateway: Gateway, sim: Sim) -> None:
    image = unique_image(sim="shape=list;faces=1")
    body = gateway.analyze(image, params={"landmarks": "true"}).json()
    assert body["source"]["upstream_shape"] == "list"
    face = body["faces"][0]
    # The list style's 0 is female and 1 male: the label, not the code, is what callers compare.
    assert face["gender"]["label"] == {0: "female", 1: "male"}[face["gender"]["code"]]
    assert face["emotion"] is None  # the list style has no emotion: null, never invented
    assert face["expression"]["label"] in ("neutral", "smile")
    assert len(face["landmarks"]) == 105
    assert set(face["pupils"]) == {"left", "right"}
    without = gateway.analyze(image).json()["faces"][0]
    assert without["landmarks"] is None and without["pupils"] is None


def test_no_face_is_an_empty_list(gateway: Gateway, sim: Sim) -> None:
    response = gateway.analyze(unique_image(sim="faces=0"))
    assert response.status_code == 200
    assert response.json()["faces"] == []
    assert response.headers["cache-status"] == "facegate; fwd=uri-miss; stored"


def test_sane_request_id_is_kept_and_insane_one_replaced(gateway: Gateway, sim: Sim) -> None:
    ok = gateway.analyze(unique_image(), headers={"X-Request-ID": "trace-123.abc"})
    assert ok.headers["x-request-id"] == "trace-123.abc"
    assert ok.json()["request_id"] == "trace-123.abc"
    bad = gateway.analyze(unique_image(), headers={"X-Request-ID": "x" * 300})
    assert bad.headers["x-request-id"] != "x" * 300
    assert len(bad.headers["x-request-id"]) == 32


def test_compat_route_answers_ailabapi_json_unchanged(gateway: Gateway, sim: Sim) -> None:
    image = unique_image(sim="faces=1")
    url = gateway.url + contract.ANALYZE_PATH
    files = {"image": ("a.jpg", image, "image/jpeg")}
    first = httpx.post(url, headers={contract.KEY_HEADER: gateway.key()}, files=files, timeout=30)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "facegate; fwd=uri-miss; stored"
    direct = httpx.post(
        sim.url + contract.ANALYZE_PATH, headers={contract.KEY_HEADER: SIM_KEY}, files=files, timeout=30
    )
    gateway_body, direct_body = first.json(), direct.json()
    for volatile in ("request_id", "log_id"):
        gateway_body.pop(volatile)
        direct_body.pop(volatile)
    assert gateway_body == direct_body  # ailabapi's own JSON, not facegate's schema
    second = httpx.post(url, headers={contract.KEY_HEADER: gateway.key()}, files=files, timeout=30)
    assert second.headers["cache-status"].startswith("facegate; hit")
    assert second.content == first.content  # byte for byte, from the cache
    assert sim.calls == 2  # the gateway's one call plus our direct one


def test_compat_route_errors_use_ailabapi_envelope(gateway: Gateway, sim: Sim) -> None:
    url = gateway.url + contract.ANALYZE_PATH
    bad_key = httpx.post(
        url, headers={contract.KEY_HEADER: "nope"}, files={"image": ("a.jpg", unique_image(), "image/jpeg")}
    )
    assert bad_key.status_code == 401
    assert bad_key.json()["error_detail"]["code"] == "ERROR_USER_NOT_EXISTS"
    assert bad_key.headers["x-facegate-error"] == "unauthorized"
    no_face = httpx.post(
        url,
        headers={contract.KEY_HEADER: gateway.key()},
        files={"image": ("a.jpg", unique_image(sim="faces=0"), "image/jpeg")},
    )
    assert no_face.status_code == 422
    assert no_face.json()["error_detail"]["code"] == "ERROR_NO_FACE_IN_FILE"
    gif = httpx.post(
        url, headers={contract.KEY_HEADER: gateway.key()}, files={"image": ("a.gif", unique_image("gif"), "image/gif")}
    )
    assert gif.status_code == 415
    assert gif.json()["error_code_str"] == "UNSUPPORTED_FILE_TYPES"
    assert sim.calls == 1  # only the no-face image reached the upstream


def test_schema_endpoint_serves_the_committed_file(gateway: Gateway) -> None:
    response = httpx.get(gateway.url + "/v1/schema")
    assert response.status_code == 200
    assert response.content == (ROOT / "app" / "schema" / "v1.schema.json").read_bytes()
    assert json.loads(response.content)["title"] == "AnalysisV1"


def test_openapi_documents_both_routes_with_examples(gateway: Gateway) -> None:
    spec = httpx.get(gateway.url + "/openapi.json").json()
    analyze = spec["paths"]["/v1/faces/analyze"]["post"]
    assert analyze["requestBody"] == {"$ref": "#/components/requestBodies/ImageUpload"}
    assert "multipart/form-data" in spec["components"]["requestBodies"]["ImageUpload"]["content"]
    assert "422" in analyze["responses"] and "429" in analyze["responses"]
    assert contract.ANALYZE_PATH in spec["paths"]
    assert spec["components"]["schemas"]["AnalysisV1"].get("examples") or spec["components"]["schemas"][
        "AnalysisV1"
    ].get("example")
    assert httpx.get(gateway.url + "/docs").status_code == 200


def test_health_and_readiness(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["tenants"] == "ok"


def test_unknown_route_and_method_are_problems(gateway: Gateway) -> None:
    missing = httpx.get(gateway.url + "/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    wrong = httpx.get(gateway.url + "/v1/faces/analyze")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == "method_not_allowed"


def test_json_bodies_are_orjson_compatible(gateway: Gateway, sim: Sim) -> None:
    """Answers are strict JSON (no NaN), so every client parses them."""
    body = gateway.analyze(unique_image(sim="faces=3")).content
    assert len(orjson.loads(body)["faces"]) == 3
