"""A contract-faithful stand-in for ailabapi's face-analyzer-advanced endpoint.

Every real call costs a credit and nobody can make ailabapi fail on demand, so the
gateway's tests, benchmarks and sandbox mode talk to this instead, over real sockets.
It reads the same table of upstream facts as the gateway (``app.upstream.contract``),
so a corrected fact changes both sides at once, and it decodes images for real, so its
size/format verdicts are the ones ailabapi would give.

Attributes derive from sha256(image bytes): a repeated image gets the same analysis
(only ``request_id``/``log_id`` change), which is what makes cache and single-flight
tests meaningful. Both answer shapes are rendered from one per-face "truth", so the
same image describes the same people in either shape (gender codes opposite included).

Directives, faults, limits and the control endpoints are documented in
``docs/simulator.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import io
import json
import logging
import math
import random
import re
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import orjson
import uvicorn
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.upstream import contract

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("facegate.sim")

DEFAULT_PORT: Final = 8089
#: Added to every answer so the gateway can label sandbox answers as simulated.
SIM_HEADER: Final = "X-Facegate-Simulator"
#: Per-request shape override for callers that talk to the simulator directly.
SHAPE_HEADER: Final = "X-Sim-Shape"
DIRECTIVE_MARK: Final = b"facegate-sim:"
#: ailabapi's own wording in its no-face example.
NO_FACE_MESSAGE: Final = "pic not has face"
#: The sibling /face-analyzer endpoint's documented max_face_num.
MAX_FACES: Final = 120
#: List-style constants from ailabapi's docs (105 landmarks, 1024-d dense feature).
LANDMARK_COUNT: Final = 105
DENSE_FEATURE_LENGTH: Final = 1024
#: Room for multipart headers and boundaries around an image of MAX_BYTES.
MULTIPART_SLACK: Final = 1024 * 1024

_PIL_FORMATS: Final = ("JPEG", "PNG", "BMP")
_FORMAT_NAMES: Final = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp"}
#: Magic numbers of the accepted formats: a file that starts like one but will not open
#: is broken (422), not of the wrong type (415).
_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
_GRAY_MODES: Final = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_DIRECTIVE_RE: Final = re.compile(rb"([a-z_]+)=([A-Za-z0-9_.-]*);?")
_INCOMPLETE_LOG: Final = "ASGI callable returned without completing response."

_ENUMS: Final[dict[str, Any]] = json.loads(
    resources.files("app.schema").joinpath("enums.json").read_text(encoding="utf-8")
)
_TENCENT: Final[dict[str, Any]] = _ENUMS["tencent_style"]
_LIST: Final[dict[str, Any]] = _ENUMS["list_style"]

#: Set in the task that serves an embedded simulator; lets the log filter keep the sim's
#: chatter out of the host process's logs without touching the host's logging config.
_EMBEDDED: contextvars.ContextVar[bool] = contextvars.ContextVar("facegate_sim_embedded", default=False)
#: Set by a request that drops its connection on purpose.
_DROPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("facegate_sim_dropping", default=False)


# --------------------------------------------------------------------------- config


class SimConfig(BaseSettings):
    """Knobs of one simulator; env ``FACEGATE_SIM_*`` so ``make run`` and CI can set them."""

    model_config = SettingsConfigDict(env_prefix="FACEGATE_SIM_", extra="ignore")

    #: Accepted ``ailabapi-api-key`` values (env: JSON list or comma-separated).
    api_keys: Annotated[list[str], NoDecode] = ["sim-key"]
    shape: Literal["tencent", "list"] = "tencent"
    latency_ms: int = Field(0, ge=0)
    #: Emulate ailabapi's (unknown) per-key limits; 0 = unlimited. Over -> 429 EXCEEDING_LIMITS.
    max_concurrency: int = Field(0, ge=0)
    qps: float = Field(0.0, ge=0)
    #: Token-bucket capacity for ``qps``; 0 = max(1, qps).
    qps_burst: float = Field(0.0, ge=0)
    #: Whether limiter 429s carry Retry-After (ailabapi's behaviour is unknown).
    retry_after_on_throttle: bool = False
    #: Concurrent Pillow decodes; bounds memory when a benchmark sends big PNGs.
    decode_concurrency: int = Field(4, ge=1)
    #: Seed of the RNG behind faults with ``probability`` < 1.
    fault_seed: int = 0
    #: How long shutdown waits for hung calls before cancelling them.
    shutdown_grace_s: int = Field(1, ge=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [key.strip() for key in text.split(",") if key.strip()]
        return value


# --------------------------------------------------------------------------- faults

FaultMode = Literal["status", "bad_key", "no_credits", "malformed", "missing_field", "drop", "hang", "redirect"]


class Fault(BaseModel):
    """One entry of the fault queue (see docs/simulator.md)."""

    model_config = ConfigDict(extra="forbid")

    mode: FaultMode
    #: Calls this fault applies to; None = until cleared.
    count: int | None = Field(1, ge=1)
    #: Chance that a call gets the fault (only hits consume ``count``); for flaky-upstream benchmarks.
    probability: float = Field(1.0, gt=0, le=1)
    status: int | None = Field(None, ge=400, le=599)
    code: str | None = Field(None, pattern=r"^[A-Z0-9_]+$")
    message: str | None = None
    retry_after: int | None = Field(None, ge=0)
    seconds: float = Field(3600.0, ge=0)
    location: str | None = None
    body: str | None = None
    content_type: str = "application/json"

    @model_validator(mode="after")
    def _complete(self) -> Fault:
        if self.mode == "status":
            if self.status is None:
                row = contract.ERROR_CODES.get(self.code or "")
                if row is None:
                    raise ValueError("a status fault needs `status`, or a `code` from ailabapi's table")
                self.status = row.status
            elif self.code is None:
                self.code = _default_code(self.status)
        if self.mode == "redirect" and not self.location:
            raise ValueError("a redirect fault needs `location`")
        return self


def _default_code(status: int) -> str:
    if status == 429:
        return "EXCEEDING_LIMITS"  # the table lists ERROR_NOT_ENOUGH_CREDITS first
    for row in contract.ERROR_CODES.values():
        if row.status == status:
            return row.code
    raise ValueError(f"no ailabapi code has status {status}: give `code` too")


class FaultPlan(BaseModel):
    """Body of ``POST /_sim/faults``: replaces the queue (and the latency, when given)."""

    model_config = ConfigDict(extra="forbid")

    faults: list[Fault] = []
    latency_ms: int | None = Field(None, ge=0)


class Limits(BaseModel):
    """Body of ``POST /_sim/limits``: the fields given replace the current limits."""

    model_config = ConfigDict(extra="forbid")

    qps: float | None = Field(None, ge=0)
    qps_burst: float | None = Field(None, ge=0)
    max_concurrency: int | None = Field(None, ge=0)
    retry_after_on_throttle: bool | None = None


# --------------------------------------------------------------------------- answers


class _Refusal(Exception):
    """An ailabapi error answer; raised from any check so the checks read top to bottom."""

    def __init__(self, code: str, message: str | None = None, *, status: int | None = None) -> None:
        row = contract.ERROR_CODES.get(code)
        self.code = code
        self.status = status or (row.status if row else 500)
        self.message = message if message is not None else (row.message if row else code)
        self.headers: dict[str, str] = {}
        super().__init__(code)


class _ClientGone(Exception):
    """The caller hung up; there is nobody to answer."""


@dataclass
class _Reply:
    status: int
    body: bytes
    label: str  # key in stats.by_code
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False

    async def send(self, send: Send) -> None:
        headers = [(b"content-length", str(len(self.body)).encode())]
        if self.content_type:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if self.drop:
            # Returning with more_body pending makes uvicorn close the connection mid-body,
            # so the client sees a truncated message, as with a proxy that died.
            _DROPPING.set(True)
            half = self.body[: len(self.body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            return
        await send({"type": "http.response.body", "body": self.body})


def _envelope(status: int = 200, code: str = "", message: str = "") -> dict[str, Any]:
    """ailabapi's envelope with fresh ids, as every real answer carries."""
    return contract.envelope(
        request_id=uuid.uuid4().hex, log_id=uuid.uuid4().hex[:16], status=status, code=code, message=message
    )


