"""Hash first in one request: a digest header answers a cache hit before the body is sent.

Real clients against a real gateway process: raw sockets (what exactly goes over the
connection, keep-alive included), curl (``--data-binary`` and ``-F``), aiohttp with
``expect100=True``. Bytes on the wire are counted by a TCP proxy between client and
gateway (:class:`tests.servers.ByteCountingProxy`): what the client sent is the most the
server could have received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, Sim, unique_image
from tests.servers import ByteCountingProxy

ANALYZE = "/v1/faces/analyze"
#: The target of issue 16: a hit on a 5 MB image costs under 10 KB on the wire toward the server.
HIT_BYTES_MAX = 10 * 1024


def digest(data: bytes) -> str:
    """An RFC 9530 digest field value: ``sha-256=:<base64>:``."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


@pytest.fixture(scope="module")
def big_bmp() -> bytes:
    """A ~5 MB image (BMP: uncompressed, so made in milliseconds)."""
    image = unique_image("bmp", 1300, 1300)
    assert len(image) > 5_000_000
    return image


def prime(gw: Gateway, image: bytes, tenant: str = "alpha") -> None:
    """Upload once so the image is cached (a miss the first time, a hit after)."""
    response = gw.analyze(image, tenant)
    assert response.status_code == 200, response.text


@pytest.fixture
def proxy(gateway: Gateway) -> Iterator[ByteCountingProxy]:
    host, port = gateway.url.removeprefix("http://").split(":")
    with ByteCountingProxy(host, int(port)) as p:
        yield p


# --- raw sockets: exactly what happens on the connection -------------------------------------


