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


def test_a_report_ranked_by_another_head_names_it():
    def ev(click: float) -> dict:
        head = lambda h: {"hit@3": h, "ne": 0.9, "auc": 0.6, "gauc": 0.6}  # noqa: E731
        return {"per_head": {"click": head(click), "repin": head(0.0), "hide": head(0.0)}, "examples_per_s": 1.0}

    s = summarise("t", "title", [Row("base"), Row("model")], {"base": [ev(0.5)], "model": [ev(0.75)]},
                  has_oracle=False, head="click")
    assert s["head"] == "click" and math.isclose(s["rows"][1]["hit_repin"][0], 0.75)
    md = render_markdown(s)
    assert "HIT@3/click" in md and "NE/click" in md and "HIT@3/repin" not in md
    assert "| model | 0.7500 ± 0.0000 | +50.0% ± 0.0 |" in md


def test_an_experiment_ranked_by_a_head_the_rows_lack_is_refused(tmp_path):
    from lifelong.data.world import load_config, simulate_to
    from lifelong.transact.experiments import run_experiment
    from lifelong.transact.sequence_layout import SequenceLayout
    from lifelong.transact.training_rows import BuildConfig, build_rows

    simulate_to(load_config("tiny", overrides=["users.n_users=8"]), tmp_path / "w")
    build_rows(tmp_path / "w", tmp_path / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=50))
    for head in ("hide", "likes"):
        with pytest.raises(ConfigError, match=f"--head '{head}': rank by one of click, repin, long_view"):
            run_experiment("quickstart", tmp_path / "rows", tmp_path / "out", seeds=1, head=head)
