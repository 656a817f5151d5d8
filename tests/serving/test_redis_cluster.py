"""Redis Cluster backends (``redis-cluster://``) on a real three-node cluster: the feature store,
DV365 exports and event streams hold what LMDB and the embedded log hold, a ranker serves the
same scores from them; a dead node is one line of StoreUnavailable, and the next read after it
is back succeeds."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from redis.cluster import ClusterNode, RedisCluster

from lifelong.cli.service import build_service
from lifelong.core.errors import ConfigError, StoreUnavailable
from lifelong.data.schema import Action
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import export_embeddings
from lifelong.serving.ranking import RankRequest
from lifelong.store.embeddings import EmbeddingReader
from lifelong.store.embeddings import version_prefix as embedding_prefix
from lifelong.store.feature_store import load_store, open_store, user_key, version_prefix
from lifelong.store.realtime import RealtimeConsumer
from lifelong.store.redis_store import RedisClusterStore
from lifelong.store.stream import EVENT_DTYPE, LogStream, RedisClusterStream, open_stream, replay
from lifelong.store.urls import EVENT_STREAM, FEATURE_STORE, ParsedUrl, connect_redis, parse_url
from lifelong.transact.serving import Ranker
from lifelong.transact.trainer import TrainConfig, load_model, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.dv365.export_support import FakeTower
from tests.serving.store_support import CANDIDATES, LAYOUT, TOLERANCE, LocalCluster, poll_until, start_redis_cluster
from tests.test_cli import run_cli

N_USERS = 30
USERS = [*range(N_USERS), 10_000]  # 10_000: a user the store lacks (served cold-start)
AS_OF_MS = 1_000_000


# -- URLs (no server needed) -------------------------------------------------------------------


@pytest.mark.parametrize(("url", "kind", "expected"), [
    ("redis-cluster://10.0.0.5:7000", FEATURE_STORE, ParsedUrl("redis", "redis-cluster://10.0.0.5:7000")),
    ("redis-cluster://a:7000,b:7001/", FEATURE_STORE, ParsedUrl("redis", "redis-cluster://a:7000,b:7001/")),
    ("redis-cluster://a:7000/0", FEATURE_STORE, ParsedUrl("redis", "redis-cluster://a:7000/0")),
    ("redis-cluster://a:1,[::1]:2?key=ev&partitions=4", EVENT_STREAM,
     ParsedUrl("redis", "redis-cluster://a:1,[::1]:2", {"key": "ev", "partitions": "4"})),
])
def test_cluster_urls(url, kind, expected):
    parsed = parse_url(url, kind)
    assert parsed == expected and parsed.cluster
    assert not parse_url("redis://a:1/0", kind).cluster


@pytest.mark.parametrize(("url", "kind", "message"), [
    ("redis-cluster://", FEATURE_STORE, "bad Redis Cluster URL 'redis-cluster://': no node"),
    ("redis-cluster://a:7000/1", FEATURE_STORE, "a cluster has database 0 only (drop '/1')"),
    ("redis-cluster://a:7000,b:x", FEATURE_STORE, "node 'b:x' is not host:port"),
    ("redis-cluster://a:7000,,b:1", FEATURE_STORE, "node '' is not host:port"),
    ("redis-cluster://a", FEATURE_STORE, "node 'a' is not host:port"),
    ("redis-cluster://a:70000", FEATURE_STORE, "node 'a:70000' is not host:port"),
    ("redis-cluster://a:1?key=x", FEATURE_STORE, "bad Redis Cluster URL 'redis-cluster://a:1?key=x'"),
    ("redis-cluster://a:1?db=2", EVENT_STREAM, "the only query parameter is one key= or one partitions="),
    ("redis-cluster://a:1/2?key=x", EVENT_STREAM, "a cluster has database 0 only"),
])
def test_bad_cluster_urls_are_one_line(url, kind, message):
    with pytest.raises(ConfigError) as err:
        parse_url(url, kind)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_server_not_in_cluster_mode_and_no_server_are_config_errors(redis_url, closed_port):
    single = redis_url.removeprefix("redis://").split("/")[0]
    with pytest.raises(ConfigError, match="the node answers but is not in cluster mode") as err:
        open_store(f"redis-cluster://{single}")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"cannot reach Redis Cluster at redis-cluster://127.0.0.1:{closed_port}"):
        connect_redis(f"redis-cluster://127.0.0.1:{closed_port}", 0.5)
    with pytest.raises(ConfigError, match="partitions= is a number"):
        open_stream(f"redis-cluster://127.0.0.1:{closed_port}?partitions=x")


# -- a cluster, a world, a model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not on PATH: the Redis Cluster tests need them")
    local = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 30-user world, its built rows, a TransAct V2 run on them and an LMDB store of the rows."""
    root = tmp_path_factory.mktemp("served")
    simulate_to(load_config("tiny", overrides=[f"users.n_users={N_USERS}", "seed=0"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=LAYOUT, ll_cap=40, imp_cap=10, nal_negatives=6))
    torch.set_num_threads(1)
    train(root / "ds", root / "run", TrainConfig(model="transact_v2", nal="impression", epochs=1, max_rows=200,
                                                 batch_size=128))
    lmdb = f"lmdb://{root / 'lmdb'}"
    load_store(root / "ds", lmdb, progress=False)
    return SimpleNamespace(root=root, world=root / "world", ds=root / "ds", run=root / "run", lmdb=lmdb)


def _snapshot(url: str):
    """Everything a reader of ``url`` serves: meta, every user's arrays (None for unknown), the item table."""
    with open_store(url) as store, store.reader() as r:
        users = [None if u is None else {f.name: np.array(getattr(u, f.name)) for f in dataclasses.fields(u)}
                 for u in r.users(USERS)]
        return r.meta(), users, r.items().encode()


def _assert_same_snapshot(got, want) -> None:
    (meta, users, items), (want_meta, want_users, want_items) = got, want
    assert {k: v for k, v in meta.items() if k != "store_version"} == \
           {k: v for k, v in want_meta.items() if k != "store_version"}
    assert items == want_items
    assert [u is None for u in users] == [u is None for u in want_users] == [False] * N_USERS + [True]
    for x, y in zip(users[:N_USERS], want_users[:N_USERS]):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _rank(ranker: Ranker) -> list[tuple[np.ndarray, bool]]:
    results = ranker.rank([RankRequest(u, np.arange(CANDIDATES), 0, None) for u in USERS])
    return [(r.probs.copy(), r.cold_start) for r in results]


def _assert_same_scores(a, b):
    assert [cold for _, cold in a] == [cold for _, cold in b]
    for (x, _), (y, _) in zip(a, b):
        np.testing.assert_allclose(x, y, atol=TOLERANCE, rtol=0)


def _client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports])


