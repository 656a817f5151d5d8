"""The validator and the readers: every bad input gives an error naming file, column and row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifelong.core.errors import DataError
from lifelong.data.io import atomic_output_dir, load_dataset, read_table, write_parquet
from lifelong.data.schema import EMBED_DIM
from lifelong.data.validate import validate_table
from tests.conftest import make_events, make_items


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def test_valid_dataset_loads(tiny_dataset):
    ds = load_dataset(tiny_dataset)
    assert ds.events.num_rows == 6 and ds.items.num_rows == 6
    assert ds.users.column("n_explicit").to_pylist() == [3, 1]


def test_missing_column_named():
    with pytest.raises(DataError, match=r"x\.parquet, column 'surface': missing column"):
        validate_table(make_events().drop(["surface"]), "events", "x.parquet")


def test_wrong_type_named():
    ev = make_events()
    ev = _set(ev, "ts_ms", pa.array(ev.column("ts_ms").to_numpy().astype(np.float64)))
    with pytest.raises(DataError, match=r"column 'ts_ms': wrong type double, expected int64"):
        validate_table(ev, "events", "e.parquet")


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("ts_ms", 2, -5, "negative value"),
        ("action_mask", 3, 1 << 14, "unknown action bits"),
        ("action_mask", 1, 0, "an event needs at least one action bit"),
        ("surface", 4, 9, "unknown surface code"),
    ],
)
def test_row_level_errors_name_first_bad_row(column, row, value, message):
    ev = make_events()
    col = ev.column(column).to_numpy().copy()
    col[row] = value
    ev = _set(ev, column, pa.array(col, type=ev.schema.field(column).type))
    with pytest.raises(DataError, match=rf"column '{column}', row {row}: {message}"):
        validate_table(ev, "events", "e.parquet")


def test_timestamps_backwards_within_user():
    ev = make_events()
    ts = ev.column("ts_ms").to_numpy().copy()
    ts[2] = 0  # user 1's third event now predates its second
    with pytest.raises(DataError, match=r"column 'ts_ms', row 2: timestamps go backwards"):
        validate_table(_set(ev, "ts_ms", pa.array(ts)), "events", "e.parquet")


def test_users_must_be_grouped():
    ev = make_events()
    ev = pa.concat_tables([ev.slice(4), ev.slice(0, 4)])
    with pytest.raises(DataError, match="grouped by user"):
        validate_table(ev, "events", "e.parquet")


def test_nan_embedding_named():
    items = make_items()
    emb = np.asarray(items.column("embedding").combine_chunks().flatten()).astype(np.float32).reshape(-1, EMBED_DIM)
    emb[4, 7] = np.nan
    items = _set(items, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMBED_DIM))
    with pytest.raises(DataError, match=r"column 'embedding', row 4: NaN or infinite"):
        validate_table(items, "items", "i.parquet")


def test_wrong_embedding_width_named():
    items = make_items()
    emb = np.zeros((items.num_rows, 16), dtype=np.float16)
    items = _set(items, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 16))
    with pytest.raises(DataError, match="wrong embedding width 16, expected 32"):
        validate_table(items, "items", "i.parquet")


def test_ragged_embedding_width_names_row():
    items = make_items(3)
    lists = [[0.1] * EMBED_DIM, [0.1] * EMBED_DIM, [0.1] * 5]
    items = _set(items, "embedding", pa.array(lists, type=pa.list_(pa.float32())))
    with pytest.raises(DataError, match=r"row 2: wrong embedding width 5"):
        validate_table(items, "items", "i.parquet")


def test_duplicate_item_ids():
    items = make_items()
    items = _set(items, "item_id", pa.array([0, 1, 2, 3, 2, 5], type=pa.int64()))
    with pytest.raises(DataError, match=r"row 4: duplicate item_id 2"):
        validate_table(items, "items", "i.parquet")


def test_truncated_parquet_is_a_clear_error(tiny_dataset):
    path = tiny_dataset / "events.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"events\.parquet: not a readable Parquet file"):
        load_dataset(tiny_dataset)


def test_unknown_item_in_events(tiny_dataset):
    write_parquet(make_items(4), tiny_dataset / "items.parquet")
    with pytest.raises(DataError, match=r"column 'item_id', row \d+: unknown item_id [45]"):
        load_dataset(tiny_dataset)


def test_missing_file(tmp_path, tiny_dataset):
    (tiny_dataset / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"users\.parquet: file not found"):
        load_dataset(tiny_dataset)
    with pytest.raises(DataError, match="dataset directory not found"):
        load_dataset(tmp_path / "nope")


def test_column_subset_read_still_validates(tiny_dataset):
    ev = make_events()
    mask = ev.column("action_mask").to_numpy().copy()
    mask[0] = 1 << 15
    pq.write_table(_set(ev, "action_mask", pa.array(mask, type=pa.uint16())), tiny_dataset / "events.parquet")
    with pytest.raises(DataError, match="unknown action bits"):
        read_table(tiny_dataset / "events.parquet", "events", columns=["user_id", "action_mask"])
    assert read_table(tiny_dataset / "events.parquet", "events", columns=["user_id"]).num_columns == 1


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.parquet").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_replaces_previous_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "1"
    with atomic_output_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
