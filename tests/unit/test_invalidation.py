"""Invalidations across replicas (app/purge.py RedisInvalidator) through a short Redis outage.

A replica that loses its subscription keeps serving local copies while its lease runs; when it
hears again it reads the invalidations it missed (they are kept for a while in Redis), applies
and acknowledges them, and keeps its local tier: hot images survive a failover of the node
that carries the channel, and a deletion made meanwhile still reaches it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from app import redisconn
from app.purge import Invalidation, RedisInvalidator
from app.settings import Settings
from tests.servers import ReplyDroppingProxy

pytestmark = pytest.mark.redis


async def test_a_replica_that_was_deaf_briefly_catches_up_and_keeps_its_local_tier(redis_url: str, prefix: str) -> None:
    parts = urlsplit(redis_url)
    async with ReplyDroppingProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        deaf_client = redisconn.connect(Settings(redis_url=proxy.url, _env_file=None))
        deleter_client = redisconn.connect(Settings(redis_url=redis_url, _env_file=None))
        replica = RedisInvalidator(deaf_client, prefix)
        deleter = RedisInvalidator(deleter_client, prefix)
        heard: list[Invalidation] = []
        hearing: list[bool] = []
        serving = asyncio.Event()

        async def handler(inv: Invalidation) -> None:
            heard.append(inv)

        def on_health(ok: bool) -> None:
            hearing.append(ok)
            if ok:
                serving.set()

        try:
            replica.listen(handler, on_health)
            await asyncio.wait_for(serving.wait(), 10)
            proxy.cut()  # the replica's Redis connections are gone (its node fails over, say)
            await asyncio.sleep(0.3)
            deletion = asyncio.create_task(deleter.broadcast(Invalidation(("k1",), ("alpha",))))
            await asyncio.sleep(0.5)  # published while the replica is deaf
            proxy.mend()
            delivery = await asyncio.wait_for(deletion, 15)
            assert [inv.keys for inv in heard] == [("k1",)], "the missed deletion was applied"
            assert (delivery.told, delivery.confirmed) == (1, 1), "and acknowledged"
            assert hearing[hearing.index(True) :] == [True], "the local tier stayed on (never emptied once it heard)"
        finally:
            await replica.close()
            await deleter.close()
            await deaf_client.aclose()
            await deleter_client.aclose()
