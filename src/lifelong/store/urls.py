"""Where a feature store or an event stream lives: one URL parser and one Redis connect path.

Stores (:func:`lifelong.store.feature_store.open_store`) and streams
(:func:`lifelong.store.stream.open_stream`) take the same three forms of URL, each naming a
backend:

- ``redis://host:port/db`` (``rediss://`` for TLS): a Redis server, shared by many hosts;
- ``lmdb:///absolute/path`` (stores) or ``log:///absolute/path`` (streams): an embedded backend
  in a directory, percent-escapes decoded;
- a plain directory path: the embedded backend too.

:func:`parse_url` checks a URL against a :class:`UrlKind` and says which backend it names;
:func:`connect_redis` is the one way to reach a Redis server. This module imports neither
``lmdb`` nor ``redis`` (``connect_redis`` imports ``redis`` when called), so a process that opens
no backend never loads them.

Example::

    >>> parse_url("lmdb:///srv/my%20store", FEATURE_STORE)
    ParsedUrl(scheme='lmdb', location='/srv/my store', params={})
    >>> parse_url("redis://10.0.0.5:6379/0?key=ev", EVENT_STREAM)
    ParsedUrl(scheme='redis', location='redis://10.0.0.5:6379/0', params={'key': 'ev'})
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlparse

from lifelong.core.errors import ConfigError

if TYPE_CHECKING:
    import redis

__all__ = [
    "EVENT_STREAM", "FEATURE_STORE", "STORE_HELP", "STREAM_HELP", "ParsedUrl", "UrlKind", "check_redis_url",
    "connect_redis", "parse_url",
]

STORE_HELP = "A store URL: PATH or lmdb:///PATH (LMDB, embedded) or redis://HOST:PORT/DB."
"""Command-line help of every ``--store`` option."""

STREAM_HELP = "Event stream: a path or log:///PATH (embedded append-only log) or redis://HOST:PORT/DB[?key=K]"
"""Command-line help of every ``--stream`` option (the command appends its default)."""

REDIS_SCHEMES = ("redis", "rediss")


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
    """

    noun: str
    file_scheme: str
    file_name: str
    expected: str
    redis_params: tuple[str, ...] = ()


FEATURE_STORE = UrlKind("feature store", "lmdb", "LMDB",
                        "redis://host:port/db, lmdb:///absolute/path or a directory path")
EVENT_STREAM = UrlKind("event stream", "log", "log",
                       "redis://host:port/db[?key=name], log:///absolute/path or a directory path",
                       redis_params=("key",))


@dataclass(frozen=True)
class ParsedUrl:
    """A checked URL.

    Args:
        scheme: the backend: ``"redis"`` (also for ``rediss://``) or the kind's ``file_scheme``
            (also for a plain path).
        location: for Redis the server's URL without the query, else the directory path.
        params: the Redis query parameters given (see :attr:`UrlKind.redis_params`).
    """

    scheme: str
    location: str
    params: dict[str, str] = field(default_factory=dict)


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


def parse_url(url: str | os.PathLike[str], kind: UrlKind) -> ParsedUrl:
    """Check ``url`` and say which backend of ``kind`` it names; see the module docstring.

    Raises:
        ConfigError: an empty URL, an unknown scheme, a file URL that is not ``scheme:///path``,
            a malformed Redis URL or a query parameter ``kind`` does not take.

    Example::

        >>> parse_url("ftp://host/x", FEATURE_STORE)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown feature store URL scheme 'ftp' in 'ftp://host/x': expected redis://host:port/db, lmdb:///absolute/path or a directory path
    """
    text = os.fspath(url)
    if not text:
        raise ConfigError(f"empty {kind.noun} URL: expected {kind.expected}")
    scheme = urlparse(text).scheme if "://" in text else ""
    if not scheme:
        return ParsedUrl(kind.file_scheme, text)
    parsed = urlparse(text)
    if scheme in REDIS_SCHEMES:
        params: dict[str, str] = {}
        if kind.redis_params and parsed.query:
            query = parse_qs(parsed.query, keep_blank_values=True)
            if set(query) - set(kind.redis_params) or any(len(v) > 1 for v in query.values()):
                allowed = " or ".join(f"one {p}=" for p in kind.redis_params)
                raise ConfigError(f"bad Redis {kind.noun} URL {text!r}: the only query parameter is {allowed}")
            params = {k: v[0] for k, v in query.items()}
            text = parsed._replace(query="").geturl()
        return ParsedUrl("redis", check_redis_url(text), params)
    if scheme == kind.file_scheme:
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(f"bad {kind.file_name} URL {text!r}: expected {scheme}:///absolute/path (three slashes)")
        return ParsedUrl(scheme, unquote(parsed.path))
    raise ConfigError(f"unknown {kind.noun} URL scheme {scheme!r} in {text!r}: expected {kind.expected}")


def connect_redis(url: str, timeout_s: float = 5.0, socket_timeout_s: float | None = None) -> redis.Redis:
    """A client of the Redis server at ``url``, which has answered a PING.

    Args:
        url: ``redis://host:port/db`` (see :func:`check_redis_url`).
        timeout_s: how long to wait for the server before giving up.
        socket_timeout_s: how long any later command may wait for its answer (None: forever,
            which blocking stream reads need).

    Raises:
        ConfigError: a malformed URL, or a server that does not answer.
    """
    check_redis_url(url)
    import redis  # only a process that opens a Redis backend loads the client

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=socket_timeout_s)
        client.ping()
    except (redis.RedisError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot reach Redis at {url}: {exc}") from None
    return client
