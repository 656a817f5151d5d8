"""The report harness (lifelong.core.report): files written atomically, the markdown table's
shape, the JSON round trip."""

from __future__ import annotations

import json

import pytest

from lifelong.core.report import Column, Figure, Report, Table, hbars, pyplot, write_atomic


def _report() -> Report:
    rows = [{"label": "base", "auc": 0.61234, "n": 12345, "pair": [0.5, 0.01]},
            {"label": "model", "auc": 0.65, "n": 999, "pair": [0.6, 0.02]},
            {"label": "oracle", "auc": "1.000"}]  # a str cell is kept as it is; missing keys are empty
    table = Table([Column("row", "label"), Column("AUC", "auc", "{:.3f}", right=True),
                   Column("rows", "n", "{:,}"), Column("mean ± std", "pair", lambda p: f"{p[0]:.2f} ± {p[1]:.2f}"),
                   Column("whole row", None, lambda r: r["label"].upper())], rows)

    def draw():
        fig, ax = pyplot().subplots()
        hbars(ax, ["a", "b"], [1.0, 2.0], [0.1, 0.2], color="C0")
        return fig

    return Report("exp", data={"rows": rows, "seeds": [0, 1], "nested": {"b": 1, "a": None}},
                  blocks=["First paragraph.", table, "Last line."], title="Title",
                  figures=[Figure(draw), Figure(draw, "second", dpi=50)])


def test_markdown_table_shape():
    md = _report().markdown()
    assert md.endswith("Last line.\n") and not md.endswith("\n\n")
    assert md.split("\n\n")[:2] == ["### Title", "First paragraph."]
    lines = md.split("\n\n")[2].split("\n")
    assert lines == ["| row | AUC | rows | mean ± std | whole row |",
                     "|---|---:|---|---|---|",
                     "| base | 0.612 | 12,345 | 0.50 ± 0.01 | BASE |",
                     "| model | 0.650 | 999 | 0.60 ± 0.02 | MODEL |",
                     "| oracle | 1.000 | | | ORACLE |"]
    assert {line.count("|") for line in lines} == {6}
    assert Report("bare", blocks=["x"]).markdown() == "x\n"


def test_write_files_and_json_round_trip(tmp_path):
    report = _report()
    paths = report.write(tmp_path / "out")
    assert [p.name for p in paths] == ["exp.json", "exp.md", "exp.png", "second.png"]
    assert json.loads(paths[0].read_text()) == report.data
    assert paths[0].read_text() == json.dumps(report.data, indent=2, sort_keys=True) + "\n"
    assert paths[1].read_text() == report.markdown()
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[2:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    write_atomic(path, b"bytes")
    assert path.read_bytes() == b"bytes"
