"""The published v1 JSON Schema: committed copy current, no breaking change, checker sound."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.schema import v1
from app.schema.compat import breaking_changes
from app.schema.labels import LIST, TENCENT

ROOT = Path(__file__).parents[3]
COMMITTED = ROOT / "app" / "schema" / "v1.schema.json"
PUBLISHED = ROOT / "tests" / "schema" / "v1-published.schema.json"
REGENERATE = ".venv/bin/python -m app.schema.v1 > app/schema/v1.schema.json"


def test_committed_schema_is_current() -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == v1.json_schema(), f"app/schema/v1.schema.json is stale; regenerate: {REGENERATE}"


def test_regeneration_command_prints_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "app.schema.v1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == v1.json_schema()
    assert result.stderr == ""


def test_no_breaking_change_since_first_publication() -> None:
    published = json.loads(PUBLISHED.read_text())
    problems = breaking_changes(published, v1.json_schema())
    assert problems == [], "schema v1 changed incompatibly (make it additive, or publish /v2):\n" + "\n".join(problems)


def test_image_limits_are_the_upstream_contracts() -> None:
    from app.upstream import contract

    assert (v1.MIN_SIDE_EXCLUSIVE, v1.MAX_SIDE_EXCLUSIVE) == (contract.MIN_SIDE_EXCLUSIVE, contract.MAX_SIDE_EXCLUSIVE)


def test_the_example_is_a_valid_analysis() -> None:
    [example] = v1.json_schema()["examples"]
    assert v1.AnalysisV1.model_validate(example).model_dump(mode="json") == example


def _properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, model in schema["$defs"].items():
        for prop, sub in model["properties"].items():
            yield f"{name}.{prop}", sub
    yield from ((f"AnalysisV1.{p}", sub) for p, sub in schema["properties"].items())


def test_every_model_and_field_is_described() -> None:
    schema = v1.json_schema()
    undocumented = [path for path, sub in _properties(schema) if not sub.get("description")]
    undocumented += [name for name, model in schema["$defs"].items() if not model.get("description")]
    assert undocumented == []


def test_every_face_field_is_always_present() -> None:
    face = v1.json_schema()["$defs"]["Face"]
    assert set(face["required"]) == set(face["properties"])


def test_docs_cover_every_field_and_label() -> None:
    docs = (ROOT / "docs" / "schema.md").read_text()
    fields = {path.split(".")[1] for path, _ in _properties(v1.json_schema())}
    labels = {label for table in (*TENCENT.values(), *LIST.values()) for label in table.values()}
    missing = sorted(name for name in fields | labels if f"`{name}`" not in docs)
    assert missing == [], "docs/schema.md does not mention these"


# --- breaking_changes on synthetic schemas --------------------------------------------

BASE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "item": {"$ref": "#/$defs/Item", "description": "one"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
        "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "name": {"type": "string"},
        "when": {"type": "string", "format": "date-time"},
    },
    "required": ["item", "items", "count", "kind", "name", "when"],
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {"score": {"type": "number"}, "tag": {"type": "string"}},
            "required": ["score"],
        }
    },
}


def changed(mutate: Callable[[dict[str, Any]], None]) -> list[str]:
    new = copy.deepcopy(BASE)
    mutate(new)
    return breaking_changes(BASE, new)


def test_identical_schemas_are_compatible() -> None:
    assert breaking_changes(BASE, copy.deepcopy(BASE)) == []


def _add_things(s: dict[str, Any]) -> None:
    s["properties"]["extra"] = {"type": "string"}
    s["$defs"]["Item"]["properties"]["more"] = {"anyOf": [{"type": "number"}, {"type": "null"}]}
    s["$defs"]["Item"]["required"].append("tag")  # optional -> required is fine for readers
    s["$defs"]["New"] = {"type": "object", "properties": {}}
    s["properties"]["kind"]["enum"].append("c")
    s["properties"]["name"]["description"] = "reworded"
    s["examples"] = [{}]


def _rename_def(s: dict[str, Any]) -> None:
    s["$defs"]["Entry"] = s["$defs"].pop("Item")
    s["properties"]["item"]["$ref"] = "#/$defs/Entry"
    s["properties"]["items"]["items"]["$ref"] = "#/$defs/Entry"


def _inline_refs(s: dict[str, Any]) -> None:
    item = s["$defs"].pop("Item")
    s["properties"]["item"] = {"allOf": [copy.deepcopy(item)], "description": "one"}
    s["properties"]["items"]["items"] = item


def _type_list_nullable(s: dict[str, Any]) -> None:
    s["properties"]["count"] = {"type": ["integer", "null"]}


@pytest.mark.parametrize("mutate", [_add_things, _rename_def, _inline_refs, _type_list_nullable])
def test_additive_and_cosmetic_changes_pass(mutate: Callable[[dict[str, Any]], None]) -> None:
    assert changed(mutate) == []


def test_removed_property_is_found_through_refs() -> None:
    problems = changed(lambda s: s["$defs"]["Item"]["properties"].pop("tag"))
    assert problems == ["$.item.tag: removed", "$.items[].tag: removed"]


def test_renamed_property_gets_a_hint() -> None:
    def rename(s: dict[str, Any]) -> None:
        s["properties"]["label"] = s["properties"].pop("name")
        s["required"] = [r.replace("name", "label") for r in s["required"]]

    assert changed(rename) == ["$.name: removed (renamed to 'label'?)"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda s: s["properties"].update(name={"type": "integer"}),
            "$.name: type changed from ['string'] to ['integer']",
        ),
        (
            lambda s: s["$defs"]["Item"]["properties"]["score"].update(type="integer"),
            "$.item.score: type changed",
        ),
        (
            lambda s: s["properties"].update(name={"anyOf": [{"type": "string"}, {"type": "integer"}]}),
            "$.name: type changed",
        ),
        (
            lambda s: s["properties"].update(count={"anyOf": [{"type": "null"}]}),
            "$.count: type narrowed from ['integer'] to []",
        ),
        (lambda s: s["properties"]["when"].pop("format"), "$.when: format changed"),
    ],
)
def test_type_changes_are_breaking(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    problems = changed(mutate)
    assert any(p.startswith(expected) for p in problems), problems


def test_nullability_change_is_breaking_both_ways() -> None:
    assert changed(lambda s: s["properties"].update(count={"type": "integer"})) == ["$.count: became non-nullable"]
    assert changed(lambda s: s["properties"].update(name={"anyOf": [{"type": "string"}, {"type": "null"}]})) == [
        "$.name: became nullable"
    ]
    assert changed(lambda s: s["properties"].update(item={"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]})) == [
        "$.item: became nullable"
    ]


def test_required_becoming_optional_is_breaking() -> None:
    assert changed(lambda s: s["required"].remove("count")) == ["$.count: required property became optional"]


def test_enum_value_removed_or_enum_added_is_breaking() -> None:
    assert changed(lambda s: s["properties"]["kind"].update(enum=["a"])) == ["$.kind: enum values removed: ['b']"]
    assert changed(lambda s: s["properties"]["name"].update(enum=["x"])) == ["$.name: narrowed to enum ['x']"]
    assert changed(lambda s: s["properties"].update(kind={"const": "a"})) == ["$.kind: enum values removed: ['b']"]


def test_array_item_changes_are_found() -> None:
    problems = changed(lambda s: s["properties"]["items"].update(items={"type": "string"}))
    assert problems == ["$.items[]: type changed from ['object'] to ['string']"]


def test_recursive_schemas_terminate_and_are_compared() -> None:
    tree: dict[str, Any] = {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                    "v": {"type": "integer"},
                },
                "required": ["children", "v"],
            }
        },
    }
    assert breaking_changes(tree, copy.deepcopy(tree)) == []
    new = copy.deepcopy(tree)
    new["$defs"]["Node"]["properties"]["v"] = {"type": "string"}
    assert breaking_changes(tree, new) == ["$.v: type changed from ['integer'] to ['string']"]


def test_the_real_schema_detects_a_real_break() -> None:
    new = v1.json_schema()
    del new["$defs"]["Attribute"]["properties"]["confidence"]
    new["$defs"]["Face"]["properties"]["age"] = {"type": "integer"}
    problems = breaking_changes(v1.json_schema(), new)
    assert "$.faces[].gender.confidence: removed" in problems
    assert "$.faces[].eyes.glasses.confidence: removed" in problems
    assert "$.faces[].age: became non-nullable" in problems
