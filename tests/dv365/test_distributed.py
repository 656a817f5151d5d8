"""Data-parallel training of the DV365 tower (``lifelong dv365 train --nproc 2``), and ``--resume``.

Two processes split each global batch of groups and reach the evaluation NE of one within 1e-5
(the float order of the gradient sums differs, see tests/transact/test_distributed.py); rank 0
alone pools the token cache, evaluates and writes. A run interrupted after an epoch resumes to
the very weights of an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.fsa import FSAConfig
from lifelong.dv365.train import DV365TrainConfig, train_dv365
from tests.test_cli import run_cli

CFG = DV365TrainConfig(fsa=FSAConfig(out_cols=4, funnel_blocks=2, ffn_dim=8), train_days=2, per_group=8,
                       eval_per_group=16, max_users=None, epochs=2, groups_per_batch=8)
FLAGS = ["--out-cols", "4", "--set", "fsa.funnel_blocks=2", "--set", "fsa.ffn_dim=8", "--train-days", "2",
         "--per-group", "8", "--set", "eval_per_group=16", "--max-users", "0", "--epochs", "2",
         "--set", "groups_per_batch=8", "--resume"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A world, a one-process run (here) and a two-process run (the CLI), both with --resume."""
    root = tmp_path_factory.mktemp("dv365_ddp")
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), root / "w")
    torch.set_num_threads(1)
    train_dv365(root / "w", root / "one", CFG, log=lambda _: None, resume=True)
    res = run_cli("dv365", "train", "--data", str(root / "w"), "--out", str(root / "two"), *FLAGS, "--nproc", "2")
    assert res.returncode == 0, res.stderr
    assert "eval NE: click" in res.stdout
    return root


def test_two_processes_train_what_one_does(runs):
    one, two = (json.loads((runs / r / "run.json").read_text()) for r in ("one", "two"))
    assert two["train"] == one["train"] and two["data_parallel"] == {"processes": 2, "backend": "gloo",
                                                                     "groups_per_process": 4}
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    for task, ne in one["eval"]["ne"].items():
        assert abs(ne - two["eval"]["ne"][task]) < 1e-5
    assert sorted(p.name for p in (runs / "two").iterdir()) == ["checkpoint.pt", "model.pt", "run.json", "tokens"]


def test_an_interrupted_run_resumes_to_the_same_weights(runs, tmp_path):
    def crash_after_first_epoch(message: str) -> None:
        if "epoch 1:" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dv365(runs / "w", tmp_path / "r", CFG, log=crash_after_first_epoch, resume=True)
    assert not (tmp_path / "r" / "model.pt").exists()
    logs = []
    train_dv365(runs / "w", tmp_path / "r", CFG, log=logs.append, resume=True)
    assert any("resuming" in m and "after epoch 1" in m for m in logs)
    a, b = (torch.load(run / "model.pt", weights_only=False) for run in (runs / "one", tmp_path / "r"))
    assert all(torch.equal(a["tower"]["state_dict"][k], v) for k, v in b["tower"]["state_dict"].items())
    assert all(torch.equal(a["backbone"]["state_dict"][k], v) for k, v in b["backbone"]["state_dict"].items())
