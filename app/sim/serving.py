"""Running the simulator: ``serve`` (its own process), ``BackgroundSim`` (inside the gateway's
event loop, for sandbox mode) and ``main`` (``python -m app.sim`` / ``facegate sim``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import Generator, Sequence
from typing import Any

import uvicorn

from app.sim.config import DEFAULT_PORT, SimConfig
from app.sim.factory import EMBEDDED, create_app, sim_of_app

log = logging.getLogger("facegate.sim")

#: How long an idle keep-alive connection stays open (uvicorn's default is 5 s). Longer than the
#: gateway's pool keeps one (httpx: 5 s), as a load balancer's would be (60 s and more): with
#: equal values the simulator could close a connection just as the gateway sent a call on it,
#: and with retries off that call failed (502) without reaching the simulator.
KEEP_ALIVE_S = 75


def _warn_if_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("simulator bound to %s: its control endpoints need no key; keep it on loopback", host)


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, config: SimConfig | None = None) -> None:
    """Run the simulator in this process until interrupted."""
    config = config or SimConfig()
    _warn_if_exposed(host)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        lifespan="off",
        timeout_graceful_shutdown=config.shutdown_grace_s,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class BackgroundSim:
    """A simulator served by uvicorn inside the caller's event loop (the gateway's sandbox mode).

    It binds its own socket, so a busy port raises OSError here instead of uvicorn's
    ``sys.exit``, and it installs no signal handlers and no logging config: the host
    process owns those.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.app = create_app(self.config)
        self.host = host
        self.port = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return sim_of_app(self.app).stats.as_json()

    async def start(self) -> BackgroundSim:
        if self._task is not None:
            return self
        _warn_if_exposed(self.host)
        sim_of_app(self.app).wake.clear()
        self._sock = _bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the host's logging stays as it is
            log_level=None,
            lifespan="off",
            timeout_graceful_shutdown=self.config.shutdown_grace_s,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        self._server = _EmbeddedServer(config)
        context = contextvars.copy_context()
        context.run(EMBEDDED.set, True)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock]), name="facegate-sim", context=context
        )
        while not self._server.started:
            if self._task.done():
                await self.stop()
                raise RuntimeError("simulator failed to start")
            await asyncio.sleep(0.005)
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        sim_of_app(self.app).wake.set()
        if self._server is not None:
            self._server.should_exit = True
        try:
            if task is not None:
                await task
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    async def __aenter__(self) -> BackgroundSim:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_background(host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> BackgroundSim:
    """Start a simulator in the running event loop; ``port=0`` picks a free port (see ``.url``)."""
    return await BackgroundSim(host, port, config).start()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m app.sim`` / ``facegate sim``; flags override FACEGATE_SIM_* env."""
    parser = argparse.ArgumentParser(prog="facegate sim", description="Run the ailabapi simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--shape", choices=["tencent", "list"], help="default answer shape")
    parser.add_argument("--key", action="append", dest="keys", metavar="KEY", help="accepted key (repeatable)")
    parser.add_argument("--latency-ms", type=int)
    parser.add_argument("--qps", type=float)
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument(
        "--faces", choices=["detect", "hash"], help="face boxes from a detector (default) or the image's hash"
    )
    args = parser.parse_args(argv)
    given = {
        "shape": args.shape,
        "api_keys": args.keys,
        "latency_ms": args.latency_ms,
        "qps": args.qps,
        "max_concurrency": args.max_concurrency,
        "faces": args.faces,
    }
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    serve(args.host, args.port, SimConfig(**{k: v for k, v in given.items() if v is not None}))
