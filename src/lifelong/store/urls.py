"""Where a feature store or an event stream lives: one URL parser and one Redis connect path.

Stores (:func:`lifelong.store.feature_store.open_store`) and streams
(:func:`lifelong.store.stream.open_stream`) take the same forms of URL, each naming a backend:

- ``redis://host:port/db`` (``rediss://`` for TLS): a Redis server, shared by many hosts;
- ``redis-cluster://host:port[,host:port...]``: a Redis Cluster, reached through any of these
  seed nodes (a cluster has database 0 only, so the URL names none);
- ``lmdb:///absolute/path`` (stores) or ``log:///absolute/path`` (streams): an embedded backend
  in a directory, percent-escapes decoded;
- a plain directory path: the embedded backend too.

:func:`parse_url` checks a URL against a :class:`UrlKind` and says which backend it names;
:func:`connect_redis` is the one way to reach a Redis server or cluster, and
:func:`cluster_unavailable` says in one line which node of a cluster failed. This module imports
neither ``lmdb`` nor ``redis`` (its functions import ``redis`` when called), so a process that
opens no backend never loads them.

Example::

    >>> parse_url("lmdb:///srv/my%20store", FEATURE_STORE)
    ParsedUrl(scheme='lmdb', location='/srv/my store', params={})
    >>> parse_url("redis://10.0.0.5:6379/0?key=ev", EVENT_STREAM)
    ParsedUrl(scheme='redis', location='redis://10.0.0.5:6379/0', params={'key': 'ev'})
    >>> parse_url("redis-cluster://10.0.0.5:7000,10.0.0.6:7000", FEATURE_STORE).cluster
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlparse

from lifelong.core.errors import ConfigError, StoreUnavailable

if TYPE_CHECKING:
    import redis
    from redis.cluster import RedisCluster

__all__ = [
    "EVENT_STREAM", "FEATURE_STORE", "STORE_HELP", "STREAM_HELP", "ParsedUrl", "UrlKind", "check_redis_cluster_url",
    "check_redis_url", "cluster_nodes", "cluster_unavailable", "connect_redis", "parse_url", "unreachable_errors",
]

STORE_HELP = ("A store URL: PATH or lmdb:///PATH (LMDB, embedded), redis://HOST:PORT/DB or "
              "redis-cluster://HOST:PORT[,HOST:PORT...] (Redis Cluster seed nodes).")
"""Command-line help of every ``--store`` option."""

STREAM_HELP = ("Event stream: a path or log:///PATH (embedded append-only log), redis://HOST:PORT/DB[?key=K] or "
               "redis-cluster://HOST:PORT[,HOST:PORT...][?key=K&partitions=N]")
"""Command-line help of every ``--stream`` option (the command appends its default)."""

REDIS_SCHEMES = ("redis", "rediss")
CLUSTER_SCHEME = "redis-cluster"


@dataclass(frozen=True)
class UrlKind:
    """What a URL may name: the embedded backend's scheme and the query a Redis URL may carry.

    Args:
        noun: what is opened, in messages (``"feature store"``).
        file_scheme: the embedded backend's scheme (``"lmdb"``).
        file_name: the embedded backend's name in messages (``"LMDB"``).
        expected: the accepted forms, in messages.
        redis_params: query parameters a Redis URL may carry, each at most once (stripped
            from :attr:`ParsedUrl.location`, returned in :attr:`ParsedUrl.params`).
        cluster_params: the same for a Redis Cluster URL.
    """

    noun: str
    file_scheme: str
    file_name: str
    expected: str
    redis_params: tuple[str, ...] = ()
    cluster_params: tuple[str, ...] = ()


FEATURE_STORE = UrlKind("feature store", "lmdb", "LMDB",
                        "redis://host:port/db, lmdb:///absolute/path or a directory path "
                        "(or redis-cluster://host:port[,host:port...])")
EVENT_STREAM = UrlKind("event stream", "log", "log",
                       "redis://host:port/db[?key=name], log:///absolute/path or a directory path "
                       "(or redis-cluster://host:port[,host:port...][?key=name&partitions=n])",
                       redis_params=("key",), cluster_params=("key", "partitions"))


@dataclass(frozen=True)
class ParsedUrl:
    """A checked URL.

    Args:
        scheme: the backend: ``"redis"`` (also for ``rediss://`` and ``redis-cluster://``: code
            that treats every Redis URL alike, e.g. as not copyable, then treats a cluster so too)
            or the kind's ``file_scheme`` (also for a plain path).
        location: for Redis the server's (or cluster's) URL without the query, else the
            directory path.
        params: the Redis query parameters given (see :attr:`UrlKind.redis_params`).
    """

    scheme: str
    location: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        """Whether the URL names a Redis Cluster (``redis-cluster://``)."""
        return self.location.startswith(f"{CLUSTER_SCHEME}://")


def check_redis_url(url: str) -> str:
    """``url`` if it is ``redis://host:port/db`` (or ``rediss://``) with ``db`` a number and no query.

    Raises:
        ConfigError: anything else: redis-py would accept some of these and silently use
            another database.

    Example::

        >>> check_redis_url("redis://localhost:6379/x")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: bad Redis URL 'redis://localhost:6379/x': expected redis://host:port/db with db a number
    """
    parsed = urlparse(url)
    db = parsed.path.lstrip("/")
    try:  # .port raises on a non-numeric port
        valid = (parsed.scheme in REDIS_SCHEMES and bool(parsed.hostname) and parsed.port != 0
                 and (db == "" or db.isdigit()) and not parsed.query and not parsed.fragment)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"bad Redis URL {url!r}: expected redis://host:port/db with db a number")
    return url


