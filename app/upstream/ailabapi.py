"""The one client that spends money: a single attempt at ailabapi's endpoint.

It turns every way a call can end into one of two things: an :class:`UpstreamAnswer`
(success, or a deterministic verdict on the image that may be cached) or an
:class:`UpstreamFailure` carrying the problem code to answer. Retries, the circuit
breaker and the global limiter wrap this in ``resilience.py``; keeping one attempt
here keeps each concern testable on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final, Protocol

import httpx
import orjson

from app.errors import Problem
from app.httputil import parse_retry_after
from app.upstream import contract
from app.upstream.contract import Kind, UpstreamCode

SIMULATOR_HEADER = "x-facegate-simulator"
#: ailabapi's largest plausible answer is a list-style one with landmarks and dense
#: features for many faces (~2 MB); anything far beyond that is refused, not buffered.
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
#: HTTP statuses worth a second try (with the envelope's code permitting, see ``_failure``).
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})

#: Which problem each kind of upstream error becomes (verdicts are answers, not failures).
_PROBLEM_OF_KIND: dict[Kind, str] = {
    Kind.BAD_REQUEST: "upstream_error",
    Kind.AUTH: "upstream_auth",
    Kind.CREDITS: "upstream_credits",
    Kind.THROTTLED: "upstream_unavailable",
    Kind.FAULT: "upstream_error",
    Kind.OVERLOADED: "upstream_unavailable",
    Kind.TIMEOUT: "upstream_timeout",
}


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """What is sent: exact bytes (or a rewound spool file), facegate's filename and type."""

    filename: str
    content: bytes | IO[bytes]
    mime: str


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """ailabapi answered about the image: success (``verdict`` None) or a verdict row."""

    status: int
    body: dict[str, Any]
    content: bytes  # the exact bytes ailabapi sent (the drop-in route replays them)
    verdict: UpstreamCode | None
    simulated: bool
    billed: bool

    @property
    def upstream_request_id(self) -> str | None:
        rid = self.body.get("request_id")
        return rid if isinstance(rid, str) and rid else None


