"""Feature store: record encoding, point-in-time timelines, LMDB and Redis backends, errors."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError, DataError, StoreUnavailable
from lifelong.data.io import load_dataset
from lifelong.data.schema import EMBED_DIM, Action
from lifelong.data.timelines import EventIndex, TimelineConfig, build_timelines
from lifelong.data.world import load_config, simulate_to
from lifelong.store.feature_store import (
    ItemRecords,
    UserSequences,
    load_store,
    open_store,
)
from lifelong.store.lmdb_store import LMDBStore
from lifelong.store.sequences import iter_user_sequences
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.training_rows import BuildConfig, ItemTable, build_rows

CFG = BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4), ll_cap=40, imp_cap=10, nal_negatives=6)
ARRAYS = [f.name for f in dataclasses.fields(UserSequences) if f.name != "user_id"]
IMP, CLICK, REPIN, HIDE = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN, Action.HIDE))
NO_LIMIT = np.iinfo(np.int64).max  # build_timelines' stand-in for "request after everything"


def _world(tmp_path_factory, n_users: int, seed: int):
    world = tmp_path_factory.mktemp("world") / "w"
    simulate_to(load_config("tiny", overrides=[f"users.n_users={n_users}", f"seed={seed}"]), world)
    built = tmp_path_factory.mktemp("built") / "ds"
    build_rows(world, built, CFG)
    return world, built


@pytest.fixture(scope="module")
def world_built(tmp_path_factory):
    """A 30-user simulated world and its built dataset."""
    return _world(tmp_path_factory, 30, 0)


@pytest.fixture(scope="module")
def small_built(tmp_path_factory):
    """A 5-user world's built dataset (for reloads)."""
    return _world(tmp_path_factory, 5, 1)[1]


@pytest.fixture(params=["lmdb", "redis"])
def store_url(request, tmp_path):
    """An empty store of each backend."""
    if request.param == "lmdb":
        return str(tmp_path / "store")
    url = request.getfixturevalue("redis_url")
    with open_store(url) as store:  # the server lives for the whole session
        store.clear()
    return url


def _random_user(rng: np.random.Generator, n: int, m: int, user_id: int = 9) -> UserSequences:
    def tokens(k: int, action_lo: int) -> dict[str, np.ndarray]:
        return {"ts_ms": np.sort(rng.integers(0, 100, k)), "item": rng.integers(0, 50, k),
                "action": rng.integers(action_lo, 2048, k), "surface": rng.integers(0, 5, k),
                "emb": rng.integers(-127, 128, (k, EMBED_DIM))}
    imp = {f"imp_{k}": v for k, v in tokens(m, 1).items()}
    return UserSequences.from_arrays(user_id, **tokens(n, 2), **imp)


def _assert_same_user(a: UserSequences, b: UserSequences) -> None:
    assert a.user_id == b.user_id
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def _root(a: np.ndarray) -> object:
    """The buffer at the bottom of a chain of numpy views."""
    while isinstance(a, np.ndarray):
        a = a.base
    return a


# -- record encoding --------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(0, 0), (1, 0), (0, 3), (5, 3), (7, 1)])
def test_user_record_round_trip_is_zero_copy_and_aligned(n, m):
    user = _random_user(np.random.default_rng(n * 10 + m), n, m)
    blob = user.encode()
    for buf in (blob, memoryview(bytearray(blob))):
        back = UserSequences.decode(buf)
        _assert_same_user(back, user)
        raw = np.frombuffer(buf, np.uint8)
        start = raw.__array_interface__["data"][0]
        for name in ARRAYS:
            arr = getattr(back, name)
            assert arr.size == 0 or np.shares_memory(arr, raw), name
            assert (arr.__array_interface__["data"][0] - start) % 8 == 0, name
    assert (back.n_explicit, back.n_impressions) == (n, m)