def connect(gw: Gateway) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def head(gw: Gateway, path: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: facegate", f"Authorization: Bearer {gw.key()}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Reader:
    """Reads HTTP/1.1 responses off a socket, keeping what it read past each one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next final response (a ``100 Continue`` before it is skipped, and reported)."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError(f"closed before a response; got {self.buf[:200]!r}")
            raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
            if status == 100:
                self.continues = getattr(self, "continues", 0) + 1
                continue
            length = int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                if not self._fill():
                    raise ConnectionError("closed inside a response body")
            body, self.buf = self.buf[:length], self.buf[length:]
            return status, headers, body

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF) with nothing more to read."""
        try:
            more = self._fill()
        except ConnectionResetError:
            return False
        return not more and not self.buf


def test_expect_hit_is_answered_from_the_headers_and_the_connection_closes(gateway: Gateway, sim: Sim) -> None:
    image = unique_image()
    prime(gateway, image)
    with connect(gateway) as sock:
        sock.sendall(
            head(
                gateway,
                ANALYZE,
                {"Content-Type": "image/jpeg", "Content-Digest": digest(image), "Expect": "100-continue"},
                len(image),
            )
        )
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 200
        assert getattr(reader, "continues", 0) == 0, "asked for a body it did not need"
        assert headers["connection"] == "close"
        assert headers["cache-status"].startswith("facegate; hit")
        analysis = json.loads(body)
        assert analysis["source"]["cached"] is True
        assert analysis["image"]["sha256"] == hashlib.sha256(image).hexdigest()
        # No body was sent and none is waited for: the server closes, it does not hang.
        assert reader.closed_by_server()
    assert sim.calls == 1  # the priming upload only


def test_keep_alive_holds_after_a_digest_hit_without_expect(gateway: Gateway, sim: Sim) -> None:
    """A client that cannot do Expect sends the body anyway: the answer comes from the headers,
    the body is dropped, and the same connection serves the next request."""
    image = unique_image("png", 256, 256)
    prime(gateway, image)
    with connect(gateway) as sock:
        headers = {"Content-Type": "image/png", "Content-Digest": digest(image)}
        second = f"GET /v1/usage HTTP/1.1\r\nHost: facegate\r\nAuthorization: Bearer {gateway.key()}\r\n\r\n"
        sock.sendall(head(gateway, ANALYZE, headers, len(image)) + image + second.encode())
        reader = Reader(sock)
        status, first_headers, body = reader.response()
        assert status == 200
        assert "connection" not in first_headers  # kept alive
        assert json.loads(body)["source"]["cached"] is True
        status, _, body = reader.response()  # the next request on the same connection
        assert status == 200
        assert json.loads(body)["tenant"] == "alpha"
        # And a third, a miss this time, still on the same connection.
        fresh = unique_image()
        sock.sendall(head(gateway, ANALYZE, {"Content-Type": "image/jpeg"}, len(fresh)) + fresh)
        status, _, body = reader.response()
        assert status == 200
        assert json.loads(body)["source"]["cached"] is False
    assert sim.calls == 2


def test_a_request_sent_after_an_expect_hit_is_not_eaten_as_its_body(gateway: Gateway) -> None:
    """The failure the issue measured with curl: the client keeps the connection and sends its
    next request, which the server took for the missing body and waited on forever. Here the
    answer says close, and the server closes: the next request is never taken for anything."""
    image = unique_image()
    prime(gateway, image)
    with connect(gateway) as sock:
        sock.sendall(
            head(
                gateway,
                ANALYZE,
                {"Content-Type": "image/jpeg", "Content-Digest": digest(image), "Expect": "100-continue"},
                len(image),
            )
        )
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 200
        assert headers["connection"] == "close"
        # A client that ignores "close" and reuses the connection:
        sock.sendall(
            f"GET /v1/usage HTTP/1.1\r\nHost: facegate\r\nAuthorization: Bearer {gateway.key()}\r\n\r\n".encode()
        )
        assert reader.closed_by_server()  # EOF, no answer to it, no hang


def test_expect_hit_with_the_body_sent_anyway_still_delivers_the_answer(
    gateway: Gateway, sim: Sim, big_bmp: bytes
) -> None:
    """A client that sent Expect but did not wait: the server answers, drains what arrives and
    closes only then, so the answer is not lost to a connection reset."""
    prime(gateway, big_bmp)
    sim.reset()
    with connect(gateway) as sock:
        headers = {"Content-Type": "image/bmp", "Content-Digest": digest(big_bmp), "Expect": "100-continue"}
        errors: list[BaseException] = []

        def send_all() -> None:
            try:
                sock.sendall(head(gateway, ANALYZE, headers, len(big_bmp)) + big_bmp)
            except OSError as exc:
                errors.append(exc)

        writer = threading.Thread(target=send_all)
        writer.start()
        reader = Reader(sock)
        status, response_headers, body = reader.response()
        writer.join(30)
        assert status == 200
        assert response_headers["connection"] == "close"
        assert json.loads(body)["source"]["cached"] is True
        assert errors == [], "the server reset the connection before the client finished sending"
        assert reader.closed_by_server()
    assert sim.calls == 0


def test_a_refusal_before_the_body_also_closes_an_expect_connection(gateway: Gateway) -> None:
    """Not only hits: any answer decided from the headers (here a wrong key) on an Expect request."""
    image = unique_image()
    with connect(gateway) as sock:
        request = head(gateway, ANALYZE, {"Content-Type": "image/jpeg", "Expect": "100-continue"}, len(image))
        sock.sendall(request.replace(gateway.key().encode(), b"fg_wrong"))
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 401
        assert headers["connection"] == "close"
        assert reader.closed_by_server()


def test_expect_miss_gets_100_continue_and_keeps_the_connection(gateway: Gateway, sim: Sim) -> None:
    image = unique_image()
    with connect(gateway) as sock:
        headers = {"Content-Type": "image/jpeg", "Content-Digest": digest(image), "Expect": "100-continue"}
        sock.sendall(head(gateway, ANALYZE, headers, len(image)))
        sock.settimeout(20)
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(image)
        reader = Reader(sock)
        reader.buf = interim.split(b"\r\n\r\n", 1)[1]
        status, response_headers, body = reader.response()
        assert status == 200
        assert "connection" not in response_headers
        assert json.loads(body)["source"]["cached"] is False
        # Now the same image is known: the next request on this connection is answered from its headers.
        sock.sendall(head(gateway, ANALYZE, headers, len(image)))
        status, response_headers, body = reader.response()
        assert status == 200
        assert response_headers["connection"] == "close"
        assert json.loads(body)["source"]["cached"] is True
    assert sim.calls == 1


# --- the digest is checked, and bad digests are refused for free -----------------------------


def test_digest_mismatch_is_refused_and_costs_nothing(gateway: Gateway, sim: Sim) -> None:
    image, other = unique_image(), unique_image()
    with gateway.client() as c:
        before = c.get("/v1/usage").json()
        raw = c.post(ANALYZE, content=image, headers={"Content-Type": "image/jpeg", "Content-Digest": digest(other)})
        form = c.post(ANALYZE, files={"image": ("x.jpg", image, "image/jpeg")}, headers={"Image-Digest": digest(other)})
        after = c.get("/v1/usage").json()
    for response in (raw, form):
        assert response.status_code == 400
        assert response.json()["code"] == "digest_mismatch"
    assert sim.calls == 0
    assert after["quotas"]["daily"]["used"] == before["quotas"]["daily"]["used"]
    assert after["credits_spent"] == before["credits_spent"]
    assert after["cache"] == before["cache"]
    # Nothing was stored: the image is still unknown, and the right digest goes through as a miss.
    with gateway.client() as c:
        assert c.get(f"/v1/faces/analyses/{hashlib.sha256(image).hexdigest()}").status_code == 404
        ok = c.post(ANALYZE, content=image, headers={"Content-Type": "image/jpeg", "Content-Digest": digest(image)})
    assert ok.status_code == 200
    assert ok.json()["source"]["cached"] is False
    assert sim.calls == 1


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Content-Digest", "sha-256=abc"),  # not a byte sequence
        ("Content-Digest", "sha-256=:bm90IDMyIGJ5dGVz:"),  # base64, but not 32 bytes
        ("Content-Digest", "sha-256=:!!!!:"),  # not base64
        ("Content-Digest", "SHA-256=:AAAA:"),  # keys are lowercase
        ("Content-Digest", "sha-256=:" + "A" * 43 + "=:,"),  # trailing comma
        ("Image-Digest", "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3"),  # hex is not the syntax
    ],
)
def test_malformed_digest_headers_are_400(gateway: Gateway, sim: Sim, header: str, value: str) -> None:
    with gateway.client() as c:
        response = c.post(ANALYZE, content=unique_image(), headers={"Content-Type": "image/jpeg", header: value})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_digest"
    assert sim.calls == 0


