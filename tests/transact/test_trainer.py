"""The trainer: deterministic seeds and exact resumption after an interruption."""

from __future__ import annotations

import pytest
import torch

from lifelong.data.world import load_config, simulate_to
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, train
from lifelong.transact.training_rows import BuildConfig, build_rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    simulate_to(load_config("tiny", overrides=["users.n_users=15"]), d / "w")
    build_rows(d / "w", d / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=100, nal_negatives=4))
    return d / "rows"


def _weights(run):
    return torch.load(run / "model.pt", weights_only=False)["state_dict"]


def test_interrupted_run_resumes_to_the_same_weights(rows, tmp_path):
    cfg = TrainConfig(model="transact_v2", nal="in_batch", epochs=2, max_rows=400, batch_size=64)
    train(rows, tmp_path / "straight", cfg, log=lambda s: None)

    def crash_after_first_epoch(message: str) -> None:
        if "epoch 1:" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(rows, tmp_path / "resumed", cfg, log=crash_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    logs = []
    meta = train(rows, tmp_path / "resumed", cfg, log=logs.append)
    assert any("resuming" in m for m in logs) and len(meta["epochs"]) == 2
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_differs(rows, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(rows, tmp_path / name, TrainConfig(model="wide_deep", nal="none", epochs=1, seed=seed), log=lambda s: None)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
