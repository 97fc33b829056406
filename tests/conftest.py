"""Shared fixtures: a real simulator, real gateway processes, a real Redis.

Everything runs over loopback sockets. Redis: ``FACEGATE_TEST_REDIS_URL`` if set, else
127.0.0.1:6379 if it answers, else a throwaway ``redis-server`` on a free port; tests
that need Redis are skipped with the reason when none of these is possible. A real
Redis Cluster and a real Sentinel setup are started once per session when a test asks
for them (``redis_cluster``, ``redis_sentinel``). Each
gateway gets its own Redis key prefix, so tests never see each other's keys and nothing
is flushed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.tenants import OPERATOR_KEY_PREFIX, new_key, paste_line
from tests.imagegen import make_image
from tests.servers import (
    RedisClusterServer,
    RedisSentinelServer,
    RedisServer,
    ServerProcess,
    free_port,
    redis_pings,
    start_process,
)

SIM_KEY = "sim-test-key-0123456789"
PY = sys.executable
_seeds = itertools.count(1000)


def unique_image(fmt: str = "jpeg", width: int = 128, height: int = 128, **kw: Any) -> bytes:
    """A fresh image (never seen before in this test session: no cache interplay)."""
    return make_image(fmt, width, height, seed=next(_seeds), **kw)


# --- Redis -------------------------------------------------------------------------------


def throwaway_redis() -> RedisServer:
    """A throwaway redis-server, or a skip with the reason when none can be started."""
    try:
        return RedisServer()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; needed to stop/start Redis")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("FACEGATE_TEST_REDIS_URL")
    if url:
        if not redis_pings(url):
            pytest.fail(f"FACEGATE_TEST_REDIS_URL={url} does not answer PING")
        yield url
        return
    if redis_pings("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    if shutil.which("redis-server") is None:
        pytest.skip("no Redis: set FACEGATE_TEST_REDIS_URL, run one on 127.0.0.1:6379, or install redis-server")
    server = throwaway_redis()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A real Redis Cluster (3 primaries + 3 replicas) for the session; ``.url`` is redis+cluster://.

    Tests that kill a node call ``.restore()`` before they end, so the next test finds it whole.
    """
    try:
        cluster = RedisClusterServer()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; needed for the Redis Cluster tests")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServer]:
    """A real Sentinel setup (primary, replica, 3 sentinels) for the session; ``.url`` is redis+sentinel://."""
    try:
        setup = RedisSentinelServer()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; needed for the Sentinel tests")
    try:
        yield setup
    finally:
        setup.close()


TOPOLOGIES = ("single", "cluster", "sentinel")


