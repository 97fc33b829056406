"""Does a new response schema break clients written against an old one?

schema v1 promises additive change only; this is the check that keeps the
promise (``tests/unit/schema/test_v1.py`` runs it against the schema as first
published). It judges the schema as a *response* contract, which is stricter
than the usual "is every old document still valid" test:

* a removed (or renamed) property breaks clients that read it;
* a required property that became optional breaks clients that rely on the key;
* any type change breaks typed clients: narrowing changes generated types,
  widening sends values they cannot hold;
* nullability changing either way breaks them too (``T`` vs ``T | None``);
* an enum losing values breaks clients that switch on them, while an enum
  gaining values is additive (ailabapi may add labels and clients must cope).

Adding properties, ``$defs``, enum values, descriptions or examples passes.
Only the JSON Schema subset pydantic emits is understood: local ``$ref``,
``anyOf``/``oneOf`` unions, single-element ``allOf``, ``type`` (string or list),
``enum``/``const``, ``format``, ``properties``/``required``, ``items``/``prefixItems``.
Keywords beside an ``anyOf`` are ignored, and a union of several object (or array)
schemas is compared alternative by alternative in order; pydantic's ``T | None``
never needs more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Schema = Mapping[str, Any]

_NULL = "null"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def breaking_changes(old: Schema, new: Schema) -> list[str]:
    """One human-readable line per breaking change from ``old`` to ``new`` (empty: compatible)."""
    diff = _Diff(old, new)
    diff.compare(old, new, "$")
    return diff.problems


@dataclass
class _Variant:
    """One non-null alternative of a (possibly union) schema, refs resolved."""

    schema: Schema
    ref: str | None

    @property
    def types(self) -> frozenset[str]:
        declared = self.schema.get("type")
        if isinstance(declared, str):
            return frozenset({declared})
        if isinstance(declared, list):
            return frozenset(t for t in declared if t != _NULL)
        values = _enum(self.schema)
        if values is not None:
            return frozenset(_json_type(v) for v in values if v is not None)
        if "properties" in self.schema:
            return frozenset({"object"})
        if "items" in self.schema or "prefixItems" in self.schema:
            return frozenset({"array"})
        return frozenset({"any"})


@dataclass
class _Node:
    nullable: bool = False
    variants: list[_Variant] = field(default_factory=list)

    @property
    def types(self) -> frozenset[str]:
        return frozenset().union(*(v.types for v in self.variants))

    @property
    def enum(self) -> frozenset[Any] | None:
        """Allowed non-null values, or None when any value of the types is allowed."""
        values: set[Any] = set()
        for variant in self.variants:
            own = _enum(variant.schema)
            if own is None:
                return None
            values.update(_hashable(v) for v in own if v is not None)
        return frozenset(values)

    def only(self, json_type: str) -> list[_Variant]:
        return [v for v in self.variants if json_type in v.types]


class _Diff:
    def __init__(self, old_root: Schema, new_root: Schema) -> None:
        self.roots = (old_root, new_root)
        self.problems: list[str] = []
        self.active: set[tuple[str | None, str | None]] = set()  # ref pairs being compared

    def compare(self, old: Any, new: Any, path: str) -> None:
        a, b = self.node(old, 0), self.node(new, 1)
        if a.nullable != b.nullable:
            turned = "non-nullable" if a.nullable else "nullable"
            self.problems.append(f"{path}: became {turned}")
        self.compare_types(a, b, path)
        for json_type in ("object", "array"):
            pairs = list(zip(a.only(json_type), b.only(json_type), strict=False))
            for old_variant, new_variant in pairs:
                self.compare_variant(json_type, old_variant, new_variant, path)

    def compare_types(self, a: _Node, b: _Node, path: str) -> None:
        old_types, new_types = a.types, b.types
        if old_types != new_types:
            how = "narrowed" if new_types < old_types else "changed"
            self.problems.append(f"{path}: type {how} from {_show(old_types)} to {_show(new_types)}")
            return
        old_enum, new_enum = a.enum, b.enum
        if new_enum is not None and old_enum is None:
            self.problems.append(f"{path}: narrowed to enum {_show(new_enum)}")
        elif old_enum is not None and new_enum is not None and old_enum - new_enum:
            self.problems.append(f"{path}: enum values removed: {_show(old_enum - new_enum)}")
        old_formats = {v.schema.get("format") for v in a.variants}
        new_formats = {v.schema.get("format") for v in b.variants}
        if old_formats != new_formats:
            self.problems.append(f"{path}: format changed from {_show(old_formats)} to {_show(new_formats)}")

    def compare_variant(self, json_type: str, old: _Variant, new: _Variant, path: str) -> None:
        key = (old.ref, new.ref)
        if key in self.active and key != (None, None):
            return  # a recursive schema: this pair is already being compared further up
        self.active.add(key)
        try:
            if json_type == "object":
                self.compare_objects(old.schema, new.schema, path)
            else:
                self.compare_arrays(old.schema, new.schema, path)
        finally:
            self.active.discard(key)

    def compare_objects(self, old: Schema, new: Schema, path: str) -> None:
        old_props: Mapping[str, Any] = old.get("properties", {})
        new_props: Mapping[str, Any] = new.get("properties", {})
        added = [name for name in new_props if name not in old_props]
        new_required = set(new.get("required", ()))
        for name, old_prop in old_props.items():
            where = f"{path}.{name}"
            if name not in new_props:
                self.problems.append(f"{where}: removed{self.rename_hint(old_prop, new_props, added)}")
                continue
            if name in old.get("required", ()) and name not in new_required:
                self.problems.append(f"{where}: required property became optional")
            self.compare(old_prop, new_props[name], where)

    def compare_arrays(self, old: Schema, new: Schema, path: str) -> None:
        if "items" in old and "items" in new:
            self.compare(old["items"], new["items"], f"{path}[]")
        old_prefix, new_prefix = old.get("prefixItems", []), new.get("prefixItems", [])
        if len(old_prefix) != len(new_prefix):
            self.problems.append(f"{path}: tuple length changed from {len(old_prefix)} to {len(new_prefix)}")
        for index, (a, b) in enumerate(zip(old_prefix, new_prefix, strict=False)):
            self.compare(a, b, f"{path}[{index}]")

    def rename_hint(self, old_prop: Any, new_props: Mapping[str, Any], added: list[str]) -> str:
        """A removed property whose schema reappears under exactly one new name was likely renamed."""
        shape = _fingerprint(old_prop)
        matches = [name for name in added if _fingerprint(new_props[name]) == shape]
        return f" (renamed to {matches[0]!r}?)" if len(matches) == 1 else ""

    def node(self, schema: Any, side: int) -> _Node:
        """Flatten refs and unions into nullability plus a list of non-null variants."""
        resolved, ref = self.resolve(schema, side)
        union = resolved.get("anyOf") or resolved.get("oneOf")
        if not isinstance(union, list):
            return self.single(resolved, ref)
        out = _Node()
        for alternative in union:
            part = self.node(alternative, side)
            out.nullable |= part.nullable
            out.variants.extend(part.variants)
        return out

    def single(self, schema: Schema, ref: str | None) -> _Node:
        declared = schema.get("type")
        values = _enum(schema)
        nullable = (
            declared == _NULL
            or (isinstance(declared, list) and _NULL in declared)
            or (values is not None and None in values)
        )
        only_null = declared == _NULL or (values is not None and all(v is None for v in values))
        return _Node(nullable, [] if only_null else [_Variant(schema, ref)])

    def resolve(self, schema: Any, side: int) -> tuple[Schema, str | None]:
        """Follow local ``$ref`` chains; sibling keywords (descriptions) are merged over the target."""
        if isinstance(schema, bool):
            return ({} if schema else {"enum": []}), None
        ref: str | None = None
        seen: set[str] = set()
        while True:
            if not isinstance(schema, Mapping):
                raise TypeError(f"not a JSON Schema: {schema!r}")
            all_of = schema.get("allOf")
            if isinstance(all_of, list) and len(all_of) == 1:
                schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **all_of[0]}
                continue
            target = schema.get("$ref")
            if not isinstance(target, str):
                return schema, ref
            if target in seen:
                raise ValueError(f"$ref cycle without structure at {target}")
            seen.add(target)
            ref = target
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**_pointer(self.roots[side], target), **siblings}


def _pointer(root: Schema, ref: str) -> Schema:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported, got {ref}")
    node: Any = root
    for raw in ref[1:].split("/")[1:]:
        node = node[raw.replace("~1", "/").replace("~0", "~")]
    if not isinstance(node, Mapping):
        raise TypeError(f"{ref} does not point at a schema")
    return node


def _enum(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return list(values) if isinstance(values, list) else None


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "any")


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _fingerprint(schema: Any) -> str:
    """The schema without the words around it, to recognise a property under a new name."""

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items() if k not in ("title", "description", "examples")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.dumps(strip(schema), sort_keys=True)


def _show(values: frozenset[Any] | set[Any]) -> str:
    return "[" + ", ".join(sorted(repr(v) for v in values)) + "]"
