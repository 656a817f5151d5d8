"""Store and stream URLs (lifelong.store.urls): each scheme parsed, each bad form one clear error;
the batch-training path never loads the lmdb or redis clients."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lifelong.core.errors import ConfigError
from lifelong.store.urls import EVENT_STREAM, FEATURE_STORE, ParsedUrl, check_redis_url, connect_redis, parse_url


@pytest.mark.parametrize(("url", "kind", "expected"), [
    ("/srv/store", FEATURE_STORE, ParsedUrl("lmdb", "/srv/store")),
    ("relative/dir", FEATURE_STORE, ParsedUrl("lmdb", "relative/dir")),
    ("lmdb:///srv/my%20store", FEATURE_STORE, ParsedUrl("lmdb", "/srv/my store")),
    ("redis://10.0.0.5:6379/2", FEATURE_STORE, ParsedUrl("redis", "redis://10.0.0.5:6379/2")),
    ("rediss://cache.example:6380", FEATURE_STORE, ParsedUrl("redis", "rediss://cache.example:6380")),
    ("/srv/stream", EVENT_STREAM, ParsedUrl("log", "/srv/stream")),
    ("log:///srv/a%20b", EVENT_STREAM, ParsedUrl("log", "/srv/a b")),
    ("redis://localhost:6379/0", EVENT_STREAM, ParsedUrl("redis", "redis://localhost:6379/0")),
    ("redis://localhost:6379/0?key=ev", EVENT_STREAM, ParsedUrl("redis", "redis://localhost:6379/0", {"key": "ev"})),
])
def test_good_urls(url, kind, expected):
    assert parse_url(url, kind) == expected


@pytest.mark.parametrize(("url", "kind", "message"), [
    ("", FEATURE_STORE, "empty feature store URL: expected redis://host:port/db, lmdb:///absolute/path or a "
                        "directory path"),
    ("", EVENT_STREAM, "empty event stream URL: expected redis://host:port/db[?key=name], log:///absolute/path "
                       "or a directory path"),
    ("ftp://host/x", FEATURE_STORE, "unknown feature store URL scheme 'ftp' in 'ftp://host/x': expected "
                                    "redis://host:port/db, lmdb:///absolute/path or a directory path"),
    ("log:///x", FEATURE_STORE, "unknown feature store URL scheme 'log'"),
    ("lmdb:///x", EVENT_STREAM, "unknown event stream URL scheme 'lmdb'"),
    ("lmdb://relative/path", FEATURE_STORE, "bad LMDB URL 'lmdb://relative/path': expected lmdb:///absolute/path "
                                            "(three slashes)"),
    ("log://relative/x", EVENT_STREAM, "bad log URL 'log://relative/x': expected log:///absolute/path "
                                       "(three slashes)"),
    ("redis://host:notaport/0", FEATURE_STORE, "bad Redis URL 'redis://host:notaport/0': expected "
                                               "redis://host:port/db with db a number"),
    ("redis://127.0.0.1:6379/abc", FEATURE_STORE, "bad Redis URL 'redis://127.0.0.1:6379/abc'"),
    ("redis:///0", FEATURE_STORE, "bad Redis URL 'redis:///0'"),
    ("redis://h:6379/0?db=3", FEATURE_STORE, "bad Redis URL 'redis://h:6379/0?db=3'"),  # would switch databases
    ("redis://localhost:6379/x", EVENT_STREAM, "bad Redis URL 'redis://localhost:6379/x'"),
    ("redis://h:6379/0?db=3", EVENT_STREAM, "bad Redis event stream URL 'redis://h:6379/0?db=3': the only query "
                                           "parameter is one key="),
    ("redis://h:6379/0?key=a&key=b", EVENT_STREAM, "the only query parameter is one key="),
])
def test_bad_urls_say_what_is_wrong_in_one_line(url, kind, message):
    with pytest.raises(ConfigError) as err:
        parse_url(url, kind)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_check_redis_url():
    assert check_redis_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(ConfigError, match="bad Redis URL 'redis://h:1/0#x'"):
        check_redis_url("redis://h:1/0#x")


def test_connect_redis(redis_url, closed_port):
    client = connect_redis(redis_url, 1.0)
    assert client.ping()
    client.close()
    url = f"redis://127.0.0.1:{closed_port}/0"
    with pytest.raises(ConfigError, match=f"cannot reach Redis at {url}: "):
        connect_redis(url, 0.5)
    with pytest.raises(ConfigError, match="bad Redis URL"):
        connect_redis("lmdb:///x")


def test_batch_training_loads_neither_lmdb_nor_redis():
    code = ("import sys, lifelong.transact.rank_data, lifelong.store.feature_store, lifelong.store.embeddings; "
            "print(sorted(m for m in ('lmdb', 'redis') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
