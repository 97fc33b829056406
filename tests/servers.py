"""Start a server as a real subprocess for tests, and always take it down again.

Integration tests talk to the simulator and the gateway over real sockets, as
production does; a subprocess also keeps their event loops, signal handlers and
logging apart from pytest's. Output goes to a temp file (a pipe nobody reads
could fill up and stall the server) and is shown if the server fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS may hand it out again; rarely matters on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A running server subprocess: ``.url``, ``.output()``, ``.stop()``; also a context manager."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path, log_file: object) -> None:
        self.proc = proc
        self.url = url
        self._log_path = log_path
        self._log_file = log_file

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        close = getattr(self._log_file, "close", None)
        if close is not None:
            close()
        self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_process(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    port: int,
    *,
    host: str = "127.0.0.1",
    ready_path: str = "/healthz",
    timeout: float = 20.0,
    cwd: Path | None = None,
) -> ServerProcess:
    """Run ``argv`` (which must listen on ``host:port``) and wait until ``ready_path`` answers 200.

    ``env`` is added to a copy of this process's environment. Raises RuntimeError, with
    the server's output, if it exits or is not ready in time; the process is killed then.
    """
    fd, name = tempfile.mkstemp(prefix="facegate-server-", suffix=".log")
    log_file = os.fdopen(fd, "wb")
    proc = subprocess.Popen(
        list(argv),
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(proc, f"http://{host}:{port}", Path(name), log_file)
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(timeout=1.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{server.output()}")
                try:
                    if client.get(server.url + ready_path).status_code == 200:
                        return server
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} not ready after {timeout}s:\n{server.output()}")
                time.sleep(0.05)
    except BaseException:
        server.stop()
        raise


def redis_pings(url: str) -> bool:
    """True when a Redis answers PING at ``url`` within half a second."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


class RedisServer:
    """A throwaway redis-server on loopback (no persistence) that its owner may stop and start.

    Raises FileNotFoundError when ``redis-server`` is not installed. ``log`` (a path) keeps
    its output; by default it is discarded.
    """

    def __init__(self, port: int | None = None, *, log: Path | None = None) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="facegate-redis-")
        self._log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        out = self._log_path.open("ab") if self._log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [*argv, "--dir", self.dir], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own descriptor
        deadline = time.monotonic() + 10
        while not redis_pings(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
