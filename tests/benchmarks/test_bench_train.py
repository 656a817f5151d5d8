"""`lifelong bench train` on a tiny world: both variants of TransAct V2 and of the DV365 tower train on the same
rows, the JSON holds the speedup and each variant's NE, and bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lifelong.bench.train import VARIANTS, render, run_train_bench
from lifelong.core.errors import ConfigError
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.fsa import FSAConfig
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_train")
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4),
                                                        ll_cap=40, imp_cap=10))
    return root


def test_both_variants_train_on_the_same_rows_and_report_speedup_and_ne(world, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # small settings for a test; the command's own defaults are the production sizes
        result = run_train_bench(world / "ds", world / "world", rows=300, eval_rows=150, dv365_users=20, rounds=2,
                                 report=tmp_path / "train.json", transact_base={"batch_size": 64},
                                 dv365_base=dict(fsa=FSAConfig(out_cols=4, funnel_blocks=2, ffn_dim=8), train_days=2,
                                                 per_group=8, eval_per_group=16, groups_per_batch=8))
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [m["model"] for m in saved["models"]] == ["transact_v2", "dv365"]
    for m in saved["models"]:
        assert set(m["variants"]) == set(VARIANTS)
        today, opt = m["variants"]["today"], m["variants"]["optimized"]
        assert len(today["runs"]) == len(opt["runs"]) == 2 and min(today["runs"] + opt["runs"]) > 0
        assert m["speedup"] == pytest.approx(opt["examples_per_s"] / today["examples_per_s"])
        assert all(0 < v < 100 for v in (*today["ne"].values(), *opt["ne"].values()))
        assert today["ne"] != opt["ne"] and m["ne_change"] == pytest.approx(opt["ne"]["mean"] - today["ne"]["mean"])
    # The same rows, weights and order: bfloat16 moves TransAct V2's result, but not far (the tiny
    # DV365 tower, one epoch on 20 users, is too far from converged for such a bound).
    assert abs(saved["models"][0]["ne_change"]) < 0.05
    assert saved["models"][0]["eval_rows"] == 150
    assert "| transact_v2 | optimized |" in render(result) and "| dv365 | today |" in render(result)


def test_bench_train_refuses_bad_input_in_one_line(world):
    with pytest.raises(ConfigError, match="--data .* or --dv365"):
        run_train_bench(None, None)
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        run_train_bench(world / "ds", rounds=0)
    r = run_cli("bench", "train", "--rows", "0", "--data", str(world / "ds"))
    assert r.returncode == 2 and "rows must be >= 1" in r.stderr and "Traceback" not in r.stderr