class UpstreamFailure(Exception):
    """The call failed; ``problem`` is what the caller sees, the rest drives retry and refund."""

    def __init__(
        self,
        problem: Problem,
        *,
        retryable: bool,
        billed: bool = False,
        retry_after: float | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(problem.code)
        self.problem = problem
        self.retryable = retryable
        self.billed = billed
        self.retry_after = retry_after
        #: Short machine-friendly reason for metrics and logs (never contains secrets).
        self.reason = reason or problem.code


class Upstream(Protocol):
    """One attempt at analyzing an image, bounded by ``timeout_s``."""

    async def analyze(self, image: ImagePayload, *, timeout_s: float) -> UpstreamAnswer: ...


class AilabapiClient:
    """ailabapi over one pooled ``httpx.AsyncClient`` owned by the app's lifespan."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        connect_timeout_s: float,
        billed_error_codes: frozenset[str] = frozenset(),
    ) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + contract.ANALYZE_PATH
        self._key = api_key
        self._connect_timeout_s = connect_timeout_s
        self._billed = billed_error_codes

    async def analyze(self, image: ImagePayload, *, timeout_s: float) -> UpstreamAnswer:
        """One POST, bounded by ``timeout_s`` in total (httpx's own timeouts are per operation).

        Whether a broken connection may be retried depends on how far the exchange got:
        before any answer (refused, reset, a pooled keep-alive connection the upstream had
        closed) ailabapi has not answered, so trying again is safe; once its answer has
        started, the call was made and may be billed, so it is not repeated.
        """
        if hasattr(image.content, "seek"):
            image.content.seek(0)
        timeout = httpx.Timeout(timeout_s, connect=min(self._connect_timeout_s, timeout_s))
        answered = False
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._http.stream(
                    "POST",
                    self._url,
                    headers={contract.KEY_HEADER: self._key},
                    files={contract.IMAGE_FIELD: (image.filename, image.content, image.mime)},
                    timeout=timeout,
                    follow_redirects=False,
                ) as response,
            ):
                answered = True
                content = await _read_capped(response, MAX_RESPONSE_BYTES)
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            raise UpstreamFailure(
                Problem("upstream_unavailable", "could not connect to ailabapi in time"),
                retryable=True,
                reason="connect_timeout",
            ) from None
        except (TimeoutError, httpx.TimeoutException):
            # The whole budget is spent, and ailabapi may be working on (and billing) the call.
            raise UpstreamFailure(
                Problem("upstream_timeout", f"ailabapi did not answer within {timeout_s:.3g} s"),
                retryable=False,
                reason="timeout",
            ) from None
        except httpx.ConnectError:
            raise UpstreamFailure(
                Problem("upstream_unavailable", "could not connect to ailabapi"), retryable=True, reason="connect"
            ) from None
        except httpx.TransportError:
            if answered:
                raise UpstreamFailure(
                    Problem("upstream_error", "the connection to ailabapi broke off in the middle of its answer"),
                    retryable=False,
                    reason="broken_answer",
                ) from None
            raise UpstreamFailure(
                Problem("upstream_error", "the connection to ailabapi broke off before it answered"),
                retryable=True,
                reason="transport",
            ) from None
        except _TooLarge:
            raise UpstreamFailure(
                Problem("upstream_error", "ailabapi answered more than facegate accepts"),
                retryable=False,
                reason="oversized",
            ) from None
        return self._classify(response.status_code, response.headers, content)

    def _classify(self, status: int, headers: httpx.Headers, content: bytes) -> UpstreamAnswer:
        simulated = headers.get(SIMULATOR_HEADER) == "1"
        if 300 <= status < 400:
            # Never follow: the key must not travel to another origin.
            raise UpstreamFailure(
                Problem("upstream_error", "ailabapi answered with a redirect, which facegate does not follow"),
                retryable=False,
                reason="redirect",
            )
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            row = contract.lookup(None, status) if status != 200 else None
            if row is not None and row.kind is not Kind.FAULT:
                raise self._failure(row, status, headers)
            raise UpstreamFailure(
                Problem("upstream_error", "ailabapi answered something that is not its JSON envelope"),
                retryable=status in _RETRY_STATUSES,
                reason="malformed",
            )
        code = contract.error_code_of(body)
        if status == 200 and not code:
            return UpstreamAnswer(200, body, content, None, simulated, billed=True)
        row = contract.lookup(code, status if status != 200 else _declared(body))
        if row.kind in (Kind.IMAGE, Kind.NO_FACE):
            verdict_status = status if status != 200 else row.status
            return UpstreamAnswer(verdict_status, body, content, row, simulated, billed=row.code in self._billed)
        raise self._failure(row, status, headers)

    def _failure(self, row: UpstreamCode, status: int, headers: httpx.Headers) -> UpstreamFailure:
        problem_code = _PROBLEM_OF_KIND.get(row.kind, "upstream_error")
        retry_after = parse_retry_after(headers.get("retry-after"))
        detail = f"ailabapi answered {row.code} (HTTP {status})"
        return UpstreamFailure(
            Problem(problem_code, detail, retry_after=retry_after if problem_code != "upstream_error" else None),
            # The code's kind decides; an unlisted fault code still retries on a gateway-class status.
            retryable=row.retryable or (row.kind is Kind.FAULT and status in _RETRY_STATUSES),
            billed=row.code in self._billed,
            retry_after=retry_after,
            reason=row.code,
        )

    async def query_credits(self, *, timeout_s: float = 10.0) -> float | None:
        """This key's balance from ailabapi's balance endpoint (free), or None if it said nothing usable."""
        url = self._url[: -len(contract.ANALYZE_PATH)] + contract.CREDITS_PATH
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._http.get(
                    url,
                    headers={contract.KEY_HEADER: self._key},
                    timeout=httpx.Timeout(timeout_s, connect=min(self._connect_timeout_s, timeout_s)),
                    follow_redirects=False,
                )
        except (TimeoutError, httpx.HTTPError):
            return None
        if response.status_code != 200 or len(response.content) > 1024 * 1024:
            return None
        try:
            return contract.credits_balance(orjson.loads(response.content))
        except orjson.JSONDecodeError:
            return None


class KeyedClients:
    """One :class:`AilabapiClient` per pool key, over one shared ``httpx.AsyncClient``.

    ``spec`` returns the current ``(name, secret)`` pairs (the keys file may be reloaded);
    a client is rebuilt when a key's secret changes.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        secrets: Callable[[], dict[str, str]],
        *,
        base_url: str,
        connect_timeout_s: float,
        billed_error_codes: frozenset[str] = frozenset(),
    ) -> None:
        self._http = http
        self._secrets = secrets
        self._base_url = base_url
        self._connect_timeout_s = connect_timeout_s
        self._billed = billed_error_codes
        self._clients: dict[str, tuple[str, AilabapiClient]] = {}

    def __call__(self, name: str) -> AilabapiClient:
        secret = self._secrets().get(name)
        if secret is None:
            raise KeyError(name)
        cached = self._clients.get(name)
        if cached is None or cached[0] != secret:
            client = AilabapiClient(
                self._http,
                base_url=self._base_url,
                api_key=secret,
                connect_timeout_s=self._connect_timeout_s,
                billed_error_codes=self._billed,
            )
            cached = self._clients[name] = (secret, client)
        return cached[1]


class _TooLarge(Exception):
    """The upstream's answer is larger than MAX_RESPONSE_BYTES."""


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The (decoded) body, refusing to buffer more than ``limit`` bytes of it."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


def _declared(body: dict[str, Any]) -> int:
    """The status an HTTP-200 error envelope declares in ``error_detail.status_code``."""
    detail = body.get("error_detail")
    status = detail.get("status_code") if isinstance(detail, dict) else None
    return status if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600 else 500
