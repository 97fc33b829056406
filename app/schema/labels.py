"""ailabapi's label tables (``enums.json``), loaded once and frozen.

The tables ship as package data rather than Python literals so that the file
copied from the research notes stays byte-identical to its source and a
correction is a data change, not a code change. Codes are turned into ``int``
keys here once, because the normalizer looks them up on every cache hit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.resources import files
from types import MappingProxyType
from typing import Any, Final

#: Label of a code the table does not know; the code itself is kept next to it.
UNKNOWN: Final = "unknown"

Table = Mapping[int, str]


def _load() -> dict[str, Any]:
    text = files("app.schema").joinpath("enums.json").read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise TypeError("enums.json: top level must be an object")
    return data


def _tables(section: Mapping[str, Any]) -> Mapping[str, Table]:
    """Keys starting with ``_`` are commentary (notes, ranges), not label tables."""
    out: dict[str, Table] = {}
    for name, table in section.items():
        if name.startswith("_"):
            continue
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise TypeError(f"enums.json: {name} must map codes to labels")
        out[name] = MappingProxyType({int(code): label for code, label in table.items()})
    return MappingProxyType(out)


_RAW: Final = _load()
#: Tables for answers with ``face_detail_infos`` (keyed like ``eye.glass``).
TENCENT: Final = _tables(_RAW["tencent_style"])
#: Tables for answers with ``data.face_rectangles`` (keyed like ``gender_list``).
LIST: Final = _tables(_RAW["list_style"])


def labels(table: Table) -> str:
    """``0=male, 1=female``: codes shown too, since they differ between the shapes."""
    return ", ".join(f"{code}={table[code]}" for code in sorted(table))
