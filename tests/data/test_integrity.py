"""Integrity of what lifelong writes: Parquet page checksums, and temporaries of killed writers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifelong.core.atomic import clean_stale_temps, pid_alive
from lifelong.core.errors import DataError
from lifelong.data.io import (
    NpyWriter,
    iter_parquet_batches,
    open_dataset,
    parquet_writer,
    read_parquet,
    read_table,
    write_parquet,
)
from tests.test_cli import run_cli


def flip_in_data_page(path, column: str, n: int = 4) -> None:
    """Invert ``n`` bytes in the middle of ``column``'s data pages (row group 0): past the
    dictionary page and the first page header, far from the footer."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data_start, data_end = chunk.data_page_offset, start + chunk.total_compressed_size
    assert data_end - data_start > 256, "the column's data pages are too small to hit page data"
    mid = (data_start + data_end) // 2
    raw = bytearray(path.read_bytes())
    for i in range(mid, mid + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    res = run_cli("simulate", "--preset", "tiny", "--out", str(d / "w"), "--set", "users.n_users=20")
    assert res.returncode == 0, res.stderr
    return d / "w"


@pytest.fixture
def corrupted_world(world, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    flip_in_data_page(w / "events.parquet", "ts_ms")
    with pytest.raises(OSError, match="CRC checksum verification failed"):  # the flip landed in page data
        pq.read_table(w / "events.parquet", page_checksum_verification=True)
    return w


@pytest.mark.parametrize("command", [("inspect", "{w}"), ("transact", "build", "--data", "{w}", "--out", "{out}")])
def test_flipped_byte_in_events_is_one_line_naming_the_file(corrupted_world, tmp_path, command):
    out = tmp_path / "rows"
    res = run_cli(*(a.format(w=corrupted_world, out=out) for a in command))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"{corrupted_world / 'events.parquet'}: not a readable Parquet file" in lines[0]
    assert "checksum" in lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    assert not out.exists()


def _table() -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({"a": rng.integers(0, 1 << 40, 50_000), "b": rng.standard_normal(50_000)})


@pytest.mark.parametrize("how", ["write_parquet", "parquet_writer"])
def test_every_reader_verifies_the_checksums_of_every_writer(tmp_path, how):
    path = tmp_path / "t.parquet"
    table = _table()
    if how == "write_parquet":
        write_parquet(table, path)
    else:
        with parquet_writer(path, table.schema) as w:
            w.write_table(table)
    assert read_parquet(path).equals(table)
    flip_in_data_page(path, "b")
    with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file \(.*CRC checksum"):
        read_parquet(path)
    with pytest.raises(DataError, match="CRC checksum"):
        list(iter_parquet_batches(path, ["b"]))
    with pytest.raises(OSError, match="CRC checksum"):
        open_dataset(path).to_table()


def test_files_without_checksums_still_read(tiny_dataset):
    """Files written before checksums were added verify silently: there is nothing to check."""
    path = tiny_dataset / "events.parquet"
    events = pq.read_table(path)
    pq.write_table(events, path)  # no write_page_checksum
    assert read_table(path, "events").equals(events)


def test_clean_stale_temps_removes_only_dead_writers_entries(tmp_path):
    dead, live = dead_pid(), os.getpid()
    for name in (f".rows.tmp-{dead}-k3j_x9", f".rows.tmp-{live}-a1b2c3", f".rows.tmp-{dead}", "rows", ".keep.d"):
        (tmp_path / name).mkdir()
    for name in (f".items.parquet.tmp-{dead}", f".h.png.tmp-{dead}.png", f".world.json.tmp-{live}", ".gitignore",
                 ".x.tmp-abc"):
        (tmp_path / name).write_text("x")
    (tmp_path / f".w.old-{dead}").mkdir()           # a swap killed after parking the old output: put back
    (tmp_path / f".w.old-{dead}" / "world.json").write_text("old")
    (tmp_path / f".rows.old-{dead}").mkdir()        # a swap killed after the rename: the old output goes
    removed = {p.name for p in clean_stale_temps(tmp_path)}
    assert removed == {f".rows.tmp-{dead}-k3j_x9", f".rows.tmp-{dead}", f".items.parquet.tmp-{dead}",
                       f".h.png.tmp-{dead}.png", f".w.old-{dead}", f".rows.old-{dead}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".rows.tmp-{live}-a1b2c3", "rows", ".keep.d", f".world.json.tmp-{live}", ".gitignore", ".x.tmp-abc", "w"])
    assert (tmp_path / "w" / "world.json").read_text() == "old"
    assert clean_stale_temps(tmp_path / "missing") == []


def test_build_removes_temporaries_of_a_killed_build(world, tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale, alive = tmp_path / f".rows.tmp-{dead}", tmp_path / f".rows.tmp-{live}-x1y2z3"
    for d in (stale, alive):
        d.mkdir()
        (d / "train").mkdir()
    res = run_cli("transact", "build", "--data", str(world), "--out", str(tmp_path / "rows"), "--ll-cap", "300")
    assert res.returncode == 0, res.stderr
    assert not stale.exists()
    assert alive.is_dir()
    assert (tmp_path / "rows" / "build.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "rows"])


def test_npy_writer_writes_what_np_save_writes_and_refuses_what_does_not_fit(tmp_path):
    a = np.arange(7 * 5, dtype=np.int32).reshape(7, 5)
    with NpyWriter(tmp_path / "a.npy", np.int32, a.shape) as w:
        for block in (a[:3], a[3:3], a[3:]):
            w.write(block)
    np.save(tmp_path / "b.npy", a)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    with NpyWriter(tmp_path / "c.npy", np.int32, a.shape) as w:
        with pytest.raises(ValueError, match="does not fit"):
            w.write(a[:2].astype(np.int64))
        with pytest.raises(ValueError, match="more than 7 rows"):
            w.write(np.concatenate([a, a]))
        w.write(a)
    with pytest.raises(ValueError, match="3 of 7 rows written"), NpyWriter(tmp_path / "d.npy", np.int32, a.shape) as w:
        w.write(a[:3])