def _json_reply(status: int, payload: Any, label: str) -> _Reply:
    return _Reply(status, orjson.dumps(payload), label)


def _error_reply(err: _Refusal) -> _Reply:
    body = _envelope(err.status, err.code, err.message)
    reply = _json_reply(err.status, body, err.code)
    reply.headers.update(err.headers)
    return reply


# --------------------------------------------------------------------------- state


@dataclass
class _Stats:
    calls: int = 0
    ok: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    per_image: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    disconnected: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "by_code": dict(self.by_code),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "per_image": dict(self.per_image),
            "throttled": self.throttled,
            "disconnected": self.disconnected,
        }


@dataclass
class _Armed:
    fault: Fault
    left: int | None  # calls still to fault; None = until cleared


class _Sim:
    """All mutable state of one simulator. Touched only from the event loop, so no locks."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.decode_slots = asyncio.Semaphore(config.decode_concurrency)
        #: Set when an embedded simulator stops: ends every hang and latency wait.
        self.wake = asyncio.Event()
        self.admitted = 0
        self.stats = _Stats()
        self.reset()

    def reset(self) -> None:
        # In-flight calls survive a reset; keep their count so it never goes negative.
        live = self.stats.in_flight
        self.stats = _Stats(in_flight=live, max_in_flight=live)
        self.faults: deque[_Armed] = deque()
        self.latency_ms = self.config.latency_ms
        self.limits = Limits(
            qps=self.config.qps,
            qps_burst=self.config.qps_burst,
            max_concurrency=self.config.max_concurrency,
            retry_after_on_throttle=self.config.retry_after_on_throttle,
        )
        self._refill_bucket()
        self._fault_rng = _rng(self.config.fault_seed)

    def _refill_bucket(self) -> None:
        self._tokens = self._burst()
        self._refilled = time.monotonic()

    def _burst(self) -> float:
        return self.limits.qps_burst or max(1.0, self.limits.qps or 0.0)

    def set_limits(self, update: Limits) -> None:
        self.limits = self.limits.model_copy(update=update.model_dump(exclude_none=True))
        self._refill_bucket()

    def set_plan(self, plan: FaultPlan) -> None:
        self.faults = deque(_Armed(fault, fault.count) for fault in plan.faults)
        self._fault_rng = _rng(self.config.fault_seed)
        if plan.latency_ms is not None:
            self.latency_ms = plan.latency_ms

    def plan_json(self) -> dict[str, Any]:
        faults = [
            {**armed.fault.model_dump(exclude_defaults=True), "mode": armed.fault.mode, "count": armed.left}
            for armed in self.faults
        ]
        return {"faults": faults, "latency_ms": self.latency_ms}

    def key_ok(self, key: str | None) -> bool:
        if not key:
            return False
        given = key.encode()
        # Compare with every key, constant-time, so timing says nothing about which exist.
        return any([hmac.compare_digest(given, k.encode()) for k in self.config.api_keys])

    def admit(self) -> None:
        """Per-key limits: concurrency, then a token bucket (a refused call spends no token)."""
        qps, cap = self.limits.qps or 0.0, self.limits.max_concurrency or 0
        wait = 0.0
        if cap and self.admitted >= cap:
            wait = 1.0
        elif qps > 0:
            now = time.monotonic()
            self._tokens = min(self._burst(), self._tokens + (now - self._refilled) * qps)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
            else:
                wait = (1 - self._tokens) / qps
        if wait:
            err = _Refusal("EXCEEDING_LIMITS")
            if self.limits.retry_after_on_throttle:
                err.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise err
        self.admitted += 1

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        armed = self.faults[0]
        if armed.fault.probability < 1 and self._fault_rng.random() >= armed.fault.probability:
            return None
        if armed.left is not None:
            armed.left -= 1
            if armed.left <= 0:
                self.faults.popleft()
        return armed.fault

    def record(self, reply: _Reply) -> None:
        self.stats.by_code[reply.label] += 1
        if reply.status == 200 and not reply.drop:
            self.stats.ok += 1
        if reply.status == 429:
            self.stats.throttled += 1


# --------------------------------------------------------------------------- request body


class _ImagePart:
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
            raise _Refusal("FILE_SIZE_EXCEEDS_LIMIT")
        chunk = data[start:end]
        self._chunks.append(chunk)
        self._hash.update(chunk)

    def _end(self) -> None:
        if self._active:
            self.data = b"".join(self._chunks)
            self.sha256 = self._hash.hexdigest()
            self._chunks = []
            self._active = False


async def _read_image(headers: Headers, receive: Receive) -> _ImagePart:
    """Stream the multipart body; refuse an oversized one without reading the rest."""
    limit = contract.MAX_BYTES + MULTIPART_SLACK
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refusal("ERROR_REQUEST_BODY_TOO_LARGE")
    ctype, params = parse_options_header(headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise _Refusal("MISSING_PARAMETERS", "image is required (multipart/form-data)")
    try:
        part = _ImagePart(boundary)
    except FormParserError:
        raise _Refusal("MISSING_PARAMETERS", "bad multipart boundary") from None
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        received += len(chunk)
        if received > limit:
            raise _Refusal("ERROR_REQUEST_BODY_TOO_LARGE")
        try:
            part.parser.write(chunk)
        except FormParserError:
            raise _Refusal("MISSING_PARAMETERS", "malformed multipart body") from None
    if part.data is None:
        raise _Refusal("MISSING_PARAMETERS", "image is required")
    if not part.data:
        raise _Refusal("PARAMETERS_CANNOT_EMPTY", "image is empty")
    return part


async def _pause(seconds: float, receive: Receive, wake: asyncio.Event) -> None:
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
        raise _ClientGone  # after the body, the only thing receive() returns is a disconnect


# --------------------------------------------------------------------------- image


@dataclass(frozen=True)
class _Directive:
    faces: int | None = None
    error: str | None = None
    shape: str | None = None
    latency_ms: int = 0


@dataclass(frozen=True)
class _Picture:
    format: str
    width: int
    height: int
    directive: _Directive


def _inspect(data: bytes) -> _Picture:
    """Judge the image as ailabapi would; runs in a worker thread (decoding is CPU work).

    Sides are checked from the header before ``load()``, so a decompression bomb is
    refused without allocating its pixels. Pillow's global MAX_IMAGE_PIXELS is left
    alone: in sandbox mode this runs inside the gateway, which owns that setting.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Refusal("FILE_RESOLUTION_EXCEEDS_LIMITS") from None
    except Exception:
        if data.startswith(_MAGIC):
            raise _Refusal("FILE_DECODING_FAILURE") from None
        raise _Refusal("UNSUPPORTED_FILE_TYPES") from None
    with img:
        fmt = _FORMAT_NAMES.get(img.format or "")
        if fmt is None:
            raise _Refusal("UNSUPPORTED_FILE_TYPES")
        width, height = img.size
        if max(width, height) >= contract.MAX_SIDE_EXCLUSIVE:
            raise _Refusal("FILE_RESOLUTION_EXCEEDS_LIMITS")
        if min(width, height) <= contract.MIN_SIDE_EXCLUSIVE:
            raise _Refusal("ERROR_LOW_RESOLUTION")
        if contract.REFUSE_GRAYSCALE and img.mode in _GRAY_MODES:
            raise _Refusal("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE")
        if fmt == "jpeg":
            # libjpeg still entropy-decodes everything (so truncation is caught) but
            # allocates 1/64 of the pixels.
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        try:
            img.load()
        except Exception:
            raise _Refusal("FILE_DECODING_FAILURE") from None
        if contract.REFUSE_GRAYSCALE and img.mode == "P" and _gray_palette(img):
            raise _Refusal("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE")
    return _Picture(fmt, width, height, _parse_directive(data))


