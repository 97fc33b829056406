"""A typed Python client for facegate: ``FacegateClient`` (sync) and ``AsyncFacegateClient``.

It needs only httpx and pydantic (plus facegate's own schema models), so a service that
merely *calls* facegate can import it without FastAPI, Redis or the server code::

    from app.client import FacegateClient, RateLimited

    with FacegateClient("http://facegate:8000", key="fg_...") as fg:   # or FACEGATE_URL / FACEGATE_KEY
        analysis = fg.analyze("photo.jpg")                               # a path, bytes or a binary file
        for face in analysis.faces:
            print(face.box, face.age, face.gender.label if face.gender else None)
        print(fg.usage().quotas["daily"].remaining)

    async with AsyncFacegateClient() as fg:
        analysis = await fg.analyze(image_bytes, landmarks=True)

Hash first: ``analyze`` hashes the image locally and asks facegate for a cached analysis of
that SHA-256 (``GET /v1/faces/analyses/{sha256}``, never billable) before it uploads anything;
only a 404 leads to the upload. A repeat of a 5 MB photo then costs a few hundred bytes on
the wire. On by default; ``lookup_first=False`` (per client or per call) uploads every time.
``AnalyzeResult.from_lookup`` says which way the answer came.

Methods return the v1 models of ``app.schema.v1`` (``AnalysisV1``) and :class:`Usage`.
Refusals raise a :class:`FacegateError` subclass that carries facegate's stable problem
``code``, the HTTP ``status``, the ``request_id`` to quote in a bug report, the ``detail``
and ``retry_after``.

Transient refusals are retried a bounded number of times (:class:`RetryPolicy`): 429 and
503 after the server's ``Retry-After``, connection failures with a short backoff. A wait
longer than ``max_wait_s`` (a daily quota that resets in hours) or one that would exceed
``max_total_wait_s`` is not waited for: the error is raised at once with its
``retry_after``, so the caller decides. Retrying an analysis is safe: answers are cached
by image hash, so a retry never buys the same image twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from app import __version__
from app.httputil import parse_retry_after
from app.schema.v1 import AnalysisV1

__all__ = [
    "AnalysisV1",
    "AnalyzeResult",
    "AsyncFacegateClient",
    "BadRequest",
    "ConnectionFailed",
    "FacegateClient",
    "FacegateError",
    "Forbidden",
    "ImageSource",
    "InvalidImage",
    "NotFound",
    "QuotaExceeded",
    "QuotaUsage",
    "RateLimitState",
    "RateLimited",
    "RetryPolicy",
    "ServiceUnavailable",
    "Unauthorized",
    "UpstreamError",
    "Usage",
]

DEFAULT_URL: Final = "http://127.0.0.1:8000"
URL_ENV: Final = "FACEGATE_URL"
KEY_ENV: Final = "FACEGATE_KEY"
ANALYZE_PATH: Final = "/v1/faces/analyze"
USER_AGENT: Final = f"facegate-client/{__version__} httpx/{httpx.__version__}"

#: An image to analyze: a file path, the bytes themselves, or a binary file object.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


# --- errors ------------------------------------------------------------------------------


class FacegateError(Exception):
    """A request facegate (or the way to it) refused; ``code`` is facegate's stable problem code.

    ``status`` is None when no HTTP answer arrived (``ConnectionFailed``); ``retry_after`` is the
    server's ``Retry-After`` in seconds when it sent one; ``attempts`` counts the requests made,
    retries included.
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        self.code = code
        self.detail = detail
        self.status = status
        self.title = title
        self.request_id = request_id
        self.retry_after = retry_after
        self.attempts = attempts
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" {self.status}" if self.status is not None else ""
        rid = f" [request id {self.request_id}]" if self.request_id else ""
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.code}{where}: {self.detail}{rid}{tries}"


class BadRequest(FacegateError):
    """The request was malformed (a client bug): ``invalid_request``, ``credentials_in_query``, ..."""


class Unauthorized(FacegateError):
    """The key is missing, unknown or revoked (401)."""


