"""RedisHealth: bounded operations, and a cool-down only after repeated failures."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

from app.redisconn import COOLDOWN_S, RedisDown, RedisHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def up(health: RedisHealth) -> bool:
    return health.available  # read through a call: mypy would keep the first assert's narrowing


async def fail() -> None:
    raise RedisConnectionError("refused")


async def ok() -> str:
    return "ok"


async def test_one_failure_does_not_switch_redis_off_but_three_in_a_row_do() -> None:
    clock, calls = Clock(), list[str]()
    health = RedisHealth(calls.append, clock, failures=3)
    for _ in range(2):
        with pytest.raises(RedisDown):
            await health.run("quota", fail)
    assert up(health)
    assert await health.run("quota", ok) == "ok"  # a success resets the count
    for _ in range(3):
        with pytest.raises(RedisDown):
            await health.run("quota", fail)
    assert not up(health)
    with pytest.raises(RedisDown):
        await health.run("quota", ok)  # cooling down: not even tried
    assert calls == ["quota"] * 5
    clock.now += COOLDOWN_S
    assert await health.run("quota", ok) == "ok"


async def test_a_hung_operation_is_cut_at_the_timeout() -> None:
    health = RedisHealth(timeout_s=0.05)

    async def hang() -> None:
        await asyncio.sleep(3600)

    with pytest.raises(RedisDown):
        await health.run("cache", hang)


async def test_cluster_errors_that_are_not_redis_errors_are_redis_down_too() -> None:
    """During a cluster failover redis-py can raise SlotNotCoveredError, which is no RedisError."""

    async def uncovered() -> None:
        raise SlotNotCoveredError('Slot "42" is not covered by the cluster.')

    with pytest.raises(RedisDown):
        await RedisHealth().run("cache", uncovered)


async def test_a_write_on_a_connection_closed_under_it_is_redis_down() -> None:
    """uvloop raises RuntimeError for a write on a transport redis-py closed meanwhile (seen when the
    Cluster client closes connections during a failover): a Redis failure, not a 500."""

    async def closed() -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    with pytest.raises(RedisDown):
        await RedisHealth().run("quota", closed)
