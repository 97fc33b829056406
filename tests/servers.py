"""Start a server as a real subprocess for tests, and always take it down again.

Integration tests talk to the simulator and the gateway over real sockets, as
production does; a subprocess also keeps their event loops, signal handlers and
logging apart from pytest's. Output goes to a temp file (a pipe nobody reads
could fill up and stall the server) and is shown if the server fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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
    its output; by default it is discarded. ``args`` are extra ``redis-server`` options
    (cluster mode, ``--replicaof``…); ``sentinel`` starts it as a Sentinel instead.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log: Path | None = None,
        args: Sequence[str] = (),
        sentinel_conf: str | None = None,
    ) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="facegate-redis-")
        self._log_path = log
        self.args = list(args)
        self._sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = [self.binary]
        if self._sentinel_conf is not None:
            # Sentinel rewrites its config file (what it learnt about the master): it must be its own.
            conf = Path(self.dir) / "sentinel.conf"
            if not conf.exists():
                conf.write_text(self._sentinel_conf)
            argv += [str(conf), "--sentinel"]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir]
        if self._sentinel_conf is None:
            argv += ["--save", "", "--appendonly", "no", *self.args]
        out = self._log_path.open("ab") if self._log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own descriptor
        deadline = time.monotonic() + 10
        while not redis_pings(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no last replication, no goodbye to the cluster)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` (or ``CLUSTER INFO`` for section "cluster-state") as a dict; {} if unreachable."""
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
        try:
            if section == "cluster-state":
                raw = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
                return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            return {k: str(v) for k, v in client.info(section).items()}
        except redis.RedisError:
            return {}
        finally:
            client.close()


#: A replica's first sync starts at once (the default waits 5 s for more replicas to share it).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