def test_other_algorithms_and_a_multipart_content_digest_are_ignored(gateway: Gateway, sim: Sim) -> None:
    image = unique_image()
    sha512 = base64.b64encode(hashlib.sha512(image).digest()).decode()
    with gateway.client() as c:
        raw = c.post(
            ANALYZE, content=image, headers={"Content-Type": "image/jpeg", "Content-Digest": f"sha-512=:{sha512}:"}
        )
        # On multipart, Content-Digest covers the whole form: not the image, so not used (nor checked).
        form = c.post(
            ANALYZE,
            files={"image": ("x.jpg", unique_image(), "image/jpeg")},
            headers={"Content-Digest": digest(b"the whole form, supposedly")},
        )
    assert raw.status_code == 200, raw.text
    assert form.status_code == 200, form.text
    assert sim.calls == 2


def test_digest_hit_counts_as_a_hit_and_works_on_the_drop_in_route(gateway: Gateway, sim: Sim) -> None:
    image = unique_image()
    prime(gateway, image, "beta")
    with gateway.client("beta") as c:
        before = c.get("/v1/usage").json()["cache"]["day"]
        hit = c.post(ANALYZE, content=image, headers={"Content-Type": "image/jpeg", "Content-Digest": digest(image)})
        compat = c.post(
            "/api/portrait/analysis/face-analyzer-advanced",
            files={"image": ("x.jpg", image, "image/jpeg")},
            headers={"ailabapi-api-key": gateway.key("beta"), "Image-Digest": digest(image)},
        )
        after = c.get("/v1/usage").json()["cache"]["day"]
    assert hit.status_code == 200
    assert hit.headers["cache-status"].startswith("facegate; hit")
    assert compat.status_code == 200
    assert compat.json()["error_code"] == 0
    assert after["hits"] == before["hits"] + 2
    assert after["misses"] == before["misses"]
    assert sim.calls == 1


def test_a_forced_analysis_ignores_the_digest_for_the_answer_but_still_checks_it(
    gateway_factory: Any, sim: Sim
) -> None:
    gw: Gateway = gateway_factory(tenants={"alpha": {"allow_force": True}})
    image = unique_image()
    prime(gw, image)
    force = {"Content-Type": "image/jpeg", "X-Facegate-Force": "1"}
    with gw.client() as c:
        wrong = c.post(ANALYZE, content=image, headers={**force, "Content-Digest": digest(b"x")})
        fresh = c.post(ANALYZE, content=image, headers={**force, "Content-Digest": digest(image)})
    assert wrong.status_code == 400
    assert wrong.json()["code"] == "digest_mismatch"
    assert fresh.status_code == 200
    assert fresh.headers["cache-status"].startswith("facegate; fwd=request")  # paid for, not from the headers
    assert sim.calls == 2


# --- real clients --------------------------------------------------------------------------

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)")


def curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run curl; returns (HTTP status, JSON body) of its last transfer. ``--max-time`` guards against a hang."""
    return curl_all(*args)[-1]


def curl_all(*args: str) -> list[tuple[int, dict[str, Any]]]:
    """Run curl; (HTTP status, JSON body) of each transfer, in order."""
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-w", "\nSTATUS %{http_code}\n", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    results: list[tuple[int, dict[str, Any]]] = []
    body = ""
    for line in out.stdout.splitlines():
        if line.startswith("STATUS "):
            results.append((int(line.split()[1]), json.loads(body) if body.strip() else {}))
            body = ""
        else:
            body += line
    return results


@needs_curl
def test_curl_data_binary_hit_sends_no_body(
    gateway: Gateway, proxy: ByteCountingProxy, big_bmp: bytes, tmp_path: Path
) -> None:
    prime(gateway, big_bmp)
    path = tmp_path / "big.bmp"
    path.write_bytes(big_bmp)
    auth = f"Authorization: Bearer {gateway.key()}"
    # curl asks for 100 Continue by itself above 1 MiB.
    status, body = curl(
        "-H", auth, "-H", "Content-Type: image/bmp", "-H", f"Content-Digest: {digest(big_bmp)}",
        "--data-binary", f"@{path}", proxy.url + ANALYZE,
    )  # fmt: skip
    assert status == 200
    assert body["source"]["cached"] is True
    assert proxy.sent < HIT_BYTES_MAX, f"{proxy.sent} bytes went toward the server for a hit"
    # Without the digest, the classic path: the whole image goes over the wire (and is a hit too).
    sent = proxy.sent
    status, body = curl("-H", auth, "-H", "Content-Type: image/bmp", "--data-binary", f"@{path}", proxy.url + ANALYZE)
    assert status == 200
    assert body["source"]["cached"] is True
    assert proxy.sent - sent > len(big_bmp)


@needs_curl
def test_curl_form_hit_sends_no_body_and_reuse_does_not_hang(
    gateway: Gateway, proxy: ByteCountingProxy, big_bmp: bytes, tmp_path: Path
) -> None:
    prime(gateway, big_bmp)
    path = tmp_path / "big.bmp"
    path.write_bytes(big_bmp)
    args = ["-H", f"Authorization: Bearer {gateway.key()}", "-H", f"Image-Digest: {digest(big_bmp)}"]
    args += ["-F", f"image=@{path}"]
    # Two requests in one curl: it would reuse the connection; after "Connection: close" it must not.
    results = curl_all(*args, proxy.url + ANALYZE, proxy.url + ANALYZE)
    assert [status for status, _ in results] == [200, 200]
    assert all(body["source"]["cached"] is True for _, body in results)
    assert proxy.connections == 2
    assert proxy.sent < 2 * HIT_BYTES_MAX


@needs_curl
def test_curl_without_expect_and_with_a_wrong_digest(gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image, other = unique_image(), unique_image()
    path = tmp_path / "small.jpg"
    path.write_bytes(image)
    auth = ["-H", f"Authorization: Bearer {gateway.key()}"]
    status, body = curl(*auth, "-H", f"Image-Digest: {digest(other)}", "-F", f"image=@{path}", gateway.url + ANALYZE)
    assert status == 400
    assert body["code"] == "digest_mismatch"
    # A small body: curl sends it with the headers (no Expect); the digest is checked, then a miss.
    status, body = curl(*auth, "-H", f"Image-Digest: {digest(image)}", "-F", f"image=@{path}", gateway.url + ANALYZE)
    assert status == 200
    assert body["source"]["cached"] is False
    assert sim.calls == 1


def test_aiohttp_expect100_hit_sends_no_body(
    gateway: Gateway, sim: Sim, proxy: ByteCountingProxy, big_bmp: bytes
) -> None:
    prime(gateway, big_bmp)
    sim.reset()
    fresh = unique_image()

    async def run() -> list[tuple[int, dict[str, Any], int]]:
        out = []
        headers = {"Authorization": f"Bearer {gateway.key()}", "Content-Type": "image/bmp"}
        async with aiohttp.ClientSession() as session:
            for image in (big_bmp, big_bmp, fresh):  # two hits on one session, then a miss
                before = proxy.sent
                async with session.post(
                    proxy.url + ANALYZE,
                    data=io.BytesIO(image),  # raw bytes over 1 MiB make aiohttp warn (an error here)
                    headers={**headers, "Content-Digest": digest(image)},
                    expect100=True,
                ) as response:
                    out.append((response.status, await response.json(), proxy.sent - before))
        return out

    (s1, b1, sent1), (s2, b2, sent2), (s3, b3, sent3) = asyncio.run(run())
    assert (s1, s2, s3) == (200, 200, 200)
    assert b1["source"]["cached"] is True
    assert b2["source"]["cached"] is True
    assert sent1 < HIT_BYTES_MAX
    assert sent2 < HIT_BYTES_MAX
    assert b3["source"]["cached"] is False  # the miss: 100 Continue, then the body, checked against the digest
    assert sent3 > len(fresh)
    assert sim.calls == 1  # the miss
