"""The breaker, the retry policy and one ailabapi attempt, each on its own.

The breaker runs on a fake clock (no sleeping, no timing assertions). ``ResilientUpstream``
wraps a scripted stand-in for ailabapi (the paid upstream is the one thing tests may
fake). ``AilabapiClient`` talks over real loopback sockets to tiny servers that misbehave
in ways the simulator cannot: closing before answering, trickling bytes, answering
too much.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.errors import Problem
from app.upstream import ailabapi, contract
from app.upstream.ailabapi import AilabapiClient, ImagePayload, UpstreamAnswer, UpstreamFailure
from app.upstream.keys import PoolSpec
from app.upstream.pool import Hooks, MemoryPool, PoolSettings
from app.upstream.resilience import (
    PROBE_BUSY_RETRY_S,
    RATE_WINDOW_CALLS,
    CircuitBreaker,
    Permit,
    ResilientUpstream,
    RetryPolicy,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> str:
    """The state, unnarrowed (mypy would otherwise remember an earlier assert across calls)."""
    return breaker.state


def permit(breaker: CircuitBreaker) -> Permit:
    got = breaker.allow()
    assert isinstance(got, Permit), f"expected a permit, the breaker said wait {got}"
    return got


# --- circuit breaker -----------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker(3, reset_s=10, clock=clock, on_change=changes.append)
    for _ in range(2):
        breaker.failure(permit(breaker))
    assert state(breaker) == "closed"
    breaker.failure(permit(breaker))
    assert state(breaker) == "open"
    assert changes == ["open"]
    clock.now += 4
    wait = breaker.allow()
    assert wait == pytest.approx(6.0)


def test_success_resets_the_streak() -> None:
    breaker = CircuitBreaker(3, reset_s=10, clock=Clock())
    for _ in range(10):  # 40 % failures: under the rate threshold too
        breaker.failure(permit(breaker))
        breaker.failure(permit(breaker))
        for _ in range(3):
            breaker.success(permit(breaker))
    assert state(breaker) == "closed"


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker(1, reset_s=5, clock=clock, on_change=changes.append)
    breaker.failure(permit(breaker))
    clock.now += 5
    probe = permit(breaker)
    assert probe.probe
    assert state(breaker) == "half_open"
    assert breaker.allow() == PROBE_BUSY_RETRY_S  # everyone else still fails fast
    breaker.success(probe)
    assert state(breaker) == "closed"
    assert changes == ["open", "half_open", "closed"]
    assert not permit(breaker).probe


def test_failed_probe_reopens_for_another_reset_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, reset_s=5, clock=clock)
    breaker.failure(permit(breaker))
    clock.now += 5
    breaker.failure(permit(breaker))
    assert state(breaker) == "open"
    clock.now += 4.9
    assert isinstance(breaker.allow(), float)
    clock.now += 0.1
    assert permit(breaker).probe


def test_abandoned_probe_gives_its_turn_back() -> None:
    """A probe that never reached the upstream (our queue was full, a cancel) must not wedge the breaker."""
    clock = Clock()
    breaker = CircuitBreaker(1, reset_s=5, clock=clock)
    breaker.failure(permit(breaker))
    clock.now += 5
    breaker.abandon(permit(breaker))
    assert state(breaker) == "half_open"
    second = permit(breaker)
    assert second.probe
    breaker.success(second)
    assert state(breaker) == "closed"


def test_lost_probe_expires() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, reset_s=5, clock=clock, probe_timeout_s=30)
    breaker.failure(permit(breaker))
    clock.now += 5
    lost = permit(breaker)
    clock.now += 29
    assert breaker.allow() == PROBE_BUSY_RETRY_S
    clock.now += 1
    fresh = permit(breaker)
    assert fresh.probe
    breaker.success(lost)  # the stale probe's late answer changes nothing ...
    assert state(breaker) == "half_open"
    breaker.success(fresh)  # ... the live one decides
    assert state(breaker) == "closed"


def test_failure_rate_opens_without_a_streak() -> None:
    """Every other call failing never makes 5 in a row, but is a 50 % failure rate."""
    breaker = CircuitBreaker(5, reset_s=5, clock=Clock())
    for i in range(RATE_WINDOW_CALLS - 1):
        (breaker.failure if i % 2 == 0 else breaker.success)(permit(breaker))
        assert state(breaker) == "closed", f"opened after {i + 1} calls"
    breaker.failure(permit(breaker))  # 20 calls, 11 failures
    assert state(breaker) == "open"


def test_failure_rate_below_threshold_stays_closed() -> None:
    breaker = CircuitBreaker(5, reset_s=5, clock=Clock())
    for i in range(200):
        (breaker.failure if i % 3 == 0 else breaker.success)(permit(breaker))  # 33 %
    assert state(breaker) == "closed"


def test_failure_rate_forgets_old_outcomes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(5, reset_s=5, clock=clock, rate_window_s=60)
    for i in range(RATE_WINDOW_CALLS - 2):
        (breaker.failure if i % 2 == 0 else breaker.success)(permit(breaker))
        clock.now += 10  # spread over three minutes: never 20 outcomes within 60 s
    for _ in range(2):
        breaker.failure(permit(breaker))
        breaker.success(permit(breaker))
    assert state(breaker) == "closed"


def test_outcomes_from_before_the_breaker_opened_are_ignored() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, reset_s=5, clock=clock)
    early = permit(breaker)
    clock.now += 1
    breaker.failure(permit(breaker))
    breaker.failure(permit(breaker))
    assert state(breaker) == "open"
    breaker.success(early)  # started before it opened: says nothing about now
    assert state(breaker) == "open"


# --- retry policy --------------------------------------------------------------------------


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(5, base_s=0.2, cap_s=1.0)
    for attempt, top in [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.0), (8, 1.0)]:
        delays = {policy.backoff(attempt, None) for _ in range(50)}
        assert all(top / 2 <= d <= top for d in delays)
        assert len(delays) > 1, "no jitter"


def test_backoff_never_undercuts_retry_after() -> None:
    assert RetryPolicy(3).backoff(0, 7.0) == 7.0


# --- ResilientUpstream with a scripted upstream ----------------------------------------------

PAYLOAD = ImagePayload("image.jpg", b"\xff\xd8\xff", "image/jpeg")
OK = UpstreamAnswer(200, {"request_id": "r"}, b"{}", None, simulated=True, billed=True)


def failure(
    code: str = "upstream_unavailable", *, retryable: bool = True, retry_after: float | None = None
) -> UpstreamFailure:
    return UpstreamFailure(Problem(code, "scripted"), retryable=retryable, retry_after=retry_after, reason=code)


class Scripted:
    """ailabapi as a script: each call takes the next step (an answer or a failure)."""

    def __init__(self, *steps: UpstreamAnswer | UpstreamFailure | Callable[[], Awaitable[UpstreamAnswer]]) -> None:
        self.steps = list(steps)
        self.calls = 0
        self.timeouts: list[float] = []

    async def analyze(self, image: ImagePayload, *, timeout_s: float) -> UpstreamAnswer:
        self.calls += 1
        self.timeouts.append(timeout_s)
        step = self.steps.pop(0)
        if isinstance(step, UpstreamFailure):
            raise step
        if isinstance(step, UpstreamAnswer):
            return step
        return await step()


def one_key(max_concurrency: int = 10) -> MemoryPool:
    """The pool FACEGATE_UPSTREAM_API_KEY alone makes: one key, never taken out of rotation."""
    spec = PoolSpec.single("sk-test", qps=1000, max_concurrency=max_concurrency)
    return MemoryPool(lambda: spec, PoolSettings(), Hooks())


def resilient(
    inner: Scripted,
    *,
    retries: int = 2,
    timeout_s: float = 5.0,
    breaker: CircuitBreaker | None = None,
    pool: MemoryPool | None = None,
    queue_timeout_s: float = 1.0,
) -> ResilientUpstream:
    return ResilientUpstream(
        pool=pool or one_key(),
        clients=lambda _key: inner,
        breaker=breaker or CircuitBreaker(100, 10),
        policy=RetryPolicy(retries, base_s=0.001, cap_s=0.002),
        timeout_s=timeout_s,
        queue_timeout_s=queue_timeout_s,
    )


async def test_retryable_failures_are_retried_until_success() -> None:
    inner = Scripted(failure(), failure(), OK)
    outcomes: list[str] = []
    upstream = resilient(inner)
    upstream._on_attempt = lambda outcome, _s: outcomes.append(outcome)
    from app.upstream.resilience import CallReport

    report = CallReport()
    assert await upstream.call(PAYLOAD, report) is OK
    assert inner.calls == 3
    assert report.attempts == 3
    assert outcomes == ["upstream_unavailable", "upstream_unavailable", "ok"]
    assert inner.timeouts[1] < inner.timeouts[0], "each attempt gets what is left of ONE deadline"


async def test_non_retryable_failure_is_not_retried() -> None:
    inner = Scripted(failure("upstream_error", retryable=False), OK)
    with pytest.raises(UpstreamFailure) as caught:
        await resilient(inner).call(PAYLOAD)
    assert caught.value.problem.code == "upstream_error"
    assert inner.calls == 1


async def test_retries_stop_at_the_configured_count() -> None:
    inner = Scripted(failure(), failure(), failure(), OK)
    with pytest.raises(UpstreamFailure):
        await resilient(inner, retries=2).call(PAYLOAD)
    assert inner.calls == 3


async def test_a_verdict_on_the_image_is_an_answer_not_retried() -> None:
    row = contract.ERROR_CODES.get("ERROR_BLURRY_FACE", None)
    assert row is not None
    verdict = UpstreamAnswer(422, {}, b"{}", row, simulated=True, billed=False)
    inner = Scripted(verdict, OK)
    assert await resilient(inner).call(PAYLOAD) is verdict
    assert inner.calls == 1


async def test_retry_after_beyond_the_deadline_ends_the_call_at_once() -> None:
    inner = Scripted(failure(retry_after=60), OK)
    with pytest.raises(UpstreamFailure) as caught:
        await resilient(inner, timeout_s=5).call(PAYLOAD)
    assert caught.value.retry_after == 60
    assert inner.calls == 1


async def test_open_breaker_fails_fast_without_calling() -> None:
    breaker = CircuitBreaker(2, reset_s=30)
    inner = Scripted(failure(retryable=False), failure(retryable=False), OK)
    upstream = resilient(inner, breaker=breaker)
    for _ in range(2):
        with pytest.raises(UpstreamFailure):
            await upstream.call(PAYLOAD)
    with pytest.raises(UpstreamFailure) as caught:
        await upstream.call(PAYLOAD)
    assert caught.value.reason == "breaker_open"
    assert caught.value.problem.code == "upstream_unavailable"
    assert caught.value.problem.retry_after is not None
    assert caught.value.problem.retry_after > 25
    assert inner.calls == 2


async def test_the_failure_that_opens_the_breaker_is_not_retried() -> None:
    inner = Scripted(failure(), failure(), OK)
    with pytest.raises(UpstreamFailure) as caught:
        await resilient(inner, retries=5, breaker=CircuitBreaker(1, reset_s=30)).call(PAYLOAD)
    assert caught.value.reason == "upstream_unavailable"  # the upstream's own failure, not "breaker_open"
    assert inner.calls == 1


async def test_no_slot_in_time_does_not_count_against_the_upstream() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, reset_s=5, clock=clock)
    breaker.failure(permit(breaker))
    clock.now += 5  # half-open: the next call is the probe
    pool = one_key(max_concurrency=1)
    hold, holding = asyncio.Event(), asyncio.Event()

    async def slow() -> UpstreamAnswer:
        holding.set()
        await hold.wait()
        return OK

    busy = resilient(Scripted(slow), retries=0, pool=pool)
    occupying = asyncio.create_task(busy.call(PAYLOAD))
    await holding.wait()  # the pool's only slot is taken
    probe_side = resilient(Scripted(OK), retries=0, breaker=breaker, pool=pool, queue_timeout_s=0.05)
    with pytest.raises(UpstreamFailure) as caught:
        await probe_side.call(PAYLOAD)
    assert caught.value.reason == "guard_timeout"
    assert state(breaker) == "half_open"
    assert permit(breaker).probe, "the probe that never reached ailabapi gave its turn back"
    hold.set()
    await occupying


async def test_cancelled_probe_gives_its_turn_back() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, reset_s=5, clock=clock)
    breaker.failure(permit(breaker))
    clock.now += 5

    calling = asyncio.Event()

    async def forever() -> UpstreamAnswer:
        calling.set()
        await asyncio.sleep(3600)
        raise AssertionError

    task = asyncio.create_task(resilient(Scripted(forever), breaker=breaker).call(PAYLOAD))
    await calling.wait()  # the probe is out
    assert isinstance(breaker.allow(), float), "only one probe at a time"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert permit(breaker).probe


# --- one attempt over real sockets -----------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback server running ``handler`` per connection; yields its base URL."""

    writers: set[asyncio.StreamWriter] = set()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return head


