"""Image intake: receive an upload safely, keep its exact bytes, hash them, judge them.

The body is consumed as a stream so that the size cap holds however the client lies
(a missing or false Content-Length does not help; a 2 GB body is cut off at the cap).
Large uploads spool to disk (``spool``), and so does everything once the process holds
MEMORY_BUDGET_BYTES of uploads in memory, so that many concurrent uploads do not pin
memory. Nothing here decodes pixels: the format is sniffed and checked by ``sniff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import Problem
from app.intake.sniff import ImageError, ImageFacts, inspect
from app.intake.spool import MEMORY_BUDGET_BYTES, BufferBudget, SpooledBody
from app.upstream import contract

#: Room for multipart boundaries, part headers and small extra fields around the image.
MULTIPART_OVERHEAD: Final = 64 * 1024
#: More parts than this is not a client uploading one image.
MAX_PARTS: Final = 16
#: Bytes of non-image fields kept track of (they are ignored, but not without bound).
MAX_OTHER_FIELDS_BYTES: Final = 16 * 1024
#: Bytes of one part's headers (names and values together). Real parts carry two short
#: headers; without a bound, a 20 MB "header" would be accumulated in memory.
MAX_PART_HEADER_BYTES: Final = 8 * 1024
RAW_TYPES: Final = ("image/", "application/octet-stream")
_MIME: Final = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp"}


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_bytes: int
    max_pixels: int
    spool_threshold: int
    spool_dir: Path
    body_timeout_s: float
    #: Shared by every upload received under these limits (one per app, so one per process).
    memory: BufferBudget = field(default_factory=lambda: BufferBudget(MEMORY_BUDGET_BYTES))


@dataclass(slots=True)
class Upload:
    """A received image: its exact bytes and their SHA-256; judged (``inspect``) when needed."""

    body: SpooledBody
    sha256: str
    max_pixels: int
    #: Set by :meth:`inspect`; None until the bytes were judged.
    facts: ImageFacts | None = None
    #: Set when a detached upstream call took ownership: it closes the upload, not the route.
    handed_off: bool = False

    @property
    def size(self) -> int:
        return self.body.size

    async def inspect(self) -> ImageFacts:
        """Judge the bytes: format, structure and dimensions, without decoding pixels.

        Only bytes that go to the upstream need it. A cache hit does not: the cache is keyed
        by the SHA-256 of these exact bytes, and only bytes that passed were ever sent (and
        so cached) — skipping the walk over the file is a tenth of a hit's cost.
        """
        if self.facts is None:
            try:
                # A spooled body is mapped, read and unmapped within the worker thread: a mapping
                # held while waiting for the event loop would count its pages in RSS meanwhile.
                self.facts = await asyncio.to_thread(self._inspect) if self.body.spooled else self._inspect()
            except ImageError as exc:
                raise Problem(exc.code, exc.detail) from None
        return self.facts

    def _inspect(self) -> ImageFacts:
        with self.body.view() as view:
            return inspect(view, max_pixels=self.max_pixels)

    @property
    def _format(self) -> str:
        if self.facts is None:
            raise RuntimeError("inspect() the upload before sending it")
        return self.facts.format

    @property
    def filename(self) -> str:
        """A name chosen by facegate: the client's filename is never forwarded."""
        return f"image.{'jpg' if self._format == 'jpeg' else self._format}"

    @property
    def mime(self) -> str:
        return _MIME[self._format]

    def close(self) -> None:
        self.body.close()


class _ImageSink:
    """Collects the image bytes and their hash, enforcing the byte cap as they arrive."""

    def __init__(self, limits: IntakeLimits) -> None:
        self.limits = limits
        self.body = SpooledBody(limits.spool_threshold, limits.spool_dir, limits.memory)
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes | memoryview) -> None:
        if self.body.size + len(chunk) > self.limits.max_bytes:
            raise Problem("image_too_large", f"the image exceeds {self.limits.max_bytes} bytes")
        self.body.write(chunk)
        self.digest.update(chunk)

    def finish(self, expected_sha256: str | None) -> Upload:
        if self.body.size == 0:
            raise Problem("image_missing", "the image is empty (0 bytes)")
        sha256 = self.digest.hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise Problem("digest_mismatch", f"the image's SHA-256 is {sha256}, not the one its digest header names")
        return Upload(self.body, sha256, self.limits.max_pixels)


