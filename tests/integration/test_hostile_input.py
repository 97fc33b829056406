"""The hostile corpus (``tests/hostile/corpus.py``) against one real gateway process.

Each case is written to a raw socket exactly as the corpus says (lies, stalls and all),
and must get its documented answer within its bound. Refused cases must cost nothing —
no upstream call, no quota — and legitimate oddities exactly one call and one charge.
At the end the gateway must still be healthy, its logs free of tracebacks, and its
memory (``/proc/<pid>/status``) bounded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import Gateway, Sim, start_gateway
from tests.hostile.corpus import BODY_TIMEOUT_S, MAX_PIXELS, Case, Step, corpus
from tests.servers import ServerProcess

CASES = corpus()


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert sum(c.expect.legit for c in CASES) >= 6


@dataclass
class Reply:
    status: int  # 0: closed without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0


def _parse(data: bytes) -> tuple[Reply, bool] | None:
    """The final response in ``data`` (1xx skipped), and whether its body is complete."""
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        rest = data[end + 4 :]
        if 100 <= status < 200:
            data = rest
            continue
        length = int(headers.get("content-length", "0"))
        return Reply(status, headers, rest[:length]), len(rest) >= length


def send(url: str, steps: list[Step], timeout: float) -> Reply:
    """Play ``steps`` on a fresh connection while reading the answer; stop sending once answered."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    received = bytearray()
    answered = threading.Event()
    finished: list[float] = []
    started = time.monotonic()

    def read() -> None:
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
                parsed = _parse(bytes(received))
                if parsed is not None and parsed[1]:
                    break
        except OSError:
            pass
        finished.append(time.monotonic())
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for step in steps:
            if answered.is_set():
                break
            if isinstance(step, float):
                answered.wait(step)
                continue
            view = memoryview(step)
            for at in range(0, len(view), 256 * 1024):
                if answered.is_set():
                    break
                sock.sendall(view[at : at + 256 * 1024])
    except OSError:
        pass  # the server refused and closed while we were still sending: read what it said
    answered.wait(timeout)
    reader.join(1)
    sock.close()
    parsed = _parse(bytes(received))
    reply = parsed[0] if parsed is not None else Reply(0)
    reply.elapsed = (finished[0] if finished else time.monotonic()) - started
    return reply


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


@pytest.fixture(scope="module")
def hostile(
    sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, dict[str, int]]]:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "spool").mkdir()
    gw = start_gateway(
        Sim(sim_server),
        tmp,
        env={
            "FACEGATE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "FACEGATE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
            "FACEGATE_SPOOL_DIR": str(tmp / "spool"),
        },
    )
    # Warm up (imports, first request) so the memory baseline is the steady state.
    with gw.client() as c:
        c.get("/v1/usage")
    try:
        yield gw, proc_status(gw.server.proc.pid)
    finally:
        gw.server.stop()


def quota_used(gw: Gateway) -> int:
    with gw.client() as c:
        used: int = c.get("/v1/usage").json()["quotas"]["daily"]["used"]
    return used


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_its_documented_answer(
    hostile: tuple[Gateway, dict[str, int]], sim: Sim, case: Case
) -> None:
    gw, _ = hostile
    expect = case.expect
    before = quota_used(gw)
    reply = send(gw.url, case.build(gw.key()), timeout=expect.within_s + 5)
    detail = f"{case.name}: {reply.status} {reply.body[:300]!r} ({expect.why})"
    assert reply.status == expect.status, detail
    assert reply.elapsed <= expect.within_s, f"{case.name} took {reply.elapsed:.2f} s"
    assert b"Traceback" not in reply.body
    if expect.code is not None:
        assert reply.headers["content-type"] == "application/problem+json", detail
        problem = orjson.loads(reply.body)
        assert problem["code"] == expect.code, detail
        assert problem["request_id"] == reply.headers["x-request-id"]
    elif expect.status not in (0, 200):
        # Refused by the HTTP layer: plain text, and the connection does not live on.
        assert reply.headers.get("connection") == "close", detail
    if expect.legit:
        body = orjson.loads(reply.body)
        assert body["schema_version"] == "1"
        assert sim.calls == 1, "a legitimate image is one upstream call"
        assert quota_used(gw) == before + 1
    else:
        assert sim.calls == 0, "a refused request must not reach the upstream"
        assert quota_used(gw) == before, "a refused request must not spend quota"


def test_gateway_survived_the_corpus(hostile: tuple[Gateway, dict[str, int]], sim: Sim) -> None:
    gw, baseline = hostile
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
    logs = gw.logs()
    assert "Traceback" not in logs
    assert "unhandled error" not in logs
    now = proc_status(gw.server.proc.pid)
    # Generous bounds: 20 MB bodies stream through a spool file, never into memory whole.
    assert now["VmHWM"] - baseline["VmRSS"] < 120 * 1024, (baseline, now)
    assert now["VmRSS"] - baseline["VmRSS"] < 60 * 1024, (baseline, now)
    print(
        f"gateway memory: baseline {baseline['VmRSS'] // 1024} MB, now {now['VmRSS'] // 1024} MB, "
        f"peak {now['VmHWM'] // 1024} MB"
    )