def _gray_palette(img: Image.Image) -> bool:
    """A palette image is grayscale in effect when every colour it actually uses is gray."""
    palette = img.getpalette() or []
    used = [index for _, index in img.getcolors(256) or [] if isinstance(index, int)]
    return all(palette[3 * i] == palette[3 * i + 1] == palette[3 * i + 2] for i in used if 3 * i + 2 < len(palette))


def _parse_directive(data: bytes) -> _Directive:
    at = data.find(DIRECTIVE_MARK)
    if at < 0:
        return _Directive()
    pos = at + len(DIRECTIVE_MARK)
    values: dict[str, str] = {}
    while match := _DIRECTIVE_RE.match(data, pos):
        values.setdefault(match[1].decode(), match[2].decode())
        pos = match.end()
        if not match[0].endswith(b";"):
            break
    known = {"faces", "error", "shape", "latency_ms"}
    if not values or not values.keys() & known:
        raise _Refusal("ERROR_INVALID_PARAMETER", "simulator directive has no known key")
    try:
        faces = int(values["faces"]) if "faces" in values else None
        latency = int(values.get("latency_ms", "0"))
    except ValueError:
        raise _Refusal("ERROR_INVALID_PARAMETER", "simulator directive: faces/latency_ms must be integers") from None
    error, shape = values.get("error"), values.get("shape")
    if faces is not None and not 0 <= faces <= MAX_FACES:
        raise _Refusal("ERROR_INVALID_PARAMETER", f"simulator directive: faces must be 0..{MAX_FACES}")
    if not 0 <= latency <= 600_000:
        raise _Refusal("ERROR_INVALID_PARAMETER", "simulator directive: latency_ms must be 0..600000")
    if error is not None and error not in contract.ERROR_CODES:
        raise _Refusal("ERROR_INVALID_PARAMETER", f"simulator directive: unknown error {error!r}")
    if shape is not None and shape not in ("tencent", "list"):
        raise _Refusal("ERROR_INVALID_PARAMETER", "simulator directive: shape must be tencent or list")
    return _Directive(faces, error, shape, latency)