def _nodes_of(client: RedisCluster, keys) -> set[str]:
    return {client.get_node_from_key(k).name for k in keys}


# -- the feature store -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(cluster, served):
    """The rows loaded into the cluster twice (v1 then v2: the second load collects nothing yet)."""
    first = load_store(served.ds, cluster.url, progress=False)
    second = load_store(served.ds, cluster.url, progress=False)
    assert (first["version"], second["version"], second["kept"]) == ("v1", "v2", ["v1"])
    return second


def test_cluster_store_holds_what_lmdb_holds(cluster, served, loaded):
    got = _snapshot(cluster.url)
    _assert_same_snapshot(got, _snapshot(served.lmdb))
    assert got[0]["store_version"] == "v2"
    with open_store(cluster.url) as store:
        assert isinstance(store, RedisClusterStore) and store.current_version() == "v2"
        physical = [store._key(version_prefix(2) + user_key(u)) for u in range(N_USERS)]
        control = [store._key(k) for k in (b"fs:current", b"fs:versions", b"fs:writer", version_prefix(2) + b"meta")]
    client = _client(cluster)
    try:
        # Users spread over the nodes; the pointer, registry, lock and meta share one slot.
        assert len(_nodes_of(client, physical)) == 3
        assert len({client.keyslot(k) for k in control}) == 1
        assert all(client.get(k) is not None for k in physical)
    finally:
        client.close()


def test_cluster_store_serves_the_scores_lmdb_serves(cluster, served, loaded):
    net, _ = load_model(served.run)
    with open_store(served.lmdb) as lmdb, open_store(cluster.url) as store:
        expected, got = _rank(Ranker(net, lmdb)), _rank(Ranker(net, store))
    _assert_same_scores(got, expected)
    assert [cold for _, cold in got] == [False] * N_USERS + [True]


def test_a_third_load_collects_the_oldest_version_whole(cluster, served, loaded):
    summary = load_store(served.ds, cluster.url, progress=False)
    assert (summary["version"], summary["kept"], summary["deleted"]) == ("v3", ["v2"], ["v1"])
    client = _client(cluster)
    try:
        assert list(client.scan_iter(match=b"lifelong:fs:v:000000000001:*")) == []
        seals = list(client.scan_iter(match=b"lifelong:fs:v:000000000003:seal*"))
        assert len(seals) == RedisClusterStore.BUCKETS
    finally:
        client.close()
    _assert_same_snapshot(_snapshot(cluster.url), _snapshot(served.lmdb))