def test_corrupt_records_are_data_errors():
    blob = _random_user(np.random.default_rng(0), 3, 2).encode()
    with pytest.raises(DataError, match="corrupt record"):
        UserSequences.decode(blob[:-8])
    with pytest.raises(DataError, match="corrupt record"):
        UserSequences.decode(blob[:10])
    with pytest.raises(DataError, match="not a lifelong"):
        ItemRecords.decode(blob)
    with pytest.raises(ValueError, match="emb"):
        dataclasses.replace(_random_user(np.random.default_rng(0), 3, 2), emb=np.zeros((2, EMBED_DIM), np.int8)).encode()


def test_item_records_round_trip_and_unknown_ids(tmp_path):
    rng = np.random.default_rng(0)
    items = ItemRecords.from_arrays([2, 5, 9], rng.integers(-127, 128, (3, EMBED_DIM)), [1, 2, 3], [0, 0, 7])
    blob = items.encode()
    back = ItemRecords.decode(blob)
    for name in ("item_id", "emb_int8", "author_id", "topic_id"):
        np.testing.assert_array_equal(getattr(back, name), getattr(items, name))
        assert np.shares_memory(getattr(back, name), np.frombuffer(blob, np.uint8))
    idx, known = back.index_of(np.array([[9, 1], [10, 2]]))
    assert idx.tolist() == [[2, -1], [-1, 0]] and known.tolist() == [[True, False], [False, True]]
    empty = ItemRecords.decode(ItemRecords.from_arrays([], np.zeros((0, EMBED_DIM)), [], []).encode())
    assert empty.index_of([1])[0].tolist() == [-1]
    with pytest.raises(DataError, match="sorted and unique"):
        ItemRecords.from_arrays([5, 2], np.zeros((2, EMBED_DIM)), [0, 0], [0, 0])
    with pytest.raises(DataError, match="item_id.npy"):
        ItemRecords.from_dir(tmp_path)


# -- timelines ---------------------------------------------------------------------------------


def _check_timelines(index: EventIndex, records: dict[int, UserSequences], cols: dict[str, np.ndarray],
                     emb: np.ndarray, req_user: np.ndarray, req_t: np.ndarray, caps: TimelineConfig) -> None:
    """Every request's ranges and tokens equal build_timelines' (req_t == NO_LIMIT: t=None)."""
    tl = build_timelines(index, req_user, req_t, caps)
    rank = index.rank(req_user)
    for i, (uid, t) in enumerate(zip(req_user.tolist(), req_t.tolist())):
        user = records.get(uid, UserSequences.empty(uid))
        got = user.timeline(None if t == NO_LIMIT else t, caps.ll_cap, caps.rt_cap, caps.imp_cap)
        e0, i0 = index.explicit.starts[rank[i]], index.impressions.starts[rank[i]]
        (ll_lo, ll_hi), (rt_lo, rt_hi), (imp_lo, imp_hi) = ((a[i], b[i]) for a, b in
                                                            (tl.ranges[k] for k in ("ll", "rt", "imp")))
        assert (got.ll_lo, got.ll_hi, got.rt_lo, got.rt_hi) == (ll_lo - e0, ll_hi - e0, rt_lo - e0, rt_hi - e0)
        assert (got.imp_lo, got.imp_hi) == (imp_lo - i0, imp_hi - i0)
        for prefix, span, rows in (("", got.ll, tl.ll.row(i)), ("", got.rt, tl.rt.row(i)), ("imp_", got.imp, tl.imp.row(i))):
            np.testing.assert_array_equal(getattr(user, prefix + "ts_ms")[span], cols["ts_ms"][rows])
            np.testing.assert_array_equal(getattr(user, prefix + "item")[span], cols["item"][rows])
            np.testing.assert_array_equal(getattr(user, prefix + "action")[span], cols["action_mask"][rows])
            np.testing.assert_array_equal(getattr(user, prefix + "surface")[span], cols["surface"][rows])
            np.testing.assert_array_equal(getattr(user, prefix + "emb")[span], emb[cols["item"][rows]])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(1, 12))
