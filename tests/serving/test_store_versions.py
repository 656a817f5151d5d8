"""Feature store versions: atomic switches, pinned readers, garbage collection, the writer lock,
kept embeddings, and what serving sees of an empty, unreachable or foreign store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lifelong.core.errors import StoreUnavailable, WriterLocked
from lifelong.core.processes import free_port, stop_process
from lifelong.store.embeddings import EmbeddingReader
from lifelong.store.feature_store import (
    ITEMS_KEY,
    META_KEY,
    POINTER_KEY,
    REGISTRY_KEY,
    VersionGone,
    load_store,
    open_store,
    user_key,
    version_prefix,
)
from lifelong.store.lmdb_store import LOCK_FILE
from lifelong.transact.serving import Ranker
from lifelong.transact.trainer import load_model
from tests.conftest import wait_ready
from tests.serving.store_support import N_USERS, make_fixture


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("versions"))


@pytest.fixture(params=["lmdb", "redis"])
def url(request, tmp_path):
    """An empty store of each backend."""
    if request.param == "lmdb":
        return str(tmp_path / "store")
    redis_url = request.getfixturevalue("redis_url")
    with open_store(redis_url) as store:
        store.clear()
    return redis_url


def _registry(url) -> list[int]:
    with open_store(url) as store, store.reader() as r:
        return json.loads(bytes(r.values([REGISTRY_KEY])[0]))["versions"]


def _keys_of(url, version: int) -> int:
    with open_store(url) as store, store.reader() as r:
        return sum(v is not None for v in r.values([version_prefix(version) + k for k in
                                                    (META_KEY, ITEMS_KEY, *(user_key(u) for u in range(N_USERS)))]))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          env={"LIFELONG_QUIET": "1", "COLUMNS": "400", "PATH": "/usr/bin:/bin"})


def test_loads_switch_versions_keep_two_and_collect_older(fx, url):
    summaries = [load_store(ds, url, progress=False) for ds in (fx.a, fx.b, fx.a)]
    assert [s["version"] for s in summaries] == ["v1", "v2", "v3"]
    assert [s["kept"] for s in summaries] == [[], ["v1"], ["v2"]]
    assert [s["deleted"] for s in summaries] == [[], [], ["v1"]]
    assert _registry(url) == [2, 3] and _keys_of(url, 1) == 0 and _keys_of(url, 2) == _keys_of(url, 3) == N_USERS + 2
    with open_store(url) as store, store.reader() as r:
        assert r.version == "v3" and r.meta()["dataset"] == str(fx.a.resolve()) and r.meta()["store_version"] == "v3"
        assert all(u is not None for u in r.users(range(N_USERS)))
        assert store.pointer()["history"] == [2]


def test_a_pinned_reader_keeps_its_version_across_a_switch(fx, url):
    load_store(fx.a, url, progress=False)
    if url.startswith("redis"):
        with open_store(url) as store, store.reader() as r:
            assert r.version == "v1"
            load_store(fx.b, url, progress=False)  # v1 stays as the kept previous version
            assert r.version == "v1" and r.meta()["dataset"] == str(fx.a.resolve())
            load_store(fx.a, url, progress=False)  # v1 collected: the pinned reader must not answer from it
            with pytest.raises(VersionGone):
                r.users([0])
        return
    # LMDB: a read transaction is a snapshot; the loads run in another process (one mode per process).
    with open_store(url) as store, store.reader() as r:
        assert r.version == "v1"
        for ds in (fx.b, fx.a):
            assert run_cli("store", "load", "--data", str(ds), "--store", url).returncode == 0
        assert r.version == "v1" and r.meta()["dataset"] == str(fx.a.resolve()) and r.users([0])[0] is not None
    with open_store(url) as store:
        assert store.current_version() == "v3"


def test_ranker_switches_between_batches_and_names_the_version(fx, redis_url):
    with open_store(redis_url) as store:
        store.clear()
    load_store(fx.a, redis_url, progress=False)
    net, _ = load_model(fx.run)
    with open_store(redis_url) as store:
        ranker = Ranker(net, store)
        [res] = ranker.rank([fx.request(3)])
        assert res.store_version == "v1" and not fx.wrong("a", 3, res.probs, res.cold_start)
        load_store(fx.b, redis_url, progress=False)
        results = ranker.rank([fx.request(u) for u in range(N_USERS)])
        assert {r.store_version for r in results} == {"v2"} and ranker.store_version == "v2"
        assert not any(fx.wrong("b", u, r.probs, r.cold_start) for u, r in enumerate(results))
        # A reader pinned on a version collected mid-batch (two loads): the batch is read again, whole.
        load_store(fx.a, redis_url, progress=False)
        real = store.reader
        calls = []

        def stale_then_fresh():
            calls.append(1)
            if len(calls) == 1:
                load_store(fx.b, redis_url, progress=False)  # v3 (a) -> v4 (b)
                load_store(fx.a, redis_url, progress=False)  # v5 (a); v3 collected
            return real()

        ranker._version = ranker._version  # pinned v2 so far
        with store.reader() as r:
            assert r.version == "v3"
        store.reader = stale_then_fresh
        [res] = ranker.rank([fx.request(5)])
        store.reader = real
        assert res.store_version == "v5" and not fx.wrong("a", 5, res.probs, res.cold_start)
        assert ranker.readiness() == (True, "ok")


def test_second_writer_is_refused_at_once_and_the_store_stays_intact(fx, url):
    load_store(fx.a, url, progress=False)
    with open_store(url, writable=True) as store, store.writer_lock():
        with pytest.raises(WriterLocked, match="another store load holds the writer lock"):
            load_store(fx.b, url, progress=False)
        res = run_cli("store", "load", "--data", str(fx.b), "--store", url)
        assert res.returncode == 2 and "writer lock" in res.stdout + res.stderr
        assert len((res.stdout + res.stderr).strip().splitlines()) == 1 and "Traceback" not in res.stderr
    with open_store(url) as store, store.reader() as r:
        assert r.version == "v1" and r.meta()["n_users"] == N_USERS
        assert all(u is not None for u in r.users(range(N_USERS)))
    assert load_store(fx.b, url, progress=False)["version"] == "v2"  # released


def test_a_load_waits_for_the_follower_but_not_for_another_load(fx, url):
    load_store(fx.a, url, progress=False)
    held = threading.Event()

    def follow_one_batch():
        with open_store(url, writable=True) as store, store.writer_lock(role="follower"):
            held.set()
            time.sleep(0.5)  # one (slow) follower batch

    follower = threading.Thread(target=follow_one_batch)
    follower.start()
    held.wait()
    start = time.monotonic()
    assert load_store(fx.b, url, progress=False)["version"] == "v2"  # waited for the batch, then loaded
    assert time.monotonic() - start >= 0.3
    follower.join()
    with open_store(url, writable=True) as store, store.writer_lock(role="load"):
        start = time.monotonic()
        with pytest.raises(WriterLocked, match="another store load holds the writer lock"):
            load_store(fx.a, url, progress=False)
        assert time.monotonic() - start < 1.0  # another load: refused at once


def test_two_concurrent_loads_one_refused(fx, url):
    outcomes: list[object] = []

    def load(ds):
        try:
            outcomes.append(load_store(ds, url, progress=False)["version"])
        except WriterLocked as exc:
            outcomes.append(exc)

    for _ in range(5):  # a load can finish before the other starts; try until they overlap
        outcomes.clear()
        threads = [threading.Thread(target=load, args=(ds,)) for ds in (fx.a, fx.b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(isinstance(o, WriterLocked) for o in outcomes):
            break
    assert sum(isinstance(o, WriterLocked) for o in outcomes) == 1
    with open_store(url) as store, store.reader() as r:
        meta = r.meta()
        assert meta["n_users"] == N_USERS and meta["layout"]["rt"] == 8
        assert all(u is not None for u in r.users(range(N_USERS)))
        assert r.items().item_id.size == meta["n_items"]


def test_lock_of_a_killed_loader_is_released(fx, tmp_path, redis_url):
    # LMDB: the kernel drops a flock with its holder.
    path = tmp_path / "store"
    load_store(fx.a, str(path), progress=False)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WriterLocked):
        load_store(fx.b, str(path), progress=False)
    stop_process(holder)
    assert load_store(fx.b, str(path), progress=False)["version"] == "v2"
    # Redis: a lock whose holder stopped refreshing it expires.
    with open_store(redis_url) as store:
        store.clear()
        store._client.set(b"lifelong:fs:writer", json.dumps({"pid": 1, "host": "gone"}), px=300)
    with pytest.raises(WriterLocked, match="pid 1 on gone"):
        load_store(fx.a, redis_url, progress=False)
    import time

    time.sleep(0.4)
    assert load_store(fx.a, redis_url, progress=False)["version"] == "v1"


def test_a_redis_writer_that_lost_its_lock_switches_nothing(fx, redis_url):
    with open_store(redis_url) as store:
        store.clear()
    load_store(fx.a, redis_url, progress=False)
    with open_store(redis_url) as store, store.writer_lock() as lock:
        store._client.set(b"lifelong:fs:writer", "someone else")  # expired and taken by another writer
        with pytest.raises(WriterLocked, match="lost the writer lock"):
            lock.put([(POINTER_KEY, b'{"version": 99}')])
    with open_store(redis_url) as store:
        assert store.current_version() == "v1"
        store._client.delete(b"lifelong:fs:writer")


def test_an_interrupted_load_leaves_the_served_version_and_is_collected_later(fx, url, monkeypatch):
    load_store(fx.a, url, progress=False)
    import lifelong.store.feature_store as fs

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fs.FeatureStore, "write_items", boom)
    with pytest.raises(KeyboardInterrupt):
        load_store(fx.b, url, progress=False)
    monkeypatch.undo()
    with open_store(url) as store:
        assert store.current_version() == "v1"
    assert _registry(url) == [1, 2] and _keys_of(url, 2) > 0
    assert load_store(fx.b, url, progress=False)["deleted"] == ["v2"]
    assert _keys_of(url, 2) == 0 and _registry(url) == [1, 3]


def _export(url):
    from lifelong.dv365.export import export_embeddings
    from tests.dv365.export_support import FakeTower

    return export_embeddings(FakeTower(), "unused", url, as_of_ms=0, user_ids=np.arange(5))


def test_a_load_keeps_embeddings_and_drop_embeddings_drops_them(fx, url):
    load_store(fx.a, url, progress=False)
    _export(url)
    load_store(fx.b, url, progress=False)
    with EmbeddingReader(url) as reader:
        emb, version = reader.get([0, 4])
        assert version == 1 and emb.shape[0] == 2
    res = run_cli("store", "load", "--data", str(fx.a), "--store", url, "--drop-embeddings")
    assert res.returncode == 0, res.stderr
    assert "version v3" in res.stdout and "dropped" in res.stdout
    with EmbeddingReader(url) as reader:
        assert reader.current() is None
    with open_store(url) as store:
        assert store.current_version() == "v3"


def test_an_unversioned_store_is_served_as_legacy_and_replaced_by_a_load(fx, url):
    load_store(fx.a, url, progress=False)
    with open_store(url, writable=True) as store:  # rewrite it as an old, unversioned store
        with store.reader() as r:
            pairs = [(k[len(version_prefix(1)):], bytes(v)) for k, v in
                     zip(*(lambda ks: (ks, r.values(ks)))([version_prefix(1) + k for k in
                                                           (ITEMS_KEY, *(user_key(u) for u in range(N_USERS)), META_KEY)]))]
        store.clear()
        store.put(pairs)
        with store.reader() as r:
            assert r.version == "legacy" and r.meta()["n_users"] == N_USERS and r.users([0])[0] is not None
    summary = load_store(fx.b, url, progress=False)
    assert summary["version"] == "v1" and summary["deleted"] == ["legacy"]
    with open_store(url) as store, store.reader() as r:
        assert r.values([META_KEY, ITEMS_KEY, user_key(0)]) == [None, None, None] and r.version == "v1"


def test_empty_store_is_unavailable(tmp_path, redis_url):
    with open_store(redis_url) as store:
        store.clear()
        with pytest.raises(StoreUnavailable, match="no version loaded; run lifelong store load"):
            store.meta()
    open_store(tmp_path / "s", writable=True).close()
    with open_store(tmp_path / "s") as store, pytest.raises(StoreUnavailable, match="no version loaded"):
        store.current_version()


def test_ranker_reports_an_unreachable_redis_and_recovers(fx, tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_ready(proc, port, 10.0)
        url = f"redis://127.0.0.1:{port}/0"
        load_store(fx.a, url, progress=False)
        net, _ = load_model(fx.run)
        with open_store(url) as store:
            ranker = Ranker(net, store)
            assert ranker.rank([fx.request(1)])[0].store_version == "v1"
            stop_process(proc)
            with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
                ranker.rank([fx.request(1)])
            ok, reason = ranker.readiness()
            assert not ok and "cannot reach Redis" in reason
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert wait_ready(proc, port, 10.0)
            # A restarted server without persistence is empty: unavailable until loaded again.
            with pytest.raises(StoreUnavailable, match="no version loaded"):
                ranker.rank([fx.request(1)])
            load_store(fx.b, url, progress=False)
            [res] = ranker.rank([fx.request(1)])
            assert res.store_version == "v1" and not fx.wrong("b", 1, res.probs, res.cold_start)
            ranker._health = (False, "stale", 0.0)  # force a fresh probe
            assert ranker.readiness() == (True, "ok")
    finally:
        stop_process(proc)


def test_a_version_of_another_layout_is_unavailable_while_serving(fx, redis_url):
    with open_store(redis_url) as store:
        store.clear()
    load_store(fx.a, redis_url, progress=False)
    net, _ = load_model(fx.run)
    with open_store(redis_url) as store:
        ranker = Ranker(net, store)
        load_store(fx.other, redis_url, progress=False)
        with pytest.raises(StoreUnavailable, match="layout"):
            ranker.rank([fx.request(0)])
        ranker._health = (True, "ok", 0.0)
        ok, reason = ranker.readiness()
        assert not ok and "layout" in reason
        load_store(fx.a, redis_url, progress=False)
        [res] = ranker.rank([fx.request(0)])
        assert res.store_version == "v3" and not fx.wrong("a", 0, res.probs, res.cold_start)
