"""Real-data ingest: tiny fixtures in each source's real format, plus counts on the real data.

The fixtures are written here, in tmp_path; the real datasets are never copied (licences). The
``realdata`` tests read ``../shared/data`` beside the repository and are skipped without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifelong.core.errors import ConfigError, DataError, LifelongError
from lifelong.data.ingest import SOURCES, ingest
from lifelong.data.ingest.common import dense_ids, vocabulary_codes
from lifelong.data.io import load_dataset
from lifelong.data.schema import Action

IMP, CLICK, REPIN, LIKE, HIDE = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN, Action.LIKE,
                                                  Action.HIDE))
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def _quarantine(out: Path) -> list[tuple[str, int, str, str]]:
    t = pq.read_table(out / "quarantine.parquet")
    return list(zip(*(t.column(c).to_pylist() for c in ("file", "line", "reason", "raw"))))


def _by_user_item(events) -> dict[tuple[int, int], dict]:
    rows = events.to_pylist()
    return {(r["user_id"], r["item_id"]): r for r in rows}


def _assert_sorted(events) -> None:
    u, t = events.column("user_id").to_numpy(), events.column("ts_ms").to_numpy()
    assert np.all((u[1:] > u[:-1]) | ((u[1:] == u[:-1]) & (t[1:] >= t[:-1])))


# --- KuaiRand -------------------------------------------------------------------------------

KUAI_HEADER = ("user_id\tvideo_id\tdate\thourmin\ttime_ms\tis_click\tis_follow\tis_comment\tis_forward\t"
               "long_view\tplay_time_ms\tduration_ms\tcomment_stay_time\tis_profile_enter\tlabel\ttimestamp")
T0 = 1_649_581_149_287  # 2022-04-10 08:59:09 UTC


def _kuai_row(user, video, date, hourmin, ts, click=0, follow=0, comment=0, forward=0, long_view=0,
              play=1000, duration=5000, label=1) -> str:
    return "\t".join(str(v) for v in (user, video, date, hourmin, ts, click, follow, comment, forward, long_view,
                                      play, duration, 0, 0, label, "2022-04-10 08:59:09"))


def _kuairand(src: Path) -> Path:
    return _write(src / "processed_standard_kcore_15.csv", [
        KUAI_HEADER,
        _kuai_row(7, 100, 20220410, 1700, T0 + 5_000, click=1, long_view=1, play=4000, duration=0),  # line 2
        _kuai_row(7, 101, 20220410, 1700, T0, label=0, play=300),                                   # line 3
        _kuai_row(7, 100, 20220411, 900, T0 + 86_400_000, follow=1, comment=1, forward=1, duration=9000),
        _kuai_row(3, 102, 20220410, 1700, T0 + 10, click=1),                                       # line 5
        _kuai_row(3, 103, 20220410, 1700, "soon"),                                                 # line 6: bad ts
        _kuai_row(3, 104, 20220410, 1700, T0, label=2),                                            # line 7: bad label
        "3\t105\t20220410",                                                                        # line 8: short
    ])


def test_kuairand_mapping_and_quarantine(tmp_path):
    _kuairand(tmp_path / "src")
    report = ingest("kuairand", tmp_path / "src", tmp_path / "out")
    assert (report.rows_read, report.events_written, report.users) == (7, 4, 2)
    assert report.quarantined == {"unparseable time_ms": 1, "label not 0 or 1": 1, "wrong number of fields": 1}
    # Item 103's and 104's own fields parsed, so the catalogue keeps them; 105's line is unreadable.
    assert report.items == 5 and report.items_without_events == 2
    ds = load_dataset(report.out)
    _assert_sorted(ds.events)
    ev = ds.events.to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in ev] == [(3, 102), (7, 101), (7, 100), (7, 100)]
    like = IMP | REPIN | LIKE
    assert [r["action_mask"] for r in ev] == [
        like | CLICK, IMP | HIDE, like | CLICK | int(Action.LONG_VIEW),
        like | int(Action.FOLLOW | Action.COMMENT | Action.SHARE)]
    assert [r["dwell_ms"] for r in ev] == [1000, 300, 4000, 1000]
    assert [r["ts_ms"] for r in ev] == [T0 + 10, T0, T0 + 5_000, T0 + 86_400_000]
    # One request per (user, date, hourmin): user 7's two rows of 2022-04-10 17h share one.
    req = [r["request_id"] for r in ev]
    assert req[1] == req[2] and len({req[0], req[1], req[3]}) == 3
    items = {r["item_id"]: r for r in ds.items.to_pylist()}
    assert items[100]["duration_ms"] == 9000  # the largest logged duration wins over a logged 0
    assert items[100]["media_type"] == 1 and items[100]["author_id"] == 0 and items[100]["topic_id"] == 0
    assert _quarantine(report.out) == [
        ("processed_standard_kcore_15.csv", 6, "unparseable time_ms", _kuai_row(3, 103, 20220410, 1700, "soon")),
        ("processed_standard_kcore_15.csv", 7, "label not 0 or 1", _kuai_row(3, 104, 20220410, 1700, T0, label=2)),
        ("processed_standard_kcore_15.csv", 8, "wrong number of fields", "3\t105\t20220410"),
    ]
    meta = json.loads((report.out / "dataset.json").read_text())
    assert meta["kind"] == "ingest" and meta["source"] == "kuairand" and meta["has_impressions"] is True
    assert meta["quarantined"] == report.quarantined and meta["counts"]["events"] == 4
    assert meta["protocol"] == report.protocol and meta["protocol"]["eval_end_ms"] == T0 + 86_400_000 + 1
    assert {"src", "embedding_method", "lifelong_version", "counts"} <= meta.keys()


def test_requests_by_day_join_a_users_chunks_of_one_utc_day(tmp_path):
    _kuairand(tmp_path / "src")
    src = tmp_path / "src" / "processed_standard_kcore_15.csv"
    # A second chunk of user 7 on the first day, an hour later: its own request natively.
    src.write_text(src.read_text() + _kuai_row(7, 102, 20220410, 1800, T0 + 3_600_000) + "\n")
    native = load_dataset(ingest("kuairand", tmp_path / "src", tmp_path / "native").out).events.to_pylist()
    report = ingest("kuairand", tmp_path / "src", tmp_path / "day", requests="day")
    ev = load_dataset(report.out).events.to_pylist()
    assert [(r["user_id"], r["item_id"], r["ts_ms"]) for r in ev] == [
        (r["user_id"], r["item_id"], r["ts_ms"]) for r in native]
    assert len({r["request_id"] for r in native}) == 4
    req = [r["request_id"] for r in ev]  # user 3's day; user 7's first day (3 events); user 7's next day
    assert req[1] == req[2] == req[3] and len({req[0], req[1], req[4]}) == 3
    meta = json.loads((report.out / "dataset.json").read_text())
    assert meta["mapping"]["request_id"].startswith("one per (user, UTC day)")
    with pytest.raises(ConfigError, match="unknown --requests 'week'"):
        ingest("kuairand", tmp_path / "src", tmp_path / "week", requests="week")


def test_kuairand_crlf_and_no_quarantine_file(tmp_path):
    _write(tmp_path / "src" / "processed_standard_kcore_15.csv",
           [KUAI_HEADER, _kuai_row(1, 5, 20220410, 1700, T0), _kuai_row(1, 6, 20220410, 1700, T0 + 1)], "\r\n")
    report = ingest("kuairand", tmp_path / "src", tmp_path / "out")
    assert report.events_written == 2 and report.quarantined == {}
    assert not (report.out / "quarantine.parquet").exists()


def test_missing_header_column_names_file_and_column(tmp_path):
    src = tmp_path / "src"
    _write(src / "processed_standard_kcore_15.csv",
           [KUAI_HEADER.replace("\tlabel\t", "\tlabels\t"), _kuai_row(1, 5, 20220410, 1700, T0)])
    with pytest.raises(DataError, match=r"processed_standard_kcore_15\.csv, column 'label': missing header column"):
        ingest("kuairand", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary directory left either


@pytest.mark.parametrize(("source", "file"), [("kuairand", "processed_standard_kcore_15.csv"),
                                              ("movielens", "ratings.csv"), ("movielens", "movies.csv"),
                                              ("mind", "behaviors.tsv"), ("mind", "news.tsv"),
                                              ("taobao", "UserBehavior.csv")])
def test_missing_file_names_it(tmp_path, source, file):
    src = tmp_path / "src"
    {"kuairand": _kuairand, "movielens": _movielens, "mind": _mind, "taobao": _taobao}[source](src)
    (src / file).unlink()
    with pytest.raises(DataError, match=rf"{file}: file not found"):
        ingest(source, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_leaves_existing_output_untouched(tmp_path):
    _kuairand(tmp_path / "src")
    out = tmp_path / "out"
    ingest("kuairand", tmp_path / "src", out)
    before = (out / "events.parquet").read_bytes()
    (tmp_path / "src" / "processed_standard_kcore_15.csv").write_text(KUAI_HEADER + "\n")
    with pytest.raises(DataError, match="no data rows"):
        ingest("kuairand", tmp_path / "src", out)
    assert (out / "events.parquet").read_bytes() == before


def test_every_row_quarantined_is_an_error(tmp_path):
    _write(tmp_path / "src" / "processed_standard_kcore_15.csv", [KUAI_HEADER, _kuai_row(1, 5, 1, 1, "x")])
    with pytest.raises(DataError, match=r"every row was quarantined \(unparseable time_ms: 1\)"):
        ingest("kuairand", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_source_and_missing_folder(tmp_path):
    with pytest.raises(LifelongError, match="unknown ingest source 'netflix'"):
        ingest("netflix", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="dataset folder not found"):
        ingest("taobao", tmp_path / "nope", tmp_path / "out")
    assert SOURCES == ("kuairand", "movielens", "mind", "taobao")


def test_ingest_is_deterministic(tmp_path):
    _kuairand(tmp_path / "src")
    a = ingest("kuairand", tmp_path / "src", tmp_path / "a").out
    b = ingest("kuairand", tmp_path / "src", tmp_path / "b").out
    for name in ("items.parquet", "events.parquet", "users.parquet", "quarantine.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# --- MovieLens ------------------------------------------------------------------------------

DAY_S = 86_400
ML_T0 = 964_982_400  # 2000-07-30 18:40 UTC


def _movielens(src: Path) -> Path:
    _write(src / "movies.csv", [
        "movieId,title,genres",
        "1,Toy Story (1995),Adventure|Animation|Children",
        '11,"American President, The (1995)",Comedy|Drama|Romance',
        "21,Nothing (2016),(no genres listed)",
        "x1,Broken (2000),Drama",  # line 5: bad id, quarantined
    ])
    return _write(src / "ratings.csv", [
        "userId,movieId,rating,timestamp",
        f"1,1,4.0,{ML_T0}",            # line 2: REPIN
        f"1,11,2.0,{ML_T0 + 60}",      # line 3: HIDE (same UTC day -> same request)
        f"1,21,3.5,{ML_T0 + DAY_S}",   # line 4: CLICK, next day
        f"2,1,2.5,{ML_T0 + 5}",        # line 5: CLICK
        f"2,99,0.5,{ML_T0 + 7}",       # line 6: HIDE, a movie missing from movies.csv
        f"2,11,6.0,{ML_T0}",           # line 7: rating out of range
        f"2,21,3.3,{ML_T0}",           # line 8: not a half star
        "2,1,4.0,yesterday",          # line 9: unparseable timestamp
        f"2,1,,{ML_T0}",               # line 10: missing rating
        "2,1,4.0,-5",                 # line 11: negative timestamp
    ])


def test_movielens_mapping_no_impressions(tmp_path):
    _movielens(tmp_path / "src")
    report = ingest("movielens", tmp_path / "src", tmp_path / "out")
    assert (report.rows_read, report.events_written, report.users, report.items) == (10, 5, 2, 4)
    assert report.quarantined == {"rating out of range": 1, "rating not a half-star step": 1,
                                  "unparseable timestamp": 1, "missing rating": 1, "negative timestamp": 1,
                                  "movies.csv: unparseable movieId": 1}
    assert not report.has_impressions
    ds = load_dataset(report.out)
    _assert_sorted(ds.events)
    masks = ds.events.column("action_mask").to_numpy()
    assert not np.any(masks & IMP)
    ev = _by_user_item(ds.events)
    assert ev[(1, 1)]["action_mask"] == REPIN and ev[(1, 11)]["action_mask"] == HIDE
    assert ev[(1, 21)]["action_mask"] == CLICK and ev[(2, 1)]["action_mask"] == CLICK
    assert ev[(2, 99)]["action_mask"] == HIDE
    assert ev[(1, 1)]["ts_ms"] == ML_T0 * 1000
    assert ev[(1, 1)]["request_id"] == ev[(1, 11)]["request_id"] != ev[(1, 21)]["request_id"]
    assert ev[(2, 1)]["request_id"] not in {ev[(1, 1)]["request_id"], ev[(1, 21)]["request_id"]}
    # Genre vocabulary of movies.csv: Adventure, Animation, Children, Comedy, Drama, Romance.
    topics = dict(zip(ds.items.column("item_id").to_pylist(), ds.items.column("topic_id").to_pylist()))
    assert topics == {1: 1, 11: 4, 21: 0, 99: 0}
    assert set(ds.items.column("media_type").to_pylist()) == {0}
    lines = [(f, line, reason) for f, line, reason, _ in _quarantine(report.out)]
    assert lines == [("ratings.csv", 7, "rating out of range"), ("ratings.csv", 8, "rating not a half-star step"),
                     ("ratings.csv", 9, "unparseable timestamp"), ("ratings.csv", 10, "missing rating"),
                     ("ratings.csv", 11, "negative timestamp"), ("movies.csv", 5, "movies.csv: unparseable movieId")]
    assert json.loads((report.out / "dataset.json").read_text())["has_impressions"] is False


def test_movies_missing_genres_column(tmp_path):
    _movielens(tmp_path / "src")
    _write(tmp_path / "src" / "movies.csv", ["movieId,title", "1,Toy Story (1995)"])
    with pytest.raises(DataError, match=r"movies\.csv, column 'genres': missing header column"):
        ingest("movielens", tmp_path / "src", tmp_path / "out")


# --- MIND -----------------------------------------------------------------------------------

def _mind(src: Path) -> Path:
    _write(src / "news.tsv", [
        "N10\tsports\tracing\tA title\tAn abstract\thttps://x\t[]\t[]",
        "N11\tnews\tnewsus\tB\tb\thttps://y\t[]\t[]",
        "N11\tfinance\tmarkets\tdup\tdup\thttps://z\t[]\t[]",  # duplicate id: first wins
    ])
    return _write(src / "behaviors.tsv", [
        "5\tU1\t11/12/2019 2:14:46 PM\tN10 N11\tN20-1 N21-0 N10-0",   # line 1
        "9\tU1\t11/11/2019 9:00:00 AM\tN10 N11 N12\tN22-0",            # line 2: U1's first row, longest history
        "7\tU2\t11/13/2019 12:00:00 AM\t\tN20-0 N11-1",                # line 3: empty history
        "8\tU3\t11/13/2019 1:00:00 AM\tN10\tN20-2",                    # line 4: bad impression token
        "6\tU4\tyesterday\tN10\tN20-1",                                # line 5: bad time
    ])


def test_mind_impressions_and_history(tmp_path):
    _mind(tmp_path / "src")
    report = ingest("mind", tmp_path / "src", tmp_path / "out")
    assert report.rows_read == 5 and report.users == 2
    assert report.quarantined == {"bad impression token": 1, "unparseable time": 1,
                                  "news.tsv: duplicate news_id": 1}
    ds = load_dataset(report.out)
    _assert_sorted(ds.events)
    ev = ds.events.to_pylist()
    first_u1 = 1_573_462_800_000  # 2019-11-11 09:00:00 (read as UTC)
    hist = [r for r in ev if r["user_id"] == 1 and not r["action_mask"] & IMP]
    assert [r["item_id"] for r in hist] == [10, 11, 12]
    assert [r["ts_ms"] for r in hist] == [first_u1 - 3_600_000 - 120_000, first_u1 - 3_600_000 - 60_000,
                                          first_u1 - 3_600_000]
    assert {r["action_mask"] for r in hist} == {CLICK} and len({r["request_id"] for r in hist}) == 1
    assert hist[0]["request_id"] > 9  # synthetic history requests come after every impression id
    shown = [(r["user_id"], r["item_id"], r["action_mask"], r["request_id"]) for r in ev if r["action_mask"] & IMP]
    assert sorted(shown) == sorted([(1, 20, IMP | CLICK, 5), (1, 21, IMP, 5), (1, 10, IMP, 5), (1, 22, IMP, 9),
                                    (2, 20, IMP, 7), (2, 11, IMP | CLICK, 7)])
    assert not any(r["user_id"] == 2 and not r["action_mask"] & IMP for r in ev)  # U2 had no history
    topics = dict(zip(ds.items.column("item_id").to_pylist(), ds.items.column("topic_id").to_pylist()))
    assert topics[10] == 2 and topics[11] == 1 and topics[20] == 0  # vocabulary: news, sports
    assert report.items == 6 and report.items_without_events == 0
    assert [(line, reason) for _, line, reason, _ in _quarantine(report.out)] == [
        (4, "bad impression token"), (5, "unparseable time"), (3, "news.tsv: duplicate news_id")]


# --- Taobao ---------------------------------------------------------------------------------

TB_T0 = 1_511_600_000  # 2017-11-25 16:53 UTC+8, inside the window


def _taobao(src: Path) -> Path:
    return _write(src / "UserBehavior.csv", [
        f"1,100,7000,pv,{TB_T0}",
        f"1,100,7000,cart,{TB_T0 + 10}",
        f"1,101,5000,fav,{TB_T0 + 4000}",      # next hour -> new request
        f"2,102,7000,buy,{TB_T0}",
        f"2,103,6000,like,{TB_T0}",             # line 5: unknown behaviour
        "2,104,6000,pv,1505117799",            # line 6: September 2017, outside the window
        "2,105,6000,pv,1511539199",            # line 7: one second before the window opens
        "2,106,6000,pv,1512316800",            # line 8: the second after the window closes
        "2,107,6000,pv,1512316799",            # line 9: last second of the window: kept
        "2,108,6000,pv,noon",                  # line 10: unparseable
        "2,109,6000,pv",                        # line 11: wrong field count
    ])


def test_taobao_mapping_window_and_catalogue(tmp_path):
    _taobao(tmp_path / "src")
    report = ingest("taobao", tmp_path / "src", tmp_path / "out")
    assert (report.rows_read, report.events_written, report.users) == (11, 4, 2)  # pv + cart of 100: one event
    assert report.quarantined == {"unknown behaviour": 1, "timestamp outside window": 3,
                                  "unparseable timestamp": 1, "wrong number of fields": 1}
    assert report.items == 9 and report.items_without_events == 5  # 100..108; 109's line is unreadable
    ds = load_dataset(report.out)
    _assert_sorted(ds.events)
    ev = ds.events.to_pylist()
    # A user's rows on an item within the hour are one shown item with the union of their actions.
    assert [(r["item_id"], r["action_mask"], r["ts_ms"]) for r in ev] == [
        (100, IMP | int(Action.CART), TB_T0 * 1000), (101, IMP | REPIN, (TB_T0 + 4000) * 1000),
        (102, IMP | int(Action.PURCHASE), TB_T0 * 1000), (107, IMP, 1512316799 * 1000)]
    assert ev[0]["request_id"] != ev[1]["request_id"]  # the next hour
    topics = dict(zip(ds.items.column("item_id").to_pylist(), ds.items.column("topic_id").to_pylist()))
    assert topics[101] == 1 and topics[103] == 2 and topics[100] == 3  # categories 5000, 6000, 7000
    q = _quarantine(report.out)
    assert [(line, reason) for _, line, reason, _ in q] == [
        (5, "unknown behaviour"), (6, "timestamp outside window"), (7, "timestamp outside window"),
        (8, "timestamp outside window"), (10, "unparseable timestamp"), (11, "wrong number of fields")]
    assert q[0][3] == f"2,103,6000,like,{TB_T0}"


def test_headerless_file_with_wrong_width_is_a_file_error(tmp_path):
    _write(tmp_path / "src" / "UserBehavior.csv", ["1,100,pv,1511600000", "2,100,pv,1511600000"])
    with pytest.raises(DataError, match=r"UserBehavior\.csv.*no row has the expected 5 fields"):
        ingest("taobao", tmp_path / "src", tmp_path / "out")


# --- helpers --------------------------------------------------------------------------------

def test_dense_ids_and_vocabulary():
    assert dense_ids(np.array([3, 1, 3, 1]), np.array([0, 0, 0, 1])).tolist() == [2, 0, 2, 1]
    codes, vocab = vocabulary_codes(pa.array(["b", "a", "", "b"]))
    assert codes.tolist() == [2, 1, 0, 2] and vocab == ["a", "b"]


# --- real data ------------------------------------------------------------------------------

REAL = {  # source: (folder, rows_read, users, items, events_written or None)
    "kuairand": ("kuairand27k-likehate", 41_828, 664, 9_359, 41_828),
    "movielens": ("movielens-latest-small", 100_836, 610, 9_724, 100_836),
    "mind": ("mind-small-sample", 5_000, 4_637, None, None),
    "taobao": ("taobao-userbehavior-head", 84_287, 814, 55_233, None),
}


@pytest.mark.realdata
@pytest.mark.parametrize("source", SOURCES)
def test_real_dataset_counts(tmp_path, source):
    folder, rows, users, items, events = REAL[source]
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"{SHARED_DATA / folder} not present")
    start = time.perf_counter()
    report = ingest(source, SHARED_DATA / folder, tmp_path / source)
    elapsed = time.perf_counter() - start
    assert (report.rows_read, report.users) == (rows, users)
    if items is not None:
        assert report.items == items
    if events is not None:
        assert report.events_written == events and report.quarantined == {}
    ds = load_dataset(report.out)
    masks = ds.events.column("action_mask").to_numpy()
    if source == "mind":  # 189,359 shown pairs, the rest is placed click history
        assert int(np.count_nonzero(masks & IMP)) == 189_359
    if source == "taobao":  # 35 rows of the head file predate the documented window
        assert report.quarantined == {"timestamp outside window": 35}
        assert report.events_written < 84_287 - 35  # repeated rows on an item within the hour merge
        assert np.all(masks & IMP)
    if source == "movielens":
        assert not np.any(masks & IMP)
    emb = ds.items.column("embedding").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, 32)
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-2)
    assert elapsed < 60


def test_rows_never_cut_before_the_item_embeddings_cutoff(tmp_path):
    from lifelong.transact.training_rows import BuildConfig, build_rows

    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"{u},{1 + (d * 3 + u) % 5},{4.0 if (d + u) % 3 else 2.0},{ML_T0 + d * DAY_S + u}"
              for d in range(40) for u in (1, 2, 3)]
    _write(tmp_path / "src" / "ratings.csv", lines)
    _write(tmp_path / "src" / "movies.csv", ["movieId,title,genres", *(f"{i},M{i},Drama" for i in range(1, 6))])
    report = ingest("movielens", tmp_path / "src", tmp_path / "default")
    meta = json.loads((report.out / "dataset.json").read_text())
    assert meta["embedding_cutoff_ms"] == meta["protocol"]["cutoff_ms"] - 3 * 86_400_000  # 3 days behind by default
    # Rows evaluated on the last 15 days would train with embeddings learned from those days.
    with pytest.raises(DataError, match="seen the evaluation period.*--protocol 20,0,15"):
        build_rows(report.out, tmp_path / "rows", BuildConfig(protocol_days=(20, 0, 15)))
    assert not (tmp_path / "rows").exists()
    report = ingest("movielens", tmp_path / "src", tmp_path / "placed", protocol_days=(20, 0, 15))
    meta = build_rows(report.out, tmp_path / "rows", BuildConfig(protocol_days=(20, 0, 15)))
    assert meta["protocol"]["cutoff_ms"] == json.loads((report.out / "dataset.json").read_text())["protocol"]["cutoff_ms"]