def test_timeline_equals_build_timelines_with_ties(seed, n_events, max_tokens):
    rng = np.random.default_rng(seed)
    # Few users and timestamps, so many events tie; user 4 never has events.
    user, ts = rng.integers(0, 4, n_events), rng.integers(0, 6, n_events) * 10
    order = np.lexsort((ts, user))
    cols = {"user_id": user[order], "ts_ms": ts[order], "item": rng.integers(0, 5, n_events),
            "action_mask": rng.choice([IMP, CLICK, IMP | CLICK, IMP | HIDE, REPIN], n_events).astype(np.uint16),
            "surface": rng.integers(0, 5, n_events).astype(np.int8)}
    emb = rng.integers(-127, 128, (5, EMBED_DIM)).astype(np.int8)
    index = EventIndex(cols["user_id"], cols["ts_ms"], cols["action_mask"])
    records = {u.user_id: UserSequences.decode(u.encode()) for chunk in
               iter_user_sequences(index, cols["item"], cols["action_mask"], cols["surface"], emb, max_tokens)
               for u in chunk}
    assert sorted(records) == index.users.tolist()
    n_req = 30
    req_t = rng.choice(np.r_[cols["ts_ms"], cols["ts_ms"] + 1, cols["ts_ms"] - 1, 0, 1_000], n_req)
    req_t = np.where(rng.random(n_req) < 0.2, NO_LIMIT, req_t)
    caps = TimelineConfig(*(int(c) for c in rng.integers(0, 4, 3)))
    _check_timelines(index, records, cols, emb, rng.integers(0, 5, n_req), req_t, caps)


def test_timeline_rejects_negative_caps():
    with pytest.raises(ValueError, match="caps"):
        UserSequences.empty(1).timeline(5, ll_cap=-1, rt_cap=1, imp_cap=1)


# -- backends ----------------------------------------------------------------------------------


def test_load_store_serves_the_training_timelines(world_built, store_url):
    world, built = world_built
    summary = load_store(built, store_url, progress=False)
    events = load_dataset(world).events
    items = ItemTable.from_dataset(load_dataset(world))
    cols = {name: events.column(name).to_numpy() for name in ("user_id", "ts_ms", "action_mask", "surface")}
    cols["item"] = items.index_of(events.column("item_id").to_numpy())
    index = EventIndex(cols["user_id"], cols["ts_ms"], cols["action_mask"])
    assert summary["users"] == index.users.size == 30 and summary["items"] == items.item_id.size
    assert summary["explicit_tokens"] + summary["impressions"] <= events.num_rows and summary["bytes"] > 0
    rng = np.random.default_rng(0)
    req_user = np.repeat(np.r_[index.users, 10_000], 12)  # 10_000: a user without events
    req_t = np.where(rng.random(req_user.size) < 0.5, rng.choice(cols["ts_ms"], req_user.size),  # exact ties
                     rng.integers(cols["ts_ms"].min(), cols["ts_ms"].max() + 2, req_user.size))
    req_t[::6] = NO_LIMIT
    # Copies leave the reader: LMDB's views die with it, and a failing assert would show them.
    with open_store(store_url) as store, store.reader() as r:
        meta, stored, unknown, served = r.meta(), r.users(index.users.tolist()), r.users([10_000, -1]), r.items().copy()
        roots = {type(_root(getattr(u, name))) for u in stored for name in ARRAYS}
        records = {u.user_id: u.copy() for u in stored}
    assert roots == {memoryview if store_url.startswith("/") else bytes}  # zero copy: views of the fetched buffers
    assert unknown == [None, None] and sorted(records) == index.users.tolist()
    np.testing.assert_array_equal(served.emb_int8, items.emb_int8)
    np.testing.assert_array_equal(served.item_id, items.item_id)
    caps = TimelineConfig(ll_cap=meta["ll_cap"], rt_cap=meta["rt"], imp_cap=meta["imp_cap"])
    _check_timelines(index, records, cols, items.emb_int8, req_user, req_t, caps)
    assert (caps.ll_cap, caps.rt_cap, caps.imp_cap) == (CFG.ll_cap, CFG.layout.rt, CFG.imp_cap)
    assert meta["layout"] == dataclasses.asdict(CFG.layout) and meta["n_users"] == 30
    assert meta["heads"] and meta["dataset"] == str(built.resolve()) and meta["int8_scale"] == 0.65


