"""The analyze use case: everything between an accepted upload and the upstream's answer.

Order is the product: whatever can answer for free (the cache, a call already in
flight) is tried before anything that costs a credit (the quota reservation, then the
upstream call). No HTTP types here; routes render what this returns, and read the
:class:`RequestContext` for headers and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, TypeGuard

import orjson

from app import tracing
from app.cache import CacheBackend, CacheError, TieredCache
from app.context import CacheStatus, RequestContext
from app.entry import Entry, EntryMemo
from app.errors import Problem
from app.intake import Upload
from app.limits import Admission, HitProbe, Limiter, QuotaUnavailable, Record, Reservation, Usage
from app.purge import CacheIndex, Invalidation, MemoryIndex, cache_key_of
from app.redisconn import together
from app.schema.normalize import UpstreamFormatError
from app.singleflight import Coordinator, Flights, Lease, Outcome, join, renewing
from app.tenants import Tenant
from app.upstream.ailabapi import ImagePayload, UpstreamAnswer, UpstreamFailure
from app.upstream.contract import Kind
from app.upstream.pool import Caller
from app.upstream.resilience import CallReport, ResilientUpstream

log = logging.getLogger("facegate.service")


@dataclass(frozen=True, slots=True)
class AnalyzeOptions:
    no_cache: bool = False  # a forced analysis: skip the lookup (a billable call), still store
    no_store: bool = False  # do not store the answer
    batch: bool = False  # the request lowered its own priority (RFC 9218 ``Priority: u>3``)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    cache_scope: Literal["tenant", "shared"]
    cache_ttl_s: float
    negative_ttl_s: float
    lock_ttl_s: float
    follow_timeout_s: float
    quota_fail_open: bool


@dataclass(frozen=True, slots=True)
class _FlightResult:
    entry: Entry
    how: Literal["fresh", "remote", "cached"]
    stored: bool
    attempts: int
    upstream_s: float | None
    key: str | None = None  # the pool key that paid (a name)
    queued_s: float | None = None


@dataclass(frozen=True, slots=True)
class HitReader:
    """A shared cache entry read by the hit's own admission (one Redis, not a Cluster: there the
    entry and the tenant's counters live in different slots)."""

    probe: HitProbe
    entry_name: Callable[[str], str]  # a cache key's name in that Redis


class _Held:
    """A bid's answer when another replica holds the lead (see ``AnalyzeService._bid``)."""


HELD: Final = _Held()
#: A try for the lead: the lease, the answer (stored meanwhile), HELD, or None (no coordination).
_Bid = Lease | _FlightResult | _Held | None


def _is_lease(bid: _Bid | BaseException) -> TypeGuard[Lease]:
    return bid is not None and not isinstance(bid, _FlightResult | _Held | BaseException)


def caller_of(tenant: Tenant, opts: AnalyzeOptions) -> Caller:
    """How this request queues for the upstream: the tenant's share and key; batch if either says so."""
    share = tenant.upstream
    batch = opts.batch or share.priority == "batch"
    return Caller(
        tenant.name, share.share, "batch" if batch else "interactive", share.upstream_key, share.upstream_fallback
    )