def check_redis_cluster_url(url: str) -> str:
    """``url`` if it is ``redis-cluster://host:port[,host:port...]`` (a trailing ``/`` or ``/0``
    allowed) with no query; see :func:`cluster_nodes`.

    Raises:
        ConfigError: anything else, in one line: no node, a node without a valid port, or a
            database other than 0 (a cluster has database 0 only).

    Example::

        >>> check_redis_cluster_url("redis-cluster://10.0.0.5:7000/1")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: bad Redis Cluster URL 'redis-cluster://10.0.0.5:7000/1': a cluster has database 0 only (drop '/1')
    """
    cluster_nodes(url)
    return url


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes ``(host, port)`` of a Redis Cluster URL, checked.

    Raises:
        ConfigError: see :func:`check_redis_cluster_url`.

    Example::

        >>> cluster_nodes("redis-cluster://10.0.0.5:7000,[::1]:7001/")
        [('10.0.0.5', 7000), ('::1', 7001)]
    """
    parsed = urlparse(url)
    expected = "expected redis-cluster://host:port[,host:port...] (seed nodes, no database)"
    if parsed.scheme != CLUSTER_SCHEME or parsed.query or parsed.fragment:
        raise ConfigError(f"bad Redis Cluster URL {url!r}: {expected}")
    if parsed.path not in ("", "/", "/0"):
        raise ConfigError(f"bad Redis Cluster URL {url!r}: a cluster has database 0 only (drop {parsed.path!r})")
    if not parsed.netloc:
        raise ConfigError(f"bad Redis Cluster URL {url!r}: no node; {expected}")
    nodes = []
    for node in parsed.netloc.split(","):
        host, _, port = node.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # an IPv6 address
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad Redis Cluster URL {url!r}: node {node!r} is not host:port; {expected}")
        nodes.append((host, int(port)))
    return nodes


def _query(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, dict[str, str]]:
    """``text`` without its query, and the query's parameters: each of ``allowed``, at most once."""
    parsed = urlparse(text)
    if not (allowed and parsed.query):  # no query, or one the URL's own check refuses
        return text, {}
    query = parse_qs(parsed.query, keep_blank_values=True)
    if set(query) - set(allowed) or any(len(v) > 1 for v in query.values()):
        names = " or ".join(f"one {p}=" for p in allowed)
        raise ConfigError(f"bad {what} URL {text!r}: the only query parameter is {names}")
    return parsed._replace(query="").geturl(), {k: v[0] for k, v in query.items()}


def parse_url(url: str | os.PathLike[str], kind: UrlKind) -> ParsedUrl:
    """Check ``url`` and say which backend of ``kind`` it names; see the module docstring.

    Raises:
        ConfigError: an empty URL, an unknown scheme, a file URL that is not ``scheme:///path``,
            a malformed Redis (Cluster) URL or a query parameter ``kind`` does not take.

    Example::

        >>> parse_url("ftp://host/x", FEATURE_STORE)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown feature store URL scheme 'ftp' in 'ftp://host/x': expected redis://host:port/db, lmdb:///absolute/path or a directory path (or redis-cluster://host:port[,host:port...])
    """
    text = os.fspath(url)
    if not text:
        raise ConfigError(f"empty {kind.noun} URL: expected {kind.expected}")
    scheme = urlparse(text).scheme if "://" in text else ""
    if not scheme:
        return ParsedUrl(kind.file_scheme, text)
    parsed = urlparse(text)
    if scheme in REDIS_SCHEMES:
        text, params = _query(text, kind.redis_params, f"Redis {kind.noun}")
        return ParsedUrl("redis", check_redis_url(text), params)
    if scheme == CLUSTER_SCHEME:
        text, params = _query(text, kind.cluster_params, f"Redis Cluster {kind.noun}")
        return ParsedUrl("redis", check_redis_cluster_url(text), params)
    if scheme == kind.file_scheme:
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(f"bad {kind.file_name} URL {text!r}: expected {scheme}:///absolute/path (three slashes)")
        return ParsedUrl(scheme, unquote(parsed.path))
    raise ConfigError(f"unknown {kind.noun} URL scheme {scheme!r} in {text!r}: expected {kind.expected}")


