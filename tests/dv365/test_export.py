"""DV365 export: versions in LMDB and Redis, atomic switch, garbage collection, kill -9 mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lifelong.core.errors import ConfigError, DataError, WriterLocked
from lifelong.data.protocol import DAY_MS
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import (
    POINTER_KEY,
    EmbeddingReader,
    ExportConfig,
    active_users,
    default_as_of_ms,
    export_embeddings,
    version_prefix,
)
from lifelong.store.feature_store import open_store, user_key
from tests.dv365.export_support import (
    DIM,
    ROWS,
    FakeTower,
    assert_served,
    bound_4bit,
    fake_embeddings,
    listed_versions,
    rows_left,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world") / "w"
    simulate_to(load_config("tiny", overrides=["users.n_users=8"]), d)
    return d


ROOT = Path(__file__).resolve().parents[2]
USERS = np.array([2, 3, 5, 8, 13, 21, 34])
T0 = 100 * DAY_MS


def test_export_round_trip_within_the_4bit_bound(store_url, tmp_path):
    summary = export_embeddings(FakeTower(), tmp_path, store_url, T0, ExportConfig(batch_users=3), user_ids=USERS[::-1])
    assert (summary.version, summary.users, summary.rows, summary.dim) == (1, 7, ROWS, DIM)
    assert summary.bytes_per_user == 8 * ROWS * 4 and summary.bytes_written == 7 * summary.bytes_per_user
    assert summary.compression_ratio == pytest.approx(4 * DIM / 32)
    assert_served(store_url, USERS, T0, 1)
    assert_served(store_url, [21, 2, 21], T0, 1)  # any order, repeats


def test_paper_shape_compression_ratio(store_url, tmp_path):
    summary = export_embeddings(FakeTower(200, 256), tmp_path, store_url, T0, user_ids=USERS[:2])
    # 200 rows x 17 int64 words (16 of codes, 1 of scale and offset) = 27,200 bytes for 204,800 of fp32.
    assert summary.bytes_per_user == 200 * 17 * 8 and summary.compression_ratio == pytest.approx(7.529, abs=1e-3)
    assert_served(store_url, USERS[:2], T0, 1, 200, 256)


def test_each_export_switches_and_old_versions_are_collected(store_url, tmp_path):
    for version in (1, 2, 3):
        summary = export_embeddings(FakeTower(), tmp_path, store_url, T0 + version, user_ids=USERS[:version + 3])
        assert summary.version == version
        assert_served(store_url, USERS[:version + 3], T0 + version, version)
    assert summary.deleted == (1,) and listed_versions(store_url) == [2, 3]
    with EmbeddingReader(store_url) as reader:
        assert reader.current()["history"] == [2]
    assert rows_left(store_url, 1) == 0
    summary = export_embeddings(FakeTower(), tmp_path, store_url, T0, ExportConfig(keep=1), user_ids=USERS)
    assert summary.deleted == (2, 3) and listed_versions(store_url) == [4]
    assert_served(store_url, USERS, T0, 4)


def test_missing_users_raise_or_take_the_default(store_url, tmp_path):
    open_store(store_url, writable=True).close()  # an empty store
    with pytest.raises(DataError, match="no DV365 embeddings exported here yet"), EmbeddingReader(store_url) as reader:
        reader.get([2])
    export_embeddings(FakeTower(), tmp_path, store_url, T0, user_ids=USERS[:3])
    with EmbeddingReader(store_url) as reader, \
            pytest.raises(DataError, match=r"2 of 4 users have no embedding in version 1 .* e.g. user 99"):
        reader.get([2, 99, 3, 100])
    with EmbeddingReader(store_url, default=0.0) as reader:
        emb, _ = reader.get([99, 2])
    assert np.all(emb[0] == 0) and np.abs(emb[1] - fake_embeddings(np.array([2]), T0)[0]).max() < 0.2


class BrokenTower(FakeTower):
    """Returns bad embeddings from the ``bad_call``-th batch on."""

    def __init__(self, bad_call: int, bad):
        super().__init__()
        self.bad_call, self.bad = bad_call, bad

    def embed_users(self, world_dir, user_ids, as_of_ms, gap_ms=None):
        emb = super().embed_users(world_dir, user_ids, as_of_ms, gap_ms)
        return self.bad(emb) if len(self.calls) >= self.bad_call else emb


@pytest.mark.parametrize("bad, message", [
    (lambda e: e[:, :, :-1], r"rows x dim \(3, 39\) after \(3, 40\)"),
    (lambda e: e[:-1], "for 3 users"),
    (lambda e: e.astype(np.int64), "expected float"),
    (lambda e: np.where(e > 0.5, np.nan, e), "NaN or infinite"),
])
def test_a_failed_export_keeps_the_previous_version_served(store_url, tmp_path, bad, message):
    export_embeddings(FakeTower(), tmp_path, store_url, T0, user_ids=USERS)
    with pytest.raises(DataError, match=message):
        export_embeddings(BrokenTower(2, bad), tmp_path, store_url, T0 + 1, ExportConfig(batch_users=3), user_ids=USERS)
    assert_served(store_url, USERS, T0, 1)
    assert listed_versions(store_url) == [1, 2]  # the failed version's rows wait for the next collection
    assert export_embeddings(FakeTower(), tmp_path, store_url, T0 + 2, user_ids=USERS).deleted == (2,)
    assert rows_left(store_url, 2) == 0
    assert_served(store_url, USERS, T0 + 2, 3)


def test_lmdb_and_redis_serve_identical_embeddings(tmp_path, redis_url):
    urls = [f"lmdb://{tmp_path / 'emb'}", redis_url]
    with open_store(redis_url) as store:
        store.clear()
    for url in urls:
        export_embeddings(FakeTower(), tmp_path, url, T0, user_ids=USERS)
    got = []
    for url in urls:
        with EmbeddingReader(url) as reader:
            got.append(reader.get(USERS))
    assert got[0][1] == got[1][1] == 1 and np.array_equal(got[0][0], got[1][0])


CHILD = """
import pathlib, sys, time, numpy as np
sys.path.insert(0, sys.argv[3])
from tests.dv365.export_support import FakeTower
from lifelong.dv365.export import ExportConfig, export_embeddings

