"""Real-time features (store/realtime.py): a stream's events appended to the served feature store.

Every test builds a small hand-made dataset (a source of events and the built directory a load
needs), loads a prefix of it and follows a stream of all its events; the followed records must
then equal a store loaded from all events at once (their newest ``cap`` tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lifelong.core.errors import WriterLocked
from lifelong.data.io import write_json, write_parquet
from lifelong.data.protocol import Protocol
from lifelong.data.schema import EXPLICIT_BITS, HEADS, Action
from lifelong.data.users import sort_events, users_from_events
from lifelong.store.feature_store import UserSequences, load_store, open_store, version_prefix
from lifelong.store.realtime import RT_KEY, RealtimeConsumer, merge_user
from lifelong.store.stream import EVENT_DTYPE, LogStream, open_stream, to_records
from lifelong.transact.sequence_layout import SequenceLayout
from tests.conftest import make_items

LAYOUT = SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4)
LL_CAP, IMP_CAP = 24, 16
EXPLICIT_CAP = LL_CAP + LAYOUT.rt
N_USERS, N_ITEMS = 12, 40
IMP, CLICK, REPIN = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN))
FIELDS = ("ts_ms", "item", "action", "surface", "emb")


# -- data ------------------------------------------------------------------------------------


def _events(seed: int = 0, per_user: int = 60) -> pa.Table:
    """Requests of 1-3 impressions per user, ~30% of them acted on; times strictly increase per user."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[int]] = {k: [] for k in ("user_id", "item_id", "ts_ms", "action_mask", "request_id")}
    request = 0
    for user in range(N_USERS):
        ts = 1_000_000 + int(rng.integers(0, 1000))
        for _ in range(per_user):
            ts += int(rng.integers(1, 2_000))
            request += 1
            for item in rng.choice(N_ITEMS, int(rng.integers(1, 4)), replace=False):
                mask = IMP | (CLICK if rng.random() < 0.2 else 0) | (REPIN if rng.random() < 0.1 else 0)
                for key, value in zip(cols, (user, int(item), ts, mask, request)):
                    cols[key].append(value)
    n = len(cols["user_id"])
    return sort_events(pa.table({**cols, "surface": rng.integers(0, 3, n), "dwell_ms": np.full(n, 100)}))


def _dataset(root: Path, events: pa.Table, name: str) -> Path:
    """A source directory of ``events`` and the built directory a load reads; returns the latter."""
    src, built = root / f"{name}_src", root / name
    src.mkdir(parents=True)
    (built / "items").mkdir(parents=True)
    items = make_items(N_ITEMS)
    write_parquet(items, src / "items.parquet")
    write_parquet(events, src / "events.parquet")
    write_parquet(users_from_events(events), src / "users.parquet")
    write_json({"kind": "ingest", "protocol": Protocol.fit(0, 10_000_000).to_dict()}, src / "dataset.json")
    rng = np.random.default_rng(1)
    for key, arr in (("item_id", np.arange(N_ITEMS, dtype=np.int64)), ("author_id", np.zeros(N_ITEMS, np.int64)),
                     ("topic_id", np.arange(N_ITEMS, dtype=np.int64) % 3),
                     ("emb_int8", rng.integers(-127, 128, (N_ITEMS, 32)).astype(np.int8))):
        np.save(built / "items" / f"{key}.npy", arr)
    write_json({"data": str(src), "heads": list(HEADS), "layout": asdict(LAYOUT),
                "config": {"ll_cap": LL_CAP, "imp_cap": IMP_CAP}}, built / "build.json")
    return built


def _before(events: pa.Table, t_ms: int) -> pa.Table:
    return events.filter(pa.compute.less_equal(events.column("ts_ms"), t_ms))


