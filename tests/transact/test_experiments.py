"""Experiment files and summaries: every packaged table loads; mean ± std over seeds, relative to
the table's first row."""

from __future__ import annotations

import math

import pytest

from lifelong.core.errors import ConfigError
from lifelong.transact.experiments import Row, load_table, render_markdown, summarise, table_names


def _ev(repin: float, hide: float) -> dict:
    head = lambda h: {"hit@3": h, "ne": 0.9, "auc": 0.6, "gauc": 0.6}  # noqa: E731
    return {"per_head": {"repin": head(repin), "hide": head(hide)}, "examples_per_s": 100.0,
            "lift_fraction": {"repin": 0.5}, "oracle_hit": {"repin": 1.0, "hide": 0.0},
            "random_hit": {"repin": 0.3, "hide": 0.1}}


def test_relative_figures_are_per_seed_against_the_base_row():
    rows = [Row("base"), Row("model")]
    results = {"base": [_ev(0.5, 0.1), _ev(0.4, 0.0)], "model": [_ev(0.6, 0.05), _ev(0.6, 0.05)]}
    s = summarise("t", "title", rows, results, has_oracle=True)
    model = s["rows"][1]
    assert math.isclose(model["hit_repin"][0], 0.6) and math.isclose(model["hit_repin"][1], 0.0)
    # per seed: +20% and +50%
    assert math.isclose(model["rel_repin"][0], 0.35) and math.isclose(model["rel_repin"][1], 0.2121320343559643)
    # a zero base hit makes the relative change undefined, not a crash
    assert math.isnan(model["rel_hide"][0])
    md = render_markdown(s)
    assert "| model | 0.6000 ± 0.0000 | +35.0% ± 21.2 |" in md
    assert "| oracle | 1.0000 |" in md


@pytest.mark.parametrize("name", table_names())
def test_every_packaged_experiment_loads_with_checked_rows(name):
    table = load_table(name)
    assert table.rows and len({row.label for row in table.rows}) == len(table.rows)


def test_an_experiment_with_a_misspelled_model_key_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("title: t\nrows:\n  - label: a\n    config: {model: {name: transact_v2, token_similarty: true}}\n")
    with pytest.raises(ConfigError, match=r"rows\[0\]\.config \(a\).*token_similarty"):
        load_table(path)