def test_lmdb_and_redis_hold_the_same_store(world_built, tmp_path, redis_url):
    _, built = world_built
    urls = [f"lmdb://{tmp_path / 'store'}", redis_url]
    with open_store(redis_url) as store:
        store.clear()
    summaries = [load_store(built, url, progress=False) for url in urls]
    assert {k: v for k, v in summaries[0].items() if k not in ("url", "seconds")} == \
           {k: v for k, v in summaries[1].items() if k not in ("url", "seconds")}
    ids = list(range(32))  # users 0..29 and two unknown ones
    stores = []
    for url in urls:
        with open_store(url) as store, store.reader() as r:
            stores.append((r.meta(), [None if u is None else u.copy() for u in r.users(ids)], r.items().encode()))
    (meta_a, users_a, items_a), (meta_b, users_b, items_b) = stores
    assert meta_a == meta_b and items_a == items_b
    assert [u is None for u in users_a] == [u is None for u in users_b] == [False] * 30 + [True] * 2
    for x, y in zip(users_a[:30], users_b[:30]):
        _assert_same_user(x, y)


def test_reload_replaces_everything(world_built, small_built, store_url):
    load_store(world_built[1], store_url, progress=False)
    load_store(small_built, store_url, progress=False)
    with open_store(store_url) as store, store.reader() as r:
        present, meta = [u is not None for u in r.users(range(30))], r.meta()
    assert meta["n_users"] == 5 and meta["dataset"] == str(small_built.resolve())
    assert present == [True] * 5 + [False] * 25


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://host/x", "lmdb://relative/path", "redis://host:notaport/0",
                                 "redis://127.0.0.1:6379/abc", "redis:///0"])
def test_bad_urls_are_config_errors_naming_the_url(url):
    with pytest.raises(ConfigError) as err:
        open_store(url)
    assert url in str(err.value)


def test_empty_url_is_a_config_error():
    with pytest.raises(ConfigError, match="empty feature store URL"):
        open_store("")


def test_unreachable_redis_is_a_config_error_naming_the_url(closed_port):
    url = f"redis://127.0.0.1:{closed_port}/0"
    with pytest.raises(ConfigError, match="cannot reach Redis") as err:
        open_store(url)
    assert url in str(err.value)


def test_missing_lmdb_store_is_a_data_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    for url in (str(missing), f"lmdb://{missing}"):
        with pytest.raises(DataError, match="no LMDB feature store") as err:
            open_store(url)
        assert str(missing) in str(err.value)
    assert not missing.exists()  # a read-only open creates nothing


def test_unloaded_and_read_only_stores(tmp_path):
    with LMDBStore(tmp_path / "s", writable=True) as store, store.reader() as r, \
            pytest.raises(StoreUnavailable, match="no version loaded; run lifelong store load"):
        r.meta()
    with open_store(tmp_path / "s") as store, pytest.raises(ConfigError, match="read-only"):
        store.clear()


def test_load_store_missing_files_are_data_errors_naming_them(world_built, tmp_path):
    _, built = world_built
    with pytest.raises(DataError, match="build.json"):
        load_store(tmp_path, tmp_path / "store", progress=False)
    partial = tmp_path / "partial"
    shutil.copytree(built, partial)
    (partial / "items" / "emb_int8.npy").unlink()
    with pytest.raises(DataError, match="emb_int8.npy"):
        load_store(partial, tmp_path / "store", progress=False)