class AnalyzeService:
    _fail_open_logged_at = float("-inf")

    def __init__(
        self,
        *,
        config: ServiceConfig,
        cache: CacheBackend,
        limiter: Limiter,
        upstream: ResilientUpstream,
        coordinator: Coordinator,
        on_spent: Callable[[str], None] | None = None,
        index: CacheIndex | None = None,
        hits: HitReader | None = None,
    ) -> None:
        self.config = config
        #: Reads a shared entry and admits the hit in one round trip (one Redis; None otherwise).
        self._hits = hits if isinstance(cache, TieredCache) else None
        #: Told the tenant each time the upstream billed a call (metrics; kept free of HTTP).
        self._on_spent = on_spent
        self.cache = cache
        self.limiter = limiter
        self.upstream = upstream
        self.coordinator = coordinator
        self.flights: Flights[_FlightResult] = Flights()
        self._entries = EntryMemo()
        #: Which keys each tenant stored (purges); see app/purge.py.
        self.index: CacheIndex = index or MemoryIndex()
        #: Deletions seen while calls were in flight: key (or tenant marker) -> deletion number.
        #: A flight that started before a deletion of its key or tenant does not store its answer.
        self._deletions = 0
        self._deleted: dict[str, int] = {}
        self._flights_since: Counter[int] = Counter()

    # --- public use cases -------------------------------------------------------------

    async def analyze(self, ctx: RequestContext, tenant: Tenant, upload: Upload, opts: AnalyzeOptions) -> Entry:
        """Answer for ``upload``: from the cache, from a call in flight, or from a new call."""
        with together():  # independent Redis commands share round trips (see _reserve)
            return await self._analyze(ctx, tenant, upload, opts)

    async def _analyze(self, ctx: RequestContext, tenant: Tenant, upload: Upload, opts: AnalyzeOptions) -> Entry:
        ctx.tenant = tenant.name
        ctx.image_bytes = upload.size
        key = self.key_for(tenant, upload.sha256)
        if not opts.no_cache:
            with tracing.span("facegate.cache.lookup") as traced:
                found = await self._hit(ctx, tenant, key)
                tracing.set_attributes(traced, **{"facegate.cache.hit": found is not None})
            if found is not None:
                return found
            running = self.flights.get(key)
            if running is not None:
                await self._admit(ctx, tenant, reserve=False, record="collapsed")
                return await self._follow(ctx, running)
        fwd: Literal["uri-miss", "request"] = "request" if opts.no_cache else "uri-miss"
        try:
            await upload.inspect()  # only bytes about to cost money need judging (see Upload.inspect)
        except Problem:
            await self.count_request(ctx, tenant)
            raise
        try:
            admission, bid = await self._reserve(ctx, tenant, key, opts)
        except Problem as refused:
            # Over quota, but someone else may be paying for this very image (another replica).
            free = (
                None
                if opts.no_cache or refused.code != "quota_exceeded"
                else await self._paid_by_others(ctx, key, tenant.policy.max_age_s)
            )
            if free is None:
                raise
            return free
        # From here on the request is forwarded: a failure of the call still reports the miss.
        ctx.cache = CacheStatus(hit=False, fwd=fwd)
        running = None if opts.no_cache else self.flights.get(key)
        if running is not None:  # started while we were reserving
            if _is_lease(bid):  # its leader waits for this lease: hand it back
                await self._release(bid, Outcome("abandoned"))
            await self._settle(admission.reservation, spent=False, collapsed=True)
            return await self._follow(ctx, running)
        if isinstance(bid, _FlightResult):  # another replica stored it since our lookup
            await self._settle(admission.reservation, spent=False, collapsed=True)
            ctx.cache = CacheStatus(hit=False, fwd=fwd, collapsed=True)
            return bid.entry
        upload.handed_off = True
        work = lambda: self._lead(key, tenant, upload, admission.reservation, opts, ctx=ctx, bid=bid)  # noqa: E731
        task = self.flights.start(None if opts.no_cache else key, work)
        try:
            result = await join(task, self.config.follow_timeout_s)
        except TimeoutError:  # the flight waited for another replica, then called: it goes on detached
            raise Problem("upstream_timeout", "the analysis did not finish in time") from None
        ctx.upstream_attempts = result.attempts
        ctx.upstream_s = result.upstream_s
        ctx.upstream_key = result.key
        ctx.queue_s = result.queued_s
        if result.how == "fresh":
            ctx.cache = CacheStatus(hit=False, fwd=fwd, stored=result.stored)
        else:  # another replica answered it while we held the lead locally
            ctx.cache = CacheStatus(hit=False, fwd=fwd, collapsed=True)
        return result.entry

    async def drain(self, grace_s: float, settle_s: float = 5.0) -> None:
        """Graceful shutdown: let the flights finish within ``grace_s``, then cancel the rest.

        A cancelled flight refunds its reservation (``_lead``), which needs the backends:
        the lifespan calls this before it closes them. Left to die with the event loop,
        the flights would keep the quota they reserved.
        """
        cancelled = await self.flights.drain(grace_s, settle_s)
        if cancelled:
            log.warning("shutdown: %d upstream call(s) outlived the grace period; cancelled", cancelled)

    async def lookup(self, ctx: RequestContext, tenant: Tenant, sha256: str) -> Entry | None:
        """A cached analysis by image hash, without an upload. Never billable; an answer counts
        as a cache hit (in usage and metrics), exactly like a hit on an upload."""
        found = await self.cached(ctx, tenant, sha256)
        if found is None:
            await self.count_request(ctx, tenant)
        return found

    async def cached(self, ctx: RequestContext, tenant: Tenant, sha256: str) -> Entry | None:
        """The cached answer for the image with this SHA-256, admitted and counted as a hit; None
        (and nothing admitted or counted: the caller goes on) when there is none. The hash-first
        paths use it: a lookup, and an upload whose digest header names a cached image."""
        ctx.tenant = tenant.name
        return await self._hit(ctx, tenant, self.key_for(tenant, sha256))

    async def count_request(self, ctx: RequestContext, tenant: Tenant) -> None:
        """Rate-limit a request that ended before the use case (e.g. a refused upload): every
        authenticated request counts, and over the limit the 429 wins. Costs a Redis round
        trip only on that path, never on the way to an answer."""
        ctx.tenant = tenant.name
        await self._admit(ctx, tenant, reserve=False)

    async def usage(self, ctx: RequestContext, tenant: Tenant) -> Usage:
        ctx.tenant = tenant.name
        await self._admit(ctx, tenant, reserve=False)
        try:
            return await self.limiter.usage(tenant)
        except QuotaUnavailable:
            raise Problem("quota_unavailable", "usage counters are unavailable right now", retry_after=5) from None

    def key_for(self, tenant: Tenant, sha256: str) -> str:
        return cache_key_of(self.config.cache_scope, tenant.name, sha256)

    async def forget(self, inv: Invalidation) -> None:
        """A deletion (here or on another replica): drop local copies, let nobody join a flight
        of a deleted key, and keep flights that started before it from storing their answer."""
        self._deletions += 1
        if self._flights_since:
            oldest = min(self._flights_since)
            self._deleted = {k: n for k, n in self._deleted.items() if n > oldest}
            self._deleted.update(dict.fromkeys(inv.keys, self._deletions))
            self._deleted.update(dict.fromkeys(("\0" + t for t in inv.tenants), self._deletions))
        else:
            self._deleted.clear()
        for key in inv.keys:
            self.flights.detach(key)
            self._entries.forget(key)
        if isinstance(self.cache, TieredCache):
            await self.cache.drop_local(inv.keys)

    def _deleted_since(self, seen: int, key: str, tenant: str) -> bool:
        return self._deleted.get(key, -1) > seen or self._deleted.get("\0" + tenant, -1) > seen

    # --- steps ------------------------------------------------------------------------

    async def _hit(self, ctx: RequestContext, tenant: Tenant, key: str) -> Entry | None:
        """The cached entry of ``key``, this request admitted and counted as a hit; None (nothing
        admitted or counted) when there is none. One Redis round trip either way: the local tier
        plus the admission, or the shared entry read by the admission's own script."""
        max_age_s = tenant.policy.max_age_s
        hits = self._hits
        admitted: list[Admission] = []
        if hits is not None and max_age_s is None:  # (an age limit is judged on the decoded entry)
            assert isinstance(self.cache, TieredCache)

            async def read_and_admit() -> tuple[bytes, float] | None:
                try:
                    got = await hits.probe.admit_hit(tenant, hits.entry_name(key))
                except QuotaUnavailable:
                    return None  # Redis is failing: the miss path decides (fail-open or closed)
                if got is None:
                    return None
                admitted.append(got[0])
                return got[1], got[2]

            try:
                found_raw = await self.cache.get(key, read_and_admit)
            except CacheError:
                found_raw = None
            found = None if found_raw is None else self._decoded(key, found_raw, None)
            if admitted:
                self._judge(ctx, tenant, admitted[0])
                # An unreadable entry was admitted as a hit: the miss path admits again (rare).
        else:
            found = await self._cache_get(key, max_age_s)
        if found is None:
            return None
        if not admitted:
            await self._admit(ctx, tenant, reserve=False, record="hits")
        entry, ttl = found
        ctx.cache = CacheStatus(hit=True, ttl=ttl)
        return entry

    async def _admit(self, ctx: RequestContext, tenant: Tenant, *, reserve: bool, record: Record = None) -> Admission:
        try:
            with tracing.span("facegate.admit", **{"facegate.reserve": reserve}) as traced:
                admission = await self.limiter.admit(tenant, reserve=reserve, record=record)
                tracing.set_attributes(
                    traced, **{"facegate.allowed": admission.allowed, "facegate.refused": admission.reason}
                )
        except QuotaUnavailable:
            if reserve and not self.config.quota_fail_open:
                raise Problem(
                    "quota_unavailable",
                    "quota accounting is unavailable, so no billable call is made (QUOTA_FAIL_MODE=closed)",
                    retry_after=5,
                ) from None
            now = time.monotonic()
            if now - self._fail_open_logged_at >= 10.0:  # not once per request while Redis is down
                self._fail_open_logged_at = now
                log.warning(
                    "quota backend unavailable: %s request for %s allowed (FACEGATE_QUOTA_FAIL_MODE=open; "
                    "logged at most every 10 s, each request's access log says quota_fail_open)",
                    "billable" if reserve else "free",
                    tenant.name,
                )
            ctx.outcome = "quota_fail_open"
            return Admission(allowed=True, rate=None)
        self._judge(ctx, tenant, admission)
        return admission

    def _judge(self, ctx: RequestContext, tenant: Tenant, admission: Admission) -> None:
        """Record ``admission`` for the response's headers; its refusal as the problem to answer."""
        ctx.admission = admission
        if not admission.allowed:
            if admission.reason == "rate_limited":
                raise Problem(
                    "rate_limited",
                    f"more than {tenant.limits.burst} requests at once or {tenant.limits.rate_per_s:g}/s sustained",
                    retry_after=admission.retry_after,
                )
            raise Problem(
                "quota_exceeded", "this tenant's quota of billable calls is used up", retry_after=admission.retry_after
            )

    async def _reserve(
        self, ctx: RequestContext, tenant: Tenant, key: str, opts: AnalyzeOptions
    ) -> tuple[Admission, _Bid]:
        """The quota reservation and a first bid for the lead across replicas (:meth:`_bid`), at
        once: independent commands, so inside :func:`together` one round trip (two on a Cluster,
        where they go to different nodes). A refusal gives the lease back; a failed bid refunds."""
        record: Record = "forced" if opts.no_cache else "misses"
        if opts.no_cache:  # a forced call does not coordinate: it is not joined
            return await self._admit(ctx, tenant, reserve=True, record=record), None
        admitted, bid = await asyncio.gather(
            self._admit(ctx, tenant, reserve=True, record=record),
            self._bid(key, tenant.policy.max_age_s),
            return_exceptions=True,
        )
        if isinstance(admitted, BaseException):
            if _is_lease(bid):
                await self._release(bid, Outcome("abandoned"))
            raise admitted
        if isinstance(bid, BaseException):
            await self._settle(admitted.reservation, spent=False)
            raise bid
        return admitted, bid

    async def _bid(self, key: str, max_age_s: float | None) -> _Bid:
        """One try for the lead of ``key``, with a look at the cache taken just after it (in one
        write: what a leader stored before releasing its lease is seen): the answer when it is
        there (any lease won is handed back), else the lease, ``HELD`` (another replica leads),
        or None (coordination unavailable: lead without a lease)."""
        try:
            lease, found = await asyncio.gather(self.coordinator.acquire(key), self._cache_get(key, max_age_s))
        except CacheError:
            return None
        if found is not None:
            if lease is not None:
                await self._release(lease, Outcome("abandoned"))
            return _FlightResult(found[0], "cached", False, 0, None)
        return lease if lease is not None else HELD

    async def _settle(
        self, reservation: Reservation | None, *, spent: bool, attempts: int = 0, collapsed: bool = False
    ) -> None:
        if reservation is None:
            return
        try:
            await self.limiter.settle(reservation, spent=spent, attempts=attempts, collapsed=collapsed)
        except QuotaUnavailable:
            log.error("could not %s a reservation of %s", "commit" if spent else "refund", reservation.tenant)

    async def _cache_get(self, key: str, max_age_s: float | None = None) -> tuple[Entry, float] | None:
        """The cached entry and its remaining TTL; None when absent, unreadable or older than
        ``max_age_s`` (the tenant's ``max_age_s`` policy)."""
        try:
            found = await self.cache.get(key)
        except CacheError:
            return None
        return None if found is None else self._decoded(key, found, max_age_s)

    def _decoded(self, key: str, found: tuple[bytes, float], max_age_s: float | None) -> tuple[Entry, float] | None:
        entry = self._entries.decode(key, found[0])
        if entry is None or (max_age_s is not None and entry.age_s() > max_age_s):
            return None
        return entry, found[1]

    async def _store_and_release(
        self, key: str, entry: Entry | None, data: bytes, tenant: Tenant, *, lease: Lease | None, outcome: Outcome
    ) -> bool:
        """Store ``entry`` (as ``data``, with its index line; None: nothing to store) and release the
        lease with ``outcome``, at once — inside :func:`together` one write, the store's commands
        first: Redis runs a connection's commands in order, so a replica that wins the lease after
        this release finds the entry. Whether the entry was stored."""
        if entry is None:
            await self._release(lease, outcome)
            return False
        ttl = tenant.policy.cache_ttl_s or self.config.cache_ttl_s
        if entry.verdict is not None:
            ttl = min(ttl, self.config.negative_ttl_s)
        # An entry that a tenant purge could not find must not stay: without its index line it goes.
        indexed, stored, released = await asyncio.gather(
            self.index.add(tenant.name, key, ttl),
            self.cache.set(key, data, ttl),
            self._release(lease, outcome),
            return_exceptions=True,
        )
        if isinstance(released, BaseException):
            raise released
        if isinstance(indexed, BaseException):
            if not isinstance(stored, BaseException):
                with contextlib.suppress(CacheError):
                    await self.cache.delete(key)
            if not isinstance(indexed, CacheError):
                raise indexed
            return False
        if isinstance(stored, BaseException):
            if not isinstance(stored, CacheError):
                raise stored
            return False
        return True

    async def _paid_by_others(self, ctx: RequestContext, key: str, ctx_max_age: float | None) -> Entry | None:
        """An answer that costs this tenant nothing: stored since the lookup, or in flight on
        another replica (whose leader holds the reservation that made this one fail). Only
        on the quota-refused path, so the admitted path keeps its single round trip."""
        found = await self._cache_get(key, ctx_max_age)
        if found is not None:
            ctx.cache = CacheStatus(hit=True, ttl=found[1])
            return found[0]
        running = self.flights.get(key)
        if running is not None:
            return await self._follow(ctx, running)
        try:
            outcome = await self.coordinator.wait(key, self.config.follow_timeout_s)
        except CacheError:
            return None
        entry = Entry.decode(outcome.payload) if outcome.kind == "done" else None
        if entry is not None:
            ctx.cache = CacheStatus(hit=False, fwd="uri-miss", collapsed=True)
        return entry

    async def _follow(self, ctx: RequestContext, task: asyncio.Task[_FlightResult]) -> Entry:
        ctx.cache = CacheStatus(hit=False, fwd="uri-miss", collapsed=True)
        try:
            result = await join(task, self.config.follow_timeout_s)
        except TimeoutError:
            raise Problem("upstream_timeout", "the identical request this one joined did not finish in time") from None
        return result.entry

    async def _lead(
        self,
        key: str,
        tenant: Tenant,
        upload: Upload,
        reservation: Reservation | None,
        opts: AnalyzeOptions,
        *,
        ctx: RequestContext | None = None,
        bid: _Bid = None,
    ) -> _FlightResult:
        """The flight: win leadership across replicas, call, store, settle, announce.

        Runs detached from the HTTP request, so it settles the reservation exactly once
        however it ends, and always closes the upload it was handed.
        """
        lease: Lease | None = None
        settled = False
        seen = self._deletions
        self._flights_since[seen] += 1

        report = CallReport()

        async def settle(spent: bool, *, collapsed: bool = False) -> None:
            nonlocal settled
            if not settled:
                settled = True
                if spent and self._on_spent is not None:
                    self._on_spent(tenant.name)
                if ctx is not None and reservation is not None:  # the access log's billing fields
                    ctx.billed = spent
                await self._settle(reservation, spent=spent, attempts=report.attempts, collapsed=collapsed)

        try:
            if not opts.no_cache:
                won = await self._win(key, tenant.policy.max_age_s, bid)
                if isinstance(won, _FlightResult):
                    await settle(False, collapsed=True)
                    return won
                lease = won
            payload = ImagePayload(upload.filename, upload.body.content(), upload.mime)
            try:
                async with renewing(lambda: self._renew(lease), self.config.lock_ttl_s / 3):
                    with tracing.span("facegate.upstream", **{"facegate.tenant": tenant.name}) as traced:
                        try:
                            answer = await self.upstream.call(payload, report, caller_of(tenant, opts))
                        finally:
                            tracing.set_attributes(
                                traced,
                                **{
                                    "facegate.upstream.attempts": report.attempts,
                                    "facegate.upstream.key": report.key,
                                    "facegate.upstream.queued_s": round(report.queued_s, 6),
                                },
                            )
                entry = self._entry(answer, upload)
            except UpstreamFailure as failure:
                await settle(failure.billed)
                await self._release(lease, Outcome("error", _encode_problem(failure.problem)))
                lease = None
                raise failure.problem from None
            data = entry.encode()
            policy = tenant.policy
            cacheable = (
                (entry.verdict is None or entry.verdict.cacheable)
                and not opts.no_store
                and policy.store
                # A shared entry is read by every tenant: only full answers of storing tenants go there.
                and (self.config.cache_scope == "tenant" or policy.shares_entries)
                and not self._deleted_since(seen, key, tenant.name)
            )
            stored = entry.without(policy.omit).encode() if cacheable and policy.omit else data
            # Independent Redis writes (quota, cache + index then lease + notification, the key
            # slot's release) at once: inside together() one round trip on the paid path.
            finished = await asyncio.gather(
                settle(answer.billed),
                self._store_and_release(
                    key, entry if cacheable else None, stored, tenant, lease=lease, outcome=Outcome("done", data)
                ),
                *report.finishing,
            )
            was_stored = bool(finished[1])
            lease = None
            return _FlightResult(
                entry, "fresh", was_stored, report.attempts, report.upstream_s, report.key, report.queued_s
            )
        except BaseException:
            await settle(False)
            if lease is not None:
                await self._release(lease, Outcome("abandoned"))
            raise
        finally:
            upload.close()
            self._flights_since[seen] -= 1
            if not self._flights_since[seen]:
                del self._flights_since[seen]

    async def _win(self, key: str, max_age_s: float | None, bid: _Bid = None) -> Lease | _FlightResult | None:
        """Lead ``key`` across replicas, or end up with the answer another replica produced,
        starting from the first ``bid`` when the request made one (:meth:`_reserve`).

        None means "lead without a lease": coordination is unavailable, and paying for
        a duplicate call beats failing a request that could be served.
        """
        deadline = time.monotonic() + self.config.follow_timeout_s
        while True:
            if bid is None:
                bid = await self._bid(key, max_age_s)
            if not isinstance(bid, _Held):
                return bid
            bid = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Problem("upstream_timeout", "the identical request on another replica did not finish in time")
            try:
                outcome = await self.coordinator.wait(key, min(self.config.lock_ttl_s, remaining))
            except CacheError:
                return None
            if outcome.kind == "done":
                entry = Entry.decode(outcome.payload)
                if entry is not None:
                    return _FlightResult(entry, "remote", False, 0, None)
            elif outcome.kind == "error":
                raise _decode_problem(outcome.payload)
            found = await self._cache_get(key, max_age_s)
            if found is not None:
                return _FlightResult(found[0], "cached", False, 0, None)

    async def _renew(self, lease: Lease | None) -> bool:
        renew = getattr(self.coordinator, "renew", None)
        if lease is None or renew is None:
            return False
        try:
            return bool(await renew(lease))
        except CacheError:
            return False

    async def _release(self, lease: Lease | None, outcome: Outcome) -> None:
        if lease is None:
            return
        try:
            await self.coordinator.release(lease, outcome)
        except CacheError:
            log.warning("could not release a single-flight lease; it will expire by itself")

    def _entry(self, answer: UpstreamAnswer, upload: Upload) -> Entry:
        """Check the answer is usable before it is cached or charged as a success."""
        facts = upload.facts
        assert facts is not None, "inspected before the call"
        entry = Entry.fresh(
            answer.body,
            answer.content,
            status=answer.status,
            provider="simulator" if answer.simulated else "ailabapi",
            analyzed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            image={
                "sha256": upload.sha256,
                "width": facts.width,
                "height": facts.height,
                "format": facts.format,
                "bytes": upload.size,
            },
        )
        if answer.verdict is None or answer.verdict.kind is Kind.NO_FACE:
            try:
                entry.faces(landmarks=False)  # validates the shape, and the leader's render reuses it
            except UpstreamFormatError:
                raise UpstreamFailure(
                    Problem("upstream_error", "ailabapi answered in a shape facegate does not know"),
                    retryable=False,
                    # ailabapi reported success, so it billed the call: the credit is spent (and
                    # counted against the tenant) even though the answer is unusable to us.
                    billed=answer.billed,
                    reason="bad_shape",
                ) from None
        return entry


def _encode_problem(problem: Problem) -> bytes:
    return orjson.dumps({"code": problem.code, "detail": problem.detail, "retry_after": problem.retry_after})


def _decode_problem(payload: bytes) -> Problem:
    try:
        obj = orjson.loads(payload)
        return Problem(str(obj["code"]), str(obj.get("detail") or ""), retry_after=obj.get("retry_after"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return Problem("upstream_error", "the identical request this one joined failed")
