"""A cached upstream answer: how it is stored, read back, and rendered without repeating work.

An entry keeps ailabapi's answer byte for byte (the drop-in route replays it) next to a
line of metadata. Reading one back is the cache-hit path, so everything derived from the
bytes — the parsed JSON, the normalized faces — is computed at most once per entry
object, and :class:`EntryMemo` keeps decoded entries for the bytes objects the
in-process cache hands out again and again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Final, Literal

import orjson

from app.policy import strip_raw
from app.schema.normalize import Face, normalize_faces
from app.upstream import contract
from app.upstream.contract import Shape, UpstreamCode

#: Bump when the stored layout changes; older entries then read as misses.
ENTRY_VERSION: Final = 1


@dataclass(frozen=True)
class Entry:
    """An upstream answer as cached: its exact bytes plus what is needed to render it later."""

    status: int
    body: bytes
    provider: Literal["ailabapi", "simulator"]
    analyzed_at: str
    image: dict[str, Any]
    _faces: dict[bool, tuple[Shape | None, list[Face]]] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def raw(self) -> dict[str, Any]:
        value = orjson.loads(self.body)
        return value if isinstance(value, dict) else {}

    @property
    def verdict(self) -> UpstreamCode | None:
        """None for a successful analysis, else the upstream's verdict on the image."""
        code = contract.error_code_of(self.raw)
        return contract.lookup(code, self.status) if code else None

    @property
    def upstream_request_id(self) -> str | None:
        rid = self.raw.get("request_id")
        return rid if isinstance(rid, str) and rid else None

    def faces(self, *, landmarks: bool) -> tuple[Shape | None, list[Face]]:
        """The normalized faces (raises UpstreamFormatError for an unknown shape), computed once.

        The lists are shared by every answer rendered from this entry: treat them as read-only.
        """
        found = self._faces.get(landmarks)
        if found is None:
            found = self._faces[landmarks] = normalize_faces(self.raw, landmarks=landmarks)
        return found

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the upstream analysed it (``analyzed_at``); unreadable dates are very old."""
        try:
            when = datetime.fromisoformat(self.analyzed_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return float("inf")
        return (time.time() if now is None else now) - when

    def without(self, omit: frozenset[str]) -> Entry:
        """This entry with the upstream fields behind the v1 fields ``omit`` removed (what is stored)."""
        if not omit:
            return self
        stripped = strip_raw(self.raw, omit)
        return Entry.fresh(
            stripped,
            orjson.dumps(stripped),
            status=self.status,
            provider=self.provider,
            analyzed_at=self.analyzed_at,
            image=self.image,
        )

    def encode(self) -> bytes:
        """One JSON line of metadata, a newline, then the upstream's bytes untouched."""
        meta = {
            "v": ENTRY_VERSION,
            "status": self.status,
            "provider": self.provider,
            "analyzed_at": self.analyzed_at,
            "image": self.image,
        }
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """None for anything this version did not write (treated as a miss, never a crash)."""
        head, sep, body = data.partition(b"\n")
        try:
            meta = orjson.loads(head)
            if not sep or not isinstance(meta, dict) or meta.get("v") != ENTRY_VERSION:
                return None
            entry = cls(int(meta["status"]), body, meta["provider"], str(meta["analyzed_at"]), dict(meta["image"]))
            _ = entry.raw
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return entry

    @classmethod
    def fresh(cls, answer_body: dict[str, Any], content: bytes, **meta: Any) -> Entry:
        """An entry for an answer just received: its parsed JSON is reused, not parsed again."""
        entry = cls(body=content, **meta)
        entry.__dict__["raw"] = answer_body  # what cached_property would compute from ``content``
        return entry


class EntryMemo:
    """Decoded entries for the exact bytes objects the in-process cache returns.

    The memory cache hands out the same ``bytes`` object for a key until it is replaced,
    so an identity check tells whether a decoded entry still matches — no hashing, no
    staleness. Bounded by count; entries are small next to the bytes they decode.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, Entry]] = OrderedDict()

    def forget(self, key: str) -> None:
        self._items.pop(key, None)

    def decode(self, key: str, data: bytes) -> Entry | None:
        item = self._items.get(key)
        if item is not None and item[0] is data:
            self._items.move_to_end(key)
            return item[1]
        entry = Entry.decode(data)
        if entry is not None:
            self._items[key] = (data, entry)
            self._items.move_to_end(key)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return entry
