"""One suite, two implementations of the pool's decisions: ``core.py`` (memory) and the Lua scripts (Redis).

Each scenario drives the decisions directly — enqueue, release, poll, cancel, balance —
at injected instants (the scripts take the time as an argument instead of ``TIME``), so
fairness, pacing, cooldowns and leases are checked at exact moments without sleeping;
both backends must give the same answers, which is what keeps the Lua and its Python
mirror equal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from app import redisconn
from app.redisconn import RedisClient, RedisHealth
from app.settings import Settings
from app.upstream.keys import KeySpec, PoolSpec, Secret
from app.upstream.pool import PoolSettings, RedisPool
from app.upstream.pool.core import Ask, Config, Core, DictStore, Spent
from app.upstream.pool.front import Pairs, build_config
from tests.conftest import topology_url

pytestmark = pytest.mark.redis

US = 1_000_000
T0 = 1_800_000_000 * US  # some instant, in µs


def key(name: str, *, qps: float = 1e6, conc: int = 1, tier: str = "primary", weight: float = 1.0) -> KeySpec:
    return KeySpec(name, Secret("secret-" + name), qps, conc, weight, tier)  # type: ignore[arg-type]


def config(*keys: KeySpec, gated: bool = True, lease_s: float = 5.0, **settings: Any) -> Config:
    spec = PoolSpec(tuple(keys), gated=gated)
    return build_config(spec, PoolSettings(lease_s=lease_s, **settings))


def ask(
    tenant: str,
    *,
    budget_s: float = 10.0,
    share: float = 1.0,
    batch: bool = False,
    own: str = "-",
    fallback: bool = False,
) -> Ask:
    cost = 1.0 / (share * (0.25 if batch else 1.0))
    return Ask(tenant, "b" if batch else "i", own, fallback, cost, int(budget_s * US))


class Decider:
    """The decisions at an injected time, on one backend."""

    now = T0

    async def enqueue(self, cfg: Config, ticket: str, a: Ask) -> tuple[str, Any, int, int, Pairs]:
        raise NotImplementedError

    async def release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]:
        raise NotImplementedError

    async def poll(self, cfg: Config, waiting: list[str], held: list[str]) -> tuple[int, int, Pairs, list[str]]:
        raise NotImplementedError

    async def cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]:
        raise NotImplementedError

    async def balance(self, cfg: Config, name: str, value: float | None) -> tuple[int, Pairs]:
        raise NotImplementedError

    async def reloaded(self, cfg: Config) -> Pairs:
        raise NotImplementedError

    async def snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * US)


class MemoryDecider(Decider):
    def __init__(self) -> None:
        self.store = DictStore()

    def core(self, cfg: Config) -> Core:
        return Core(self.store, cfg, self.now, "x")

    async def enqueue(self, cfg: Config, ticket: str, a: Ask) -> tuple[str, Any, int, int, Pairs]:
        return self.core(cfg).enqueue(ticket, a)

    async def release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]:
        return self.core(cfg).release(ticket, spent)

    async def poll(self, cfg: Config, waiting: list[str], held: list[str]) -> tuple[int, int, Pairs, list[str]]:
        return self.core(cfg).poll(waiting, held)

    async def cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]:
        return self.core(cfg).cancel(ticket)

    async def balance(self, cfg: Config, name: str, value: float | None) -> tuple[int, Pairs]:
        return self.core(cfg).balance(name, value)

    async def reloaded(self, cfg: Config) -> Pairs:
        return self.core(cfg).reloaded()

    async def snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        core = self.core(cfg)
        rows, waiting, by_tenant = core.snapshot()
        return core.now, waiting, [[_str(v) for v in row[:7]] + [row[7]] for row in rows], by_tenant


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDecider(Decider):
    def __init__(self, client: RedisClient, prefix: str) -> None:
        spec = PoolSpec((key("unused"),))
        self.pool = RedisPool(
            client, RedisHealth(), prefix, spec=lambda: spec, settings=PoolSettings(), clock=lambda: self.now / US
        )
        self.pool.replica = "x"

    async def enqueue(self, cfg: Config, ticket: str, a: Ask) -> tuple[str, Any, int, int, Pairs]:
        return await self.pool._enqueue(cfg, ticket, a)

    async def release(self, cfg: Config, ticket: str, spent: Spent) -> tuple[int, int, Pairs]:
        return await self.pool._release(cfg, ticket, spent)

    async def poll(self, cfg: Config, waiting: list[str], held: list[str]) -> tuple[int, int, Pairs, list[str]]:
        return await self.pool._poll(cfg, waiting, held)

    async def cancel(self, cfg: Config, ticket: str) -> tuple[str, str, int]:
        return await self.pool._cancel(cfg, ticket)

    async def balance(self, cfg: Config, name: str, value: float | None) -> tuple[int, Pairs]:
        r = await self.pool._run("balance", cfg, [name, "" if value is None else repr(float(value))])
        return int(r[0]), [(_str(r[i]), _str(r[i + 1]), int(r[i + 2])) for i in range(1, len(r) - 2, 3)]

    async def reloaded(self, cfg: Config) -> Pairs:
        r = await self.pool._run("reloaded", cfg, [])
        return [(_str(r[i]), _str(r[i + 1]), int(r[i + 2])) for i in range(0, len(r) - 2, 3)]

    async def snapshot(self, cfg: Config) -> tuple[int, int, list[list[Any]], dict[str, int]]:
        now, waiting, rows, by_tenant = await self.pool._snapshot(cfg)
        return now, waiting, [[_str(v) for v in row[:7]] + [int(row[7])] for row in rows], by_tenant


@pytest.fixture(params=["memory", "redis", "redis-cluster", "redis-sentinel"])
async def d(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Decider]:
    """The in-memory decisions, and the Lua on each Redis topology (a production client)."""
    if request.param == "memory":
        yield MemoryDecider()
        return
    url = topology_url(request, request.param.partition("-")[2] or "single")
    client = redisconn.connect(Settings(redis_url=url, _env_file=None))
    try:
        yield RedisDecider(client, prefix)
    finally:
        await client.aclose()


async def hold(d: Decider, cfg: Config, ticket: str, tenant: str = "a", **kw: Any) -> str:
    d.advance(0.001)  # keys are paced: not two starts in the same µs
    status, value, *_ = await d.enqueue(cfg, ticket, ask(tenant, **kw))
    assert status == "granted", (status, value)
    return str(value)


async def drain(d: Decider, cfg: Config, first: str, rounds: int) -> list[str]:
    """Release the held slot ``first``, then each newly granted one in turn: the grant order."""
    order: list[str] = []
    current = first
    for _ in range(rounds):
        d.advance(0.001)
        _, _, granted = await d.release(cfg, current, Spent("-"))
        if not granted:
            break
        assert len(granted) == 1, granted
        current = granted[0][0]
        order.append(current)
    return order


# --- fairness -------------------------------------------------------------------------------


async def test_a_new_tenant_goes_ahead_of_a_backlog(d: Decider) -> None:
    cfg = config(key("k"))
    await hold(d, cfg, "x:a1", "a")
    for ticket in ("x:a2", "x:a3", "x:a4"):
        assert (await d.enqueue(cfg, ticket, ask("a")))[0] == "queued"
    for ticket in ("x:b1", "x:b2"):
        assert (await d.enqueue(cfg, ticket, ask("b")))[0] == "queued"
    assert await drain(d, cfg, "x:a1", 10) == ["x:b1", "x:a2", "x:b2", "x:a3", "x:a4"]


async def test_shares_weigh_the_order(d: Decider) -> None:
    cfg = config(key("k"))
    await hold(d, cfg, "x:0", "z")
    for i in range(6):
        await d.enqueue(cfg, f"x:a{i}", ask("a", share=2))
        await d.enqueue(cfg, f"x:b{i}", ask("b", share=1))
    order = await drain(d, cfg, "x:0", 9)
    assert sum(t.startswith("x:a") for t in order) == 6
    assert sum(t.startswith("x:b") for t in order) == 3


async def test_batch_moves_slower_but_never_starves(d: Decider) -> None:
    cfg = config(key("k"))
    await hold(d, cfg, "x:0", "z")
    for i in range(10):
        await d.enqueue(cfg, f"x:i{i:02d}", ask("inter"))
    for i in range(3):
        await d.enqueue(cfg, f"x:b{i}", ask("bulk", batch=True))
    order = await drain(d, cfg, "x:0", 13)
    assert len(order) == 13
    # Weight 1/4: the batch tenant's calls come at positions 1, 5 and 9 of the fair order.
    assert [i for i, t in enumerate(order) if t.startswith("x:b")] == [0, 5, 10]


async def test_a_lone_tenant_takes_every_slot(d: Decider) -> None:
    cfg = config(key("k1", conc=2), key("k2", conc=2))
    keys = [await hold(d, cfg, f"x:{i}", "solo") for i in range(4)]
    assert sorted(keys) == ["k1", "k1", "k2", "k2"]
    assert (await d.enqueue(cfg, "x:5", ask("solo")))[0] == "queued"


# --- keys -------------------------------------------------------------------------------------


async def test_least_loaded_key_relative_to_its_limit(d: Decider) -> None:
    cfg = config(key("p1", conc=2), key("p2", conc=1), key("r", conc=5, tier="reserve"))
    assert [await hold(d, cfg, f"x:{i}") for i in range(3)] == ["p1", "p2", "p1"]
    status, *_ = await d.enqueue(cfg, "x:4", ask("a"))
    assert status == "queued", "the reserve key is not overflow capacity"


async def test_reserve_keys_take_over_when_no_primary_can(d: Decider) -> None:
    cfg = config(key("p", conc=1), key("r", conc=1, tier="reserve"))
    await hold(d, cfg, "x:1")
    assert (await d.enqueue(cfg, "x:2", ask("a")))[0] == "queued"
    d.advance(0.01)
    _, _, granted = await d.release(cfg, "x:1", Spent("p", "exhausted", code="ERROR_NOT_ENOUGH_CREDITS"))
    assert granted == [("x:2", "r", 0)]


async def test_pacing_spaces_starts_per_key(d: Decider) -> None:
    cfg = config(key("k", qps=10, conc=10))  # starts 100 ms apart
    await hold(d, cfg, "x:1")
    status, _, hint, _, _ = await d.enqueue(cfg, "x:2", ask("a"))
    assert status == "queued"
    assert hint == 50_000  # granted up to 50 ms (the horizon) before its start
    d.advance(0.049)
    assert (await d.poll(cfg, ["x:2"], ["x:1"]))[2] == []
    d.advance(0.001)
    assert (await d.poll(cfg, ["x:2"], ["x:1"]))[2] == [("x:2", "k", 50_000)], "it starts 100 ms after the first"


async def test_a_burst_of_paced_calls_is_granted_at_once_with_staggered_starts(d: Decider) -> None:
    cfg = config(key("k", qps=1000, conc=100))  # starts 1 ms apart
    results = [await d.enqueue(cfg, f"x:{i:03d}", ask("a")) for i in range(60)]  # all at one instant
    starts = [next(start for t, _, start in r[4] if t == f"x:{i:03d}") for i, r in enumerate(results[:51])]
    assert [r[0] for r in results] == ["granted"] * 51 + ["queued"] * 9
    assert starts == [i * 1000 for i in range(51)], "no two starts closer than the key's pace"


async def test_two_keys_pace_independently(d: Decider) -> None:
    cfg = config(key("a", qps=5, conc=5), key("b", qps=5, conc=5))
    assert [await hold(d, cfg, f"x:{i}") for i in range(2)] == ["a", "b"]
    assert (await d.enqueue(cfg, "x:3", ask("t")))[0] == "queued"


# --- health ----------------------------------------------------------------------------------


async def test_a_throttled_key_cools_down_and_longer_cooldowns_win(d: Decider) -> None:
    cfg = config(key("k", conc=5))
    await hold(d, cfg, "x:1")
    await hold(d, cfg, "x:2")
    throttled_at = d.now
    await d.release(cfg, "x:1", Spent("k", "throttled", cool_us=3 * US, code="EXCEEDING_LIMITS"))
    await d.release(cfg, "x:2", Spent("k", "throttled", cool_us=1 * US, code="EXCEEDING_LIMITS"))
    status, retry, *_ = await d.enqueue(cfg, "x:3", ask("a", budget_s=2))
    assert (status, retry) == ("nokey", 3 * US), "the shorter cooldown did not shorten the first"
    status, *_ = await d.enqueue(cfg, "x:4", ask("a", budget_s=5))
    assert status == "queued", "a cooldown that ends within the budget is waited for"
    d.advance(2.9)
    assert (await d.poll(cfg, ["x:4"], []))[2] == []
    d.now = throttled_at + 3 * US
    assert (await d.poll(cfg, ["x:4"], []))[2] == [("x:4", "k", 0)]


async def test_default_cooldown_without_retry_after(d: Decider) -> None:
    cfg = config(key("k", conc=5), cooldown_s=2)
    await hold(d, cfg, "x:1")
    await d.release(cfg, "x:1", Spent("k", "throttled", code="EXCEEDING_LIMITS"))
    assert (await d.enqueue(cfg, "x:2", ask("a", budget_s=1)))[:2] == ("nokey", 2 * US)


async def test_exhausted_until_a_positive_balance(d: Decider) -> None:
    cfg = config(key("a", conc=5), key("b", conc=5), recheck_s=30)
    await hold(d, cfg, "x:1")
    await d.release(cfg, "x:1", Spent("a", "exhausted", code="ERROR_NOT_ENOUGH_CREDITS"))
    assert await hold(d, cfg, "x:2") == "b"
    await d.balance(cfg, "a", 0)
    assert await hold(d, cfg, "x:3") == "b"
    await d.balance(cfg, "a", 50)
    assert await hold(d, cfg, "x:4") == "a"
    _, _, rows, _ = await d.snapshot(cfg)
    assert rows[0][0] == "" and float(rows[0][3]) == 50 and rows[0][5] == "0"


async def test_a_zero_balance_takes_a_key_out_before_any_call_fails(d: Decider) -> None:
    cfg = config(key("a", conc=5), key("b", conc=5))
    await d.balance(cfg, "a", 0)
    assert [await hold(d, cfg, f"x:{i}") for i in range(2)] == ["b", "b"]


async def test_all_exhausted_is_refused_at_once_with_the_next_check(d: Decider) -> None:
    cfg = config(key("a", conc=5), recheck_s=30)
    await d.balance(cfg, "a", 0)
    status, retry, *_ = await d.enqueue(cfg, "x:1", ask("t"))
    assert (status, retry) == ("nokey", 30 * US)


async def test_disabled_until_the_keys_file_changes(d: Decider) -> None:
    cfg = config(key("a", conc=5))
    await hold(d, cfg, "x:1")
    await d.release(cfg, "x:1", Spent("a", "disabled", code="ERROR_USER_NOT_EXISTS"))
    assert (await d.enqueue(cfg, "x:2", ask("t")))[0] == "nokey"
    await d.balance(cfg, "a", 100)  # a balance does not bring a refused key back
    assert (await d.enqueue(cfg, "x:3", ask("t")))[0] == "nokey"
    await d.reloaded(cfg)
    assert await hold(d, cfg, "x:4") == "a"


async def test_a_pool_of_one_is_never_gated(d: Decider) -> None:
    cfg = config(key("default", conc=5), gated=False)
    await hold(d, cfg, "x:1")
    await d.release(cfg, "x:1", Spent("default", "throttled", cool_us=30 * US, code="EXCEEDING_LIMITS"))
    await hold(d, cfg, "x:2")
    await d.release(cfg, "x:2", Spent("default", "disabled", code="ERROR_USER_NOT_EXISTS"))
    assert await hold(d, cfg, "x:3") == "default"
    _, _, rows, _ = await d.snapshot(cfg)
    assert rows[0][0] == "disabled", "still shown to the operator"
    await d.release(cfg, "x:3", Spent("default", "ok", code="ok"))
    _, _, rows, _ = await d.snapshot(cfg)
    assert rows[0][0] == "", "an answer shows the key works again"


# --- own keys (BYO) ------------------------------------------------------------------------------


async def test_a_dedicated_key_serves_only_its_tenant(d: Decider) -> None:
    cfg = config(key("shared", conc=1), key("team", conc=5, tier="dedicated"))
    await hold(d, cfg, "x:1", "other")
    assert (await d.enqueue(cfg, "x:2", ask("other")))[0] == "queued", "never on the dedicated key"
    assert await hold(d, cfg, "x:3", "x", own="team") == "team"


async def test_own_key_unusable_refuses_unless_fallback(d: Decider) -> None:
    cfg = config(key("shared", conc=5), key("team", conc=5, tier="dedicated"))
    await d.balance(cfg, "team", 0)
    assert (await d.enqueue(cfg, "x:1", ask("x", own="team")))[0] == "nokey"
    assert await hold(d, cfg, "x:2", "x", own="team", fallback=True) == "shared"
    assert (await d.enqueue(cfg, "x:3", ask("x", own="nosuchkey")))[0] == "nokey"


# --- bounds and refusing at once ---------------------------------------------------------------


async def test_queue_bounds_per_tenant_and_overall(d: Decider) -> None:
    cfg = config(key("k"), queue_per_tenant=2, queue_max=3)
    await hold(d, cfg, "x:0", "z")
    assert [(await d.enqueue(cfg, f"x:a{i}", ask("a")))[0] for i in range(3)] == ["queued", "queued", "tenant"]
    assert (await d.enqueue(cfg, "x:b1", ask("b")))[0] == "queued"
    assert (await d.enqueue(cfg, "x:c1", ask("c")))[0] == "full"


async def test_what_cannot_start_in_time_is_refused_at_once(d: Decider) -> None:
    cfg = config(key("k", qps=1, conc=10))  # one start per second
    await hold(d, cfg, "x:a0", "a", budget_s=2)
    statuses = [(await d.enqueue(cfg, f"x:a{i}", ask("a", budget_s=2)))[0] for i in range(1, 5)]
    assert statuses == ["queued", "queued", "queued", "late"], "alone: the pool is full (503)"
    assert (await d.enqueue(cfg, "x:b1", ask("b", budget_s=2)))[0] == "queued", "a newcomer still fits"
    status, retry, *_ = await d.enqueue(cfg, "x:a5", ask("a", budget_s=2))
    assert status == "tenant", "with others waiting, its own backlog is what makes it late (429)"
    assert retry > 0


async def test_a_cancelled_waiter_gives_back_its_place_and_its_tag(d: Decider) -> None:
    cfg = config(key("k"))
    await hold(d, cfg, "x:0", "z")
    await d.enqueue(cfg, "x:a1", ask("a"))
    await d.enqueue(cfg, "x:a2", ask("a"))
    assert await d.cancel(cfg, "x:a2") == ("dropped", "", 0)
    await d.enqueue(cfg, "x:b1", ask("b"))
    await d.enqueue(cfg, "x:a3", ask("a"))
    assert await drain(d, cfg, "x:0", 5) == ["x:a1", "x:b1", "x:a3"]
    assert await d.cancel(cfg, "x:zz") == ("gone", "", 0)


# --- leases ----------------------------------------------------------------------------------------


async def test_slots_and_places_of_a_silent_replica_expire(d: Decider) -> None:
    cfg = config(key("k"), lease_s=1)
    await hold(d, cfg, "x:held")
    await d.enqueue(cfg, "y:wait", ask("b"))
    d.advance(0.9)
    await d.poll(cfg, [], ["x:held"])  # renewed once...
    d.advance(0.9)
    _, _, mine, lost = await d.poll(cfg, ["y:wait"], [])
    assert mine == [] and lost == [], "still held (renewed); the waiter renewed itself"
    d.advance(1.1)  # ... then its replica went silent
    _, _, mine, _ = await d.poll(cfg, ["y:wait"], [])
    assert mine == [("y:wait", "k", 0)]
    _, waiting, rows, _ = await d.snapshot(cfg)
    assert (waiting, rows[0][7]) == (0, 1)


async def test_an_unrenewed_waiter_is_dropped(d: Decider) -> None:
    cfg = config(key("k"), lease_s=1)
    await hold(d, cfg, "x:held")
    await d.enqueue(cfg, "y:wait", ask("b"))
    d.advance(0.5)
    await d.poll(cfg, [], ["x:held"])
    d.advance(0.6)
    _, depth, _, _ = await d.poll(cfg, ["x:other"], ["x:held"])
    assert depth == 0
    _, _, _, by_tenant = await d.snapshot(cfg)
    assert by_tenant == {}


def test_all_structures_share_one_cluster_slot() -> None:
    pool = RedisPool.__new__(RedisPool)
    RedisPool.__init__(
        pool, aioredis.Redis(), RedisHealth(), "fg", spec=lambda: PoolSpec((key("k"),)), settings=PoolSettings()
    )
    assert len({key_slot(k.encode()) for k in [*pool.keys, pool._poll_prefix + "k"]}) == 1
