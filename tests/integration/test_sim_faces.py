"""The sandbox's real face detector (issue 17 §1), on committed public-domain photos.

One simulator subprocess with ``--faces detect`` (the default: what ``make run`` gets) serves
the module; boxes must overlap the hand-drawn true faces (IoU >= 0.5) in both answer
shapes. Also: a faceless photo gets ailabapi's no-face answer, directives still win, large
images come back in their own pixels, a sandbox-mode gateway shows the boxes in v1, and
without the ``sandbox`` extra the simulator falls back to hash boxes and says so once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.imagegen import encode
from tests.integration.test_sim import (
    KEY,
    NO_FACE_EXAMPLE,
    analyze,
    boxes_of,
    check_envelope,
    check_list,
    check_tencent,
    code_of,
    without_ids,
)
from tests.photos import assert_faces_found, photo, picture, scaled, size_of, truth, two_faces
from tests.servers import free_port, start_process

pytest.importorskip("cv2", reason="the sandbox extra is not installed: pip install -c constraints.txt -e '.[sandbox]'")

PORTRAITS = ["astronaut.jpg", "grace_hopper.jpg"]
SHAPES = ["tencent", "list"]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    port = free_port()
    argv = [sys.executable, "-m", "app.sim", "--port", str(port), "--key", KEY, "--faces", "detect"]
    with start_process(argv, {}, port) as server, httpx.Client(base_url=server.url, timeout=20) as http:
        yield http


def shaped(client: httpx.Client, image: bytes, shape: str) -> dict[str, Any]:
    response = analyze(client, image, headers={"X-Sim-Shape": shape})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_healthz_says_the_detector_is_on(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "faces": "detector"}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", PORTRAITS)
def test_boxes_are_where_the_faces_are(client: httpx.Client, name: str, shape: str) -> None:
    body = shaped(client, photo(name), shape)
    width, height = size_of(name)
    (check_list if shape == "list" else check_tencent)(body, width, height, faces=len(truth(name)))
    assert_faces_found(boxes_of(body), truth(name))


def test_two_faces_left_to_right_and_both_shapes_agree(client: httpx.Client) -> None:
    image, true, (width, height) = two_faces()
    tencent, listed = shaped(client, image, "tencent"), shaped(client, image, "list")
    check_tencent(tencent, width, height, faces=2)
    check_list(listed, width, height, faces=2)
    assert boxes_of(tencent) == boxes_of(listed)
    assert_faces_found(boxes_of(tencent), true)
    assert [box[0] for box in boxes_of(tencent)] == sorted(box[0] for box in boxes_of(tencent))
    # One truth behind both shapes: the same people (ages; the gender codes are opposite).
    ages = [info["face_detail_attributes_info"]["age"] for info in tencent["face_detail_infos"]]
    assert [min(age, 65) for age in listed["data"]["age_list"]] == ages
    genders = [info["face_detail_attributes_info"]["gender"]["type"] for info in tencent["face_detail_infos"]]
    assert listed["data"]["gender_list"] == [1 - code for code in genders]


def test_pupils_sit_on_the_detected_eyes(client: httpx.Client) -> None:
    data = shaped(client, photo("astronaut.jpg"), "list")["data"]
    left, right = data["pupils"][0:2], data["pupils"][3:5]
    # By hand on the photo: her eyes are at about (203, 101) and (247, 101).
    assert abs(left[0] - 203) <= 8
    assert abs(left[1] - 101) <= 8
    assert abs(right[0] - 247) <= 8
    assert abs(right[1] - 101) <= 8


def test_same_photo_same_answer(client: httpx.Client) -> None:
    first, second = (shaped(client, photo("grace_hopper.jpg"), "tencent") for _ in range(2))
    assert without_ids(first) == without_ids(second)


def test_a_photo_without_faces_is_the_no_face_answer(client: httpx.Client) -> None:
    assert truth("coffee.jpg") == []
    response = analyze(client, photo("coffee.jpg"))
    assert response.status_code == 422
    check_envelope(response.json(), 422, "ERROR_NO_FACE_IN_FILE")
    assert without_ids(response.json()) == without_ids(NO_FACE_EXAMPLE)


@pytest.mark.parametrize(("factor", "fmt"), [(4.0, "JPEG"), (2.5, "PNG")])
def test_large_images_are_detected_small_and_answered_in_their_own_pixels(
    client: httpx.Client, factor: float, fmt: str
) -> None:
    image, true, (width, height) = scaled("astronaut.jpg", factor, fmt)
    assert max(width, height) > 640  # larger than what the detector sees
    body = shaped(client, image, "tencent")
    check_tencent(body, width, height, faces=1)
    assert_faces_found(boxes_of(body), true)


def test_directives_win_over_the_detector(client: httpx.Client) -> None:
    portrait = picture("astronaut.jpg")
    three = shaped(client, encode(portrait, "jpeg", sim="faces=3"), "tencent")
    check_tencent(three, 512, 512, faces=3)
    none = analyze(client, encode(portrait, "jpeg", sim="faces=0"))
    assert code_of(none) == "ERROR_NO_FACE_IN_FILE"
    blurry = analyze(client, encode(portrait, "jpeg", sim="error=ERROR_BLURRY_FACE"))
    assert code_of(blurry) == "ERROR_BLURRY_FACE"
    coffee = shaped(client, encode(picture("coffee.jpg"), "png", sim="faces=1;shape=list"), "tencent")
    check_list(coffee, 600, 400, faces=1)
    # A directive that only picks the shape leaves the faces to the detector.
    listed = shaped(client, encode(portrait, "jpeg", sim="shape=list"), "tencent")
    assert_faces_found(boxes_of(listed), truth("astronaut.jpg"))


def test_sandbox_gateway_answers_v1_with_the_real_boxes(gateway_factory: Any) -> None:
    """What `make run` does: no upstream key, the embedded simulator finds the faces."""
    gw = gateway_factory(sim=None)
    answer = gw.analyze(photo("astronaut.jpg"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["source"]["provider"] == "simulator"
    boxes = [(f["box"]["x"], f["box"]["y"], f["box"]["width"], f["box"]["height"]) for f in body["faces"]]
    assert_faces_found(boxes, truth("astronaut.jpg"))
    empty = gw.analyze(photo("coffee.jpg"))
    assert empty.status_code == 200, empty.text
    assert empty.json()["faces"] == []
    assert "found by YuNet" in gw.logs()


def test_without_the_extra_it_falls_back_to_hash_boxes_and_says_so_once() -> None:
    port = free_port()
    # A Python where OpenCV cannot be imported, as in an install without the sandbox extra.
    blocked = "import sys; sys.modules['cv2'] = None; from app.sim import main; main()"
    argv = [sys.executable, "-c", blocked, "--port", str(port), "--key", KEY]
    with start_process(argv, {}, port) as server, httpx.Client(base_url=server.url, timeout=20) as http:
        assert http.get("/healthz").json()["faces"] == "hash"
        for _ in range(2):
            body = shaped(http, photo("astronaut.jpg"), "tencent")
            check_tencent(body, 512, 512, faces=1)
        coffee = shaped(http, photo("coffee.jpg"), "tencent")  # the hash sees a face everywhere
        check_tencent(coffee, 600, 400, faces=1)
        log = server.output()
    assert log.count("no face detector") == 1, log
    assert "pip install 'facegate[sandbox]'" in log