def _stream_order(events: pa.Table) -> np.ndarray:
    """The events as a live producer appends them (``replay``'s order: time, user, table order)."""
    rec = to_records(events)
    return rec[np.lexsort((rec["user_id"], rec["ts_ms"]))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """All events, the built datasets of everything and of two prefixes, and the cut times."""
    root = tmp_path_factory.mktemp("rt")
    events = _events()
    ts = np.sort(events.column("ts_ms").to_numpy())
    t1, t2 = int(ts[len(ts) // 3]), int(ts[2 * len(ts) // 3])
    return {"events": events, "t1": t1, "t2": t2, "full": _dataset(root, events, "full"),
            "p1": _dataset(root, _before(events, t1), "p1"), "p2": _dataset(root, _before(events, t2), "p2")}


@pytest.fixture(params=["lmdb", "redis"])
def urls(request, tmp_path):
    """An empty store and an empty stream of one backend (Redis store with a Redis stream)."""
    if request.param == "lmdb":
        return str(tmp_path / "store"), str(tmp_path / "stream")
    url = request.getfixturevalue("redis_url")
    with open_store(url) as store:
        store.clear()
    key = f"rt-test-{time.monotonic_ns()}"
    return url, f"{url}?key={key}"


def _append(stream_url: str, records: np.ndarray, chunk: int = 500) -> None:
    with open_stream(stream_url) as stream:
        for i in range(0, len(records), chunk):
            stream.append(records[i:i + chunk])


def _records(url: str) -> tuple[dict[int, UserSequences], dict | None]:
    with open_store(url) as store, store.reader() as r:
        users = {u: s.copy() for u, s in zip(range(N_USERS), r.users(range(N_USERS))) if s is not None}
        prefix = version_prefix(int(store.pointer()["version"]))
        [raw] = r.values([prefix + RT_KEY])
        return users, None if raw is None else json.loads(bytes(raw))


def _assert_tails_equal(got: dict[int, UserSequences], want: dict[int, UserSequences]) -> None:
    """The newest cap tokens of each kind: what a request after every event reads (S_LL, S_RT, S_imp)."""
    assert got.keys() == want.keys()
    for u in want:
        for prefix, cap in (("", EXPLICIT_CAP), ("imp_", IMP_CAP)):
            for name in FIELDS:
                g, w = getattr(got[u], prefix + name), getattr(want[u], prefix + name)
                np.testing.assert_array_equal(g[-cap:] if len(g) else g, w[-cap:] if len(w) else w,
                                              err_msg=f"user {u} {prefix}{name}")


@pytest.fixture(scope="module")
def full_records(data, tmp_path_factory):
    """Every user's record in a store loaded from all events at once."""
    url = str(tmp_path_factory.mktemp("full") / "store")
    load_store(data["full"], url, progress=False)
    return _records(url)[0]


# -- the merge ---------------------------------------------------------------------------------


def _seq(ts, imp_ts=()) -> UserSequences:
    n, m = len(ts), len(imp_ts)
    return UserSequences.from_arrays(1, ts_ms=ts, item=np.arange(n), action=np.full(n, 2), surface=np.zeros(n),
                                     emb=np.zeros((n, 32)), imp_ts_ms=imp_ts, imp_item=np.arange(m),
                                     imp_action=np.ones(m), imp_surface=np.zeros(m), imp_emb=np.zeros((m, 32)))


def test_merge_inserts_late_events_in_time_order_and_caps():
    old = _seq([10, 20, 30], [15])
    new = {"ts_ms": np.array([5, 20, 25, 40]), "item": np.array([100, 101, 102, 103]), "action": np.full(4, 2),
           "surface": np.zeros(4), "emb": np.zeros((4, 32))}
    rec, late = merge_user(old, 1, new, np.array([True, True, True, False]), explicit_cap=4, imp_cap=1)
    # 5 falls off the cap; 20 (a tie) goes after the stored 20; 40 is an impression, the cap keeps it alone.
    assert rec.ts_ms.tolist() == [20, 20, 25, 30] and rec.item.tolist() == [1, 101, 102, 2]
    assert rec.imp_ts_ms.tolist() == [40] and rec.imp_item.tolist() == [103]
    assert late == 3
    empty = {k: v[:0] for k, v in new.items()}
    rec, late = merge_user(None, 7, empty, np.zeros(0, bool), explicit_cap=4, imp_cap=1)
    assert (rec.user_id, rec.n_explicit, rec.n_impressions, late) == (7, 0, 0, 0)


# -- following a stream ------------------------------------------------------------------------


def test_follow_matches_a_full_load_and_counts_skips(data, full_records, urls):
    store_url, stream_url = urls
    load_store(data["p1"], store_url, progress=False)
    records = _stream_order(data["events"])
    extra = np.zeros(3, EVENT_DTYPE)  # an unknown item, and two events a record does not keep
    extra["user_id"], extra["item_id"], extra["ts_ms"] = 0, [10_000, 1, 2], records["ts_ms"][-1] + 1
    extra["action_mask"] = [IMP, 0, IMP | 1 << 15]  # no bit; an impression with an unknown bit
    batch = 256
    # Events arrive out of order inside each batch: the consumer sorts them.
    rng = np.random.default_rng(3)
    shuffled = np.concatenate([rng.permutation(records[i:i + batch]) for i in range(0, len(records), batch)])
    _append(stream_url, np.concatenate([shuffled, extra]))
    with RealtimeConsumer(store_url, stream_url, batch=batch) as consumer:
        done = consumer.run_until_caught_up()
    got, state = _records(store_url)
    _assert_tails_equal(got, full_records)
    in_load = int(np.count_nonzero(records["ts_ms"] <= data["t1"]))
    assert state["events"] == len(records) + 3 == sum(s.events for s in done)
    assert (state["in_load"], state["unknown_item"], state["other"]) == (in_load, 1, 2)
    assert state["explicit"] + state["impressions"] == len(records) - in_load
    assert state["late"] == 0 and state["horizon_ms"] == data["t1"]
    for u, rec in got.items():  # caps hold on every record the consumer wrote
        assert rec.n_explicit <= max(EXPLICIT_CAP, full_records[u].n_explicit) and rec.n_impressions <= IMP_CAP
        assert np.all(np.diff(rec.ts_ms) >= 0) and np.all(np.diff(rec.imp_ts_ms) >= 0)
    assert any(full_records[u].n_explicit > EXPLICIT_CAP >= got[u].n_explicit for u in got)  # a cap cut something
    # Replaying again appends nothing: the offset was committed with the records.
    with RealtimeConsumer(store_url, stream_url, batch=batch) as consumer:
        assert consumer.step().events == 0
    assert _records(store_url)[1] == state


def test_events_arriving_late_across_batches_are_inserted_in_time_order(data, full_records, tmp_path):
    store_url, stream_url = str(tmp_path / "store"), str(tmp_path / "stream")
    load_store(data["p1"], store_url, progress=False)
    records = _stream_order(data["events"])
    records = records[records["ts_ms"] > data["t1"]]
    _append(stream_url, np.random.default_rng(5).permutation(records))  # any order, across batches too
    with RealtimeConsumer(store_url, stream_url, batch=50) as consumer:
        consumer.run_until_caught_up()
    got, state = _records(store_url)
    assert state["late"] > 0
    for u, want in full_records.items():
        for prefix, cap in (("", EXPLICIT_CAP), ("imp_", IMP_CAP)):
            g = getattr(got[u], prefix + "ts_ms")
            np.testing.assert_array_equal(g, getattr(want, prefix + "ts_ms")[-cap:])
            if g.size:  # which of several tokens of one time the cap cuts depends on arrival order
                def key(s, lo=g[0], prefix=prefix):
                    ts, item = getattr(s, prefix + "ts_ms"), getattr(s, prefix + "item")
                    return sorted(zip(ts[ts > lo].tolist(), item[ts > lo].tolist()))
                assert key(got[u]) == key(want)


def test_readers_never_see_a_torn_batch(data, urls):
    """Readers in threads, against a consumer appending in small batches: in every snapshot (one
    LMDB transaction, one Redis MGET), each record holds exactly the events of the stream before
    the offset committed with it, sorted, its length and newest time consistent."""
    store_url, stream_url = urls
    load_store(data["p1"], store_url, progress=False)
    records = _stream_order(data["events"])
    records = records[records["ts_ms"] > data["t1"]]
    _append(stream_url, records)
    loaded, _ = _records(store_url)
    explicit = (records["action_mask"] & EXPLICIT_BITS) != 0
    stop, errors, seen = threading.Event(), [], set()
    reader_store = open_store(store_url, writable=True)  # LMDB: one environment per process and mode
    prefix = version_prefix(int(reader_store.pointer()["version"]))
    keys = [prefix + RT_KEY] + [prefix + b"u:" + u.to_bytes(8, "big") for u in range(N_USERS)]

    def expected(u: int, n: int) -> tuple[int, int, int | None]:
        mine = records["user_id"][:n] == u
        e, i = int(np.count_nonzero(mine & explicit[:n])), int(np.count_nonzero(mine & ~explicit[:n]))
        if not e + i:
            return loaded[u].n_explicit, loaded[u].n_impressions, int(loaded[u].ts_ms[-1]) if loaded[u].n_explicit else None
        newest = records["ts_ms"][:n][mine & explicit[:n]]
        last = int(newest.max()) if newest.size else (int(loaded[u].ts_ms[-1]) if loaded[u].n_explicit else None)
        return (min(EXPLICIT_CAP, loaded[u].n_explicit + e), min(IMP_CAP, loaded[u].n_impressions + i), last)

    def read() -> None:
        while not stop.is_set():
            with reader_store.reader() as r:
                raw_state, *raw_users = r.values(keys)
                n = 0 if raw_state is None else json.loads(bytes(raw_state))["events"]
                for u, raw in enumerate(raw_users):
                    rec = UserSequences.decode(raw)
                    got = (rec.n_explicit, rec.n_impressions, int(rec.ts_ms[-1]) if rec.n_explicit else None)
                    if got != expected(u, n):
                        errors.append(f"user {u} after {n} events: (explicit, impressions, newest) {got} != {expected(u, n)}")
                    if np.any(np.diff(rec.ts_ms) < 0) or np.any(np.diff(rec.imp_ts_ms) < 0):
                        errors.append(f"user {u} after {n} events: unsorted")
                seen.add(n)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with RealtimeConsumer(store_url, stream_url, batch=37) as consumer:
            consumer.run_until_caught_up()
    finally:
        stop.set()
        for t in threads:
            t.join()
        reader_store.close()
    assert not errors[:5] and len(seen) > 3  # snapshots between batches were read, not only the ends


def _pending(store_url: str) -> int:
    """Events the consumer has committed so far (0 before its first batch)."""
    with open_store(store_url) as store, store.reader() as r:
        [raw] = r.values([version_prefix(int(store.pointer()["version"])) + RT_KEY])
        return 0 if raw is None else json.loads(bytes(raw))["events"]


def test_follower_killed_with_sigkill_resumes_without_loss_or_duplicates(data, full_records, tmp_path):
    store_url, stream_url = str(tmp_path / "store"), str(tmp_path / "stream")
    load_store(data["p1"], store_url, progress=False)
    records = _stream_order(data["events"])
    _append(stream_url, records)
    cmd = [sys.executable, "-m", "lifelong.cli", "store", "follow", "--store", store_url, "--stream", stream_url,
           "--batch", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "LIFELONG_QUIET": "1"})
    try:
        deadline = time.monotonic() + 60
        while (done := _pending(store_url)) < 100:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = _pending(store_url)
    assert done <= killed_at < len(records), "the follower finished before it was killed"
    result = subprocess.run([*cmd[:-2], "--batch", "64", "--once"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got, state = _records(store_url)
    _assert_tails_equal(got, full_records)
    assert state["events"] == len(records) and state["batches"] > 1


def test_a_load_while_following_loses_no_event(data, full_records, urls):
    """A follower runs while a newer dataset is loaded: the new version gets every stream event
    newer than its data, starting from a mark of the old version, not from the stream's start."""
    store_url, stream_url = urls
    load_store(data["p1"], store_url, progress=False)
    records = _stream_order(data["events"])
    half = len(records) // 2
    _append(stream_url, records[:half])
    stop = threading.Event()
    with RealtimeConsumer(store_url, stream_url, batch=64, stop=stop) as consumer:
        follower = threading.Thread(target=consumer.run, kwargs={"poll_s": 0.005})
        follower.start()
        try:
            time.sleep(0.2)
            for _ in range(200):  # the load fails at once while a batch holds the lock: retry it
                try:
                    summary = load_store(data["p2"], store_url, progress=False)
                    break
                except WriterLocked:
                    time.sleep(0.01)
            _append(stream_url, records[half:])
            deadline = time.monotonic() + 30
            end = consumer.stream.end_offset()
            while ((consumer.state() or {}).get("offset") != end or consumer.state()["version"] != "v2") \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            follower.join()
        consumer.run_until_caught_up()  # whatever the follower had not reached yet
    got, state = _records(store_url)
    assert state["version"] == summary["version"] == "v2" and state["horizon_ms"] == data["t2"]
    _assert_tails_equal(got, full_records)
    assert state["start_offset"] != (0 if "?key=" not in stream_url else "0-0")  # resumed from a mark
    assert state["in_load"] < int(np.count_nonzero(records["ts_ms"] <= data["t2"]))


def test_an_append_is_visible_to_the_served_rankers_next_batch(data, tmp_path):
    from lifelong.serving.ranking import RankRequest
    from lifelong.transact.registry import build_model
    from lifelong.transact.serving import Ranker

    store_url, stream_url = str(tmp_path / "store"), str(tmp_path / "stream")
    load_store(data["full"], store_url, progress=False)
    model = build_model("transact_v2", layout=LAYOUT, n_heads=len(HEADS))
    with open_store(store_url, writable=True) as store, LogStream(stream_url) as stream, \
            RealtimeConsumer(store, stream) as consumer:
        ranker = Ranker(model, store)
        rows, _ = ranker.item_rows(np.arange(8))
        before = ranker.rank([RankRequest(user_id=3, items=rows, surface=0)])[0]
        event = np.zeros(1, EVENT_DTYPE)
        event[0] = (3, 17, int(data["events"].column("ts_ms").to_numpy().max()) + 1, REPIN | IMP, 1, 0, 99)
        stream.append(event)
        assert consumer.step().explicit == 1
        after = ranker.rank([RankRequest(user_id=3, items=rows, surface=0)])[0]
        with store.reader() as r:
            [rec] = r.users([3])
            tl = rec.timeline(None, LL_CAP, LAYOUT.rt, IMP_CAP)
            assert rec.item[tl.rt][-1] == 17  # S_RT's newest action is the event
    assert after.store_version == before.store_version
    assert not np.allclose(before.probs, after.probs)
