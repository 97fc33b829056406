"""The normalizer against ailabapi's published examples, the known traps, and fuzzing.

Every produced analysis is checked with ``_valid``: pydantic must accept it *and*
dump it back unchanged, which proves the plain dicts have exactly v1's keys and
types (the normalizer never runs pydantic itself).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.schema import v1
from app.schema.normalize import (
    FACE_KEYS,
    GROUP_KEYS,
    UpstreamFormatError,
    build_analysis,
    detect_shape,
    normalize_faces,
)
from app.upstream.contract import Shape, envelope

FIXTURES = Path(__file__).parents[2] / "fixtures" / "upstream"
IMAGE = {"sha256": "ab" * 32, "width": 640, "height": 480, "format": "jpeg", "bytes": 4096}


def _fixture(name: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return raw


TENCENT_EXAMPLE = _fixture("face-analyzer-advanced.seed-style.example.json")
LIST_EXAMPLE = _fixture("face-analyzer-advanced.list-style.example.json")
NO_FACE_EXAMPLE = _fixture("error.no-face.example.json")


def analyze(raw: Any, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "request_id": "req-1",
        "image": IMAGE,
        "provider": "ailabapi",
        "upstream_request_id": "up-1",
        "cached": False,
        "analyzed_at": "2026-01-15T09:30:00Z",
    }
    return _valid(build_analysis(raw, **(args | kwargs)))


def _valid(out: dict[str, Any]) -> dict[str, Any]:
    model = v1.AnalysisV1.model_validate(out)
    assert model.model_dump(mode="json") == out
    orjson.dumps(out)  # JSON-ready: no NaN, no big ints, no stray types
    return out


def faces(raw: Any, **kwargs: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = analyze(raw, **kwargs)["faces"]
    return found


def attr(label: str, code: int, confidence: float | None = None) -> dict[str, Any]:
    return {"label": label, "code": code, "confidence": confidence}


# --- builders for synthetic upstream answers ------------------------------------------


def tencent(*infos: Any) -> dict[str, Any]:
    return envelope(request_id="r") | {
        "image_width": 640,
        "image_height": 480,
        "face_detail_infos": list(infos),
    }


def tencent_face(rect: tuple[Any, Any, Any, Any] = (1, 2, 3, 4), **attrs: Any) -> dict[str, Any]:
    x, y, w, h = rect
    return {"face_rect": {"x": x, "y": y, "width": w, "height": h}, "face_detail_attributes_info": attrs}


def item(code: Any, probability: Any = 0.9) -> dict[str, Any]:
    return {"type": code, "probability": probability}


def list_answer(**data: Any) -> dict[str, Any]:
    return envelope(request_id="r") | {"image_width": 0, "image_height": 0, "data": data}


def three_faces(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "face_count": 3,
        "face_rectangles": [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33],
        "face_probability_list": [0.91, 0.92, 0.93],
        "age_list": [21, 22, 23],
        "beauty_list": [61, 62, 63],
        "gender_list": [0, 1, 0],
        "expressions": [0, 1, 0],
        "glasses": [0, 1, 2],
        "hat_list": [0, 1, 0],
        "masks": [0, 1, 2],
        "pose_list": [1.0, 2.0, 3.0, 11.0, 12.0, 13.0, 21.0, 22.0, 23.0],
        "pupils": [float(v) for v in range(18)],
        "landmark_count": 105,
        "landmarks": [float(v) for v in range(3 * 210)],
        "qualities": {f"{k}_list": [90.0 + i for i in range(3)] for k in ("score", "blur", "illu")},
    }
    return list_answer(**(data | extra))


# --- the published examples -----------------------------------------------------------


def test_tencent_example_normalizes() -> None:
    out = analyze(TENCENT_EXAMPLE)
    assert out["source"]["upstream_shape"] == "tencent"
    [face] = out["faces"]
    assert face["box"] == {"x": 0, "y": 0, "width": 0, "height": 0}
    assert face["gender"] == attr("male", 0, 0.0)
    assert face["eyes"] == {
        "glasses": attr("none", 0, 0.99936753511429),
        "open": attr("open", 0, 0.99949336051941),
        "eyelid": attr("double", 1, 0.75467920303345),
        "size": attr("large", 2, 0.59152442216873),
    }
    assert face["nose"] == attr("normal", 2, 0.75233882665634)
    assert face["face_shape"]["label"] == "square"
    assert face["hair"]["bangs"] == attr("none", 0, 0.0)
    assert face["mouth"] == {"open": attr("closed", 0, 0.0)}
    assert face["head_pose"] == {"pitch": 0.0, "yaw": 0.0, "roll": 0.0}
    assert (face["age"], face["beauty"], face["smile"]) == (0, 0, 0)
    for list_only in ("detection_confidence", "expression", "quality", "landmarks", "pupils"):
        assert face[list_only] is None


def test_list_example_normalizes() -> None:
    out = analyze(LIST_EXAMPLE)
    assert out["source"]["upstream_shape"] == "list"
    [face] = out["faces"]
    assert face["box"] == {"x": 189, "y": 152, "width": 307, "height": 412}
    assert face["detection_confidence"] == 0.98
    assert (face["age"], face["beauty"], face["smile"]) == (39, 52, None)
    assert face["gender"] == attr("male", 1)
    assert face["expression"] == attr("smile", 1)
    assert face["eyes"] == {"glasses": attr("none", 0), "open": None, "eyelid": None, "size": None}
    assert face["hat"] == {"style": attr("none", 0), "color": None}
    assert face["mask"] == attr("none", 0)
    assert face["head_pose"] == {"pitch": -2.23, "yaw": 0.84, "roll": -3.3}
    assert face["quality"] == {
        "score": 96.41,
        "blur": 99.82,
        "fnf": 100.0,
        "glasses": 100.0,
        "illumination": 99.96,
        "mask": 86.71,
        "noise": 98.3,
        "pose": 95.15,
    }
    for tencent_only in ("emotion", "eyebrows", "hair", "mouth", "moustache", "nose", "face_shape", "skin"):
        assert face[tencent_only] is None
    assert face["landmarks"] is None
    assert face["pupils"] is None


def test_list_example_with_landmarks_has_pupils_but_empty_landmarks_are_null() -> None:
    [face] = faces(LIST_EXAMPLE, landmarks=True)
    assert face["pupils"] == {
        "left": {"x": 271.97, "y": 323.93, "radius": 11.85},
        "right": {"x": 411.95, "y": 313.45, "radius": 11.85},
    }
    assert face["landmarks"] is None  # the example's landmarks are []


def test_no_face_is_an_empty_analysis() -> None:
    assert normalize_faces(NO_FACE_EXAMPLE) == (None, [])
    out = analyze(NO_FACE_EXAMPLE)
    assert out["faces"] == []
    assert out["source"]["upstream_shape"] is None


def test_the_examples_are_not_modified() -> None:
    before = copy.deepcopy(LIST_EXAMPLE)
    analyze(LIST_EXAMPLE, landmarks=True)
    assert before == LIST_EXAMPLE


# --- traps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "code", "label"),
    [("tencent", 0, "male"), ("tencent", 1, "female"), ("list", 0, "female"), ("list", 1, "male")],
)
def test_gender_codes_are_opposite_between_shapes(shape: str, code: int, label: str) -> None:
    if shape == "tencent":
        raw = tencent(tencent_face(gender=item(code, 0.8)))
        expected = attr(label, code, 0.8)
    else:
        raw = list_answer(face_count=1, face_rectangles=[0, 0, 9, 9], gender_list=[code])
        expected = attr(label, code)
    assert faces(raw)[0]["gender"] == expected


def test_eye_open_1_means_closed() -> None:
    [face] = faces(tencent(tencent_face(eye={"eye_open": item(1, 0.7)})))
    assert face["eyes"] == {"glasses": None, "open": attr("closed", 1, 0.7), "eyelid": None, "size": None}


def test_mask_codes_differ_between_shapes() -> None:
    [t] = faces(tencent(tencent_face(mask=item(1))))
    [li] = faces(list_answer(face_count=1, face_rectangles=[0, 0, 9, 9], masks=[1]))
    assert (t["mask"]["label"], li["mask"]["label"]) == ("worn_not_covering", "worn_properly")


def test_list_pose_is_yaw_pitch_roll() -> None:
    [face] = faces(list_answer(face_count=1, face_rectangles=[0, 0, 9, 9], pose_list=[1, 2, 3]))
    assert face["head_pose"] == {"pitch": 2.0, "yaw": 1.0, "roll": 3.0}


def test_unknown_codes_keep_the_code() -> None:
    [t] = faces(tencent(tencent_face(emotion=item(42, 0.5), hat={"style": item(-1)})))
    assert t["emotion"] == attr("unknown", 42, 0.5)
    assert t["hat"]["style"] == attr("unknown", -1, 0.9)
    [li] = faces(list_answer(face_count=1, face_rectangles=[0, 0, 9, 9], masks=[7], hat_list=[5]))
    assert li["mask"] == attr("unknown", 7)
    assert li["hat"]["style"] == attr("unknown", 5)


# --- missing and malformed values -----------------------------------------------------


def test_a_face_with_only_a_box_has_every_key_and_null_attributes() -> None:
    [face] = faces(tencent({"face_rect": {"x": -5, "y": 2, "width": 3, "height": 4}}))
    assert tuple(face) == FACE_KEYS
    assert face["box"] == {"x": -5, "y": 2, "width": 3, "height": 4}
    assert all(face[key] is None for key in FACE_KEYS if key != "box")


@pytest.mark.parametrize("bad", [None, True, False, "1", [1], {"type": 1}, 1.5, float("nan"), 2**64], ids=repr)
def test_a_malformed_code_nulls_that_attribute_only(bad: Any) -> None:
    [face] = faces(tencent(tencent_face(emotion=item(bad), skin=item(3, 0.6))))
    assert face["emotion"] is None
    assert face["skin"] == attr("white", 3, 0.6)


@pytest.mark.parametrize("bad", [None, True, "0.9", [0.9], float("inf"), float("nan")], ids=repr)
def test_a_malformed_probability_keeps_the_attribute_without_confidence(bad: Any) -> None:
    [face] = faces(tencent(tencent_face(nose=item(0, bad))))
    assert face["nose"] == attr("upturned", 0, None)


def test_malformed_items_and_groups() -> None:
    [face] = faces(
        tencent(
            tencent_face(
                gender="male",
                emotion={"probability": 0.9},
                eye={"glass": 7, "eye_open": [1]},
                hair="long",
                hat={"style": item(2), "color": None},
                head_pose={"pitch": 1, "yaw": "2", "roll": 3},
                age=True,
                beauty="80",
                smile=None,
            )
        )
    )
    assert face["gender"] is None
    assert face["emotion"] is None
    assert face["eyes"] is None  # a group nobody filled is null, not a dict of nulls
    assert face["hair"] is None
    assert face["hat"] == {"style": attr("helmet", 2, 0.9), "color": None}
    assert face["head_pose"] is None  # one bad angle: no pose
    assert (face["age"], face["beauty"], face["smile"]) == (None, None, None)


def test_integral_floats_are_accepted_and_other_floats_rounded_or_refused() -> None:
    [face] = faces(tencent(tencent_face((1.0, 2.4, 3.6, 4), age=30.6, emotion=item(1.0), nose=item(1.5))))
    assert face["box"] == {"x": 1, "y": 2, "width": 4, "height": 4}
    assert face["age"] == 31
    assert face["emotion"] == attr("happy", 1, 0.9)
    assert face["nose"] is None


def test_out_of_range_values_are_kept() -> None:
    raw = tencent(tencent_face(age=130, beauty=-3, gender=item(0, 1.7), head_pose={"pitch": 95, "yaw": 0, "roll": 0}))
    [face] = faces(raw)
    assert (face["age"], face["beauty"]) == (130, -3)
    assert face["gender"]["confidence"] == 1.7
    assert face["head_pose"]["pitch"] == 95.0


def test_attributes_info_missing_or_not_an_object() -> None:
    for info in (
        {"face_rect": {"x": 0, "y": 0, "width": 1, "height": 1}},
        tencent_face() | {"face_detail_attributes_info": []},
    ):
        [face] = faces(tencent(info))
        assert face["gender"] is None


# --- list shape slicing ---------------------------------------------------------------


def test_multi_face_list_slicing() -> None:
    out = faces(three_faces())
    assert [f["box"]["x"] for f in out] == [10, 20, 30]
    assert [f["box"]["height"] for f in out] == [13, 23, 33]
    assert [f["detection_confidence"] for f in out] == [0.91, 0.92, 0.93]
    assert [f["age"] for f in out] == [21, 22, 23]
    assert [f["gender"]["label"] for f in out] == ["female", "male", "female"]
    assert [f["eyes"]["glasses"]["label"] for f in out] == ["none", "glasses", "sunglasses"]
    assert [f["hat"]["style"]["label"] for f in out] == ["none", "present", "none"]
    assert [f["mask"]["label"] for f in out] == ["none", "worn_properly", "worn_incorrectly"]
    assert [f["head_pose"]["roll"] for f in out] == [3.0, 13.0, 23.0]
    assert [f["quality"]["illumination"] for f in out] == [90.0, 91.0, 92.0]
    assert out[1]["quality"]["noise"] is None  # not in this answer's qualities
    assert all(f["landmarks"] is None and f["pupils"] is None for f in out)


def test_landmarks_and_pupils_on_request() -> None:
    out = faces(three_faces(), landmarks=True)
    for i, face in enumerate(out):
        points = face["landmarks"]
        assert len(points) == 105
        assert points[0] == {"x": float(210 * i), "y": float(210 * i + 1)}
        assert points[-1] == {"x": float(210 * i + 208), "y": float(210 * i + 209)}
        assert face["pupils"]["right"] == {"x": 6.0 * i + 3, "y": 6.0 * i + 4, "radius": 6.0 * i + 5}


def test_incomplete_landmarks_for_one_face_null_only_that_face() -> None:
    out = faces(three_faces(landmarks=[0.0] * 420 + [1.0] * 100, pupils=[1.0] * 12), landmarks=True)
    assert [f["landmarks"] is None for f in out] == [False, False, True]
    assert [f["pupils"] is None for f in out] == [False, False, True]


def test_landmark_count_sets_the_points_per_face() -> None:
    [face] = faces(
        list_answer(face_count=1, face_rectangles=[0, 0, 9, 9], landmark_count=2, landmarks=[1, 2, 3, 4]),
        landmarks=True,
    )
    assert face["landmarks"] == [{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}]


@pytest.mark.parametrize(
    ("count", "rects", "expected"),
    [
        (3, 12, 3),  # consistent
        (1, 12, 1),  # face_count wins when every counted face has a rectangle
        (3, 8, 2),  # more faces claimed than rectangles: the rectangles win
        (None, 8, 2),  # no count: the rectangles
        ("2", 11, 2),  # malformed count, and a trailing incomplete rectangle
        (-1, 4, 1),
        (0, 0, 0),
        (None, 0, 0),
    ],
)
def test_face_count_versus_rectangles(count: Any, rects: int, expected: int) -> None:
    data: dict[str, Any] = {"face_rectangles": list(range(rects)), "age_list": [30]}
    if count is not None:
        data["face_count"] = count
    out = faces(list_answer(**data))
    assert [f["age"] for f in out] == [30, None, None][:expected]


def test_a_bad_rectangle_ends_the_faces() -> None:
    out = faces(three_faces(face_rectangles=[10, 11, 12, 13, 20, None, 22, 23, 30, 31, 32, 33]))
    assert len(out) == 1


def test_attribute_lists_shorter_than_faces_give_nulls() -> None:
    out = faces(three_faces(gender_list=[1], pose_list=[1, 2, 3, 4], qualities={"score_list": [50]}))
    assert [f["gender"] for f in out] == [attr("male", 1), None, None]
    assert [f["head_pose"] is None for f in out] == [False, True, True]
    assert [f["quality"] for f in out][1:] == [None, None]
    assert out[0]["quality"]["score"] == 50.0


def test_list_attributes_of_the_wrong_type_give_nulls() -> None:
    out = faces(three_faces(gender_list="male", qualities=[1, 2], pose_list={"yaw": 1}, age_list=[True, "3", 4.0]))
    assert all(f["gender"] is None and f["quality"] is None and f["head_pose"] is None for f in out)
    assert [f["age"] for f in out] == [None, None, 4]


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "face_detail_infos",
        3,
        {},
        envelope(request_id="r"),  # success envelope, nothing else
        envelope(request_id="r") | {"data": {}},
        envelope(request_id="r") | {"data": [1]},
        tencent() | {"face_detail_infos": {"0": {}}},
        tencent({"face_detail_attributes_info": {}}),  # a face without a box
        tencent(tencent_face() | {"face_rect": {"x": 1, "y": 2, "width": "3", "height": 4}}),
        tencent(tencent_face(), 7),
        list_answer(face_count=2, face_rectangles=[]),
        list_answer(face_count=1, face_rectangles="0,0,9,9"),
        envelope(request_id="r", status=422, code="ERROR_BLURRY_FACE") | {"face_detail_infos": []},
        {"error_code": 17, "face_detail_infos": []},
    ],
    ids=lambda raw: json.dumps(raw)[:60],
)
def test_unusable_answers_raise_upstream_format_error(raw: Any) -> None:
    with pytest.raises(UpstreamFormatError):
        build_analysis(
            raw,
            request_id="r",
            image=IMAGE,
            provider="ailabapi",
            upstream_request_id=None,
            cached=False,
            analyzed_at="2026-01-15T09:30:00Z",
        )


def test_upstream_format_error_is_a_value_error() -> None:
    assert issubclass(UpstreamFormatError, ValueError)


def test_empty_face_lists_are_answers() -> None:
    assert normalize_faces(tencent()) == (Shape.TENCENT, [])
    assert normalize_faces(list_answer(face_count=0)) == (Shape.LIST, [])


def test_detect_shape() -> None:
    assert detect_shape(TENCENT_EXAMPLE) is Shape.TENCENT
    assert detect_shape(LIST_EXAMPLE) is Shape.LIST
    assert detect_shape({"data": {"face_count": 0}}) is Shape.LIST
    assert detect_shape({"face_detail_infos": [], "data": {"face_count": 0}}) is Shape.TENCENT
    unknown: list[dict[str, Any]] = [{}, {"data": {"age_list": []}}, {"faces": []}]
    for raw in unknown:
        with pytest.raises(UpstreamFormatError):
            detect_shape(raw)


# --- build_analysis envelope ----------------------------------------------------------


def test_build_analysis_source_and_image() -> None:
    out = analyze(
        LIST_EXAMPLE,
        image=IMAGE | {"path": "/tmp/secret"},  # must not leak into the answer
        provider="simulator",
        upstream_request_id="",
        cached=True,
        request_id="abc",
    )
    assert out["image"] == IMAGE
    assert out["request_id"] == "abc"
    assert out["schema_version"] == v1.SCHEMA_VERSION
    assert out["source"] == {
        "provider": "simulator",
        "upstream_request_id": None,
        "upstream_shape": "list",
        "cached": True,
        "analyzed_at": "2026-01-15T09:30:00Z",
    }


def test_key_sets_match_the_models() -> None:
    assert tuple(v1.Face.model_fields) == FACE_KEYS
    models: dict[str, type[BaseModel]] = {
        "eyes": v1.Eyes,
        "eyebrows": v1.Eyebrows,
        "hair": v1.Hair,
        "hat": v1.Hat,
        "mouth": v1.Mouth,
    }
    assert {group: tuple(model.model_fields) for group, model in models.items()} == dict(GROUP_KEYS)


# --- property tests -------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)

TENCENT_KEYS = ["gender", "emotion", "eye", "eyebrow", "hair", "hat", "mask", "mouth", "moustache", "nose",
                "shape", "skin", "age", "beauty", "smile", "head_pose"]  # fmt: skip
LIST_KEYS = ["face_count", "face_rectangles", "face_probability_list", "age_list", "gender_list",
             "expressions", "glasses", "hat_list", "masks", "beauty_list", "pose_list", "pupils",
             "landmarks", "landmark_count", "qualities"]  # fmt: skip


def _near_miss() -> st.SearchStrategy[Any]:
    """Arbitrary JSON under the keys the normalizer reads, to reach past the first checks."""
    corners = ("x", "y", "width", "height")
    face_rect = (
        st.fixed_dictionaries(dict.fromkeys(corners, st.integers(-10, 5000)))
        | st.fixed_dictionaries(dict.fromkeys(corners, json_scalars))
        | json_values
    )
    attrs = st.dictionaries(st.sampled_from(TENCENT_KEYS), json_values | st.builds(item, json_scalars, json_scalars))
    face = st.fixed_dictionaries({"face_rect": face_rect, "face_detail_attributes_info": attrs})
    tencent_raw = st.builds(lambda fs: tencent(*fs), st.lists(face | json_values, max_size=3))
    column = st.lists(st.integers(-1, 5000) | json_scalars, max_size=14) | json_values
    list_raw = st.builds(
        lambda rects, d: list_answer(face_rectangles=rects, **d),
        st.lists(st.integers(0, 5000), max_size=14) | column,
        st.dictionaries(st.sampled_from(LIST_KEYS[:1] + LIST_KEYS[2:]), column | st.integers(-2, 5)),
    )
    error_raw = st.builds(lambda code: envelope(request_id="r", status=422, code=code), st.text(max_size=20))
    return tencent_raw | list_raw | error_raw


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=json_values | _near_miss(), with_landmarks=st.booleans())
def test_any_json_gives_a_valid_analysis_or_upstream_format_error(raw: Any, with_landmarks: bool) -> None:
    try:
        out = build_analysis(
            raw,
            request_id="r",
            image=IMAGE,
            provider="ailabapi",
            upstream_request_id=None,
            cached=False,
            analyzed_at="2026-01-15T09:30:00Z",
            landmarks=with_landmarks,
        )
    except UpstreamFormatError:
        return
    _valid(out)


probabilities = st.floats(0, 1)
codes = st.integers(0, 8)
angles = st.floats(-180, 180)


def _tencent_attrs() -> st.SearchStrategy[dict[str, Any]]:
    coded = st.builds(item, codes, probabilities)
    nested = {
        "eye": ("glass", "eye_open", "eyelid_type", "eye_size"),
        "eyebrow": ("eyebrow_density", "eyebrow_curve", "eyebrow_length"),
        "hair": ("length", "bang", "color"),
        "hat": ("style", "color"),
        "mouth": ("mouth_open",),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        key: coded for key in ("gender", "emotion", "mask", "moustache", "nose", "shape", "skin")
    }
    optional |= {
        group: st.fixed_dictionaries({}, optional=dict.fromkeys(keys, coded)) for group, keys in nested.items()
    }
    optional |= {key: st.integers(0, 100) for key in ("age", "beauty", "smile")}
    optional["head_pose"] = st.fixed_dictionaries(dict.fromkeys(("pitch", "yaw", "roll"), angles))
    return st.fixed_dictionaries({}, optional=optional)


@st.composite
def tencent_answers(draw: st.DrawFn) -> dict[str, Any]:
    rects = st.tuples(st.integers(-50, 4000), st.integers(-50, 4000), st.integers(0, 4000), st.integers(0, 4000))
    n = draw(st.integers(0, 5))
    return tencent(*(tencent_face(draw(rects), **draw(_tencent_attrs())) for _ in range(n)))


@st.composite
def list_answers(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 5))

    def column(values: st.SearchStrategy[Any], per_face: int = 1) -> list[Any]:
        size = draw(st.sampled_from([n * per_face, max(0, n - 1) * per_face, (n + 1) * per_face]))
        return draw(st.lists(values, min_size=size, max_size=size))

    data: dict[str, Any] = {
        "face_count": n,
        "face_rectangles": [v for _ in range(n) for v in draw(st.lists(st.integers(0, 4000), min_size=4, max_size=4))],
        "face_probability_list": column(probabilities),
        "age_list": column(st.integers(0, 100)),
        "beauty_list": column(st.integers(0, 100)),
        "gender_list": column(st.integers(0, 2)),
        "expressions": column(st.integers(0, 2)),
        "glasses": column(st.integers(0, 3)),
        "hat_list": column(st.integers(0, 2)),
        "masks": column(st.integers(0, 3)),
        "pose_list": column(st.floats(-90, 90), 3),
        "pupils": column(st.floats(0, 4000), 6),
        "landmark_count": 105,
        "landmarks": draw(st.just([]) | st.just([1.5] * (210 * n))),
        "qualities": {f"{k}_list": column(st.floats(0, 100)) for k in ("score", "blur", "fnf", "illu", "glass")},
    }
    return list_answer(**data)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(raw=tencent_answers() | list_answers(), with_landmarks=st.booleans())
def test_valid_answers_of_both_shapes_validate(raw: dict[str, Any], with_landmarks: bool) -> None:
    out = analyze(raw, landmarks=with_landmarks)
    is_tencent = "face_detail_infos" in raw
    expected = len(raw["face_detail_infos"]) if is_tencent else raw["data"]["face_count"]
    assert len(out["faces"]) == expected
    assert out["source"]["upstream_shape"] == ("tencent" if is_tencent else "list")
    for face in out["faces"]:
        assert tuple(face) == FACE_KEYS
        if is_tencent or not with_landmarks:
            assert face["landmarks"] is None
            assert face["pupils"] is None
        for value in (face["detection_confidence"], face["age"]):
            assert value is None or math.isfinite(value)
