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
