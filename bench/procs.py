"""Processes the harness starts and always stops: simulator, gateways, baseline, nginx, Redis.

Every server is a real subprocess on a free loopback port, started the way production
starts it (``python -m app serve`` for the gateway). Output goes to a log file in the
run's work directory, shown when a server fails to start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.servers import RedisServer, redis_pings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SIM_KEY = "bench-sim-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any FACEGATE_* setting (a developer's own must not
    leak into a benchmarked server), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Server:
    """A running subprocess listening on ``port``; ``stop()`` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.scanned = False  # whether its log was checked for warnings (bench.rows)
        self.log_path = workdir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, path: str = "/healthz", timeout: float = 30.0) -> Server:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
                try:
                    if client.get(self.url + path).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.output()[-4000:]}")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its children (nginx's worker), from /proc."""
        return tree_cpu_seconds(self.pid)

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) and the RSS split (anonymous, file-backed, shmem), in kB, from /proc."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
        return out


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields after the command name: state, ppid, ...


def tree_cpu_seconds(pid: int) -> float:
    """CPU (utime + stime) of ``pid`` and its direct children, in seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                pids.append(int(entry.name))
    total = 0.0
    for p in pids:
        fields = _stat(p)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime (fields 14, 15 of stat)
    return total


# --- simulator -------------------------------------------------------------------------


class Sim:
    def __init__(self, workdir: Path) -> None:
        port = free_port()
        argv = [PY, "-m", "app.sim", "--port", str(port), "--key", SIM_KEY, "--faces", "hash"]
        self.server = Server("sim", argv, clean_env(), port, workdir).wait_ready()
        self.url = self.server.url

    def set_latency(self, ms: int) -> None:
        httpx.post(self.url + "/_sim/faults", json={"faults": [], "latency_ms": ms}, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/_sim/reset", timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/_sim/stats", timeout=5).json()
        return data

    def calls(self) -> int:
        return int(self.stats()["calls"])

    def limits(self, **limits: Any) -> None:
        httpx.post(self.url + "/_sim/limits", json=limits, timeout=5).raise_for_status()

    def accounts(self, balances: dict[str, float | None] | None = None) -> dict[str, Any]:
        """Set key balances (adding keys) when given; every key's balance and counters."""
        if balances:
            body = {"keys": {k: {"balance": v} for k, v in balances.items()}}
            httpx.post(self.url + "/_sim/keys", json=body, timeout=5).raise_for_status()
        data: dict[str, Any] = httpx.get(self.url + "/_sim/keys", timeout=5).json()
        return data

    def stop(self) -> None:
        self.server.stop()


# --- gateway -----------------------------------------------------------------------------


def gateway_env(
    sim: Sim,
    tenants_file: Path,
    *,
    redis_url: str = "",
    prefix: str | None = None,
    log_level: str = "warning",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Production-like settings, with limits out of the way of the measurement."""
    env = {
        "FACEGATE_HOST": "127.0.0.1",
        "FACEGATE_TENANTS_FILE": str(tenants_file),
        "FACEGATE_LOG_LEVEL": log_level,
        "FACEGATE_LOG_FORMAT": "json",
        "FACEGATE_UPSTREAM_URL": sim.url,
        "FACEGATE_UPSTREAM_API_KEY": SIM_KEY,
        "FACEGATE_UPSTREAM_QPS": "100000",
        "FACEGATE_UPSTREAM_MAX_CONCURRENCY": "1000",
        "FACEGATE_UPSTREAM_TIMEOUT_S": "30",
        # Short-lived entries: a benchmark must not leave a week of keys in a shared Redis.
        "FACEGATE_CACHE_TTL_S": "900",
        "FACEGATE_CACHE_NEGATIVE_TTL_S": "900",
        "FACEGATE_SHUTDOWN_GRACE_S": "2",
        "FACEGATE_REDIS_URL": redis_url,
        "FACEGATE_REDIS_PREFIX": prefix or new_prefix(),
    }
    env.update(extra or {})
    if env.get("FACEGATE_UPSTREAM_KEYS_FILE"):  # a key pool replaces the single key
        del env["FACEGATE_UPSTREAM_API_KEY"]
    return env


def new_prefix() -> str:
    return "bench" + uuid.uuid4().hex[:10]


def start_gateway(name: str, env: Mapping[str, str], workdir: Path) -> Server:
    """``python -m app serve``: one uvicorn worker, exactly as in production."""
    port = free_port()
    full = clean_env({**env, "FACEGATE_PORT": str(port)})
    return Server(name, [PY, "-m", "app", "serve"], full, port, workdir).wait_ready()


def start_baseline(body_file: Path, workdir: Path) -> Server:
    port = free_port()
    argv = [PY, "-m", "bench.baseline_app", "--port", str(port), "--body", str(body_file)]
    env = clean_env({"PYTHONPATH": str(ROOT)})
    return Server("baseline", argv, env, port, workdir).wait_ready()


# --- nginx -------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
{user}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_max_body_size 32m;
    client_body_buffer_size 1m;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        default_type application/json;
        location = /healthz {{ return 200 "ok"; }}
        # A POST to a static file is a 405 in nginx; serve the file anyway (the body is read
        # and discarded), so the ceiling includes receiving the same upload.
        location / {{ error_page 405 =200 $uri; }}
    }}
}}
"""


def start_nginx(answer: bytes, workdir: Path) -> Server | None:
    """nginx (one worker) serving ``answer`` as a static JSON file, or None if nginx is missing."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        return None
    root = workdir / "nginx"
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "answer.json").write_bytes(answer)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=root, port=port, user=user))
    return Server("nginx", [binary, "-c", str(conf), "-p", str(root)], clean_env(), port, workdir).wait_ready()


# --- Redis -------------------------------------------------------------------------------


def shared_redis(workdir: Path) -> tuple[str | None, RedisServer | None, str]:
    """The Redis the rows use: FACEGATE_TEST_REDIS_URL, else :6379 if it answers, else our own."""
    url = os.environ.get("FACEGATE_TEST_REDIS_URL")
    if url:
        if redis_pings(url):
            return url, None, f"FACEGATE_TEST_REDIS_URL ({_redis_version(url)})"
        return None, None, f"FACEGATE_TEST_REDIS_URL={url} does not answer PING"
    if redis_pings("redis://127.0.0.1:6379/0"):
        url = "redis://127.0.0.1:6379/0"
        return url, None, f"the machine's Redis on 127.0.0.1:6379 ({_redis_version(url)})"
    try:
        own = RedisServer(log=workdir / "redis.log")
    except (FileNotFoundError, RuntimeError) as exc:
        return None, None, f"no Redis ({exc}); Redis rows skipped"
    return own.url, own, f"redis-server started by the harness ({_redis_version(own.url)})"


def _redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return "Redis " + str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def delete_prefixes(url: str, prefixes: Sequence[str]) -> int:
    """Remove this run's keys from a shared Redis (by our unique prefixes; never FLUSHDB)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    removed = 0
    try:
        for prefix in prefixes:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(client.unlink(*batch))
    finally:
        client.close()
    return removed