def test_the_real_time_follower_is_refused_in_one_line(cluster, served, loaded, tmp_path):
    with open_store(cluster.url) as store, store.reader() as r:
        meta, item = r.meta(), int(r.items().item_id[0])
    event = np.zeros(1, EVENT_DTYPE)  # a click newer than the load: the follower would rewrite user 1
    event["user_id"], event["item_id"], event["ts_ms"] = 1, item, meta["source_last_ts_ms"] + 1
    event["action_mask"] = int(Action.IMPRESSION | Action.CLICK)
    with LogStream(tmp_path / "events") as log:
        log.append(event)
    with RealtimeConsumer(cluster.url, f"log://{tmp_path / 'events'}") as follower, \
            pytest.raises(ConfigError) as err:
        follower.step()
    assert "cannot write 1 users' records and the real-time follower's offset in one atomic write" in str(err.value)
    assert "\n" not in str(err.value)
    _assert_same_snapshot(_snapshot(cluster.url), _snapshot(served.lmdb))  # nothing written


# -- DV365 exports -----------------------------------------------------------------------------


def test_dv365_export_reads_back_as_from_lmdb(cluster, served, loaded):
    users = np.arange(N_USERS)
    for url in (served.lmdb, cluster.url):
        for as_of in (AS_OF_MS, AS_OF_MS + 1):  # two versions: the second switch collects nothing yet
            export_embeddings(FakeTower(), served.world, url, as_of, user_ids=users)
    with EmbeddingReader(served.lmdb) as lmdb, EmbeddingReader(cluster.url, default=0.0) as reader:
        want, want_version = lmdb.get(users)
        got, version = reader.get(np.r_[users, 10_000])
    assert version == want_version == 2
    np.testing.assert_array_equal(got[:N_USERS], want)
    assert not got[N_USERS].any()
    with open_store(cluster.url) as store:
        client = _client(cluster)
        try:  # a user's DV365 rows live on the node of its sequences
            served_prefix = version_prefix(int(store.pointer()["version"]))
            for u in (0, 7, 29):
                keys = [store._key(embedding_prefix(2) + user_key(u)), store._key(served_prefix + user_key(u))]
                assert len(_nodes_of(client, keys)) == 1 and all(client.get(k) is not None for k in keys)
        finally:
            client.close()


# -- event streams -----------------------------------------------------------------------------


def test_stream_partitions_round_trip_as_the_log(cluster, served, tmp_path):
    log = LogStream(tmp_path / "log")
    replay(served.world, log, batch=500)
    expected, _ = log.read(0, 10**6)
    log.close()
    url = f"{cluster.url}?key=lifelong:test:events&partitions=4"
    with open_stream(url, entry_records=64) as stream:
        assert isinstance(stream, RedisClusterStream) and stream.partitions == 4
        stats = replay(served.world, stream, batch=500)
        whole, end = stream.read(stream.start_offset(), 10**6)
        assert end == stats.end_offset == stream.end_offset()
        # Small reads from every offset they return (inside entries too) give the same sequence.
        batches = list(stream.batches(stream.start_offset(), 501))
        assert np.concatenate([r for r, _ in batches]).tobytes() == whole.tobytes() and batches[-1][1] == end
        assert stream.read(end, 10)[0].size == 0
        with pytest.raises(ConfigError, match="4 offsets"):
            stream.read("0-0", 10)
        client = _client(cluster)
        try:
            assert len(_nodes_of(client, stream.keys)) >= 2
        finally:
            client.close()
    # Every event once; each user's events in the order they happened.
    order = list(EVENT_DTYPE.names)
    assert np.sort(whole, order=order).tobytes() == np.sort(expected, order=order).tobytes()
    for u in np.unique(expected["user_id"]):
        assert whole[whole["user_id"] == u].tobytes() == expected[expected["user_id"] == u].tobytes()
    with pytest.raises(ConfigError, match="has 4 partitions"):
        open_stream(f"{cluster.url}?key=lifelong:test:events&partitions=2")
    with open_stream(f"{cluster.url}?key=lifelong:test:events") as again:
        assert again.partitions == 4


def test_stream_consumer_group_spans_partitions(cluster):
    url = f"{cluster.url}?key=lifelong:test:group&partitions=3"
    events = np.zeros(12, dtype=EVENT_DTYPE)
    events["user_id"], events["item_id"] = np.arange(12) % 6, np.arange(12)
    with open_stream(url, entry_records=2) as stream:
        stream.append(events)  # 4 events per partition, entries of 2: 6 entries
        assert stream.create_group("g") is True and stream.create_group("g") is False
        first = stream.read_group("g", "c1", max_entries=4)
        assert len(first) == 4 and len({d.entry_id.split("/")[0] for d in first}) >= 2
        assert stream.ack("g", [first[0].entry_id]) == 1 and stream.ack("g", [first[0].entry_id]) == 0
    # The consumer crashes with three entries unacknowledged and restarts under its name.
    with open_stream(url) as restarted:
        again = restarted.read_group("g", "c1", max_entries=16)
        rest = restarted.read_group("g", "c1", max_entries=16)
        assert sorted(d.entry_id for d in again) == sorted(d.entry_id for d in first[1:])
        assert len(rest) == 2 and restarted.read_group("g", "c1", block_ms=50) == []
        items = np.concatenate([d.records["item_id"] for d in (*first[:1], *again, *rest)])
        assert sorted(items.tolist()) == list(range(12))
        assert restarted.ack("g", [d.entry_id for d in (*again, *rest)]) == 5
        with pytest.raises(ConfigError, match="no consumer group 'nope'"):
            restarted.read_group("nope", "c1")