class _MultipartImage:
    """Streams a multipart body, keeping exactly one ``image`` file part."""

    def __init__(self, boundary: bytes, sink: _ImageSink) -> None:
        self.sink = sink
        self.parts = 0
        self.images = 0
        self.other_bytes = 0
        self.done = False
        self._in_image = False
        self._header_name = b""
        self._header_value = b""
        self._header_bytes = 0
        self._disposition = b""
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_header_field": self._header_field,
            "on_header_value": self._header_val,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Problem("invalid_request", f"too many multipart parts (at most {MAX_PARTS})")
        self._in_image = False
        self._disposition = b""
        self._header_bytes = 0

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise Problem("invalid_request", f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") == contract.IMAGE_FIELD.encode():
            self.images += 1
            if self.images > 1:
                raise Problem("invalid_request", f"send exactly one '{contract.IMAGE_FIELD}' field")
            self._in_image = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_image:
            self.sink.write(memoryview(data)[start:end])
            return
        self.other_bytes += end - start
        if self.other_bytes > MAX_OTHER_FIELDS_BYTES:
            raise Problem("invalid_request", "the form fields besides the image are too large")

    def _end(self) -> None:
        self.done = True

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError:
            raise Problem("invalid_request", "the multipart body is malformed") from None

    def finish(self) -> None:
        if not self.done:
            raise Problem("invalid_request", "the multipart body ended before its closing boundary")
        if self.images == 0:
            raise Problem("image_missing", f"no '{contract.IMAGE_FIELD}' field in the form")


def _boundary(content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise Problem("invalid_request", "multipart/form-data without a usable boundary")
    return boundary


async def receive(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    content_length: str | None,
    limits: IntakeLimits,
    expected_sha256: str | None = None,
) -> Upload:
    """Read one upload from a body stream. Every refusal is a :class:`Problem` and costs nothing.

    The bytes are capped, hashed and kept here; they are judged as an image by
    :meth:`Upload.inspect` (the use case does it before anything is sent upstream).
    ``expected_sha256`` is the digest the client declared (``app.intake.digest``): the
    image is hashed as it streams in and a different one is refused (``digest_mismatch``).
    The caller owns the returned :class:`Upload` and must ``close()`` it (it may hold a
    temporary file).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not multipart and not media.startswith(RAW_TYPES):
        raise Problem(
            "unsupported_media_type",
            f"send multipart/form-data with an '{contract.IMAGE_FIELD}' field, or the image bytes "
            "with Content-Type image/*",
        )
    cap = limits.max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = _declared_length(content_length)
    if declared is not None and declared > cap:
        raise Problem("image_too_large", f"the body is {declared} bytes, the limit is {limits.max_bytes}")

    sink = _ImageSink(limits)
    form = _MultipartImage(_boundary(content_type or ""), sink) if multipart else None
    received = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in chunks:
                received += len(chunk)
                if received > cap:
                    raise Problem("image_too_large", f"the body exceeds the limit of {limits.max_bytes} bytes")
                if form is not None:
                    form.feed(chunk)
                else:
                    sink.write(chunk)
        if form is not None:
            form.finish()
        return sink.finish(expected_sha256)
    except TimeoutError:
        sink.body.close()
        raise Problem("request_timeout", f"the upload took longer than {limits.body_timeout_s:g} s") from None
    except BaseException:
        sink.body.close()
        raise


def _declared_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise Problem("invalid_request", "Content-Length is not a number") from None


class UploadGate:
    """Caps uploads being received at once in this process, and each tenant's share of them.

    Past the process cap a new upload gets 503 ``overloaded`` at once; past its own share
    (``per_tenant``) a tenant gets 429 ``too_many_uploads`` at once, so a tenant whose
    uploads trickle in (a slow link, a buggy or hostile client) can only exhaust its own
    share and never locks the others out; the body timeout ends each of them in the end.
    Refusing early beats queueing: a queued upload still holds a socket and its bytes
    keep arriving, which is exactly the load the cap is there to shed.
    """

    def __init__(
        self, limit: int, per_tenant: int | None = None, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.limit = limit
        self.per_tenant = max(1, min(limit, per_tenant if per_tenant is not None else (limit + 1) // 2))
        self.active = 0
        self.by_tenant: dict[str, int] = {}
        self._on_change = on_change

    def try_acquire(self, tenant: str) -> bool:
        """Take a slot for ``tenant`` if both the process and the tenant's share have room."""
        held = self.by_tenant.get(tenant, 0)
        if self.active >= self.limit or held >= self.per_tenant:
            return False
        self.by_tenant[tenant] = held + 1
        self._moved(+1)
        return True

    def release(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0) - 1
        if held > 0:
            self.by_tenant[tenant] = held
        else:
            self.by_tenant.pop(tenant, None)
        self._moved(-1)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """A slot for the duration of one upload, or the refusal: 429 when the tenant's own share is
        full (and smaller than the whole), else 503 when the process is."""
        if not self.try_acquire(tenant):
            if self.per_tenant < self.limit and self.by_tenant.get(tenant, 0) >= self.per_tenant:
                raise Problem(
                    "too_many_uploads",
                    f"this tenant already has {self.per_tenant} uploads in progress here; finish those first",
                    retry_after=1,
                )
            raise Problem("overloaded", f"more than {self.limit} uploads in progress; try again shortly", retry_after=1)
        try:
            yield
        finally:
            self.release(tenant)

    def _moved(self, delta: int) -> None:
        self.active += delta
        if self._on_change is not None:
            self._on_change(self.active)
