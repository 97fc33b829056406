"""What the simulator sends back: ailabapi's error answers (``Refusal``), and ``Reply``, which
can also break off mid-body on purpose (the ``drop`` fault)."""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Send

from app.upstream import contract

#: Set by a request that drops its connection on purpose (the log filter then hides uvicorn's complaint).
DROPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("facegate_sim_dropping", default=False)


class Refusal(Exception):
    """An ailabapi error answer; raised from any check so the checks read top to bottom."""

    def __init__(self, code: str, message: str | None = None, *, status: int | None = None) -> None:
        row = contract.ERROR_CODES.get(code)
        self.code = code
        self.status = status or (row.status if row else 500)
        self.message = message if message is not None else (row.message if row else code)
        self.headers: dict[str, str] = {}
        super().__init__(code)


class ClientGone(Exception):
    """The caller hung up; there is nobody to answer."""


@dataclass
class Reply:
    status: int
    body: bytes
    label: str  # key in stats.by_code
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False

    async def send(self, send: Send) -> None:
        headers = [(b"content-length", str(len(self.body)).encode())]
        if self.content_type:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if self.drop:
            # Returning with more_body pending makes uvicorn close the connection mid-body,
            # so the client sees a truncated message, as with a proxy that died.
            DROPPING.set(True)
            half = self.body[: len(self.body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            return
        await send({"type": "http.response.body", "body": self.body})


def envelope(status: int = 200, code: str = "", message: str = "") -> dict[str, Any]:
    """ailabapi's envelope with fresh ids, as every real answer carries."""
    return contract.envelope(
        request_id=uuid.uuid4().hex, log_id=uuid.uuid4().hex[:16], status=status, code=code, message=message
    )


def json_reply(status: int, payload: Any, label: str) -> Reply:
    return Reply(status, orjson.dumps(payload), label)


def error_reply(err: Refusal) -> Reply:
    body = envelope(err.status, err.code, err.message)
    reply = json_reply(err.status, body, err.code)
    reply.headers.update(err.headers)
    return reply
