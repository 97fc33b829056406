"""The HTTP protocol facegate serves with (app/httpserver.py) hands bodies over exactly, and
sends each response in one write.

Its ``on_body`` keeps a chunk that arrives while nothing is buffered as the parser's own
``bytes`` instead of copying it, and joins chunks that pile up before the application reads.
A real uvicorn server with that protocol on a loopback socket receives bodies sent in one
piece, in many small pieces while the application is not reading (so they pile up, past
uvicorn's high-water mark too), and chunked; the application must get exactly the bytes sent,
as ``bytes``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from app.httpserver import CORK_BYTES, BoundedHttpToolsProtocol


async def echo_digest(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the SHA-256 of the body and whether every chunk was ``bytes``."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)  # let the client's pieces pile up in the server's buffer
    digest = hashlib.sha256()
    kinds = set()
    while True:
        message = await receive()
        body = message.get("body", b"")
        kinds.add(type(body).__name__)
        digest.update(body)
        if not message.get("more_body", False):
            break
    answer = f"{digest.hexdigest()} {','.join(sorted(kinds))}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections wait in the backlog until the server accepts them
    config = uvicorn.Config(echo_digest, http=BoundedHttpToolsProtocol, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    try:
        yield int(sock.getsockname()[1])
    finally:
        srv.should_exit = True
        await task
        sock.close()


async def _exchange(port: int, head: bytes, pieces: list[bytes], pause: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    answer = await reader.read()  # "Connection: close": read to the end
    writer.close()
    await writer.wait_closed()
    return answer


def _head(path: str, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"POST %s HTTP/1.1\r\nhost: t\r\nconnection: close\r\n%s\r\n\r\n" % (path.encode(), framing)


BODY = bytes(range(256)) * 1200  # 300 KB: more than uvicorn's 64 KiB high-water mark


@pytest.mark.parametrize(
    ("path", "size", "pause"),
    [
        ("/fast", len(BODY), 0.0),  # one piece
        ("/fast", 1000, 0.002),  # small pieces, read as they come
        ("/slow", 1000, 0.0),  # small pieces piling up while the app does not read
        ("/slow", 40_000, 0.0),  # past the high-water mark while the app does not read
    ],
)
async def test_the_app_gets_exactly_the_bytes_sent(server: int, path: str, size: int, pause: float) -> None:
    pieces = [BODY[i : i + size] for i in range(0, len(BODY), size)]
    answer = await _exchange(server, _head(path, len(BODY)), pieces, pause)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.split(b"\r\n\r\n", 1)[1] == f"{hashlib.sha256(BODY).hexdigest()} bytes".encode()


async def test_a_chunked_body_arrives_exactly(server: int) -> None:
    pieces = [b"%x\r\n%s\r\n" % (len(BODY[i : i + 7000]), BODY[i : i + 7000]) for i in range(0, len(BODY), 7000)]
    answer = await _exchange(server, _head("/slow", None), [*pieces, b"0\r\n\r\n"])
    assert answer.split(b"\r\n\r\n", 1)[1] == f"{hashlib.sha256(BODY).hexdigest()} bytes".encode()


# --- one write per response -------------------------------------------------------------------


class _CountingTransport:
    """The real socket transport, with its write calls counted (each is one system call)."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def writelines(self, data: Any) -> None:
        parts = list(data)
        self._writes.append(sum(len(p) for p in parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def respond(scope: Scope, receive: Receive, send: Send) -> None:
    """/small: head + a short body; /stream: a 1 MB body in 100 KB parts (more_body)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    if scope["path"] == "/small":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})
        return
    part = bytes(range(256)) * 400  # 100 KB, more than CORK_BYTES
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % (10 * len(part)))]}
    )
    for i in range(10):
        await send({"type": "http.response.body", "body": part, "more_body": i < 9})


async def test_a_response_leaves_in_one_write_and_large_ones_are_not_held() -> None:
    writes: list[int] = []

    class Counting(BoundedHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CountingTransport(transport, writes))  # type: ignore[arg-type]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    srv = uvicorn.Server(uvicorn.Config(respond, http=Counting, log_level="warning", lifespan="off"))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    try:
        port = int(sock.getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # keep-alive: each response on its own, in one write
            writes.clear()
            writer.write(b"GET /small HTTP/1.1\r\nhost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(5) == b"hello"
            assert len(writes) == 1, writes  # status line, headers and body: one system call
        writes.clear()
        writer.write(b"GET /stream HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        answer = await reader.read()
        body = answer.split(b"\r\n\r\n", 1)[1]
        assert body == (bytes(range(256)) * 400) * 10
        assert len(writes) >= 10 and max(writes) <= 2 * CORK_BYTES + len(head), writes  # never all held
        writer.close()
        await writer.wait_closed()
    finally:
        srv.should_exit = True
        await task
        sock.close()