def stall_after_two_batches(done):
    if done >= 4:
        pathlib.Path(sys.argv[4]).touch()
        time.sleep(600)  # mid-write: the parent kills us here

export_embeddings(FakeTower(), ".", sys.argv[1], int(sys.argv[2]), ExportConfig(batch_users=2),
                  user_ids=np.arange(100, 120), on_batch=stall_after_two_batches)
"""


def test_kill_9_mid_write_leaves_the_previous_version_served_whole(store_url, tmp_path):
    export_embeddings(FakeTower(), tmp_path, store_url, T0, user_ids=USERS)
    signal_file = tmp_path / "two-batches-written"
    child = subprocess.Popen([sys.executable, "-c", CHILD, store_url, str(T0 + 1), str(ROOT),
                              str(signal_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not signal_file.exists():
        if child.poll() is not None:
            pytest.fail(f"the child exited early ({child.returncode}): {child.stderr.read()}")
        assert time.monotonic() < deadline, "the child did not write two batches in 120 s"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()

    assert_served(store_url, USERS, T0, 1)  # version 2 is half written and not served
    with EmbeddingReader(store_url) as reader, pytest.raises(DataError, match="no embedding in version 1"):
        reader.get([100])
    assert listed_versions(store_url) == [1, 2]
    if store_url.startswith("redis"):
        # A killed exporter's Redis lock outlives it until it expires (lock_ttl_s); LMDB's flock died with it.
        with pytest.raises(WriterLocked, match="a DV365 export holds the writer lock"):
            export_embeddings(FakeTower(), tmp_path, store_url, T0 + 2, user_ids=USERS)
        with open_store(store_url, writable=True) as store:
            store._client.delete(b"lifelong:fs:lock:dv365")  # instead of waiting 30 s for it to expire
    summary = export_embeddings(FakeTower(), tmp_path, store_url, T0 + 2, user_ids=USERS)
    assert summary.version == 3 and summary.deleted == (2,) and listed_versions(store_url) == [1, 3]
    assert rows_left(store_url, 2) == 0
    assert_served(store_url, USERS, T0 + 2, 3)


def test_active_users_and_export_of_a_world(world, tmp_path):
    events = pq.read_table(world / "events.parquet", columns=["user_id", "ts_ms"]).to_pydict()
    as_of = default_as_of_ms(world)
    assert as_of == json.loads((world / "world.json").read_text())["protocol"]["eval_end_ms"]
    for window in (DAY_MS, 3 * DAY_MS, 30 * DAY_MS):
        at = as_of - 2 * DAY_MS
        want = sorted({u for u, t in zip(events["user_id"], events["ts_ms"]) if at - window <= t < at})
        assert active_users(world, at, window).tolist() == want
    url = f"lmdb://{tmp_path / 'emb'}"
    tower = FakeTower()
    summary = export_embeddings(tower, world, url, as_of, ExportConfig(batch_users=3, gap_ms=DAY_MS))
    assert summary.users == len(active_users(world, as_of)) > 0
    assert [gap for _, _, gap in tower.calls] == [DAY_MS] * len(tower.calls)
    assert_served(url, active_users(world, as_of), as_of, 1)
    with pytest.raises(DataError, match="no active users to export"):
        export_embeddings(tower, world, url, 0)
    with pytest.raises(DataError, match="events.parquet: missing"):
        active_users(tmp_path, as_of)


@pytest.mark.parametrize("field, value", [("batch_users", 0), ("keep", 0), ("active_window_ms", -1), ("keep", 1.5)])
def test_bad_export_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=f"export {field} must be an integer"):
        ExportConfig(**{field: value})


def test_delete_prefix_matches_the_prefix_literally(store_url):
    keys = [b"a*b:1", b"a*b:2", b"axb:3", b"a[b:4", b"a*b", b"a*c:5"]
    with open_store(store_url, writable=True) as store:
        store.put([(k, b"x") for k in keys])
        assert store.delete_prefix(b"a*b:") == 2 and store.delete_prefix(b"a*b:") == 0
        with store.reader() as r:
            assert [v is not None for v in r.values(keys)] == [False, False, True, True, True, True]


def test_a_read_straddling_a_switch_and_collection_gets_one_version_whole(store_url, tmp_path):
    """An export with keep=1 runs between the reader's pointer read and its row read. LMDB reads
    one snapshot: the old version, whole. Redis finds the rows gone and reads again: the new one."""
    one = ExportConfig(keep=1)
    export_embeddings(FakeTower(), tmp_path, store_url, T0, one, user_ids=USERS)
    with open_store(store_url, writable=True) as store:
        plain_reader = store.reader

        @contextmanager
        def racing_reader():
            with plain_reader() as r:
                plain_values = r.values

                def values(keys):
                    got = plain_values(keys)
                    if keys == [POINTER_KEY] and not raced:
                        raced.append("racing")  # the export's own reads pass through here too
                        raced.append(export_embeddings(FakeTower(), tmp_path, store, T0 + 1, one, user_ids=USERS))
                    return got

                r.values = values
                yield r

        raced = []
        store.reader = racing_reader
        emb, version = EmbeddingReader(store).get(USERS)
    assert raced[1].version == 2 and raced[1].deleted == (1,)
    as_of = T0 if store_url.startswith("lmdb") else T0 + 1
    assert version == (1 if store_url.startswith("lmdb") else 2)
    want = fake_embeddings(USERS, as_of)
    assert np.all(np.abs(emb.astype(np.float64) - want) <= bound_4bit(want))


def test_a_corrupt_record_is_a_data_error(store_url, tmp_path):
    export_embeddings(FakeTower(), tmp_path, store_url, T0, user_ids=USERS)
    with open_store(store_url, writable=True) as store:
        store.put([(version_prefix(1) + user_key(5), b"12345678")])
    with EmbeddingReader(store_url) as reader, pytest.raises(DataError, match="a record of version 1 is not 96 bytes"):
        reader.get([2, 5])