# --------------------------------------------------------------------------- faces


@dataclass(frozen=True)
class _Face:
    """What the simulator "sees" in one face, before either shape encodes it."""

    seed: str
    box: tuple[int, int, int, int]  # left, top, width, height
    gender: str
    age: int
    beauty: int
    smile: int
    emotion: str
    glasses: str
    hat: str
    mask: str
    yaw: float
    pitch: float
    roll: float
    confidence: float


def _rng(seed: object) -> random.Random:
    """Seeded, reproducible randomness: the point is determinism, not secrecy."""
    return random.Random(str(seed))  # noqa: S311


def _labels(table: dict[str, str]) -> list[str]:
    return [table[k] for k in sorted(table, key=int)]


def _code(table: dict[str, str], label: str) -> int:
    return next(int(code) for code, name in table.items() if name == label)


def _mostly_first(rng: random.Random, labels: list[str]) -> str:
    """Most people wear no hat and no mask; code 0 ("none") is the common case."""
    return rng.choices(labels, weights=[len(labels) * 2] + [1] * (len(labels) - 1))[0]


def _layout(digest: str, n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """One face per grid cell, so faces never overlap and stay >= MIN_FACE_SIDE when cells allow."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_w, cell_h = width // cols, height // rows
    rng = _rng(f"{digest}:layout:{n}")
    boxes = []
    for i in range(n):
        row, col = divmod(i, cols)
        side = min(cell_w, cell_h)
        w = max(min(contract.MIN_FACE_SIDE, side), int(side * rng.uniform(0.6, 0.9)))
        h = min(cell_h, int(w * rng.uniform(1.05, 1.25)))
        boxes.append((col * cell_w + rng.randint(0, cell_w - w), row * cell_h + rng.randint(0, cell_h - h), w, h))
    return boxes


def _faces(digest: str, n: int, width: int, height: int) -> list[_Face]:
    faces = []
    for i, box in enumerate(_layout(digest, n, width, height)):
        seed = f"{digest}:{i}"
        rng = _rng(seed)
        emotion = rng.choice(_labels(_TENCENT["emotion"]))
        faces.append(
            _Face(
                seed=seed,
                box=box,
                gender=rng.choice(["male", "female"]),
                age=rng.randint(1, 90),
                beauty=rng.randint(20, 95),
                smile=rng.randint(50, 100) if emotion == "happy" else rng.randint(0, 49),
                emotion=emotion,
                glasses=rng.choice(_labels(_TENCENT["eye.glass"])),
                hat=_mostly_first(rng, _labels(_TENCENT["hat.style"])),
                mask=_mostly_first(rng, _labels(_TENCENT["mask"])),
                yaw=round(rng.uniform(-30, 30), 2),
                pitch=round(rng.uniform(-30, 30), 2),
                roll=round(rng.uniform(-30, 30), 2),
                confidence=round(rng.uniform(0.9, 1.0), 4),
            )
        )
    return faces


def _tencent_face(face: _Face) -> dict[str, Any]:
    rng = _rng(f"{face.seed}:tencent")

    def item(table: str, label: str | None = None) -> dict[str, Any]:
        codes = _TENCENT[table]
        code = _code(codes, label) if label is not None else int(rng.choice(list(codes)))
        return {"type": code, "probability": round(rng.uniform(0.5, 1.0), 6)}

    hat_color = "none" if face.hat == "none" else rng.choice(_labels(_TENCENT["hat.color"])[1:])
    x, y, w, h = face.box
    return {
        "face_rect": {"x": x, "y": y, "width": w, "height": h},
        "face_detail_attributes_info": {
            "age": min(face.age, _TENCENT["_ranges"]["age"][1]),
            "beauty": face.beauty,
            "emotion": item("emotion", face.emotion),
            "eye": {
                "glass": item("eye.glass", face.glasses),
                "eye_open": item("eye.eye_open"),
                "eyelid_type": item("eye.eyelid_type"),
                "eye_size": item("eye.eye_size"),
            },
            "eyebrow": {
                "eyebrow_density": item("eyebrow.eyebrow_density"),
                "eyebrow_curve": item("eyebrow.eyebrow_curve"),
                "eyebrow_length": item("eyebrow.eyebrow_length"),
            },
            "gender": item("gender", face.gender),
            "hair": {"length": item("hair.length"), "bang": item("hair.bang"), "color": item("hair.color")},
            "hat": {"style": item("hat.style", face.hat), "color": item("hat.color", hat_color)},
            "head_pose": {"pitch": round(face.pitch), "yaw": round(face.yaw), "roll": round(face.roll)},
            "mask": item("mask", face.mask),
            "mouth": {"mouth_open": item("mouth.mouth_open")},
            "moustache": item("moustache", "none" if face.gender == "female" else None),
            "nose": item("nose"),
            "shape": item("shape"),
            "skin": item("skin"),
            "smile": face.smile,
        },
    }


_QUALITIES: Final = ("score", "blur", "fnf", "glass", "illu", "mask", "noise", "pose")


def _list_data(faces: list[_Face]) -> dict[str, Any]:
    keys = [
        *("face_rectangles", "face_probability_list", "age_list", "gender_list", "expressions"),
        *("glasses", "hat_list", "masks", "beauty_list", "pose_list", "pupils", "landmarks"),
    ]
    data: dict[str, Any] = {"face_count": len(faces), **{key: [] for key in keys}}
    qualities: dict[str, list[float]] = {f"{q}_list": [] for q in _QUALITIES}
    for face in faces:
        rng = _rng(f"{face.seed}:list")
        x, y, w, h = face.box
        mask = face.mask if face.mask in ("none", "worn_properly") else "worn_incorrectly"
        data["face_rectangles"] += [x, y, w, h]
        data["face_probability_list"].append(face.confidence)
        data["age_list"].append(face.age)
        data["gender_list"].append(_code(_LIST["gender_list"], face.gender))
        data["expressions"].append(_code(_LIST["expressions"], "smile" if face.smile >= 50 else "neutral"))
        data["glasses"].append(_code(_LIST["glasses"], face.glasses))
        data["hat_list"].append(_code(_LIST["hat_list"], "none" if face.hat == "none" else "present"))
        data["masks"].append(_code(_LIST["masks"], mask))
        data["beauty_list"].append(face.beauty)
        data["pose_list"] += [face.yaw, face.pitch, face.roll]
        for centre in (0.32, 0.68):
            radius = round(w * rng.uniform(0.03, 0.05), 2)
            data["pupils"] += [
                round(x + w * (centre + rng.uniform(-0.03, 0.03)), 2),
                round(y + h * rng.uniform(0.38, 0.45), 2),
                radius,
            ]
        for _ in range(LANDMARK_COUNT):
            data["landmarks"] += [round(rng.uniform(x, x + w), 2), round(rng.uniform(y, y + h), 2)]
        for values in qualities.values():
            values.append(round(rng.uniform(60, 100), 2))
    data.update(landmark_count=LANDMARK_COUNT, dense_feature_length=DENSE_FEATURE_LENGTH, qualities=qualities)
    return data


# --------------------------------------------------------------------------- the endpoint


class _Analyze:
    """``POST /api/portrait/analysis/face-analyzer-advanced`` as a raw ASGI app.

    Raw because the ``drop`` fault and disconnect-aware waits need send/receive.
    """

    def __init__(self, sim: _Sim) -> None:
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sim = self.sim
        sim.stats.calls += 1
        sim.stats.in_flight += 1
        sim.stats.max_in_flight = max(sim.stats.max_in_flight, sim.stats.in_flight)
        try:
            try:
                reply = await self._answer(Headers(scope=scope), receive)
            except _Refusal as err:
                reply = _error_reply(err)
            except _ClientGone:
                sim.stats.disconnected += 1
                return
            sim.record(reply)
            await reply.send(send)
        finally:
            sim.stats.in_flight -= 1

    async def _answer(self, headers: Headers, receive: Receive) -> _Reply:
        sim = self.sim
        if not sim.key_ok(headers.get(contract.KEY_HEADER)):
            raise _Refusal("ERROR_USER_NOT_EXISTS")
        sim.admit()
        try:
            image = await _read_image(headers, receive)
            assert image.data is not None
            sim.stats.per_image[image.sha256] += 1
            fault = sim.take_fault()
            await _pause(sim.latency_ms / 1000, receive, sim.wake)
            if fault is not None:
                reply = await self._fault(fault, receive)
                if reply is not None:
                    return reply
            return await self._analyze(image.data, image.sha256, headers, receive)
        finally:
            sim.admitted -= 1

    async def _fault(self, fault: Fault, receive: Receive) -> _Reply | None:
        if fault.mode == "status":
            assert fault.status is not None
            assert fault.code is not None
            err = _Refusal(fault.code, fault.message, status=fault.status)
            if fault.retry_after is not None:
                err.headers["Retry-After"] = str(fault.retry_after)
            raise err
        if fault.mode == "bad_key":
            raise _Refusal("ERROR_USER_NOT_EXISTS")
        if fault.mode == "no_credits":
            raise _Refusal("ERROR_NOT_ENOUGH_CREDITS")
        if fault.mode == "hang":
            await _pause(fault.seconds, receive, self.sim.wake)
            return None
        if fault.mode == "redirect":
            assert fault.location is not None
            return _Reply(307, b"", "SIM_REDIRECT", content_type=None, headers={"Location": fault.location})
        if fault.mode == "malformed":
            body = fault.body or f'{{"request_id": "{uuid.uuid4().hex}", "error_code": 0, "face_detail_infos": [{{"'
            return _Reply(fault.status or 200, body.encode(), "SIM_MALFORMED", content_type=fault.content_type)
        envelope = _envelope()
        if fault.mode == "missing_field":
            return _json_reply(200, envelope, "SIM_MISSING_FIELD")
        reply = _json_reply(200, {**envelope, "image_width": 0, "image_height": 0, "face_detail_infos": []}, "SIM_DROP")
        reply.drop = True
        return reply

    async def _analyze(self, data: bytes, digest: str, headers: Headers, receive: Receive) -> _Reply:
        async with self.sim.decode_slots:
            picture = await asyncio.to_thread(_inspect, data)
        directive = picture.directive
        await _pause(directive.latency_ms / 1000, receive, self.sim.wake)
        if directive.error:
            no_face = directive.error == "ERROR_NO_FACE_IN_FILE"
            raise _Refusal(directive.error, NO_FACE_MESSAGE if no_face else None)
        shape = directive.shape or headers.get(SHAPE_HEADER) or self.sim.config.shape
        if shape not in ("tencent", "list"):
            raise _Refusal("ERROR_INVALID_PARAMETER", f"{SHAPE_HEADER} must be tencent or list")
        count = directive.faces
        if count is None:
            count = 1 if min(picture.width, picture.height) >= contract.MIN_FACE_SIDE else 0
        if count == 0:
            raise _Refusal("ERROR_NO_FACE_IN_FILE", NO_FACE_MESSAGE)
        faces = _faces(digest, count, picture.width, picture.height)
        body: dict[str, Any] = {
            **_envelope(),
            "image_width": picture.width,
            "image_height": picture.height,
        }
        if shape == contract.Shape.LIST.value:
            body["data"] = _list_data(faces)
        else:
            body["face_detail_infos"] = [_tencent_face(face) for face in faces]
        return _json_reply(200, body, "OK")


# --------------------------------------------------------------------------- control endpoints


def _sim_of(request: Request) -> _Sim:
    sim: _Sim = request.app.state.sim
    return sim


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _parse(request: Request, model: type[FaultPlan] | type[Limits]) -> FaultPlan | Limits | Response:
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        return _json({"detail": exc.errors(include_url=False, include_context=False)}, 422)


async def _healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def _stats(request: Request) -> Response:
    return _json(_sim_of(request).stats.as_json())


async def _reset(request: Request) -> Response:
    sim = _sim_of(request)
    sim.reset()
    return _json(sim.stats.as_json())


async def _faults(request: Request) -> Response:
    sim = _sim_of(request)
    if request.method == "POST":
        plan = await _parse(request, FaultPlan)
        if isinstance(plan, Response):
            return plan
        assert isinstance(plan, FaultPlan)
        sim.set_plan(plan)
        log.info("fault plan: %s", sim.plan_json())
    elif request.method == "DELETE":
        sim.set_plan(FaultPlan(latency_ms=sim.config.latency_ms))
    return _json(sim.plan_json())


async def _limits(request: Request) -> Response:
    sim = _sim_of(request)
    if request.method == "POST":
        update = await _parse(request, Limits)
        if isinstance(update, Response):
            return update
        assert isinstance(update, Limits)
        sim.set_limits(update)
    return _json(sim.limits.model_dump())


async def _not_found(request: Request, exc: Exception) -> Response:
    # A wrong path on ailabapi plausibly answers this code (an assumption: not documented).
    body = _envelope(404, "ERROR_AI_NOT_EXISTS", "no such API")
    return _json(body, 404)


class _Tagged:
    """Adds ``X-Facegate-Simulator: 1`` to every answer so nothing simulated passes as real."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (SIM_HEADER.lower().encode(), b"1")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


class _SimLogFilter(logging.Filter):
    """Keeps deliberate simulator behaviour out of the host's logs.

    A filter rather than logging config because in sandbox mode the host (the gateway)
    owns uvicorn's loggers; it only drops records emitted on behalf of the simulator.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        embedded = _EMBEDDED.get()
        if record.name == "uvicorn.access":
            return not embedded
        if _DROPPING.get() and record.getMessage() == _INCOMPLETE_LOG:
            return False
        return not (embedded and record.levelno < logging.WARNING)


def _install_log_filter() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == _SimLogFilter.__name__ for f in logger.filters):
            logger.addFilter(_SimLogFilter())


def create_app(config: SimConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; its state lives in ``app.state.sim``."""
    sim = _Sim(config or SimConfig())
    _install_log_filter()
    app = Starlette(
        routes=[
            Route(contract.ANALYZE_PATH, _Analyze(sim), methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/_sim/stats", _stats, methods=["GET"]),
            Route("/_sim/reset", _reset, methods=["POST"]),
            Route("/_sim/faults", _faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sim/limits", _limits, methods=["GET", "POST"]),
        ],
        middleware=[Middleware(_Tagged)],
        exception_handlers={404: _not_found},
    )
    app.state.sim = sim
    return app


# --------------------------------------------------------------------------- serving


def _warn_if_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("simulator bound to %s: its control endpoints need no key; keep it on loopback", host)


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, config: SimConfig | None = None) -> None:
    """Run the simulator in this process until interrupted."""
    config = config or SimConfig()
    _warn_if_exposed(host)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        lifespan="off",
        timeout_graceful_shutdown=config.shutdown_grace_s,
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class BackgroundSim:
    """A simulator served by uvicorn inside the caller's event loop (the gateway's sandbox mode).

    It binds its own socket, so a busy port raises OSError here instead of uvicorn's
    ``sys.exit``, and it installs no signal handlers and no logging config: the host
    process owns those.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.app = create_app(self.config)
        self.host = host
        self.port = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return _sim_of_app(self.app).stats.as_json()

    async def start(self) -> BackgroundSim:
        if self._task is not None:
            return self
        _warn_if_exposed(self.host)
        _sim_of_app(self.app).wake.clear()
        self._sock = _bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the host's logging stays as it is
            log_level=None,
            lifespan="off",
            timeout_graceful_shutdown=self.config.shutdown_grace_s,
        )
        self._server = _EmbeddedServer(config)
        context = contextvars.copy_context()
        context.run(_EMBEDDED.set, True)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock]), name="facegate-sim", context=context
        )
        while not self._server.started:
            if self._task.done():
                await self.stop()
                raise RuntimeError("simulator failed to start")
            await asyncio.sleep(0.005)
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        _sim_of_app(self.app).wake.set()
        if self._server is not None:
            self._server.should_exit = True
        try:
            if task is not None:
                await task
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    async def __aenter__(self) -> BackgroundSim:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _sim_of_app(app: Starlette) -> _Sim:
    sim: _Sim = app.state.sim
    return sim


async def start_background(host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> BackgroundSim:
    """Start a simulator in the running event loop; ``port=0`` picks a free port (see ``.url``)."""
    return await BackgroundSim(host, port, config).start()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m app.upstream.sim`` / ``facegate sim``; flags override FACEGATE_SIM_* env."""
    parser = argparse.ArgumentParser(prog="facegate sim", description="Run the ailabapi simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--shape", choices=["tencent", "list"], help="default answer shape")
    parser.add_argument("--key", action="append", dest="keys", metavar="KEY", help="accepted key (repeatable)")
    parser.add_argument("--latency-ms", type=int)
    parser.add_argument("--qps", type=float)
    parser.add_argument("--max-concurrency", type=int)
    args = parser.parse_args(argv)
    given = {
        "shape": args.shape,
        "api_keys": args.keys,
        "latency_ms": args.latency_ms,
        "qps": args.qps,
        "max_concurrency": args.max_concurrency,
    }
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    serve(args.host, args.port, SimConfig(**{k: v for k, v in given.items() if v is not None}))


if __name__ == "__main__":
    main()
