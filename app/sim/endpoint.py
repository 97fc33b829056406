"""``POST /api/portrait/analysis/face-analyzer-advanced``: key, credits, limits, body, faults, image,
answer; and ``GET /api/common/query-credits``, the key's balance."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.sim.body import pause, read_image
from app.sim.config import MAX_FACES, NO_FACE_MESSAGE, SHAPE_HEADER
from app.sim.detect import Found, YuNet
from app.sim.faces import detected_faces, faces, list_data, tencent_face
from app.sim.faults import Fault
from app.sim.picture import Picture, inspect
from app.sim.replies import ClientGone, Refusal, Reply, envelope, error_reply, json_reply
from app.sim.state import Account, Sim
from app.upstream import contract


class Analyze:
    """The analyze endpoint as a raw ASGI app.

    Raw because the ``drop`` fault and disconnect-aware waits need send/receive.
    """

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sim = self.sim
        sim.stats.calls += 1
        sim.stats.in_flight += 1
        sim.stats.max_in_flight = max(sim.stats.max_in_flight, sim.stats.in_flight)
        headers = Headers(scope=scope)
        account = sim.account(headers.get(contract.KEY_HEADER))
        try:
            try:
                reply = await self._answer(headers, receive, account)
            except Refusal as err:
                reply = error_reply(err)
            except ClientGone:
                sim.stats.disconnected += 1
                return
            sim.record(reply, account)
            await reply.send(send)
        finally:
            sim.stats.in_flight -= 1

    async def _answer(self, headers: Headers, receive: Receive, account: Account | None) -> Reply:
        sim = self.sim
        if account is None:
            raise Refusal("ERROR_USER_NOT_EXISTS")
        account.calls += 1
        sim.admit(account)  # reserves the call's credit: concurrent calls cannot overdraw the key
        reply: Reply | None = None
        try:
            image = await read_image(headers, receive)
            assert image.data is not None
            sim.stats.per_image[image.sha256] += 1
            fault = sim.take_fault()
            await pause(sim.latency_ms / 1000, receive, sim.wake)
            if fault is not None:
                reply = await self._fault(fault, receive)
                if reply is not None:
                    return reply
            reply = await self._analyze(image.data, image.sha256, headers, receive)
            return reply
        finally:
            account.in_flight -= 1
            if reply is None or reply.status != 200:
                account.balance += 1  # not billed: the reserved credit goes back

    async def _fault(self, fault: Fault, receive: Receive) -> Reply | None:
        if fault.mode == "status":
            assert fault.status is not None
            assert fault.code is not None
            err = Refusal(fault.code, fault.message, status=fault.status)
            if fault.retry_after is not None:
                err.headers["Retry-After"] = str(fault.retry_after)
            raise err
        if fault.mode == "bad_key":
            raise Refusal("ERROR_USER_NOT_EXISTS")
        if fault.mode == "no_credits":
            raise Refusal("ERROR_NOT_ENOUGH_CREDITS")
        if fault.mode == "hang":
            await pause(fault.seconds, receive, self.sim.wake)
            return None
        if fault.mode == "redirect":
            assert fault.location is not None
            return Reply(307, b"", "SIM_REDIRECT", content_type=None, headers={"Location": fault.location})
        if fault.mode == "malformed":
            body = fault.body or f'{{"request_id": "{uuid.uuid4().hex}", "error_code": 0, "face_detail_infos": [{{"'
            return Reply(fault.status or 200, body.encode(), "SIM_MALFORMED", content_type=fault.content_type)
        plain = envelope()
        if fault.mode == "missing_field":
            return json_reply(200, plain, "SIM_MISSING_FIELD")
        reply = json_reply(200, {**plain, "image_width": 0, "image_height": 0, "face_detail_infos": []}, "SIM_DROP")
        reply.drop = True
        return reply

    async def _analyze(self, data: bytes, digest: str, headers: Headers, receive: Receive) -> Reply:
        async with self.sim.decode_slots:
            picture, seen = await asyncio.to_thread(_look, data, self.sim.detector)
        directive = picture.directive
        await pause(directive.latency_ms / 1000, receive, self.sim.wake)
        if directive.error:
            no_face = directive.error == "ERROR_NO_FACE_IN_FILE"
            raise Refusal(directive.error, NO_FACE_MESSAGE if no_face else None)
        shape = directive.shape or headers.get(SHAPE_HEADER) or self.sim.config.shape
        if shape not in ("tencent", "list"):
            raise Refusal("ERROR_INVALID_PARAMETER", f"{SHAPE_HEADER} must be tencent or list")
        if seen is not None:  # the detector looked (no directive said how many)
            found = detected_faces(digest, seen[:MAX_FACES])
        else:
            count = directive.faces
            if count is None:
                count = 1 if min(picture.width, picture.height) >= contract.MIN_FACE_SIDE else 0
            found = faces(digest, count, picture.width, picture.height) if count else []
        if not found:
            raise Refusal("ERROR_NO_FACE_IN_FILE", NO_FACE_MESSAGE)
        body: dict[str, Any] = {
            **envelope(),
            "image_width": picture.width,
            "image_height": picture.height,
        }
        if shape == contract.Shape.LIST.value:
            body["data"] = list_data(found)
        else:
            body["face_detail_infos"] = [tencent_face(face) for face in found]
        return json_reply(200, body, "OK")


def _look(data: bytes, detector: YuNet | None) -> tuple[Picture, list[Found] | None]:
    """Judge the image and, when a detector is on and no directive decides, find its faces.

    One worker-thread call: the detector works on the small copy the same decode made.
    """
    picture = inspect(data, keep_pixels=detector is not None)
    if detector is None or picture.pixels is None:
        return picture, None
    found = detector.find(picture.pixels, picture.width, picture.height)
    return dataclasses.replace(picture, pixels=None), found


async def query_credits(request: Request) -> Response:
    """``GET /api/common/query-credits``: the key's balance, in ailabapi's documented shape."""
    sim: Sim = request.app.state.sim
    sim.stats.credit_queries += 1
    account = sim.account(request.headers.get(contract.KEY_HEADER))
    if account is None:
        reply = error_reply(Refusal("ERROR_USER_NOT_EXISTS"))
        return Response(reply.body, status_code=reply.status, media_type="application/json")
    body = {
        **envelope(),
        "data": [
            {
                "unique_sign": "common",
                "name": "Universal credits",
                "balance": account.balance,
                "total": account.total,
                "last_recharge_balance": account.total,
                "balance_warning": 0,
                "first_buy_time": 0,
                "last_update_time": 0,
            }
        ],
    }
    reply = json_reply(200, body, "OK")
    return Response(reply.body, status_code=200, media_type="application/json")
