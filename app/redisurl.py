"""Where Redis is: ``FACEGATE_REDIS_URL`` read as one of three topologies.

Pure parsing (no redis-py import): :mod:`app.settings` validates with it at start and
:mod:`app.redisconn` connects with what it returns. The forms are the ones operators
know from redis-py, alisaifee/limits and Envoy's ratelimit::

    redis://[user:pass@]host[:port][/db][?opts]        one Redis (rediss:// = TLS; unix:///path)
    redis+cluster://[user:pass@]host[:port][,host[:port]…][?opts]
                                                       Redis Cluster: a few seed nodes, the rest
                                                       is discovered (rediss+cluster:// = TLS)
    redis+sentinel://[user:pass@]host[:port][,host[:port]…]/master-name[/db][?opts]
                                                       Sentinel: the sentinels' addresses and the
                                                       monitored master's name (rediss+sentinel://
                                                       = TLS to the sentinels and the data nodes)

Credentials in the URL authenticate to the data nodes (a cluster's nodes, Sentinel's
master); a sentinel's own password is ``FACEGATE_REDIS_SENTINEL_PASSWORD``. ``opts`` are
redis-py's URL options (``ssl_ca_certs``, ``ssl_cert_reqs``…) and apply to every node.
Error messages never contain the URL (it may hold a password).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["single", "cluster", "sentinel"]

SINGLE_SCHEMES: Final = ("redis", "rediss", "unix")
#: scheme → (topology, TLS, default port)
TOPOLOGY_SCHEMES: Final[dict[str, tuple[Kind, bool, int]]] = {
    "redis+cluster": ("cluster", False, 6379),
    "rediss+cluster": ("cluster", True, 6379),
    "redis+sentinel": ("sentinel", False, 26379),
    "rediss+sentinel": ("sentinel", True, 26379),
}
SCHEMES_HELP: Final = (
    "must be empty or start with redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, "
    "redis+sentinel:// or rediss+sentinel://"
)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``FACEGATE_REDIS_URL``.

    ``options_url`` is a plain ``redis://``/``rediss://`` URL of the first node carrying the
    credentials, db and options: redis-py's own URL parser reads the connection options from
    it, so every topology accepts exactly the options a single Redis does.
    """

    kind: Kind
    options_url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    tls: bool = False


def parse(url: str) -> RedisTarget:
    """Read ``url``; ValueError (never echoing the URL) when it is not one of the forms above."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or (scheme not in SINGLE_SCHEMES and scheme not in TOPOLOGY_SCHEMES):
        raise ValueError(SCHEMES_HELP)
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    kind, tls, default_port = TOPOLOGY_SCHEMES[scheme]
    rest, qmark, query = rest.partition("?")
    userinfo, at, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    nodes = tuple(_node(part, default_port) for part in hosts.split(","))
    path = path.strip("/")
    master, db = "", "0"
    if kind == "cluster":
        if path not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: no path after the node list")
    else:
        master, _, db = path.partition("/")
        db = db or "0"
        if not master:
            raise ValueError("redis+sentinel:// needs the master's name after the sentinels: …/master-name")
        if not db.isdigit():
            raise ValueError("the database after the master's name must be a number")
    host, port = nodes[0]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options_url = f"{'rediss' if tls else 'redis'}://{userinfo}{at}{netloc}/{db}{qmark}{query}"
    return RedisTarget(kind, options_url, nodes, master, tls)


def _node(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else tail
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("every node needs a host: host[:port][,host[:port]…]")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("a node's port must be a number from 1 to 65535")
    return host, int(port_text)


def masked(url: str) -> str:
    """``url`` with its credentials replaced by ``**********`` (for ``facegate check``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, qmark, query = rest.partition("?")
    if "@" in head:
        head = "**********@" + head.rsplit("@", 1)[1]
    if "password=" in query:
        query = "&".join("password=**********" if p.startswith("password=") else p for p in query.split("&"))
    return f"{scheme}://{head}{qmark}{query}"
