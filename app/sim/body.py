"""Reading the request: the multipart body streamed for its first ``image`` file part, and
waits that end as soon as the caller hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.types import Receive

from app.sim.config import MULTIPART_SLACK
from app.sim.replies import ClientGone, Refusal
from app.upstream import contract

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks


class ImagePart:
    """Collects the first ``image`` file part while the body streams past; skips the rest."""

    def __init__(self, boundary: bytes) -> None:
        self.data: bytes | None = None
        self.sha256 = ""
        self._chunks: list[bytes] = []
        self._size = 0
        self._hash = hashlib.sha256()
        self._active = False
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._begin,
            "on_header_field": self._on_field,
            "on_header_value": self._on_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._on_data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self._headers = {}
        self._active = False

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        is_file = b"filename" in params or b"filename*" in params
        name = params.get(b"name", b"").decode("latin-1")
        self._active = self.data is None and is_file and name == contract.IMAGE_FIELD

    def _on_data(self, data: bytes, start: int, end: int) -> None:
        if not self._active:
            return
        self._size += end - start
        if self._size > contract.MAX_BYTES:
            raise Refusal("FILE_SIZE_EXCEEDS_LIMIT")
        chunk = data[start:end]
        self._chunks.append(chunk)
        self._hash.update(chunk)

    def _end(self) -> None:
        if self._active:
            self.data = b"".join(self._chunks)
            self.sha256 = self._hash.hexdigest()
            self._chunks = []
            self._active = False


async def read_image(headers: Headers, receive: Receive) -> ImagePart:
    """Stream the multipart body; refuse an oversized one without reading the rest."""
    limit = contract.MAX_BYTES + MULTIPART_SLACK
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refusal("ERROR_REQUEST_BODY_TOO_LARGE")
    ctype, params = parse_options_header(headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise Refusal("MISSING_PARAMETERS", "image is required (multipart/form-data)")
    try:
        part = ImagePart(boundary)
    except FormParserError:
        raise Refusal("MISSING_PARAMETERS", "bad multipart boundary") from None
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        received += len(chunk)
        if received > limit:
            raise Refusal("ERROR_REQUEST_BODY_TOO_LARGE")
        try:
            part.parser.write(chunk)
        except FormParserError:
            raise Refusal("MISSING_PARAMETERS", "malformed multipart body") from None
    if part.data is None:
        raise Refusal("MISSING_PARAMETERS", "image is required")
    if not part.data:
        raise Refusal("PARAMETERS_CANNOT_EMPTY", "image is empty")
    return part


async def pause(seconds: float, receive: Receive, wake: asyncio.Event) -> None:
    """Sleep, but stop as soon as the caller hangs up: a hung call must not outlive it.

    ``wake`` ends the sleep early (the call then answers normally), so stopping an
    embedded simulator does not have to wait out, or cancel, hung calls.
    """
    if seconds <= 0 or wake.is_set():
        return
    gone = asyncio.ensure_future(receive())
    woken = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({gone, woken}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (gone, woken):
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
    if gone.done() and not gone.cancelled():
        raise ClientGone  # after the body, the only thing receive() returns is a disconnect