def connect_redis(url: str, timeout_s: float = 5.0,
                  socket_timeout_s: float | None = None) -> redis.Redis | RedisCluster:
    """A client of the Redis server at ``url``, which has answered a PING; for a
    ``redis-cluster://`` URL a cluster client, which has read the slot map from a seed node and
    had a PING answered (a node down now fails the operations that need it, later).

    Args:
        url: ``redis://host:port/db`` (see :func:`check_redis_url`) or
            ``redis-cluster://host:port[,host:port...]`` (see :func:`check_redis_cluster_url`).
        timeout_s: how long to wait for the server before giving up.
        socket_timeout_s: how long any later command may wait for its answer (None: forever,
            which blocking stream reads need).

    Raises:
        ConfigError: a malformed URL, a server that does not answer (a cluster: no seed node
            does), or a seed node that answers but is not in cluster mode.
    """
    if url.startswith(f"{CLUSTER_SCHEME}://"):
        return _connect_cluster(url, timeout_s, socket_timeout_s)
    check_redis_url(url)
    import redis  # only a process that opens a Redis backend loads the client

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=socket_timeout_s)
        client.ping()
    except (redis.RedisError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot reach Redis at {url}: {exc}") from None
    return client


def _connect_cluster(url: str, timeout_s: float, socket_timeout_s: float | None) -> RedisCluster:
    nodes = cluster_nodes(url)
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry

    try:
        # One retry, after redis-py has re-read the slot map (it does on a lost connection or
        # CLUSTERDOWN), and no backoff: a node that is down stays down for seconds, and a caller
        # answers 503 at once rather than hold its request.
        client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                              socket_connect_timeout=timeout_s, socket_timeout=socket_timeout_s,
                              retry=Retry(NoBackoff(), 1))
        client.ping()
    except (redis.RedisError, RedisClusterException, ValueError, TypeError) as exc:
        if "cluster mode is not enabled" in str(exc).lower():
            raise ConfigError(f"{url}: the node answers but is not in cluster mode (cluster-enabled no); "
                              "use redis://HOST:PORT/DB for a single Redis server") from None
        raise ConfigError(f"cannot reach Redis Cluster at {url}: {exc}") from None
    return client


def unreachable_errors() -> tuple[type[Exception], ...]:
    """The redis-py errors that mean a server or a cluster node cannot answer now (not a bad
    command): a lost or refused connection, a timeout, a cluster that is down or whose slot map
    cannot be read."""
    import redis
    from redis.exceptions import ClusterError, RedisClusterException

    return (redis.ConnectionError, redis.TimeoutError, ClusterError, RedisClusterException)


def cluster_unavailable(client: RedisCluster, url: str, exc: Exception) -> StoreUnavailable:
    """One line for an :func:`unreachable_errors` error of a Redis Cluster: the node a connection
    failed to (redis-py names it), or for ``CLUSTERDOWN`` the nodes the cluster marks failed and
    the slots they serve, asked of a node that still answers."""
    from redis.exceptions import ClusterDownError

    if not isinstance(exc, ClusterDownError):
        node = getattr(exc, "connection", None)
        where = f" node {node.host}:{node.port}" if hasattr(node, "host") and hasattr(node, "port") else ""
        return StoreUnavailable(url, f"cannot reach Redis Cluster{where} ({exc})")
    failed = _failed_nodes(client)
    if not failed:
        return StoreUnavailable(url, f"Redis Cluster is down ({exc})")
    return StoreUnavailable(url, f"Redis Cluster is down: {', '.join(failed)} failed")


def _failed_nodes(client: RedisCluster) -> list[str]:
    """``node HOST:PORT (slots A-B ...)`` of each node the cluster flags ``fail`` or ``fail?``,
    from ``CLUSTER NODES`` of the first primary that answers within half a second."""
    import redis

    for node in client.get_primaries():
        probe = redis.Redis(host=node.host, port=node.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            nodes = probe.cluster("NODES")  # {"host:port": {"flags": "master,fail", "slots": [["0", "5460"]], ...}}
        except redis.RedisError:
            continue
        finally:
            probe.close()
        return [f"node {addr} (slots {' '.join('-'.join(r) for r in info['slots']) or 'none'})"
                for addr, info in nodes.items() if {"fail", "fail?"} & set(info["flags"].split(","))]
    return []
