"""The HTTP/1.1 protocol ``facegate serve`` runs: uvicorn's httptools one, with a bounded request head.

uvicorn's httptools protocol buffers a request line and headers without any bound and
without any time limit: a 50 MB header is accepted (the worker grows by ~100 MB while
it parses it), and a client that opens a connection and never finishes its headers
holds it forever. uvicorn's h11 protocol bounds the size but not the time, and is
markedly slower. This subclass adds both bounds, as a reverse proxy would:

* at most ``MAX_HEAD_BYTES`` of request line plus headers, else ``431`` and close;
* the head must be complete ``HEAD_TIMEOUT_S`` after the connection opened or the
  request's first byte arrived, else ``408`` and close (a connection that never sent a
  byte is just closed). Between requests, uvicorn's keep-alive timeout applies as before.

These refusals happen before the application sees a request, so they are plain text
(like uvicorn's own ``400 Invalid HTTP request received.``), carry no request id and
are logged by uvicorn's logger only.

It also hands request bodies to the application without uvicorn's two copies: uvicorn
appends each chunk the parser gives to a ``bytearray`` and copies that into a new ``bytes``
when the application reads it. Here a chunk that arrives while nothing is buffered is kept
as the parser's own ``bytes`` object, which reaches the application as it is (``bytes(b)``
of a ``bytes`` is ``b``); only chunks that pile up before the application reads are joined.
On a 200 KB upload that is two copies of the image fewer (issue 16, bench/HISTORY.md).

And it sends a response in one write: uvicorn writes the status line and headers, then the
body, each straight to the socket — two system calls per response, about a fifth of a
cached lookup's CPU. Writes made in the same turn of the event loop are held and sent
together at its end (``writelines``: one ``writev``), or at once past ``CORK_BYTES``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

MAX_HEAD_BYTES: Final = 64 * 1024
#: Held writes beyond this go out at once (a large or streamed body is not held in memory).
CORK_BYTES: Final = 64 * 1024
HEAD_TIMEOUT_S: Final = 10.0
_END_OF_HEAD: Final = b"\r\n\r\n"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a size and a time limit on each request's head (see the module doc)."""

    max_head_bytes: int = MAX_HEAD_BYTES
    head_timeout_s: float = HEAD_TIMEOUT_S

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_timer is None:
                self._arm_head_timer()
            window = self._tail + data
            end = window.find(_END_OF_HEAD)
            if end >= 0:
                # Only the bytes up to the blank line are head; the rest is body.
                self._head_bytes += end + len(_END_OF_HEAD) - len(self._tail)
                self._in_head = False
                self._disarm_head_timer()
            else:
                self._head_bytes += len(data)
                self._tail = window[-(len(_END_OF_HEAD) - 1) :]
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large", "Request line and headers are too large.")
                return
        super().data_received(data)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        # As uvicorn's own, without copying a chunk into an empty buffer (see the module doc):
        # ``RequestResponseCycle.receive`` hands over ``bytes(cycle.body)`` and starts a new one.
        buffered: bytes | bytearray = cycle.body
        if not buffered:
            cycle.body = body  # type: ignore[assignment]
        elif isinstance(buffered, bytes):
            cycle.body = bytearray(buffered)
            cycle.body += body
        else:
            buffered += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport is None or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()
            return
        self._refuse(408, "Request Timeout", "The request headers took too long.")

    def _refuse(self, status: int, phrase: str, message: str) -> None:
        self.logger.warning("%s (%d)", message, status)
        body = message.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, phrase.encode("ascii"), len(body), body)
        )
        self._disarm_head_timer()
        self.transport.close()


class _CorkedTransport:
    """A transport whose writes in one turn of the event loop leave together (see the module doc).

    Everything else is the real transport's; ``close`` and ``write_eof`` send what is held first,
    ``abort`` drops it with the connection. Order is kept: nothing overtakes a held write.
    """

    __slots__ = ("_held", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._size += len(data)
        if self._size > CORK_BYTES:
            self.flush()

    def flush(self) -> None:
        held, self._held, self._size = self._held, [], 0
        if not held or self._transport.is_closing():
            return
        if len(held) == 1:
            self._transport.write(held[0])
        else:
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