async def attempt(url: str, timeout_s: float = 5.0, **kw: Any) -> UpstreamAnswer:
    async with httpx.AsyncClient() as http:
        client = AilabapiClient(http, base_url=url, api_key="k", connect_timeout_s=2, **kw)
        return await client.analyze(PAYLOAD, timeout_s=timeout_s)


async def test_connection_closed_before_any_answer_is_retryable() -> None:
    """What a pooled keep-alive connection the upstream had closed looks like: safe to retry."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with tcp_server(hang_up) as url:
        with pytest.raises(UpstreamFailure) as caught:
            await attempt(url)
    assert caught.value.retryable
    assert caught.value.reason == "transport"
    assert caught.value.problem.code == "upstream_error"


async def test_connection_broken_mid_answer_is_not_retried() -> None:
    """ailabapi had started answering: the call was made (maybe billed) and is not repeated."""

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"request_id"')
        await writer.drain()

    async with tcp_server(half) as url:
        with pytest.raises(UpstreamFailure) as caught:
            await attempt(url)
    assert not caught.value.retryable
    assert caught.value.reason == "broken_answer"


async def test_refused_connection_is_retryable_unavailable() -> None:
    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async with tcp_server(nothing) as url:  # bind a port, then close it: nobody listens there
        pass
    with pytest.raises(UpstreamFailure) as caught:
        await attempt(url)
    assert caught.value.retryable
    assert caught.value.problem.code == "upstream_unavailable"


async def test_trickling_answer_is_cut_at_the_total_deadline() -> None:
    """One byte every 50 ms never trips httpx's per-read timeout; the overall deadline does."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(200):  # 10 s of trickle at most, so a broken client cannot hang the test
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with tcp_server(trickle) as url:
        with pytest.raises(UpstreamFailure) as caught:
            await attempt(url, timeout_s=0.5)
    assert caught.value.problem.code == "upstream_timeout"
    assert not caught.value.retryable