class Forbidden(FacegateError):
    """The key is valid but may not do this (403): ``force_not_allowed``, ``operator_required``."""


class RateLimited(FacegateError):
    """Too many requests right now (429 ``rate_limited``), or too many of this tenant's uploads in
    progress on that facegate (429 ``too_many_uploads``); ``retry_after`` says when to come back."""


class QuotaExceeded(FacegateError):
    """The tenant's daily or monthly quota of billable calls is used up (429 ``quota_exceeded``)."""


class InvalidImage(FacegateError):
    """The image cannot be analyzed: missing, too large, not JPEG/PNG/BMP, undecodable, out of
    range, or refused by ailabapi (``upstream_rejected_image``). Retrying will not help."""


class NotFound(FacegateError):
    """No such resource; for ``analysis(sha256)``: nothing cached for that image and tenant."""


class UpstreamError(FacegateError):
    """ailabapi failed, timed out, is unavailable or refused facegate's own credentials (502/503/504)."""


class ServiceUnavailable(FacegateError):
    """facegate itself cannot serve right now (``overloaded``, ``quota_unavailable``, a proxy's 5xx)."""


class ConnectionFailed(FacegateError):
    """No HTTP answer: facegate could not be reached, or the connection broke (``status`` is None)."""


_BY_CODE: Final[dict[str, type[FacegateError]]] = {
    "unauthorized": Unauthorized,
    "operator_required": Forbidden,
    "force_not_allowed": Forbidden,
    "rate_limited": RateLimited,
    "too_many_uploads": RateLimited,
    "quota_exceeded": QuotaExceeded,
    "image_missing": InvalidImage,
    "image_too_large": InvalidImage,
    "unsupported_media_type": InvalidImage,
    "invalid_image": InvalidImage,
    "image_dimensions": InvalidImage,
    "upstream_rejected_image": InvalidImage,
    "not_found": NotFound,
    "upstream_auth": UpstreamError,
    "upstream_error": UpstreamError,
    "upstream_credits": UpstreamError,
    "upstream_unavailable": UpstreamError,
    "upstream_keys_unavailable": UpstreamError,
    "upstream_share_exceeded": RateLimited,
    "upstream_timeout": UpstreamError,
    "overloaded": ServiceUnavailable,
    "quota_unavailable": ServiceUnavailable,
    "cache_unavailable": ServiceUnavailable,
    "internal_error": ServiceUnavailable,
}

#: Refusals that may pass by themselves, so waiting and retrying can help. ``upstream_credits``
#: (the company's ailabapi account is empty) needs an operator, and ``upstream_timeout`` was
#: already retried by facegate within its own deadline.
_TRANSIENT: Final = frozenset(
    {
        "rate_limited",
        "too_many_uploads",
        "quota_exceeded",
        "upstream_unavailable",
        "upstream_keys_unavailable",
        "upstream_share_exceeded",
        "overloaded",
        "quota_unavailable",
        "cache_unavailable",
        "http_503",
    }
)


def _error_class(code: str, status: int | None) -> type[FacegateError]:
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls
    if status is None:
        return ConnectionFailed
    if status == 401:
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 429:
        return RateLimited
    if status >= 500:
        return ServiceUnavailable
    return BadRequest


def error_from_response(response: httpx.Response, *, attempts: int = 1) -> FacegateError:
    """The typed error for a non-2xx answer: from its problem+json body, or from the status alone
    when something in between (a proxy) answered with HTML."""
    body: Mapping[str, Any] = {}
    if "json" in response.headers.get("content-type", ""):
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            body = parsed
    status = response.status_code
    code = body.get("code") if isinstance(body.get("code"), str) else f"http_{status}"
    title = body.get("title") if isinstance(body.get("title"), str) else None
    detail = body.get("detail") if isinstance(body.get("detail"), str) else None
    request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    cls = _error_class(str(code), status)
    return cls(
        str(code),
        detail or title or response.reason_phrase or f"HTTP {status}",
        status=status,
        title=title,
        request_id=request_id or response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        attempts=attempts,
    )


# --- results -----------------------------------------------------------------------------


