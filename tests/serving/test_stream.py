"""Event streams: the append-only log (offsets, segments, torn tails, one writer), Redis Streams
(offset reads, consumer groups, re-delivery), URLs, and replaying a world in time order."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.world import load_config, simulate_to
from lifelong.store.stream import (
    EVENT_DTYPE,
    LOG_DTYPE,
    LogStream,
    RedisStream,
    open_stream,
    replay,
    to_records,
)

REC = LOG_DTYPE.itemsize


def make_records(n: int, start: int = 0) -> np.ndarray:
    """Events whose every field differs from record to record (item_id is the record number)."""
    k = np.arange(start, start + n)
    out = np.empty(n, EVENT_DTYPE)
    out["user_id"], out["item_id"], out["ts_ms"] = k % 7, k, 1_000 + 10 * k
    out["action_mask"], out["surface"], out["dwell_ms"], out["request_id"] = k % 2048, k % 5 - 2, k * 3, -k
    return out


def segment_files(path) -> list:
    return sorted(path.glob("*.log"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world") / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=10"]), d)
    return d


@pytest.fixture
def redis_stream(redis_url):
    key = f"lifelong:test:stream:{uuid.uuid4().hex}"
    with RedisStream(redis_url, key=key, entry_records=3) as stream:
        yield stream
        redis.Redis.from_url(redis_url).delete(key)


# -- LogStream ---------------------------------------------------------------------------------------


def test_log_round_trip_and_reopen(tmp_path):
    data = make_records(10)
    with LogStream(tmp_path / "log") as log:
        assert log.end_offset() == 0 and log.read(0, 5)[0].size == 0
        assert log.append(data[:4]) == 4
        assert log.append(data[4:]) == 10
        assert log.append(data[:0]) == 10
        records, offset = log.read(0, 100)
    assert records.dtype == EVENT_DTYPE and records.tobytes() == data.tobytes() and offset == 10
    with LogStream(tmp_path / "log") as log:  # a fresh object appends after what is there
        assert log.append(make_records(2, start=10)) == 12
        assert log.read(0, 100)[0]["item_id"].tolist() == list(range(12))


def test_log_reads_batches_from_any_offset_across_segments(tmp_path):
    data = make_records(50)
    with LogStream(tmp_path, segment_records=7) as log:
        for chunk in np.array_split(data, [3, 4, 20, 33]):  # appends straddle segment ends
            log.append(chunk)
        assert [f.name for f in segment_files(tmp_path)][:2] == [f"{0:020d}.log", f"{7:020d}.log"]
        assert len(segment_files(tmp_path)) == 8 and log.end_offset() == 50
        rng = np.random.default_rng(0)
        for _ in range(40):
            start, n = int(rng.integers(0, 51)), int(rng.integers(1, 30))
            records, offset = log.read(start, n)
            assert records.tobytes() == data[start:start + n].tobytes() and offset == min(start + n, 50)
        batches = list(log.batches(5, 16))
    assert [len(r) for r, _ in batches] == [16, 16, 13] and [o for _, o in batches] == [21, 37, 50]


def test_log_torn_final_record_is_dropped_and_appends_continue(tmp_path):
    data = make_records(12)
    with LogStream(tmp_path, segment_records=5) as log:
        log.append(data[:10])
    last = segment_files(tmp_path)[-1]
    with open(last, "r+b") as f:  # a crash in the middle of writing record 9
        f.truncate(5 * REC - 17)
    with LogStream(tmp_path) as reader:
        records, offset = reader.read(0, 100)
        assert records.tobytes() == data[:9].tobytes() and offset == 9 and reader.end_offset() == 9
    with LogStream(tmp_path, segment_records=5) as log:
        assert log.append(data[9:]) == 12
        assert log.dropped_bytes == REC - 17
        assert log.read(0, 100)[0].tobytes() == data.tobytes()


def test_log_zero_filled_tail_fails_its_checksum(tmp_path):
    data = make_records(6)
    with LogStream(tmp_path) as log:
        log.append(data[:4])
    with open(segment_files(tmp_path)[-1], "ab") as f:  # pages allocated but never written (power loss)
        f.write(bytes(3 * REC))
    with LogStream(tmp_path) as log:
        records, offset = log.read(2, 100)
        assert records.tobytes() == data[2:4].tobytes() and offset == 4
        assert log.append(data[4:]) == 6 and log.dropped_bytes == 3 * REC
        assert log.read(0, 100)[0].tobytes() == data.tobytes()


def test_log_corruption_before_the_last_segment_is_an_error(tmp_path):
    with LogStream(tmp_path, segment_records=4) as log:
        log.append(make_records(10))
    first = segment_files(tmp_path)[0]
    raw = bytearray(first.read_bytes())
    raw[REC + 3] ^= 0xFF
    first.write_bytes(bytes(raw))
    with LogStream(tmp_path) as log:
        assert log.read(0, 1)[1] == 1
        with pytest.raises(DataError, match="record 1 fails its checksum"):
            log.read(0, 100)
        assert log.read(4, 100)[0]["item_id"].tolist() == list(range(4, 10))
    first.write_bytes(bytes(raw[:-1]))
    with LogStream(tmp_path) as log, pytest.raises(DataError, match="the log is corrupted"):
        log.read(0, 100)


def test_log_offsets_are_checked(tmp_path):
    with LogStream(tmp_path) as log:
        with pytest.raises(DataError, match="past the end of the log"):
            log.read(1, 10)
        log.append(make_records(3))
        with pytest.raises(DataError, match=r"offset 4 is past the end of the log \(3 records\)"):
            log.read(4, 10)
        for bad in (-1, "3", 1.0, True):
            with pytest.raises(ConfigError, match="record number"):
                log.read(bad, 10)
        with pytest.raises(ConfigError, match="max_records"):
            log.read(0, 0)


def test_log_has_one_writer_and_readers_see_its_appends(tmp_path):
    with LogStream(tmp_path) as writer, LogStream(tmp_path) as other, LogStream(tmp_path) as reader:
        writer.append(make_records(2))
        with pytest.raises(DataError, match="another writer"):
            other.append(make_records(1))
        records, offset = reader.read(0, 10)
        writer.append(make_records(3, start=2))
        more, offset = reader.read(offset, 10)
        assert records["item_id"].tolist() + more["item_id"].tolist() == list(range(5)) and offset == 5
    with LogStream(tmp_path) as other:  # the lock went with the writer
        assert other.append(make_records(1, start=5)) == 6


def test_log_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the log directory"):
        LogStream(tmp_path / "f")


def test_to_records_checks_columns():
    with pytest.raises(ValueError, match="lack the column"):
        to_records(np.zeros(2, dtype=[("user_id", "<i8")]))


# -- URLs -------------------------------------------------------------------------------------------


def test_open_stream_urls(tmp_path, closed_port):
    with open_stream(tmp_path / "a") as s:
        assert isinstance(s, LogStream) and s.path == tmp_path / "a"
    with open_stream(f"log://{tmp_path}/b%20c") as s:
        assert isinstance(s, LogStream) and s.path == tmp_path / "b c"
    for url, message in [("", "empty"), ("log://relative/x", "three slashes"), ("kafka://h/t", "unknown event stream"),
                         ("redis://localhost:6379/0?key=a&key=b", "one key="),
                         ("redis://localhost:6379/0?db=3", "one key="), ("redis://localhost:6379/x", "bad Redis URL"),
                         (f"redis://127.0.0.1:{closed_port}/0", "cannot reach Redis")]:
        with pytest.raises(ConfigError, match=message):
            open_stream(url, **({"connect_timeout_s": 0.5} if "redis" in url else {}))


def test_open_stream_redis_key(redis_url):
    with open_stream(f"{redis_url}?key=lifelong:test:named") as s:
        assert isinstance(s, RedisStream) and s.key == "lifelong:test:named"
    with open_stream(redis_url) as s:
        assert s.key == "lifelong:events"


def test_redis_key_of_another_type(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("lifelong:test:not-a-stream", b"x")
    with pytest.raises(ConfigError, match="holds a string, not a stream"):
        RedisStream(redis_url, key="lifelong:test:not-a-stream")
    client.delete("lifelong:test:not-a-stream")


# -- RedisStream --------------------------------------------------------------------------------------


def test_redis_append_and_read_from_offsets(redis_stream):
    data = make_records(11)
    s = redis_stream
    assert s.end_offset() == "0-0" and s.read("0-0", 5)[0].size == 0
    s.append(data[:7])  # entries of 3, 3, 1 records
    end = s.append(data[7:])  # 3, 1
    assert s.end_offset() == end
    assert s.read(end, 10)[0].size == 0 and s.read(end, 10)[1] == end
    offsets = [s.start_offset()]  # offsets[k]: where record k starts, found one record at a time
    for _ in range(11):
        offsets.append(s.read(offsets[-1], 1)[1])
    first_id = s._client.xrange(s.key, count=1)[0][0].decode()
    assert offsets[1] == f"{first_id}:1" and offsets[11] == end
    for start in range(12):
        for n in (1, 2, 4, 11):
            records, nxt = s.read(offsets[start], n)
            assert records.tobytes() == data[start:start + n].tobytes()
            assert nxt == offsets[min(start + n, 11)]
    assert [len(r) for r, _ in s.batches("0-0", 4)] == [4, 4, 3]
    s.append(make_records(2, start=11))
    assert s.read(offsets[9], 100)[0]["item_id"].tolist() == [9, 10, 11, 12]


def test_redis_offsets_are_checked(redis_stream):
    for bad in ("0", "1-2-3", "x-1", 5, "1-1:"):
        with pytest.raises(ConfigError, match="Redis stream offset"):
            redis_stream.read(bad, 10)
    redis_stream.append(make_records(5))
    _, offset = redis_stream.read("0-0", 1)  # inside the first entry
    redis_stream._client.xtrim(redis_stream.key, maxlen=1, approximate=False)
    with pytest.raises(DataError, match="which is gone"):
        redis_stream.read(offset, 10)


def test_redis_consumer_group_delivers_acks_and_redelivers_after_restart(redis_stream, redis_url):
    s = redis_stream
    s.append(make_records(9))  # entries of 3
    assert s.create_group("g") is True and s.create_group("g") is False
    first = s.read_group("g", "c1", max_entries=2)
    assert [d.records["item_id"].tolist() for d in first] == [[0, 1, 2], [3, 4, 5]]
    assert s.ack("g", [first[0].entry_id]) == 1
    assert s.ack("g", [first[0].entry_id]) == 0
    # The consumer crashes with entry 2 unacknowledged and restarts under its name.
    with RedisStream(redis_url, key=s.key) as restarted:
        again = restarted.read_group("g", "c1", max_entries=5)
        assert [d.entry_id for d in again] == [first[1].entry_id]
        new = restarted.read_group("g", "c1", max_entries=5)
        assert [d.records["item_id"].tolist() for d in new] == [[6, 7, 8]]
        assert restarted.read_group("g", "c1") == []
        restarted.ack("g", [d.entry_id for d in again + new])
    with RedisStream(redis_url, key=s.key) as restarted:
        assert restarted.read_group("g", "c1") == []
    with pytest.raises(ConfigError, match="no consumer group 'nope'"):
        s.read_group("nope", "c1")


def test_redis_claim_stale_and_deleted_pending_entries(redis_stream, redis_url):
    s = redis_stream
    s.append(make_records(6))
    s.create_group("g")
    taken = s.read_group("g", "dead", max_entries=2)
    assert len(taken) == 2
    claimed = s.claim_stale("g", "alive", min_idle_ms=0)
    assert [d.entry_id for d in claimed] == [d.entry_id for d in taken]
    # An entry deleted while pending is acknowledged away on re-delivery instead of delivered.
    s._client.xdel(s.key, taken[0].entry_id)
    with RedisStream(redis_url, key=s.key) as restarted:
        assert [d.entry_id for d in restarted.read_group("g", "alive")] == [taken[1].entry_id]
    assert s._client.xpending(s.key, "g")["pending"] == 1


def test_redis_new_entries_only_group(redis_stream):
    s = redis_stream
    s.append(make_records(3))
    s.create_group("tail", last_id="$")
    assert s.read_group("tail", "c") == []
    s.append(make_records(1, start=3))
    assert [d.records["item_id"].tolist() for d in s.read_group("tail", "c", block_ms=100)] == [[3]]


# -- replay ------------------------------------------------------------------------------------------


def sorted_rows(records: np.ndarray) -> np.ndarray:
    return np.sort(records, order=list(EVENT_DTYPE.names))


def test_replay_appends_every_event_once_in_time_order(world, tmp_path):
    table = pq.read_table(world / "events.parquet")
    with LogStream(tmp_path / "log") as log:
        stats = replay(world, log, batch=1000)
        records, offset = log.read(0, 10**6)
    assert stats.events == table.num_rows == len(records) == offset == stats.end_offset
    assert stats.appends == -(-table.num_rows // 1000)
    assert stats.first_ts_ms == records["ts_ms"][0] and stats.last_ts_ms == records["ts_ms"][-1]
    assert (np.diff(records["ts_ms"]) >= 0).all()
    assert sorted_rows(records).tobytes() == sorted_rows(to_records(table)).tobytes()
    # Ties in time are broken by user, then by file order: the replay order is a total order.
    same_ts = records["ts_ms"][1:] == records["ts_ms"][:-1]
    assert (records["user_id"][1:][same_ts] >= records["user_id"][:-1][same_ts]).all()


def test_replay_window_and_pacing(world, tmp_path):
    ts = pq.read_table(world / "events.parquet", columns=["ts_ms"]).column("ts_ms").to_numpy()
    lo, hi = np.quantile(ts, [0.3, 0.4]).astype(np.int64)
    with LogStream(tmp_path) as log:
        stats = replay(world, log, start_ms=int(lo), end_ms=int(hi), batch=64, speedup=(hi - lo) / 300)
        records, _ = log.read(0, 10**6)
    assert len(records) == ((ts >= lo) & (ts < hi)).sum() == stats.events
    assert records["ts_ms"].min() >= lo and records["ts_ms"].max() < hi
    assert stats.wall_s >= 0.9 * (stats.last_ts_ms - stats.first_ts_ms) / ((hi - lo) / 300) / 1000
    with pytest.raises(ConfigError, match="speedup"):
        replay(world, log, speedup=0)


def test_replay_into_redis_matches_the_log(world, tmp_path, redis_stream):
    with LogStream(tmp_path) as log:
        replay(world, log)
        expected, _ = log.read(0, 10**6)
    stats = replay(world, redis_stream, batch=5000)
    records, offset = redis_stream.read("0-0", 10**6)
    assert records.tobytes() == expected.tobytes() and offset == stats.end_offset == redis_stream.end_offset()
