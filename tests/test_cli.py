"""The command line: output, exit codes, and no tracebacks for user errors."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_inspect_prints_lengths_and_writes_png(tiny_dataset, tmp_path):
    png = tmp_path / "h.png"
    res = run_cli("inspect", str(tiny_dataset), "--png", str(png))
    assert res.returncode == 0, res.stderr
    assert "LL length / user (explicit)" in res.stdout
    assert "p50 2  p90 3  max 3" in res.stdout  # explicit counts per user are 3 and 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupted_input_is_one_clear_line(tiny_dataset):
    table = pq.read_table(tiny_dataset / "items.parquet")
    table = table.set_column(2, "author_id", table.column("author_id").cast("string"))
    pq.write_table(table, tiny_dataset / "items.parquet")
    res = run_cli("inspect", str(tiny_dataset))
    assert res.returncode == 2
    assert "column 'author_id': wrong type string, expected int64" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tiny_dataset / "history_lengths.png").exists()


@pytest.mark.parametrize("args", [("inspect", "/nonexistent/dir"), ("frobnicate",)])
def test_user_errors_exit_nonzero_without_traceback(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