class QuotaUsage(BaseModel):
    """One quota window of billable calls; ``limit``/``remaining`` are null when unlimited."""

    limit: int | None
    used: int
    remaining: int | None
    reset_s: float


class RateUsage(BaseModel):
    """The per-request rate limit (GCRA): sustained rate, burst, and the burst left now."""

    rate_per_s: float
    burst: int
    remaining: int
    reset_s: float


class CacheCounts(BaseModel):
    hits: int
    misses: int


class Usage(BaseModel):
    """``GET /v1/usage``: the caller's limits and usage. Unknown keys are ignored (additive changes)."""

    model_config = ConfigDict(extra="ignore")

    tenant: str
    rate_limit: RateUsage
    #: ``daily`` and ``monthly``.
    quotas: dict[str, QuotaUsage]
    #: Billable upstream calls charged: ``day`` and ``month``.
    credits_spent: dict[str, int]
    #: Cache hits and misses per ``day`` and ``month``.
    cache: dict[str, CacheCounts]


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """One policy of the ``RateLimit``/``RateLimit-Policy`` headers: ``remaining`` units, reset in
    ``reset_s`` seconds; ``limit`` and ``window_s`` from the policy (None when not sent)."""

    name: str
    remaining: int
    reset_s: int
    limit: int | None = None
    window_s: int | None = None


@dataclass(frozen=True, slots=True)
class AnalyzeResult:
    """An analysis with what the response headers said about it."""

    analysis: AnalysisV1
    #: RFC 9211 ``Cache-Status``, e.g. ``facegate; hit; ttl=3600`` or ``facegate; fwd=uri-miss; stored``.
    cache_status: str | None
    request_id: str | None
    #: Per policy name (``burst``, ``daily``, ``monthly``).
    rate_limits: dict[str, RateLimitState]
    attempts: int
    #: True when the answer came from the hash lookup and the image was not uploaded.
    from_lookup: bool = False

    @property
    def cache_hit(self) -> bool:
        return self.analysis.source.cached


_MEMBER = re.compile(r'\s*"([^"\\]*)"\s*((?:;\s*[A-Za-z][\w.*-]*\s*=\s*[^;,\s]+\s*)*)')
_PARAM = re.compile(r";\s*([A-Za-z][\w.*-]*)\s*=\s*([^;,\s]+)")


def _sf_list(value: str | None) -> dict[str, dict[str, str]]:
    """The subset of RFC 8941 lists the ratelimit headers use: ``"name";k=v;k=v, ...``."""
    out: dict[str, dict[str, str]] = {}
    if not value:
        return out
    for part in value.split(","):
        match = _MEMBER.fullmatch(part)
        if match:
            out[match.group(1)] = dict(_PARAM.findall(match.group(2)))
    return out


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_ratelimit(headers: Mapping[str, str]) -> dict[str, RateLimitState]:
    """``RateLimit`` + ``RateLimit-Policy`` (IETF httpapi draft) as one state per policy."""
    policies = _sf_list(headers.get("ratelimit-policy"))
    out: dict[str, RateLimitState] = {}
    for name, params in _sf_list(headers.get("ratelimit")).items():
        remaining, reset = _int(params.get("r")), _int(params.get("t"))
        if remaining is None or reset is None:
            continue
        policy = policies.get(name, {})
        out[name] = RateLimitState(name, remaining, reset, _int(policy.get("q")), _int(policy.get("w")))
    return out


