"""RedisHealth: bounded operations, and a cool-down only after repeated failures. Wire: the request
path's commands (replies, batching with ``together``, scripts Redis forgot, connections across a
Redis restart, and a lost reply never sent again), on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, SlotNotCoveredError

from app.redisconn import (
    COOLDOWN_S,
    RedisClient,
    RedisDown,
    RedisHealth,
    ScriptCall,
    Wire,
    connect,
    together,
    warm,
)
from app.settings import Settings
from tests.servers import RedisServer, ReplyDroppingProxy


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


# --- Wire: the request path's commands on connections of its own ------------------------------


@contextlib.asynccontextmanager
async def wire_on(url: str) -> AsyncIterator[tuple[RedisClient, Wire]]:
    """A client of ``url`` and its wire, both closed after."""
    client = connect(Settings(redis_url=url, _env_file=None))
    try:
        yield client, Wire.of(client)
    finally:
        await Wire.of(client).aclose()
        await client.aclose()


@pytest.fixture
async def wired(redis_url: str) -> AsyncIterator[tuple[RedisClient, Wire, str]]:
    prefix = "w" + uuid.uuid4().hex[:12]
    async with wire_on(redis_url) as (client, wire):
        try:
            yield client, wire, prefix
        finally:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)


async def test_wire_answers_commands_scripts_and_pipelines_with_error_replies_in_place(
    wired: tuple[RedisClient, Wire, str],
) -> None:
    client, wire, p = wired
    assert Wire.of(client) is wire
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await wire.call("SET", f"{p}:a", "1", "PX", 60_000) == b"OK"
    assert await wire.script(script, [f"{p}:a"], [5]) == 6
    replies = await wire.pipeline([("GET", f"{p}:a"), ("HGET", f"{p}:a", "x"), ScriptCall(script, [f"{p}:a"], [1])])
    assert replies[0] == b"6"
    assert isinstance(replies[1], ResponseError)  # WRONGTYPE, in its place
    assert replies[2] == 7
    with pytest.raises(ResponseError):
        await wire.call("HGET", f"{p}:a", "x")  # alone: raised
    assert await wire.call("GET", f"{p}:a") == b"7"  # the connection is still in step


async def test_together_sends_concurrent_commands_as_one_round_trip(redis_url: str) -> None:
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    p = "w" + uuid.uuid4().hex[:12]
    async with ReplyDroppingProxy((host, int(port))) as proxy, wire_on(proxy.url) as (client, wire):
        try:
            await asyncio.gather(*(wire.call("PING") for _ in range(5)))  # connections open: only commands follow
            before = proxy.round_trips
            await asyncio.gather(*(wire.call("SET", f"{p}:{i}", i, "PX", 60_000) for i in range(5)))
            assert proxy.round_trips - before == 5  # apart: one round trip each
            before = proxy.round_trips
            with together():
                replies = await asyncio.gather(
                    *(wire.call("INCR", f"{p}:{i}") for i in range(5)), wire.pipeline([("GET", f"{p}:0")] * 2)
                )
            assert proxy.round_trips - before == 1
            assert replies == [1, 2, 3, 4, 5, [b"1", b"1"]]
        finally:
            await client.delete(*[f"{p}:{i}" for i in range(5)])


async def test_a_script_redis_forgot_is_loaded_and_run_once(own_redis: RedisServer) -> None:
    async with wire_on(own_redis.url) as (client, wire):
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        assert await wire.script(script, ["n"], []) == 1
        await client.script_flush()  # as after a Redis restart
        with together():
            replies = await asyncio.gather(
                wire.script(script, ["n"], []), wire.pipeline([ScriptCall(script, ["n"], [])])
            )
        assert sorted([replies[0], replies[1][0]]) == [2, 3]  # each ran once
        assert await client.get("n") == b"3"


async def test_a_connection_kept_across_a_redis_restart_is_reopened(own_redis: RedisServer) -> None:
    async with wire_on(own_redis.url) as (client, wire):
        await warm(client, 4)  # connections in the pool that will sit there across the restart
        await asyncio.gather(*(wire.call("PING") for _ in range(8)))  # some kept by the wire
        own_redis.stop()
        own_redis.start()
        await asyncio.sleep(0.2)  # the event loop sees the old connections end (a server's loop always runs)
        assert await asyncio.gather(*(wire.call("PING") for _ in range(8))) == [b"PONG"] * 8


async def test_a_command_whose_reply_was_lost_is_not_sent_again(redis_url: str) -> None:
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    key = "w" + uuid.uuid4().hex[:12]
    async with ReplyDroppingProxy((host, int(port))) as proxy, wire_on(proxy.url) as (client, wire):
        try:
            await wire.call("PING")
            proxy.arm(b"INCR")
            with pytest.raises(RedisConnectionError):
                await wire.call("INCR", key)
            assert proxy.dropped == 1
            assert await wire.call("GET", key) == b"1"  # it ran once; the next command works
        finally:
            await client.delete(key)