async def test_oversized_answer_is_refused_not_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ailabapi, "MAX_RESPONSE_BYTES", 64 * 1024)

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        for _ in range(16):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with tcp_server(huge) as url:
        with pytest.raises(UpstreamFailure) as caught:
            await attempt(url)
    assert caught.value.reason == "oversized"
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("status", "code", "retryable", "problem"),
    [
        (503, "AI_SERVICE_FLOW_RESTRICTION", True, "upstream_unavailable"),
        (504, "AI_SERVICE_TIMEOUT", True, "upstream_timeout"),
        (429, "EXCEEDING_LIMITS", True, "upstream_unavailable"),
        (500, "PROCESSING_FAILURE", False, "upstream_error"),
        (429, "ERROR_NOT_ENOUGH_CREDITS", False, "upstream_credits"),
        (401, "ERROR_USER_NOT_EXISTS", False, "upstream_auth"),
        (400, "ERROR_PARAMETERS", False, "upstream_error"),
    ],
)
async def test_which_upstream_errors_are_retryable(status: int, code: str, retryable: bool, problem: str) -> None:
    body = contract.envelope(request_id="r", status=status, code=code, message="m")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        import orjson

        data = orjson.dumps(body)
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nRetry-After: 3\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(data), data)
        )
        await writer.drain()

    async with tcp_server(answer) as url:
        with pytest.raises(UpstreamFailure) as caught:
            await attempt(url)
    assert caught.value.retryable is retryable
    assert caught.value.problem.code == problem
    assert caught.value.retry_after == 3


def test_failure_rate_rule_can_be_turned_off() -> None:
    breaker = CircuitBreaker(5, reset_s=5, clock=Clock(), rate_threshold=0)
    for i in range(100):
        (breaker.failure if i % 2 == 0 else breaker.success)(permit(breaker))
    assert state(breaker) == "closed"