# --- retries -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long the client keeps trying before it raises.

    ``max_retries`` bounds the extra attempts; ``max_wait_s`` is the longest single wait it
    accepts (a longer ``Retry-After`` — a quota that resets tomorrow — raises at once);
    ``max_total_wait_s`` bounds all waits of one call together. Without a ``Retry-After``
    (a proxy's 503, a refused connection) it backs off ``backoff_s`` * 2^n, with jitter.
    ``RetryPolicy(max_retries=0)`` disables retries.
    """

    max_retries: int = 3
    max_wait_s: float = 30.0
    max_total_wait_s: float = 60.0
    backoff_s: float = 0.5

    def delay(self, error: FacegateError, attempt: int, waited: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to raise ``error`` now."""
        if attempt > self.max_retries:
            return None
        if isinstance(error, ConnectionFailed):
            if error.code != "connect_error":  # the request may have arrived: do not resend blindly
                return None
            wait = self.backoff_s * 2.0 ** (attempt - 1)
        elif error.code in _TRANSIENT:
            if error.retry_after is not None:
                if error.retry_after > self.max_wait_s:
                    return None  # e.g. a quota that resets in hours: the caller decides, not a sleep
                # A little over Retry-After: the server's clock rounds, and arriving early wastes a try.
                jitter = min(1.0, 0.1 * error.retry_after) * _rng.random()
                wait = min(error.retry_after + jitter, self.max_wait_s)
            elif error.code in ("rate_limited", "quota_exceeded"):
                return None  # a 429 with no hint: nothing safe to go by
            else:
                wait = self.backoff_s * 2.0 ** (attempt - 1) * (1 + 0.5 * _rng.random())
        else:
            return None
        if wait > self.max_wait_s or waited + wait > self.max_total_wait_s:
            return None
        return wait


_rng = random.SystemRandom()


# --- the shared part of both clients -----------------------------------------------------


def _resolve(base_url: str | None, key: str | None) -> tuple[str, str]:
    url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, not {url!r}")
    resolved = key if key is not None else os.environ.get(KEY_ENV)
    if not resolved:
        raise ValueError(f"no API key: pass key=... or set {KEY_ENV}")
    return url, resolved


def _image_part(image: ImageSource) -> tuple[str, bytes | IO[bytes], str] | Path:
    """The multipart ``image`` part, or a Path to open per attempt (so a retry resends it whole)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return ("image", bytes(image), "application/octet-stream")
    if isinstance(image, str | os.PathLike):
        return Path(image)
    data = image.read()
    if not isinstance(data, bytes):
        raise TypeError("a file object must be opened in binary mode ('rb')")
    name = Path(str(getattr(image, "name", "image"))).name or "image"
    return (name, data, _content_type(name))


def _content_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def _analyze_request(landmarks: bool, force: bool, no_store: bool) -> tuple[dict[str, str], dict[str, str]]:
    params = {"landmarks": "true"} if landmarks else {}
    headers = {"Cache-Control": "no-store"} if no_store else {}
    if force:
        headers["X-Facegate-Force"] = "1"
    return params, headers


def _transport_error(exc: httpx.TransportError, base_url: str, attempts: int) -> ConnectionFailed:
    code = "connect_error" if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) else "transport_error"
    what = "could not connect to" if code == "connect_error" else "the connection failed to"
    return ConnectionFailed(code, f"{what} {base_url} ({type(exc).__name__})", attempts=attempts)


def _analysis(response: httpx.Response, attempts: int) -> AnalysisV1:
    try:
        return AnalysisV1.model_validate_json(response.content)
    except ValidationError as exc:
        raise FacegateError(
            "invalid_response",
            f"the answer is not a v1 analysis ({exc.error_count()} validation error(s))",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
            attempts=attempts,
        ) from None


def _result(response: httpx.Response, attempts: int, *, from_lookup: bool = False) -> AnalyzeResult:
    return AnalyzeResult(
        analysis=_analysis(response, attempts),
        cache_status=response.headers.get("cache-status"),
        request_id=response.headers.get("x-request-id"),
        rate_limits=parse_ratelimit(response.headers),
        attempts=attempts,
        from_lookup=from_lookup,
    )


#: Hashing reads files in blocks of this size (the file is not held in memory for it).
_HASH_BLOCK: Final = 1024 * 1024


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sha256_of(part: tuple[str, bytes | IO[bytes], str] | Path) -> str:
    """The SHA-256 facegate's cache is addressed by: that of the exact bytes that would be uploaded."""
    if isinstance(part, Path):
        return _sha256_file(part)
    data = part[1]
    assert isinstance(data, bytes), "_image_part reads file objects into bytes"
    return hashlib.sha256(data).hexdigest()


def _lookup_params(landmarks: bool) -> dict[str, str]:
    return {"landmarks": "true"} if landmarks else {}


def _usage(response: httpx.Response, attempts: int) -> Usage:
    try:
        return Usage.model_validate_json(response.content)
    except ValidationError:
        raise FacegateError(
            "invalid_response",
            "the answer is not a usage report",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
            attempts=attempts,
        ) from None


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _analysis_path(sha256: str) -> str:
    sha = sha256.strip().lower()
    if not _SHA256.match(sha):
        raise ValueError("sha256 must be 64 hex characters")
    return f"/v1/faces/analyses/{sha}"


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT, "Accept": "application/json"}