def topology_url(request: pytest.FixtureRequest, kind: str) -> str:
    """``FACEGATE_REDIS_URL`` of a topology: one Redis, a Redis Cluster, or Sentinel."""
    if kind == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    if kind == "sentinel":
        return str(request.getfixturevalue("redis_sentinel").url)
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture(scope="session", params=TOPOLOGIES)
def redis_topology(request: pytest.FixtureRequest) -> str:
    """Each topology's URL in turn: a suite that takes this instead of ``redis_url`` runs once per
    topology (parametrised, not copied); the cluster and Sentinel are started once per session."""
    return topology_url(request, request.param)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; its keys are removed from the shared Redis afterwards (the cluster and
    Sentinel setups are the session's own)."""
    p = "t" + uuid.uuid4().hex[:12]
    yield p
    sync = redis.Redis.from_url(redis_url)
    try:
        keys = list(sync.scan_iter(f"{p}:*"))
        if keys:
            sync.delete(*keys)
    finally:
        sync.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may stop and restart."""
    server = throwaway_redis()
    try:
        yield server
    finally:
        server.close()


# --- simulator ---------------------------------------------------------------------------


@dataclass
class Sim:
    server: ServerProcess

    @property
    def url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        httpx.post(self.url + "/_sim/reset", timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/_sim/stats", timeout=5).json()
        return data

    @property
    def calls(self) -> int:
        return int(self.stats()["calls"])

    def faults(self, *faults: dict[str, Any], latency_ms: int = 0) -> None:
        httpx.post(
            self.url + "/_sim/faults", json={"faults": list(faults), "latency_ms": latency_ms}, timeout=5
        ).raise_for_status()


@pytest.fixture(scope="session")
def sim_server() -> Iterator[ServerProcess]:
    port = free_port()
    with start_process(
        [PY, "-m", "app.sim", "--port", str(port), "--key", SIM_KEY, "--faces", "hash"], None, port
    ) as server:
        yield server


@pytest.fixture
def sim(sim_server: ServerProcess) -> Sim:
    """The session's simulator, reset (counters zero, no faults) for this test."""
    s = Sim(sim_server)
    s.reset()
    return s


# --- gateway -----------------------------------------------------------------------------


@dataclass
class Gateway:
    server: ServerProcess
    keys: dict[str, str]
    tenants_file: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def key(self, tenant: str = "alpha") -> str:
        return self.keys[tenant]

    def client(self, tenant: str | None = "alpha", **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def analyze(self, image: bytes, tenant: str = "alpha", **kw: Any) -> httpx.Response:
        with self.client(tenant) as c:
            return c.post("/v1/faces/analyze", files={"image": ("x.jpg", image, "image/jpeg")}, **kw)

    def analyze_files(self, files: Any, tenant: str = "alpha", **kw: Any) -> httpx.Response:
        with self.client(tenant) as c:
            return c.post("/v1/faces/analyze", files=files, **kw)

    def logs(self) -> str:
        return self.server.output()

    def log_lines(self, logger: str, *, of: Sequence[str] = (), timeout: float = 10.0) -> list[dict[str, Any]]:
        """The JSON log lines of ``logger`` so far; with ``of`` (request ids), once each of those requests
        has one (or ``timeout`` has passed: the caller's assertion then says what is missing). The edge
        writes a request's access line after its answer has left, so a client that reads the log as
        soon as it has the answer can be there first (seen on a busy CPU); audit lines are written
        before the answer."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs()
            complete = text[: text.rfind("\n") + 1].splitlines()  # not a line still being written
            lines = [line for line in map(_json_line, complete) if line is not None and line.get("logger") == logger]
            if set(of) <= {line.get("request_id") for line in lines} or time.monotonic() >= deadline:
                return lines
            time.sleep(0.02)


def _json_line(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    line: dict[str, Any] = json.loads(text)
    return line


def write_tenants(
    path: Path,
    tenants: dict[str, dict[str, Any]],
    defaults: dict[str, Any] | None = None,
    operators: Sequence[str] = ("ops",),
) -> dict[str, str]:
    """Write a tenants file; returns each tenant's (fresh) key, and each operator's as ``operator:NAME``."""
    keys: dict[str, str] = {}
    lines = ["[defaults]"]
    for k, v in (
        defaults or {"rate_per_s": 1000, "burst": 1000, "daily_quota": 100000, "monthly_quota": 1000000}
    ).items():
        lines.append(_toml_line(k, v))
    for name, settings in tenants.items():
        key = settings.get("key") or new_key()
        keys[name] = key
        lines.append(f"\n[tenants.{name}]")
        lines.append(paste_line(key))
        for k, v in settings.items():
            if k != "key":
                lines.append(_toml_line(k, v))
    for name in operators:
        key = new_key(OPERATOR_KEY_PREFIX)
        keys[f"operator:{name}"] = key
        lines += [f"\n[operators.{name}]", paste_line(key)]
    path.write_text("\n".join(lines) + "\n")
    return keys


def _toml_line(k: str, v: Any) -> str:
    """One ``key = value`` line (JSON strings and arrays are valid TOML)."""
    if isinstance(v, bool):
        return f"{k} = {'true' if v else 'false'}"
    if isinstance(v, str | list | tuple):
        return f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
    return f"{k} = {v!r}"


def start_gateway(
    sim: Sim | None,
    tmp: Path,
    *,
    tenants: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    keys: dict[str, str] | None = None,
) -> Gateway:
    """Start ``facegate serve`` as a subprocess on a free port, against ``sim``."""
    tmp.mkdir(parents=True, exist_ok=True)
    tenants_file = tmp / "tenants.toml"
    if keys is None:
        tenants = tenants or {"alpha": {}, "beta": {}}
        if not tenants_file.exists():
            keys = write_tenants(tenants_file, tenants, defaults)
        else:
            raise RuntimeError("pass keys= when reusing a tenants file")
    port = free_port()
    full_env = {
        "FACEGATE_PORT": str(port),
        "FACEGATE_HOST": "127.0.0.1",
        "FACEGATE_TENANTS_FILE": str(tenants_file),
        "FACEGATE_LOG_FORMAT": "json",
        "FACEGATE_REDIS_PREFIX": "t" + uuid.uuid4().hex[:12],
        "FACEGATE_UPSTREAM_TIMEOUT_S": "10",
        "FACEGATE_UPSTREAM_QPS": "10000",
        "FACEGATE_UPSTREAM_MAX_CONCURRENCY": "500",
        "FACEGATE_SHUTDOWN_GRACE_S": "5",
        "PYTHONUNBUFFERED": "1",
    }
    if sim is not None:
        full_env["FACEGATE_UPSTREAM_URL"] = sim.url
        full_env["FACEGATE_UPSTREAM_API_KEY"] = SIM_KEY
    full_env.update(env or {})
    server = start_process([PY, "-m", "app", "serve"], full_env, port, cwd=tmp)
    return Gateway(server, keys, tenants_file, full_env)


#: Parameter values that put a test on a Redis Cluster or on Sentinel (``redis_topology``, the
#: cache suite's backends, a test's own ``kind``).
_TOPOLOGY_PARAMS = {
    "cluster": "cluster",
    "redis-cluster": "cluster",
    "sentinel": "sentinel",
    "redis-sentinel": "sentinel",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Multi-process suites (``tests/integration/``) run on a Cluster or on Sentinel only where the
    test's claim is about the topology: ``@pytest.mark.topology("cluster", "sentinel")`` names the
    topologies a test must also pass on (hash tags and slots, sharded pub/sub, Sentinel's master
    client, failover); the single-Redis run proves the rest. Unit suites run on every topology
    (they are cheap)."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        kinds = {_TOPOLOGY_PARAMS[v] for v in params.values() if isinstance(v, str) and v in _TOPOLOGY_PARAMS}
        marker = item.get_closest_marker("topology")
        allowed = set(marker.args) if marker else set()
        if kinds and "/tests/integration/" in str(item.path) and not kinds <= allowed:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_configure(config: pytest.Config) -> None:
    # A developer's own FACEGATE_* settings must not leak into test gateways.
    for name in [n for n in os.environ if n.startswith("FACEGATE_") and not n.startswith("FACEGATE_TEST_")]:
        del os.environ[name]


@pytest.fixture
def gateway_factory(sim: Sim, tmp_path: Path) -> Iterator[Any]:
    """Start gateways with custom settings; all are stopped at the end of the test."""
    started: list[Gateway] = []
    counter = itertools.count()

    def start(**kw: Any) -> Gateway:
        kw.setdefault("tmp", tmp_path / f"gw{next(counter)}")
        gw = start_gateway(kw.pop("sim", sim), kw.pop("tmp"), **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.server.stop()


@pytest.fixture(scope="session")
def shared_gateway(sim_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One in-memory gateway for the many tests that need no special settings."""
    gw = start_gateway(Sim(sim_server), tmp_path_factory.mktemp("shared-gw"))
    try:
        yield gw
    finally:
        gw.server.stop()


@pytest.fixture
def gateway(shared_gateway: Gateway, sim: Sim) -> Gateway:
    """The shared gateway, with the simulator reset for this test."""
    return shared_gateway