# -- a dead node, then back --------------------------------------------------------------------


def _one_line_unavailable(call, *match: str) -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and all(m in text for m in match), text
    return err.value


def test_a_dead_node_is_store_unavailable_until_it_is_back(cluster, served, loaded):
    net, _ = load_model(served.run)
    with open_store(served.lmdb) as lmdb:
        expected = _rank(Ranker(net, lmdb))
    store = open_store(cluster.url)
    stream = open_stream(f"{cluster.url}?key=lifelong:test:dead-node&partitions=6")
    client = _client(cluster)
    try:
        app, _ = build_service(served.run, cluster.url)
        with TestClient(app, raise_server_exceptions=False) as http:  # one batcher (its lifespan) for the whole test
            export_embeddings(FakeTower(), served.world, store, AS_OF_MS, user_ids=np.arange(N_USERS))
            stream.append(np.zeros(N_USERS, EVENT_DTYPE))
            ranker = Ranker(net, store)
            _assert_same_scores(_rank(ranker), expected)
            control = cluster.node_of(client.keyslot(store._key(b"fs:current")))
            victim = next(i for i in range(3) if i != control)  # a node of users only: the pointer stays readable
            port = cluster.ports[victim]
            prefix = version_prefix(int(store.pointer()["version"]))
            user = next(u for u in range(N_USERS)  # a user whose records the victim holds
                        if client.get_node_from_key(store._key(prefix + user_key(u))).port == port)
            body = {"user_id": user, "candidates": ranker.items.item_id[:CANDIDATES].tolist()}
            cluster.kill_node(victim)
            _one_line_unavailable(lambda: _rank(ranker), f"127.0.0.1:{port}")
            _one_line_unavailable(lambda: EmbeddingReader(store).get(np.arange(N_USERS)), f"127.0.0.1:{port}")
            _one_line_unavailable(lambda: stream.read(stream.start_offset(), 10**6), f"127.0.0.1:{port}")
            r = http.post("/rank", json=body)
            assert r.status_code == 503 and f"127.0.0.1:{port}" in r.text, r.text
            cli = run_cli("store", "load", "--data", str(served.ds), "--store", cluster.url)
            assert cli.returncode == 2 and f"127.0.0.1:{port}" in cli.stderr, cli.stderr
            # Once the others mark it failed, every node answers CLUSTERDOWN: the line names it and its slots.
            assert poll_until(lambda: cluster.state(control) == "fail", 30)
            _one_line_unavailable(lambda: _rank(ranker), f"Redis Cluster is down: node 127.0.0.1:{port} (slots ")
            cluster.start_node(victim)  # same config file and data directory
            assert poll_until(lambda: all(cluster.state(i) == "ok" for i in range(3)), 30)
            _assert_same_scores(_rank(ranker), expected)  # the first read once the cluster is whole
            assert http.post("/rank", json=body).status_code == 200
            assert stream.read(stream.start_offset(), 10**6)[0].size == N_USERS
            # A node that comes back without its data (no persistence) is not served as cold starts.
            cluster.kill_node(victim)
            shutil.rmtree(cluster.node_dir(victim) / "appendonlydir")
            cluster.start_node(victim)
            assert poll_until(lambda: all(cluster.state(i) == "ok" for i in range(3)), 30)
            assert poll_until(lambda: _fails_other_than_connection(ranker), 30)
            lost = f"version {store.current_version()} has lost its records in slot "
            _one_line_unavailable(lambda: _rank(ranker), lost,
                                  f"(node 127.0.0.1:{port} restarted without its data?); run lifelong store load again")
            load_store(served.ds, cluster.url, progress=False)
            _assert_same_scores(_rank(ranker), expected)
    finally:
        client.close()
        stream.close()
        store.close()


def _fails_other_than_connection(ranker: Ranker) -> bool:
    """Whether ranking fails for another reason than a node that does not answer (yet)."""
    try:
        _rank(ranker)
    except StoreUnavailable as exc:
        return "cannot reach" not in exc.reason and "is down" not in exc.reason
    return True