# --- sync --------------------------------------------------------------------------------


class FacegateClient:
    """Blocking client. Thread-safe (one httpx connection pool); close it, or use ``with``.

    ``base_url`` defaults to ``$FACEGATE_URL`` (else ``http://127.0.0.1:8000``), ``key`` to
    ``$FACEGATE_KEY``. ``timeout`` is per attempt; it must cover facegate's own upstream
    deadline (30 s by default) on a cache miss.
    """

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
        lookup_first: bool = True,
    ) -> None:
        self.base_url, key = _resolve(base_url, key)
        self.retry = retry or RetryPolicy()
        self.lookup_first = lookup_first
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout)
        self._headers = _headers(key)

    def analyze(
        self,
        image: ImageSource,
        *,
        landmarks: bool = False,
        force: bool = False,
        no_store: bool = False,
        lookup_first: bool | None = None,
    ) -> AnalysisV1:
        """Analyze an image (path, bytes or binary file). ``force`` pays for a fresh analysis even when
        the image is cached (``X-Facegate-Force``; only for tenants with ``allow_force``, else
        403 ``force_not_allowed``); ``no_store`` keeps facegate from storing the answer; ``landmarks``
        adds the 105 landmarks and pupils when ailabapi gives them (list shape). ``lookup_first``
        (default: the client's) asks by hash before uploading; ``force`` never looks up."""
        result = self.analyze_detailed(
            image, landmarks=landmarks, force=force, no_store=no_store, lookup_first=lookup_first
        )
        return result.analysis

    def analyze_detailed(
        self,
        image: ImageSource,
        *,
        landmarks: bool = False,
        force: bool = False,
        no_store: bool = False,
        lookup_first: bool | None = None,
    ) -> AnalyzeResult:
        """Like :meth:`analyze`, plus the Cache-Status, request id and rate-limit headers, and
        whether the answer came from the hash lookup (``from_lookup``)."""
        part = _image_part(image)
        if (self.lookup_first if lookup_first is None else lookup_first) and not force:
            found = self._lookup(_sha256_of(part), landmarks)
            if found is not None:
                return found
        params, headers = _analyze_request(landmarks, force, no_store)

        headers = {**self._headers, **headers}
        url = self.base_url + ANALYZE_PATH

        def send() -> httpx.Response:
            if isinstance(part, Path):
                with part.open("rb") as fh:  # reopened per attempt, so a retry sends the whole file again
                    files = {"image": (part.name, fh, _content_type(part.name))}
                    return self._http.post(url, params=params, headers=headers, files=files)
            return self._http.post(url, params=params, headers=headers, files={"image": part})

        response, attempts = self._send(send)
        return _result(response, attempts)

    def analysis(self, sha256: str, *, landmarks: bool = False) -> AnalysisV1:
        """A cached analysis by the image's SHA-256 (never billable); :class:`NotFound` when not cached."""
        url = self.base_url + _analysis_path(sha256)
        params = _lookup_params(landmarks)
        response, attempts = self._send(lambda: self._http.get(url, params=params, headers=self._headers))
        return _analysis(response, attempts)

    def _lookup(self, sha256: str, landmarks: bool) -> AnalyzeResult | None:
        """The cached analysis as a result, or None when facegate has none (then: upload)."""
        url = self.base_url + _analysis_path(sha256)
        params = _lookup_params(landmarks)
        try:
            response, attempts = self._send(lambda: self._http.get(url, params=params, headers=self._headers))
        except NotFound:
            return None
        return _result(response, attempts, from_lookup=True)

    def usage(self) -> Usage:
        """The caller's limits, usage and cache hits/misses."""
        url = self.base_url + "/v1/usage"
        response, attempts = self._send(lambda: self._http.get(url, headers=self._headers))
        return _usage(response, attempts)

    def _send(self, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
        waited, attempt = 0.0, 0
        while True:
            attempt += 1
            error: FacegateError
            try:
                response = send()
            except httpx.TransportError as exc:
                error = _transport_error(exc, self.base_url, attempt)
            else:
                if response.is_success:
                    return response, attempt
                error = error_from_response(response, attempts=attempt)
            wait = self.retry.delay(error, attempt, waited)
            if wait is None:
                raise error
            time.sleep(wait)
            waited += wait

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- async -------------------------------------------------------------------------------


class AsyncFacegateClient:
    """The asyncio twin of :class:`FacegateClient`: same arguments, same methods, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
        lookup_first: bool = True,
    ) -> None:
        self.base_url, key = _resolve(base_url, key)
        self.retry = retry or RetryPolicy()
        self.lookup_first = lookup_first
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._headers = _headers(key)

    async def analyze(
        self,
        image: ImageSource,
        *,
        landmarks: bool = False,
        force: bool = False,
        no_store: bool = False,
        lookup_first: bool | None = None,
    ) -> AnalysisV1:
        result = await self.analyze_detailed(
            image, landmarks=landmarks, force=force, no_store=no_store, lookup_first=lookup_first
        )
        return result.analysis

    async def analyze_detailed(
        self,
        image: ImageSource,
        *,
        landmarks: bool = False,
        force: bool = False,
        no_store: bool = False,
        lookup_first: bool | None = None,
    ) -> AnalyzeResult:
        part = _image_part(image)
        if isinstance(part, Path):
            # Read once, off the event loop: images are capped at 20 MiB, and bytes make retries trivial.
            data = await asyncio.to_thread(part.read_bytes)
            part = (part.name, data, _content_type(part.name))
        if (self.lookup_first if lookup_first is None else lookup_first) and not force:
            # Off the event loop too: hashing 20 MiB takes tens of milliseconds.
            found = await self._lookup(await asyncio.to_thread(_sha256_of, part), landmarks)
            if found is not None:
                return found
        params, headers = _analyze_request(landmarks, force, no_store)
        url = self.base_url + ANALYZE_PATH
        files = {"image": part}
        response, attempts = await self._send(
            lambda: self._http.post(url, params=params, headers={**self._headers, **headers}, files=files)
        )
        return _result(response, attempts)

    async def analysis(self, sha256: str, *, landmarks: bool = False) -> AnalysisV1:
        url = self.base_url + _analysis_path(sha256)
        params = _lookup_params(landmarks)
        response, attempts = await self._send(lambda: self._http.get(url, params=params, headers=self._headers))
        return _analysis(response, attempts)

    async def _lookup(self, sha256: str, landmarks: bool) -> AnalyzeResult | None:
        url = self.base_url + _analysis_path(sha256)
        params = _lookup_params(landmarks)
        try:
            response, attempts = await self._send(lambda: self._http.get(url, params=params, headers=self._headers))
        except NotFound:
            return None
        return _result(response, attempts, from_lookup=True)

    async def usage(self) -> Usage:
        url = self.base_url + "/v1/usage"
        response, attempts = await self._send(lambda: self._http.get(url, headers=self._headers))
        return _usage(response, attempts)

    async def _send(self, send: Callable[[], Awaitable[httpx.Response]]) -> tuple[httpx.Response, int]:
        waited, attempt = 0.0, 0
        while True:
            attempt += 1
            error: FacegateError
            try:
                response = await send()
            except httpx.TransportError as exc:
                error = _transport_error(exc, self.base_url, attempt)
            else:
                if response.is_success:
                    return response, attempt
                error = error_from_response(response, attempts=attempt)
            wait = self.retry.delay(error, attempt, waited)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            waited += wait

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