def _replicas_acked(primary: RedisServer, replicas: int, key: str = "fixture:synced") -> bool:
    """True when ``replicas`` replicas have acknowledged a write to ``primary`` (``key``, in its slots).

    "Link up" is not enough: after a (diskless) full sync a Redis 7 primary holds back the
    command stream until the replica's first acknowledgement, up to a second later, and a
    primary lost in that second takes those writes with it. A write and WAIT on the same
    connection (WAIT counts acknowledgements of the connection's own last write).
    """
    import redis

    if replicas == 0:
        return True
    client = redis.Redis(port=primary.port, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.incr(key)
        return int(client.execute_command("WAIT", replicas, 500)) >= replicas
    except redis.RedisError:
        return False
    finally:
        client.close()


def _key_in(slots: str) -> str:
    """A key whose slot is in ``slots`` (CLUSTER NODES' "0-5460 …" form)."""
    from redis.crc import key_slot

    ranges = [tuple(int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
              for part in slots.split() if not part.startswith("[")]  # fmt: skip
    for i in range(100_000):
        key = f"fixture:synced:{i}"
        slot = key_slot(key.encode())
        if any(lo <= slot <= hi for lo, hi in ranges):
            return key
    raise RuntimeError(f"no key found for slots {slots}")


def _wait(what: str, check: Callable[[], bool], timeout: float, describe: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached after {timeout:.0f}s {describe()}".rstrip())
        time.sleep(0.05)


class RedisClusterServer:
    """A real Redis Cluster on loopback: ``masters`` primaries with one replica each.

    Built as operators do: ``redis-server --cluster-enabled yes`` per node, then
    ``redis-cli --cluster create … --cluster-replicas 1``. The node timeout is short
    (``node_timeout_ms``) so a killed primary is replaced in about two seconds.
    ``url`` is facegate's ``redis+cluster://`` address of all the nodes.
    Raises FileNotFoundError when ``redis-server`` or ``redis-cli`` is missing.
    """

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 1000, log: Path | None = None) -> None:
        import shutil

        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (apt-get install redis-tools)")
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # Any replica may be promoted, however long it was cut off (a test's failover must happen).
            "--cluster-replica-validity-factor", "0",
            # Keys on healthy shards stay usable while one shard fails over.
            "--cluster-require-full-coverage", "no",
            *FAST_SYNC,
        ]  # fmt: skip
        self.nodes: list[RedisServer] = []
        self._killed_slots = ""
        try:
            for _ in range(masters * 2):
                # The cluster bus port, explicit: the default (port + 10000) may be taken or over 65535.
                self.nodes.append(RedisServer(log=log, args=[*args, "--cluster-port", str(free_port())]))
            create = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            subprocess.run(
                [*create, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _view(self) -> list[dict[str, str]]:
        """``CLUSTER NODES`` as seen by the first running node: id, port, role, flags, slots."""
        import redis

        for node in self.nodes:
            if not node.running:
                continue
            client = redis.Redis(port=node.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
            try:
                raw = client.execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            finally:
                client.close()
            rows = []
            # redis-py parses CLUSTER NODES into {"host:port": {"flags": "...", "slots": [[lo, hi], ...]}}.
            for addr, node_info in (raw if isinstance(raw, dict) else {}).items():
                flags = str(node_info["flags"]).split(",")
                slots = " ".join(f"{lo}-{hi}" for lo, hi in node_info["slots"])
                rows.append(
                    {
                        "id": str(node_info["node_id"]),
                        "port": str(addr).rsplit(":", 1)[1].split("@")[0],
                        "role": "master" if "master" in flags else "replica",
                        "failed": "yes" if ("fail" in flags or "fail?" in flags) else "",
                        "slots": slots,
                    }
                )
            return rows
        return []

    def masters(self) -> list[RedisServer]:
        """The running nodes that currently serve slots as primaries."""
        by_port = {str(n.port): n for n in self.nodes}
        return [
            by_port[row["port"]]
            for row in self._view()
            if row["role"] == "master" and row["slots"] and not row["failed"] and by_port[row["port"]].running
        ]

    def healthy(self) -> bool:
        running = [n for n in self.nodes if n.running]
        for node in running:
            state = node.info("cluster-state")
            if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != "16384":
                return False
            if int(state.get("cluster_known_nodes", "0")) != len(self.nodes):
                return False
        view = self._view()
        alive = {str(n.port) for n in running}
        if len(view) != len(self.nodes) or any(r["failed"] for r in view if r["port"] in alive):
            return False
        for node in running:  # replicas in sync: a primary killed now loses nothing already replicated
            repl = node.info("replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        serving = [r for r in view if r["role"] == "master" and r["slots"]]
        if len(serving) != len(self.nodes) // 2 or any(r["role"] != "replica" for r in view if r not in serving):
            return False
        by_port = {str(n.port): n for n in self.nodes}
        replicas = {row["port"]: 0 for row in serving}
        for node in running:
            master_port = node.info("replication").get("master_port")
            if master_port in replicas:
                replicas[master_port] += 1
        return all(
            _replicas_acked(by_port[row["port"]], replicas[row["port"]], _key_in(row["slots"])) for row in serving
        )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok, all 16384 slots served, nobody failing."""
        _wait("redis cluster healthy", self.healthy, timeout, lambda: repr(self._view()))

    def kill_master(self, key: str | None = None) -> RedisServer:
        """SIGKILL a primary (the one serving ``key``'s slot if given) and return it."""
        victim = self.master_for(key) if key is not None else self.masters()[0]
        self._killed_slots = next(r["slots"] for r in self._view() if r["port"] == str(victim.port))
        victim.kill()
        return victim

    def master_for(self, key: str) -> RedisServer:
        import redis

        client = redis.Redis(port=self.masters()[0].port, socket_timeout=1, decode_responses=True)
        try:
            slot = int(str(client.execute_command("CLUSTER KEYSLOT", key)))
        finally:
            client.close()
        for row in self._view():
            if row["role"] != "master" or row["failed"]:
                continue
            for part in row["slots"].split():
                if part.startswith("["):
                    continue  # a slot being migrated
                lo, _, hi = part.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return next(n for n in self.nodes if str(n.port) == row["port"])
        raise RuntimeError(f"no master serves slot {slot}")

    def wait_failover(self, victim: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Until a replica has taken over ``victim``'s slots and the cluster is ok; returns the new primary."""
        _wait(
            "redis cluster failover",
            lambda: (
                any(n.info("cluster-state").get("cluster_state") == "ok" for n in self.nodes if n.running)
                and len(self.masters()) == len(self.nodes) // 2
            ),
            timeout,
            lambda: repr(self._view()),
        )
        row = next(r for r in self._view() if r["role"] == "master" and r["slots"] == self._killed_slots)
        return next(n for n in self.nodes if str(n.port) == row["port"])

    def restore(self, timeout: float = 30.0) -> None:
        """Restart every stopped node (it rejoins as a replica) and wait until all is healthy again."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy(timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisSentinelServer:
    """A real Sentinel setup on loopback: one primary, one replica, three sentinels (quorum 2).

    Short ``down-after-milliseconds`` and ``failover-timeout`` make a failover take about
    two seconds. ``url`` is facegate's ``redis+sentinel://`` address.
    """

    MASTER_NAME = "fgmaster"

    def __init__(self, *, down_after_ms: int = 500, failover_timeout_ms: int = 2000, log: Path | None = None) -> None:
        self.data: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []
        try:
            primary = RedisServer(log=log, args=FAST_SYNC)
            self.data.append(primary)
            self.data.append(RedisServer(log=log, args=[*FAST_SYNC, "--replicaof", "127.0.0.1", str(primary.port)]))
            name = self.MASTER_NAME
            conf = "\n".join(
                [
                    f"sentinel monitor {name} 127.0.0.1 {primary.port} 2",
                    f"sentinel down-after-milliseconds {name} {down_after_ms}",
                    f"sentinel failover-timeout {name} {failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                    "",
                ]
            )
            for _ in range(3):
                self.sentinels.append(RedisServer(log=log, sentinel_conf=conf))
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{name}"

    def master_port(self) -> int | None:
        """The primary's port as the sentinels see it (the majority's answer), None if they disagree."""
        import redis

        seen: list[int] = []
        for s in self.sentinels:
            if not s.running:
                continue
            client = redis.Redis(port=s.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
            try:
                addr = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
                if addr:
                    seen.append(int(addr[1]))
            except redis.RedisError:
                pass
            finally:
                client.close()
        if len(seen) >= 2 and len(set(seen)) == 1:
            return seen[0]
        return None

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(n for n in self.data if n.port == port)

    def healthy(self) -> bool:
        port = self.master_port()
        primary = next((n for n in self.data if n.port == port and n.running), None)
        if primary is None or primary.info("replication").get("role") != "master":
            return False
        # Every running data node is a replica of it, in sync; every sentinel knows the others.
        for node in self.data:
            if node is primary or not node.running:
                continue
            repl = node.info("replication")
            if repl.get("role") != "slave" or repl.get("master_port") != str(port):
                return False
            if repl.get("master_link_status") != "up":
                return False
        for s in self.sentinels:
            if f"'sentinels': {len(self.sentinels)}" not in s.info("sentinel").get("master0", ""):
                return False  # redis-py parses master0 into a dict: its str is what info() keeps
        return _replicas_acked(primary, sum(1 for n in self.data if n.running) - 1)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        _wait("redis sentinel setup healthy", self.healthy, timeout)

    def kill_master(self) -> RedisServer:
        victim = self.master()
        victim.kill()
        return victim

    def wait_failover(self, victim: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Until the sentinels agree on a new primary that answers as one; returns it."""

        def promoted() -> bool:
            port = self.master_port()
            node = next((n for n in self.data if n.port == port and n.running), None)
            return node is not None and node is not victim and node.info("replication").get("role") == "master"

        _wait("sentinel failover", promoted, timeout)
        return self.master()

    def restore(self, timeout: float = 30.0) -> None:
        """Restart stopped nodes, an old primary as a replica of the new one (as an orchestrator
        would; the sentinels would convert it too, but only after about ten seconds)."""
        port = self.master_port()
        for node in self.data:
            if not node.running:
                if port is not None and node.port != port:
                    node.args = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(port)]
                node.start()
        for node in self.sentinels:
            if not node.running:
                node.start()
        self.wait_healthy(timeout)

    def close(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.close()


def redis_client(url: str) -> Any:
    """A synchronous client for any of facegate's Redis URLs (tests peek at keys with it)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.sentinel import Sentinel

    from app.redisurl import parse

    target = parse(url)
    if target.kind == "single":
        return redis.Redis.from_url(url)
    nodes = list(target.nodes)
    if target.kind == "cluster":
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], require_full_coverage=False)
    return Sentinel(nodes, socket_timeout=2).master_for(target.master, socket_timeout=2)


class ByteCountingProxy:
    """A TCP proxy on loopback that counts the bytes clients send through it to ``target``, and
    their round trips.

    What arrives here is what the client put on the wire toward the server, so it proves
    what the server *could* have received, whatever the server does with it. A round trip is
    a client sending (one or more segments) and then waiting for the reply: a pipeline is
    one; pushes from the server (pub/sub) are none. ``background``: SHA1s of scripts whose
    calls are a client's own periodic work (a heartbeat): a round trip that starts with one
    counts in ``background_trips`` instead. Runs in its own thread with its own event loop;
    use it as a context manager.
    """

    def __init__(self, target_host: str, target_port: int, background: tuple[str, ...] = ()) -> None:
        self.target = (target_host, target_port)
        self.sent = 0  # bytes from clients toward the target
        self.returned = 0  # bytes from the target back to clients
        self.round_trips = 0
        self.background_trips = 0
        self._background = tuple(sha.encode() for sha in background)
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="byte-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: Any, writer: Any) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        waiting = False

        async def pump(src: Any, dst: Any, upstream: bool) -> None:
            nonlocal waiting
            try:
                while data := await src.read(65536):
                    if upstream:
                        self.sent += len(data)
                        if not waiting:
                            waiting = True
                            if any(sha in data[:80] for sha in self._background):
                                self.background_trips += 1
                            else:
                                self.round_trips += 1
                    else:
                        self.returned += len(data)
                        waiting = False
                    dst.write(data)
                    await dst.drain()
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        for w in (writer, up_writer):
            w.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ByteCountingProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ReplyDroppingProxy:
    """TCP proxies to Redis servers that can lose one reply (the command reaches Redis and runs,
    Redis answers, and the client's connection is cut before the answer reaches it), or every
    connection for a while (``cut``/``mend``: a network partition).

    That is what a network cut or a proxy restart does at the worst moment; a client that
    then sends the command again runs it twice. One listening port per target (``ports``:
    target port -> proxy port; ``url`` is the first target's); runs on the caller's event loop
    (``async with``). ``arm(b"EVALSHA")`` loses the reply of the next command, on any of the
    targets, that contains those bytes.
    """

    def __init__(self, *targets: tuple[str, int]) -> None:
        self.targets = targets
        self.ports: dict[int, int] = {}
        self.dropped = 0
        #: Round trips clients made: each time a client sends after its last answer (or first).
        self.round_trips = 0
        self._match: bytes | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[self.targets[0][1]]}/0"

    def arm(self, match: bytes) -> None:
        self._match = match.upper()

    def cut(self) -> None:
        """Cut every connection and refuse new ones (a network partition) until :meth:`mend`."""
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def mend(self) -> None:
        self._cut = False

    async def __aenter__(self) -> ReplyDroppingProxy:
        for host, port in self.targets:
            server = await asyncio.start_server(functools.partial(self._handle, target=(host, port)), "127.0.0.1", 0)
            self._servers.append(server)
            self.ports[port] = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int]
    ) -> None:
        if self._cut:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection(*target)
        lose_next = asyncio.Event()
        waiting = False

        async def to_redis() -> None:
            nonlocal waiting
            while data := await reader.read(65536):
                if not waiting:
                    waiting = True
                    self.round_trips += 1
                if self._match is not None and self._match in data.upper():
                    self._match = None
                    lose_next.set()  # before Redis can answer
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            nonlocal waiting
            while data := await up_reader.read(65536):
                waiting = False
                if lose_next.is_set():  # Redis ran it and answered: the answer is lost
                    self.dropped += 1
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()

        try:
            pumps = [asyncio.ensure_future(to_redis()), asyncio.ensure_future(to_client())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            up_writer.close()
            writer.close()
            self._tasks.discard(task)
            self._writers.discard(writer)
