"""A TCP proxy in front of Redis that counts client round trips, per connection.

``INFO commandstats`` counts commands, including those a Lua script runs inside Redis
and each command of a pipeline; what costs a request latency is the number of times it
waits for Redis. A round trip here is: the client sends (one or more segments) and then
waits for the reply. Pub/sub pushes from Redis are not round trips (the client sent nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class CountingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.round_trips = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-proxy", daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("redis proxy did not start")
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        waiting = [False]

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if not waiting[0]:
                    waiting[0] = True
                    self.round_trips += 1
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def redis_to_client() -> None:
            while data := await up_reader.read(65536):
                waiting[0] = False
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(client_to_redis(), redis_to_client())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
