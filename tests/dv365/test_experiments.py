"""The DV365 experiment on a tiny world: every row is run, reported, plotted, and not run twice."""

from __future__ import annotations

import json

import pytest

from lifelong.core.errors import ConfigError
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365 import experiments
from lifelong.dv365.experiments import FSA_ROW, STALENESS_DAYS, ExperimentConfig, encoder_rows, run_experiment


def test_rows_cover_the_papers_comparison():
    rows = encoder_rows(ExperimentConfig())
    assert len(rows) == 12 and rows["no user tower"].backbone.user_vectors == 0
    assert rows[FSA_ROW].fsa.encoders == ("funnel", "lce") and rows[FSA_ROW].gap_ms == 86_400_000
    assert {r.fsa.view for r in rows.values()} == {"token", "dim"}
    assert rows["dim-wise LCE"].fsa.out_cols == 5 and rows["token-wise LCE"].fsa.out_cols == 32
    with pytest.raises(ConfigError):
        ExperimentConfig(users=0)


def test_experiment_runs_reports_and_resumes(tmp_path, monkeypatch):
    world = tmp_path / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=12"]), world)
    cfg = ExperimentConfig(users=12, epochs=1, train_days=2, per_group=4, out_cols=4, dim_out_cols=2)
    report = run_experiment(world, tmp_path / "out", cfg, log=lambda _: None)
    assert [r["label"] for r in report["encoders"]] == list(encoder_rows(cfg))
    assert report["encoders"][0]["delta_pct"] == {t: 0.0 for t in ("click", "repin", "long_view", "hide")}
    assert set(report["staleness"]) == {"24 h gap", "no gap"}
    assert list(report["staleness"]["no gap"]) == [str(a) for a in STALENESS_DAYS]
    for name in ("report.md", "report.json", "encoders.png", "staleness.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| token-wise FSA (funnel + LCE) | 66 × 4 |" in (tmp_path / "out" / "report.md").read_text()
    # A second call finds every run in results.json and trains nothing.
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = run_experiment(world, tmp_path / "out", cfg, log=lambda _: None)
    assert json.loads(json.dumps(again["encoders"])) == json.loads(json.dumps(report["encoders"]))
