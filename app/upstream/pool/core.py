"""The pool's decisions, written once over a tiny Redis-like store: fair order, key choice, health.

``lua/_pool.lua`` does exactly this, operation for operation (same structures, same
arithmetic, same order), so the in-memory backend (this module over :class:`DictStore`)
and the Redis backend (the scripts, atomic in Redis) decide alike; one test suite runs
against both. Keep them equal: a change here is a change there.

The structures (Redis: one hash tag, so they live on one Cluster slot):

========  =====  ===========================================================================
slots     zset   ticket -> lease expiry (µs): the slots held (granted calls)
granted   hash   ticket -> ``key|start`` (its start time, µs: a paced start may lie ahead), every slot
tat       hash   key name -> the earliest next start (µs, GCRA pacing); ``*`` = the pool's
health    hash   ``<key>:state`` (exhausted|disabled), ``:cool``, ``:recheck``, ``:why``,
                 ``:bal``, ``:bal_at``, ``:billed`` (calls billed since the last balance)
wait      zset   ticket -> start tag (fair order: start-time fair queueing)
winfo     hash   ticket -> ``tenant|class|key|fallback|S|F|deadline``
wlease    zset   ticket -> lease expiry of the waiter (min of its deadline and its lease)
flows     hash   ``f:<tenant>|<class>`` -> last finish tag, ``n:<tenant>`` -> waiting calls,
                 ``V`` -> virtual time, ``lat`` -> EWMA of a call's duration (µs)
========  =====  ===========================================================================

Fairness is start-time fair queueing (Goyal et al.): a call of flow f (tenant, class)
arriving at virtual time V gets the start tag ``S = max(V, F_f)`` and advances its flow
to ``F_f = S + 1/weight``; the smallest start tag that some free key can serve goes
first, and V becomes that tag. A tenant alone takes everything (work-conserving), two
busy tenants alternate in proportion to their shares, and a batch call (weight 1/4)
still moves forward — nothing starves. A call that leaves unserved gives its tag back;
when nothing waits and nothing is in flight, the tags start over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SLOTS, GRANTED, TAT, HEALTH, WAIT, WINFO, WLEASE, FLOWS = (
    "slots",
    "granted",
    "tat",
    "health",
    "wait",
    "winfo",
    "wlease",
    "flows",
)
STRUCTURES = (SLOTS, GRANTED, TAT, HEALTH, WAIT, WINFO, WLEASE, FLOWS)
TIER_NUMBER = {"primary": 0, "reserve": 1, "dedicated": 2}


def fmt(x: float) -> str:
    """A tag as stored (``string.format('%.17g')`` in Lua): round-trips exactly."""
    return "%.17g" % x  # noqa: UP031 - the same format string as the Lua side


@dataclass(frozen=True, slots=True)
class KeyCfg:
    name: str
    interval_us: float
    conc: int
    weight: float
    tier: int  # 0 primary, 1 reserve, 2 dedicated


@dataclass(frozen=True, slots=True)
class Config:
    """What every decision needs, sent with each script call (a reload applies at once)."""

    gated: bool
    pool_conc: int  # 0 = no pool-wide cap
    pool_interval_us: float  # 0 = no pool-wide pacing
    lease_us: int
    max_total: int  # 0 = unbounded
    max_tenant: int
    cool_us: int  # a throttled key's cooldown when ailabapi gives no Retry-After
    recheck_us: int  # an exhausted key's next balance check
    scan: int
    lat0_us: int
    keys: tuple[KeyCfg, ...]
    #: A paced key may be granted this far ahead of its next start (the call then waits for it):
    #: one dispatch can hand out many paced starts instead of one per heartbeat.
    horizon_us: int = 50_000

    def key(self, name: str) -> KeyCfg | None:
        for k in self.keys:
            if k.name == name:
                return k
        return None

    def argv(self) -> tuple[str, str]:
        pool = ",".join(
            str(v)
            for v in (
                1 if self.gated else 0,
                self.pool_conc,
                f"{self.pool_interval_us:.3f}",
                self.lease_us,
                self.max_total,
                self.max_tenant,
                self.cool_us,
                self.recheck_us,
                self.scan,
                self.lat0_us,
                self.horizon_us,
            )
        )
        keys = "|".join(f"{k.name},{k.interval_us:.3f},{k.conc},{k.weight!r},{k.tier}" for k in self.keys)
        return pool, keys


def interval_us(qps: float) -> float:
    """µs between starts at ``qps``, as the decimal string both sides parse (0 = unpaced)."""
    return float(f"{1_000_000 / qps:.3f}") if qps > 0 else 0.0


class DictStore:
    """The few Redis commands the pool uses, over dicts (one process; no awaits, so atomic)."""

    def __init__(self) -> None:
        self.h: dict[str, dict[str, str]] = {name: {} for name in STRUCTURES}
        self.z: dict[str, dict[str, float]] = {name: {} for name in STRUCTURES}

    def hget(self, key: str, field: str) -> str | None:
        return self.h[key].get(field)

    def hmget(self, key: str, fields: Iterable[str]) -> list[str | None]:
        table = self.h[key]
        return [table.get(f) for f in fields]

    def hset(self, key: str, field: str, value: str) -> None:
        self.h[key][field] = value

    def hdel(self, key: str, field: str) -> None:
        self.h[key].pop(field, None)

    def hgetall(self, key: str) -> dict[str, str]:
        return dict(self.h[key])

    def hincrby(self, key: str, field: str, by: int) -> int:
        value = int(self.h[key].get(field) or 0) + by
        self.h[key][field] = str(value)
        return value

    def delete(self, key: str) -> None:
        self.h[key].clear()
        self.z[key].clear()

    def zadd(self, key: str, score: float, member: str, *, xx: bool = False) -> None:
        if xx and member not in self.z[key]:
            return
        self.z[key][member] = score

    def zscore(self, key: str, member: str) -> float | None:
        return self.z[key].get(member)

    def zrem(self, key: str, member: str) -> None:
        self.z[key].pop(member, None)

    def zcard(self, key: str) -> int:
        return len(self.z[key])

    def _sorted(self, key: str) -> list[tuple[float, str]]:
        return sorted((score, member) for member, score in self.z[key].items())

    def zrange(self, key: str, count: int) -> list[str]:
        return [member for _, member in self._sorted(key)[:count]]

    def zupto(self, key: str, limit: float) -> list[str]:
        """Members with score <= limit, in order (ZRANGEBYSCORE -inf limit)."""
        return [member for score, member in self._sorted(key) if score <= limit]

    def zcount_below(self, key: str, limit: float) -> int:
        """Members with score < limit (ZCOUNT -inf (limit)."""
        return sum(1 for score in self.z[key].values() if score < limit)


@dataclass(frozen=True, slots=True)
class Ask:
    """One call asking for a slot (the enqueue script's arguments)."""

    tenant: str
    cls: str  # "i" interactive, "b" batch
    key: str  # its own key, "-" = none
    fallback: bool
    cost: float
    budget_us: int


@dataclass(frozen=True, slots=True)
class Spent:
    """How a slot is given back (the release script's arguments); ``key`` "-" = nothing learned."""

    key: str
    effect: str = "-"  # ok | throttled | exhausted | disabled | -
    cool_us: int = 0
    billed: bool = False
    dur_us: int = 0
    code: str = "-"


@dataclass(slots=True)
class Waiter:
    tenant: str
    cls: str  # "i" interactive, "b" batch
    key: str  # "-" = none
    fallback: bool
    s: str
    f: str
    deadline: int

    @classmethod
    def parse(cls, info: str) -> Waiter:
        tenant, klass, key, fallback, s, f, deadline = info.split("|")
        return cls(tenant, klass, key, fallback == "1", s, f, int(deadline))

    def encode(self) -> str:
        return f"{self.tenant}|{self.cls}|{self.key}|{1 if self.fallback else 0}|{self.s}|{self.f}|{self.deadline}"

    @property
    def flow(self) -> str:
        return f"f:{self.tenant}|{self.cls}"


@dataclass(slots=True)
class State:
    """What one decision reads once: slots in use, pacing, health."""

    inflight: dict[str, int]
    total: int
    tat: dict[str, int]
    pool_tat: int
    state: dict[str, str]
    cool: dict[str, int]
    recheck: dict[str, int]


# --- the decisions ------------------------------------------------------------------------


class Core:
    """One decision's worth of the algorithm, over ``store`` at time ``now`` (µs)."""

    def __init__(self, store: DictStore, cfg: Config, now: int, replica: str = "") -> None:
        self.r = store
        self.cfg = cfg
        self.now = now
        self.replica = replica
        self.woken: set[str] = set()  # replicas whose waiters got slots (to be told)

    # -- bookkeeping

    def drop_waiter(self, ticket: str, *, rollback: bool) -> None:
        info = self.r.hget(WINFO, ticket)
        self.r.zrem(WAIT, ticket)
        self.r.zrem(WLEASE, ticket)
        self.r.hdel(WINFO, ticket)
        if info is None:
            return
        w = Waiter.parse(info)
        n = self.r.hincrby(FLOWS, "n:" + w.tenant, -1)
        if n <= 0:
            self.r.hdel(FLOWS, "n:" + w.tenant)
        if rollback:
            # Unserved work is not charged: the flow's tag goes back (all of it, once nothing waits).
            if n <= 0:
                self.r.hdel(FLOWS, w.flow)
            elif self.r.hget(FLOWS, w.flow) == w.f:
                self.r.hset(FLOWS, w.flow, w.s)

    def expire(self) -> None:
        for ticket in self.r.zupto(SLOTS, self.now):
            self.r.zrem(SLOTS, ticket)
            self.r.hdel(GRANTED, ticket)
        for ticket in self.r.zupto(WLEASE, self.now):
            self.drop_waiter(ticket, rollback=True)

    def load(self) -> State:
        inflight: dict[str, int] = {}
        total = 0
        for value in self.r.hgetall(GRANTED).values():
            name = value.split("|", 1)[0]
            inflight[name] = inflight.get(name, 0) + 1
            total += 1
        names = [k.name for k in self.cfg.keys]
        tats = self.r.hmget(TAT, ["*", *names])
        fields: list[str] = []
        for name in names:
            fields += [name + ":state", name + ":cool", name + ":recheck"]
        h = self.r.hmget(HEALTH, fields)
        st = State(inflight, total, {}, int(tats[0] or 0), {}, {}, {})
        for i, name in enumerate(names):
            st.tat[name] = int(tats[i + 1] or 0)
            st.state[name] = h[3 * i] or ""
            st.cool[name] = int(h[3 * i + 1] or 0)
            st.recheck[name] = int(h[3 * i + 2] or 0)
        return st

    def health(self, st: State, k: KeyCfg) -> str:
        """ok, cool (back soon) or out (exhausted/disabled); always ok when not gated."""
        if not self.cfg.gated:
            return "ok"
        if st.state[k.name] in ("disabled", "exhausted"):
            return "out"
        if st.cool[k.name] > self.now:
            return "cool"
        return "ok"

    def candidates(self, st: State, w: Waiter) -> list[KeyCfg]:
        """The keys this waiter may use now: its own key, else healthy primaries, else reserves."""
        if w.key != "-":
            own = self.cfg.key(w.key)
            if own is not None and self.health(st, own) != "out":
                return [own]
            if not w.fallback:
                return []
        primaries: list[KeyCfg] = []
        reserves: list[KeyCfg] = []
        cooling: list[KeyCfg] = []
        for k in self.cfg.keys:
            if k.tier < 2:
                h = self.health(st, k)
                if h == "ok":
                    (primaries if k.tier == 0 else reserves).append(k)
                elif h == "cool":
                    cooling.append(k)
        if primaries:
            return primaries
        if reserves:
            return reserves
        return cooling

    def pool_free(self, st: State) -> bool:
        if self.cfg.pool_conc > 0 and st.total >= self.cfg.pool_conc:
            return False
        return st.pool_tat <= self.now + self.cfg.horizon_us

    def free(self, st: State, k: KeyCfg) -> bool:
        return (
            self.health(st, k) == "ok"
            and st.inflight.get(k.name, 0) < k.conc
            and st.tat[k.name] <= self.now + self.cfg.horizon_us
        )

    def any_free(self, st: State) -> bool:
        return self.pool_free(st) and any(self.free(st, k) for k in self.cfg.keys)

    def pick(self, st: State, cands: Sequence[KeyCfg]) -> KeyCfg | None:
        """The least loaded free key relative to its limit and weight (first in the file on a tie)."""
        if not self.pool_free(st):
            return None
        best: KeyCfg | None = None
        best_load = 0.0
        for k in cands:
            if self.free(st, k):
                load = st.inflight.get(k.name, 0) / (k.conc * k.weight)
                if best is None or load < best_load:
                    best, best_load = k, load
        return best

    def grant(self, st: State, ticket: str, w: Waiter, k: KeyCfg, v: float) -> tuple[float, int]:
        """The slot, with its start: now, or the key's (and the pool's) next paced start."""
        start = max(self.now, st.tat[k.name])
        if self.cfg.pool_interval_us > 0:
            start = max(start, st.pool_tat)
        self.r.zadd(SLOTS, self.now + self.cfg.lease_us, ticket)
        self.r.hset(GRANTED, ticket, f"{k.name}|{start}")
        st.inflight[k.name] = st.inflight.get(k.name, 0) + 1
        st.total += 1
        tat = math.ceil(start + k.interval_us)
        st.tat[k.name] = tat
        self.r.hset(TAT, k.name, "%d" % tat)  # noqa: UP031 - as in Lua
        if self.cfg.pool_interval_us > 0:
            st.pool_tat = math.ceil(start + self.cfg.pool_interval_us)
            self.r.hset(TAT, "*", "%d" % st.pool_tat)  # noqa: UP031
        s = float(w.s)
        if s > v:
            v = s
            self.r.hset(FLOWS, "V", fmt(v))
        self.drop_waiter(ticket, rollback=False)
        replica = ticket.split(":", 1)[0]
        if replica != self.replica:
            self.woken.add(replica)
        return v, start

    def dispatch(self, st: State) -> list[tuple[str, str, int]]:
        """Grant slots to waiters in fair order while keys have room: (ticket, key, µs until its start)."""
        granted: list[tuple[str, str, int]] = []
        if self.any_free(st):
            v = float(self.r.hget(FLOWS, "V") or 0)
            tickets = self.r.zrange(WAIT, self.cfg.scan)
            infos = self.r.hmget(WINFO, tickets)
            for ticket, info in zip(tickets, infos, strict=True):
                if not self.any_free(st):
                    break
                if info is None:
                    continue
                w = Waiter.parse(info)
                k = self.pick(st, self.candidates(st, w))
                if k is not None:
                    v, start = self.grant(st, ticket, w, k, v)
                    granted.append((ticket, k.name, start - self.now))
        if self.r.zcard(WAIT) == 0 and self.r.zcard(SLOTS) == 0:  # idle: the tags start over
            lat = self.r.hget(FLOWS, "lat")
            self.r.delete(FLOWS)
            if lat is not None:
                self.r.hset(FLOWS, "lat", lat)
        return granted

    def hint(self, st: State) -> int:
        """µs until some key may have room again by itself (pacing, cooldown); 0 = only on a release."""
        best = 0
        for k in self.cfg.keys:
            if self.cfg.gated and st.state[k.name] in ("disabled", "exhausted"):
                continue
            t = 0
            if self.cfg.gated and st.cool[k.name] > self.now:
                t = st.cool[k.name]
            if st.inflight.get(k.name, 0) < k.conc and st.tat[k.name] - self.cfg.horizon_us > self.now:
                t = max(t, st.tat[k.name] - self.cfg.horizon_us)
            if t > self.now and (best == 0 or t < best):
                best = t
        if best > 0 and st.pool_tat - self.cfg.horizon_us > best:
            best = st.pool_tat - self.cfg.horizon_us
        return best - self.now if best > 0 else 0

    def rate(self, st: State, cands: Sequence[KeyCfg]) -> float:
        """Calls per µs the candidate keys serve (paced by qps, bounded by slots / call time)."""
        lat = float(self.r.hget(FLOWS, "lat") or self.cfg.lat0_us)
        r = 0.0
        for k in cands:
            if self.health(st, k) != "out":
                per = k.conc / lat
                if k.interval_us > 0:
                    per = min(per, 1 / k.interval_us)
                r += per
        if self.cfg.pool_interval_us > 0:
            r = min(r, 1 / self.cfg.pool_interval_us)
        if self.cfg.pool_conc > 0:
            r = min(r, self.cfg.pool_conc / lat)
        return r

    def earliest_return(self, st: State, w: Waiter) -> int:
        """µs until a key this waiter may use could serve again (0: unknown)."""
        names: list[KeyCfg] = []
        own = self.cfg.key(w.key) if w.key != "-" else None
        if own is not None:
            names.append(own)
        if w.key == "-" or w.fallback:
            names += [k for k in self.cfg.keys if k.tier < 2]
        best = 0
        for k in names:
            t = 0
            if st.state[k.name] == "exhausted":
                t = st.recheck[k.name] if st.recheck[k.name] > self.now else self.now + self.cfg.recheck_us
            elif st.state[k.name] != "disabled":
                t = max(st.cool[k.name], self.now)
            if t > 0 and (best == 0 or t < best):
                best = t
        return best - self.now if best > 0 else 0

    # -- entry points (each one script on the Redis side)

    def enqueue(self, ticket: str, ask: Ask) -> tuple[str, Any, int, int, list[tuple[str, str, int]]]:
        """(status, key name | retry µs, hint µs, depth, grants made): granted, queued, or refused at once."""
        tenant, cls, cost, budget_us = ask.tenant, ask.cls, ask.cost, ask.budget_us
        self.expire()
        st = self.load()
        w = Waiter(tenant, cls, ask.key, ask.fallback, "0", "0", self.now + budget_us)
        cands = self.candidates(st, w)
        depth = self.r.zcard(WAIT)
        if not cands:
            return "nokey", self.earliest_return(st, w), 0, depth, []
        wait0 = 0
        if all(self.health(st, k) == "cool" for k in cands):
            wait0 = min(st.cool[k.name] for k in cands) - self.now
            if wait0 > budget_us:
                return "nokey", wait0, 0, depth, []
        rate = self.rate(st, cands)
        n = int(self.r.hget(FLOWS, "n:" + tenant) or 0)
        if self.cfg.max_tenant > 0 and n >= self.cfg.max_tenant:
            return "tenant", math.ceil(n / rate), 0, depth, []
        if self.cfg.max_total > 0 and depth >= self.cfg.max_total:
            return "full", math.ceil(depth / rate), 0, depth, []
        v = float(self.r.hget(FLOWS, "V") or 0)
        s = max(v, float(self.r.hget(FLOWS, "f:" + tenant + "|" + cls) or 0))
        est = wait0 + self.r.zcount_below(WAIT, s) / rate
        if est > budget_us:
            base = wait0 + self.r.zcount_below(WAIT, v) / rate
            # Late because of its own backlog while others wait too: its share is full (429). Alone,
            # or late even without a backlog of its own: the pool is (503).
            if n > 0 and depth > n and base <= budget_us:
                return "tenant", math.ceil(est - budget_us), 0, depth, []
            return "late", math.ceil(est - budget_us), 0, depth, []
        w.s, w.f = fmt(s), fmt(s + cost)
        self.r.zadd(WAIT, s, ticket)
        self.r.hset(WINFO, ticket, w.encode())
        self.r.zadd(WLEASE, min(w.deadline, self.now + self.cfg.lease_us), ticket)
        self.r.hset(FLOWS, w.flow, w.f)
        self.r.hincrby(FLOWS, "n:" + tenant, 1)
        granted = self.dispatch(st)
        depth = self.r.zcard(WAIT)
        status, value = "queued", ""
        for t, name, _ in granted:
            if t == ticket:
                status, value = "granted", name
        return status, value, self.hint(st), depth, granted

    def renew(self, waiting: Sequence[str], held: Sequence[str]) -> None:
        lease_end = self.now + self.cfg.lease_us
        for ticket in waiting:
            info = self.r.hget(WINFO, ticket)
            if info is not None:
                self.r.zadd(WLEASE, min(Waiter.parse(info).deadline, lease_end), ticket, xx=True)
            else:
                self.r.zadd(SLOTS, lease_end, ticket, xx=True)
        for ticket in held:
            self.r.zadd(SLOTS, lease_end, ticket, xx=True)

    def poll(
        self, waiting: Sequence[str], held: Sequence[str]
    ) -> tuple[int, int, list[tuple[str, str, int]], list[str]]:
        """Renew this replica's leases, dispatch, and say which of its waiters got a slot or were lost."""
        self.renew(waiting, held)
        self.expire()
        st = self.load()
        self.dispatch(st)
        mine: list[tuple[str, str, int]] = []
        lost: list[str] = []
        for ticket, value in zip(waiting, self.r.hmget(GRANTED, waiting), strict=True):
            if value is not None:
                name, start = value.split("|", 1)
                mine.append((ticket, name, max(0, int(start) - self.now)))
            elif self.r.zscore(WAIT, ticket) is None:
                lost.append(ticket)
        return self.hint(st), self.r.zcard(WAIT), mine, lost

    def apply_outcome(self, spent: Spent) -> None:
        name, effect, cool_us, code = spent.key, spent.effect, spent.cool_us, spent.code
        if spent.dur_us > 0:
            lat = float(self.r.hget(FLOWS, "lat") or self.cfg.lat0_us)
            self.r.hset(FLOWS, "lat", fmt(lat * 0.8 + spent.dur_us * 0.2))
        if spent.billed:
            self.r.hincrby(HEALTH, name + ":billed", 1)
        state = self.r.hget(HEALTH, name + ":state") or ""
        if effect == "throttled":
            until = self.now + (cool_us if cool_us > 0 else self.cfg.cool_us)
            if until > int(self.r.hget(HEALTH, name + ":cool") or 0):
                self.r.hset(HEALTH, name + ":cool", "%d" % until)  # noqa: UP031
            self.r.hset(HEALTH, name + ":why", code)
        elif effect == "exhausted":
            if state != "disabled":
                self.r.hset(HEALTH, name + ":state", "exhausted")
                self.r.hset(HEALTH, name + ":recheck", "%d" % (self.now + self.cfg.recheck_us))  # noqa: UP031
            self.r.hset(HEALTH, name + ":why", code)
        elif effect == "disabled":
            self.r.hset(HEALTH, name + ":state", "disabled")
            self.r.hset(HEALTH, name + ":why", code)
        elif effect == "ok" and not self.cfg.gated and state != "":
            # A pool of one keeps calling its key: an answer shows the key works again.
            self.r.hdel(HEALTH, name + ":state")
            self.r.hdel(HEALTH, name + ":recheck")

    def release(self, ticket: str, spent: Spent) -> tuple[int, int, list[tuple[str, str, int]]]:
        self.r.zrem(SLOTS, ticket)
        self.r.hdel(GRANTED, ticket)
        if spent.key != "-":
            self.apply_outcome(spent)
        self.expire()
        st = self.load()
        granted = self.dispatch(st)
        return self.hint(st), self.r.zcard(WAIT), granted

    def cancel(self, ticket: str) -> tuple[str, str, int]:
        """A waiter gives up: dropped, or already granted (the caller uses or releases it)."""
        if self.r.hget(WINFO, ticket) is not None:
            self.drop_waiter(ticket, rollback=True)
            return "dropped", "", 0
        value = self.r.hget(GRANTED, ticket)
        if value is not None:
            name, start = value.split("|", 1)
            return "granted", name, max(0, int(start) - self.now)
        return "gone", "", 0

    def balance(self, name: str, balance: float | None) -> tuple[int, list[tuple[str, str, int]]]:
        """A balance was read (None: the read failed): exhausted <-> usable, then dispatch."""
        state = self.r.hget(HEALTH, name + ":state") or ""
        if balance is None:
            if state == "exhausted":
                self.r.hset(HEALTH, name + ":recheck", "%d" % (self.now + self.cfg.recheck_us))  # noqa: UP031
            return 0, []
        self.r.hset(HEALTH, name + ":bal", fmt(balance))
        self.r.hset(HEALTH, name + ":bal_at", "%d" % self.now)  # noqa: UP031
        self.r.hset(HEALTH, name + ":billed", "0")
        if balance > 0:
            if state == "exhausted":
                self.r.hdel(HEALTH, name + ":state")
                self.r.hdel(HEALTH, name + ":recheck")
        elif state != "disabled":
            self.r.hset(HEALTH, name + ":state", "exhausted")
            self.r.hset(HEALTH, name + ":recheck", "%d" % (self.now + self.cfg.recheck_us))  # noqa: UP031
            self.r.hset(HEALTH, name + ":why", "BALANCE")
        self.expire()
        st = self.load()
        granted = self.dispatch(st)
        return self.hint(st), granted

    def reloaded(self) -> list[tuple[str, str, int]]:
        for k in self.cfg.keys:
            if self.r.hget(HEALTH, k.name + ":state") == "disabled":
                self.r.hdel(HEALTH, k.name + ":state")
        self.expire()
        return self.dispatch(self.load())

    def snapshot(self) -> tuple[list[list[Any]], int, dict[str, int]]:
        """Per key: state, cool, recheck, bal, bal_at, billed, why, in flight; waiting; waiting by tenant."""
        counts: dict[str, int] = {}
        for ticket, value in self.r.hgetall(GRANTED).items():
            score = self.r.zscore(SLOTS, ticket)
            if score is not None and score > self.now:
                name = value.split("|", 1)[0]
                counts[name] = counts.get(name, 0) + 1
        rows: list[list[Any]] = []
        for k in self.cfg.keys:
            fields = [k.name + s for s in (":state", ":cool", ":recheck", ":bal", ":bal_at", ":billed", ":why")]
            rows.append([*self.r.hmget(HEALTH, fields), counts.get(k.name, 0)])
        waiting = self.r.zcard(WLEASE) - len(self.r.zupto(WLEASE, self.now))
        by_tenant = {f[2:]: int(v) for f, v in self.r.hgetall(FLOWS).items() if f.startswith("n:")}
        return rows, waiting, by_tenant
